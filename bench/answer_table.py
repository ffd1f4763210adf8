"""The README's answer tables from a results folder's summary.csv.

    .venv/bin/python bench/answer_table.py results/rel-f1/summary.csv [--split test] [--spread]
        [--versus tve@4000,mae@1000]

One row per task and label setting: scratch's mean ± std (probe and, where run, fine-tuned)
and each checkpoint's paired gain over scratch with its 95% CI, signed so that + is better
whatever the metric's direction (AUROC up, MAE down); ``*`` marks an interval that excludes
zero. The task's first metric (the one fine-tuning and the probes choose by).
"""

import argparse
from pathlib import Path

import pandas as pd

from tve_pipeline.results import (
    budget_benefit,
    label_order,
    label_text,
    metric_direction,
    t_interval,
)


def _cell(row) -> str:
    if pd.isna(row["low"]):
        return f"{row['benefit']:+.3f} (n={int(row['n_pairs'])})"
    star = "*" if (row["low"] > 0 or row["high"] < 0) else ""
    return f"{row['benefit']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]{star}"


def tables(summary: pd.DataFrame, split: str, only: list[str] | None = None) -> str:
    gains = budget_benefit(summary, split)
    part = summary[(summary["split"] == split) & (summary["method"] == "scratch")]
    first = summary[summary["split"] == split].groupby("task")["metric"].first()
    part = part[part["metric"] == part["task"].map(first)]
    out = []
    for readout in ("probe", "finetune"):
        g = gains[gains["readout"] == readout]
        if g.empty:
            continue
        methods = sorted(
            {f"{o}@{b}" for o, b in zip(g["objective"], g["budget"])},
            key=lambda m: (m.split("@")[0], int(m.split("@")[1])),
        )
        if only:
            methods = [m for m in only if m in methods]
        out.append(f"\n**{readout}** ({split}; gain over scratch, + is better, 95% CI)\n")
        out.append("| task | labels | scratch | " + " | ".join(f"`{m}`" for m in methods) + " |")
        out.append("|---|---|---:|" + "---:|" * len(methods))
        for task in sorted(g["task"].unique()):
            metric = first[task]
            for setting in label_order(g[g["task"] == task]["label_set"].unique()):
                s = part[
                    (part["task"] == task)
                    & (part["readout"] == readout)
                    & (part["label_set"].astype(str) == str(setting))
                ]
                scratch = (
                    f"{s['mean'].iloc[0]:.3f} ± {s['std'].iloc[0]:.3f} (n={int(s['n'].iloc[0])})"
                    if len(s)
                    else ""
                )
                cells = []
                for m in methods:
                    o, b = m.split("@")
                    r = g[
                        (g["task"] == task)
                        & (g["label_set"] == setting)
                        & (g["objective"] == o)
                        & (g["budget"] == int(b))
                    ]
                    cells.append(_cell(r.iloc[0]) if len(r) else "")
                arrow = "↑" if metric_direction(metric) == "higher" else "↓"
                out.append(
                    f"| {task} ({metric} {arrow}) | {label_text(setting)} | {scratch} | "
                    + " | ".join(cells)
                    + " |"
                )
    return "\n".join(out)


def spread(summary: pd.DataFrame, split: str, readout: str = "finetune") -> str:
    """Each method's std over seeds per task and label setting with its 95% interval
    (chi-square, n - 1 degrees of freedom): how far 5 or 10 seeds pin a spread down."""
    from scipy import stats

    part = summary[(summary["split"] == split) & (summary["readout"] == readout)]
    first = part.groupby("task")["metric"].first()
    part = part[(part["metric"] == part["task"].map(first)) & (part["n"] >= 2)]
    out = [f"\n**std over seeds** ({readout}, {split}; 95% interval of the std)\n"]
    out.append("| task | labels | method | n | std | interval |")
    out.append("|---|---|---|---:|---:|---|")
    for r in part.itertuples():
        df = int(r.n) - 1
        low = r.std * (df / stats.chi2.ppf(0.975, df)) ** 0.5
        high = r.std * (df / stats.chi2.ppf(0.025, df)) ** 0.5
        out.append(
            f"| {r.task} | {label_text(r.label_set)} | `{r.method}` | {int(r.n)} | "
            f"{r.std:.4f} | [{low:.4f}, {high:.4f}] |"
        )
    return "\n".join(out)


def versus(cells: pd.DataFrame, split: str, a: str, b: str) -> str:
    """``a``'s paired gain over ``b`` (seeds both have) per readout, task and label setting,
    + where ``a`` is better, with its 95% t-interval: two pre-trained methods compared
    directly rather than each against scratch. ``cells``: the results folder's cells.csv."""
    part = cells[(cells["split"] == split) & cells["method"].isin([a, b])]
    first = part.groupby("task")["metric"].first()
    part = part[part["metric"] == part["task"].map(first)]
    out = [f"\n**`{a}` against `{b}`** ({split}; paired by seed, + is better, 95% CI)\n"]
    out.append("| readout | task | labels | n | gain |")
    out.append("|---|---|---|---:|---:|")
    for (readout, task), g in part.groupby(["readout", "task"]):
        sign = 1.0 if metric_direction(first[task]) == "higher" else -1.0
        for setting in label_order(g["label_set"].unique()):
            d = g[g["label_set"] == setting].pivot_table(
                index="seed", columns="method", values="value"
            )
            if a not in d or b not in d:
                continue
            x = (sign * (d[a] - d[b])).dropna()
            if len(x) < 2:
                continue
            mean, low, high = t_interval(x.to_numpy())
            row = {"benefit": mean, "low": low, "high": high}
            out.append(f"| {readout} | {task} | {label_text(setting)} | {len(x)} | {_cell(row)} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("summary_csv")
    ap.add_argument("--split", default="test")
    ap.add_argument("--methods", default=None, help="comma-separated checkpoints to show")
    ap.add_argument("--spread", action="store_true", help="also each std with its interval")
    ap.add_argument(
        "--versus",
        default=None,
        metavar="A,B",
        help="also A's paired gain over B (two checkpoints), from cells.csv beside the summary",
    )
    args = ap.parse_args()
    summary = pd.read_csv(args.summary_csv, dtype={"label_set": str})
    only = args.methods.split(",") if args.methods else None
    print(tables(summary, args.split, only))
    if args.spread:
        print(spread(summary, args.split))
    if args.versus:
        a, b = args.versus.split(",")
        cells = pd.read_csv(Path(args.summary_csv).with_name("cells.csv"), dtype={"label_set": str})
        print(versus(cells, args.split, a, b))


if __name__ == "__main__":
    main()
