"""The real Dagster web server loads the code location and lists all seven assets."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SEVEN = {"raw_tables", "temporal_windows", "traversal_graph", "tve_targets", "pretrained_checkpoint", "finetuned_models", "metrics"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    r = requests.post(f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=30)
    r.raise_for_status()
    return r.json()["data"]


def test_webserver_lists_assets_and_location_loads(tmp_path):
    port = _free_port()
    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "TVE_RUN_DIR": str(tmp_path / "run")}
    proc = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-w", str(ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/server_info", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "web server did not come up in 120 s"
            time.sleep(1)
        data = _graphql(port, """{ workspaceOrError { ... on Workspace { locationEntries {
            name locationOrLoadError { __typename ... on PythonError { message } } } } } }""")
        entries = data["workspaceOrError"]["locationEntries"]
        assert entries, "no code location"
        for e in entries:
            assert e["locationOrLoadError"]["__typename"] == "RepositoryLocation", e
        nodes = _graphql(port, "{ assetNodes { assetKey { path } } }")["assetNodes"]
        assert {"/".join(n["assetKey"]["path"]) for n in nodes} == SEVEN
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
