"""copy_run / `babysit copy`: a whole run moves between storages and goes on there."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path

import optuna
import optuna_dashboard
import pytest
from conftest import CHEAP
from conftest import babysit
from conftest import popen
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from babysit.errors import UsageError
from babysit.record.transfer import copy_run
from babysit.record.transfer import relink
from babysit.storage import Storage
from babysit.storage import open_storage

PASSWORD = "Pg-s3cret-pw"

# The synthetic runs are written with ask/tell, which Optuna warns about when heartbeats are on.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning"),
    pytest.mark.slow,
]

# The cheapest protocol that still trains: a 3-conv AlexNet with one narrow FC layer, an
# overfit LR that memorises 20 digits in ~10 steps, one epoch per search trial.
FAST = [
    *CHEAP,
    "--set",
    "coarse.trials=4",
    "--set",
    "coarse.epochs=1",
    "--set",
    "coarse.lr=[1e-3, 1e-2]",
    "--set",
    "coarse.extend=false",
    "--set",
    "fine.trials=2",
    "--set",
    "fine.epochs=1",
    "--set",
    "final.epochs=2",
    "--quiet",
]


def _with_password(url: str) -> str:
    """The same database, logged in with a password (trust auth accepts any)."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)


def _source(tmp_path: Path) -> tuple[Storage, dict[str, object]]:
    """A run 'r' in SQLite with every kind of thing a run stores, and a second run 'other'."""
    src = open_storage(f"sqlite:///{tmp_path / 'src.db'}", tmp_path / "src-art")
    store = src.artifacts
    dist = {"lr": FloatDistribution(1e-4, 1.0, log=True)}

    coarse = optuna.create_study(study_name="r/coarse", storage=src.rdb, direction="maximize")
    coarse.set_user_attr("spec", {"name": "r", "coarse": {"trials": 4}})
    coarse.set_user_attr("ranges", {"lr": [1e-4, 1.0]})
    done = coarse.ask(dist)
    done.set_user_attr("curves", {"val_acc": [0.5, 0.7]})
    done.report(0.5, 1)
    done.report(0.7, 2)
    # Notes link artifacts by database ids, as report.publish_stage writes them.
    image = tmp_path / "plot.png"
    image.write_bytes(b"\x89PNG" + b"0" * 100)
    trial_png = optuna.artifacts.upload_artifact(
        artifact_store=store, file_path=str(image), study_or_trial=done
    )
    optuna_dashboard.save_note(
        done, f"lr looks good ![c](/artifacts/{coarse._study_id}/{done._trial_id}/{trial_png})"
    )
    coarse.tell(done, 0.7)
    pruned = coarse.ask(dist)
    pruned.set_user_attr("reason", "diverged")
    coarse.tell(pruned, state=TrialState.PRUNED)
    surplus = coarse.ask(dist)
    surplus.set_user_attr("reason", "surplus")
    coarse.tell(surplus, state=TrialState.FAIL)
    running = coarse.ask(dist)
    running.set_user_attr("worker", "elsewhere:123")
    study_png = optuna.artifacts.upload_artifact(
        artifact_store=store, file_path=str(image), study_or_trial=coarse
    )
    optuna_dashboard.save_note(
        coarse, f"coarse: the study note ![p](/artifacts/{coarse._study_id}/{study_png})"
    )

    sanity = optuna.create_study(study_name="r/sanity", storage=src.rdb, direction="minimize")
    sanity.enqueue_trial({}, user_attrs={"key": "sanity"})

    final = optuna.create_study(study_name="r/final", storage=src.rdb, direction="maximize")
    trial = final.ask(dist)
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights" * 100)
    model_id = optuna.artifacts.upload_artifact(
        artifact_store=store, file_path=str(model), study_or_trial=trial
    )
    trial.set_user_attr("model_artifact", model_id)
    final.tell(trial, 0.9)
    store.write("r-final-epoch2-0", io.BytesIO(b"checkpoint" * 50))
    final.set_user_attr("checkpoint", {"artifact_id": "r-final-epoch2-0", "epoch": 2, "trial": 0})

    other = optuna.create_study(study_name="other/coarse", storage=src.rdb)
    other.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    return src, {
        "model": model_id,
        "checkpoint": "r-final-epoch2-0",
        "note_trial": done.number,
        "study_png": study_png,
        "trial_png": trial_png,
    }


def _target(kind: str, tmp_path: Path, postgres: str | None) -> Storage:
    url = postgres if kind == "postgres" else f"sqlite:///{tmp_path / 'dst.db'}"
    dst = open_storage(url, tmp_path / "dst-art")
    # Trials already in the target shift its trial ids away from the source's.
    pad = optuna.create_study(study_name="unrelated", storage=dst.rdb)
    pad.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    return dst


def _comparable(t: optuna.trial.FrozenTrial) -> tuple:
    return (t.number, t.params, t.distributions, t.values, t.intermediate_values, t.datetime_start)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def target_kind(request: pytest.FixtureRequest) -> str:
    return request.param


def test_copy_run_moves_studies_trials_attrs_notes_and_artifacts(
    tmp_path: Path, target_kind: str, request: pytest.FixtureRequest
) -> None:
    postgres = request.getfixturevalue("postgres_url") if target_kind == "postgres" else None
    src, known = _source(tmp_path)
    dst = _target(target_kind, tmp_path, postgres)

    copied = copy_run(src, dst, "r")

    assert copied["studies"] == 3
    assert copied["trials"] == 6
    assert copied["artifacts"] == 4
    assert copied["interrupted"] == 1
    assert copied["missing"] == []
    names = set(optuna.get_all_study_names(dst.rdb))
    assert names == {"unrelated", "r/coarse", "r/sanity", "r/final"}  # not 'other'
    for name in ("r/coarse", "r/sanity", "r/final"):
        a = optuna.load_study(study_name=name, storage=src.rdb)
        b = optuna.load_study(study_name=name, storage=dst.rdb)
        assert b.directions == a.directions
        assert b.user_attrs == a.user_attrs
        ta, tb = a.get_trials(), b.get_trials()
        assert [_comparable(t) for t in tb] == [_comparable(t) for t in ta]
        assert [t.system_attrs for t in tb] == [t.system_attrs for t in ta]
        assert {t._trial_id for t in tb}.isdisjoint({t._trial_id for t in ta})
        for x, y in zip(ta, tb, strict=True):
            if x.state == TrialState.RUNNING:
                # Its process writes to the source; here it is closed and will be replaced.
                assert y.state == TrialState.FAIL
                assert y.user_attrs == {**x.user_attrs, "reason": "running when copied"}
            else:
                assert (y.state, y.user_attrs, y.datetime_complete) == (
                    x.state,
                    x.user_attrs,
                    x.datetime_complete,
                )

    # The dashboard's notes follow their trials to the new trial ids, and their artifact
    # links to the copy's study and trial ids, where the dashboard finds the artifacts.
    from optuna_dashboard.artifact._backend import get_study_artifact_meta
    from optuna_dashboard.artifact._backend import get_trial_artifact_meta

    coarse = optuna.load_study(study_name="r/coarse", storage=dst.rdb)
    sid = coarse._study_id
    assert optuna_dashboard.get_note(coarse) == (
        f"coarse: the study note ![p](/artifacts/{sid}/{known['study_png']})"
    )
    assert get_study_artifact_meta(dst.rdb, sid, known["study_png"]) is not None
    noted = optuna.trial.Trial(coarse, coarse.trials[known["note_trial"]]._trial_id)
    assert optuna_dashboard.get_note(noted) == (
        f"lr looks good ![c](/artifacts/{sid}/{noted._trial_id}/{known['trial_png']})"
    )
    assert get_trial_artifact_meta(dst.rdb, sid, noted._trial_id, known["trial_png"])
    others = [optuna.trial.Trial(coarse, t._trial_id) for t in coarse.trials[1:]]
    assert all(optuna_dashboard.get_note(t) == "" for t in others)

    # Artifacts: the model (trial artifact metadata) and the checkpoint (study attr).
    for artifact_id in (known["model"], known["checkpoint"]):
        assert (tmp_path / "dst-art" / artifact_id).read_bytes() == (
            tmp_path / "src-art" / artifact_id
        ).read_bytes()
    final = optuna.load_study(study_name="r/final", storage=dst.rdb)
    metas = optuna.artifacts.get_all_artifact_meta(final.trials[0], storage=dst.rdb)
    assert [m.artifact_id for m in metas] == [known["model"]]

    # The source is untouched: still RUNNING there, still its own.
    assert optuna.load_study(study_name="r/coarse", storage=src.rdb).trials[3].state == (
        TrialState.RUNNING
    )


def test_relink_points_links_of_copied_studies_and_trials_at_the_new_ids() -> None:
    text = (
        "![a](/artifacts/3/aa-1) ![b](/artifacts/3/17/bb-2) ![c](/artifacts/9/cc-3) "
        "![d](/artifacts/3/99/dd-4) see /artifacts/3/aa-1"
    )
    assert relink(text, {3: 12}, {17: 40}) == (
        "![a](/artifacts/12/aa-1) ![b](/artifacts/12/40/bb-2) ![c](/artifacts/9/cc-3) "
        "![d](/artifacts/3/99/dd-4) see /artifacts/12/aa-1"
    )
    assert relink("no links", {3: 12}, {}) == "no links"


def test_copy_refuses_a_target_that_already_holds_the_run(tmp_path: Path) -> None:
    src, _ = _source(tmp_path)
    dst = open_storage(f"sqlite:///{tmp_path / 'dst.db'}", tmp_path / "dst-art")
    optuna.create_study(study_name="r/fine", storage=dst.rdb)
    with pytest.raises(UsageError, match="already holds r/fine"):
        copy_run(src, dst, "r")
    assert optuna.get_all_study_names(dst.rdb) == ["r/fine"]  # nothing written
    assert not (tmp_path / "dst-art").exists()
    with pytest.raises(UsageError, match="no run named 'nope'"):
        copy_run(src, dst, "nope")


def test_copy_within_one_artifact_store_keeps_the_files(tmp_path: Path) -> None:
    src, known = _source(tmp_path)
    dst = open_storage(f"sqlite:///{tmp_path / 'dst.db'}", tmp_path / "src-art")
    before = (tmp_path / "src-art" / known["checkpoint"]).read_bytes()
    assert copy_run(src, dst, "r")["artifacts"] == 4
    assert (tmp_path / "src-art" / known["checkpoint"]).read_bytes() == before


def test_copy_reports_artifacts_missing_from_the_source_store(tmp_path: Path) -> None:
    src, known = _source(tmp_path)
    (tmp_path / "src-art" / known["checkpoint"]).unlink()
    dst = open_storage(f"sqlite:///{tmp_path / 'dst.db'}", tmp_path / "dst-art")
    copied = copy_run(src, dst, "r")
    assert copied["missing"] == [known["checkpoint"]]
    assert copied["artifacts"] == 3


@pytest.mark.postgres
def test_cli_copy_never_shows_the_password(tmp_path: Path, postgres_url: str) -> None:
    _source(tmp_path)
    url = _with_password(postgres_url)
    args = [
        "copy",
        "--name",
        "r",
        "--from",
        f"sqlite:///{tmp_path / 'src.db'}",
        "--from-artifact-dir",
        str(tmp_path / "src-art"),
        "--to",
        url,
        "--to-artifact-dir",
        str(tmp_path / "dst-art"),
    ]
    first = babysit(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "copied run r: 3 studies, 6 trials, 4 artifacts" in first.stderr
    assert "postgres:***@" in first.stderr
    again = babysit(*args, cwd=tmp_path)
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("babysit: ") and "already holds" in lines[0]
    for proc in (first, again):
        assert PASSWORD not in proc.stdout + proc.stderr


@pytest.mark.postgres
def test_run_stopped_in_sqlite_goes_on_in_postgres(tmp_path: Path, postgres_url: str) -> None:
    """Killed between coarse and fine on a laptop, copied, finished on the shared server."""
    db = tmp_path / "laptop.db"
    args = ["run", "--name", "m", *FAST, "--storage", f"sqlite:///{db}"]
    proc = popen(*args, cwd=tmp_path)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("coarse passed"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    laptop = f"sqlite:///{db}"
    coarse_before = {
        t.number: (t.state, t.params, t.values)
        for t in optuna.load_study(study_name="m/coarse", storage=laptop).get_trials()
    }

    url = _with_password(postgres_url)
    copied = babysit(
        "copy",
        "--name",
        "m",
        "--from",
        laptop,
        "--to",
        url,
        "--to-artifact-dir",
        str(tmp_path / "shared"),
        cwd=tmp_path,
    )
    assert copied.returncode == 0, copied.stderr
    summary = tmp_path / "s.json"
    done = babysit(
        "run",
        "--name",
        "m",
        *FAST,
        "--storage",
        url,
        "--artifact-dir",
        str(tmp_path / "shared"),
        "--summary-json",
        str(summary),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stderr + done.stdout + summary.read_text()

    coarse = optuna.load_study(study_name="m/coarse", storage=postgres_url).get_trials()
    assert {
        t.number: (t.state, t.params, t.values) for t in coarse if t.number in coarse_before
    } == coarse_before  # nothing lost, nothing re-run
    finished = [t for t in coarse if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4
    fine = optuna.load_study(study_name="m/fine", storage=postgres_url).get_trials()
    assert len([t for t in fine if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 2
    assert not [t for t in coarse + fine if t.state == TrialState.RUNNING]
    final = optuna.load_study(study_name="m/final", storage=postgres_url)
    (trial,) = [t for t in final.trials if t.state == TrialState.COMPLETE]
    assert (tmp_path / "shared" / trial.user_attrs["model_artifact"]).is_file()
    # The passed final keeps its model only: the copied checkpoint was resumed, then removed.
    assert not (tmp_path / "shared" / final.user_attrs["checkpoint"]["deleted"]).exists()
    stages = json.loads(summary.read_text())["stages"]
    assert stages["fine"]["trials"] == 2 and stages["final"]["status"] == "passed"
    # The laptop's copy stays as it was left: nothing ran there after the kill.
    assert "m/final" not in optuna.get_all_study_names(laptop)


def test_copy_moves_a_model_file_and_its_json_into_the_run_folder(tmp_path: Path) -> None:
    src = open_storage(f"sqlite:///{tmp_path / 'src.db'}", tmp_path / "src-art")
    final = optuna.create_study(study_name="r/final", storage=src.rdb, direction="maximize")
    trial = final.ask({"lr": FloatDistribution(1e-4, 1e-1, log=True)})
    (tmp_path / "src-art" / "r").mkdir(parents=True)
    (tmp_path / "src-art" / "r" / "model.pt").write_bytes(b"weights" * 10)
    (tmp_path / "src-art" / "r" / "model.json").write_text('{"num_classes": 10}\n')
    trial.set_user_attr("model_artifact", "r/model.pt")
    final.tell(trial, 0.9)
    dst = open_storage(f"sqlite:///{tmp_path / 'dst.db'}", tmp_path / "dst-art")
    copied = copy_run(src, dst, "r")
    assert copied["artifacts"] == 2 and copied["missing"] == []
    for name in ("model.pt", "model.json"):
        assert (tmp_path / "dst-art" / "r" / name).read_bytes() == (
            tmp_path / "src-art" / "r" / name
        ).read_bytes()
    # The copy's summary points at the copy's file, not at the path stored where it trained.
    from babysit.record.model_file import model_path

    assert model_path(dst, "r/model.pt", str(tmp_path / "src-art" / "r" / "model.pt")) == str(
        (tmp_path / "dst-art" / "r" / "model.pt").resolve()
    )
    assert model_path(dst, "3f2a-uuid", "/old/place") == "/old/place"  # an older run's model
