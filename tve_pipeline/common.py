"""Small ideas every stage uses, written once: atomic writes, one-line error summaries,
naive timestamps, UTC offsets in timestamp strings.

- :func:`atomic_path`: write a file or a folder beside its final place and move it there
  whole, so that a reader sees the old result or the new one, never half of one, and a
  failure leaves the old one intact. A process killed mid-write leaves only its temporary
  file, which the next write of the same path removes.
- :func:`error_summary`: an exception as one line, for messages that name what failed.
- :func:`naive_timestamps`: any column of times as naive ``datetime64[ns]`` (RelBench
  compares naive times; parquet and pandas hand back ``us`` or ``ns``).
- :func:`has_utc_offset`: which timestamp strings end in a UTC offset (``UTC_OFFSET``, the
  syntax, is shared with the importer's ISO pattern): the validator and the importer
  decide "mixed timezones" with it.
- :func:`numeric_text_tokens`: the few words (``NA``, ``n/a``, ``-``) that keep a column of
  numbers stored as text, with their counts; :func:`numeric_tokens_line` says so in one
  line with the fix. The importer reports them as it reads the sources, the validator as it
  reads the dataset's parquet files.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

#: The UTC offset a timestamp string may end with: ``Z``, ``+01``, ``+0100`` or ``+01:00``.
UTC_OFFSET = r"(?:Z|[+-]\d{2}(?::?\d{2})?)"
# A UTC offset, only after a clock time (so the day of "2021-01-01" is not one).
_CLOCK_TIME_THEN_OFFSET = re.compile(r"[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?\s*" + UTC_OFFSET + "$")


# This host, as temporary file names carry it (without dots: "." separates the parts).
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write a file or a folder at; on success it
    replaces ``path`` (a file atomically; a folder by rename, when ``path`` does not exist
    yet), on failure it is removed and ``path`` stays as it was.

    The temporary name says which host and process writes it
    (``.<name>.<host>.<pid>.<thread>.tmp``): a process killed mid-write (SIGKILL, out of
    memory) cannot remove its own, so each write first removes the ones of ``path`` left by
    processes of this host that no longer exist (another host's, or a live writer's, are
    left alone: they may still be writing).

    >>> with atomic_path(out / "summary.csv") as tmp:  # doctest: +SKIP
    ...     frame.to_csv(tmp)
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    tmp = final.with_name(f".{final.name}.{_HOST}.{os.getpid()}.{threading.get_ident()}.tmp")
    _remove(tmp)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def _remove_stale_temps(final: Path) -> None:
    """Remove the temporary files of ``final`` whose writer (a process of this host) is gone."""
    name = re.compile(re.escape(f".{final.name}.{_HOST}.") + r"(\d+)\.\d+\.tmp")
    for tmp in final.parent.glob(f".{glob.escape(final.name)}.{_HOST}.*.tmp"):
        match = name.fullmatch(tmp.name)
        if match and not _process_exists(int(match[1])):
            _remove(tmp)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def error_summary(exc: BaseException, *, whole: bool = False) -> str:
    """An exception as one line: its first line (``whole``: every line, whitespace
    collapsed), or its type name when it has no message."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    return " ".join(text.split()) if whole else text.splitlines()[0].strip()


def naive_timestamps(values) -> pd.Series:
    """Times (strings, datetimes, numpy or arrow values) as a naive ``datetime64[ns]`` series."""
    series = values if isinstance(values, pd.Series) else pd.Series(values)
    mixed = series.dtype == object or pd.api.types.is_string_dtype(series.dtype)  # text, any layout
    series = pd.to_datetime(series, format="mixed" if mixed else None)
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        raise ValueError(f"timestamps must be naive, got timezone {series.dtype.tz}")
    return series.astype("datetime64[ns]")


def has_utc_offset(text: pd.Series) -> pd.Series:
    """Per timestamp string (stripped), whether it ends in a UTC offset after its clock time."""
    return text.str.contains(_CLOCK_TIME_THEN_OFFSET)


#: A text column is numeric-looking when some of its values are numbers and the others
#: are at most this many distinct words: missing-value markers ("NA", "n/a", "-"), not
#: the words of a text or categorical column (which has more).
NUMERIC_TOKENS_MAX = 5
# Values looked at before reading a whole column: most text columns have many words.
_NUMERIC_TOKENS_PEEK = 2000


def _numbers(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values, errors="coerce").notna()


def numeric_text_tokens(ser: pd.Series) -> tuple[int, dict[str, int]]:
    """``(numbers, {word: count})`` of a numeric-looking text column: how many of its
    values are numbers, and its other values, most frequent first (then by text); ``(0,
    {})`` for any other column (numbers already, no number at all, or more than
    :data:`NUMERIC_TOKENS_MAX` distinct words). A column that is mostly ``NA`` counts:
    its few numbers are what it measures."""
    if not (pd.api.types.is_object_dtype(ser.dtype) or pd.api.types.is_string_dtype(ser.dtype)):
        return 0, {}
    values = ser.dropna()
    if values.empty:
        return 0, {}
    # An evenly spread sample first: a text column shows its many words there already.
    peek = values.iloc[:: max(1, len(values) // _NUMERIC_TOKENS_PEEK)]
    if peek[~_numbers(peek)].astype(str).nunique() > NUMERIC_TOKENS_MAX:
        return 0, {}
    if peek.nunique() * 2 <= len(peek):  # few distinct values: parse each once
        counts = values.value_counts()
        is_number = _numbers(pd.Series(counts.index, dtype=object)).to_numpy()
        words, numbers = counts[~is_number], int(counts[is_number].sum())
    else:
        is_number = _numbers(values)
        words, numbers = values[~is_number].astype(str).value_counts(), int(is_number.sum())
    if not numbers or words.empty or len(words) > NUMERIC_TOKENS_MAX:
        return 0, {}
    ranked = sorted(((str(w), int(n)) for w, n in words.items()), key=lambda i: (-i[1], i[0]))
    return numbers, dict(ranked)


def numeric_tokens_line(
    where: str, column: str, numbers: int, tokens: dict[str, int], typed: str, csv: bool = True
) -> str:
    """One line about a numeric-looking text column (:func:`numeric_text_tokens`): where,
    what it holds, what it became (``typed``), and how the import YAML declares the words
    as missing (``null_values``, CSV sources only) or the column as numbers (``types``)."""
    ranked = sorted(tokens, key=lambda t: (-tokens[t], t))  # a JSON file sorts them by name
    shown = ", ".join(f"{json.dumps(t)} {tokens[t]}" for t in ranked)
    null_values = f"null_values: {json.dumps(ranked)} in the table's entry, or "
    return (
        f"{where}: {numbers} numbers and {sum(tokens.values())} other values ({shown}), "
        f"so it is {typed}; if those mean missing, declare them in the import YAML: "
        f"{null_values if csv else ''}types: {{{json.dumps(column)}: numerical}} "
        "(every value that is not a number becomes null)"
    )


@contextmanager
def exclusive(path: str | os.PathLike, on_wait=None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block: a second
    process asking for it waits until the first leaves (``on_wait()`` is called once when
    it has to). The operating system releases it if the holder dies."""
    import fcntl

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
