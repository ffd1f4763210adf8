"""A database's schema as a Mermaid entity-relationship diagram (``erDiagram``).

Every table is an entity listing its columns, each as ``type name`` where the type is the
column's semantic type (``numerical``, ``categorical``, ``text``, ...; ``key`` for a
primary or foreign key, ``timestamp`` for the time column), primary keys marked ``PK``,
foreign keys ``FK`` and the time column commented ``"time"``. Every foreign key is a
relationship from the referenced table to the referencing one, labelled with the key
column: a row references at most one parent row (RelBench nulls a dangling key), a parent
row has any number of children (``|o--o{``).

Mermaid accepts letters, digits, ``_`` and ``-`` in entity and attribute names; any other
character becomes ``_`` (a name that then starts with a digit or ``-`` gets a leading
``_``), so the diagram parses whatever the tables are called. The text is the same for the
same schema (tables and columns in manifest order), so it can be compared across runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_NOT_NAME = re.compile(r"[^A-Za-z0-9_-]")


def mermaid_name(name: str) -> str:
    """``name`` as a Mermaid entity or attribute name: ``'order items'`` -> ``'order_items'``."""
    out = _NOT_NAME.sub("_", str(name)) or "_"
    return out if out[0].isalpha() or out[0] == "_" else f"_{out}"


def _column_line(column: str, stype: str, spec) -> str:
    markers = [m for m, on in (("PK", column == spec.pkey), ("FK", column in spec.fkeys)) if on]
    is_time = column == spec.time_col
    kind = "timestamp" if is_time else ("key" if markers else stype)
    line = f"{mermaid_name(kind)} {mermaid_name(column)}"
    if markers:
        line += " " + ", ".join(markers)
    if is_time:
        line += ' "time"'
    return line


def er_diagram(tables: Mapping, column_types: Mapping[str, Mapping[str, str]]) -> str:
    """The Mermaid ``erDiagram`` of ``tables`` (a RelBench manifest's ``tables``: pkey,
    fkeys, time_col per table) with the columns of ``column_types`` (table -> column ->
    semantic type, as :func:`tve_pipeline.database.column_types` gives them)."""
    lines = ["erDiagram"]
    for name, spec in tables.items():
        columns = dict(column_types.get(name, {}))
        for key in [spec.pkey, spec.time_col, *spec.fkeys]:  # keys even when untyped
            if key and key not in columns:
                columns[key] = "key"
        lines.append(f"    {mermaid_name(name)} {{")
        lines += [f"        {_column_line(c, t, spec)}" for c, t in columns.items()]
        lines.append("    }")
    for name, spec in tables.items():
        for column, parent in spec.fkeys.items():
            label = str(column).replace('"', "'")
            lines.append(f'    {mermaid_name(parent)} |o--o{{ {mermaid_name(name)} : "{label}"')
    return "\n".join(lines)
