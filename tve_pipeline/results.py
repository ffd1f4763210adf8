"""An experiment's answer: per-cell metrics summarised with paired differences and plots.

The rows are the metrics of every cell (task, method, label fraction, seed, readout,
split, metric, value), where the *readout* is ``finetune`` (the fine-tuned model) or
``probe`` (a linear probe on the frozen encoder, :mod:`tve_pipeline.probe`). For each
(task, readout, method, fraction, split, metric) the summary gives the mean, the standard
deviation over seeds and their number; and, for a pre-trained method, the **paired**
difference to scratch with the same readout: the same task, fraction, seed (the same label
sample and random streams), averaged over the seeds both have, with a 95% confidence
interval from Student's t (n - 1 degrees of freedom). Pairing removes the seed-to-seed
variance both methods share, which is most of it on small label sets. Rows without a
readout (cells stored before probes existed) are fine-tuning's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from tve_pipeline.common import atomic_path

SCRATCH = "scratch"
KEYS = ["task", "readout", "method", "label_fraction", "split", "metric"]
FINETUNE, PROBE = "finetune", "probe"
SUMMARY_COLUMNS = [
    *KEYS,
    "mean",
    "std",
    "n",
    "diff_vs_scratch",
    "diff_ci_low",
    "diff_ci_high",
    "n_pairs",
]


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a ``level`` confidence interval for the mean; NaN bounds with
    < 2 values."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    mean = float(values.mean()) if len(values) else math.nan
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(
        stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    )
    return mean, mean - half, mean + half


def with_readout(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with a ``readout`` column (``finetune`` where it has none)."""
    if "readout" not in rows:
        return rows.assign(readout=FINETUNE)
    return rows.assign(readout=rows["readout"].fillna(FINETUNE))


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, method, label fraction, split, metric); see the module docstring."""
    if rows.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    rows = with_readout(rows)
    stats = rows.groupby(KEYS)["value"].agg(mean="mean", std="std", n="count").reset_index()
    pair_keys = ["task", "readout", "label_fraction", "split", "metric", "seed"]
    scratch = rows[rows["method"] == SCRATCH].set_index(pair_keys)["value"]
    out = []
    for _, row in stats.iterrows():
        entry = row.to_dict()
        entry.update(
            diff_vs_scratch=math.nan, diff_ci_low=math.nan, diff_ci_high=math.nan, n_pairs=0
        )
        if row["method"] != SCRATCH:
            mine = rows[(rows[KEYS] == row[KEYS]).all(axis=1)].set_index(pair_keys)["value"]
            both = mine.index.intersection(scratch.index)
            if len(both):
                mean, low, high = t_interval((mine.loc[both] - scratch.loc[both]).to_numpy())
                entry.update(
                    diff_vs_scratch=mean, diff_ci_low=low, diff_ci_high=high, n_pairs=len(both)
                )
        out.append(entry)
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


def _fmt(x: float, digits: int = 4) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_table(summary: pd.DataFrame, split: str = "test") -> str:
    """The summary of one split as a Markdown table (mean ± std (n); paired difference [95% CI])."""
    part = with_readout(summary[summary["split"] == split]).sort_values(
        ["task", "metric", "readout", "label_fraction", "method"]
    )
    lines = [
        "| task | metric | readout | labels | method | mean ± std (n) "
        "| vs scratch: mean difference [95% CI] (pairs) |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for _, row in part.iterrows():
        spread = f" ± {_fmt(row['std'])}" if row["n"] > 1 else ""
        diff = ""
        if row["n_pairs"]:
            ci = (
                f" [{_fmt(row['diff_ci_low'])}, {_fmt(row['diff_ci_high'])}]"
                if row["n_pairs"] > 1
                else ""
            )
            diff = f"{row['diff_vs_scratch']:+.4f}{ci} ({int(row['n_pairs'])})"
        lines.append(
            f"| {row['task']} | {row['metric']} | {row['readout']} | {row['label_fraction']:g} "
            f"| {row['method']} | "
            f"{_fmt(row['mean'])}{spread} ({int(row['n'])}) | {diff} |"
        )
    return "\n".join(lines)


def plot_tasks(summary: pd.DataFrame, out_dir: Path, split: str = "test") -> list[Path]:
    """One PNG per task: its metric against the label fraction, a line per method and
    readout (the probe's dashed), ± std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    summary = with_readout(summary)
    for (task, metric), part in summary[summary["split"] == split].groupby(["task", "metric"]):
        fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
        both = part["readout"].nunique() > 1
        lines = part.sort_values("label_fraction").groupby(["readout", "method"])
        for (readout, method), line in lines:
            ax.errorbar(
                line["label_fraction"],
                line["mean"],
                yerr=line["std"].fillna(0.0),
                marker="o",
                capsize=3,
                linestyle="--" if readout == PROBE else "-",
                label=f"{method} ({readout})" if both else method,
            )
        if part["label_fraction"].nunique() > 1:
            ax.set_xscale("log")
        ax.set_xlabel("label fraction")
        ax.set_ylabel(f"{split} {metric}")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{task}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


# Metrics where lower is better (RelBench's regression metrics); the rest grow with quality.
LOWER_IS_BETTER = {"mae", "rmse", "nmae", "mse", "log_loss"}


def budget_benefit(summary: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Per task (its first metric), objective, budget, readout and label fraction: the
    paired difference to scratch and its 95% CI, signed so that a positive ``benefit`` is
    better whatever the metric's direction, for every method that names a budget
    (``tve@1000``)."""
    columns = ["task", "metric", "objective", "budget", "readout", "label_fraction"]
    part = with_readout(summary)
    part = part[(part["split"] == split) & part["method"].str.contains("@") & (part["n_pairs"] > 0)]
    if part.empty:
        return pd.DataFrame(columns=[*columns, "benefit", "low", "high", "n_pairs"])
    # the task's first metric only: the one fine-tuning and the probes choose by
    first = summary[summary["split"] == split].groupby("task")["metric"].first()
    part = part[part["metric"] == part["task"].map(first)]
    objective_budget = part["method"].str.split("@", n=1, expand=True)
    sign = np.where(part["metric"].str.lower().isin(LOWER_IS_BETTER), -1.0, 1.0)
    bounds = np.sort(np.stack([sign * part["diff_ci_low"], sign * part["diff_ci_high"]]), axis=0)
    out = part.assign(
        objective=objective_budget[0],
        budget=objective_budget[1].astype(int),
        benefit=sign * part["diff_vs_scratch"],
        low=bounds[0],
        high=bounds[1],
    )
    return out[[*columns, "benefit", "low", "high", "n_pairs"]].sort_values(columns)


def plot_budget_benefit(summary: pd.DataFrame, out_dir: Path, split: str = "test") -> Path | None:
    """``budget.png``: :func:`budget_benefit` against the budget (log axis), a panel per
    task, a line per objective, readout and label fraction (the probe's dashed), 95% CI
    bars; None when no method names a budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = budget_benefit(summary, split)
    if frame.empty:
        return None
    tasks = sorted(frame["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), dpi=100, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = frame[frame["task"] == task]
        metric = rows["metric"].iloc[0]
        for (objective, readout, fraction), line in rows.groupby(
            ["objective", "readout", "label_fraction"]
        ):
            err = [
                (line["benefit"] - line["low"]).fillna(0.0),
                (line["high"] - line["benefit"]).fillna(0.0),
            ]
            ax.errorbar(
                line["budget"],
                line["benefit"],
                yerr=err,
                marker="o",
                capsize=3,
                linestyle="--" if readout == PROBE else "-",
                label=f"{objective} {readout} {fraction}",
            )
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("pre-training budget (optimiser steps)")
        better = "lower" if str(metric).lower() in LOWER_IS_BETTER else "higher"
        ax.set_ylabel(f"{split} {metric} gain over scratch ({better} is better)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out_dir) / "budget.png"
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
