"""The real Dagster web server loads the code location and lists a database's eight assets."""

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
EIGHT = {
    f"tiny/{name}"
    for name in (
        "raw_tables",
        "temporal_windows",
        "traversal_graph",
        "tve_targets",
        "pretrained_checkpoint",
        "finetuned_models",
        "metrics",
        "results",
    )
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    r = requests.post(f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=30)
    r.raise_for_status()
    return r.json()["data"]


def test_webserver_lists_assets_and_location_loads(pipeline_run):
    port = _free_port()
    run_dir = pipeline_run["run_dir"]
    env = {**os.environ, "DAGSTER_HOME": str(run_dir / "dagster"), "TVE_RUN_DIR": str(run_dir)}
    proc = subprocess.Popen(
        [
            str(BIN / "dagster-webserver"),
            "-w",
            str(ROOT / "workspace.yaml"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
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
        data = _graphql(
            port,
            """{ workspaceOrError { ... on Workspace { locationEntries {
            name locationOrLoadError { __typename ... on PythonError { message } } } } } }""",
        )
        entries = data["workspaceOrError"]["locationEntries"]
        assert entries, "no code location"
        for e in entries:
            assert e["locationOrLoadError"]["__typename"] == "RepositoryLocation", e
        # no "Join the Dagster community" dialog over the first page (the run folder's nux)
        assert _graphql(port, "{ shouldShowNux }")["shouldShowNux"] is False
        nodes = _graphql(port, "{ assetNodes { assetKey { path } } }")["assetNodes"]
        assert {"/".join(n["assetKey"]["path"]) for n in nodes} == EIGHT
        # the windows of tve_targets are the database's own, all materialised: none missing
        node = _graphql(
            port,
            """{ assetNodeOrError(assetKey: {path: ["tiny", "tve_targets"]}) {
            ... on AssetNode { partitionKeys
                partitionStats { numMaterialized numPartitions numFailed } } } }""",
        )
        stats = node["assetNodeOrError"]["partitionStats"]
        assert stats["numPartitions"] == len(node["assetNodeOrError"]["partitionKeys"]) == 8
        assert stats["numMaterialized"] == 8 and stats["numFailed"] == 0
        # its checks (the Checks tab), each passed in every window of the one `tve run`
        node = _graphql(
            port,
            """{ assetNodeOrError(assetKey: {path: ["tiny", "tve_targets"]}) {
            ... on AssetNode { assetChecksOrError { ... on AssetChecks { checks {
                name blocking partitionStatuses {
                ... on AssetCheckDefaultPartitionStatuses { succeededPartitions } } } } } } } }""",
        )
        checks = node["assetNodeOrError"]["assetChecksOrError"]["checks"]
        assert {c["name"]: c["blocking"] for c in checks} == {
            "no_leakage": True,
            "seed_times": True,
            "coverage": False,
        }
        for c in checks:
            assert len(c["partitionStatuses"]["succeededPartitions"]) == 8, c
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
