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


def schema_layers(tables: Mapping) -> dict[str, int]:
    """Each table's column in the drawn schema: 0 for a table that references no other
    table, else one more than the deepest table it references (a foreign key to itself or
    to a table outside ``tables`` is not followed; a cycle is cut where it closes)."""
    layer: dict[str, int] = {}

    def depth(name: str, path: frozenset) -> int:
        if name in layer:
            return layer[name]
        parents = [
            p for p in tables[name].fkeys.values() if p in tables and p != name and p not in path
        ]
        value = 1 + max((depth(p, path | {name}) for p in parents), default=-1)
        layer[name] = value
        return value

    for name in tables:
        depth(name, frozenset())
    return layer


def _box_lines(name: str, spec, column_types: Mapping[str, str]) -> list[str]:
    lines = []
    if spec.pkey:
        lines.append(f"PK {spec.pkey}")
    lines += [f"FK {c} -> {p}" for c, p in spec.fkeys.items()]
    if spec.time_col:
        lines.append(f"time {spec.time_col}")
    keys = {spec.pkey, spec.time_col, *spec.fkeys}
    others: dict[str, int] = {}
    for column, stype in column_types.items():
        if column not in keys:
            others[stype] = others.get(stype, 0) + 1
    if others:
        lines.append(", ".join(f"{n} {t}" for t, n in sorted(others.items())))
    return lines


def schema_png(tables: Mapping, column_types: Mapping[str, Mapping[str, str]]) -> bytes:
    """The schema drawn as a PNG (the UI shows images, not Mermaid): a box per table with
    its primary key, foreign keys, time column and how many other columns of each semantic
    type; an arrow from each foreign key's table to the table it references; referenced
    tables on the left (:func:`schema_layers`)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = schema_layers(tables)
    columns: dict[int, list[str]] = {}
    for name in tables:
        columns.setdefault(layers[name], []).append(name)
    boxes = {n: _box_lines(n, tables[n], column_types.get(n, {})) for n in tables}
    line_h, box_w, gap_x, gap_y = 0.32, 4.2, 1.6, 0.5
    heights = {n: (len(lines) + 1.4) * line_h for n, lines in boxes.items()}
    total_h = max(sum(heights[n] + gap_y for n in col) for col in columns.values())
    width = len(columns) * (box_w + gap_x)
    fig, ax = plt.subplots(figsize=(max(width, 6), max(total_h, 3)))
    where: dict[str, tuple[float, float, float]] = {}  # name -> (x, y top, height)
    for i, col in sorted(columns.items()):
        x = i * (box_w + gap_x)
        y = total_h
        for name in col:
            h = heights[name]
            ax.add_patch(
                plt.Rectangle((x, y - h), box_w, h, fill=True, fc="#f4f6fb", ec="#33415c", lw=1.2)
            )
            ax.add_patch(plt.Rectangle((x, y - line_h * 1.2), box_w, line_h * 1.2, fc="#33415c"))
            ax.text(x + 0.12, y - line_h * 0.6, name, va="center", color="white", weight="bold")
            for j, text in enumerate(boxes[name]):
                ax.text(x + 0.12, y - line_h * (1.9 + j), text, va="center", fontsize=8.5)
            where[name] = (x, y, h)
            y -= h + gap_y
    for name, spec in tables.items():
        for row, parent in enumerate(spec.fkeys.values(), start=1 if spec.pkey else 0):
            if parent not in where or parent == name:
                continue
            cx, cy, _ = where[name]
            px, py, _ = where[parent]
            at = cy - line_h * (1.9 + row)  # the foreign key's own line
            title = py - line_h * 0.6  # the referenced table's name
            start = (cx, at) if px < cx else (cx + box_w, at)
            end = (px + box_w, title) if px < cx else (px, title)
            ax.annotate(
                "",
                xy=end,
                xytext=start,
                arrowprops={"arrowstyle": "->", "color": "#7a8499", "lw": 1.0},
            )
    ax.set_xlim(-0.2, width)
    ax.set_ylim(-0.2, total_h + 0.2)
    ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
