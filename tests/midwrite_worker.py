"""A process that runs ``dagster asset materialize`` in forked children which stop mid-write.

For tests/test_kill_midwrite.py. The pipeline's imports (torch, PyG, relbench, MLflow,
Dagster: ~12 s) are paid once here; each request forks a child that runs the real
``dagster`` command line, so that the test can SIGKILL a materialisation at a known moment
without a Python start per kill. The definitions module is imported by the child, not here,
so that each command sees the run folder as it is then (its recipe, its windows).

A request, one JSON line on stdin::

    {"argv": ["asset", "materialize", ...], "log": "/path/child.log",
     "pause": null | {"writer": "parquet" | "pickle" | "torch", "match": "/part/of/path/",
                      "nth": 1, "marker": "/path/marker"}}

With ``pause``, the child's ``nth`` write of that kind to a path containing ``match`` writes
part of its bytes, creates ``marker`` and sleeps until it is killed. Replies, JSON lines on
stdout: ``{"pid": ...}`` when the child starts, then ``{"pid": ..., "exit": code}`` or
``{"pid": ..., "signal": number}`` when it ends.
"""

import io
import json
import os
import sys
import time
from pathlib import Path

import torch
from dagster._cli import main as dagster_main

import assets.database_assets  # noqa: F401  (the heavy imports, once)
import assets.target_assets  # noqa: F401
import assets.training_assets  # noqa: F401

torch.set_num_threads(1)


def _stop(marker: str) -> None:
    Path(marker).write_text(str(os.getpid()))
    while True:
        time.sleep(60)


def pause_mid_write(writer: str, match: str, nth: int, marker: str) -> None:
    """Patch one writer so that its ``nth`` write to a path containing ``match`` stops half-way."""
    seen = 0

    def due(path) -> bool:
        nonlocal seen
        if match not in str(path):
            return False
        seen += 1
        return seen == nth

    if writer == "parquet":  # targets: stop after a row group, before the footer
        import pyarrow.parquet as pq

        write_table = pq.ParquetWriter.write_table

        def paused_write_table(self, table, *args, **kwargs):
            write_table(self, table, *args, **kwargs)
            if due(self.where):
                _stop(marker)

        pq.ParquetWriter.write_table = paused_write_table
    elif writer == "pickle":  # the IO manager's asset values: stop after half the bytes
        import pickle

        dump = pickle.dump

        def paused_dump(obj, file, protocol=None, **kwargs):
            if due(getattr(file, "name", "")):
                data = pickle.dumps(obj, protocol)
                file.write(data[: len(data) // 2])
                file.flush()
                _stop(marker)
            return dump(obj, file, protocol, **kwargs)

        pickle.dump = paused_dump
    elif writer == "torch":  # training checkpoints: stop after half the bytes
        save = torch.save

        def paused_save(obj, f, *args, **kwargs):
            if due(f):
                buffer = io.BytesIO()
                save(obj, buffer, *args, **kwargs)
                with open(f, "wb") as out:
                    out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                _stop(marker)
            return save(obj, f, *args, **kwargs)

        torch.save = paused_save
    else:
        raise ValueError(f"unknown writer {writer!r}")


def run_child(request: dict) -> None:
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    code = 1
    try:
        if request.get("pause"):
            pause_mid_write(**request["pause"])
        sys.argv = ["dagster", *request["argv"]]
        dagster_main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            print(json.dumps({"pid": pid, "signal": os.WTERMSIG(status)}), flush=True)
        else:
            print(json.dumps({"pid": pid, "exit": os.WEXITSTATUS(status)}), flush=True)


if __name__ == "__main__":
    main()
