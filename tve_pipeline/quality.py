"""What the pipeline's asset checks measure, without Dagster: one :class:`Verdict` each.

Each function looks at one stage's result from outside and says whether it holds, in
one line that names the place (database, partition, table, column or task) and by how
much it misses, with the numbers behind it as metadata:

- the database: :func:`validation_verdict`, the validation report of the dataset folder
  (:mod:`tve_pipeline.validation`) has no error;
- a window of task vectors: :func:`leakage_verdict`, a sample of rows recomputed from
  the next window's rows alone (:mod:`tve_pipeline.recompute`, independent of the SQL
  generator) agrees with the file, and the rows are the seeds at the seed time (the
  reference's "universal" table, :func:`tve_pipeline.recompute.existing_entities`);
  :func:`coverage_verdict`, the share of inactive rows, and no target null in every row
  (:func:`coverage_run_verdict`: over a run's windows, one verdict);
  :func:`seed_time_verdict`, every row's seed time is the window's and its window
  ``(t, t+Δ]`` ends by the validation timestamp (a validation window's: by the test
  timestamp);
- a pre-trained checkpoint: :func:`finite_weights_verdict`; :func:`pretraining_verdict`,
  its task-vector loss on the validation windows below that of the trivial predictor (the
  mean normalised task vector of the training seeds), both computed by pre-training's own
  loss;
- a fine-tuned cell: :func:`baseline_verdict`, its metric better than the task's trivial
  baseline's (:mod:`tve_pipeline.baselines`: the constant predictor best on val, the
  majority class or a training mean, median or zero), scored by RelBench's evaluator,
  judged on val (test reported beside it).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tve_pipeline import baselines
from tve_pipeline.evaluation import metric_direction
from tve_pipeline.recompute import (
    compare_task_vectors,
    existing_entities,
    first_fact_times,
    recompute_task_vectors,
)
from tve_pipeline.targets import COUNT_AGGREGATIONS, INACTIVE, TIMESTAMP
from tve_pipeline.traversal import TableSpecLike, TargetDef

#: Rows recomputed per entity table in one run of windows (three in four active, when there
#: are), in LEAKAGE_SAMPLE_WINDOWS of the run's windows (one: its last, the newest). The
#: recomputation costs ~0.5 s per window plus ~3 ms per row (rel-flights planes, 263
#: targets, loaded machine): 64 rows in every window cost 2-5x the targets themselves.
LEAKAGE_SAMPLE_ROWS = 64
LEAKAGE_SAMPLE_WINDOWS = 1
#: Windows of a run whose every target's null count the coverage check reads (the others:
#: the targets without a value in these only).
COVERAGE_SAMPLE_WINDOWS = 4
#: The brute-force recomputation of a fact->key<-fact path joins each first-hop row to every
#: row with its key (through a hub airport: millions per entity); past this many joined rows
#: the remaining sampled entities' values of such paths are not recomputed (metadata
#: ``values_not_recomputed``); every other path is recomputed for every sampled row.
LEAKAGE_MAX_JOINED_ROWS = 2_000_000


@dataclass
class Verdict:
    """A check's outcome: passed or not, one line saying so, the numbers behind it."""

    passed: bool
    description: str
    metadata: dict = field(default_factory=dict)


def _shown(items: Sequence, n: int = 3) -> str:
    items = list(items)
    return ", ".join(str(i) for i in items[:n]) + (
        f" and {len(items) - n} more" if len(items) > n else ""
    )


# --------------------------------------------------------------------------- the database


def validation_verdict(dataset_dir: str | Path, where: str) -> Verdict:
    """The validation report of the dataset folder as it is now: failed on any error."""
    from tve_pipeline.validation import validate_dataset

    report = validate_dataset(dataset_dir)
    metadata = {
        "errors": len(report.errors),
        "warnings": len(report.warnings),
        "report": "\n".join(f"- {line}" for line in report.lines()),
    }
    if report.errors:
        more = f" (and {len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
        return Verdict(False, f"{where}: validation error: {report.errors[0]}{more}", metadata)
    return Verdict(
        True, f"{where}: no validation error ({len(report.warnings)} warnings)", metadata
    )


# --------------------------------------------------------------------------- task vectors


def _sample_rows(rows: pd.DataFrame, key: str, size: int, seed_text: str) -> np.ndarray:
    """Up to ``size`` entity keys of a window's rows, three in four active when there are
    that many, drawn reproducibly (the seed is a hash of ``seed_text``)."""
    if len(rows) <= size:
        return rows[key].to_numpy()
    seed = int.from_bytes(hashlib.blake2b(seed_text.encode(), digest_size=8).digest(), "little")
    rng = np.random.default_rng(seed)
    active = rows.loc[rows[INACTIVE] == 0, key].to_numpy()
    inactive = rows.loc[rows[INACTIVE] != 0, key].to_numpy()
    n_active = min(len(active), max(size - len(inactive), (3 * size) // 4))
    n_inactive = min(len(inactive), size - n_active)
    return np.concatenate(
        [
            rng.choice(active, n_active, replace=False),
            rng.choice(inactive, n_inactive, replace=False),
        ]
    )


def _read_rows(path: Path, columns: Sequence[str], key: str | None = None, keys=None):
    """Some columns of a task-vector file, or every column of the rows whose ``key`` is in
    ``keys`` (filtered while reading: memory holds the sample, not the window)."""
    if keys is None:
        return pd.read_parquet(path, columns=list(columns))
    values = [k.item() if hasattr(k, "item") else k for k in keys]
    return pd.read_parquet(path, filters=[(key, "in", values)] if values else None)


def leakage_verdict(
    folder: Path,
    seed_time,
    frames: Mapping[str, pd.DataFrame],
    schema: Mapping[str, TableSpecLike],
    defs_by_entity: Mapping[str, Sequence[TargetDef]],
    delta: pd.Timedelta,
    where: str,
    *,
    sample_rows: int = LEAKAGE_SAMPLE_ROWS,
    second_hop_window: pd.Timedelta | None = None,
    first_times: dict | None = None,
) -> Verdict:
    """A window's task vectors against a recomputation from the rows in ``(t, t+Δ]`` only:
    the rows are the entities that exist at ``t``, and a sample of them has the recomputed
    value in every target (``inactive`` included), a later "in" hop reading the rows in
    ``(τ - Δ2, τ]`` of its hop-1 row's time τ (``second_hop_window``: Δ2, None for Δ).
    ``frames``: the tables, as :func:`tve_pipeline.recompute.read_tables` reads them;
    ``sample_rows`` 0 compares the seeds only; ``first_times``: a dict that keeps each
    entity table's first fact rows between calls (:func:`leakage_verdicts`)."""
    t = pd.Timestamp(seed_time)
    failures, checked, metadata, unchecked, compared = [], {}, {}, {}, {}
    for entity, defs in defs_by_entity.items():
        key = schema[entity].pkey
        path = Path(folder) / f"{entity}.parquet"
        if not path.exists():
            failures.append(f"{entity}: no file {path}")
            continue
        rows = _read_rows(path, [key, INACTIVE])
        first = None
        if schema[entity].time_col is None and defs and first_times is not None:
            if entity not in first_times:
                first_times[entity] = first_fact_times(frames, schema, defs)
            first = first_times[entity]
        expected = existing_entities(frames, schema, entity, t, defs=defs, delta=delta, first=first)
        have = np.sort(rows[key].to_numpy())
        if len(have) != len(expected) or not (have == expected).all():
            missing = np.setdiff1d(expected, have)
            extra = np.setdiff1d(have, expected)
            failures.append(
                f"{entity}: {len(have)} rows where {len(expected)} entities are seeds at {t}"
                + (f"; missing {key} {_shown(missing)}" if len(missing) else "")
                + (f"; not seeds: {key} {_shown(extra)}" if len(extra) else "")
            )
        if sample_rows <= 0:
            checked[entity], compared[entity] = 0, 0
            continue
        sample = _sample_rows(rows, key, sample_rows, f"{where}:{entity}")
        got = _read_rows(path, (), key, sample)
        want = recompute_task_vectors(
            frames,
            schema,
            defs,
            entity,
            sample,
            t,
            delta,
            max_joined_rows=LEAKAGE_MAX_JOINED_ROWS,
            second_hop_window=second_hop_window,
        )
        differences = compare_task_vectors(got, want, defs)
        checked[entity] = len(sample)
        compared[entity] = len(sample) * (len(defs) + 1) - len(want.unchecked)
        if want.unchecked:
            unchecked[entity] = len(want.unchecked)
        if differences:
            by_target: dict[str, list] = {}
            for d in differences:
                by_target.setdefault(d.target, []).append(d)
            worst = max(differences, key=lambda d: -1 if d.by is None else d.by)
            amount = f", by {worst.by:.6g}" if worst.by is not None else ""
            failures.append(
                f"{entity}: {len(differences)} values of {len(sample)} sampled rows differ from "
                f"the recomputation from ({t}, {t + delta}] in {len(by_target)} "
                f"target{'s' if len(by_target) > 1 else ''} "
                f"({_shown(list(by_target))}); e.g. {worst.target} of {key} {worst.entity}: "
                f"file {worst.got!r}, recomputed {worst.want!r}{amount}"
            )
            metadata[f"{entity}.differences"] = {
                name: len(items) for name, items in by_target.items()
            }
    metadata.update(
        {
            "sampled_rows": checked,
            "values_compared": compared,
            # fact->key<-fact values of sampled rows past LEAKAGE_MAX_JOINED_ROWS joined rows
            "values_not_recomputed": unchecked,
            "targets": {e: len(d) for e, d in defs_by_entity.items()},
            "next_window": f"({t}, {t + delta}]",
        }
    )
    if failures:
        return Verdict(False, f"{where}: " + "; ".join(failures), metadata)
    if not sum(checked.values()):
        return Verdict(True, f"{where}: the rows are the seeds at {t}", metadata)
    return Verdict(
        True,
        f"{where}: the rows are the seeds at {t}; {sum(checked.values())} sampled rows "
        f"({sum(compared.values())} values) equal their recomputation from ({t}, {t + delta}]",
        metadata,
    )


def sampled_windows(windows: Sequence[str], most: int = LEAKAGE_SAMPLE_WINDOWS) -> list[str]:
    """At most ``most`` of ``windows`` (in order): the first, the last, evenly between (one:
    the last)."""
    windows = sorted(windows)
    if len(windows) <= most:
        return windows
    if most == 1:  # the newest
        return windows[-1:]
    return [
        windows[i] for i in sorted(set(np.linspace(0, len(windows) - 1, most).round().astype(int)))
    ]


def leakage_verdicts(
    folders: Mapping[str, Path],
    seed_times: Mapping[str, object],
    frames: Mapping[str, pd.DataFrame],
    schema: Mapping[str, TableSpecLike],
    defs_by_entity: Mapping[str, Sequence[TargetDef]],
    delta: pd.Timedelta,
    where: str,
    *,
    sample_rows: int = LEAKAGE_SAMPLE_ROWS,
    sample_windows: int = LEAKAGE_SAMPLE_WINDOWS,
    second_hop_window: pd.Timedelta | None = None,
) -> dict[str, Verdict]:
    """:func:`leakage_verdict` of every window of one run (``folders``: window -> folder,
    ``seed_times``: window -> ``t``), sampled per run: every window's rows are compared with
    its seeds, and ``sample_rows`` rows per entity table, spread over
    :func:`sampled_windows`, are recomputed. The sample stands for the run: when its values
    differ from their recomputation, every window of the run fails, naming the sampled
    window and the difference. Each verdict carries the run's totals (``run_sampled_rows``,
    ``run_values_compared``, ``run_sampled_windows``)."""
    chosen = sampled_windows(list(folders), sample_windows)
    per_window = -(-sample_rows // len(chosen)) if chosen else 0
    first_times: dict = {}
    verdicts = {
        w: leakage_verdict(
            folders[w],
            seed_times[w],
            frames,
            schema,
            defs_by_entity,
            delta,
            f"{where} window {w}",
            sample_rows=per_window if w in chosen else 0,
            second_hop_window=second_hop_window,
            first_times=first_times,
        )
        for w in sorted(folders)
    }
    rows = sum(sum(v.metadata.get("sampled_rows", {}).values()) for v in verdicts.values())
    values = sum(sum(v.metadata.get("values_compared", {}).values()) for v in verdicts.values())
    run = (
        f"this run's sample: {rows} rows ({values} values) of {len(chosen)} of its "
        f"{len(folders)} windows ({_shown(chosen, 4)}) recomputed"
    )
    differing = [w for w in chosen if any(k.endswith(".differences") for k in verdicts[w].metadata)]
    for w, v in verdicts.items():
        v.metadata.update(
            {"run_sampled_rows": rows, "run_values_compared": values, "run_sampled_windows": chosen}
        )
        if differing and w not in differing:
            first = verdicts[differing[0]].description.split(": ", 1)[-1]
            v.passed = False
            v.description += f"; the run's sample in window {differing[0]} differs: {first}"
        v.description += f" ({run})"
    return verdicts


def joined_verdict(verdicts: Sequence[Verdict], where: str) -> Verdict:
    """One verdict of several about the same place (each description starting ``where: ``):
    passed when all passed; the failed ones' descriptions (all, when passed) after ``where``;
    their metadata together."""
    failed = [v for v in verdicts if not v.passed]
    shown = failed or list(verdicts)
    parts = [v.description.removeprefix(f"{where}: ") for v in shown]
    metadata: dict = {}
    for v in verdicts:
        metadata.update(v.metadata)
    return Verdict(not failed, f"{where}: " + "; ".join(parts), metadata)


def _null_counts(path: Path, columns: Sequence[str]) -> tuple[int, dict[str, int]]:
    """Rows of a parquet file and nulls per column, from the file's statistics where every
    row group has them (no value is read), otherwise from the column itself."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    names = meta.schema.names
    nulls, unread = {}, []
    for name in columns:
        if name not in names:
            continue
        at = names.index(name)
        stats = [meta.row_group(g).column(at).statistics for g in range(meta.num_row_groups)]
        if all(s is not None and s.has_null_count for s in stats):
            nulls[name] = sum(s.null_count for s in stats)
        else:
            unread.append(name)
    if unread:  # one read of every column without statistics (one read each: 100x slower)
        table = pq.read_table(path, columns=unread)
        nulls.update({name: int(table.column(name).null_count) for name in unread})
    return meta.num_rows, {name: nulls[name] for name in columns if name in nulls}


def _coverage_counts(
    folder: Path,
    defs_by_entity: Mapping[str, Sequence[TargetDef]],
    columns: Mapping[str, Sequence[str]] | None = None,
) -> dict:
    """Per entity table of a window: rows, inactive share, nulls per value target (those of
    ``columns`` only, when given: entity -> target names), the value targets without a
    column; None for a missing file."""
    counts = {}
    for entity, defs in defs_by_entity.items():
        path = Path(folder) / f"{entity}.parquet"
        if not path.exists():
            counts[entity] = None
            continue
        names = [d.name for d in defs if d.aggregation not in COUNT_AGGREGATIONS]
        wanted = names if columns is None else list(columns.get(entity, ()))
        n, nulls = _null_counts(path, wanted)
        inactive = pd.read_parquet(path, columns=[INACTIVE])[INACTIVE]
        counts[entity] = {
            "rows": n,
            "inactive_share": float(inactive.mean()) if n else None,
            "nulls": nulls,
            "missing": [name for name in wanted if name not in nulls],
        }
    return counts


def coverage_verdict(
    folder: Path,
    defs_by_entity: Mapping[str, Sequence[TargetDef]],
    where: str,
    *,
    counts: dict | None = None,
    valued_elsewhere: Mapping[str, Mapping[str, int]] | None = None,
) -> Verdict:
    """The share of inactive rows of a window (metadata), failed when a target is null in
    every row of the window (an empty window has no row to judge) and, given
    ``valued_elsewhere`` (entity -> target -> other windows of the run where it has a
    value), in every row of the run's other windows too: a sparse path leaves a target
    empty in most windows, and that is the data, not a fault (rel-flights: the one flight
    of 2013 from a New York airport to another, EWR->LGA, is the only row that
    ``flights>airports[origin_id]<flights[dest_id]`` reaches). ``counts``: the window's
    :func:`_coverage_counts` (default: every target's, read here)."""
    counts = _coverage_counts(folder, defs_by_entity) if counts is None else counts
    inactive_share, empty, sparse, rows_by_entity, failures = {}, {}, {}, {}, []
    for entity, defs in defs_by_entity.items():
        c = counts.get(entity)
        if c is None:
            failures.append(f"{entity}: no file {Path(folder) / f'{entity}.parquet'}")
            continue
        n = rows_by_entity[entity] = c["rows"]
        inactive_share[entity] = c["inactive_share"]
        if c["missing"]:
            failures.append(f"{entity}: no column {_shown(c['missing'])}")
        all_null = [name for name, k in c["nulls"].items() if n and k == n]
        elsewhere = (valued_elsewhere or {}).get(entity, {})
        if any(elsewhere.get(x) for x in all_null):
            sparse[entity] = {x: elsewhere[x] for x in all_null if elsewhere.get(x)}
        all_null = [x for x in all_null if not elsewhere.get(x)]
        if all_null:
            empty[entity] = all_null
            failures.append(
                f"{entity}: {len(all_null)} of {len(defs)} targets null in all {n} rows "
                + ("of every window of the run " if valued_elsewhere is not None else "")
                + f"({_shown(all_null)}; inactive share {inactive_share[entity]:.2f})"
            )
    metadata = {
        "inactive_share": inactive_share,
        "rows": rows_by_entity,
        "all_null_targets": empty,
        # null in every row here, with values in this many other windows of the run
        "empty_here_valued_elsewhere": sparse,
        # null counts read here (one per value target whose column was read)
        "values_compared": sum(len(c["nulls"]) for c in counts.values() if c is not None),
    }
    if failures:
        return Verdict(False, f"{where}: " + "; ".join(failures), metadata)
    shares = ", ".join(
        f"{e} {s:.2f}" if s is not None else f"{e} (no rows)" for e, s in inactive_share.items()
    )
    note = ""
    if sparse:
        k = sum(len(v) for v in sparse.values())
        note = (
            f"; {k} target{'s' if k > 1 else ''} without a value here "
            f"{'have' if k > 1 else 'has'} values in other windows of the run "
            f"({_shown([x for v in sparse.values() for x in v], 2)})"
        )
    return Verdict(
        True, f"{where}: no target without a value; inactive share {shares}{note}", metadata
    )


def coverage_verdicts(
    folders: Mapping[str, Path],
    defs_by_entity: Mapping[str, Sequence[TargetDef]],
    where: str,
    *,
    sample_windows: int = COVERAGE_SAMPLE_WINDOWS,
) -> dict[str, Verdict]:
    """:func:`coverage_verdict` of every window of one run, judged over the run and read per
    run: every window's inactive share; every target's null count in
    :func:`sampled_windows`, then, for the targets that have no value there, in every other
    window until one has a value. A target fails the windows that were read only when no
    window of the run gives it a value. Reading every column of every window (the files keep
    no statistics of targets) cost as much as the targets themselves."""
    order = sorted(folders)
    chosen = set(sampled_windows(order, sample_windows))
    counts = {w: _coverage_counts(folders[w], defs_by_entity) for w in sorted(chosen)}
    valued: dict[str, dict[str, int]] = {}  # entity -> target -> windows read with a value

    def tally(by_entity: dict) -> None:
        for entity, c in by_entity.items():
            for name, k in (c or {"nulls": {}})["nulls"].items():
                entity_valued = valued.setdefault(entity, {})
                entity_valued[name] = entity_valued.get(name, 0) + int(k < c["rows"])

    for by_entity in counts.values():
        tally(by_entity)
    for w in order:
        if w in chosen:
            continue
        unvalued = {e: [x for x, k in v.items() if not k] for e, v in valued.items()}
        counts[w] = _coverage_counts(folders[w], defs_by_entity, unvalued)
        tally(counts[w])
    read = sum(len(c["nulls"]) for by_entity in counts.values() for c in by_entity.values() if c)
    run = (
        f"this run: null counts of every target in {len(chosen)} of its {len(order)} windows "
        f"({_shown(sorted(chosen), 4)}), of the targets without a value there in the others; "
        f"{read} null counts read"
    )
    verdicts = {}
    for w in order:
        v = coverage_verdict(
            folders[w],
            defs_by_entity,
            f"{where} window {w}",
            counts=counts[w],
            valued_elsewhere=valued,  # a target null here counts the other windows only
        )
        v.metadata.update({"run_values_compared": read, "run_windows_read": sorted(chosen)})
        v.description += f" ({run})"
        verdicts[w] = v
    return verdicts


def coverage_run_verdict(
    folders: Mapping[str, Path],
    defs_by_entity: Mapping[str, Sequence[TargetDef]],
    where: str,
    *,
    sample_windows: int = COVERAGE_SAMPLE_WINDOWS,
) -> Verdict:
    """:func:`coverage_verdicts` of one run's windows as one verdict for the run (the
    ``coverage`` check records one evaluation per run: its judgement is the run's, and each
    evaluation Dagster records costs a few synced SQLite writes): failed when a window
    fails (a target without a value in every window of the run, a missing file or column),
    with the first failing window's line and how many fail; metadata: every window's
    inactive share and rows, the targets empty in every window, null counts read."""
    order = sorted(folders)
    if not order:
        return Verdict(True, f"{where}: no window in this run", {"windows": 0})
    verdicts = coverage_verdicts(folders, defs_by_entity, where, sample_windows=sample_windows)
    failed = [w for w in order if not verdicts[w].passed]
    last = verdicts[order[-1]]
    metadata = {
        "windows": len(order),
        "inactive_share": {w: verdicts[w].metadata["inactive_share"] for w in order},
        "rows": {w: verdicts[w].metadata["rows"] for w in order},
        "all_null_targets": verdicts[(failed or order)[0]].metadata["all_null_targets"],
        "run_values_compared": last.metadata["run_values_compared"],
        "run_windows_read": last.metadata["run_windows_read"],
    }
    span = f"{where}, {len(order)} windows ({' .. '.join(dict.fromkeys([order[0], order[-1]]))})"
    if failed:
        line = verdicts[failed[0]].description
        return Verdict(
            False, f"{span}: {len(failed)} fail ({_shown(failed, 2)}); first: {line}", metadata
        )
    shares = [
        s for w in order for s in verdicts[w].metadata["inactive_share"].values() if s is not None
    ]
    share = f"; inactive share {min(shares):.2f} to {max(shares):.2f}" if shares else ""
    return Verdict(
        True,
        f"{span}: no target without a value in every window{share} "
        f"({metadata['run_values_compared']} null counts read)",
        metadata,
    )


def seed_time_verdict(
    folder: Path,
    seed_time,
    entities: Sequence[str],
    delta: pd.Timedelta,
    val_timestamp,
    where: str,
    test_timestamp=None,
) -> Verdict:
    """Every row of the window is at the window's seed time ``t``, and ``t + Δ`` (the end of
    the window its task vector reads) is no later than the validation timestamp; for a
    validation window (``t`` at or after the validation timestamp, given
    ``test_timestamp``), no later than the test timestamp: no task vector reads a row of
    the test period."""
    t, val = pd.Timestamp(seed_time), pd.Timestamp(val_timestamp)
    validation = test_timestamp is not None and t >= val
    bound = pd.Timestamp(test_timestamp) if validation else val
    name = "test timestamp" if validation else "validation timestamp"
    failures, latest, compared = [], {}, 0
    for entity in entities:
        path = Path(folder) / f"{entity}.parquet"
        if not path.exists():
            failures.append(f"{entity}: no file {path}")
            continue
        times = pd.to_datetime(pd.read_parquet(path, columns=[TIMESTAMP])[TIMESTAMP])
        compared += len(times)
        if not len(times):
            continue
        last = times.max()
        latest[entity] = str(last)
        other = times[times != t]
        if len(other):
            failures.append(
                f"{entity}: {len(other)} of {len(times)} rows at seed times other than the "
                f"window's {t} ({_shown(sorted(set(map(str, other))))})"
            )
        if last + delta > bound:
            failures.append(
                f"{entity}: seed time {last} + Δ {delta} = {last + delta} is past the "
                f"{name} {bound} by {last + delta - bound}"
            )
    if t + delta > bound and not failures:
        failures.append(
            f"window seed time {t} + Δ {delta} is past the {name} {bound} by {t + delta - bound}"
        )
    metadata = {
        "seed_time": str(t),
        "split": "val" if validation else "train",
        "window_end": str(t + delta),
        "val_timestamp": str(val),
        "test_timestamp": str(test_timestamp) if test_timestamp is not None else None,
        "latest_seed_time": latest,
        "rows_compared": compared,  # every row's seed time
    }
    if failures:
        return Verdict(False, f"{where}: " + "; ".join(failures), metadata)
    return Verdict(
        True,
        f"{where}: {'validation ' if validation else ''}window ({t}, {t + delta}] ends by "
        f"the {name} {bound} ({bound - (t + delta)} before it)",
        metadata,
    )


# --------------------------------------------------------------------------- pre-training


def finite_weights_verdict(checkpoint: Mapping, where: str) -> Verdict:
    """Every tensor of every entity table's backbone and head is finite."""
    import torch

    failures, counted = [], {}
    for entity, result in checkpoint.get("by_entity", {}).items():
        n = 0
        for part in ("backbone", "head"):
            for name, tensor in result.get(part, {}).items():
                if not torch.is_tensor(tensor) or not tensor.is_floating_point():
                    continue
                n += tensor.numel()
                bad = int((~torch.isfinite(tensor)).sum())
                if bad:
                    failures.append(
                        f"{entity}: {bad} of {tensor.numel()} values of {part} tensor {name} "
                        "are not finite (NaN or inf)"
                    )
        counted[entity] = n
    metadata = {"values": counted}
    if not counted:
        return Verdict(False, f"{where}: the checkpoint has no entity table", metadata)
    if failures:
        return Verdict(False, f"{where}: " + "; ".join(failures), metadata)
    return Verdict(True, f"{where}: all {sum(counted.values())} weights finite", metadata)


class _MeanPredictor:
    """The trivial predictor of pre-training: every seed's task vector is the mean one."""

    def __init__(self, mean):
        self.mean = mean

    def head(self, z):
        return self.mean.to(z.device).expand(z.shape[0], -1)


def _mean_task_vector(seeds, chunk: int = 65_536):
    import torch

    total = torch.zeros(seeds.width, dtype=torch.float64)
    for start in range(0, len(seeds), chunk):
        total += seeds.task_vectors(slice(start, start + chunk)).double().sum(0)
    return (total / max(len(seeds), 1)).float()


def trivial_validation_loss(seeds, recipe, entity_table: str) -> float | None:
    """The validation windows' task-vector loss of the mean normalised task vector of the
    training seeds, computed as pre-training computes its validation loss: the objective's
    TVE loss (:meth:`~tve_pipeline.objectives.PretrainingLoss.task_vector_loss`) per batch
    of ``batch_size`` validation seeds, averaged weighted by batch size. None without
    validation seeds. ``seeds``: :func:`tve_pipeline.task_vectors.pretraining_task_vectors`."""
    import torch

    from tve_pipeline.objectives import PretrainingLoss

    val = seeds.val
    if not len(val):
        return None
    loss = PretrainingLoss(
        "tve", _MeanPredictor(_mean_task_vector(seeds.train)), {}, entity_table, recipe.pretrain
    )
    total, count = 0.0, 0
    size = recipe.pretrain.batch_size
    for start in range(0, len(val), size):
        vectors = val.task_vectors(slice(start, start + size))
        n = len(vectors)
        total += loss.task_vector_loss(torch.zeros(n, 1), vectors).item() * n
        count += n
    return total / count


def model_validation_loss(
    graph, entity_table: str, result: Mapping, seeds, recipe, device
) -> float | None:
    """The validation windows' task-vector loss of a pre-trained backbone and head
    (``result``, one entity table's entry of a checkpoint), TVE's part only, by
    pre-training's own validation loss (clean inputs): for the objective ``tve`` it is the
    recorded ``best_val_loss``; beside an auxiliary loss (``tve+mae``) the part that the
    trivial predictor is comparable with."""
    import torch

    from tve_pipeline.graph import seed_tensors
    from tve_pipeline.model import RDLModel
    from tve_pipeline.objectives import PretrainingLoss
    from tve_pipeline.sampling import sampler_for
    from tve_pipeline.training import _validation_loss

    val = seeds.val
    if not len(val):
        return None
    data, col_stats = graph
    model = RDLModel(data, col_stats, recipe.backbone, out_channels=seeds.normaliser.width)
    model.load_state_dict(
        {**result["backbone"], **{f"head.{k}": v for k, v in result["head"].items()}}
    )
    model.to(device)
    loss = PretrainingLoss("tve", model, torch.nn.ModuleDict(), entity_table, recipe.pretrain)
    nodes, times = seed_tensors(val.entity, val.seed_time)
    return _validation_loss(
        loss,
        model,
        sampler_for(data, recipe.backbone),
        entity_table,
        (nodes, times, val),
        recipe.pretrain.batch_size,
        recipe.seed,
        device,
    )


def pretraining_verdict(
    losses: Mapping[str, tuple[float | None, float | None]], where: str
) -> Verdict:
    """Each entity table's validation loss ``(model, trivial)``: the model's must be lower."""
    failures, notes = [], []
    for entity, (model, trivial) in losses.items():
        if model is None or trivial is None:
            notes.append(f"{entity}: no validation seeds to compare on")
        elif not (math.isfinite(model) and model < trivial):
            failures.append(
                f"{entity}: validation task-vector loss {model:.6g} is not below the trivial "
                f"predictor's {trivial:.6g} (the mean normalised task vector), by "
                f"{model - trivial:.6g}"
            )
    metadata = {
        "model_loss": {e: m for e, (m, _) in losses.items()},
        "trivial_loss": {e: t for e, (_, t) in losses.items()},
    }
    if failures:
        return Verdict(False, f"{where}: " + "; ".join(failures), metadata)
    shown = "; ".join(
        f"{e}: {m:.4g} < {t:.4g}" for e, (m, t) in losses.items() if m is not None and t is not None
    )
    return Verdict(
        True,
        f"{where}: validation loss below the trivial predictor's"
        + (f" ({shown})" if shown else "")
        + ("; " + "; ".join(notes) if notes else ""),
        metadata,
    )


# --------------------------------------------------------------------------- fine-tuning


def baseline_verdict(
    model_scores: Mapping[str, Mapping[str, float]],
    trivial: pd.DataFrame,
    metric: str,
    where: str,
    label_medians: Mapping[str, float] | None = None,
) -> Verdict:
    """The model beats the task's trivial baseline on its first metric on val, the split
    the protocol chooses on; test is reported beside it, not judged.

    ``trivial``: the task's rows of :func:`tve_pipeline.baselines.trivial_baseline` (the
    constant predictor best on val, scored on val and test); ``label_medians`` (regression):
    the labels' median per split, named in the description when the model loses on either
    split. Why test is not judged: a test window whose labels moved away from training's
    lets a constant that happens to lie on the shifted side win there (the demo's
    plane-delay: label median -2.0 in training, -4.2 on val, +9.0 on test; models fitted
    to the training labels by L1 beat the baseline on val and lose on test, 2 of the demo's
    4 cells, bench/bench_regression_baseline.py). A check that warned on it would warn on
    the data, not on the model; ``results`` shows the test comparison per task.
    """
    direction = metric_direction(metric)
    rows = trivial[trivial["metric"] == metric].set_index("split")
    scores = {s: float(rows.loc[s, "trivial"]) for s in ("val", "test") if s in rows.index}
    what = str(rows["trivial_predictor"].iloc[0]).replace("_", " ") if len(rows) else "none"
    failures, shown, notes = [], [], []
    for split in ("val", "test"):
        model, base = model_scores.get(split, {}).get(metric), scores.get(split)
        if model is None or base is None:
            missing = "metrics" if model is None else "trivial baseline"
            (failures if split == "val" else notes).append(f"{split}: no {metric} in the {missing}")
            continue
        shown.append(f"{split} {metric} {model:.4g} vs {base:.4g}")
        if not baselines.beats(model, base, direction):
            (failures if split == "val" else notes).append(
                f"{split} {metric} {model:.4g} is not better than the trivial baseline's "
                f"{base:.4g} ({what}) by {abs(model - base):.4g} ({direction} is better)"
            )
    metadata = {
        "metric": metric,
        "direction": direction,
        "judged_on": "val",
        "model": {s: model_scores.get(s, {}).get(metric) for s in ("val", "test")},
        "trivial": scores,
        "trivial_prediction": what,
        "values_compared": len(shown),
    }
    if label_medians:
        metadata["label_median"] = dict(label_medians)
    why = ""
    if (failures or notes) and label_medians and len(label_medians) > 1:
        why = (
            " (labels' median: " + ", ".join(f"{s} {v:.4g}" for s, v in label_medians.items()) + ")"
        )
    if failures:
        return Verdict(False, f"{where}: " + "; ".join(failures + notes) + why, metadata)
    if notes:
        return Verdict(
            True,
            f"{where}: beats the trivial baseline on val ({shown[0]}); not judged on test: "
            + "; ".join(notes)
            + why,
            metadata,
        )
    return Verdict(True, f"{where}: beats the trivial baseline ({'; '.join(shown)})", metadata)
