"""The real Dagster web server loads the code location and lists a database's nine assets."""

import requests

NINE = {
    f"tiny/{name}"
    for name in (
        "raw_tables",
        "temporal_windows",
        "traversal_graph",
        "tve_targets",
        "pretrained_checkpoint",
        "finetuned_models",
        "metrics",
        "probe_metrics",
        "results",
    )
}


def _graphql(url: str, query: str) -> dict:
    r = requests.post(f"{url}/graphql", json={"query": query}, timeout=30)
    r.raise_for_status()
    return r.json()["data"]


def test_webserver_lists_assets_and_location_loads(webserver):
    data = _graphql(
        webserver,
        """{ workspaceOrError { ... on Workspace { locationEntries {
        name locationOrLoadError { __typename ... on PythonError { message } } } } } }""",
    )
    entries = data["workspaceOrError"]["locationEntries"]
    assert entries, "no code location"
    for e in entries:
        assert e["locationOrLoadError"]["__typename"] == "RepositoryLocation", e
    # no "Join the Dagster community" dialog over the first page (the run folder's nux)
    assert _graphql(webserver, "{ shouldShowNux }")["shouldShowNux"] is False
    nodes = _graphql(webserver, "{ assetNodes { assetKey { path } } }")["assetNodes"]
    assert {"/".join(n["assetKey"]["path"]) for n in nodes} == NINE
    # the windows of tve_targets are the database's own (8 training, 1 validation), all
    # materialised: none missing
    node = _graphql(
        webserver,
        """{ assetNodeOrError(assetKey: {path: ["tiny", "tve_targets"]}) {
        ... on AssetNode { partitionKeys
            partitionStats { numMaterialized numPartitions numFailed } } } }""",
    )
    stats = node["assetNodeOrError"]["partitionStats"]
    assert stats["numPartitions"] == len(node["assetNodeOrError"]["partitionKeys"]) == 9
    assert stats["numMaterialized"] == 9 and stats["numFailed"] == 0
    # its checks (the Checks tab), each passed in every window of the one `tve run`
    node = _graphql(
        webserver,
        """{ assetNodeOrError(assetKey: {path: ["tiny", "tve_targets"]}) {
        ... on AssetNode { assetChecksOrError { ... on AssetChecks { checks {
            name blocking partitionStatuses {
            ... on AssetCheckDefaultPartitionStatuses { succeededPartitions } } } } } } } }""",
    )
    checks = node["assetNodeOrError"]["assetChecksOrError"]["checks"]
    assert {c["name"]: c["blocking"] for c in checks} == {
        "no_leakage": True,
        "coverage": False,
    }
    for c in checks:
        assert len(c["partitionStatuses"]["succeededPartitions"]) == 9, c
