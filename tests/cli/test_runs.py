"""`babysit runs` and `babysit delete`, on SQLite, on PostgreSQL and with artifacts on S3.

The runs are written in this process through babysit's own writers (the spec on every
stage study, trial data as JSON artifacts, the final's model file and its JSON beside it),
as a finished run leaves them, in seconds; the verbs are the real command line.
"""

from __future__ import annotations

import io
import json
import os
import pty
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution

from babysit.record.artifacts import store_spec
from babysit.record.artifacts import store_trial_data
from babysit.record.stored import summary
from babysit.schema import STAGES
from babysit.schema import Param
from babysit.schema import Reason
from babysit.schema import Stage
from babysit.schema import TrialKey
from babysit.schema import study_name
from babysit.spec import Spec
from babysit.storage import Storage
from babysit.storage import open_storage
from tests.conftest import babysit
from tests.conftest import cli_env

# Trials told by hand, not by Study.optimize: Optuna warns that the heartbeat is unused.
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")

_DIST = {
    Param.LR: FloatDistribution(1e-5, 1.0, log=True),
    Param.WEIGHT_DECAY: FloatDistribution(1e-6, 1e-2, log=True),
}
BUCKET = "babysit-runs"
S3_KEYS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _trial(study: optuna.Study, storage: Storage, value: float, **attrs: object) -> None:
    t = study.ask(_DIST)
    store_trial_data(storage, t, **{TrialKey.CURVES: {"val_acc": [value]}})
    for key, v in attrs.items():
        t.set_user_attr(key, v)
    study.tell(t, value)


def write_run(storage: Storage, run: str, test_accuracy: float = 0.9) -> None:
    """A finished run: five stage studies with the spec, a diverged coarse trial, and the
    final's model at ``<run>/model.pt`` with ``<run>/model.json`` beside it."""
    spec = Spec()
    spec.name = run
    spec.coarse.trials = spec.fine.trials = 2  # the two trials written: both stages passed
    for stage in STAGES:
        study = optuna.create_study(
            study_name=study_name(run, stage),
            storage=storage.rdb,
            direction="minimize" if stage == Stage.SANITY else "maximize",
        )
        store_spec(storage, spec, study)
        if stage == Stage.SANITY:
            t = study.ask()
            t.set_user_attr(TrialKey.STATUS, "passed")
            study.tell(t, 2.3)
        elif stage == Stage.OVERFIT:
            t = study.ask({Param.LR: _DIST[Param.LR]})
            study.tell(t, 1.0)
        elif stage in (Stage.COARSE, Stage.FINE):
            _trial(study, storage, 0.6)
            _trial(study, storage, 0.1, **{TrialKey.REASON: Reason.DIVERGED})
        else:
            model = f"{run}/model.pt"
            for name, data in ((model, b"weights"), (f"{run}/model.json", b"{}")):
                if not storage.artifact_store:
                    (storage.artifact_dir / run).mkdir(parents=True, exist_ok=True)
                storage.artifacts.write(name, io.BytesIO(data))
            _trial(
                study,
                storage,
                0.7,
                **{TrialKey.TEST_ACCURACY: test_accuracy, TrialKey.MODEL_ARTIFACT: model},
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 (real HTTP) with a bucket; the environment to reach it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", **S3_KEYS}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        yield env
    finally:
        server.stop()


def _bucket_keys() -> list[str]:
    import boto3

    listing = boto3.client("s3").list_objects_v2(Bucket=BUCKET)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_runs_lists_each_run_and_delete_removes_one_with_its_artifacts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'babysit.db'}"
    storage = open_storage(url)
    write_run(storage, "keep", test_accuracy=0.91)
    write_run(storage, "doomed", test_accuracy=0.85)
    art = tmp_path / "babysit.db.artifacts"
    kept = [f for f in _files(art) if f.startswith("keep/")]
    before = _files(art)
    assert "doomed/model.pt" in before and "doomed/model.json" in before

    rows = json.loads(babysit("runs", "--storage", url, "--json", cwd=tmp_path, check=True).stdout)
    assert [r["name"] for r in rows] == ["keep", "doomed"]
    keep = rows[0]
    assert (keep["dataset"], keep["model"]) == ("digits", "alexnet")
    assert keep["stages"] == {s: "passed" for s in STAGES}
    assert keep["test_accuracy"] == 0.91 and keep["best_val_accuracy"] == 0.6
    assert keep["started"] and keep["wall_seconds"] is not None
    table = babysit("runs", "--storage", url, cwd=tmp_path, check=True).stdout.splitlines()
    assert table[0].split() == ["run", "dataset", "model", *STAGES, "best", "started", "wall"]
    assert table[1].split()[:9] == ["keep", "digits", "alexnet", *["passed"] * 5, "test"]
    assert "test 0.8500" in table[2]

    # Not on a terminal and without --yes: refused, one line, nothing removed.
    refused = babysit("delete", "--name", "doomed", "--storage", url, cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "--yes" in refused.stderr and "5 studies" in refused.stderr
    assert _files(art) == before

    done = babysit("delete", "--name", "doomed", "--storage", url, "--yes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "deleted run doomed: 5 studies" in done.stderr
    assert set(optuna.get_all_study_names(url)) == {study_name("keep", s) for s in STAGES}
    # Every artifact of the deleted run is gone, its folder too; the other run's are there.
    remaining = _files(art)
    assert not any(f.startswith("doomed/") for f in remaining)
    assert not (art / "doomed").exists()
    assert set(kept) <= set(remaining)
    assert len(remaining) == len(before) // 2  # two runs written alike: half the files
    keep_storage = open_storage(url, create=False)
    assert summary(keep_storage, "keep")["stages"]["final"]["test_accuracy"] == 0.91

    # The name is gone: the verbs that read a run list the runs there instead.
    for verb in ("status", "export"):
        proc = babysit(verb, "--name", "doomed", "--storage", url, cwd=tmp_path)
        assert proc.returncode == 2, (verb, proc.stderr)
        assert (
            proc.stderr == f"babysit: no run named 'doomed' in storage {url}; runs there: keep\n"
        )
    assert _files(art) == remaining


def test_delete_on_a_terminal_asks_first(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'babysit.db'}"
    write_run(open_storage(url), "asked")

    def answer(text: bytes) -> tuple[int, str]:
        leader, follower = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "babysit", "delete", "--name", "asked", "--storage", url],
            cwd=tmp_path,
            env=cli_env(),
            stdin=follower,
            stdout=follower,
            stderr=follower,
        )
        os.close(follower)
        os.write(leader, text)
        said = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed: the process is done
                break
            if not chunk:
                break
            said += chunk
        os.close(leader)
        return proc.wait(timeout=60), said.decode(errors="replace")

    code, said = answer(b"n\n")
    assert code == 1 and "delete run asked in " in said and "[y/N]" in said, said
    assert "nothing deleted" in said
    assert len(optuna.get_all_study_names(url)) == 5
    code, said = answer(b"y\n")
    assert code == 0 and "deleted run asked" in said, said
    assert optuna.get_all_study_names(url) == []


@pytest.mark.postgres
def test_runs_and_delete_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    storage = open_storage(postgres_url, tmp_path / "art")
    run = f"pg-{os.getpid()}"
    write_run(storage, run)
    write_run(storage, "other")
    flags = ("--storage", postgres_url, "--artifact-dir", str(tmp_path / "art"))
    rows = json.loads(babysit("runs", *flags[:2], "--json", cwd=tmp_path, check=True).stdout)
    assert [r["name"] for r in rows] == [run, "other"]
    babysit("delete", "--name", run, *flags, "--yes", cwd=tmp_path, check=True)
    assert set(optuna.get_all_study_names(postgres_url)) == {
        study_name("other", s) for s in STAGES
    }
    assert not (tmp_path / "art" / run).exists() and (tmp_path / "art" / "other").is_dir()


def test_delete_removes_the_runs_objects_on_s3(tmp_path: Path, s3: dict[str, str]) -> None:
    url = f"sqlite:///{tmp_path / 'babysit.db'}"
    store = f"s3://{BUCKET}/team"
    storage = open_storage(url, artifact_store=store)
    write_run(storage, "s3run")
    write_run(storage, "s3keep")
    before = _bucket_keys()
    assert "team/s3run/model.pt" in before and "team/s3keep/model.pt" in before
    env = cli_env(**s3)
    proc = babysit(
        "delete",
        "--name",
        "s3run",
        "--storage",
        url,
        "--artifact-store",
        store,
        "--yes",
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    after = _bucket_keys()
    assert not any(k.startswith("team/s3run/") for k in after)
    assert "team/s3keep/model.pt" in after and len(after) == len(before) // 2
    assert not (tmp_path / "babysit.db.artifacts").exists()  # nothing written locally
    rows = json.loads(babysit("runs", "--storage", url, "--json", cwd=tmp_path, env=env).stdout)
    assert [r["name"] for r in rows] == ["s3keep"]
