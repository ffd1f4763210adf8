"""Raw task vectors: next-window aggregates of every target of the traversal graph, in DuckDB.

What to compute is one value, a :class:`TargetQuery` (the tables, their schema, the
definitions, the entity table, the seed times, Δ, and the DuckDB settings); the four ways
to run it take it whole: :func:`iter_targets` (Arrow slices), :func:`compute_targets` (a
frame), :func:`write_targets` (one parquet file) and :func:`write_targets_by_seed_time`
(a file per seed time). :func:`targets_sql` specifies their rows as one set-based DuckDB
query over the seed times (:func:`targets_script`: the same as a script that runs
elsewhere); the four compute the same rows a group of seed times at a time, DuckDB making
the windows and NumPy aggregating, looking up and filling in.

Modules, each with its design: :mod:`.query` (the query and its memory budget),
:mod:`.sql` and :mod:`.lookup_sql` (the SQL that specifies the rows), :mod:`.plan` (what
the SQL hands to the in-process engine), :mod:`.windows` (windows and the in-process
aggregation of the paths read off them), :mod:`.lookups` and :mod:`.group_files`
(fact->key<-fact lookups, made once per query), :mod:`.assemble` (seeds, a group's rows
put together and filled in), :mod:`.compute` and :mod:`.write` (running a query, writing
parquet), over :mod:`.names` and :mod:`.connection`.
"""

from tve_pipeline.targets.compute import compute_targets, iter_targets
from tve_pipeline.targets.connection import release_arrow_memory
from tve_pipeline.targets.names import (
    COUNT_AGGREGATIONS,
    INACTIVE,
    TIMESTAMP,
    interval_sql,
    quote,
)
from tve_pipeline.targets.query import (
    DEFAULT_SEEDS_PER_QUERY,
    DEFAULT_SLICE_ROWS,
    TargetQuery,
    memory_bytes,
    task_vector_aggregations,
    validate_targets,
)
from tve_pipeline.targets.sql import targets_script, targets_sql
from tve_pipeline.targets.write import write_targets, write_targets_by_seed_time

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
