"""``tve targets``: raw TVE task vectors of one entity table, written as parquet + JSON.

::

    tve targets DATASET_DIR --entity TABLE [--timedelta "30 days"] [--timestamps T1,T2,...]
                [--hops 2] (--out OUT_DIR | --show-sql) [--exclude-tables T,...]
                [--exclude-columns TABLE.COL,...] [--columns TABLE.COL,...] [--no-fact-key-fact]

writes ``OUT_DIR/targets.json`` (the target definitions, :mod:`tve_pipeline.traversal`) and
``OUT_DIR/targets.parquet``: one row per (entity, seed time) for every seed (an entity
whose own time is ``<= t``; of a table without time, one whose first row in a first-hop
fact table is ``<= t + Δ``, as the TVE reference's seeds), in (timestamp, pkey) order;
columns: the entity's primary key, ``timestamp``, ``inactive`` and one column per target
name holding the raw value. Both
files are written under temporary names and moved into place. ``--show-sql`` writes
nothing: it prints a DuckDB script that computes the same rows from the dataset's parquet
files (:func:`tve_pipeline.targets.targets_script`), to run elsewhere (``duckdb <
targets.sql``, MotherDuck) when one machine is not enough.

Design. The command reads the dataset's manifest (keys, time columns) and types columns
with :func:`tve_pipeline.database.column_types` from the non-key columns of the tables the
traversal can reach and the dataset's ``tve_types.json`` (declared types win), exactly as
the ``traversal_graph`` asset does, so both define the same targets; the data itself
never goes through pandas: DuckDB reads the parquet files
(:func:`tve_pipeline.targets.write_targets`), so a database of tens of millions of rows
runs in a few gigabytes. Rows are read as stored (the whole folder, like
``get_db(upto_test_timestamp=False)``): without ``--timestamps`` the seed times are the
database's training seed times, whose windows end by the validation timestamp, so no row
after it is read; explicit ``--timestamps`` get exactly the windows they ask for. A
dangling foreign key (RelBench sets those to null on load) matches no row either way.

Every mistake a user can make ends in a one-line ``ValueError`` naming the table or
column: an unknown table or column, an entity table without an incoming time-stamped fact
table, an explicitly requested column that cannot be aggregated (a key, a time, text), a
requested column that no path reaches. A target set is never silently empty: every path
has at least its row count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tve_pipeline.targets import TargetQuery

# pandas, DuckDB and the library are imported when the command runs, not when ``tve``
# builds its parser (every ``tve`` command builds it).

#: The memory budget of ``tve targets`` unless ``--memory-limit`` says otherwise: DuckDB is
#: given half as its limit, the in-process work is sized to the rest (10M orders, every path
#: kind: 1.60 GiB peak RSS, bench_targets.py).
DEFAULT_MEMORY_LIMIT = "2GB"


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _parse_timedelta(value: str, option: str = "--timedelta"):
    import pandas as pd

    try:
        td = pd.Timedelta(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{option} {value!r} is not a duration (e.g. '30 days')") from exc
    if td is pd.NaT or td <= pd.Timedelta(0):
        raise ValueError(f"{option} {value!r} must be positive")
    return td


def _parse_timestamps(value: str) -> list:
    import pandas as pd

    out = []
    for part in _split(value):
        try:
            ts = pd.Timestamp(part)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--timestamps: {part!r} is not a timestamp") from exc
        if ts is pd.NaT:
            raise ValueError(f"--timestamps: {part!r} is not a timestamp")
        if ts.tzinfo is not None:
            raise ValueError(f"--timestamps: {part!r} has a time zone; RelBench times are naive")
        out.append(ts)
    if not out:
        raise ValueError(
            "--timestamps is empty: give comma-separated times, or leave it out for the"
            " training seed times"
        )
    return out


def _table_columns(table_files: dict[str, Path], table: str) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.read_schema(table_files[table]).names)


def _parse_columns(
    option: str, value: str | None, table_files: dict[str, Path]
) -> dict[str, list[str]]:
    """``table.col,...`` -> {table: [col, ...]}, every table and column checked to exist."""
    out: dict[str, list[str]] = {}
    for item in _split(value):
        table, dot, column = item.partition(".")
        # Table names may hold dots: take the longest known table name that prefixes the item.
        known = sorted((t for t in table_files if item.startswith(t + ".")), key=len, reverse=True)
        if known:
            table, column = known[0], item[len(known[0]) + 1 :]
        elif not dot or not column:
            raise ValueError(f"{option}: {item!r} is not TABLE.COLUMN")
        if table not in table_files:
            raise ValueError(
                f"{option}: unknown table {table!r} in {item!r} (tables: {', '.join(table_files)})"
            )
        if column not in _table_columns(table_files, table):
            raise ValueError(f"{option}: table {table!r} has no column {column!r}")
        out.setdefault(table, []).append(column)
    return out


def _infer_types(
    manifest, table_files: dict[str, Path], tables: list[str], dataset_dir: Path
) -> dict[str, dict[str, str]]:
    """Semantic types of the columns of ``tables``: what
    :func:`tve_pipeline.database.column_types` gives the ``traversal_graph`` asset (keys and
    time columns ``key``, then the types ``dataset_dir/tve_types.json`` declares, then
    inference, column by column), read one non-key column at a time (and none that
    ``tve_types.json`` declares), so the largest column is the most that is ever in memory
    (50M orders: 4.0 GB peak when a table's value columns were read together)."""
    import pandas as pd

    from tve_pipeline import database
    from tve_pipeline.schema import KEY
    from tve_pipeline.targets import release_arrow_memory

    declared = database.declared_column_types(dataset_dir)
    out: dict[str, dict[str, str]] = {}
    for name in tables:
        spec = manifest.tables[name]
        keys = {c for c in [spec.pkey, spec.time_col, *spec.fkeys] if c}
        given = declared.get(name, {})
        one_table = SimpleNamespace(tables={name: spec})
        out[name] = {}
        for c in _table_columns(table_files, name):
            if c in keys or given.get(c):
                out[name][c] = KEY if c in keys else given[c]
                continue
            frame = pd.read_parquet(table_files[name], columns=[c])
            out[name][c] = database.column_types({name: frame}, one_table, dataset_dir)[name][c]
            del frame
            release_arrow_memory()  # the column's Arrow buffers, kept by the pool
    return out


def _min_timestamp(manifest, table_files: dict[str, Path]):
    """The earliest time of any time column (``Database.min_timestamp``), from the files."""
    import pandas as pd
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    lows = []
    for name, spec in manifest.tables.items():
        if spec.time_col is None:
            continue
        column = pq.read_table(table_files[name], columns=[spec.time_col]).column(0)
        low = pc.min(column).as_py()
        if low is not None:
            lows.append(pd.Timestamp(low))
    if not lows:
        raise ValueError("the database has no time column with a value: give --timestamps")
    return min(lows)


def _duration(td) -> str:
    """'7 days' rather than pandas' '7 days 00:00:00'."""
    return f"{td.days} days" if td.value % (86_400 * 10**9) == 0 else str(td)


def run_targets_command(args) -> dict:
    """Run ``tve targets`` with parsed ``args``; returns a summary (also printed).

    The steps, each a function below: the dataset's table files and the entity table, the
    target definitions (traversal graph of the typed columns, narrowed by the options),
    the next window and the seed times, then the two files.
    """
    from tve_pipeline import database
    from tve_pipeline.targets import DEFAULT_SEEDS_PER_QUERY, TargetQuery, memory_bytes

    memory_bytes(args.memory_limit, "--memory-limit")  # before any work
    dataset = database.open_dataset(args.dataset_dir)
    manifest = dataset.manifest
    table_files = database.table_files(dataset)
    _check_entity(manifest, args.entity)
    defs = _target_defs(args, manifest, table_files, Path(dataset.dataset_dir))
    delta = _next_window(args, dataset)
    seeds = _seed_times(args, dataset, table_files, delta)
    query = TargetQuery(
        table_files,
        manifest.tables,
        defs,
        args.entity,
        seeds,
        delta,
        memory_limit=args.memory_limit,
        threads=args.threads,
        second_hop_window=(
            None
            if args.second_hop_window is None
            else _parse_timedelta(args.second_hop_window, "--second-hop-window")
        ),
        seeds_per_query=(
            DEFAULT_SEEDS_PER_QUERY
            if args.seeds_per_query is None
            else args.seeds_per_query or None
        ),
    )
    if args.show_sql:
        from tve_pipeline.targets import targets_script

        script = targets_script(query)
        print(script, end="")
        return {"sql": script}
    if args.out is None:
        raise ValueError("--out is required (unless --show-sql)")
    summary = _write_outputs(query, Path(args.out))
    _print_summary(summary, delta)
    return summary


def _check_entity(manifest, entity: str) -> None:
    if entity not in manifest.tables:
        raise ValueError(f"unknown entity table {entity!r} (tables: {', '.join(manifest.tables)})")
    if manifest.tables[entity].pkey is None:
        raise ValueError(f"entity table {entity!r} has no primary key")


def _known_tables(option: str, value: str | None, manifest) -> list[str]:
    """``--include-tables`` / ``--exclude-tables``: the tables named, each checked to exist."""
    tables = _split(value)
    for table in tables:
        if table not in manifest.tables:
            raise ValueError(
                f"{option}: unknown table {table!r} (tables: {', '.join(manifest.tables)})"
            )
    return tables


def _target_defs(args, manifest, table_files: dict[str, Path], dataset_dir: Path) -> list:
    """The target definitions: the traversal graph of the entity table over the typed
    columns of the tables its paths reach, narrowed by the table and column options."""
    from tve_pipeline.traversal import build_traversal_graph, traversal_paths

    entity = args.entity
    exclude_tables = _known_tables("--exclude-tables", args.exclude_tables, manifest)
    include_tables = _known_tables("--include-tables", args.include_tables, manifest) or None
    exclude_columns = _parse_columns("--exclude-columns", args.exclude_columns, table_files)
    wanted = _parse_columns("--columns", args.columns, table_files)

    # The tables the traversal reaches (raises, naming the entity table, when it reaches none).
    paths = traversal_paths(
        manifest.tables,
        entity,
        hops=args.hops,
        include_tables=include_tables,
        exclude_tables=exclude_tables,
        fact_key_fact=args.fact_key_fact,
    )
    last_tables = list(dict.fromkeys(p[-1].table for p in paths))
    types = _infer_types(manifest, table_files, sorted(set(last_tables) | set(wanted)), dataset_dir)
    if wanted:  # aggregate exactly these columns
        _check_wanted_columns(wanted, types, exclude_columns, entity, last_tables)
        for table in last_tables:
            others = [c for c in types[table] if c not in wanted.get(table, ())]
            exclude_columns.setdefault(table, []).extend(others)

    defs = build_traversal_graph(
        manifest.tables,
        types,
        entity,
        hops=args.hops,
        include_tables=include_tables,
        exclude_tables=exclude_tables,
        exclude_columns=exclude_columns,
        fact_key_fact=args.fact_key_fact,
    )
    if not defs:  # cannot happen (every path has its row count), but never write an empty set
        raise ValueError(f"no targets for entity table {entity!r}")
    return defs


def _check_wanted_columns(
    wanted: dict[str, list[str]],
    types: dict[str, dict[str, str]],
    exclude_columns: dict[str, list[str]],
    entity: str,
    last_tables: list[str],
) -> None:
    """``--columns``: each must be aggregatable, not excluded, and reached by a path."""
    from tve_pipeline.traversal import AGGREGATIONS_BY_STYPE

    for table, columns in wanted.items():
        for column in columns:
            stype = types[table][column]
            if stype not in AGGREGATIONS_BY_STYPE:
                raise ValueError(
                    f"--columns: {table}.{column} is a {stype} column; only numerical and "
                    "categorical columns can be aggregated"
                )
            if column in exclude_columns.get(table, ()):
                raise ValueError(f"--columns: {table}.{column} is also in --exclude-columns")
        if table not in last_tables:
            raise ValueError(
                f"--columns: no path from {entity!r} ends in table {table!r} "
                f"(paths end in: {', '.join(last_tables)})"
            )


def _next_window(args, dataset):
    """Δ: ``--timedelta``, else the window of the dataset's tasks."""
    from tve_pipeline import database
    from tve_pipeline.schema import DatabaseError

    if args.timedelta is not None:
        return _parse_timedelta(args.timedelta)
    try:
        return database.task_timedelta(dataset)
    except DatabaseError as exc:
        raise ValueError(f"{exc}; or pass --timedelta") from exc


def _seed_times(args, dataset, table_files: dict[str, Path], delta) -> list:
    """``--timestamps``, else the database's training seed times (windows that end by the
    validation timestamp)."""
    import pandas as pd

    from tve_pipeline.windows import training_seed_times

    if args.timestamps is not None:
        return _parse_timestamps(args.timestamps)
    first = _min_timestamp(dataset.manifest, table_files)
    seeds = list(training_seed_times(dataset.val_timestamp, first, delta))
    if not seeds:
        raise ValueError(
            f"no training seed time between the first timestamp and val - {delta} "
            f"({pd.Timestamp(dataset.val_timestamp) - delta}): give --timestamps"
        )
    return seeds


def _write_outputs(query: TargetQuery, out_dir: Path) -> dict:
    """``targets.parquet`` and ``targets.json`` in ``out_dir``, each moved into place when
    whole; returns the summary of the run. A DuckDB failure is one line naming the entity."""
    from tve_pipeline.common import atomic_path, error_summary
    from tve_pipeline.targets import write_targets
    from tve_pipeline.traversal import save_targets_json

    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import duckdb

        duck_errors: tuple[type[BaseException], ...] = (duckdb.Error,)
    except ImportError:  # pragma: no cover
        duck_errors = ()
    try:
        stats = write_targets(query, out_dir / "targets.parquet")
    except duck_errors as exc:
        raise RuntimeError(
            f"DuckDB failed computing the targets of {query.entity_table!r}: {error_summary(exc)}"
        ) from exc
    with atomic_path(out_dir / "targets.json") as tmp:
        save_targets_json(query.defs, tmp)
    return {
        "entity_table": query.entity_table,
        "targets": len(query.defs),
        "seed_times": len(set(query.timestamps)),
        "timedelta": str(query.timedelta),
        "rows": stats["rows"],
        "inactive": stats["inactive"],
        "parquet": str(out_dir / "targets.parquet"),
        "json": str(out_dir / "targets.json"),
    }


def _print_summary(summary: dict, delta) -> None:
    from tve_pipeline.targets import INACTIVE

    entity, rows, inactive = summary["entity_table"], summary["rows"], summary["inactive"]
    rate = inactive / rows if rows else 0.0
    print(
        f"wrote {summary['parquet']}: {rows} rows ({entity} x {summary['seed_times']} seed times,"
        f" {rate:.1%} {INACTIVE}), {summary['targets']} targets, window {_duration(delta)};"
        f" definitions in {summary['json']}"
    )
    if rows == 0:
        print(
            f"tve targets: warning: no {entity!r} row is a seed at any of the seed times;"
            " the file has no rows",
            file=sys.stderr,
        )


def add_targets_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``targets`` on an ``argparse`` subparsers object (``tve targets ...``)."""
    p = subparsers.add_parser(
        "targets",
        help="raw TVE task vectors of one entity table (targets.parquet + targets.json)",
        description="Compute the raw next-window task vectors (TVE targets) of an entity table.",
    )
    p.add_argument("dataset_dir", help="a RelBench 3 dataset folder")
    p.add_argument(
        "--entity",
        required=True,
        help="entity table (a table with a primary key that facts reference)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder for targets.parquet and targets.json (required unless --show-sql)",
    )
    p.add_argument(
        "--timedelta",
        default=None,
        help="next-window length, e.g. '30 days' (default: the database's task window)",
    )
    p.add_argument(
        "--second-hop-window",
        default=None,
        help="Δ2: a fact->key<-fact path's second hop reads the rows in (τ - Δ2, τ] of the"
        " first-hop row's time τ (default: the next window's length, as the reference)",
    )
    p.add_argument(
        "--timestamps",
        default=None,
        help="comma-separated seed times (default: the database's training seed times)",
    )
    p.add_argument(
        "--hops", type=int, choices=(1, 2), default=2, help="traversal depth (default 2)"
    )
    p.add_argument(
        "--no-fact-key-fact",
        dest="fact_key_fact",
        action="store_false",
        help="leave out fact->key<-fact paths (through a hub key they reach most of a fact table)",
    )
    p.add_argument(
        "--include-tables",
        default=None,
        help="comma-separated: only these tables (plus the entity)",
    )
    p.add_argument("--exclude-tables", default=None, help="comma-separated tables to leave out")
    p.add_argument(
        "--exclude-columns", default=None, help="comma-separated TABLE.COLUMN not to aggregate"
    )
    p.add_argument(
        "--columns",
        default=None,
        help="comma-separated TABLE.COLUMN: aggregate only these (row counts are always kept)",
    )
    p.add_argument(
        "--memory-limit",
        default=DEFAULT_MEMORY_LIMIT,
        help="memory budget such as 2GB, 4GiB or 50%%: DuckDB gets half as its limit and"
        f" spills to disk beyond it, the rest sizes the work in process (default"
        f" {DEFAULT_MEMORY_LIMIT})",
    )
    p.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: all cores)")
    p.add_argument(
        "--seeds-per-query",
        type=int,
        default=None,
        help="seed times per run of the query, 0 for all at once (default: "
        "tve_pipeline.targets.DEFAULT_SEEDS_PER_QUERY; bounds memory, overlaps writing)",
    )
    p.add_argument(
        "--show-sql",
        action="store_true",
        help="print a DuckDB script computing the same rows from the parquet files, and stop"
        " (run it with `duckdb < targets.sql`, e.g. on a machine with more memory)",
    )
    p.set_defaults(func=run_targets_command)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m tve_pipeline.targets_cli ...``: the subcommand on its own, with ``tve``'s
    usage and one-line errors (exit status 2), without importing the ``tve`` command."""
    from tve_pipeline.common import error_summary

    parser = argparse.ArgumentParser(prog="tve")
    add_targets_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["targets", *(sys.argv[1:] if argv is None else argv)])
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"tve: error: {error_summary(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
