"""The words every stage uses for what a database holds, written once.

A column of a database has one *semantic type*, decided once (inferred by
:func:`tve_pipeline.database.infer_column_type`, or declared in ``tve_types.json``) and
read everywhere after: ``numerical`` and ``categorical`` columns are aggregated by TVE
(:mod:`tve_pipeline.traversal`) and fed to the tabular encoder; ``timestamp`` is fed to
the encoder only; ``text`` is not aggregated but is fed to the encoder as an offline
embedding (:mod:`tve_pipeline.text`, no download); ``key`` marks primary and foreign keys
and time columns. A database that cannot be used raises :class:`DatabaseError`, whose
message is one line naming what is wrong (the table, column or task).

This module imports nothing of the pipeline, so that opening (:mod:`tve_pipeline.database`),
checking (:mod:`tve_pipeline.validation`) and importing (:mod:`tve_pipeline.datasets`) a
database can all speak these words without importing one another.
"""

NUMERICAL = "numerical"
CATEGORICAL = "categorical"
TIMESTAMP = "timestamp"
TEXT = "text"
KEY = "key"

#: Every semantic type a column may have.
SEMANTIC_TYPES: tuple[str, ...] = (NUMERICAL, CATEGORICAL, TIMESTAMP, TEXT, KEY)

#: The file of a dataset folder that declares its columns' semantic types, written by
#: ``tve import files`` (inference plus the user's overrides): ``{"format": 1, "columns":
#: {table: {column: type}}, "overrides": {table: {column: type}}}``.
TYPES_FILE = "tve_types.json"


class DatabaseError(ValueError):
    """A database that cannot be used, with a one-line reason naming what is wrong."""
