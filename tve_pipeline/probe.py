"""The cheap readout: a linear probe on a frozen encoder, per task.

Fine-tuning a checkpoint on a task takes minutes to hours; a linear probe takes seconds
and says how much of the task a checkpoint's embeddings already carry, so a checkpoint
can be judged before any long fine-tune. For one experiment cell (task, method, label
fraction, seed):

1. the encoder is the pre-trained backbone (``backbone``) or, for scratch, a randomly
   initialised one (torch seeded with the recipe's seed, the seed pre-training starts
   from); it is frozen: eval mode, no gradient, its weights never change;
2. every seed (entity, seed time) of the cell's label sample (:func:`~tve_pipeline.
   training._label_sample`: the rows fine-tuning trains on; at most
   ``probe.max_train_seeds`` of them when set, drawn with the seed) and of the val and test
   tables is embedded by ``RDLModel.embed`` on its past temporal subgraph, sampled by the
   recipe's sampler (:func:`~tve_pipeline.sampling.sampler_for`) from a generator seeded
   with the cell's seed, batch after batch, as fine-tuning's evaluation samples
   (:func:`~tve_pipeline.evaluation.predict`);
3. embeddings are standardised with the training rows' mean and standard deviation;
4. a linear model is fitted on the training rows for each regularisation strength of the
   recipe's grid (:class:`~tve_pipeline.config.ProbeConfig`), the one with the best
   validation score (the task's first RelBench metric, as fine-tuning chooses its epoch)
   is kept, and val and test are scored by RelBench's evaluator. Test labels are read
   only for that last score.

Binary tasks: logistic regression (L2 penalty, ``C``). Regression: the tasks' metric is
MAE (NMAE: MAE over the training labels' std), which the conditional *median* minimises,
and fine-tuning trains with L1 for the same reason; labels such as spend or delay are
skewed, so a least-squares (ridge) fit would aim at the mean. The probe fits an L1-loss
linear model (scikit-learn's ``SGDRegressor``, epsilon-insensitive loss with epsilon 0,
averaged, L2 penalty ``alpha``) on labels centred on their training median and scaled by
their mean absolute deviation (L1 regression is equivariant to that; SGD's steps are not
to scale). The exact L1 solver (``QuantileRegressor``, a linear program) took 131 s for
one fit on 20k synthetic rows x 128 features, SGD 0.2 s for a held-out MAE within 0.1%. Regression
predictions are clamped to percentiles of the training labels, as fine-tuning's are.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
from relbench.base import TaskType
from torch_geometric.data import HeteroData

from tve_pipeline.config import Recipe
from tve_pipeline.evaluation import higher_is_better, predict, regression_clamp
from tve_pipeline.graph import seed_tensors
from tve_pipeline.model import RDLModel, load_backbone
from tve_pipeline.sampling import sampler_for
from tve_pipeline.training import _check_task_type, _label_sample


class _Embedding(torch.nn.Module):
    """A model whose output is its backbone's seed embedding (for ``predict``)."""

    def __init__(self, model: RDLModel):
        super().__init__()
        self.model = model

    def forward(self, batch, entity_table: str) -> torch.Tensor:
        return self.model.embed(batch, entity_table)


def probe_encoder(
    data: HeteroData, col_stats: dict, recipe: Recipe, backbone: dict | None
) -> RDLModel:
    """The frozen RDL model: ``backbone`` loaded, or random weights from the recipe's seed.

    The random draw happens on a forked generator, so building a probe leaves torch's
    global generator where it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = RDLModel(data, col_stats, recipe.backbone, out_channels=1)
    if backbone is not None:
        load_backbone(model, backbone)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def embed_seeds(
    model: RDLModel, sampler, task, df, batch_size: int, device, seed: int
) -> np.ndarray:
    """``[len(df), channels]`` embeddings of the seeds of ``df``, in its order."""
    nodes, times = seed_tensors(df[task.entity_col], df[task.time_col])
    model.to(device)
    out = predict(
        _Embedding(model), sampler, task.entity_table, nodes, times, batch_size, device, seed=seed
    )
    return out.reshape(len(df), -1).double().numpy()


class EmbeddingCache:
    """The last ``size`` val / test embedding matrices of this process, so that the cells of
    one (checkpoint, task, seed) at different label fractions embed val and test once: the
    frozen encoder, the rows and the sampler's seed are the same, so the matrix is too (a
    probe's train sample is drawn per fraction and is never cached). An entry is found by
    the encoder's weights (their bytes), the graph (the caller's name for it, e.g. the
    database and its data fingerprint, as a pipeline loads the same graph anew for every
    cell; without one, the graph object itself, kept alive so that a new graph never takes a
    dead one's ``id``), the sampler's settings, the task, the split's rows, the seed, the
    batch size and the device."""

    def __init__(self, size: int = 12):
        self.size = size
        self.entries: dict[tuple, tuple[HeteroData | None, np.ndarray]] = {}
        self.hits = 0

    @staticmethod
    def weights_key(model: torch.nn.Module) -> str:
        digest = hashlib.sha1()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    @staticmethod
    def rows_key(task, df) -> str:
        import pandas as pd

        hashed = pd.util.hash_pandas_object(
            df[[task.entity_col, task.time_col]], index=False
        ).to_numpy()
        return hashlib.sha1(hashed.tobytes()).hexdigest()

    def embed(self, key: tuple, data: HeteroData, compute, graph_key: str | None = None):
        """The matrix under ``key`` and the graph (``graph_key``, else ``data`` itself),
        computed by ``compute()`` when absent."""
        key = (*key, graph_key)
        hit = self.entries.get(key)
        if hit is not None and (graph_key is not None or hit[0] is data):
            self.entries[key] = self.entries.pop(key)  # most recently used last
            self.hits += 1
            return hit[1]
        value = compute()
        # a named graph needs no object kept alive (each cell's own copy would stay in memory)
        self.entries[key] = (None if graph_key is not None else data, value)
        while len(self.entries) > self.size:
            self.entries.pop(next(iter(self.entries)))
        return value


#: The process's cache (``tve run`` probes cell after cell in one process).
EMBEDDINGS = EmbeddingCache()


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Every matrix centred and scaled by the training rows' mean and std (a constant
    column, e.g. a ReLU that never fires, is scaled by 1)."""
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    return [(x - mean) / std for x in (train, *others)]


class _L1Regression:
    """Median regression: an L1-loss linear model on centred, scaled labels (module docstring)."""

    def __init__(self, alpha: float, max_iter: int, seed: int):
        from sklearn.linear_model import SGDRegressor

        self.model = SGDRegressor(
            loss="epsilon_insensitive",
            epsilon=0.0,
            penalty="l2",
            alpha=alpha,
            average=True,
            max_iter=max_iter,
            tol=1e-5,
            random_state=seed,
        )

    def fit(self, x: np.ndarray, y: np.ndarray) -> _L1Regression:
        self.centre = float(np.median(y))
        scale = float(np.mean(np.abs(y - self.centre)))
        self.scale = scale if scale > 0 else 1.0
        self.model.fit(x, (y - self.centre) / self.scale)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x) * self.scale + self.centre


def linear_model(task, strength: float, recipe: Recipe, seed: int):
    """The unfitted linear model of one grid value: logistic regression (``C``) or L1."""
    cfg = recipe.probe
    if task.task_type == TaskType.BINARY_CLASSIFICATION:
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=strength, max_iter=cfg.max_iter)
    return _L1Regression(strength, cfg.max_iter, seed)


def regularisation(task, recipe: Recipe) -> tuple[str, tuple[float, ...]]:
    """(name, grid) of the task's regularisation strength: ``C`` or ``alpha``."""
    if task.task_type == TaskType.BINARY_CLASSIFICATION:
        return "C", recipe.probe.c_grid
    return "alpha", recipe.probe.alpha_grid


def probe_output(task, model, x: np.ndarray, clamp) -> np.ndarray:
    """A fitted linear model's predictions: probabilities, or clamped values."""
    if task.task_type == TaskType.BINARY_CLASSIFICATION:
        return model.predict_proba(x)[:, 1]
    pred = model.predict(x)
    return np.clip(pred, *clamp) if clamp is not None else pred


def linear_probe(
    data: HeteroData,
    col_stats: dict,
    task,
    tables: dict,
    recipe: Recipe,
    device,
    *,
    seed: int = 0,
    label_fraction: float = 1.0,
    backbone: dict | None = None,
    cache: EmbeddingCache | None = None,
    graph_key: str | None = None,
) -> dict:
    """Val and test metrics of a linear probe on the frozen encoder (module docstring).

    ``cache``: where val and test embeddings are kept for the next cell of the same
    encoder, task and seed (:class:`EmbeddingCache`; the results are the same with or
    without it); None embeds every split. ``graph_key``: a name that is the same for equal
    graphs (a pipeline's database and data fingerprint), so that cells which load the graph
    anew still find each other's embeddings; None: the same ``data`` object only.

    ``tables``: ``"train"``, ``"val"``, ``"test"`` (masked) and, optionally,
    ``"test_labels"`` (RelBench's unmasked test table when absent), as fine-tuning and
    :func:`~tve_pipeline.evaluation.evaluate` receive them. ``backbone``: a pre-trained
    backbone state, or None for a random encoder (scratch).
    """
    _check_task_type(task)
    t0 = time.perf_counter()
    cfg = recipe.probe
    train = _label_sample(task, tables["train"].df, label_fraction, seed)
    if cfg.max_train_seeds is not None and len(train) > cfg.max_train_seeds:
        train = train.sample(n=cfg.max_train_seeds, random_state=seed).sort_index()
    y_train = train[task.target_col].to_numpy(dtype=np.float64)
    if higher_is_better(task) and len(np.unique(y_train)) < 2:
        raise ValueError(
            f"task {task.name!r}: the label sample (fraction {label_fraction}, seed {seed}) "
            "has one class only; a probe needs both"
        )
    model = probe_encoder(data, col_stats, recipe, backbone)
    sampler = sampler_for(data, recipe.backbone)
    frames = {"train": train, "val": tables["val"].df, "test": tables["test"].df}

    def embedded(split: str, df) -> np.ndarray:
        def compute():
            return embed_seeds(model, sampler, task, df, cfg.batch_size, device, seed)

        if cache is None or split == "train":
            return compute()
        key = (
            cache.weights_key(model),
            recipe.backbone.model_dump_json(),
            task.name,
            split,
            cache.rows_key(task, df),
            seed,
            cfg.batch_size,
            str(device),
        )
        return cache.embed(key, data, compute, graph_key)

    x_train, x_val, x_test = standardise(*(embedded(s, df) for s, df in frames.items()))
    t_embed = time.perf_counter() - t0
    clamp = regression_clamp(task, y_train, cfg.clamp_percentiles)
    name, grid = regularisation(task, recipe)
    sign = 1.0 if higher_is_better(task) else -1.0
    scores, best = [], None
    for strength in grid:
        fitted = linear_model(task, strength, recipe, seed).fit(x_train, y_train)
        val_metrics = task.evaluate(probe_output(task, fitted, x_val, clamp), tables["val"])
        score = next(iter(val_metrics.values()))
        scores.append({name: strength, "val_score": float(score)})
        if best is None or sign * score > sign * best[2]:
            best = (strength, fitted, score, val_metrics)
    strength, fitted, _, val_metrics = best
    test_metrics = task.evaluate(
        probe_output(task, fitted, x_test, clamp), tables.get("test_labels")
    )
    return {
        "val_metrics": {k: float(v) for k, v in val_metrics.items()},
        "test_metrics": {k: float(v) for k, v in test_metrics.items()},
        "metric": next(iter(val_metrics)),
        "regularisation": name,
        "strength": float(strength),
        "grid": scores,
        "n_train": len(train),
        "n_val": len(frames["val"]),
        "n_test": len(frames["test"]),
        "channels": x_train.shape[1],
        "output_range": clamp,
        "embed_seconds": t_embed,
        "seconds": time.perf_counter() - t0,
    }
