"""Partitions that fit the data: every database has its own assets, windows and tasks.

A Dagster partitions definition belongs to an asset, and the only partition mappings the
web server and the daemon understand are the built-in ones; a ``database x window`` grid
offers every window of every database to every other database (and a shared ``task``
dimension, tasks a database does not have). So each registered database gets its own
nine assets under its own key prefix and asset group (``rel_flights/tve_targets``), and:

- its **windows** are a dynamic partitions definition of its own
  (``"<database>.windows"``), one key per *training or validation seed time* ``t`` (the
  window is the next window ``(t, t+Δ]`` whose rows make the task vectors at ``t``),
  registered from the database's seed schedule when it is registered and extended when
  the data grows;
- its **experiment cells** (task x method x label setting x seed, for exactly the tasks
  in its folder) and its pre-training objectives are static partitions definitions
  derived from the recipe (below).

Window keys are :func:`tve_pipeline.windows.window_key`: the seed time's date
(``2013-03-04``), with the time of day when it has one (``2013-03-04T12:00:00``).
"""

import re

import dagster as dg

from tve_pipeline.config import parse_budget_key
from tve_pipeline.tasks import label_set_name, label_setting, restricted_label_set


def asset_prefix(database: str) -> str:
    """The key prefix and group name of a database's assets: ``rel-flights`` ->
    ``rel_flights``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", database)


def windows_name(database: str) -> str:
    """The name of a database's dynamic window partitions."""
    return f"{database}.windows"


def window_partitions(database: str) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=windows_name(database))


def contiguous_ranges(keys: list[str], order: list[str]) -> list[tuple[str, str]]:
    """``keys`` as (first, last) runs of consecutive keys in ``order`` (a partition range
    over dynamic partitions follows their registration order)."""
    position = {k: i for i, k in enumerate(order)}
    ranges: list[tuple[str, str]] = []
    for key in sorted(keys, key=position.__getitem__):
        if ranges and position[key] == position[ranges[-1][1]] + 1:
            ranges[-1] = (ranges[-1][0], key)
        else:
            ranges.append((key, key))
    return ranges


# --------------------------------------------------------------------------- experiment cells
#
# Pre-training is one partition per objective of the recipe; fine-tuning and evaluation are
# one partition per *cell*: task x method x label setting x seed, ``driver-dnf|tve|0.1|s0``
# (a label fraction) or ``driver-dnf|tve|top10|s0`` (the task restricted to its 10 most
# active entities per seed time, tve_pipeline.tasks).
# Both are static (the recipe and the database's tasks are known when the code location
# loads), so a cell's checkpoint is a built-in StaticPartitionMapping and a scratch cell
# maps to no checkpoint at all.

SCRATCH = "scratch"


def cell_key(task: str, method: str, fraction: float | str, seed: int) -> str:
    """``fraction``: a label fraction (``0.1``) or a restricted label setting (``top10``)."""
    return f"{task}|{method}|{label_set_name(fraction)}|s{seed}"


def parse_cell(key: str) -> tuple[str, str, float | str, int]:
    """(task, method, label setting, seed) of a cell key; the label setting is a label
    fraction (a float) or a restricted task ``top<k>`` (a string)."""
    try:
        task, method, fraction, seed = key.split("|")
        return task, method, label_setting(fraction), int(seed.removeprefix("s"))
    except ValueError as exc:
        raise ValueError(
            f"cell key {key!r} is not 'task|method|fraction|sSEED' (fraction: a label "
            "fraction or top<k>)"
        ) from exc


FINETUNE, PROBE = "finetune", "probe"


def experiment_cells(
    tasks, recipe, database: str | None = None, readout: str = FINETUNE
) -> list[str]:
    """Every cell of a database's experiment: each task from scratch and from each
    pre-trained checkpoint, at every label fraction, then every restricted k (``top<k>``,
    the database's own when the recipe names it), and every seed of the recipe (the task's
    own seeds when ``finetune.seeds_by_task`` names it). Probes read
    ``probe.label_fractions`` when the recipe names them.

    A checkpoint is an objective (``tve``), or an objective at a pre-training budget
    (``tve@2000``) when the recipe has budgets: the linear probes (``readout="probe"``)
    read every budget, fine-tuning the recipe's one (``finetune.pretrain_budget``)."""
    checkpoints = (
        recipe.pretrain.checkpoint_keys() if readout == PROBE else recipe.finetuned_checkpoints()
    )
    methods = [SCRATCH, *checkpoints]
    chosen = recipe.finetune.tasks
    tasks = [t for t in sorted(tasks) if chosen is None or t in chosen]
    fractions = recipe.finetune.label_fractions
    if readout == PROBE and recipe.probe.label_fractions is not None:
        fractions = recipe.probe.label_fractions
    settings = [
        *fractions,
        *map(restricted_label_set, recipe.finetune.restricted_ks(database)),
    ]
    return [
        cell_key(t, m, f, s)
        for t in tasks
        for m in methods
        for f in settings
        for s in recipe.finetune.task_seeds(t)
    ]


def in_priority_order(cells: list[str], recipe) -> list[str]:
    """Cells in the order that gives an answer soonest when a long run stops part way:
    scratch and the first fine-tuned objective (the method under test) first, seed by seed;
    then every other objective of ``finetune.objectives`` (the baselines), together seed by
    seed, so that a run stopped part way has paired seeds of every baseline rather than all
    seeds of one and none of the next."""
    order = list(recipe.finetune.objectives or recipe.pretrain.objectives)

    def rank(method: str) -> int:
        if method == SCRATCH:
            return 0
        objective = parse_budget_key(method)[0]
        return min(order.index(objective), 1) if objective in order else 2

    def key(cell: str):
        task, method, _, seed = parse_cell(cell)
        return rank(method), seed

    return sorted(cells, key=key)  # stable: settings and tasks keep experiment_cells' order


def seed_major(cells: list[str]) -> list[str]:
    """Cells seed by seed (every task, method and setting of seed 0, then of seed 1, ...):
    a run stopped part way has the same seeds of every cell, so each comparison has pairs;
    within a seed the order is ``experiment_cells``' (the settings of one task and method
    in a row, as the probes' embedding cache wants)."""
    return sorted(cells, key=lambda cell: parse_cell(cell)[3])


def objective_partitions(recipe) -> dg.StaticPartitionsDefinition:
    """``pretrained_checkpoint``'s partitions: an objective, or an objective at a budget."""
    return dg.StaticPartitionsDefinition(recipe.pretrain.checkpoint_keys())


def cell_partitions(
    tasks, recipe, database: str | None = None, readout: str = FINETUNE
) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(experiment_cells(tasks, recipe, database, readout))


def checkpoint_of_cells(
    tasks, recipe, database: str | None = None, readout: str = FINETUNE
) -> dg.StaticPartitionMapping:
    """checkpoint -> the cells that start from its backbone (scratch cells have none)."""
    cells = experiment_cells(tasks, recipe, database, readout)
    return dg.StaticPartitionMapping(
        {k: [c for c in cells if parse_cell(c)[1] == k] for k in recipe.pretrain.checkpoint_keys()}
    )
