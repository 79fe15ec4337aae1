"""Stage notes and plot artifacts written during a run, the report, and the export.

One real TINY `babysit run` on digits per module, then the same command again: the rerun
must publish nothing twice.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna_dashboard import get_note
from optuna_dashboard import save_note

from babysit.record.artifacts import trial_curves
from babysit.storage import open_storage
from tests.conftest import TINY
from tests.conftest import babysit

# Real processes and whole runs: `make test-slow` (CI runs it after `make test`).
pytestmark = pytest.mark.slow

RUN = "rep"
STAGES = ("sanity", "overfit", "coarse", "fine", "final")
PLOTS = {
    "overfit": "overfit-curve.png",
    "coarse": "coarse-search.png",
    "fine": "fine-search.png",
    "final": "final-curves.png",
}
# TINY, and a smaller network on top: the plots need trials, not a good classifier.
SMALL = [*TINY, "--set", "model.conv_layers=3", "--set", "model.fc_layers=1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EDITED = "## sanity\n\nChecked by hand: fine.\n"


@dataclass
class Finished:
    tmp: Path
    url: str
    verdicts: dict[str, str]
    summary: dict
    first_artifacts: dict[str, list[tuple[str, str]]]
    first_notes: dict[str, str]
    rerun_stderr: str


def _study(url: str, stage: str) -> optuna.Study:
    return optuna.load_study(study_name=f"{RUN}/{stage}", storage=url)


def _artifacts(url: str) -> dict[str, list[tuple[str, str]]]:
    """(file name, artifact id) of every artifact on each stage study."""
    return {
        stage: sorted(
            (m.filename, m.artifact_id)
            for m in optuna.artifacts.get_all_artifact_meta(_study(url, stage))
        )
        for stage in STAGES
    }


def _verdicts(stderr: str) -> dict[str, str]:
    found = dict(
        re.findall(
            r"^(sanity|overfit|coarse|fine|final) (?:passed|failed|recovered): (.+)$",
            stderr,
            flags=re.M,
        )
    )
    assert set(found) == set(STAGES), stderr
    return found


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    tmp = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{tmp / 'babysit.db'}"
    args = [
        "run",
        "--name",
        RUN,
        "--storage",
        url,
        "--summary-json",
        str(tmp / "summary.json"),
        *SMALL,
    ]
    first = babysit(*args, cwd=tmp, check=True)
    assert "could not publish" not in first.stderr, first.stderr
    artifacts = _artifacts(url)
    notes = {stage: get_note(_study(url, stage)) for stage in STAGES}
    # A person edits one note in the dashboard before the rerun.
    save_note(_study(url, "sanity"), EDITED)
    rerun = babysit(*args, cwd=tmp, check=True)
    return Finished(
        tmp=tmp,
        url=url,
        verdicts=_verdicts(first.stderr),
        summary=json.loads((tmp / "summary.json").read_text()),
        first_artifacts=artifacts,
        first_notes=notes,
        rerun_stderr=rerun.stderr,
    )


def test_each_stage_study_has_a_note_with_its_verdict(finished: Finished) -> None:
    notes = finished.first_notes
    for stage in STAGES:
        assert finished.verdicts[stage] in notes[stage], (stage, notes[stage])
    narrowed = _study(finished.url, "fine").user_attrs["narrowed"]
    assert "Narrowed ranges" in notes["fine"] and narrowed["rule"] in notes["fine"]
    for warning in narrowed["warnings"]:
        assert warning in notes["fine"]
    assert f"{finished.summary['stages']['final']['test_accuracy']:.4f}" in notes["final"]
    # The note shows its plot through the dashboard's artifact route.
    study = _study(finished.url, "coarse")
    artifact_id = study.user_attrs["published"]["artifacts"]["coarse-search.png"]
    assert f"(/artifacts/{study._study_id}/{artifact_id})" in notes["coarse"]


def test_rerun_keeps_notes_and_an_edit_made_in_the_dashboard(finished: Finished) -> None:
    for stage in STAGES:
        note = get_note(_study(finished.url, stage))
        assert note == (EDITED if stage == "sanity" else finished.first_notes[stage]), stage
    # Not rewritten with the same text either: the note versions did not move.
    study = _study(finished.url, "overfit")
    assert study._storage.get_study_system_attrs(study._study_id)["dashboard:note_ver"] == 1


def test_plots_are_uploaded_once_even_after_a_rerun(finished: Finished) -> None:
    assert "could not publish" not in finished.rerun_stderr
    art_dir = Path(finished.tmp / "babysit.db.artifacts")
    for stage in STAGES:
        first = finished.first_artifacts[stage]
        plots = [(name, i) for name, i in first if name.endswith(".png")]
        assert [name for name, _ in plots] == ([PLOTS[stage]] if stage in PLOTS else [])
        # Beside the plots, the run's spec: one artifact, on the first study opened.
        assert [name for name, _ in first if (name, _) not in plots] == (
            ["spec.json"] if stage == "sanity" else []
        )
        assert _artifacts(finished.url)[stage] == first, stage
        for name, artifact_id in plots:
            data = (art_dir / artifact_id).read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 5000, name


def test_report_html_is_self_contained_and_has_every_verdict(finished: Finished) -> None:
    # Another artifact folder, empty: the report still comes out, its search scatters
    # redrawn from the trials' params and values; the curves live in the run's store.
    away = finished.tmp / "report-away"
    babysit(
        "report",
        "--name",
        RUN,
        "--storage",
        finished.url,
        "--out",
        str(away),
        "--artifact-dir",
        str(finished.tmp / "elsewhere"),
        cwd=finished.tmp,
        check=True,
    )
    assert len(re.findall(r"<img\b", (away / "report.html").read_text())) == 2
    out = finished.tmp / "report"
    # The plots are redrawn from the trials (and their JSON artifacts), not copied.
    proc = babysit(
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
    assert f"report: {out / 'report.html'}" in proc.stderr
    page = (out / "report.html").read_text()
    for stage, verdict in finished.verdicts.items():
        # Escaped as the page escapes text (quotes too: "the coarse stage's best").
        assert html.escape(verdict, quote=True) in page, stage
    final = finished.summary["stages"]["final"]
    assert (
        f"test accuracy {final['test_accuracy']:.4f} at epoch {final['best_epoch']} of "
        f"{final['epochs']}, test loss {final['test_loss']:.4f}" in page
    )
    images = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)
    assert len(images) == 4
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    # Nothing fetched from anywhere: no scripts, stylesheets or links out.
    assert not re.search(r"https?://|<script|<link|\bhref=", page)
    # The top-trials tables list every finished coarse trial, each with its lr.
    for t in _study(finished.url, "coarse").get_trials():
        assert f"<td class=num>{t.params['lr']:.4g}</td>" in page
    # Timing: one row per stage, with the sum of trial durations and the wall time.
    for stage in STAGES:
        assert re.search(
            rf"<tr><td>{stage}</td><td>passed</td><td class=num>\d+</td>"
            r"<td class=num>[\d.]+ (s|min)</td><td class=num>[\d.]+ (s|min)</td>",
            page,
        ), stage

    md = (out / "report.md").read_text()
    for verdict in finished.verdicts.values():
        assert verdict in md
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(linked) == ["coarse.png", "final.png", "fine.png", "overfit.png"]
    for name in linked:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)


def _trial_count(url: str) -> int:
    return sum(len(_study(url, stage).get_trials()) for stage in STAGES)


def test_export_csv_and_parquet_hold_every_trial_and_agree(finished: Finished) -> None:
    csv_path = finished.tmp / "trials.csv"
    pq_path = finished.tmp / "trials.parquet"
    proc = babysit(
        "export",
        "--name",
        RUN,
        "--storage",
        finished.url,
        "--format",
        "csv",
        "--out",
        str(csv_path),
        cwd=finished.tmp,
        check=True,
    )
    rows = _trial_count(finished.url)
    assert f"exported {rows} trials to {csv_path}" in proc.stderr
    babysit(
        "export",
        "--name",
        RUN,
        "--storage",
        finished.url,
        "--format",
        "parquet",
        "--out",
        str(pq_path),
        "--curves",
        str(finished.tmp / "curves.parquet"),
        cwd=finished.tmp,
        check=True,
    )
    csv = pd.read_csv(csv_path, dtype_backend="numpy_nullable")
    pq = pd.read_parquet(pq_path)
    assert len(csv) == len(pq) == rows
    assert list(csv.columns) == list(pq.columns)
    assert sorted(set(pq["study"])) == sorted(f"{RUN}/{s}" for s in STAGES)
    # One column per meaning: no `value` whose meaning changes with the stage.
    for col in (
        "run",
        "stage",
        "trial",
        "state",
        "lr",
        "weight_decay",
        "initial_loss",
        "train_accuracy",
        "val_accuracy",
        "test_accuracy",
        "datetime_start",
        "datetime_complete",
        "duration_s",
        "worker",
        "examples",
        "epochs_run",
    ):
        assert col in pq.columns, col
    assert "value" not in pq.columns and "curves" not in pq.columns
    for col in ("trial", "examples", "epochs_run", "steps"):
        assert pd.api.types.is_integer_dtype(pq[col]) and pd.api.types.is_integer_dtype(csv[col])
    for col in pq.columns:
        if col.startswith("datetime_"):
            assert pd.to_datetime(csv[col]).equals(pq[col]), col
        elif pd.api.types.is_numeric_dtype(pq[col]):
            for a, b in zip(csv[col], pq[col], strict=True):
                assert (pd.isna(a) and pd.isna(b)) or math.isclose(a, b, rel_tol=1e-12), col
        else:
            assert (
                csv[col].fillna("").astype(str).tolist() == pq[col].fillna("").astype(str).tolist()
            ), col
    final = pq[pq["stage"] == "final"].iloc[0]
    stored = _study(finished.url, "final").trials[0]
    assert final["val_accuracy"] == stored.user_attrs["val_accuracy"]
    assert final["duration_s"] == pytest.approx(stored.duration.total_seconds())
    # The curves table holds the final trial's curves as they were stored.
    curves = pd.read_parquet(finished.tmp / "curves.parquet")
    mine = curves[(curves["stage"] == "final") & (curves["trial"] == stored.number)]
    read = trial_curves(open_storage(finished.url, None, create=False), stored)
    assert read
    for metric, values in read.items():
        got = mine[mine["metric"] == metric].sort_values("epoch")
        assert list(got["epoch"]) == list(range(1, len(values) + 1))
        assert list(got["value"]) == pytest.approx(values, nan_ok=True), metric


def test_unknown_run_is_one_line_and_exit_2(finished: Finished) -> None:
    proc = babysit("export", "--name", "nope", "--storage", finished.url, cwd=finished.tmp)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("babysit: no run named 'nope'")
    assert not list(finished.tmp.glob("nope-trials.*"))


_OUTCOMES = ("complete", "diverged", "pruned", "failed")


def _counted(text: str) -> tuple[int, ...]:
    """The count of trials in words (schema.counts_text) found in ``text``."""
    m = re.search(r"(\d+) complete, (\d+) diverged, (\d+) pruned, (\d+) failed", text)
    assert m, text
    return tuple(int(g) for g in m.groups())


def test_status_verdicts_summary_report_and_export_count_trials_alike(finished: Finished) -> None:
    """One run: the same numbers in the verdicts, the summary JSON, `status` (JSON and
    text), the report and the export, diverged trials apart from complete and pruned."""
    url, tmp = finished.url, finished.tmp
    where = ("--name", RUN, "--storage", url)
    as_json = json.loads(babysit("status", *where, "--json", cwd=tmp, check=True).stdout)
    text = babysit("status", *where, cwd=tmp, check=True).stdout.splitlines()
    babysit("export", *where, "--out", str(tmp / "counted.csv"), cwd=tmp, check=True)
    frame = pd.read_csv(tmp / "counted.csv", dtype_backend="numpy_nullable")
    babysit("report", *where, "--out", str(tmp / "counted"), cwd=tmp, check=True)
    md = (tmp / "counted" / "report.md").read_text()
    for stage in ("coarse", "fine"):
        entry = finished.summary["stages"][stage]
        want = tuple(entry[k] for k in _OUTCOMES)
        assert sum(want[:3]) == entry["trials"]
        assert _counted(finished.verdicts[stage]) == want, stage
        assert tuple(as_json["stages"][stage][k] for k in _OUTCOMES) == want
        [line] = [line for line in text if line.split()[:1] == [stage]]
        assert _counted(line) == want, line
        section = md.split(f"## {stage}", 1)[1].split("\n## ", 1)[0]
        assert _counted(section) == want, section
        rows = frame[frame["stage"] == stage]
        rows = rows[rows["outcome"] != "surplus"]
        assert tuple(int((rows["outcome"] == o).sum()) for o in _OUTCOMES) == want
        # `diverged` is its own column: Optuna's state says COMPLETE for a diverged trial.
        assert rows["diverged"].tolist() == (rows["outcome"] == "diverged").tolist()
        complete = rows[(rows["state"] == "COMPLETE") & ~rows["diverged"].astype(bool)]
        assert len(complete) == want[0]
    # Overfit is a stage of tries: the LRs tried of those it may try, not a target missed.
    overfit = as_json["stages"]["overfit"]
    tried = int((frame["stage"] == "overfit").sum())
    assert overfit["tried"] == tried and overfit["lrs"] >= tried
    [line] = [line for line in text if line.split()[:1] == ["overfit"]]
    assert f" {tried} of up to {overfit['lrs']} LRs tried" in line, line
