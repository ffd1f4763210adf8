"""Pre-training with Task Vector Estimation and fine-tuning on downstream tasks.

One loop serves both stages: seeds ``(entity, seed_time)`` are drawn in batches, each
seed's *past* temporal subgraph is sampled (rows with time <= its seed time only, by
:class:`~tve_pipeline.sampling.TemporalNeighborSampler`), the RDL model embeds it and a
head predicts either the normalised task vector (pre-training, scaled cosine error with
inactive/active row weights and input corruption) or the task label (fine-tuning, BCE or
L1). The best epoch is chosen on held-out seeds; state leaves this module as CPU
``state_dict`` s, never as modules.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from relbench.base import Database, Table, TaskType
from relbench.modeling.graph import make_pkey_fkey_graph
from relbench.modeling.utils import to_unix_time
from torch_frame import stype
from torch_geometric.data import HeteroData

from tve_pipeline.config import BackboneConfig, Recipe
from tve_pipeline.database import CATEGORICAL, NUMERICAL, TEXT, TIMESTAMP
from tve_pipeline.model import RDLModel, backbone_state, load_backbone
from tve_pipeline.objectives import AttributeDecoder, corrupted_copy, info_nce, sce_loss
from tve_pipeline.sampling import TemporalNeighborSampler
from tve_pipeline.task_vectors import RawTaskVectors, held_out_seed_times, pretraining_task_vectors
from tve_pipeline.text import HashingTextEmbedder, make_text_embedder, text_embedder_config

LogFn = Callable[[dict, int], None]

_STYPES = {
    NUMERICAL: stype.numerical,
    CATEGORICAL: stype.categorical,
    TIMESTAMP: stype.timestamp,
    TEXT: stype.text_embedded,
}


# --------------------------------------------------------------------------- graph


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
            table.df[table.time_col] = table.df[table.time_col].astype("datetime64[ns]")
    if time_features:
        times = {name: t.time_col for name, t in db.table_dict.items() if t.time_col is not None}
        column_types = {
            name: {**cols, times[name]: TIMESTAMP} if times.get(name) in cols else cols
            for name, cols in column_types.items()
        }
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
        # torch_frame turns cells into str before embedding; under pandas 2 a missing cell
        # would become the text "None"/"nan". Blank text embeds to zeros, like missing.
        # (A copy of the affected tables: the caller's frames are left as they are.)
        db = Database(
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
    if cache_dir is None:
        return make_pkey_fkey_graph(db, col_to_stype, text_cfg, cache_dir=None)
    final = (
        Path(cache_dir) / hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    )
    if final.is_dir():
        return make_pkey_fkey_graph(db, col_to_stype, text_cfg, cache_dir=str(final))
    # Several runs (processes) may build the same cache at once, and torch_frame writes its
    # files in place: build in a folder of our own and move it into place whole, so that a
    # reader sees a complete cache or none (the loser of a race drops its copy).
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    graph = make_pkey_fkey_graph(db, col_to_stype, text_cfg, cache_dir=str(tmp))
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return graph


def graph_for(
    db,
    column_types: dict[str, dict[str, str]],
    backbone: BackboneConfig,
    cache_dir: str | Path | None = None,
):
    """:func:`build_graph` with the inputs a recipe's backbone asks for (text embedder, time features)."""
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


def _to_device(batch: HeteroData, device: torch.device) -> HeteroData:
    if device.type == "cpu":
        return batch
    batch = batch.to(device)
    for nt in batch.node_types:
        batch[nt].tf = batch[nt].tf.to(device)
    return batch


def seed_tensors(entities, times) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed node ids (int64) and seed times (unix seconds) from two columns or arrays."""
    return (
        torch.from_numpy(np.array(entities, dtype=np.int64)),
        # Nanosecond resolution first: relbench's to_unix_time divides by 1e9 whatever the
        # unit, and RelBench's own val/test label tables come back as datetime64[us].
        torch.from_numpy(to_unix_time(pd.Series(pd.to_datetime(times)).astype("datetime64[ns]"))),
    )


def _batches(n: int, batch_size: int, generator: torch.Generator, steps: int | None):
    """Shuffled index batches; ``steps`` caps the epoch (re-shuffling if it needs more)."""
    if n == 0:
        return
    per_pass = math.ceil(n / batch_size)
    steps = per_pass if steps is None else steps
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=generator)
        for i in range(per_pass):
            if done == steps:
                return
            yield perm[i * batch_size : (i + 1) * batch_size]
            done += 1


class Checkpointer:
    """Atomic training checkpoints every ``every`` steps (temp file + ``os.replace``).

    A run killed at any moment leaves either the previous checkpoint or the new one,
    never a torn file; a restarted run resumes from it and, because batch order and
    every random draw are functions of saved state (the order generator, the step count,
    torch's global generator), ends exactly where an uninterrupted run with the same seed
    ends.
    """

    # Bumped when what a checkpoint means changes: older files are ignored, not resumed.
    FORMAT = 2

    def __init__(self, path: str | Path, every: int, key: str = ""):
        # ``key`` names what the run is (recipe, data, objective): a checkpoint written
        # under another key is stale and ignored rather than resumed.
        self.path, self.every, self.key = Path(path), max(int(every), 1), key

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        fresh = (
            state.get("checkpoint_key") == self.key
            and state.get("checkpoint_format") == self.FORMAT
        )
        return state if fresh else None

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        torch.save({**state, "checkpoint_key": self.key, "checkpoint_format": self.FORMAT}, tmp)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def step_generator(seed: int, step: int, stream: str) -> torch.Generator:
    """A generator of its own for one training step and one use (``"sample"``, ``"noise"``).

    Seeded from a 64-bit hash of ``(seed, step, stream)``: a step's draws depend on nothing
    but these, so batches can be sampled ahead on another thread, and a resumed run needs
    no generator state to draw exactly what an uninterrupted one draws.
    """
    digest = hashlib.blake2b(f"{seed}:{step}:{stream}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


class Prefetcher:
    """Runs ``fn(item)`` for the next item on a worker thread while the caller uses this one.

    ``for out in Prefetcher(fn, items)``: results in order, at most one computed ahead.
    The worker calls ``fn`` on the items one at a time, in order, so a generator that
    ``fn`` shares across items is consumed exactly as in a plain loop: the results are the
    same with or without the thread (``enabled=False`` is that plain loop). Sampling a
    temporal subgraph is host work that releases the GIL in torch's kernels; on a GPU it
    overlaps the device's step, on a CPU the spare core's.
    """

    def __init__(self, fn: Callable, items, enabled: bool = True):
        self.fn, self.items, self.enabled = fn, list(items), enabled

    def __iter__(self):
        if not self.enabled or len(self.items) < 2:
            for item in self.items:
                yield self.fn(item)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tve-prefetch") as pool:
            pending = pool.submit(self.fn, self.items[0])
            try:
                for i in range(len(self.items)):
                    result = pending.result()
                    if i + 1 < len(self.items):
                        pending = pool.submit(self.fn, self.items[i + 1])
                    yield result
            finally:
                pending.cancel()


def _fit(
    modules: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched,
    *,
    n: int,
    batch_size: int,
    steps_per_epoch: int | None,
    epochs: int,
    seed: int,
    sample: Callable[[torch.Tensor, torch.Generator], object],
    batch_loss: Callable[[object, torch.Tensor, torch.Generator], torch.Tensor],
    evaluate_epoch: Callable[[], tuple[dict, float]],
    log: LogFn | None = None,
    checkpoint: Checkpointer | None = None,
    on_step: Callable[[int], None] | None = None,
    prefetch: bool = True,
) -> tuple[dict, list[dict]]:
    """The training loop both stages share; returns (best, history).

    ``order`` (a generator seeded with ``seed``) shuffles the seeds of each epoch; its
    state at the start of the epoch is enough to rebuild the epoch's batches. Step ``s``
    samples its batch with ``step_generator(seed, s, "sample")`` (``sample(idx, gen)``, on
    the prefetch thread, one step ahead) and draws its corruption with ``step_generator(
    seed, s, "noise")`` (``batch_loss(batch, idx, gen)``); dropout draws from torch's
    global generator, on this thread only. ``evaluate_epoch`` returns (metrics, score):
    the higher score wins. Losses stay on the device until the epoch ends (no per-step
    host sync).
    """
    order = torch.Generator().manual_seed(seed)
    best = {"score": -math.inf, "epoch": -1, "state": None, "metrics": None}
    history: list[dict] = []
    start_epoch, start_step, losses = 0, 0, []
    global_step = 0
    saved = checkpoint.load() if checkpoint else None
    if saved is not None:
        modules.load_state_dict(saved["modules"])
        opt.load_state_dict(saved["opt"])
        if sched is not None:
            sched.load_state_dict(saved["sched"])
        order.set_state(saved["order_state"])
        torch.set_rng_state(saved["global_rng_state"])
        if saved.get("cuda_rng_state") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng_state"])
        best, history = saved["best"], saved["history"]
        start_epoch, start_step, losses, global_step = (
            saved["epoch"],
            saved["step"],
            saved["losses"],
            saved["global_step"],
        )
    for epoch in range(start_epoch, epochs):
        if epoch != start_epoch or saved is None:
            epoch_order_state = order.get_state()
        else:
            epoch_order_state = saved["epoch_order_state"]
            order.set_state(epoch_order_state)
        batches = list(_batches(n, batch_size, order, steps_per_epoch))
        modules.train()
        first = start_step if (saved is not None and epoch == start_epoch) else 0
        if first == 0:
            losses = []
        epoch_start = global_step - first  # the global step number of this epoch's step 0

        def draw(step: int, batches=batches, epoch_start=epoch_start):
            return sample(batches[step], step_generator(seed, epoch_start + step, "sample"))

        steps = range(first, len(batches))
        for step, batch in zip(steps, Prefetcher(draw, steps, enabled=prefetch)):
            loss = batch_loss(
                batch, batches[step], step_generator(seed, epoch_start + step, "noise")
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            global_step += 1
            if checkpoint and global_step % checkpoint.every == 0:
                losses = [float(v) for v in losses]
                checkpoint.save(
                    {
                        "modules": modules.state_dict(),
                        "opt": opt.state_dict(),
                        "sched": sched.state_dict() if sched is not None else None,
                        "order_state": order.get_state(),
                        "epoch_order_state": epoch_order_state,
                        "best": best,
                        "history": history,
                        # dropout (torch_frame's ResNet) draws from the global generator
                        "global_rng_state": torch.get_rng_state(),
                        "cuda_rng_state": torch.cuda.get_rng_state_all()
                        if torch.cuda.is_available()
                        else None,
                        "epoch": epoch,
                        "step": step + 1,
                        "losses": losses,
                        "global_step": global_step,
                    }
                )
            if on_step:
                on_step(global_step)
        if sched is not None:
            with warnings.catch_warnings():
                # a run resumed exactly at an epoch's end steps the schedule before any
                # optimiser step of this process: intended, not the mistake torch warns of
                warnings.filterwarnings(
                    "ignore", message=r"Detected call of `lr_scheduler\.step\(\)`"
                )
                sched.step()
        losses = [float(v) for v in losses]
        metrics, score = evaluate_epoch()
        row = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            **metrics,
        }
        history.append(row)
        if log:
            log({k: v for k, v in row.items() if k != "epoch"}, epoch)
        if score > best["score"]:
            state = {k: v.detach().cpu().clone() for k, v in modules.state_dict().items()}
            best = {"score": score, "epoch": epoch, "state": state, "metrics": metrics}
        saved = None
    if checkpoint:
        checkpoint.clear()
    return best, history


@torch.no_grad()
def predict(
    model,
    sampler,
    entity_table,
    nodes,
    times,
    batch_size,
    device,
    *,
    seed: int = 0,
    prefetch: bool = True,
) -> torch.Tensor:
    """Head outputs for every seed, in input order (sampling reproducible under ``seed``).

    Batches are sampled one ahead on a worker thread (:class:`Prefetcher`), in order and
    from one generator: the same draws as a plain loop.
    """
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    starts = range(0, len(nodes), batch_size)

    def draw(start: int):
        sl = slice(start, start + batch_size)
        return sampler.sample(entity_table, nodes[sl], times[sl], generator=gen)

    outs = [
        model(_to_device(batch, device), entity_table).float().cpu()
        for batch in Prefetcher(draw, starts, prefetch)
    ]
    return torch.cat(outs) if outs else torch.empty(0)


# --------------------------------------------------------------------------- pre-training


def split_pretrain_seeds(
    raw: pd.DataFrame, val_fraction: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out the latest seed times (a temporal split) for choosing the best epoch."""
    is_val = raw["timestamp"].isin(held_out_seed_times(raw["timestamp"], val_fraction))
    return raw[~is_val].reset_index(drop=True), raw[is_val].reset_index(drop=True)


def pretrain(
    data: HeteroData,
    col_stats: dict,
    entity_table: str,
    entity_col: str,
    raw_targets: RawTaskVectors,
    aggregations: dict[str, str],
    recipe: Recipe,
    device: torch.device,
    log: LogFn | None = None,
    *,
    objective: str = "tve",
    checkpoint: Checkpointer | None = None,
    on_step: Callable[[int], None] | None = None,
    prefetch: bool = True,
) -> dict:
    """Pre-train a backbone with one objective; returns CPU states, normaliser and history.

    Seeds are the (entity, seed time) rows of ``raw_targets`` (training seed times only):
    one frame, or parquet files (one per window, any order) read a chunk at a time into
    :class:`~tve_pipeline.task_vectors.SeedTaskVectors` (the same seeds, order and
    vectors as their concatenation). The latest seed times are held out to choose the
    best epoch by the objective's loss.
    """
    cfg = recipe.pretrain
    parts = set(objective.split("+"))
    torch.manual_seed(recipe.seed)
    seeds = pretraining_task_vectors(
        raw_targets,
        entity_col,
        aggregations,
        val_fraction=cfg.val_fraction,
        max_mode_categories=recipe.targets.max_mode_categories,
    )
    train, val, normaliser = seeds.train, seeds.val, seeds.normaliser
    if len(train) == 0:
        raise ValueError(
            f"entity table {entity_table!r}: no training seeds with task vectors to pre-train on"
        )
    n_train, t_train = seed_tensors(train.entity, train.seed_time)
    n_val, t_val = seed_tensors(val.entity, val.seed_time)

    model = RDLModel(data, col_stats, recipe.backbone, out_channels=normaliser.width).to(device)
    aux = torch.nn.ModuleDict()
    if "mae" in parts:
        aux["mae"] = AttributeDecoder(
            recipe.backbone.channels, data[entity_table].tf.col_names_dict, col_stats[entity_table]
        )
    if "ctr" in parts:
        c = recipe.backbone.channels
        aux["proj"] = torch.nn.Sequential(
            torch.nn.Linear(c, c), torch.nn.ReLU(), torch.nn.Linear(c, c)
        )
    aux.to(device)
    params = list(model.parameters()) + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step_epochs, gamma=cfg.lr_gamma)
    sampler = TemporalNeighborSampler(
        data, list(recipe.backbone.num_neighbors), strategy=recipe.backbone.sampling
    )
    w = cfg.inactive_weight
    # The auxiliary loss is the whole objective when it stands alone, 0.1 x beside TVE.
    aux_weight = cfg.aux_weight if "tve" in parts else 1.0

    def row_weight(y):
        return torch.where(y[:, 0] == 1, torch.tensor(w), torch.tensor(1.0 - w))

    def objective_loss(batch, y, gen) -> torch.Tensor:
        batch = _to_device(batch, device)
        seeds = slice(0, batch[entity_table].seed_time.size(0))
        noisy = corrupted_copy(batch, cfg.corruption_rate, gen)
        z = model.embed(noisy, entity_table)
        loss = torch.zeros((), device=device)
        if "tve" in parts:
            loss = loss + sce_loss(
                model.head(z), y.to(device), row_weight(y).to(device), cfg.sce_alpha
            )
        if "mae" in parts:
            loss = loss + aux_weight * aux["mae"].loss(z, batch[entity_table].tf[seeds])
        if "ctr" in parts:
            # TVE+CTR contrasts TVE's own corrupted view; CTR alone uses its stronger corruption.
            view = noisy if "tve" in parts else corrupted_copy(batch, cfg.ctr_corruption_rate, gen)
            z_view = z if "tve" in parts else model.embed(view, entity_table)
            z_clean = model.embed(batch, entity_table)
            loss = loss + aux_weight * info_nce(
                aux["proj"](z_clean), aux["proj"](z_view), cfg.ctr_tau
            )
        return loss

    @torch.no_grad()
    def validation_loss() -> float:
        model.eval()
        aux.eval()
        gen = torch.Generator().manual_seed(recipe.seed)  # same corruption every epoch
        total, count = 0.0, 0
        for start in range(0, len(n_val), cfg.batch_size):
            sl = slice(start, start + cfg.batch_size)
            batch = sampler.sample(entity_table, n_val[sl], t_val[sl], generator=gen)
            total += objective_loss(batch, val.task_vectors(sl), gen).item() * len(n_val[sl])
            count += len(n_val[sl])
        return total / max(count, 1)

    modules = torch.nn.ModuleDict({"model": model, "aux": aux})

    def sample(idx, gen):
        return sampler.sample(entity_table, n_train[idx], t_train[idx], generator=gen)

    def batch_loss(batch, idx, gen):
        return objective_loss(batch, train.task_vectors(idx), gen)

    epochs_done = []

    def evaluate_epoch():
        epochs_done.append(1)
        if not len(n_val):
            return {}, float(len(epochs_done))  # nothing held out: the last epoch wins
        val_loss = validation_loss()
        return {"val_loss": val_loss}, -val_loss

    best, history = _fit(
        modules,
        opt,
        sched,
        n=len(n_train),
        batch_size=cfg.batch_size,
        steps_per_epoch=cfg.steps_per_epoch,
        epochs=cfg.epochs,
        seed=recipe.seed,
        sample=sample,
        batch_loss=batch_loss,
        evaluate_epoch=evaluate_epoch,
        log=log,
        checkpoint=checkpoint,
        on_step=on_step,
        prefetch=prefetch,
    )
    modules.load_state_dict(best["state"])
    return {
        "objective": objective,
        "entity_table": entity_table,
        "backbone": backbone_state(model),
        "head": {k: v.cpu() for k, v in model.head.state_dict().items()},
        "normaliser": normaliser.to_dict(),
        "history": history,
        "best_epoch": best["epoch"],
        "best_val_loss": (best["metrics"] or {}).get("val_loss"),
        "n_train_seeds": len(train),
        "n_val_seeds": len(val),
        "inactive_rate": seeds.inactive_rate,
    }


# --------------------------------------------------------------------------- fine-tuning


def _higher_is_better(task) -> bool:
    return task.task_type == TaskType.BINARY_CLASSIFICATION


def _task_output(
    task, logits: torch.Tensor, output_range: tuple[float, float] | None = None
) -> np.ndarray:
    out = logits.view(-1)
    if task.task_type == TaskType.BINARY_CLASSIFICATION:
        out = torch.sigmoid(out)
    elif output_range is not None:
        out = out.clamp(*output_range)
    return out.numpy()


def regression_clamp(
    task, labels: np.ndarray, percentiles: tuple[float, float] | None
) -> tuple[float, float] | None:
    """Where a regression model's predictions are clamped: percentiles of its training labels."""
    if task.task_type != TaskType.REGRESSION or percentiles is None or len(labels) == 0:
        return None
    lo, hi = np.percentile(labels, percentiles)
    return float(lo), float(hi)


def finetune(
    data: HeteroData,
    col_stats: dict,
    task,
    tables: dict,
    recipe: Recipe,
    device: torch.device,
    *,
    seed: int = 0,
    label_fraction: float = 1.0,
    backbone: dict | None = None,
    log: LogFn | None = None,
    checkpoint: Checkpointer | None = None,
    on_step: Callable[[int], None] | None = None,
    prefetch: bool = True,
) -> dict:
    """Train a task head (and the backbone) on the task's train table; best epoch by val.

    ``backbone`` is a pre-trained backbone state (TVE) or None (from scratch).
    """
    if task.task_type not in (TaskType.BINARY_CLASSIFICATION, TaskType.REGRESSION):
        raise ValueError(
            f"task {task.name!r}: task type {task.task_type.value} is not supported yet"
        )
    cfg = recipe.finetune
    torch.manual_seed(seed)
    train = tables["train"].df
    if not 0 < label_fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {label_fraction}")
    if label_fraction < 1.0:
        # Drawn with the seed alone: every method sees the same rows.
        train = train.sample(frac=label_fraction, random_state=seed).sort_index()
        if train.empty:
            raise ValueError(
                f"task {task.name!r}: label fraction {label_fraction} of its {len(tables['train'].df)} "
                "training rows leaves none to train on"
            )
    n_tr, t_tr = seed_tensors(train[task.entity_col], train[task.time_col])
    y_tr = torch.from_numpy(train[task.target_col].to_numpy(dtype=np.float32))
    val = tables["val"]
    n_va, t_va = seed_tensors(val.df[task.entity_col], val.df[task.time_col])
    # From the labels this run trains on (its label fraction), never from val or test.
    clamp = regression_clamp(task, y_tr.numpy(), cfg.clamp_percentiles)

    model = RDLModel(data, col_stats, recipe.backbone, out_channels=1).to(device)
    if backbone is not None:
        load_backbone(model, backbone)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sampler = TemporalNeighborSampler(
        data, list(recipe.backbone.num_neighbors), strategy=recipe.backbone.sampling
    )
    loss_fn = F.binary_cross_entropy_with_logits if _higher_is_better(task) else F.l1_loss
    sign = 1.0 if _higher_is_better(task) else -1.0

    def sample(idx, gen):
        return sampler.sample(task.entity_table, n_tr[idx], t_tr[idx], generator=gen)

    def batch_loss(batch, idx, gen):
        pred = model(_to_device(batch, device), task.entity_table).view(-1)
        return loss_fn(pred, y_tr[idx].to(device))

    def evaluate_epoch():
        out = predict(
            model,
            sampler,
            task.entity_table,
            n_va,
            t_va,
            cfg.batch_size,
            device,
            seed=seed,
            prefetch=prefetch,
        )
        val_metrics = task.evaluate(_task_output(task, out, clamp), val)
        return {f"val_{k}": float(v) for k, v in val_metrics.items()}, sign * next(
            iter(val_metrics.values())
        )

    best, history = _fit(
        model,
        opt,
        None,
        n=len(n_tr),
        batch_size=cfg.batch_size,
        steps_per_epoch=cfg.steps_per_epoch,
        epochs=cfg.epochs,
        seed=seed,
        sample=sample,
        batch_loss=batch_loss,
        evaluate_epoch=evaluate_epoch,
        log=log,
        checkpoint=checkpoint,
        on_step=on_step,
        prefetch=prefetch,
    )
    return {
        "state_dict": best["state"],
        "best_epoch": best["epoch"],
        "val_metrics": {k.removeprefix("val_"): v for k, v in best["metrics"].items()},
        "history": history,
        "n_train": len(train),
        "output_range": clamp,
    }


def evaluate(
    data,
    col_stats,
    task,
    tables: dict,
    state_dict: dict,
    recipe: Recipe,
    device,
    *,
    seed: int = 0,
    output_range: tuple[float, float] | None = None,
) -> dict:
    """RelBench's evaluator on val and test for a fine-tuned model state.

    Predictions come from the masked tables; the labels from ``tables["val"]`` and
    ``tables["test_labels"]`` (RelBench's own unmasked test table when absent).
    ``output_range``: the fine-tuning run's clamp for regression outputs (its result's
    ``"output_range"``).
    """
    model = RDLModel(data, col_stats, recipe.backbone, out_channels=1)
    model.load_state_dict(state_dict)
    model.to(device)
    sampler = TemporalNeighborSampler(
        data, list(recipe.backbone.num_neighbors), strategy=recipe.backbone.sampling
    )
    out = {}
    for split in ("val", "test"):
        table = tables[split]
        nodes, times = seed_tensors(table.df[task.entity_col], table.df[task.time_col])
        pred = _task_output(
            task,
            predict(
                model,
                sampler,
                task.entity_table,
                nodes,
                times,
                recipe.finetune.batch_size,
                device,
                seed=seed,
            ),
            output_range,
        )
        target = table if split == "val" else tables.get("test_labels")
        out[split] = task.evaluate(pred, target)
    return out
