"""An experiment's answer: per-cell metrics summarised with paired differences and plots.

The rows are the metrics of every cell (task, method, label setting, seed, readout,
split, metric, value), where the *readout* is ``finetune`` (the fine-tuned model) or
``probe`` (a linear probe on the frozen encoder, :mod:`tve_pipeline.probe`), and the
*label setting* ``label_set`` is a label fraction (``0.1``) or a restricted task (``top10``:
the k most active entities per seed time, :mod:`tve_pipeline.tasks`); ``label_fraction``
is the fraction, NaN for a restricted task (so that a filter on the fraction never mixes
the restricted task with the whole one). For each (task, readout, method, label setting,
split, metric) the summary gives the mean, the standard deviation over seeds and their
number; and, for a pre-trained method, the **paired** difference to scratch with the same
readout: the same task, label setting, seed (the same label sample and random streams),
averaged over the seeds both have, with a 95% confidence interval from Student's t (n - 1
degrees of freedom). Pairing removes the seed-to-seed variance both methods share, which is
most of it on small label sets. Rows without a readout (cells stored before probes existed)
are fine-tuning's; rows without a label setting (stored before restricted tasks) take their
fraction's. Label settings sort fractions first (ascending), then restricted ks.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from tve_pipeline.common import atomic_path
from tve_pipeline.tasks import label_set_name, restricted_k

SCRATCH = "scratch"
KEYS = ["task", "readout", "method", "label_set", "split", "metric"]
FINETUNE, PROBE = "finetune", "probe"
SUMMARY_COLUMNS = [
    *KEYS,
    "label_fraction",
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


def with_label_set(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with a ``label_set`` column as text (the fraction's where it has none) and
    ``label_fraction`` from it (NaN for a restricted task)."""
    given = rows["label_set"] if "label_set" in rows else pd.Series(np.nan, index=rows.index)
    label_set = [
        label_set_name(s if pd.notna(s) else f)
        for s, f in zip(given, rows.get("label_fraction", given))
    ]
    fraction = [math.nan if restricted_k(s) is not None else float(s) for s in label_set]
    return rows.assign(label_set=label_set, label_fraction=fraction)


def label_set_order(label_sets: pd.Series) -> pd.Series:
    """A sort key: label fractions ascending, then restricted tasks by k."""
    return label_sets.map(
        lambda s: (1, restricted_k(s)) if restricted_k(s) is not None else (0, float(s))
    )


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, method, label setting, split, metric); see the module docstring."""
    if rows.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    rows = with_label_set(with_readout(rows))
    stats = rows.groupby(KEYS)["value"].agg(mean="mean", std="std", n="count").reset_index()
    stats = with_label_set(stats)
    pair_keys = ["task", "readout", "label_set", "split", "metric", "seed"]
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
    summary = pd.DataFrame(out, columns=SUMMARY_COLUMNS)
    order = ["task", "readout", "method", "label_set", "split", "metric"]
    return summary.sort_values(order, key=_sort_key, kind="stable").reset_index(drop=True)


def _sort_key(column: pd.Series) -> pd.Series:
    return label_set_order(column) if column.name == "label_set" else column


def _fmt(x: float, digits: int = 4) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_table(summary: pd.DataFrame, split: str = "test") -> str:
    """The summary of one split as a Markdown table (mean ± std (n); paired difference [95% CI])."""
    part = with_label_set(with_readout(summary[summary["split"] == split])).sort_values(
        ["task", "metric", "readout", "label_set", "method"], key=_sort_key, kind="stable"
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
            f"| {row['task']} | {row['metric']} | {row['readout']} | {row['label_set']} "
            f"| {row['method']} | "
            f"{_fmt(row['mean'])}{spread} ({int(row['n'])}) | {diff} |"
        )
    return "\n".join(lines)


def plot_tasks(summary: pd.DataFrame, out_dir: Path, split: str = "test") -> list[Path]:
    """One PNG per task: its metric against the label fraction, a line per method and
    readout (the probe's dashed), ± std bars; restricted tasks (``top<k>``), when there
    are any, in a panel of their own to the right (same y axis, same colours), one point
    per k, since k is not a fraction of the same table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    summary = with_label_set(with_readout(summary))
    restricted = summary["label_fraction"].isna()
    summary = summary.assign(_k=[restricted_k(s) or 0 for s in summary["label_set"]])
    for (task, metric), part in summary[summary["split"] == split].groupby(["task", "metric"]):
        has_k = bool(restricted[part.index].any())
        has_fraction = bool((~restricted[part.index]).any())
        panels = [p for p, on in (("fraction", has_fraction), ("k", has_k)) if on]
        fig, axes = plt.subplots(
            1,
            len(panels),
            figsize=(5.5 + 2.5 * (len(panels) - 1), 3.8),
            dpi=100,
            sharey=True,
            squeeze=False,
            gridspec_kw={"width_ratios": [2.2 if p == "fraction" else 1 for p in panels]},
        )
        both = part["readout"].nunique() > 1
        lines = list(part.groupby(["readout", "method"]))
        colours = {m: f"C{i}" for i, m in enumerate(sorted(part["method"].unique()))}
        for ax, panel in zip(axes[0], panels):
            rows = part[part["_k"] > 0] if panel == "k" else part[part["_k"] == 0]
            ks = sorted(rows["_k"].unique())
            for (readout, method), line in lines:
                line = rows.loc[rows.index.intersection(line.index)]
                if line.empty:
                    continue
                line = line.sort_values("_k" if panel == "k" else "label_fraction")
                x = line["_k"].map(ks.index) if panel == "k" else line["label_fraction"]
                ax.errorbar(
                    x,
                    line["mean"],
                    yerr=line["std"].fillna(0.0),
                    marker="o",
                    capsize=3,
                    color=colours[method],
                    linestyle="--" if readout == PROBE else "-",
                    label=f"{method} ({readout})" if both else method,
                )
            if panel == "k":
                ax.set_xticks(range(len(ks)), [f"top{k}" for k in ks])
                ax.set_xlim(-0.5, len(ks) - 0.5)
                ax.set_xlabel("restricted task (k per seed time)")
            else:
                if rows["label_fraction"].nunique() > 1:
                    ax.set_xscale("log")
                ax.set_xlabel("label fraction")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"{split} {metric}")
        fig.suptitle(task)
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{task}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        paths.append(path)
    return paths
