"""The experiment summary against a hand-computed table; the plots and the cell keys."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from assets.partitions import cell_key, checkpoint_of_cells, experiment_cells, parse_cell
from tve_pipeline.config import make_recipe
from tve_pipeline.results import markdown_table, plot_tasks, summarise, task_figure

T_975_DF2 = (
    4.302652729911275  # Student's t, 97.5th percentile, 2 degrees of freedom (tables: 4.303)
)


def _rows():
    values = {
        ("scratch", 0): 0.70,
        ("scratch", 1): 0.74,
        ("scratch", 2): 0.72,
        ("tve", 0): 0.75,
        ("tve", 1): 0.76,
        ("tve", 2): 0.80,
        ("mae", 0): 0.69,
    }
    return pd.DataFrame(
        [
            {
                "database": "db",
                "task": "t",
                "method": m,
                "label_fraction": 0.1,
                "seed": s,
                "split": "test",
                "metric": "roc_auc",
                "value": v,
            }
            for (m, s), v in values.items()
        ]
    )


def test_summary_is_the_hand_computed_table():
    summary = summarise(_rows()).set_index("method")
    assert summary.loc["scratch", "mean"] == pytest.approx(0.72)
    assert summary.loc["scratch", "std"] == pytest.approx(
        0.02
    )  # deviations -0.02, 0.02, 0: sqrt(0.0008 / 2)
    assert summary.loc["scratch", "n"] == 3 and math.isnan(
        summary.loc["scratch", "diff_vs_scratch"]
    )
    # paired differences tve - scratch: 0.05, 0.02, 0.08 -> mean 0.05, sd 0.03,
    # half-width t * 0.03 / sqrt(3)
    half = T_975_DF2 * 0.03 / math.sqrt(3)
    assert summary.loc["tve", "diff_vs_scratch"] == pytest.approx(0.05)
    assert summary.loc["tve", "diff_ci_low"] == pytest.approx(0.05 - half)
    assert summary.loc["tve", "diff_ci_high"] == pytest.approx(0.05 + half)
    assert summary.loc["tve", "n_pairs"] == 3
    # one seed only: a difference, no interval
    assert (
        summary.loc["mae", "diff_vs_scratch"] == pytest.approx(-0.01)
        and summary.loc["mae", "n_pairs"] == 1
    )
    assert math.isnan(summary.loc["mae", "diff_ci_low"])
    table = markdown_table(summarise(_rows()))
    assert (
        f"+0.0500 [{0.05 - half:.4f}, {0.05 + half:.4f}] (3)" in table
        and "0.7200 ± 0.0200 (3)" in table
    )


def test_plots_are_pngs(tmp_path):
    (path,) = plot_tasks(summarise(_rows()), tmp_path)
    assert path.name == "t.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _trivial(task="t", metric="roc_auc", values=(0.5, 0.5), predictor="majority"):
    return pd.DataFrame(
        {
            "task": task,
            "split": ["val", "test"],
            "metric": metric,
            "trivial": list(values),
            "trivial_predictor": predictor,
            "label_median": np.nan,
        }
    )


def _two_metrics_two_splits(fractions=(0.1,)):
    """Rows of task t: roc_auc and a regression metric (nmae), val and test, scratch and
    tve, three seeds, at each label setting."""
    rows = []
    for fraction in fractions:
        for split in ("val", "test"):
            for method, base in (("scratch", 0.70), ("tve", 0.75)):
                for seed in range(3):
                    rows.append(
                        {
                            "task": "t",
                            "method": method,
                            "label_fraction": fraction,
                            "seed": seed,
                            "split": split,
                            "metric": "roc_auc",
                            "value": base + 0.01 * seed,
                        }
                    )
                    rows.append({**rows[-1], "metric": "nmae", "value": 1.0 - base})  # no spread
    return pd.DataFrame(rows)


def test_summary_keeps_its_columns_and_adds_direction_and_the_trivial_baseline():
    trivial = pd.concat(
        [_trivial(), _trivial(metric="nmae", values=(0.27, 0.28), predictor="global_median")]
    )
    summary = summarise(_two_metrics_two_splits(), trivial)
    # the columns readers had, in their order, then the new ones
    assert list(summary.columns) == [
        "task",
        "readout",
        "method",
        "label_set",
        "split",
        "metric",
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
    by = summary.set_index(["method", "split", "metric"])
    assert by.loc[("tve", "test", "roc_auc"), "direction"] == "higher"
    assert by.loc[("tve", "test", "nmae"), "direction"] == "lower"
    assert by.loc[("tve", "val", "nmae"), "trivial"] == 0.27
    assert by.loc[("tve", "test", "nmae"), "trivial"] == 0.28
    # means: scratch nmae 0.30 (loses to 0.28), tve 0.25 (beats it); AUROC 0.71 / 0.76 > 0.5
    assert not by.loc[("scratch", "test", "nmae"), "beats_trivial"]
    assert by.loc[("tve", "test", "nmae"), "beats_trivial"]
    assert by.loc[("scratch", "test", "roc_auc"), "beats_trivial"]
    # without baselines: empty columns, directions still there
    bare = summarise(_two_metrics_two_splits())
    assert bare["trivial"].isna().all() and set(bare["direction"]) == {"higher", "lower"}


def test_markdown_shows_the_trivial_row_and_says_when_no_model_beats_it():
    trivial = pd.concat(
        [_trivial(), _trivial(metric="nmae", values=(0.32, 0.20), predictor="global_median")]
    )
    trivial.loc[trivial["metric"] == "nmae", "label_median"] = [-4.0, 9.0]
    table = markdown_table(summarise(_two_metrics_two_splits(), trivial))
    assert "| t | nmae | lower | trivial | all | global median | 0.2000 | | |" in table
    assert "| t | roc_auc | higher | finetune | 0.1 | tve | 0.7600 ± 0.0100 (3) |" in table
    # scratch 0.30 and tve 0.25 against 0.20 on test (both lose); on val both beat 0.32
    assert (
        "- t: no model beats the trivial baseline on test nmae (lower is better; global median "
        "0.2000, the constant best on val): the best is tve (finetune, labels 0.1) 0.2500. "
        "On val 2 of them beat it (0.3200): the test window's labels are not where val's are "
        "(median 9 against -4)."
    ) in table
    # a baseline between the two: the loser named, with the number
    partly = trivial.assign(trivial=trivial["trivial"].where(trivial["metric"] != "nmae", 0.27))
    assert (
        "- t: 1 of 2 models do not beat the trivial baseline on test nmae (lower is better; "
        "global median 0.2700, the constant best on val): scratch (finetune, labels 0.1) 0.3000."
    ) in markdown_table(summarise(_two_metrics_two_splits(), partly))
    assert "roc_auc (higher is better)" not in table  # AUROC is beaten: no note


@pytest.mark.parametrize("fractions", [(0.1,), (0.1, 1.0), (0.1, "top10")])
def test_task_figure_has_a_panel_per_metric_and_split(fractions):
    trivial = pd.concat(
        [_trivial(), _trivial(metric="nmae", values=(0.27, 0.28), predictor="global_median")]
    )
    summary = summarise(_two_metrics_two_splits(fractions), trivial)
    fig = task_figure(summary)
    assert len(fig.axes) == 4  # nmae, roc_auc x val, test
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels == [
        "val nmae (lower is better)",
        "test nmae (lower is better)",
        "val roc_auc (higher is better)",
        "test roc_auc (higher is better)",
    ]
    bars = len(fractions) == 1 or "top10" in fractions
    for ax, baseline in zip(fig.axes, (0.27, 0.28, 0.5, 0.5)):
        flat = [line for line in ax.get_lines() if set(line.get_ydata()) == {baseline}]
        assert flat, ax.get_ylabel()  # the trivial baseline's horizontal line
        n_bars = len([p for p in ax.patches if p.get_height() > 0])
        # two methods x each label setting as bars, else lines and no bar
        assert n_bars == (2 * len(fractions) if bars else 0)
        assert (ax.get_xscale() == "log") == (not bars)
    plt.close(fig)
    assert "| top10 |" in markdown_table(summary) or "top10" not in fractions


def test_cells_cover_the_grid_and_map_to_their_checkpoint():
    recipe = make_recipe(
        "test",
        {
            "pretrain": {"objectives": ("tve", "mae")},
            "finetune": {"label_fractions": (0.1, 1.0), "seeds": (0, 1)},
        },
    )
    cells = experiment_cells(["b", "a"], recipe)
    assert len(cells) == 2 * 3 * 2 * 2 and cells[0] == "a|scratch|0.1|s0"
    assert parse_cell(cell_key("driver-dnf", "tve+ctr", 0.25, 3)) == (
        "driver-dnf",
        "tve+ctr",
        0.25,
        3,
    )
    mapping = checkpoint_of_cells(
        ["a", "b"], recipe
    ).downstream_partition_keys_by_upstream_partition_key
    assert set(mapping) == {"tve", "mae"}
    assert all(parse_cell(c)[1] == objective for objective, keys in mapping.items() for c in keys)
    assert sum(len(v) for v in mapping.values()) == 2 * 2 * 2 * 2  # every non-scratch cell, once
    with pytest.raises(ValueError, match="not 'task|method|fraction|sSEED'"):
        parse_cell("a|tve|0.1")


def test_an_experiment_can_take_some_tasks_only():
    recipe = make_recipe("test", {"finetune": {"tasks": ["b"]}})
    assert experiment_cells(["a", "b"], recipe) == ["b|scratch|1|s0", "b|tve|1|s0"]


def test_probe_rows_pair_with_the_probe_of_scratch_only():
    """Fine-tuning rows (stored without a readout) and probe rows: each readout summarised
    on its own, the probe's tve paired with the probe's scratch (hand-computed)."""
    tuned = _rows()  # no readout column: fine-tuning's
    probed = _rows().assign(readout="probe")
    probed["value"] = probed["value"] - 0.10
    probed.loc[probed["method"] == "scratch", "value"] = [0.50, 0.50, 0.53]
    summary = summarise(pd.concat([tuned, probed], ignore_index=True))
    assert set(summary["readout"]) == {"finetune", "probe"}
    by = summary.set_index(["readout", "method"])
    assert by.loc[("finetune", "tve"), "diff_vs_scratch"] == pytest.approx(0.05)
    # probe tve 0.65, 0.66, 0.70 against probe scratch 0.50, 0.50, 0.53: 0.15, 0.16, 0.17
    assert by.loc[("probe", "tve"), "diff_vs_scratch"] == pytest.approx(0.16)
    assert by.loc[("probe", "scratch"), "mean"] == pytest.approx(0.51)
    assert "| t | roc_auc | higher | probe | 0.1 | tve |" in markdown_table(summary)


def test_a_restricted_task_takes_only_its_own_baseline():
    """A named label setting (``top10``) is scored on other seeds: no whole-task baseline
    beside it, its own when the baselines name it."""
    rows = _two_metrics_two_splits((0.1, "top10"))
    summary = summarise(rows, _trivial()).set_index(["label_set", "split", "metric"])
    assert summary.loc[("0.1", "test", "roc_auc"), "trivial"].tolist() == [0.5, 0.5]
    assert summary.loc[("top10", "test", "roc_auc"), "trivial"].isna().all()
    own = pd.concat(
        [
            _trivial().assign(label_fraction=np.nan),
            _trivial(values=(0.6, 0.7)).assign(label_fraction="top10"),
        ]
    )
    summary = summarise(rows, own).set_index(["label_set", "split", "metric", "method"])
    assert summary.loc[("top10", "test", "roc_auc", "tve"), "trivial"] == 0.7
    assert summary.loc[("0.1", "test", "roc_auc", "tve"), "trivial"] == 0.5
    assert summary.loc[("top10", "test", "roc_auc", "scratch"), "beats_trivial"]  # 0.71 > 0.7
