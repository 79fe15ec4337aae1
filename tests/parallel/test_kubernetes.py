"""deploy/kubernetes/: every manifest valid against the Kubernetes schemas (offline, through
kubernetes-validate's bundled JSON schemas), every file in the kustomization, every babysit
command one that babysit's own CLI parser accepts, and the pieces wired to each other."""

from __future__ import annotations

import copy
import socket
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from babysit.cli.parser import build_parser
from babysit.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes still supported upstream when these were written, and the newest
# whose schemas the package bundles.
VERSIONS = ("1.33.0", kubernetes_validate.latest_version())


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())


def _manifests() -> dict[str, list[dict[str, Any]]]:
    return {
        p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
        for p in sorted(DEPLOY.glob("*.yaml"))
        if p.name != "kustomization.yaml"
    }


def _objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for docs in _manifests().values() for d in docs}


def _pod(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def _containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(object name, its pod spec, container) for every container in the base."""
    out = []
    for (kind, name), obj in _objects().items():
        if kind in ("Job", "Deployment", "StatefulSet"):
            for c in _pod(obj)["containers"]:
                out.append((name, _pod(obj), c))
    return out


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No connection leaves this process while a test validates: the schemas are bundled."""

    def refuse(*_a: object, **_k: object) -> None:
        raise OSError("network use during an offline validation")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_the_kustomization_lists_every_file_and_only_files_that_exist() -> None:
    listed = _kustomization()["resources"]
    on_disk = sorted(p.name for p in DEPLOY.iterdir() if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    assert len(set(listed)) == len(listed)
    # The image every babysit container names is the one the kustomization sets.
    images = {i["name"] for i in _kustomization()["images"]}
    babysit = {c["image"] for _, _, c in _containers() if c["image"] != "postgres:16"}
    assert babysit == images == {"babysit"}


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    kinds = []
    for name, docs in _manifests().items():
        assert docs, f"{name} is empty"
        for doc in docs:
            # strict: a field the schema does not know (a typo) is an error too.
            kubernetes_validate.validate(doc, version, strict=True)
            kinds.append(doc["kind"])
    assert sorted(kinds) == sorted(
        [
            "Deployment",
            "Job",
            "Job",
            "Job",
            "PersistentVolumeClaim",
            "Service",
            "Service",
            "StatefulSet",
        ]
    )


@pytest.mark.usefixtures("offline")
def test_the_validation_catches_a_broken_manifest() -> None:
    """The check above can fail: a misspelt field and a wrong type are refused."""
    job = copy.deepcopy(_objects()[("Job", "babysit-workers")])
    job["spec"]["paralelism"] = 4
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, VERSIONS[-1], strict=True)
    job = copy.deepcopy(_objects()[("Job", "babysit-workers")])
    job["spec"]["completions"] = "four"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, VERSIONS[-1], strict=True)


def test_every_babysit_command_parses_with_babysits_own_parser() -> None:
    parser = build_parser()
    verbs = {}
    for name, _, c in _containers():
        if c["image"] != "babysit":
            continue
        assert "command" not in c, "the image's entrypoint is `babysit`; only args are given"
        args = parser.parse_args(c["args"])  # a UsageError on a flag babysit lacks
        verbs[name] = args
    assert {n: a.command for n, a in verbs.items()} == {
        "babysit-proxy": "storage-proxy",
        "babysit-run": "run",
        "babysit-workers": "worker",
        "babysit-final": "worker",
    }
    # One run: the run, the workers and the final name the same.
    assert len({verbs[n].name for n in ("babysit-run", "babysit-workers", "babysit-final")}) == 1
    # The parser used here refuses what babysit refuses.
    with pytest.raises(UsageError):
        parser.parse_args(["worker", "--name", "digits", "--final-procs-typo", "4"])


def test_the_pieces_are_wired_to_each_other() -> None:
    objs = _objects()
    parser = build_parser()
    proxy_pod = objs[("Deployment", "babysit-proxy")]
    proxy = _pod(proxy_pod)["containers"][0]
    port = parser.parse_args(proxy["args"]).port
    service = objs[("Service", "babysit-proxy")]
    assert service["spec"]["ports"][0]["targetPort"] == port
    assert (
        service["spec"]["selector"].items()
        <= proxy_pod["spec"]["template"]["metadata"]["labels"].items()
    )
    # Only the proxy talks to PostgreSQL, with the password from the Secret (never a file).
    pg = objs[("StatefulSet", "postgres")]
    pg_env = _env(_pod(pg)["containers"][0])
    env = _env(proxy)
    secret = pg_env["POSTGRES_PASSWORD"]["secretKeyRef"]
    assert env["POSTGRES_PASSWORD"]["secretKeyRef"] == secret
    pg_port = objs[("Service", "postgres")]["spec"]["ports"][0]["port"]
    assert env["BABYSIT_STORAGE"] == (
        f"postgresql+psycopg://{pg_env['POSTGRES_USER']}:$(POSTGRES_PASSWORD)"
        f"@postgres:{pg_port}/{pg_env['POSTGRES_DB']}"
    )
    # Every other babysit pod goes through the proxy's Service and mounts the artifacts.
    claim = objs[("PersistentVolumeClaim", "babysit-artifacts")]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("babysit-run", "babysit-workers", "babysit-final"):
        pod = _pod(objs[("Job", name)])
        c = pod["containers"][0]
        assert _env(c)["BABYSIT_STORAGE"] == f"grpc://babysit-proxy:{port}"
        mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert _env(c)["BABYSIT_ARTIFACTS"] == mount["artifacts"]
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols["artifacts"]["persistentVolumeClaim"]["claimName"] == "babysit-artifacts"
        # A worker that starts before the run exists exits 2 and must be started again.
        assert pod["restartPolicy"] == "OnFailure"
    # N workers as an Indexed Job.
    workers = objs[("Job", "babysit-workers")]["spec"]
    assert workers["completionMode"] == "Indexed"
    assert workers["parallelism"] == workers["completions"] >= 2
    # The final: one GPU per rank.
    final = _pod(objs[("Job", "babysit-final")])
    c = final["containers"][0]
    args = parser.parse_args(c["args"])
    assert args.final_procs >= 2 and args.device == "cuda"
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == args.final_procs
    shm = {v["name"]: v for v in final["volumes"]}["shm"]
    assert shm["emptyDir"]["medium"] == "Memory"
