"""The trace explorer in headless Chromium over a real mesh run, checked against the lineage.

A small mesh (real brokers, daemons and a fleet with one misbehaving device,
through ``simulations.mesh`` as in test_mesh.py) runs until a few model
versions are out. Then ``fedtier trace serve --dir`` serves its span files,
and Debian's headless Chromium, driven by selenium through Debian's
chromedriver (never a downloaded one), loads every view and follows one update
from a search for its device to the model version that included it, by
clicking links. What the pages show is checked against the lineage the
central stored (``tiers.store.read_lineages``, what the exactly-once checker
reads) and against the span files. A screenshot of each view is saved, into
``FEDTIER_SCREENSHOTS_DIR`` when set (the docs' images come from there).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from fedtier.simulations.mesh import FlushSpec, MeshSpec, open_brokers, open_mesh, prepare_mesh
from fedtier.tiers.store import read_lineages
from fedtier.tiers.tracequery import TraceIndex

pytestmark = pytest.mark.brokers

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 20.0


def _require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(
            f"the explorer's browser test needs Debian's chromium and chromedriver "
            f"({', '.join(missing)} missing): run `make test-tools`"
        )


async def _record_run(tmp_path: Path) -> tuple[Path, dict[int, list[str]]]:
    """A small mesh until the fleet has model v6; its trace dir and the central's lineage."""
    spec = MeshSpec(
        fleet="xtest",
        regions=(("r1", ("s1", "s2")),),
        devices=8,
        updates_per_s=6.0,
        misbehaving=2,
        misbehave_every_s=0.5,
        edge_flush=FlushSpec(2, 0.3),
        regional_flush=FlushSpec(2, 0.3),
        central_flush=FlushSpec(1, 0.3),
        shutdown_timeout_s=3.0,
    )
    out = tmp_path / "out"
    saw_enough = trio.Event()

    def on_line(line: str) -> None:
        newest = json.loads(line).get("newest_model")
        if newest is not None and newest >= 6:
            saw_enough.set()

    with trio.fail_after(60):
        async with open_brokers(tmp_path / "brokers") as brokers:
            plan = await trio.to_thread.run_sync(prepare_mesh, spec, tmp_path, out, brokers)
            async with open_mesh(plan, ready_timeout_s=30, stop_grace_s=10) as mesh:
                await mesh.start_fleets(on_line)
                await saw_enough.wait()
                assert mesh.failed() is None
    # The central's store, as the exactly-once checker reads it (simulations.chaos).
    lineages = read_lineages(plan.workdir / "state" / "central" / "state.sqlite")
    return plan.trace_dir, {v: [i.hex() for i in ids] for v, ids in lineages.items()}


@contextmanager
def _serve(trace_dir: Path, scratch: Path) -> Iterator[str]:
    """``fedtier trace serve --dir`` on a free port, its scratch database in ``scratch``."""
    scratch.mkdir()
    command = ["trace", "serve", "--dir", str(trace_dir), "--listen", "127.0.0.1:0"]
    process = subprocess.Popen(
        [sys.executable, "-m", "fedtier", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    try:
        assert process.stdout is not None
        lines = []
        url = None
        while url is None:
            # It prints two lines (spans loaded, where it listens), then serves;
            # an error ends its output. pytest-timeout bounds a hang.
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"explorer on (http://\S+)/", line)
            url = found.group(1) if found else None
        assert url is not None, f"fedtier trace serve did not start: {''.join(lines)}"
        yield url
    finally:
        process.terminate()
        returncode = process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    # SIGTERM stops it cleanly: exit status 0, its scratch database removed.
    assert returncode == 0
    assert list(scratch.iterdir()) == []


def _driver() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1400",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
    ):
        options.add_argument(arg)
    # Both paths given: selenium manager has nothing to look up or download.
    return webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))


class Browser:
    """One headless Chromium, the explorer's URL and where screenshots go."""

    def __init__(self, driver: Any, base: str, shots: Path) -> None:
        self.driver = driver
        self.base = base
        self.shots = shots

    def ready(self, kind: str) -> Any:
        """Wait until the page drew view ``kind``; the ``#view`` element."""
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        def drawn(driver: Any) -> Any:
            # The page replaces #view as it draws: the old page's view may still
            # be there (ready, of another kind), or be replaced between the find
            # and the read (stale: look again). Only this kind, drawn, will do.
            view = driver.find_element(By.ID, "view")
            if view.get_attribute("data-ready") == "1" and view.get_attribute("data-view") == kind:
                return view
            return False

        wait = WebDriverWait(
            self.driver, WAIT_S, ignored_exceptions=(StaleElementReferenceException,)
        )
        view = wait.until(drawn, message=f"the {kind} view was not drawn within {WAIT_S} s")
        assert view.get_attribute("data-view") == kind
        return view

    def open(self, path: str, kind: str) -> Any:
        self.driver.get(self.base + path)
        return self.ready(kind)

    def click(self, css: str, kind: str) -> Any:
        from selenium.webdriver.common.by import By

        self.driver.find_element(By.CSS_SELECTOR, css).click()
        return self.ready(kind)

    def shot(self, name: str) -> None:
        self.driver.save_screenshot(str(self.shots / f"explorer-{name}.png"))


def _drive(base: str, shots: Path, trace_dir: Path, lineages: dict[int, list[str]]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    index = TraceIndex.load(trace_dir)
    # An update the central counted in a version, sent by a device with a device span.
    senders = {
        str(s.attributes["fedtier.update_id"]): str(s.attributes["fedtier.device"])
        for s in index.spans
        if s.name == "device send"
    }
    # The version with the most updates makes the richest page (and screenshot).
    version, uid = max(
        ((v, uid) for v in lineages if v >= 1 for uid in sorted(lineages[v]) if uid in senders),
        key=lambda pair: (len(lineages[pair[0]]), -pair[0]),
    )
    device = senders[uid]
    driver = _driver()
    try:
        browser = Browser(driver, base, shots)
        view = browser.open("/", "overview")
        listed = {
            int(a.get_attribute("data-id"))
            for a in view.find_elements(By.CSS_SELECTOR, "#versions a[data-kind=version]")
        }
        assert version in listed
        assert max(lineages) in listed
        browser.shot("overview")

        # Device -> update -> version, by typing and clicking only.
        box = driver.find_element(By.ID, "search-q")
        box.send_keys(device[:8], Keys.ENTER)
        view = browser.ready("search")
        browser.shot("search")
        view = browser.click(f'#hits a[data-kind=device][data-id="{device}"]', "device")
        assert view.find_element(By.ID, "title").get_attribute("data-device") == device
        shown = {
            a.get_attribute("data-id")
            for a in view.find_elements(By.CSS_SELECTOR, "#device-updates a[data-kind=update]")
        }
        # Its updates as the spans name them: sent (device span) or received (edge span).
        named = {
            str(sp.attributes["fedtier.update_id"])
            for sp in index.spans
            if sp.name in ("device send", "edge process")
            and sp.attributes.get("fedtier.device") == device
            and "fedtier.update_id" in sp.attributes
        }
        assert shown == named
        assert uid in shown
        browser.shot("device")

        view = browser.click(f'#device-updates a[data-kind=update][data-id="{uid}"]', "update")
        assert view.find_element(By.ID, "title").get_attribute("data-update-id") == uid
        included = view.find_element(By.ID, "included-version")
        assert included.text == f"v{version}"
        assert view.find_element(By.ID, "ends").text == f"included in model v{version}"
        hops = [
            row.find_elements(By.TAG_NAME, "td")[1].text
            for row in view.find_elements(By.CSS_SELECTOR, "#hops tbody tr")
        ]
        assert hops[0] == "device send"
        assert hops[-1] == "central publish model"
        browser.shot("update")

        view = browser.click("#included-version a[data-kind=version]", "version")
        assert view.find_element(By.ID, "title").get_attribute("data-version") == str(version)
        in_page = {
            a.get_attribute("data-id")
            for a in view.find_elements(By.CSS_SELECTOR, "#updates a[data-kind=update]")
        }
        # Exactly the updates the central recorded in this version.
        assert in_page == set(lineages[version])
        assert view.find_element(By.ID, "update-count").text == str(len(lineages[version]))
        stages = [
            row.get_attribute("data-stage")
            for row in view.find_elements(By.CSS_SELECTOR, "#waterfall .wf-row")
        ]
        assert stages[0] == "device send"
        assert stages[-1] == "central publish model"
        browser.shot("version")

        # Every other version the central made shows the updates its lineage holds.
        for other in sorted(lineages):
            if other in (0, version):
                continue
            view = browser.open(f"/version/{other}", "version")
            in_page = {
                a.get_attribute("data-id")
                for a in view.find_elements(By.CSS_SELECTOR, "#updates a[data-kind=update]")
            }
            assert in_page == set(lineages[other]), other

        view = browser.open("/refusals", "refusals")
        rejected = sum(
            1
            for s in index.spans
            if s.name == "edge process" and s.attributes.get("fedtier.outcome") == "rejected"
        )
        assert rejected > 0  # the misbehaving device
        totals = 0
        for row in view.find_elements(By.CSS_SELECTOR, "#series tbody tr"):
            cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
            if cells[0] == "edge" and cells[1] == "rejected":
                totals += int(cells[4])
        assert totals == rejected
        browser.shot("refusals")
    finally:
        driver.quit()


async def test_the_explorer_follows_an_update_from_device_to_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _require_browser()
    trace_dir, lineages = await _record_run(tmp_path)
    assert any(v >= 1 and ids for v, ids in lineages.items())
    shots = Path(os.environ.get("FEDTIER_SCREENSHOTS_DIR") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    # selenium manager must never fetch a driver or browser: both paths are given.
    monkeypatch.setenv("SE_OFFLINE", "true")

    def browse() -> None:
        with _serve(trace_dir, tmp_path / "scratch") as base:
            _drive(base, shots, trace_dir, lineages)

    with trio.fail_after(90):
        await trio.to_thread.run_sync(browse)
    for name in ("overview", "search", "device", "update", "version", "refusals"):
        assert (shots / f"explorer-{name}.png").stat().st_size > 10_000, name
