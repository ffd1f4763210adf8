"""The Dagster UI in a real browser: Debian's Chromium, headless, driven by Playwright.

The same web server as ``test_webserver.py`` (the session's ``webserver`` fixture over the
tiny pipeline run) is opened the way a user would: the lineage view shows the database's
eight assets, the ``metrics`` asset's page shows its metadata, and its Checks tab shows its
checks passed. Dagster's UI is a React app that fills the page in after loading, so every
step waits for what it expects to see (never a fixed sleep). Screenshots of each page are
kept under the test's tmp folder and their path printed.

Playwright's own browser download is never used: the test drives the Chromium that
``make system-packages`` installs, and skips (saying why) only where no Chromium is found or
it does not start.
"""

import shutil

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect, sync_playwright

NAMES = (
    "raw_tables",
    "temporal_windows",
    "traversal_graph",
    "tve_targets",
    "pretrained_checkpoint",
    "finetuned_models",
    "metrics",
    "results",
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without the background-networking flags Chromium stalls on a closed network (it waits for
# component updates and sync); Playwright gives it a new empty profile of its own.
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


def walk_the_ui(page: Page, url: str, shots) -> None:
    """Lineage view -> metrics asset -> its Checks tab; ``shots(name)`` saves a screenshot."""
    page.goto(f"{url}/asset-groups")
    # the graph's nodes are HTML inside the SVG's foreignObjects; the sidebar lists the
    # same names as buttons, so look inside the graph only
    nodes = page.locator("svg foreignObject")
    for name in NAMES:
        expect(nodes.filter(has=page.get_by_text(name, exact=True))).to_have_count(1)
    expect(nodes).to_have_count(len(NAMES))
    shots("lineage")

    nodes.filter(has=page.get_by_text("metrics", exact=True)).click()
    page.get_by_role("link", name="View in Asset Catalog").click()
    expect(page).to_have_url(f"{url}/assets/tiny/metrics")
    expect(page.get_by_text("RelBench's evaluator on val and test")).to_be_visible()
    shots("metrics")

    page.get_by_role("tab", name="Checks").click()
    shots("metrics_checks")


def test_ui_in_a_real_browser(webserver, tmp_path, capsys):
    folder = tmp_path / "screenshots"
    folder.mkdir()
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, timeout=WAIT_MS)
        except PlaywrightError as e:
            pytest.skip(f"Chromium at {CHROMIUM} does not start: {str(e).splitlines()[0]}")
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)

            def shots(name):
                page.screenshot(path=folder / f"{name}.png", full_page=True)

            try:
                walk_the_ui(page, webserver, shots)
            finally:
                shots("last")  # what the page showed when the walk ended or failed
        finally:
            browser.close()
            with capsys.disabled():
                print(f"\nbrowser screenshots: {folder}")
