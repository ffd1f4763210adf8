"""What a fine-tuning run writes to its Dagster run log: a line per evaluation."""

import re

import dagster as dg


def test_a_fine_tuning_run_logs_a_line_per_evaluation(pipeline_run):
    instance = pipeline_run["instance"]
    key = dg.AssetKey(["tiny", "finetuned_models"])
    records = instance.fetch_materializations(key, limit=100).records
    assert records
    for record in records:
        meta = record.asset_materialization.metadata
        run_id = record.event_log_entry.run_id
        lines = [
            e.user_message
            for e in instance.all_logs(run_id)
            if (e.user_message or "").startswith("fine-tuning step ")
        ]
        steps = [int(re.match(r"fine-tuning step (\d+):", line).group(1)) for line in lines]
        # the test profile: one rate, evaluated every steps / evaluations steps
        assert steps and steps == sorted(steps) and steps[-1] == meta["steps"].value
        assert meta["best_step"].value in steps
        metric = meta["metric"].text
        assert all(f"val_{metric} " in line and "train_loss " in line for line in lines)
