"""The shared helpers: atomic writes keep the old result on failure; one-line errors;
naive timestamps; UTC offsets in timestamp strings."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from tve_pipeline import common
from tve_pipeline.common import atomic_path, error_summary, has_utc_offset, naive_timestamps


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    out = tmp_path / "sub" / "a.txt"
    with atomic_path(out) as tmp:
        tmp.write_text("one")
    assert out.read_text() == "one"
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert out.read_text() == "one"
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.txt"]  # no temporary left


def test_atomic_path_moves_a_folder_into_place_whole(tmp_path):
    out = tmp_path / "cache"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1"
    with pytest.raises(ValueError), atomic_path(tmp_path / "other") as tmp:
        tmp.mkdir()
        raise ValueError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_atomic_path_removes_the_temporary_files_of_writers_that_are_gone(tmp_path):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead_pid, host = int(gone.stdout), common._HOST
    stale = tmp_path / f".a.txt.{host}.{dead_pid}.1.tmp"  # killed mid-write
    kept = [
        tmp_path / f".a.txt.{host}.{os.getpid()}.7.tmp",  # a live writer (this process)
        tmp_path / f".a.txt.elsewhere.{dead_pid}.1.tmp",  # another host's: it may be alive
        tmp_path / f".b.txt.{host}.{dead_pid}.1.tmp",  # another file's
    ]
    for path in (stale, *kept):
        path.write_text("half")
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("whole")
    assert sorted(tmp_path.iterdir()) == sorted([tmp_path / "a.txt", *kept])


def test_error_summary():
    assert error_summary(ValueError("first line\n  second")) == "first line"
    assert error_summary(ValueError("first line\n  second"), whole=True) == "first line second"
    assert error_summary(KeyError()) == "KeyError"


def test_naive_timestamps():
    out = naive_timestamps(["2020-01-02", "2020-01-03 04:00"])
    assert out.dtype == "datetime64[ns]" and out[1] == pd.Timestamp("2020-01-03 04:00")
    assert naive_timestamps(
        pd.Series(pd.to_datetime(["2020-01-02"])).astype("datetime64[us]")
    ).dtype == ("datetime64[ns]")
    with pytest.raises(ValueError, match="timezone"):
        naive_timestamps(pd.Series(pd.to_datetime(["2020-01-02"], utc=True)))


def test_has_utc_offset_only_after_a_clock_time():
    with_offset = [
        "2021-01-01T10:00:00Z",
        "2021-01-01 10:00+01:00",
        "2021-01-01 10:00 +0100",
        "2021-01-01 10:00+01",
        "2021-01-01T10:00:00.123-05:00",
    ]
    without = [
        "2021-01-01",  # the day's "-01" is not an offset
        "2021-01-01 10:00",
        "2021-01-01T10:00:00.5",
        "2021-01-01Z",  # no clock time
        "2021-01-01 10:00:00 UTC",  # a zone name, not an offset
    ]
    got = has_utc_offset(pd.Series(with_offset + without))
    assert got.tolist() == [True] * len(with_offset) + [False] * len(without)


def test_exclusive_makes_a_second_holder_wait_until_the_first_leaves(tmp_path):
    import threading
    import time

    from tve_pipeline.common import exclusive

    lock, order, waited = tmp_path / "sub" / "run.lock", [], []
    inside = threading.Event()

    def second():
        inside.wait()
        with exclusive(lock, on_wait=lambda: waited.append(True)):
            order.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    with exclusive(lock):
        inside.set()
        time.sleep(0.3)  # the second asks meanwhile and must wait
        order.append("first")
    thread.join(5)
    assert order == ["first", "second"] and waited == [True]
    with exclusive(lock, on_wait=lambda: waited.append(False)):  # free again: no wait
        pass
    assert waited == [True]
