"""The graph a database becomes, and seeds on its clock.

A database becomes RelBench's pkey-fkey graph (``make_pkey_fkey_graph``): a node type per
table, an edge type per foreign key and its reverse, and per node type the table's usable
columns as a torch_frame ``TensorFrame`` (keys are structure, not features) and, for a
timed table, each row's time in unix seconds. Seeds -- (entity row, seed time) pairs --
are put on the same clock by :func:`seed_tensors`, so that the sampler's ``time <=
seed_time`` compares like with like. Materialising the tensor frames (text embedding
above all) is the slow part, so it is cached on disk under a name that says what the
frames depend on: the column types and the text embedder.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from relbench.base import Database, Table
from relbench.modeling.graph import make_pkey_fkey_graph
from relbench.modeling.utils import to_unix_time
from torch_frame import stype
from torch_geometric.data import HeteroData

from tve_pipeline.common import atomic_path, naive_timestamps
from tve_pipeline.config import BackboneConfig
from tve_pipeline.schema import CATEGORICAL, NUMERICAL, TEXT, TIMESTAMP
from tve_pipeline.text import HashingTextEmbedder, make_text_embedder, text_embedder_config

_STYPES = {
    NUMERICAL: stype.numerical,
    CATEGORICAL: stype.categorical,
    TIMESTAMP: stype.timestamp,
    TEXT: stype.text_embedded,
}


def build_graph(
    db,
    column_types: dict[str, dict[str, str]],
    cache_dir: str | Path | None = None,
    *,
    text_dim: int = 64,
    text_embedder=None,
    time_features: bool = True,
):
    """The RelBench pkey-fkey graph with torch_frame features for every usable column.

    Keys are structure, not features. A table's time column is also a timestamp feature
    of its rows when ``time_features`` (RelBench's RDL does this; a sampled row's time is
    never later than its seed time, so nothing leaks). Text columns are embedded offline
    (``stype.text_embedded``; torch_frame stores them under ``stype.embedding``) by
    ``text_embedder``, by default :class:`~tve_pipeline.text.HashingTextEmbedder` with
    ``text_dim`` dimensions (``recipe.backbone.text_dim``); any callable
    ``list[str] -> Tensor [N, dim]`` with a ``cache_key`` naming its output will do.
    ``cache_dir`` keeps materialised tensor frames keyed by the column types (and the
    text embedder's ``cache_key`` when there are text columns), so repeated stages on
    one database do not redo it.
    """
    # relbench's to_unix_time assumes nanoseconds; pandas 3 reads many timestamps as [us].
    for table in db.table_dict.values():
        if table.time_col is not None:
            table.df[table.time_col] = naive_timestamps(table.df[table.time_col])
    if time_features:
        column_types = _with_time_features(db, column_types)
    col_to_stype = {
        table: {col: _STYPES[kind] for col, kind in cols.items() if kind in _STYPES}
        for table, cols in column_types.items()
    }
    text_cols = {
        t: [c for c, kind in cols.items() if kind == TEXT] for t, cols in column_types.items()
    }
    text_cols = {t: cols for t, cols in text_cols.items() if cols}
    text_cfg, spec = None, column_types
    if text_cols:
        embedder = text_embedder if text_embedder is not None else HashingTextEmbedder(dim=text_dim)
        if getattr(embedder, "cache_key", None) is None:
            raise ValueError(
                "text_embedder needs a cache_key (a string naming everything its output depends on)"
            )
        text_cfg = text_embedder_config(embedder)
        spec = {"columns": column_types, "text_embedder": embedder.cache_key}
        db = _blank_missing_text(db, text_cols)
    if cache_dir is None:
        return make_pkey_fkey_graph(db, col_to_stype, text_cfg, cache_dir=None)
    name = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return _cached_graph(db, col_to_stype, text_cfg, Path(cache_dir) / name)


def _with_time_features(db, column_types: dict[str, dict[str, str]]) -> dict:
    """``column_types`` with each table's time column (when typed) a timestamp feature."""
    times = {name: t.time_col for name, t in db.table_dict.items() if t.time_col is not None}
    return {
        name: {**cols, times[name]: TIMESTAMP} if times.get(name) in cols else cols
        for name, cols in column_types.items()
    }


def _blank_missing_text(db, text_cols: dict[str, list[str]]) -> Database:
    """``db`` with missing text cells blank, in copies of the affected tables.

    torch_frame turns cells into str before embedding; under pandas 2 a missing cell
    would become the text "None"/"nan". Blank text embeds to zeros, like missing. The
    caller's frames are left as they are.
    """
    return Database(
        {
            name: t
            if name not in text_cols
            else Table(
                df=t.df.assign(
                    **{
                        c: t.df[c].astype(object).where(t.df[c].notna(), "")
                        for c in text_cols[name]
                    }
                ),
                fkey_col_to_pkey_table=t.fkey_col_to_pkey_table,
                pkey_col=t.pkey_col,
                time_col=t.time_col,
            )
            for name, t in db.table_dict.items()
        }
    )


def _cached_graph(db, col_to_stype: dict, text_cfg, final: Path):
    """``make_pkey_fkey_graph`` with its tensor frames cached in the folder ``final``.

    Several runs (processes) may build the same cache at once, and torch_frame writes its
    files in place: each builds in a folder of its own and moves it into place whole
    (:func:`~tve_pipeline.common.atomic_path`), so that a reader sees a complete cache or
    none. The loser of a race finds the winner's folder in place: its move fails, its
    copy is dropped, and the graph it built (the same frames) is returned.
    """
    if final.is_dir():
        with warnings.catch_warnings():
            # torch_frame.load tries weights_only=True first, fails on its own stype and numpy
            # dtypes, and warns on every load before it reads the file as it wrote it; this
            # cache is ours (written just above, in a run folder), so the warning says nothing
            warnings.filterwarnings("ignore", "Weights only load failed", UserWarning)
            return make_pkey_fkey_graph(db, col_to_stype, text_cfg, cache_dir=str(final))
    graph = None
    try:
        with atomic_path(final) as tmp:
            graph = make_pkey_fkey_graph(db, col_to_stype, text_cfg, cache_dir=str(tmp))
    except OSError:
        if graph is None or not final.is_dir():
            raise  # the build failed, not the move of a finished build
    return graph


def graph_for(
    db,
    column_types: dict[str, dict[str, str]],
    backbone: BackboneConfig,
    cache_dir: str | Path | None = None,
):
    """:func:`build_graph` with the inputs a recipe's backbone asks for (text embedder,
    time features)."""
    has_text = any(kind == TEXT for cols in column_types.values() for kind in cols.values())
    embedder = make_text_embedder(backbone.text_embedder, backbone.text_dim) if has_text else None
    return build_graph(
        db,
        column_types,
        cache_dir,
        text_dim=backbone.text_dim,
        text_embedder=embedder,
        time_features=backbone.time_features,
    )


def seed_tensors(entities, times) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed node ids (int64) and seed times (unix seconds) from two columns or arrays."""
    return (
        torch.from_numpy(np.array(entities, dtype=np.int64)),
        # Nanosecond resolution first: relbench's to_unix_time divides by 1e9 whatever the
        # unit, and RelBench's own val/test label tables come back as datetime64[us].
        torch.from_numpy(to_unix_time(naive_timestamps(times))),
    )


def to_device(batch: HeteroData, device: torch.device) -> HeteroData:
    """A sampled subgraph on ``device``; its tensor frames move too (``HeteroData.to``
    leaves them where they are)."""
    if device.type == "cpu":
        return batch
    batch = batch.to(device)
    for nt in batch.node_types:
        batch[nt].tf = batch[nt].tf.to(device)
    return batch
