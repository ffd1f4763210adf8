"""tve-pipeline: pre-train relational GNNs with Task Vector Estimation (TVE), fine-tune them
on RelBench tasks, and measure when the pre-training helps.

This package is the library (no Dagster imports): databases, traversal graph, targets,
sampling, models, training and evaluation. The Dagster layer lives in ``assets/`` and
``resources/`` and only calls into it.
"""
