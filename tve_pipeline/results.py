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

Every row also says which way its metric is better (``direction``) and, given the tasks'
trivial baselines (:func:`tve_pipeline.baselines.trivial_baseline`: the constant predictor
best on val, scored by RelBench's evaluator), the baseline's score on the row's split
(``trivial``, ``trivial_predictor``), whether the mean beats it (``beats_trivial``), and
the median of the split's labels (``label_median``, regression), which shows a window whose
labels moved.
The baseline is a pair of columns beside the model's rows, not rows of its own: it has no
label fraction, seed or readout to group by, and each row then carries its own comparison.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from tve_pipeline.baselines import beats
from tve_pipeline.common import atomic_path
from tve_pipeline.evaluation import metric_direction
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
    "direction",
    "trivial",
    "trivial_predictor",
    "beats_trivial",
    "label_median",
]
#: What ``summarise`` reads of a trivial-baseline frame (per task, split and metric).
TRIVIAL_KEYS = ["task", "split", "metric"]


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


def summarise(rows: pd.DataFrame, trivial: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (task, readout, method, label setting, split, metric); see the module
    docstring. ``trivial``: the tasks' trivial baselines (columns task, split, metric,
    trivial, trivial_predictor), or None (NaN in those columns)."""
    if rows.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    rows = with_label_set(with_readout(rows))
    stats = with_label_set(
        rows.groupby(KEYS, dropna=False, sort=False)["value"]
        .agg(mean="mean", std="std", n="count")
        .reset_index()
    )
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
    summary = pd.DataFrame(out)
    summary["direction"] = summary["metric"].map(metric_direction)
    summary = _with_trivial(summary, trivial)
    summary["beats_trivial"] = [
        None if pd.isna(t) else beats(m, t, d)
        for m, t, d in zip(summary["mean"], summary["trivial"], summary["direction"])
    ]
    return sort_rows(summary[SUMMARY_COLUMNS], KEYS)


def _with_trivial(summary: pd.DataFrame, trivial: pd.DataFrame | None) -> pd.DataFrame:
    """``summary`` with the trivial baseline of each row's task, split and metric.

    A restricted task (a named label setting such as ``top10``) is scored on its own val
    and test seeds, so the whole task's baseline does not apply to it: its rows take the
    baseline rows whose ``label_fraction`` names the setting (``top10``), when ``trivial``
    has such rows, and none otherwise. Rows with a label fraction take the task's baseline (fitted
    on all the training labels; val and test are the same seeds at every fraction).
    """
    columns = ["trivial", "trivial_predictor", "label_median"]
    empty = {"trivial": math.nan, "trivial_predictor": None, "label_median": math.nan}
    if trivial is None or trivial.empty:
        return summary.assign(**empty)
    named = summary["label_set"].map(lambda v: not _is_fraction(v))
    per_task = trivial
    if "label_fraction" in trivial:
        per_task = trivial[trivial["label_fraction"].isna()]
    out = summary[~named].merge(per_task[[*TRIVIAL_KEYS, *columns]], on=TRIVIAL_KEYS, how="left")
    if named.any():
        restricted = summary[named]
        if "label_fraction" in trivial:
            own = trivial[trivial["label_fraction"].notna()]
            own = own.assign(label_set=own["label_fraction"].map(label_set_name))
            keys = [*TRIVIAL_KEYS, "label_set"]
            restricted = restricted.merge(own[[*keys, *columns]], on=keys, how="left")
        else:
            restricted = restricted.assign(**empty)
        out = pd.concat([out, restricted], ignore_index=True)
    return out


def sort_rows(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """``frame`` sorted by ``by``, label settings in :func:`label_order` (fractions and
    names such as ``top10`` do not compare with each other)."""

    def key(column: pd.Series) -> pd.Series:
        if column.name != "label_set":
            return column
        return column.map(
            lambda v: (0, float(v), 0) if _is_fraction(v) else (1, 0.0, restricted_k(v))
        )

    return frame.sort_values(by, key=key, kind="stable").reset_index(drop=True)


def label_text(fraction) -> str:
    """A label setting as a table or plot shows it: a fraction (``0.1``) or its name
    (``top10``)."""
    if isinstance(fraction, (int, float, np.number)) and not isinstance(fraction, bool):
        return f"{fraction:g}"
    return str(fraction)


def label_order(settings) -> list:
    """Label settings in reading order: fractions ascending, then restricted tasks by k."""
    values = list(dict.fromkeys(settings))
    numeric = sorted((v for v in values if _is_fraction(v)), key=float)
    return numeric + sorted((v for v in values if not _is_fraction(v)), key=restricted_k)


def _is_fraction(value) -> bool:
    """Whether a label setting (``0.1``, ``"0.1"``, ``"top10"``) is a label fraction."""
    if isinstance(value, str):
        return restricted_k(value) is None
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _fmt(x: float, digits: int = 4) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def with_baseline_columns(summary: pd.DataFrame) -> pd.DataFrame:
    """``summary`` with every column of :data:`SUMMARY_COLUMNS` (a summary written before
    directions and baselines gets its directions and empty baseline columns)."""
    summary = with_label_set(with_readout(summary))
    if "direction" not in summary:
        summary = summary.assign(direction=summary["metric"].map(metric_direction))
    for column in ("trivial", "label_median"):
        if column not in summary:
            summary = summary.assign(**{column: math.nan})
    for column in ("trivial_predictor", "beats_trivial"):
        if column not in summary:
            summary = summary.assign(**{column: None})
    return summary


def _predictor_text(name) -> str:
    return str(name).replace("_", " ")


def markdown_table(summary: pd.DataFrame, split: str = "test") -> str:
    """The summary of one split as a Markdown table (mean ± std (n); paired difference [95%
    CI]; difference to the trivial baseline), a ``trivial`` row above each task's metric,
    and a line under the table for each task whose trivial baseline no model beats."""
    summary = with_baseline_columns(summary)
    order = ["task", "metric", "readout", "label_set", "method"]
    part = sort_rows(summary[summary["split"] == split], order)
    lines = [
        "| task | metric | better | readout | labels | method | mean ± std (n) "
        "| vs scratch: mean difference [95% CI] (pairs) | vs trivial |",
        "|---|---|---|---|---:|---|---:|---:|---:|",
    ]
    for (task, metric), rows in part.groupby(["task", "metric"], sort=False):
        first = rows.iloc[0]
        if pd.notna(first["trivial"]):
            lines.append(
                f"| {task} | {metric} | {first['direction']} | trivial | all | "
                f"{_predictor_text(first['trivial_predictor'])} | {_fmt(first['trivial'])} | | |"
            )
        for _, row in rows.iterrows():
            spread = f" ± {_fmt(row['std'])}" if row["n"] > 1 else ""
            diff = ""
            if row["n_pairs"]:
                ci = (
                    f" [{_fmt(row['diff_ci_low'])}, {_fmt(row['diff_ci_high'])}]"
                    if row["n_pairs"] > 1
                    else ""
                )
                diff = f"{row['diff_vs_scratch']:+.4f}{ci} ({int(row['n_pairs'])})"
            vs_trivial = "" if pd.isna(row["trivial"]) else f"{row['mean'] - row['trivial']:+.4f}"
            lines.append(
                f"| {task} | {metric} | {row['direction']} | {row['readout']} "
                f"| {label_text(row['label_set'])} | {row['method']} | "
                f"{_fmt(row['mean'])}{spread} ({int(row['n'])}) | {diff} | {vs_trivial} |"
            )
    notes = baseline_notes(summary, split)
    return "\n".join(lines + ([""] + notes if notes else []))


def baseline_notes(summary: pd.DataFrame, split: str = "test") -> list[str]:
    """One line per task and metric where a summarised mean does not beat the trivial
    baseline on ``split``: the baseline's score and the rows that lose to it (when none
    beats it: the best of them); when models that lose on ``split`` beat it on val, where
    the labels lie on val and on ``split`` (regression), since a window whose labels moved
    is the usual reason."""
    summary = with_baseline_columns(summary)
    notes = []
    for (task, metric), rows in summary.groupby(["task", "metric"], sort=True):
        here = rows[(rows["split"] == split) & rows["trivial"].notna()]
        wins = here["beats_trivial"].astype(bool)
        if here.empty or wins.all():
            continue
        first = here.iloc[0]
        sign = 1.0 if first["direction"] == "higher" else -1.0
        baseline = (
            f"{_predictor_text(first['trivial_predictor'])} {_fmt(first['trivial'])}, the "
            f"constant best on val"
        )
        losers = here[~wins]
        if not wins.any():
            best = here.loc[(sign * here["mean"]).idxmax()]
            line = (
                f"- {task}: no model beats the trivial baseline on {split} {metric} "
                f"({first['direction']} is better; {baseline}): the best is {best['method']} "
                f"({best['readout']}, labels {label_text(best['label_set'])}) "
                f"{_fmt(best['mean'])}."
            )
        else:
            shown = ", ".join(
                f"{r['method']} ({r['readout']}, labels {label_text(r['label_set'])}) "
                f"{_fmt(r['mean'])}"
                for _, r in losers.iterrows()
            )
            line = (
                f"- {task}: {len(losers)} of {len(here)} models do not beat the trivial "
                f"baseline on {split} {metric} ({first['direction']} is better; {baseline}): "
                f"{shown}."
            )
        val = rows[(rows["split"] == "val") & rows["trivial"].notna()]
        keys = ["readout", "method", "label_set"]
        lost = set(map(tuple, losers[keys].itertuples(index=False)))
        won_on_val = val[val["beats_trivial"].astype(bool)]
        won_on_val = won_on_val[
            [tuple(r) in lost for r in won_on_val[keys].itertuples(index=False)]
        ]
        if split != "val" and not won_on_val.empty:
            line += f" On val {len(won_on_val)} of them beat it ({_fmt(val.iloc[0]['trivial'])})"
            medians = {
                s: rows.loc[rows["split"] == s, "label_median"].dropna() for s in ("val", split)
            }
            if all(len(m) for m in medians.values()):
                line += (
                    f": the {split} window's labels are not where val's are (median "
                    f"{medians[split].iloc[0]:.4g} against {medians['val'].iloc[0]:.4g})"
                )
            line += "."
        notes.append(line)
    return notes


def plot_tasks(summary: pd.DataFrame, out_dir: Path, splits=("val", "test")) -> list[Path]:
    """One PNG per task (:func:`task_figure`), written atomically; returns their paths."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    summary = with_baseline_columns(summary)
    for task, of_task in summary.groupby("task", sort=True):
        fig = task_figure(of_task, splits)
        path = out_dir / f"{task}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


def task_figure(of_task: pd.DataFrame, splits=("val", "test")):
    """A task's figure: one panel per metric (rows) and split (columns), the mean over
    seeds ± std per method and readout against the label setting, the trivial baseline as
    a dotted horizontal line, the metric's direction in the axis label. Several label
    fractions: a line per method (the probe's dashed) over a log axis; one label setting,
    or named ones (``top10``): bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    of_task = with_baseline_columns(of_task)
    task = of_task["task"].iloc[0]
    metrics = sorted(of_task["metric"].unique())
    shown = [s for s in splits if (of_task["split"] == s).any()]
    fig, axes = plt.subplots(
        len(metrics),
        len(shown),
        figsize=(5.0 * len(shown), 3.6 * len(metrics)),
        dpi=100,
        squeeze=False,
    )
    for i, metric in enumerate(metrics):
        for j, split in enumerate(shown):
            part = of_task[(of_task["metric"] == metric) & (of_task["split"] == split)]
            _panel(axes[i][j], part, f"{task}: {split}", split, metric)
    # one legend for every panel, under them (inside a panel it hides bars)
    handles, names = {}, []
    for ax in fig.axes:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            if name not in handles:
                handles[name] = handle
                names.append(name)
    columns = min(4, max(len(names), 1))
    rows = math.ceil(len(names) / columns)
    height = fig.get_figheight()
    fig.legend([handles[n] for n in names], names, loc="lower center", ncol=columns, fontsize=8)
    fig.tight_layout(rect=(0, min(0.5, (0.24 * rows + 0.05) / height), 1, 1))
    return fig


def _panel(ax, part: pd.DataFrame, title: str, split: str, metric: str) -> None:
    """One metric on one split: lines over label fractions, or bars per label setting."""
    settings = label_order(part["label_set"])
    both = part["readout"].nunique() > 1
    series = list(part.groupby(["readout", "method"], sort=True))
    as_lines = len(settings) > 1 and all(_is_fraction(v) for v in settings)
    width = 0.8 / max(len(series), 1)
    for k, ((readout, method), line) in enumerate(series):
        label = f"{method} ({readout})" if both else method
        line = line.set_index("label_set").reindex(settings)
        err = line["std"].fillna(0.0).to_numpy(dtype=float)
        if as_lines:
            ax.errorbar(
                [float(v) for v in settings],
                line["mean"].to_numpy(dtype=float),
                yerr=err,
                marker="o",
                capsize=3,
                linestyle="--" if readout == PROBE else "-",
                label=label,
            )
        else:
            x = np.arange(len(settings)) - 0.4 + width * (k + 0.5)
            ax.bar(
                x,
                line["mean"].to_numpy(dtype=float),
                width,
                yerr=err,
                capsize=3,
                hatch="//" if readout == PROBE else None,
                label=label,
            )
    if as_lines:
        ax.set_xscale("log")
        ax.set_xticks([float(v) for v in settings], [label_text(v) for v in settings])
        ax.minorticks_off()
        ax.set_xlabel("label fraction")
    else:
        ax.set_xticks(np.arange(len(settings)), [label_text(v) for v in settings])
        named = not all(_is_fraction(v) for v in settings)
        ax.set_xlabel("labels (fraction or restricted task)" if named else "label fraction")
    trivial = part["trivial"].dropna()
    values = part["mean"].dropna()
    if len(trivial):
        ax.axhline(
            float(trivial.iloc[0]),
            color="black",
            linestyle=":",
            label=f"trivial: {_predictor_text(part['trivial_predictor'].dropna().iloc[0])}",
        )
        values = pd.concat([values, trivial])
    if not as_lines and len(values):
        # bars start at the axis: zoom to the values, as the differences are small
        spread = part["std"].fillna(0.0).max() if len(part) else 0.0
        low, high = float(values.min()) - spread, float(values.max()) + spread
        pad = 0.15 * (high - low) or 0.05 * abs(high) or 0.05
        ax.set_ylim(low - pad, high + pad)
    direction = part["direction"].iloc[0] if len(part) else metric_direction(metric)
    ax.set_ylabel(f"{split} {metric} ({direction} is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def budget_benefit(summary: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Per task (its first metric), objective, budget, readout and label fraction: the
    paired difference to scratch and its 95% CI, signed so that a positive ``benefit`` is
    better whatever the metric's direction, for every method that names a budget
    (``tve@1000``)."""
    columns = ["task", "metric", "objective", "budget", "readout", "label_set"]
    part = with_label_set(with_readout(summary))
    part = part[(part["split"] == split) & part["method"].str.contains("@") & (part["n_pairs"] > 0)]
    if part.empty:
        return pd.DataFrame(columns=[*columns, "benefit", "low", "high", "n_pairs"])
    # the task's first metric only: the one fine-tuning and the probes choose by
    first = summary[summary["split"] == split].groupby("task")["metric"].first()
    part = part[part["metric"] == part["task"].map(first)]
    objective_budget = part["method"].str.split("@", n=1, expand=True)
    sign = np.where(part["metric"].map(metric_direction) == "lower", -1.0, 1.0)
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
    """``budget.png``: :func:`budget_benefit` against the budget (log axis, ticks at the
    budgets), a panel per task (rows) and label setting (columns), a colour per objective,
    the probe dashed with circles and fine-tuning solid with squares, 95% CI bars, the
    objectives nudged apart so their bars do not hide each other; up is better in every
    panel; None when no method names a budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = budget_benefit(summary, split)
    if frame.empty:
        return None
    tasks = sorted(frame["task"].unique())
    settings = label_order(frame["label_set"].unique())
    objectives = sorted(frame["objective"].unique())
    colours = {o: f"C{i}" for i, o in enumerate(objectives)}
    budgets = sorted(frame["budget"].unique())
    fig, axes = plt.subplots(
        len(tasks),
        len(settings),
        figsize=(3.3 * len(settings) + 1.2, 2.7 * len(tasks) + 0.8),
        dpi=100,
        squeeze=False,
        sharex=True,
    )
    for r, task in enumerate(tasks):
        for c, setting in enumerate(settings):
            ax = axes[r][c]
            rows = frame[(frame["task"] == task) & (frame["label_set"] == setting)]
            for (objective, readout), line in rows.groupby(["objective", "readout"], sort=True):
                nudge = 1.0 + 0.06 * (objectives.index(objective) - (len(objectives) - 1) / 2)
                err = [
                    (line["benefit"] - line["low"]).fillna(0.0).clip(lower=0),
                    (line["high"] - line["benefit"]).fillna(0.0).clip(lower=0),
                ]
                probe = readout == PROBE
                ax.errorbar(
                    line["budget"] * nudge,
                    line["benefit"],
                    yerr=err,
                    color=colours[objective],
                    marker="o" if probe else "s",
                    markersize=4 if probe else 6,
                    capsize=2,
                    linestyle="--" if probe else "-",
                    linewidth=1.0,
                )
            ax.axhline(0.0, color="black", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_xticks(budgets)
            ax.set_xticklabels([f"{b:,}" for b in budgets])
            ax.minorticks_off()
            ax.set_xlim(budgets[0] / 1.6, budgets[-1] * 1.6)
            ax.grid(alpha=0.3)
            metric = rows["metric"].iloc[0] if len(rows) else ""
            ax.set_title(f"{task}, labels {label_text(setting)}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{split} {metric}\ngain over scratch", fontsize=8)
            if r == len(tasks) - 1:
                ax.set_xlabel("pre-training steps", fontsize=8)
    handles = [
        plt.Line2D([], [], color=colours[o], marker="o", linestyle="", label=o) for o in objectives
    ] + [
        plt.Line2D([], [], color="grey", marker="o", linestyle="--", label="linear probe"),
        plt.Line2D([], [], color="grey", marker="s", linestyle="-", label="fine-tuned"),
    ]
    height = fig.get_figheight()
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 1 - 0.3 / height),
        ncol=len(handles),
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(
        f"Paired gain over scratch vs pre-training budget ({split}; up is better; 95% CI)",
        fontsize=10,
        y=1 - 0.05 / height,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / height))
    path = Path(out_dir) / "budget.png"
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
