"""Summarise a database for ``raw_tables``: checked, loaded by RelBench, counted.

Summarising a dataset folder is the one place where our checks
(:mod:`tve_pipeline.validation`, which reads the files as they are) meet RelBench's own
load (:mod:`tve_pipeline.database`, which opens them as RelBench does): our errors stop it
with a one-line :class:`~tve_pipeline.schema.DatabaseError`, and whatever RelBench then
corrects without a word (foreign keys past their parent set to null) is counted, so that
nothing about the data changes silently. Neither of the two modules imports the other;
this one uses both. The record itself, :class:`~tve_pipeline.database.DatabaseSummary`,
stays in :mod:`tve_pipeline.database` (Dagster's IO manager pickles it under that name).
"""

from __future__ import annotations

from pathlib import Path

from tve_pipeline.database import DatabaseSummary, column_types, fingerprint, open_dataset
from tve_pipeline.schema import DatabaseError
from tve_pipeline.validation import validate_dataset


def summarise_database(dataset_dir: str | Path) -> DatabaseSummary:
    """Open and validate a dataset folder: our checks (``tve_pipeline.validation``), then
    RelBench's own load, whose silent corrections are counted."""
    dataset_dir = Path(dataset_dir).resolve()
    ds = open_dataset(dataset_dir)
    report = validate_dataset(dataset_dir)
    try:
        report.raise_for_errors()
    except DatabaseError as exc:
        raise DatabaseError(f"database {ds.manifest.name!r}: {exc}") from exc
    try:
        db = ds.make_db()
        # RelBench's get_db() sets foreign keys past the parent table to null without a
        # word (they dangle once later rows are cut); count them so nothing changes silently.
        corrected = {
            f"{name}.{col}": int((t.df[col] >= len(db.table_dict[parent].df)).sum())
            for name, t in db.table_dict.items()
            for col, parent in t.fkey_col_to_pkey_table.items()
        }
        ds.validate_and_correct_db(db)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise DatabaseError(f"database {ds.manifest.name!r} at {dataset_dir}: {exc}") from exc
    tables = {name: t.df for name, t in db.table_dict.items()}
    return DatabaseSummary(
        name=ds.manifest.name,
        dataset_dir=str(dataset_dir),
        fingerprint=fingerprint(dataset_dir),
        rows={name: len(t.df) for name, t in db.table_dict.items()},
        val_timestamp=str(ds.val_timestamp),
        test_timestamp=str(ds.test_timestamp),
        min_timestamp=str(db.min_timestamp),
        max_timestamp=str(db.max_timestamp),
        task_names=tuple(ds.get_task_names()),
        column_types=column_types(tables, ds.manifest, dataset_dir),
        warnings=tuple(report.warnings),
        info=tuple(report.info),
        changed_rows={
            "relbench_nulled_fkeys": {k: v for k, v in corrected.items() if v},
            **report.counts.get("import_report", {}),
        },
    )
