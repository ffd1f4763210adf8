"""The lookups of a fact->key<-fact path over one scan of ``F'``, in process.

A bucket (a run of whole keys) holds the rows of ``F'`` and the first-hop (key, time τ)
lookups sorted by (key, time, lookup), so that each lookup's window ``(τ - Δ2, τ]`` is a
range ``[lo, hi)`` of its key's rows (:func:`_window_starts`). Over it, counts are
differences of prefix counts, sums, min and max come from a bottom-up segment tree
(:func:`_window_reduce`) and ``std``'s squared distances from one that combines them as
Chan et al. (:func:`_window_m2`); the count of each value, from a prefix count per value
when there are few, else from runs of (key, value) (:func:`_window_value_counts`).
:func:`_lookups_of_bucket` makes a bucket's rows of ``at_<j>`` and ``reach_<j>_<k>`` from
them, with special values (NaN, infinities) as DuckDB's aggregates over the rows give them.
"""

from __future__ import annotations

import numpy as np

from tve_pipeline.targets.plan import _NativeLookups


def _window_starts(segment, facts, looks, time, window_ns: int) -> np.ndarray:
    """Of each lookup (positions ``looks``, time τ), the number of rows of ``F'`` (positions
    ``facts``) before its window: rows of earlier keys (``segment``: the key's number) and
    of its key with time <= τ - Δ2. The times are ranked among the bucket's (a row: 1 + the
    times before it; a bound: the times at or before it, so that a row is within a bound
    exactly when its rank is) so that (key, rank) is one int64, in the facts' order, that
    ``searchsorted`` reads (key x time in nanoseconds would overflow)."""
    fact_time = time[facts]
    ordered = np.sort(fact_time)  # (np.unique: 3x the time, for nothing)
    width = len(ordered) + 1
    code = segment[facts] * width + np.searchsorted(ordered, fact_time) + 1
    bound = time[looks] - window_ns
    query = segment[looks] * width + np.searchsorted(ordered, bound, "right")
    return np.searchsorted(code, query, "right")


def _scan_time_ns(column) -> np.ndarray:
    """The scan's times as int64 nanoseconds (a timestamp, with or without a time zone, or a
    date); anything else cannot bound a window of Δ2."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if not (pa.types.is_timestamp(kind) or pa.types.is_date(kind)):
        raise ValueError(f"a fact->key<-fact lookup needs timestamps, got time column type {kind}")
    if pa.types.is_timestamp(kind) and kind.tz is not None:
        column = pc.cast(column, pa.timestamp(kind.unit))
    ns = pc.cast(pc.cast(column, pa.timestamp("ns")), pa.int64())
    return pc.fill_null(ns, np.iinfo(np.int64).min).to_numpy(zero_copy_only=False)


def _window_reduce(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, ufunc, identity):
    """``ufunc`` (add, minimum, maximum) over the rows ``[lo, hi)`` of ``values`` (rows x
    columns) for each window, exactly as a reduction of those rows, without a pass over
    each window's rows: a bottom-up segment tree built one level at a time (only the
    current level is kept, so memory stays that of ``values``). At each level, a window
    whose start is odd takes that node and one whose end is odd the node before it; both
    then halve, and a window is done when its bounds meet. A window of w rows reads at
    most 2 log2(w) nodes; sums are pairwise (error of order log(w) eps of its absolute
    sum, where a difference of prefix sums loses the key's whole history's magnitude)."""
    out = np.full((len(lo), values.shape[1]), identity, dtype=values.dtype)
    idx = np.flatnonzero(lo < hi)
    lo, hi, level = lo[idx], hi[idx], values
    while len(idx):
        take = (lo & 1).astype(bool)
        out[idx[take]] = ufunc(out[idx[take]], level[lo[take]])
        lo = lo + take
        take = (hi & 1).astype(bool) & (lo < hi)
        hi = hi - take
        out[idx[take]] = ufunc(out[idx[take]], level[hi[take]])
        lo, hi = lo >> 1, hi >> 1
        more = lo < hi
        idx, lo, hi = idx[more], lo[more], hi[more]
        if len(idx):
            if len(level) % 2:
                pad = np.full((1, level.shape[1]), identity, dtype=level.dtype)
                level = np.concatenate([level, pad])
            level = ufunc(level[0::2], level[1::2])
    return out


def _window_m2(x: np.ndarray, ok: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Of the values ``x[ok]`` in each ``[lo, hi)``, the sum of squared distances from their
    mean, by the segment tree of :func:`_window_reduce` with (count, sum, m2) per node and
    Chan et al.'s combination (m2 = m2a + m2b + (mean b - mean a)^2 na nb / n): no sum of
    squares about another mean, so the window's own spread keeps its digits."""
    count, total = ok.astype(np.float64), np.where(ok, x, 0.0)
    level = (count, total, np.zeros(len(x)))

    def combine(a, b):
        (na, sa, ma), (nb, sb, mb) = a, b
        n = na + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = np.where(
                (na > 0) & (nb > 0), sb / np.maximum(nb, 1) - sa / np.maximum(na, 1), 0
            )
            return n, sa + sb, ma + mb + delta * delta * na * nb / np.maximum(n, 1)

    out = (np.zeros(len(lo)), np.zeros(len(lo)), np.zeros(len(lo)))
    idx = np.flatnonzero(lo < hi)
    lo, hi = lo[idx], hi[idx]

    def take(at, where):
        part = combine(tuple(o[idx[where]] for o in out), tuple(v[at] for v in level))
        for o, v in zip(out, part):
            o[idx[where]] = v

    while len(idx):
        left = (lo & 1).astype(bool)
        take(lo[left], left)
        lo = lo + left
        right = (hi & 1).astype(bool) & (lo < hi)
        hi = hi - right
        take(hi[right], right)
        lo, hi = lo >> 1, hi >> 1
        more = lo < hi
        idx, lo, hi = idx[more], lo[more], hi[more]
        if len(idx):
            if len(level[0]) % 2:
                level = tuple(np.append(v, 0.0) for v in level)
            level = combine(tuple(v[0::2] for v in level), tuple(v[1::2] for v in level))
    return out[2]


def _window_counts(mask: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """How many of ``mask`` are set in each ``[lo, hi)``: a difference of prefix counts."""
    prefix = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    return prefix[hi] - prefix[lo]


def _lookups_of_bucket(table, spec: _NativeLookups, sizes: list[int]):
    """The ``at`` rows and ``reach`` rows per value column of a run of whole keys (a
    "bucket"), as Arrow tables.

    ``table``: rows of ``F'`` and lookups sorted by (key, time, lookup), so the rows of
    ``F'`` before a lookup in its key's segment are those with time <= τ; its window
    ``(τ - Δ2, τ]`` is the range ``[lo, hi)`` of the rows of ``F'`` in that order
    (:func:`_bucket_windows`). Over each window: the statistics of the running columns
    (:func:`_window_statistics`), then per value column the mode and distinct count
    (:func:`_value_lookups`). ``reach``: the count of each value for each lookup of a pair
    with several. Cost: the lookups x the distinct values of their key.
    """
    import pyarrow as pa

    key = table.column(0).combine_chunks()
    segment, facts, looks, lo, hi = _bucket_windows(table, key, spec.window_ns)
    take = pa.array(looks)
    at = {"tve.key": key.take(take), "tve.time": table.column(1).take(take), "tve.rows": hi - lo}
    at |= _window_statistics(table, facts, lo, hi, spec.pairs)
    reach = []
    several = table.column(3).to_numpy(zero_copy_only=False).astype(bool)[looks]
    fact_segment, look_segment = segment[facts], segment[looks]
    for k, size in enumerate(sizes, 1):
        rank = table.column(f"tve.rank_{k}").combine_chunks().take(pa.array(facts))
        counts = _window_value_counts(
            _rank_codes(rank), fact_segment, look_segment, lo, hi, size, len(facts)
        )
        columns, rows = _value_lookups(counts, k, size, key, table.column(1), looks, several)
        at |= columns
        reach.append(rows)
    return pa.table(at), reach


def _bucket_windows(table, key, window_ns: int):
    """Of a bucket sorted by (key, time, lookup): each row's key number (``segment``), the
    positions of the rows of ``F'`` (``facts``) and of the lookups whose window holds any
    (``looks``), and each such lookup's window ``[lo, hi)`` among the rows of ``F'``: ``hi``
    the rows of ``F'`` up to it (its key's with time <= τ), ``lo`` those before τ - Δ2
    (:func:`_window_starts`)."""
    import pyarrow.compute as pc

    n = table.num_rows
    starts = np.ones(n, dtype=bool)
    if n > 1:
        same = pc.equal(key.slice(1), key.slice(0, n - 1))
        starts[1:] = ~pc.fill_null(same, False).to_numpy(zero_copy_only=False)
    segment = np.cumsum(starts) - 1
    lookup = table.column(2).to_numpy(zero_copy_only=False).astype(bool)
    facts = np.flatnonzero(~lookup)
    looks = np.flatnonzero(lookup)
    hi = np.cumsum(~lookup)[looks]  # rows of F' up to each lookup: its key's time <= τ
    lo = _window_starts(segment, facts, looks, _scan_time_ns(table.column(1)), window_ns)
    reached = hi > lo
    return segment, facts, looks[reached], lo[reached], hi[reached]


def _fact_values(table, name: str, facts: np.ndarray):
    """A running column of the rows of ``F'``: (values, valid), or (None, whether non-null)
    for a column that is only counted (read as "IS NOT NULL")."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = table.column(name).combine_chunks().take(pa.array(facts))
    if pa.types.is_boolean(values.type):  # "IS NOT NULL" of a column only counted
        return None, pc.fill_null(values, False).to_numpy(zero_copy_only=False)
    return values.to_numpy(zero_copy_only=False), values.is_valid().to_numpy(zero_copy_only=False)


def _window_statistics(table, facts: np.ndarray, lo: np.ndarray, hi: np.ndarray, pairs):
    """Each statistic of ``pairs`` ((column number, stat, output name)) over each window
    ``[lo, hi)`` of the rows of ``F'`` (``facts``), by output name.

    Counts (non-null values, NaN and infinities) are differences of prefix counts, exact;
    sums (of the finite values, and ``std``'s ``m2``, the squared distances from the
    window's mean, by :func:`_window_m2`) and min and max (of the values that are not NaN)
    come from :func:`_window_reduce`. Special values are applied as DuckDB's aggregates
    over the rows do: a sum is +inf / -inf when one is reached, NaN with both or a NaN; NaN
    is the max once reached and the min when every value reached is NaN.
    """
    import pyarrow as pa

    at = {}
    summed: dict[str, np.ndarray] = {}  # output name -> values to sum (before special values)
    lowest: dict[str, np.ndarray] = {}
    highest: dict[str, np.ndarray] = {}
    masks = {}  # output name -> (null, NaN) of a min or max
    for i in dict.fromkeys(number for number, _, _ in pairs):
        x, valid = _fact_values(table, f"tve.v_{i}", facts)
        stats = {s: out for number, s, out in pairs if number == i}
        if "n" in stats:
            at[stats["n"]] = _window_counts(valid, lo, hi)
        if "s" in stats:
            summed[stats["s"]] = np.where(valid, x, 0.0)
        if "m2" in stats:  # NaN when an infinity or NaN is in the window, as stddev_samp
            finite = valid & np.isfinite(x)
            m2 = _window_m2(np.where(finite, x, 0.0).astype(np.float64), finite, lo, hi)
            m2[_window_counts(valid & ~finite, lo, hi) > 0] = np.nan
            at[stats["m2"]] = m2
        if "min" in stats or "max" in stats:  # NaN as DuckDB orders it: above every value
            nan = valid & np.isnan(x)
            ok = valid & ~nan
            none = _window_counts(ok, lo, hi) == 0
            nans = _window_counts(nan, lo, hi) > 0
            if "min" in stats:
                lowest[stats["min"]] = np.where(ok, x, np.inf)
                masks[stats["min"]] = (none & ~nans, nans & none)  # NaN only when all are
            if "max" in stats:
                highest[stats["max"]] = np.where(ok, x, -np.inf)
                masks[stats["max"]] = (none & ~nans, nans)  # NaN once one is reached
    special = _special_sums(summed, lo, hi)
    for columns, ufunc, identity in (
        (summed, np.add, 0.0),
        (lowest, np.minimum, np.inf),
        (highest, np.maximum, -np.inf),
    ):
        if not columns:
            continue
        names = list(columns)
        stacked = np.column_stack([columns[name].astype(np.float64) for name in names])
        reduced = _window_reduce(stacked, lo, hi, ufunc, identity)
        del stacked
        for c, name in enumerate(names):
            values = reduced[:, c]
            if name in special:
                up, down, nan = special[name]
                values = np.where(up, np.inf, np.where(down, -np.inf, values))
                values[nan] = np.nan
            if name in masks:
                null, nan = masks[name]
                values = pa.array(np.where(nan, np.nan, values), mask=null)
            at[name] = values
    return at


def _special_sums(summed: dict[str, np.ndarray], lo: np.ndarray, hi: np.ndarray) -> dict:
    """Of the columns to sum with an infinity or NaN: per window, whether it reaches +inf,
    -inf, and NaN (a NaN, or both infinities): what DuckDB's sum gives there. Those
    values are replaced by 0 in ``summed``, so that the tree sums the finite ones."""
    special = {}
    for name, y in summed.items():
        finite = np.isfinite(y)
        if not finite.all():
            up, down, nan = (
                _window_counts(kind, lo, hi) > 0
                for kind in (y == np.inf, y == -np.inf, np.isnan(y))
            )
            special[name] = (up, down, nan | (up & down))
            summed[name] = np.where(finite, y, 0.0)
    return special


def _rank_codes(rank) -> np.ndarray:
    """A value column's dense ranks as int64 codes, 0 for null."""
    import pyarrow.compute as pc

    return pc.fill_null(rank, 0).to_numpy().astype(np.int64)


def _value_lookups(counts, k: int, size: int, key, time, looks: np.ndarray, several: np.ndarray):
    """From a value column's counts per (lookup, value) (:func:`_window_value_counts`): its
    ``at`` columns, the mode as a rank (the largest count x size + size - rank: most rows,
    then smallest value) and the distinct count (null where the window has no value), and
    its ``reach`` rows, the counts of the lookups of a pair with several."""
    import pyarrow as pa

    which, value, count = counts
    distinct = np.bincount(which, minlength=len(looks)).astype(np.int64)
    best = np.zeros(len(looks), dtype=np.int64)
    if len(which):
        first = np.flatnonzero(np.r_[True, which[1:] != which[:-1]])
        best[which[first]] = np.maximum.reduceat(count * size + size - value, first)
    columns = {
        f"tve.rank_{k}": pa.array(size - best % size if size else best, mask=best <= 0),
        f"tve.distinct_{k}": pa.array(distinct, mask=distinct <= 0),
    }
    keep = several[which]
    rows = pa.array(looks[which[keep]])
    reach = pa.table(
        {
            "tve.key": key.take(rows),
            "tve.time": time.take(rows),
            "rank": value[keep],
            "n": count[keep],
        }
    )
    return columns, reach


#: Up to this many values, a value column's counts per window come from one prefix count
#: per value (a (rows x values) int32 array: 2M rows x 16 values = 136 MB at most).
_DENSE_VALUES = 16


def _window_value_counts(rank, fact_segment, look_segment, lo, hi, size: int, nf: int):
    """For each lookup (key number ``look_segment``, window ``[lo, hi)`` of the rows of
    ``F'``) and each value of its key (``rank`` per row of ``F'``, 0 for null; keys
    ``fact_segment``), the rows of that value in the window, where there are any: (lookup,
    rank, count), by lookup then rank.

    Few values (``_DENSE_VALUES``): a prefix count per value, differenced at each window's
    bounds (lookups x values). Otherwise each lookup meets each value of its key: the rows
    with a value sorted by (key, value) then position (runs), and the run's positions in
    ``[lo, hi)`` counted by two ``searchsorted`` (lookups x the values of their key)."""
    if 0 < size <= _DENSE_VALUES:
        one_hot = np.zeros((len(rank) + 1, size + 1), dtype=np.int32)
        one_hot[np.arange(1, len(rank) + 1), rank] = 1
        prefix = np.cumsum(one_hot, axis=0, out=one_hot)[:, 1:]
        which, value = np.nonzero(prefix[hi] - prefix[lo])
        count = (prefix[hi[which], value] - prefix[lo[which], value]).astype(np.int64)
        return which, value.astype(np.int64) + 1, count
    has = np.flatnonzero(rank > 0)  # rows of F' with a value (positions among facts)
    ids = fact_segment[has] * (size + 1) + rank[has]
    order = np.argsort(ids, kind="stable")  # by (key, value), then position
    ids_sorted = ids[order]
    first = np.r_[True, ids_sorted[1:] != ids_sorted[:-1]] if len(ids) else np.ones(0, bool)
    run_start = np.flatnonzero(first)
    run_ids = ids_sorted[run_start]
    run_segment = run_ids // (size + 1)
    low = np.searchsorted(run_segment, look_segment, "left")
    per = np.searchsorted(run_segment, look_segment, "right") - low
    which = np.repeat(np.arange(len(look_segment)), per)
    runs = low[which] + np.arange(len(which)) - np.repeat(np.cumsum(per) - per, per)
    run_of = np.repeat(np.arange(len(run_start)), np.diff(np.r_[run_start, len(ids_sorted)]))
    composite = run_of * max(nf, 1) + has[order]  # sorted: by run, then position among facts
    base = runs * max(nf, 1)
    count = np.searchsorted(composite, base + hi[which], "left") - np.searchsorted(
        composite, base + lo[which], "left"
    )
    keep = count > 0
    return which[keep], run_ids[runs[keep]] % (size + 1), count[keep]
