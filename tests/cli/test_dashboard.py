"""`babysit dashboard` for real: the server in a subprocess, Debian's Chromium driven by
Playwright looking at a finished TINY run's study page, note and artifacts; the report
opened from disk in the same browser; the port, host and Ctrl-C behaviour."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import ROOT
from tests.conftest import TINY
from tests.conftest import babysit
from tests.conftest import cli_env

# Real processes and whole runs: `make test-slow` (CI runs it after `make test`).
pytestmark = pytest.mark.slow

RUN = "dash"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SMALL = [*TINY, "--set", "model.conv_layers=3", "--set", "model.fc_layers=1"]
SHOTS = ROOT / "test-output"


@dataclass
class Finished:
    tmp: Path
    url: str


@dataclass
class Dashboard:
    proc: subprocess.Popen
    base: str
    log: Path

    def stderr(self) -> str:
        return self.log.read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args: str, cwd: Path, log: Path) -> subprocess.Popen:
    # stderr to a file, not a pipe nobody drains while the browser makes requests.
    with log.open("w") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "babysit", "dashboard", *args],
            cwd=cwd,
            env=cli_env(),
            stdout=fh,
            stderr=fh,
            text=True,
        )


def _wait_until_up(proc: subprocess.Popen, port: int, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"dashboard exited {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/meta", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"dashboard did not answer in {timeout} s:\n{log.read_text()}")


def _interrupt(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    tmp = tmp_path_factory.mktemp("dashboard")
    url = f"sqlite:///{tmp / 'babysit.db'}"
    babysit("run", "--name", RUN, "--storage", url, *SMALL, cwd=tmp, check=True)
    return Finished(tmp=tmp, url=url)


@pytest.fixture(scope="module")
def dashboard(finished: Finished) -> Iterator[Dashboard]:
    port = _free_port()
    log = finished.tmp / "dashboard.log"
    proc = _start(
        "--storage", finished.url, "--port", str(port), "--quiet", cwd=finished.tmp, log=log
    )
    _wait_until_up(proc, port, log)
    yield Dashboard(proc=proc, base=f"http://127.0.0.1:{port}", log=log)
    if proc.poll() is None:
        _interrupt(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        message = (
            f"{CHROMIUM} is missing; `make system` (scripts/system-setup.sh) installs "
            "Debian's chromium"
        )
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _study_id(base: str, name: str) -> int:
    with urllib.request.urlopen(f"{base}/api/studies", timeout=10) as r:
        studies = json.load(r)["study_summaries"]
    return next(s["study_id"] for s in studies if s["study_name"] == name)


def _loaded_images(page: object, selector: str) -> list[dict]:
    return page.eval_on_selector_all(  # type: ignore[attr-defined]
        selector,
        "els => els.map(i => ({src: i.getAttribute('src'), complete: i.complete, "
        "width: i.naturalWidth}))",
    )


@pytest.mark.browser
def test_study_page_shows_trials_note_and_plot(
    browser: object, finished: Finished, dashboard: Dashboard
) -> None:
    assert f"dashboard: {dashboard.base}/dashboard/" in dashboard.stderr()
    assert "warning" not in dashboard.stderr()
    study = optuna.load_study(study_name=f"{RUN}/coarse", storage=finished.url)
    trials = study.get_trials()
    best = max((t for t in trials if t.value is not None), key=lambda t: (t.value, -t.number))
    published = study.user_attrs["published"]
    artifact_id = published["artifacts"]["coarse-search.png"]
    sid = _study_id(dashboard.base, f"{RUN}/coarse")
    assert sid == study._study_id

    page = browser.new_page(viewport={"width": 1280, "height": 1000})  # type: ignore[attr-defined]
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto(f"{dashboard.base}/dashboard/studies/{sid}")
    page.get_by_text(f"Best Trial (number={best.number})").wait_for(timeout=30_000)
    page.get_by_text("Study Artifacts").wait_for()
    page.get_by_text("coarse-search.png").wait_for()
    artifact = f"img[src*='{artifact_id}']"
    page.wait_for_function(
        f'() => {{ const i = document.querySelector("{artifact}"); '
        "return i && i.complete && i.naturalWidth > 0; }"
    )
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "dashboard.png"), full_page=True)

    page.goto(f"{dashboard.base}/dashboard/studies/{sid}/trials")
    page.get_by_text(f"{len(trials)} Trials").wait_for(timeout=30_000)
    for t in trials:
        assert page.get_by_text(f"Trial {t.number}", exact=True).count() == 1

    page.goto(f"{dashboard.base}/dashboard/studies/{sid}/note")
    # The note: the stage's verdict in words, and its plot inline from the artifact store.
    page.get_by_text(published["verdict"]).wait_for(timeout=30_000)
    page.wait_for_function(
        f'() => {{ const i = document.querySelector("{artifact}"); '
        "return i && i.complete && i.naturalWidth > 0; }"
    )
    page.screenshot(path=str(SHOTS / "dashboard-note.png"))
    assert failed == []
    page.close()


@pytest.mark.browser
def test_report_opens_from_disk_with_every_image(browser: object, finished: Finished) -> None:
    out = finished.tmp / "report"
    babysit(
        "report",
        "--name",
        RUN,
        "--storage",
        finished.url,
        "--out",
        str(out),
        cwd=finished.tmp,
        check=True,
    )
    page = browser.new_page()  # type: ignore[attr-defined]
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto((out / "report.html").as_uri())
    page.wait_for_load_state("load")
    images = _loaded_images(page, "img")
    assert len(images) == 4
    assert all(i["complete"] and i["width"] > 0 for i in images), images
    assert page.eval_on_selector_all("a[href]", "els => els.length") == 0
    # Only the file itself and its inline images: nothing from a server.
    assert [u for u in requested if not u.startswith(("file:", "data:"))] == []
    assert "test accuracy" in page.inner_text(".headline")
    page.close()


def test_port_in_use_is_one_line_and_exit_2(finished: Finished) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = babysit(
            "dashboard",
            "--storage",
            finished.url,
            "--port",
            str(port),
            cwd=finished.tmp,
            timeout=120,
        )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"babysit: port {port} on 127.0.0.1 is already in use (another dashboard?); pick "
        "another with --port"
    ]


def test_binding_all_interfaces_warns(finished: Finished) -> None:
    port = _free_port()
    log = finished.tmp / "dashboard-public.log"
    proc = _start(
        "--storage",
        finished.url,
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "--quiet",
        cwd=finished.tmp,
        log=log,
    )
    try:
        _wait_until_up(proc, port, log)
    finally:
        code = _interrupt(proc)
    assert code == 0
    text = log.read_text()
    assert "babysit: warning: the dashboard listens on 0.0.0.0" in text
    assert "no login" in text and "delete" in text


def test_ctrl_c_stops_with_exit_0(finished: Finished) -> None:
    port = _free_port()
    log = finished.tmp / "dashboard-stop.log"
    proc = _start("--storage", finished.url, "--port", str(port), cwd=finished.tmp, log=log)
    _wait_until_up(proc, port, log)
    assert _interrupt(proc) == 0
    lines = log.read_text().strip().splitlines()
    assert lines[-1] == "dashboard stopped"
    assert not any("Traceback" in line for line in lines)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


# A run whose coarse range reaches far too high an lr for Adam: some trials diverge.
DIVERGING = [*SMALL, "--set", "coarse.trials=6", "--set", "coarse.lr=[1e-3, 3.0]"]


@dataclass
class Copied:
    source: Dashboard
    copy: Dashboard
    url: str


@pytest.fixture(scope="module")
def diverging(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Copied]:
    """A finished run with diverged trials, its copy in a second storage, and a dashboard
    on each."""
    tmp = tmp_path_factory.mktemp("diverging")
    url, copy_url = f"sqlite:///{tmp / 'src.db'}", f"sqlite:///{tmp / 'copy.db'}"
    babysit("run", "--name", RUN, "--storage", url, *DIVERGING, cwd=tmp, check=True, timeout=600)
    babysit("copy", "--name", RUN, "--from", url, "--to", copy_url, cwd=tmp, check=True)
    started = []
    for name, where in (("src", url), ("copy", copy_url)):
        port, log = _free_port(), tmp / f"dashboard-{name}.log"
        proc = _start("--storage", where, "--port", str(port), "--quiet", cwd=tmp, log=log)
        _wait_until_up(proc, port, log)
        started.append(Dashboard(proc=proc, base=f"http://127.0.0.1:{port}", log=log))
    yield Copied(source=started[0], copy=started[1], url=url)
    for d in started:
        if d.proc.poll() is None:
            _interrupt(d.proc)


# The page's own size (a box that scrolls inside it, like Smart Selection's table, is fine).
_TALLEST = "() => document.documentElement.scrollHeight"
_WIDEST = "() => document.documentElement.scrollWidth"


@pytest.mark.browser
def test_pages_stay_small_with_metric_names_and_a_truthful_contour(
    browser: object, diverging: Copied
) -> None:
    base = diverging.source.base
    study = optuna.load_study(study_name=f"{RUN}/coarse", storage=diverging.url)
    trials = study.get_trials()
    gone = [t for t in trials if t.user_attrs.get("reason") == "diverged"]
    done = [t for t in trials if t.state == TrialState.COMPLETE and t not in gone]
    assert gone and len(done) >= 2, [(t.params, t.value) for t in trials]
    best = max(done, key=lambda t: (t.value, -t.number))
    sid = _study_id(base, f"{RUN}/coarse")
    page = browser.new_page(viewport={"width": 1280, "height": 1000})  # type: ignore[attr-defined]

    # The study page names the objective ("Objective 0" without metric names).
    page.goto(f"{base}/dashboard/studies/{sid}")
    page.get_by_text(f"Best Trial (number={best.number})").wait_for(timeout=30_000)
    page.get_by_text("val_accuracy").first.wait_for()
    assert page.get_by_text("Objective 0").count() == 0

    # A trial page lays out every user attr, each on one line: small attrs keep it narrow.
    for t in trials:
        page.goto(f"{base}/dashboard/studies/{sid}/trials?numbers={t.number}")
        page.get_by_text(f"Trial {t.number} (trial_id=").first.wait_for(timeout=30_000)
        page.get_by_text("trial.json").first.wait_for()  # the curves, as an artifact
        assert page.evaluate(_WIDEST) <= 1600, t.number
    # The other stages' trial pages too: their verdicts are attrs on one line as well.
    for stage in ("sanity", "overfit", "fine", "final"):
        other = optuna.load_study(study_name=f"{RUN}/{stage}", storage=diverging.url)
        other_id = _study_id(base, f"{RUN}/{stage}")
        for t in other.get_trials():
            page.goto(f"{base}/dashboard/studies/{other_id}/trials?numbers={t.number}")
            page.get_by_text(f"Trial {t.number} (trial_id=").first.wait_for(timeout=30_000)
            assert page.evaluate(_WIDEST) <= 1600, (stage, t.number)

    page.goto(f"{base}/dashboard/studies/{sid}/smartSelection")
    page.get_by_text("Show Artifacts").first.wait_for(timeout=30_000)
    page.wait_for_load_state("networkidle")
    assert page.evaluate(_TALLEST) <= 3000

    # The contour's best cell sits at the best trial that training completed: the
    # diverged ones are COMPLETE at chance, so the dashboard pairs values with params right.
    page.goto(f"{base}/dashboard/studies/{sid}/analytics")
    page.wait_for_function(
        "() => { const g = document.getElementById('graph-contour'); "
        "return g && g.data && g.data.length > 0; }",
        timeout=60_000,
    )
    contour = page.evaluate(
        "() => { const d = document.getElementById('graph-contour')"
        ".data[0]; return {x: d.x, y: d.y, z: d.z, type: d.type}; }"
    )
    assert contour["type"] == "contour"
    cells = [
        (z, contour["x"][i], contour["y"][j])
        for j, row in enumerate(contour["z"])
        for i, z in enumerate(row)
        if z is not None
    ]
    assert len(cells) == len(trials)  # every trial drawn, the diverged ones too
    top, x, y = max(cells)
    assert top == pytest.approx(best.value)
    assert (x, y) == (pytest.approx(best.params["lr"]), pytest.approx(best.params["weight_decay"]))
    for t in gone:  # each diverged trial's own cell holds chance, not a neighbour's value
        xi = contour["x"].index(pytest.approx(t.params["lr"]))
        yi = contour["y"].index(pytest.approx(t.params["weight_decay"]))
        assert contour["z"][yi][xi] == pytest.approx(t.value)
    page.close()


@pytest.mark.browser
def test_a_copied_runs_note_images_load(browser: object, diverging: Copied) -> None:
    base = diverging.copy.base
    page = browser.new_page(viewport={"width": 1280, "height": 1000})  # type: ignore[attr-defined]
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    bad: list[str] = []
    page.on("response", lambda r: bad.append(r.url) if r.status >= 400 else None)
    for stage in ("overfit", "coarse", "final"):
        sid = _study_id(base, f"{RUN}/{stage}")
        page.goto(f"{base}/dashboard/studies/{sid}/note")
        page.wait_for_function(
            "() => { const i = document.querySelector('img[src*=\"/artifacts/"
            f"{sid}/\"]'); return i && i.complete && i.naturalWidth > 0; }}",
            timeout=30_000,
        )
    assert failed == [] and bad == []
    page.close()
