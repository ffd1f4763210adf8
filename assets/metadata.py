"""What the Dagster UI shows of an asset: fixed metadata keys, tables, images, code.

The UI plots a numeric metadata key across an asset's materialisations (its partitions),
so every number has a key that is the same for every partition and database (``rows``,
``targets``, ``val_loss``), never one built from an entity table or task name; a cell's
score is under its metric's key (``val_roc_auc``, ``test_mae``), so that AUROC and MAE are
plotted apart, not joined in one line; a breakdown by name (per table, per entity) is one
table value under a fixed key. Plots are PNGs embedded in Markdown (the UI renders
``data:`` images; a Markdown value over 1,000 characters sits behind a "[Show Markdown]"
link that opens it); code is a fenced Markdown block. Dagster 1.13's UI renders no Mermaid
(its web app has no Mermaid renderer): the ``schema`` block is Mermaid source, drawn by
GitHub, mermaid.live or any Markdown viewer with Mermaid; ``schema_image`` is the schema
drawn.
"""

import base64
import math
from collections.abc import Mapping, Sequence

import dagster as dg

_TYPES = {"string": str, "int": int, "float": float, "bool": bool}


def _cell(value, kind: str):
    """A plain JSON value of the column's type; None for a missing or NaN number."""
    if value is None:
        return None
    if kind in ("int", "float"):
        value = float(value)
        if math.isnan(value) or math.isinf(value):
            return None
        return int(value) if kind == "int" else value
    if kind == "string" and isinstance(value, float):
        return f"{value:.6g}"
    return _TYPES[kind](value)


def table(
    rows: Sequence[Mapping],
    columns: Mapping[str, str],
    descriptions: Mapping[str, str] | None = None,
) -> dg.TableMetadataValue:
    """``rows`` as a table value with ``columns`` (name -> ``string``/``int``/``float``/``bool``,
    in display order)."""
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn(name, kind, description=(descriptions or {}).get(name))
            for name, kind in columns.items()
        ]
    )
    records = [
        dg.TableRecord({name: _cell(row.get(name), kind) for name, kind in columns.items()})
        for row in rows
    ]
    return dg.MetadataValue.table(records, schema)


def png_markdown(png: bytes, title: str) -> str:
    """A PNG inside Markdown, so that the UI shows the image itself."""
    encoded = base64.b64encode(png).decode()
    return f"**{title}**\n\n![{title}](data:image/png;base64,{encoded})"


def image(png: bytes, title: str) -> dg.MarkdownMetadataValue:
    return dg.MetadataValue.md(png_markdown(png, title))


def code(text: str, language: str, heading: str = "") -> str:
    """``text`` as a fenced Markdown block (a fence longer than any backtick run inside)."""
    fence = "```"
    while fence in text:
        fence += "`"
    block = f"{fence}{language}\n{text.rstrip()}\n{fence}"
    return f"**{heading}**\n\n{block}" if heading else block


def mlflow_metadata(run) -> dict:
    """The MLflow run of a materialisation (:class:`resources.mlflow_tracking.MLflowRun`): a
    link into the MLflow UI, and its id."""
    return {"mlflow_run": dg.MetadataValue.url(run.url), "mlflow_run_id": run.run_id}
