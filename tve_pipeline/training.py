"""Pre-training with Task Vector Estimation and fine-tuning on downstream tasks.

One loop serves both stages: seeds ``(entity, seed_time)`` are drawn in batches, each
seed's *past* temporal subgraph is sampled (rows with time <= its seed time only, by
:class:`~tve_pipeline.sampling.TemporalNeighborSampler`), the RDL model embeds it and a
head predicts either the normalised task vector (pre-training: the objective's loss,
:class:`~tve_pipeline.objectives.PretrainingLoss`) or the task label (fine-tuning, BCE or
L1). The best epoch (fine-tuning: the best step) is chosen on validation seeds; state
leaves this module as CPU ``state_dict`` s, never as modules. A run saves checkpoints as it goes
(:class:`Checkpointer`) and, restarted, ends exactly where an uninterrupted run ends:
every random draw is a function of the seed, the step and saved state.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from relbench.base import TaskType
from torch_geometric.data import HeteroData

from tve_pipeline.common import atomic_path
from tve_pipeline.config import Recipe
from tve_pipeline.distributed import SINGLE, World
from tve_pipeline.evaluation import higher_is_better, regression_clamp, task_metrics
from tve_pipeline.graph import seed_tensors, to_device
from tve_pipeline.model import BACKBONE_PREFIXES, RDLModel, load_backbone
from tve_pipeline.objectives import (
    PretrainingLoss,
    StagedLoss,
    objective_heads,
    pretraining_loss,
    row_weights,
)
from tve_pipeline.sampling import Prefetcher, sampler_for
from tve_pipeline.task_vectors import RawTaskVectors, pretraining_task_vectors

LogFn = Callable[[dict, int], None]


# --------------------------------------------------------------------------- the loop


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
        with atomic_path(self.path) as tmp:
            torch.save({**state, "checkpoint_key": self.key, "checkpoint_format": self.FORMAT}, tmp)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _save_checkpoint(
    checkpoint: Checkpointer, modules, opt, sched, order, world: World = SINGLE, **progress
) -> None:
    """The states a resumed run restores (:func:`_restore`), and where the run stands.

    Under several processes every rank calls it (each rank's generators are gathered:
    dropout draws from each rank's own) and rank 0 writes the file.
    """
    # dropout (torch_frame's ResNet) draws from the global generator
    rng = (
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    )
    rng_by_rank = world.gather(rng)
    if not world.is_main:
        return
    checkpoint.save(
        {
            "modules": modules.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict() if sched is not None else None,
            "order_state": order.get_state(),
            "global_rng_state": rng_by_rank[0][0],
            "cuda_rng_state": rng_by_rank[0][1],
            "rng_by_rank": rng_by_rank if world.size > 1 else None,
            "world_size": world.size,
            **progress,
        }
    )


def _restore(saved: dict, modules, opt, sched, order: torch.Generator, world: World) -> None:
    """Modules, optimiser, schedule and generators as :func:`_save_checkpoint` saved them."""
    modules.load_state_dict(saved["modules"])
    opt.load_state_dict(saved["opt"])
    if sched is not None:
        sched.load_state_dict(saved["sched"])
    order.set_state(saved["order_state"])
    cpu_rng, cuda_rng = (
        saved["rng_by_rank"][world.rank]
        if saved.get("rng_by_rank")
        else (saved["global_rng_state"], saved.get("cuda_rng_state"))
    )
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_rng)


def _progress(saved: dict | None) -> tuple:
    """(best, history, epoch, step, losses, global step, recent states): where a run starts."""
    if saved is None:
        best = {"score": -math.inf, "epoch": -1, "step": -1, "state": None, "metrics": None}
        return best, [], 0, 0, [], 0, []
    keys = ("best", "history", "epoch", "step", "losses", "global_step")
    return (*(saved[k] for k in keys), saved.get("recent", []))


def _step_schedule(sched) -> None:
    if sched is None:
        return
    with warnings.catch_warnings():
        # a run resumed exactly at an epoch's end steps the schedule before any
        # optimiser step of this process: intended, not the mistake torch warns of
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        sched.step()


def step_generator(seed: int, step: int, stream: str) -> torch.Generator:
    """A generator of its own for one training step and one use (``"sample"``, ``"noise"``).

    Seeded from a 64-bit hash of ``(seed, step, stream)``: a step's draws depend on nothing
    but these, so batches can be sampled ahead on another thread, and a resumed run needs
    no generator state to draw exactly what an uninterrupted one draws.
    """
    digest = hashlib.blake2b(f"{seed}:{step}:{stream}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


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
    world: World = SINGLE,
    share: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
    step_losses: Callable[[list[float]], None] | None = None,
    by_step: bool = False,
    average_last: int = 1,
    stop_epoch: int | None = None,
    on_evaluated: Callable[[int, dict, list], None] | None = None,
    before_step: Callable[[int], None] | None = None,
) -> tuple[dict, list[dict]]:
    """The training loop both stages share; returns (best, history).

    ``order`` (a generator seeded with ``seed``) shuffles the seeds of each epoch; its
    state at the start of the epoch is enough to rebuild the epoch's batches. Step ``s``
    samples its batch with ``step_generator(seed, s, "sample")`` (``sample(idx, gen)``, on
    the prefetch thread, one step ahead) and draws its corruption with ``step_generator(
    seed, s, "noise")`` (``batch_loss(batch, idx, gen)``); dropout draws from torch's
    global generator, on this thread only. ``evaluate_epoch`` returns (metrics, score):
    the higher score wins. Losses stay on the device until the epoch ends (no per-step
    host sync); ``step_losses`` receives each epoch's per-step losses when it ends.

    With several processes (``world``, :mod:`tve_pipeline.distributed`) every rank draws
    the same batches and trains on its slice of each (``world.chunk``); ``share(slice,
    batch)`` is the fraction of the global loss that is the slice's loss (default: its
    share of the seeds). Gradients are averaged by DistributedDataParallel, recorded losses
    are the global batch's, rank 0 writes the checkpoints.

    An "epoch" here is the steps between two evaluations; ``best`` is the evaluation with
    the highest score (ties: the earliest), with its ``epoch`` and global ``step``.
    ``by_step``: history rows carry the global ``step`` too and are logged against it.
    ``average_last`` > 1: after the last evaluation, the mean of the last that many
    evaluated weights (:func:`average_states`) is scored like any evaluation and kept
    when it beats them all (``best["averaged"]``: how many were averaged, else 0).

    ``stop_epoch`` < ``epochs`` stops the run after that many epochs (a budget: the
    schedule stays the whole run's) and keeps its state in ``checkpoint`` at the epoch
    boundary, so that a later call with a larger ``stop_epoch`` resumes there; a checkpoint
    already past ``stop_epoch`` is left as it is and the run starts over without writing
    one. ``on_evaluated(global_step, best, history)`` follows every evaluation;
    ``before_step(global_step)`` precedes every optimiser step (0-based step number).
    """
    order = torch.Generator().manual_seed(seed)
    saved = checkpoint.load() if checkpoint else None
    if saved is not None and saved.get("world_size", 1) != world.size:
        saved = None  # another number of processes: other generators, not resumable
    last = epochs if stop_epoch is None else min(stop_epoch, epochs)
    if saved is not None and _past(saved, last, steps_per_epoch):
        saved, checkpoint = None, None  # a longer budget's state: keep it, start over
    if saved is not None:
        _restore(saved, modules, opt, sched, order, world)
    step = _Step(modules, batch_loss, world, share)
    best, history, start_epoch, start_step, losses, global_step, recent = _progress(saved)
    for epoch in range(start_epoch, last):
        resumed = saved is not None  # this epoch is the one the checkpoint stopped in
        epoch_order_state = _epoch_order_state(order, saved)
        batches = list(_batches(n, batch_size, order, steps_per_epoch))
        modules.train()
        first = start_step if resumed else 0
        if first == 0:
            losses = []
        losses, global_step = _train_epoch(
            modules,
            opt,
            sched,
            order,
            batches,
            first=first,
            global_step=global_step,
            losses=losses,
            seed=seed,
            sample=sample,
            step=step,
            checkpoint=checkpoint,
            on_step=on_step,
            before_step=before_step,
            prefetch=prefetch,
            progress={
                "epoch_order_state": epoch_order_state,
                "best": best,
                "history": history,
                "epoch": epoch,
                **({"recent": recent} if average_last > 1 else {}),
            },
        )
        _step_schedule(sched)
        if step_losses:
            step_losses([float(v) for v in losses])
        metrics, score = evaluate_epoch()
        history.append(
            _epoch_row(epoch, losses, metrics, log, step=global_step if by_step else None)
        )
        state = None
        if score > best["score"]:
            state = _cpu_state(modules)
            best = {"score": score, "epoch": epoch, "step": global_step}
            best.update(state=state, metrics=metrics)
        if average_last > 1:
            recent = [*recent, state or _cpu_state(modules)][-average_last:]
        if on_evaluated:
            on_evaluated(global_step, best, history)
        saved = None
        if epoch == last - 1 and last < epochs and checkpoint:
            _save_checkpoint(  # the budget's end: the next call resumes at the next epoch
                checkpoint,
                modules,
                opt,
                sched,
                order,
                world,
                epoch_order_state=order.get_state(),
                best=best,
                history=history,
                epoch=last,
                **({"recent": recent} if average_last > 1 else {}),
                step=0,
                losses=[],
                global_step=global_step,
            )
    if last < epochs:
        return best, history
    if average_last > 1 and len(recent) > 1:
        best = _averaged_candidate(modules, recent, evaluate_epoch, best, epochs - 1, global_step)
    if checkpoint and world.is_main:
        checkpoint.clear()
    return best, history


def _past(saved: dict, last: int, steps_per_epoch: int | None) -> bool:
    """Whether a checkpoint is past the end of epoch ``last`` (a longer budget's state)."""
    if steps_per_epoch is None:
        return saved["epoch"] > last
    return saved["global_step"] > last * steps_per_epoch or saved["epoch"] > last


def _cpu_state(modules: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in modules.state_dict().items()}


def average_states(states: list[dict]) -> dict:
    """The element-wise mean of state dicts (integer buffers: the last state's)."""
    return {
        k: torch.stack([s[k] for s in states]).mean(0) if last.is_floating_point() else last
        for k, last in states[-1].items()
    }


def _averaged_candidate(modules, recent, evaluate, best: dict, epoch: int, step: int) -> dict:
    """``best``, or the mean of the ``recent`` weights (at the last ``epoch`` and ``step``)
    where it scores higher on validation."""
    state = average_states(recent)
    modules.load_state_dict(state)
    metrics, score = evaluate()
    if score > best["score"]:
        best = {"score": score, "epoch": epoch, "step": step, "state": state, "metrics": metrics}
        return {**best, "averaged": len(recent)}
    return {**best, "averaged": 0}


class _Step:
    """One optimiser step's loss on this process's slice of a global batch.

    With one process: ``batch_loss(batch, idx, generator)`` on the whole batch. Under
    DistributedDataParallel: the forward runs through the DDP wrapper (whose hooks then
    all-reduce the gradients), the slice's loss is weighted by its ``share`` of the global
    loss, and back-propagated ``size`` times over, since DDP averages over the ranks.
    """

    def __init__(self, modules, batch_loss, world: World, share):
        self.batch_loss, self.world = batch_loss, world
        self.share = share or (lambda part, whole: len(part) / len(whole))
        self.ddp = None
        if world.group:
            from torch.nn.parallel import DistributedDataParallel

            # Not every parameter meets every batch (a node type absent from a rank's
            # subgraphs, GNN layers the seeds do not need), hence find_unused_parameters;
            # no buffer changes in training, hence no buffer sync per step.
            self.ddp = DistributedDataParallel(
                _LossModule(modules, batch_loss),
                find_unused_parameters=True,
                forward_sync_buffers=False,
            )

    def __call__(self, batch, part: torch.Tensor, whole: torch.Tensor, generator):
        """(what to back-propagate, this step's global loss, detached)."""
        if self.ddp is None:
            loss = self.batch_loss(batch, part, generator)
            return loss, loss.detach()
        term = self.ddp(batch, part, generator) * self.share(part, whole)
        return term * self.world.size, self.world.sum(term.detach())


class _LossModule(torch.nn.Module):
    """``batch_loss`` as a module's forward, for DistributedDataParallel to wrap."""

    def __init__(self, modules: torch.nn.Module, batch_loss):
        super().__init__()
        self.modules_ = modules
        self.batch_loss = batch_loss

    def forward(self, batch, idx, generator):
        if idx.numel() == 0:
            # A global batch with fewer seeds than ranks leaves this one none: it still
            # takes part in the gradient all-reduce, with zeros.
            return sum(p.sum() for p in self.parameters()) * 0.0
        return self.batch_loss(batch, idx, generator)


def _epoch_order_state(order: torch.Generator, saved: dict | None) -> torch.Tensor:
    """The order generator's state at the epoch's start: the checkpoint's, when resuming."""
    if saved is None:
        return order.get_state()
    order.set_state(saved["epoch_order_state"])
    return saved["epoch_order_state"]


def _train_epoch(
    modules: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched,
    order: torch.Generator,
    batches: list[torch.Tensor],
    *,
    first: int,
    global_step: int,
    losses: list,
    seed: int,
    sample: Callable[[torch.Tensor, torch.Generator], object],
    step: _Step,
    checkpoint: Checkpointer | None,
    on_step: Callable[[int], None] | None,
    prefetch: bool,
    progress: dict,
    before_step: Callable[[int], None] | None = None,
) -> tuple[list, int]:
    """The epoch's optimiser steps from step ``first`` on; returns (losses, global step)."""
    # ``progress``: what a checkpoint records of the epoch besides step, losses, global step.
    epoch_start = global_step - first  # the global step number of this epoch's step 0
    world = step.world

    def draw(i: int):
        gen = step_generator(seed, epoch_start + i, world.stream("sample"))
        return sample(world.chunk(batches[i]), gen)

    steps = range(first, len(batches))
    for i, batch in zip(steps, Prefetcher(draw, steps, enabled=prefetch)):
        gen = step_generator(seed, epoch_start + i, world.stream("noise"))
        if before_step:
            before_step(global_step)
        loss, recorded = step(batch, world.chunk(batches[i]), batches[i], gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(recorded)
        global_step += 1
        if checkpoint and global_step % checkpoint.every == 0:
            losses = [float(v) for v in losses]
            _save_checkpoint(
                checkpoint,
                modules,
                opt,
                sched,
                order,
                world,
                **progress,
                step=i + 1,
                losses=losses,
                global_step=global_step,
            )
        if on_step:
            on_step(global_step)
    return losses, global_step


def _epoch_row(
    epoch: int, losses: list, metrics: dict, log: LogFn | None, step: int | None = None
) -> dict:
    """The history row of an epoch (its mean training loss and held-out metrics), logged
    against the epoch, or against the global ``step`` when one is given (then in the row)."""
    losses = [float(v) for v in losses]
    row = {
        "epoch": epoch,
        **({} if step is None else {"step": step}),
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        **metrics,
    }
    if log:
        log({k: v for k, v in row.items() if k not in ("epoch", "step")}, row.get("step", epoch))
    return row


# --------------------------------------------------------------------------- pre-training


def _pretraining_seeds(
    raw_targets: RawTaskVectors,
    val_targets: RawTaskVectors | None,
    entity_table: str,
    entity_col: str,
    aggregations,
    recipe,
):
    """The training seeds and normalised task vectors, and the validation ones."""
    seeds = pretraining_task_vectors(
        raw_targets,
        entity_col,
        aggregations,
        val=val_targets,
        mode_encoding=recipe.targets.mode_encoding,
        mca_components=recipe.targets.mca_components,
    )
    if len(seeds.train) == 0:
        raise ValueError(
            f"entity table {entity_table!r}: no training seeds with task vectors to pre-train on"
        )
    return seeds


@torch.no_grad()
def _validation_loss(
    loss: PretrainingLoss,
    modules,
    sampler,
    entity_table: str,
    seeds,
    batch_size,
    seed,
    device,
    world: World = SINGLE,
    share=None,
) -> float:
    """The objective's mean loss over the validation seeds, on clean inputs.

    As the reference scores its validation split: the model in eval mode, nothing corrupted
    (src/train_tve.py:163 calls src/helpers/tve_train_helper.py:67 ``test``, whose models
    corrupt only in training), the loss averaged weighted by batch size
    (tve_train_helper.py:96-99). The subgraphs are sampled with a generator seeded by
    ``seed``: every epoch scores the same ones. Under several processes each rank scores
    its slice of every batch (with generators of its own, seeded per batch) and the
    batch's loss is the sum of the slices' shares.
    """
    nodes, times, vectors = seeds
    modules.eval()
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, len(nodes), batch_size):
        whole = torch.arange(start, min(start + batch_size, len(nodes)))
        part = world.chunk(whole)
        if world.size > 1:
            gen = step_generator(seed, start, world.stream("held-out"))
        if len(part):
            batch = sampler.sample(entity_table, nodes[part], times[part], generator=gen)
            value = loss(to_device(batch, device), vectors.task_vectors(part), gen, corrupt=False)
        else:
            value = torch.zeros((), device=device)  # fewer seeds than ranks: none here
        if world.size > 1:
            value = world.sum(value * share(part, whole))
        total += value.item() * len(whole)
        count += len(whole)
    return total / max(count, 1)


def _loss_share(objective: str, seeds, inactive_weight: float, loss=None):
    """``share(slice, batch)``: the fraction of a batch's loss that is its slice's loss.

    TVE's loss is ``sum w err / sum w`` over the batch, so a slice's loss counts by its
    rows' weight ``sum w`` (the split is then exact); an objective with MAE or CTR by the
    slice's seed count (their per-rank means are not sums over seeds); a staged objective
    by its current stage's (``loss``: the :class:`StagedLoss`).
    """
    if ">" in objective:
        first, then = (_loss_share(o, seeds, inactive_weight) for o in objective.split(">"))
        return lambda part, whole: (then if loss.step >= loss.stage_steps else first)(part, whole)
    if objective != "tve":
        return lambda part, whole: len(part) / len(whole)

    def weight(index):
        return float(row_weights(seeds.task_vectors(index), inactive_weight).sum())

    return lambda part, whole: weight(part) / weight(whole)


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
    val_targets: RawTaskVectors | None = None,
    objective: str = "tve",
    checkpoint: Checkpointer | None = None,
    on_step: Callable[[int], None] | None = None,
    prefetch: bool = True,
    world: World = SINGLE,
    step_losses: Callable[[list[float]], None] | None = None,
    budget: int | None = None,
    on_budget: Callable[[int, dict], None] | None = None,
) -> dict:
    """Pre-train a backbone with one objective; returns CPU states, normaliser and history.

    Seeds are the (entity, seed time) rows of ``raw_targets``, every training window: one
    frame, or parquet files (one per window, any order) read a chunk at a time into
    :class:`~tve_pipeline.task_vectors.SeedTaskVectors` (the same seeds, order and
    vectors as their concatenation). The epoch kept is the one with the lowest loss of the
    objective on ``val_targets``, the validation windows' task vectors (normalised with the
    training statistics, scored on clean inputs), as the reference keeps ``best.pth``
    (src/train_tve.py:161-182); without validation windows the last epoch is kept.

    ``world``: this process's rank among several training processes, each on its slice of
    every global batch (:mod:`tve_pipeline.distributed`; the process group is started by
    the caller). ``step_losses`` receives each epoch's per-step (global batch) losses.

    ``budget`` (one of ``recipe.pretrain.step_budgets``) stops the run after that many
    optimiser steps and returns what it kept by then (the best evaluation up to that step);
    the run's state stays in ``checkpoint`` and a call with a larger budget resumes it.
    ``on_budget(steps, result)`` receives the result at every budget the call passes.
    """
    cfg = recipe.pretrain
    if budget is not None and budget not in cfg.step_budgets:
        raise ValueError(f"budget {budget} is not one of pretrain budgets {list(cfg.step_budgets)}")
    torch.manual_seed(recipe.seed)
    seeds = _pretraining_seeds(
        raw_targets, val_targets, entity_table, entity_col, aggregations, recipe
    )
    train, val, normaliser = seeds.train, seeds.val, seeds.normaliser
    n_train, t_train = seed_tensors(train.entity, train.seed_time)
    n_val, t_val = seed_tensors(val.entity, val.seed_time)

    model, heads, opt, sched = _pretraining_model(
        data, col_stats, entity_table, recipe, objective, normaliser.width, device
    )
    sampler = sampler_for(data, recipe.backbone)
    loss = pretraining_loss(objective, model, heads, entity_table, cfg)
    modules = torch.nn.ModuleDict({"model": model, "aux": heads})  # the checkpoint's keys
    if world.rank > 0:
        # Every rank starts from the same weights (seeded above); dropout masks are each
        # rank's own (rank 0 keeps the single-process stream).
        torch.manual_seed(int(step_generator(recipe.seed, world.rank, "dropout").initial_seed()))
    share = _loss_share(objective, train, cfg.inactive_weight, loss)

    def sample(idx, gen):
        return sampler.sample(entity_table, n_train[idx], t_train[idx], generator=gen)

    def batch_loss(batch, idx, gen):
        return loss(to_device(batch, device), train.task_vectors(idx), gen)

    validation = (n_val, t_val, val)
    # wall seconds of the steps this call trains and of their evaluations, per evaluation
    timing, clock = [], [time.perf_counter()]

    def evaluated(steps: int, best: dict, history: list) -> None:
        now = time.perf_counter()
        timing.append({"step": steps, "seconds": round(now - clock[0], 3)})
        clock[0] = now
        if on_budget and steps in cfg.step_budgets and best["state"] is not None:
            kept = _pretrained(objective, entity_table, seeds, best, list(history))
            on_budget(steps, {**kept, "timing": list(timing)})

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
        evaluate_epoch=_validation_scorer(
            loss,
            modules,
            sampler,
            entity_table,
            validation,
            cfg.batch_size,
            recipe.seed,
            device,
            world,
            _loss_share(objective.split(">")[-1], val, cfg.inactive_weight),
        ),
        log=log,
        checkpoint=checkpoint,
        on_step=on_step,
        prefetch=prefetch,
        world=world,
        share=share,
        step_losses=step_losses,
        stop_epoch=None if budget is None else budget // cfg.steps_per_epoch,
        on_evaluated=evaluated,
        before_step=getattr(loss, "at_step", None),
    )
    if best["state"] is None:
        raise ValueError(f"{objective}: no evaluation to keep a checkpoint from")
    return {**_pretrained(objective, entity_table, seeds, best, history), "timing": timing}


def pretrain_to_budget(
    *args,
    budget: int | None,
    checkpoint: Checkpointer | None,
    snapshot: Callable[[int], Checkpointer] | None,
    world: World = SINGLE,
    **kwargs,
) -> dict:
    """:func:`pretrain` at a budget of its run, reusing what the run kept at the budgets it
    has passed (``snapshot(steps)``: the file of the run's result at that budget).

    A run asked for budget 2,000 first trains to 2,000 and keeps its results at 500 and
    2,000; asked for 500 afterwards, it returns the kept one without training. Budgets in
    any order give the results of one uninterrupted run.
    """
    if snapshot is None or budget is None:
        return pretrain(*args, budget=budget, checkpoint=checkpoint, world=world, **kwargs)
    kept = snapshot(budget).load()
    if kept is not None:
        return kept["result"]

    def on_budget(steps: int, result: dict) -> None:
        if world.is_main:
            snapshot(steps).save({"result": result})

    return pretrain(
        *args, budget=budget, checkpoint=checkpoint, world=world, on_budget=on_budget, **kwargs
    )


def _pretraining_model(
    data: HeteroData,
    col_stats: dict,
    entity_table: str,
    recipe: Recipe,
    objective: str,
    width: int,
    device: torch.device,
):
    """The model, the objective's heads, their optimiser and schedule (init order kept)."""
    cfg = recipe.pretrain
    model = RDLModel(data, col_stats, recipe.backbone, out_channels=width).to(device)
    heads = objective_heads(
        objective, recipe.backbone.channels, data, col_stats, entity_table, recipe.backbone.aggr
    )
    heads.to(device)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step_epochs, gamma=cfg.lr_gamma)
    return model, heads, opt, sched


def _validation_scorer(
    loss: PretrainingLoss,
    modules,
    sampler,
    entity_table: str,
    validation,
    batch_size,
    seed,
    device,
    world: World = SINGLE,
    share=None,
) -> Callable[[], tuple[dict, float]]:
    """Pre-training's ``evaluate_epoch``: minus the validation loss (no validation seeds:
    the epoch, so the last one wins)."""
    epochs_done = []
    n_val = validation[0]

    staged = isinstance(loss, StagedLoss)

    def evaluate_epoch():
        epochs_done.append(1)
        if staged and not loss.in_final(loss.step + 1):
            return {"val_loss": math.nan}, -math.inf  # first stage: never the checkpoint
        if not len(n_val):
            return {}, float(len(epochs_done))
        val_loss = _validation_loss(
            loss.final if staged else loss,
            modules,
            sampler,
            entity_table,
            validation,
            batch_size,
            seed,
            device,
            world,
            share,
        )
        return {"val_loss": val_loss}, -val_loss

    return evaluate_epoch


def _pretrained(objective: str, entity_table: str, seeds, best, history) -> dict:
    """What :func:`pretrain` returns: the best epoch's CPU states (from ``best["state"]``,
    the ``{"model": ..., "aux": ...}`` modules' state), the normaliser, history."""
    model = {k[len("model.") :]: v for k, v in best["state"].items() if k.startswith("model.")}
    return {
        "objective": objective,
        "entity_table": entity_table,
        "backbone": {k: v for k, v in model.items() if k.startswith(BACKBONE_PREFIXES)},
        "head": {k[len("head.") :]: v for k, v in model.items() if k.startswith("head.")},
        "best_step": best["step"],
        "normaliser": seeds.normaliser.to_dict(),
        "history": history,
        "best_epoch": best["epoch"],
        "best_val_loss": (best["metrics"] or {}).get("val_loss"),
        "n_train_seeds": len(seeds.train),
        "n_val_seeds": len(seeds.val),
        "inactive_rate": seeds.inactive_rate,
    }


# --------------------------------------------------------------------------- fine-tuning


def _label_sample(task, train: pd.DataFrame, label_fraction: float, seed: int) -> pd.DataFrame:
    """The training rows a run with this label fraction sees."""
    if not 0 < label_fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {label_fraction}")
    if label_fraction == 1.0:
        return train
    # Drawn with the seed alone: every method sees the same rows.
    sample = train.sample(frac=label_fraction, random_state=seed).sort_index()
    if sample.empty:
        raise ValueError(
            f"task {task.name!r}: label fraction {label_fraction} of its {len(train)} "
            "training rows leaves none to train on"
        )
    return sample


def finetune_batch_size(n: int, cfg) -> int:
    """The batch of a fine-tuning run on ``n`` training rows: ``batch_size``, or, with
    ``min_batch_size`` set, the batch at which ``epochs`` passes over the rows make
    ``min_steps`` steps, between ``min_batch_size`` and ``batch_size``: a small label set
    (driver-dnf at 10%: 1,141 rows) trains its floor of steps on batches of 64 (~20
    passes) instead of 512 (~90 passes, each step 8x the cost)."""
    if cfg.min_batch_size is None:
        return cfg.batch_size
    fitting = math.ceil(n * cfg.epochs / cfg.min_steps)
    return max(cfg.min_batch_size, min(cfg.batch_size, fitting))


def finetune_schedule(n: int, cfg) -> tuple[int, int]:
    """(steps between evaluations, evaluations) of a fine-tuning run on ``n`` training rows.

    The budget is ``max(min_steps, epochs x steps of an epoch)`` (an epoch: one pass over
    the rows in batches of :func:`finetune_batch_size`, or ``steps_per_epoch``), at most
    ``max_steps`` when set, evaluated once an epoch but never more often than every
    ``eval_every`` steps, rounded up to a whole number of evaluations: a small label
    sample (a few batches an epoch) still trains ``min_steps`` steps and is evaluated
    about ``min_steps / eval_every`` times; a large one trains its epochs, evaluated once
    each, as the reference does (src/train_baseline.py:172-180, eval_every 1); one whose
    epochs pass the cap is evaluated ``epochs`` times over the capped budget. The steps
    between two evaluations are drawn as shuffled passes over the rows, the last one cut
    short when they are not a whole number of passes.
    """
    batch = finetune_batch_size(n, cfg)
    epoch = math.ceil(n / batch) if cfg.steps_per_epoch is None else cfg.steps_per_epoch
    budget = max(cfg.min_steps, cfg.epochs * epoch)
    if cfg.max_steps is not None and budget > cfg.max_steps:
        budget = cfg.max_steps
        epoch = min(epoch, math.ceil(budget / cfg.epochs))
    every = max(cfg.eval_every, epoch)
    return every, math.ceil(budget / every)


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
    """Train a task head (and the backbone) on the task's train table; best step by val.

    ``backbone`` is a pre-trained backbone state (TVE) or None (from scratch). The protocol
    is the same for every method: for each rate of ``finetune.lr_grid`` (the same label
    sample, initial weights and batches), AdamW with the reference's weight decay for the
    steps of :func:`finetune_schedule`, the best validation evaluation kept (and, with
    ``average_last`` > 1, the mean of the last evaluated weights when it scores higher);
    the rate whose best evaluation scores highest wins (ties: the earlier rate). The grid
    costs its length in training; test data is never seen. ``on_step`` receives the
    cell's step count over all the rates; each rate resumes from a checkpoint of its own.
    """
    _check_task_type(task)
    cfg = recipe.finetune
    train = _label_sample(task, tables["train"].df, label_fraction, seed)
    n_tr, t_tr = seed_tensors(train[task.entity_col], train[task.time_col])
    y_tr = torch.from_numpy(train[task.target_col].to_numpy(dtype=np.float32))
    # From the labels this run trains on (its label fraction), never from val or test.
    clamp = regression_clamp(task, y_tr.numpy(), cfg.clamp_percentiles)
    every, evaluations = finetune_schedule(len(n_tr), cfg)
    batch_size = finetune_batch_size(len(n_tr), cfg)
    sampler = sampler_for(data, recipe.backbone)
    runs = []
    for i, lr in enumerate(cfg.lr_grid):
        own = _rate_checkpoint(checkpoint, i, len(cfg.lr_grid))
        done = own.load() if own else None
        if done is not None and "finished" in done:
            runs.append(done["finished"])
            continue
        torch.manual_seed(seed)  # every rate starts from the same weights and dropout
        model = RDLModel(data, col_stats, recipe.backbone, out_channels=1).to(device)
        if backbone is not None:
            load_backbone(model, backbone)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        best, history = _fit(
            model,
            opt,
            None,
            n=len(n_tr),
            batch_size=batch_size,
            steps_per_epoch=every,
            epochs=evaluations,
            seed=seed,
            sample=_label_sampler(sampler, task, n_tr, t_tr),
            batch_loss=_label_loss(model, task, y_tr, device),
            evaluate_epoch=_val_scorer(
                model, sampler, task, tables["val"], cfg.batch_size, device, seed, clamp, prefetch
            ),
            log=_rate_log(log, lr, len(cfg.lr_grid)),
            checkpoint=own,
            on_step=_offset(on_step, i * every * evaluations),
            prefetch=prefetch,
            by_step=True,
            average_last=cfg.average_last,
        )
        runs.append({"lr": lr, "best": best, "history": history})
        if own is not None and len(cfg.lr_grid) > 1:
            own.save({"finished": runs[-1]})  # a run killed in a later rate keeps this one
    chosen = runs[0]
    for run in runs[1:]:
        if run["best"]["score"] > chosen["best"]["score"]:
            chosen = run
    if checkpoint is not None:
        # every rate's file, and the cell's own (left there by a run of an older recipe)
        checkpoint.clear()
        for i in range(len(cfg.lr_grid)):
            _rate_checkpoint(checkpoint, i, len(cfg.lr_grid)).clear()
    best = chosen["best"]
    return {
        "state_dict": best["state"],
        "best_epoch": best["epoch"],  # the evaluation's index (an epoch when epochs are long)
        "best_step": best["step"],
        "lr": chosen["lr"],
        "averaged": best.get("averaged", 0),
        "val_metrics": {k.removeprefix("val_"): v for k, v in best["metrics"].items()},
        "history": chosen["history"],
        "lr_search": [
            {
                "lr": run["lr"],
                "val_score": next(iter(run["best"]["metrics"].values())),
                "best_step": run["best"]["step"],
            }
            for run in runs
        ],
        "steps": every * evaluations,
        "eval_every": every,
        "batch_size": batch_size,
        "n_train": len(train),
        "output_range": clamp,
    }


def _rate_checkpoint(checkpoint: Checkpointer | None, i: int, rates: int):
    """The checkpoint of the grid's ``i``-th rate: the cell's own file when there is one rate."""
    if checkpoint is None or rates == 1:
        return checkpoint
    path = checkpoint.path.with_name(f"{checkpoint.path.stem}.lr{i}{checkpoint.path.suffix}")
    return Checkpointer(path, checkpoint.every, checkpoint.key)


def _rate_log(log: LogFn | None, lr: float, rates: int) -> LogFn | None:
    """Each rate's curve under its own names when several rates are tried."""
    if log is None or rates == 1:
        return log
    return lambda metrics, step: log({f"{k}.lr{lr:g}": v for k, v in metrics.items()}, step)


def _offset(on_step, offset: int):
    return None if on_step is None else (lambda step: on_step(offset + step))


def _label_sampler(sampler, task, nodes: torch.Tensor, times: torch.Tensor):
    def sample(idx, gen):
        return sampler.sample(task.entity_table, nodes[idx], times[idx], generator=gen)

    return sample


def _label_loss(model, task, labels: torch.Tensor, device):
    loss_fn = F.binary_cross_entropy_with_logits if higher_is_better(task) else F.l1_loss

    def batch_loss(batch, idx, gen):
        pred = model(to_device(batch, device), task.entity_table).view(-1)
        return loss_fn(pred, labels[idx].to(device))

    return batch_loss


def _check_task_type(task) -> None:
    """Fine-tuning trains binary classification (BCE) and regression (L1) tasks only."""
    if task.task_type not in (TaskType.BINARY_CLASSIFICATION, TaskType.REGRESSION):
        raise ValueError(
            f"task {task.name!r}: task type {task.task_type.value} is not supported yet"
        )


def _val_scorer(
    model, sampler, task, val, batch_size, device, seed, clamp, prefetch
) -> Callable[[], tuple[dict, float]]:
    """Fine-tuning's ``evaluate_epoch``: the val metrics, scored by the task's first metric
    (the higher the better: a metric where lower is better is negated)."""
    sign = 1.0 if higher_is_better(task) else -1.0

    def evaluate_epoch():
        val_metrics = task_metrics(
            model,
            sampler,
            task,
            val,
            val,
            batch_size,
            device,
            seed=seed,
            output_range=clamp,
            prefetch=prefetch,
        )
        metrics = {f"val_{k}": float(v) for k, v in val_metrics.items()}
        return metrics, sign * next(iter(val_metrics.values()))

    return evaluate_epoch
