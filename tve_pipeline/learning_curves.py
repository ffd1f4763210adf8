"""Learning curves: what a training run's history looks like, as one PNG.

A history is the list of epoch rows that :func:`tve_pipeline.training.pretrain` and
:func:`~tve_pipeline.training.finetune` return (``epoch``, fine-tuning's also the optimiser
``step`` of its evaluation, ``train_loss`` and the held-out numbers of that epoch:
``val_loss`` when pre-training, the task's metrics ``val_<name>`` when fine-tuning). The
figure has one panel per quantity and a line per curve (an entity
table, a run), so that several pre-trained entity tables share one picture; ``points``
adds single values to the last panel (a model's evaluated val and test score at its best
epoch), so the picture shows where the kept model sits on its curve.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence


def curve_quantities(history: Sequence[Mapping]) -> list[str]:
    """``train_loss`` and the first held-out quantity of a history, in that order."""
    keys = list(dict.fromkeys(k for row in history for k in row if k not in ("epoch", "step")))
    held_out = [k for k in keys if k != "train_loss"]
    return [k for k in ("train_loss", *held_out[:1]) if k in keys]


def plot_learning_curves(
    curves: Mapping[str, Sequence[Mapping]],
    *,
    title: str,
    quantities: Sequence[str] | None = None,
    points: Mapping[str, tuple[float, float]] | None = None,
    x: str = "epoch",
) -> bytes:
    """A PNG of ``curves`` (label -> history): a panel per quantity (default: those of
    :func:`curve_quantities` over all curves), x = the rows' ``x`` (``epoch`` or ``step``;
    rows without it: their epoch); ``points`` (label -> (x, value)) are drawn on the last
    panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [row for history in curves.values() for row in history]
    quantities = list(quantities or curve_quantities(rows) or ["train_loss"])
    fig, axes = plt.subplots(
        1, len(quantities), figsize=(4.2 * len(quantities), 3.2), dpi=100, squeeze=False
    )
    for ax, quantity in zip(axes[0], quantities):
        for label, history in curves.items():
            xy = [
                (row.get(x, row["epoch"]), row[quantity])
                for row in history
                if row.get(quantity) is not None and not math.isnan(float(row[quantity]))
            ]
            if xy:
                ax.plot(*zip(*xy), marker="o", markersize=3, label=label)
        ax.set_xlabel(x)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(quantity, fontsize=10)
        ax.grid(alpha=0.3)
    if points:
        last = axes[0][-1]
        for label, (epoch, value) in points.items():
            if value is not None and not math.isnan(float(value)):
                last.scatter([epoch], [value], marker="*", s=90, zorder=3, label=label)
    for ax in axes[0]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no epochs", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()
