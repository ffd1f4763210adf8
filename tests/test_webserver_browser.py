"""The Dagster UI in a real browser: Debian's Chromium, headless, driven by Playwright.

The same web server as ``test_webserver.py`` (the session's ``webserver`` fixture over the
tiny pipeline run) is opened the way a user would: the lineage view shows the database's
nine assets, materialised, with how many of their checks passed; clicking ``metrics``
there and "View in Asset Catalog" opens its page, whose metadata shows the scores table
and the plot (a PNG the browser decodes); its Checks tab and that of ``tve_targets`` show
their checks with the outcomes Dagster recorded. What the page must show comes from
elsewhere: the asset and check names are written out here, the scores are the asset's
stored value, the plot's size is read from the PNG in the recorded metadata, the checks'
outcomes from the instance's event log; no check is drawn red (failed with ERROR severity:
every lineage node's checks icon is a green tick or a yellow warning, and neither Checks
tab draws a red icon), read from the colours of the icons on the page. The fixture is the
tiny database under the `test` recipe, not `make demo`'s rel-flights (a demo takes 3-6
minutes; the suite must stay under 10): what the demo's checks show was looked at by hand
(bench/RESULTS.md, session 11). Then the Automation page lists the database's
scheduled backfill, and the page of a run that `tve run` made offers "Re-execute" (its job
is the code location's). A second web server, over a fresh run folder, shows the embedded
database's nine assets in the lineage view.

Dagster's UI is a React app that fills the page in after loading, so every step waits for
what it expects to see, never a fixed sleep. A screenshot of each page is kept under the
test's tmp folder (pytest keeps the last three) and the folder is printed.

Playwright's own browser download is never used: the test drives the Chromium that
``make system-packages`` installs, and skips (saying why) only where no Chromium is found
or it does not start.
"""

import base64
import contextlib
import re
import shutil
import struct
import time
from dataclasses import dataclass

import dagster as dg
import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect, sync_playwright

from assets.database_assets import pretraining_windows
from tests.conftest import load_asset
from tve_pipeline.config import make_recipe
from tve_pipeline.summary import summarise_database

NAMES = (
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
# the assets with checks and their checks' names, as assets/checks.py defines them
CHECKS = {
    "raw_tables": ("validation",),
    "tve_targets": ("coverage", "no_leakage"),
    "pretrained_checkpoint": ("beats_trivial_predictor", "finite_weights"),
    "metrics": ("beats_trivial_baseline",),
}
# Dagster's icons are <div role="img" aria-label=NAME> coloured by a CSS variable in their
# style: a check that failed with ERROR severity (blocking or not) is drawn red, one that
# warned yellow, one that passed green (ui-core's asset-checks/util.tsx and
# AssetChecksStatusSummary.tsx in dagster-webserver 1.13)
RED = '[role="img"][style*="--color-accent-red)"]'
GREEN = '[role="img"][style*="--color-accent-green)"]'
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without the background-networking flags Chromium stalls on a closed network (component
# updates, sync). Playwright passes most of these itself (and a new empty --user-data-dir,
# which it will not take as an argument); they are listed so that none depends on it.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A loaded 2-core machine takes 10-20 s to render the first page
WAIT_MS = 90_000
# Below about this width the lineage view zooms out to minimal nodes whose long names are
# cut in the middle ("pretra…_checkpoint"); at this size every node shows its full name.
VIEWPORT = {"width": 2560, "height": 1440}

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on PATH (`make system-packages` installs Debian's)"
)


@dataclass
class CheckOutcome:
    """A check as the instance recorded it: did every partition's latest evaluation pass,
    and the latest evaluation (passed, description)."""

    all_passed: bool
    latest_passed: bool
    latest_description: str


@dataclass
class Expected:
    partition: str  # of the metrics asset's latest materialisation
    scores: list  # (split, metric, value) of that partition's stored value
    plot_size: tuple  # (width, height) of the PNG in that materialisation's metadata
    checks: dict  # asset -> check name -> CheckOutcome


def _png_size(markdown: str) -> tuple:
    data = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", markdown)[1])
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "the plot is not a PNG"
    return struct.unpack(">II", data[16:24])  # IHDR: width, height


def _check_outcome(instance, asset: str, name: str) -> CheckOutcome:
    key = dg.AssetCheckKey(dg.AssetKey(["tiny", asset]), name)
    records = instance.event_log_storage.get_asset_check_execution_history(key, limit=1000)
    assert records, f"no execution of check {name} on tiny/{asset}"
    latest_by_partition = {}
    for r in records:  # newest first
        latest_by_partition.setdefault(r.partition, r.event.asset_check_evaluation)
    latest = records[0].event.asset_check_evaluation
    return CheckOutcome(
        all(e.passed for e in latest_by_partition.values()), latest.passed, latest.description
    )


def expected_from_the_run(run) -> Expected:
    """What the UI must show, read from the instance and the stored asset values."""
    instance = run["instance"]
    event = instance.get_latest_materialization_event(dg.AssetKey(["tiny", "metrics"]))
    materialization = event.asset_materialization
    stored = load_asset(run, "metrics", materialization.partition)
    return Expected(
        partition=materialization.partition,
        scores=list(stored[["split", "metric", "value"]].itertuples(index=False, name=None)),
        plot_size=_png_size(materialization.metadata["plot"].value),
        checks={
            asset: {name: _check_outcome(instance, asset, name) for name in names}
            for asset, names in CHECKS.items()
        },
    )


def see_no_red_check(node, all_passed: bool) -> None:
    """A lineage node's checks summary: its icon is a green tick when every check passed in
    every partition, a yellow warning when one warned, a red cross when one failed with
    ERROR severity: never red (read from the icons the page drew, not from the instance)."""
    expect(node.locator(RED)).to_have_count(0)
    icon = node.locator(
        '[role="img"][aria-label="done"], [role="img"][aria-label="warning_outline"]'
    )
    expect(icon).to_have_count(1)
    if all_passed:  # the colour check reads what it should: the tick is green
        expect(node.locator(f'{GREEN}[aria-label="done"]')).to_have_count(1)


def see_checks(page: Page, expected: dict) -> None:
    """The Checks tab lists each check with its status over partitions, and the first one's
    latest execution (the tab opens on it) with its description and result."""
    for name, outcome in expected.items():
        row = page.locator("span", has=page.locator(f'[title="{name}"]'))
        expect(row).to_contain_text("Succeeded" if outcome.all_passed else "Failed")
    first = expected[sorted(expected)[0]]
    expect(page.get_by_text(first.latest_description, exact=True)).to_be_visible()
    result = page.get_by_text("Evaluation result", exact=True).locator("xpath=..")
    expect(result).to_contain_text("Passed" if first.latest_passed else "Failed")
    # no check's status drawn red (a warning is yellow)
    expect(page.locator(RED)).to_have_count(0)


def walk_the_ui(page: Page, url: str, expected: Expected, shots) -> None:
    """Lineage view -> metrics page (table, plot) -> its Checks tab -> tve_targets' Checks
    tab; ``shots(name)`` saves a screenshot of each."""
    page.goto(f"{url}/asset-groups")
    # the graph's nodes are HTML inside the SVG's foreignObjects; the sidebar lists the
    # same names as buttons, so look inside the graph only
    nodes = page.locator("svg foreignObject")
    for name in NAMES:
        expect(nodes.filter(has=page.get_by_text(name, exact=True))).to_have_count(1)
    expect(nodes).to_have_count(len(NAMES))
    # each node fills in its live status: materialised, and how many checks passed (in
    # every partition)
    expect(nodes.filter(has_text="Loading")).to_have_count(0)
    for name in NAMES:
        node = nodes.filter(has=page.get_by_text(name, exact=True))
        expect(node).to_contain_text(re.compile("Materialized|100% filled"))
        if name in expected.checks:
            outcomes = expected.checks[name].values()
            passed = sum(c.all_passed for c in outcomes)
            expect(node).to_contain_text(f"Asset checks{passed} / {len(outcomes)} Passed")
            see_no_red_check(node, passed == len(outcomes))
    shots("lineage")

    nodes.filter(has=page.get_by_text("metrics", exact=True)).click()
    page.get_by_role("link", name="View in Asset Catalog").click()
    expect(page).to_have_url(f"{url}/assets/tiny/metrics")
    expect(page.get_by_text(expected.partition, exact=True).first).to_be_visible()
    # the `scores` table, a table inside the metadata table
    scores = page.locator("table table").filter(has=page.locator("th", has_text="split"))
    expect(scores.locator("th")).to_have_text(["split", "metric", "value"])
    expect(scores.locator("tbody tr")).to_have_count(len(expected.scores))
    rows = [r.split("\t") for r in scores.locator("tbody tr").all_inner_texts()]
    shown = [(split, metric, float(value)) for split, metric, value in rows]
    stored = [(s, m, pytest.approx(v, rel=1e-12)) for s, m, v in expected.scores]
    assert shown == stored, f"scores table {shown} is not the stored {expected.scores}"
    shots("metrics")

    # the plot: Markdown over 1,000 characters opens in a dialog, the PNG inside it
    page.locator("tr", has=page.get_by_text("plot", exact=True)).get_by_text(
        "[Show Markdown]"
    ).click()
    image = page.get_by_role("dialog").locator('img[src^="data:image/png;base64,"]')
    expect(image).to_be_visible()
    size = image.evaluate("i => i.complete ? [i.naturalWidth, i.naturalHeight] : null")
    assert tuple(size or ()) == expected.plot_size, "the browser did not decode the plot"
    shots("metrics_plot")
    page.get_by_role("button", name="Close").click()
    expect(page.get_by_role("dialog")).to_have_count(0)

    page.get_by_role("tab", name="Checks").click()
    see_checks(page, expected.checks["metrics"])
    shots("metrics_checks")

    # back to the lineage view through the app (no page load), on to tve_targets' checks
    page.get_by_role("navigation").locator('a[href="/asset-groups"]').click()
    nodes.filter(has=page.get_by_text("tve_targets", exact=True)).click()
    page.get_by_role("link", name="View in Asset Catalog").click()
    expect(page).to_have_url(f"{url}/assets/tiny/tve_targets")
    page.get_by_role("tab", name="Checks").click()
    see_checks(page, expected.checks["tve_targets"])
    shots("tve_targets_checks")
    # the run folder's dagster.yaml (nux) keeps the sign-up dialog away
    expect(page.get_by_text("Join the Dagster community")).to_have_count(0)


def see_automation_and_a_run(page: Page, url: str, run_id: str, shots) -> None:
    """The Automation page lists the scheduled backfill; the Overview's timeline shows the
    runs of `tve run` under their jobs; the page of one of them (a stage job of the code
    location) has an enabled "Re-execute all" button."""
    page.goto(f"{url}/automation")
    expect(page.get_by_role("link", name="tiny__scheduled_backfill")).to_be_visible()
    shots("automation")
    page.goto(f"{url}/overview/activity/timeline")
    expect(page.get_by_role("link", name="tiny__summarise").first).to_be_visible()
    shots("overview")
    page.goto(f"{url}/runs/{run_id}")
    expect(page.get_by_role("link", name="tiny__summarise").first).to_be_visible()
    # its name carries the icon's ("warning Re-execute all (*)": the run's job snapshot is
    # the subset's, so the UI warns the loaded job may differ; it stays enabled)
    button = page.get_by_role("button", name=re.compile("Re-execute all"))
    expect(button).to_be_enabled()
    shots("run")


def see_the_lineage(page: Page, url: str, windows: int) -> None:
    """The lineage view of a fresh run folder: the nine assets, ``tve_targets`` with its
    registered windows, nothing materialised yet."""
    page.goto(f"{url}/asset-groups")
    nodes = page.locator("svg foreignObject")
    for name in NAMES:
        expect(nodes.filter(has=page.get_by_text(name, exact=True))).to_have_count(1)
    expect(nodes).to_have_count(len(NAMES))
    targets = nodes.filter(has=page.get_by_text("tve_targets", exact=True))
    expect(targets).to_contain_text(f"{windows} partitions")
    raw = nodes.filter(has=page.get_by_text("raw_tables", exact=True))
    expect(raw).to_contain_text("Never materialized")


@contextlib.contextmanager
def browser_page(tmp_path, capsys):
    """A headless Chromium page; yields (page, shots); prints where the screenshots are."""
    folder = tmp_path / "screenshots"
    folder.mkdir()
    start, seen = time.monotonic(), []
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, timeout=WAIT_MS)
        except PlaywrightError as e:
            pytest.skip(f"Chromium at {CHROMIUM} does not start: {_launch_error(e)}")
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)

            def shots(name):
                page.screenshot(path=folder / f"{name}.png", animations="disabled")
                seen.append(f"{name} {time.monotonic() - start:.1f} s")

            try:
                yield page, shots
            finally:
                shots("last")  # what the page showed when the walk ended or failed
        finally:
            browser.close()
            with capsys.disabled():
                print(f"\nbrowser screenshots: {folder} ({', '.join(seen)})")


def _launch_error(e: PlaywrightError) -> str:
    """Playwright's first line and what the browser itself wrote to stderr, if anything."""
    lines = str(e).splitlines()
    said = [line.split("[err] ", 1)[1] for line in lines if "][err] " in line]
    return "; ".join(dict.fromkeys([lines[0], *said[-3:]]))


def test_ui_in_a_real_browser(webserver, pipeline_run, tmp_path, capsys):
    expected = expected_from_the_run(pipeline_run)
    # in the tiny run every window's target checks pass (test_webserver.py asks too)
    assert all(c.all_passed for c in expected.checks["tve_targets"].values())
    runs = pipeline_run["instance"].get_runs(filters=dg.RunsFilter(job_name="tiny__summarise"))
    with browser_page(tmp_path, capsys) as (page, shots):
        walk_the_ui(page, webserver, expected, shots)
        see_automation_and_a_run(page, webserver, runs[0].run_id, shots)


def test_a_fresh_run_folder_in_a_real_browser(fresh_webserver, tmp_path, capsys):
    url, run_dir = fresh_webserver
    summary = summarise_database(run_dir / "datasets" / "rel-flights")
    windows = len(pretraining_windows(summary, make_recipe("demo")))
    with browser_page(tmp_path, capsys) as (page, shots):
        see_the_lineage(page, url, windows)
        shots("fresh_lineage")
