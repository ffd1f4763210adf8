"""Raw task vectors: next-window aggregates of every target of the traversal graph, in DuckDB
(the code in :mod:`tve_pipeline.targets.sql`; its public names are re-exported here)."""

from tve_pipeline.targets.sql import (
    COUNT_AGGREGATIONS,
    DEFAULT_SEEDS_PER_QUERY,
    DEFAULT_SLICE_ROWS,
    INACTIVE,
    TIMESTAMP,
    TargetQuery,
    compute_targets,
    interval_sql,
    iter_targets,
    memory_bytes,
    quote,
    release_arrow_memory,
    targets_script,
    targets_sql,
    task_vector_aggregations,
    validate_targets,
    write_targets,
    write_targets_by_seed_time,
)

__all__ = [
    "COUNT_AGGREGATIONS",
    "DEFAULT_SEEDS_PER_QUERY",
    "DEFAULT_SLICE_ROWS",
    "INACTIVE",
    "TIMESTAMP",
    "TargetQuery",
    "compute_targets",
    "interval_sql",
    "iter_targets",
    "memory_bytes",
    "quote",
    "release_arrow_memory",
    "targets_script",
    "targets_sql",
    "task_vector_aggregations",
    "validate_targets",
    "write_targets",
    "write_targets_by_seed_time",
]
