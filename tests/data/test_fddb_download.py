"""``--download`` for FDDB against a local HTTP server that speaks Range, offline.

The server serves two small archives laid out like the published ones: the photos archive
holds ``2002/...`` at its top (it unpacks into ``originalPics/``), the folds archive holds
``FDDB-folds/``. The folds are cut from the real fold-01 annotations in tests/fixtures and
the photos are painted JPEGs (the same tree tests/data/test_data_fddb.py builds).
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from babysit.data import DataError
from babysit.data import DataRequest
from babysit.data import fddb
from babysit.data.download import Archive
from babysit.data.download import fetch
from babysit.errors import UsageError
from tests.conftest import babysit
from tests.conftest import cli_env
from tests.data.test_data_fddb import FOLD_SLICES
from tests.data.test_data_fddb import _entries
from tests.data.test_data_fddb import _options
from tests.data.test_data_fddb import _write_folds
from tests.data.test_data_fddb import _write_photos

FOLD_SETS = [
    "--set",
    "data.train_folds=[1]",
    "--set",
    "data.val_folds=[2]",
    "--set",
    "data.test_folds=[3]",
]


@dataclass
class Served:
    files: dict[str, bytes] = field(default_factory=dict)
    # path -> byte count after which the next response for it is cut off (once).
    drop_after: dict[str, int] = field(default_factory=dict)
    log: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    ignore_range: bool = False  # answer every request with the whole file, as some servers do
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(served: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def do_GET(self) -> None:  # noqa: N802
            rng = self.headers.get("Range")
            with served.lock:
                served.log.append((self.path, rng))
                body = served.files.get(self.path)
                drop = served.drop_after.pop(self.path, None)
            if body is None:
                self.send_error(404)
                return
            etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
            start = 0
            if rng and not served.ignore_range and self.headers.get("If-Range") in (None, etag):
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.send_header("ETag", etag)
            self.end_headers()
            if drop is not None:
                # Headers promise the whole rest; send part of it and hang up.
                self.wfile.write(body[start : start + drop])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body[start:])

    return Handler


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fddb-src")
    entries = _entries()
    _write_folds(root, entries, FOLD_SLICES)
    _write_photos(root, entries)
    return root


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _tar_tree(folder: Path, arcroot: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            tar.add(path, arcname=f"{arcroot}/{rel}" if arcroot else rel, recursive=False)
    return buf.getvalue()


@pytest.fixture(scope="module")
def archives(source: Path) -> dict[str, bytes]:
    # As published: the photos archive has no originalPics/ wrapper, the folds one has.
    return {
        "/pics.tar.gz": _tar_tree(source / fddb.PICS_DIR, ""),
        "/folds.tgz": _tar_tree(source / fddb.FOLDS_DIR, fddb.FOLDS_DIR),
    }


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Served]]:
    served = Served()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(served))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def site(
    server: tuple[str, Served], archives: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> tuple[str, Served, dict[str, str]]:
    """A clean server state and the environment that points babysit at it."""
    base, served = server
    with served.lock:
        served.files = dict(archives)
        served.drop_after.clear()
        served.log.clear()
        served.ignore_range = False
    env = _env_for(base, archives["/pics.tar.gz"], archives["/folds.tgz"])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return base, served, env


def _env_for(base: str, pics: bytes, folds: bytes) -> dict[str, str]:
    return {
        "BABYSIT_FDDB_PICS_URL": f"{base}/pics.tar.gz",
        "BABYSIT_FDDB_PICS_SUM": "sha256:" + hashlib.sha256(pics).hexdigest(),
        "BABYSIT_FDDB_FOLDS_URL": f"{base}/folds.tgz",
        "BABYSIT_FDDB_FOLDS_SUM": "sha256:" + hashlib.sha256(folds).hexdigest(),
    }


def _request(root: Path, download: bool = True) -> DataRequest:
    return DataRequest(data_dir=root, seed=0, download=download, options=_options(), quiet=True)


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_download_unpacks_the_published_layout_and_the_loader_reads_it(
    site: tuple[str, Served, dict[str, str]], source: Path, tmp_path: Path
) -> None:
    _base, served, _env = site
    data = tmp_path / "data"
    splits = fddb.load(_request(data))
    splits.check("fddb")
    assert splits.info["photos"] == {"train": 24, "val": 12, "test": 12}
    assert splits.info["skipped_images"] == 0
    # Byte for byte the tree the archives were made from, and nothing left of the download.
    for folder in (fddb.PICS_DIR, fddb.FOLDS_DIR):
        assert _files(data / folder) == _files(source / folder)
        for rel in _files(source / folder):
            assert (data / folder / rel).read_bytes() == (source / folder / rel).read_bytes()
    assert not (data / fddb.DOWNLOAD_DIR).exists()
    assert served.log == [("/pics.tar.gz", None), ("/folds.tgz", None)]
    # Present now: --download fetches nothing more.
    fddb.load(_request(data))
    assert len(served.log) == 2


def test_a_dropped_connection_is_resumed_with_a_range_request(
    site: tuple[str, Served, dict[str, str]], archives: dict[str, bytes], tmp_path: Path
) -> None:
    base, served, env = site
    body = archives["/pics.tar.gz"]
    cut = len(body) // 3
    archive = Archive(
        "pics.tar.gz", f"{base}/pics.tar.gz", {"sha256": hashlib.sha256(body).hexdigest()}
    )
    # Within one call: the attempt made progress, so it is retried from where it stopped.
    served.drop_after["/pics.tar.gz"] = cut
    got = fetch(archive, tmp_path / "a", quiet=True)
    assert got.read_bytes() == body
    assert served.log == [("/pics.tar.gz", None), ("/pics.tar.gz", f"bytes={cut}-")]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["pics.tar.gz"]

    # Across runs: a run that gives up keeps the .part, and the next one continues it.
    served.log.clear()
    served.drop_after["/pics.tar.gz"] = cut
    with pytest.raises(DataError, match="broke off .* run again with --download to resume"):
        fetch(archive, tmp_path / "b", quiet=True, attempts=1)
    part = tmp_path / "b" / "pics.tar.gz.part"
    assert part.stat().st_size == cut and not (tmp_path / "b" / "pics.tar.gz").exists()
    data = tmp_path / "b-data"
    (data / fddb.DOWNLOAD_DIR).mkdir(parents=True)
    for name in ("pics.tar.gz.part", "pics.tar.gz.part.json"):
        (data / fddb.DOWNLOAD_DIR / name.replace("pics", "originalPics")).write_bytes(
            (tmp_path / "b" / name).read_bytes()
        )
    # The .part remembers its URL; the name on disk is the published one.
    meta = data / fddb.DOWNLOAD_DIR / "originalPics.tar.gz.part.json"
    assert json.loads(meta.read_text())["url"] == env["BABYSIT_FDDB_PICS_URL"]
    fddb.download(data, quiet=True)
    assert served.log[-2:] == [("/pics.tar.gz", f"bytes={cut}-"), ("/folds.tgz", None)]
    assert next((data / fddb.PICS_DIR).rglob("*.jpg"), None) is not None
    assert not (data / fddb.DOWNLOAD_DIR).exists()


def test_a_server_without_range_restarts_and_a_whole_part_is_only_checked(
    site: tuple[str, Served, dict[str, str]], archives: dict[str, bytes], tmp_path: Path
) -> None:
    base, served, _env = site
    body = archives["/folds.tgz"]
    archive = Archive("folds.tgz", f"{base}/folds.tgz", {"md5": hashlib.md5(body).hexdigest()})
    served.ignore_range = True
    served.drop_after["/folds.tgz"] = len(body) // 2
    # The resume gets 200 and the whole file: the .part must start over, not grow to 1.5x.
    assert fetch(archive, tmp_path / "a", quiet=True).read_bytes() == body
    assert [r for _, r in served.log] == [None, f"bytes={len(body) // 2}-"]
    # A .part that is already whole (the run died before renaming it): the server has
    # nothing past its end (416), and the checksum alone admits it.
    served.ignore_range = False
    served.log.clear()
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "folds.tgz.part").write_bytes(body)
    (folder / "folds.tgz.part.json").write_text(json.dumps({"url": archive.url}))
    assert fetch(archive, folder, quiet=True).read_bytes() == body
    assert served.log == [("/folds.tgz", f"bytes={len(body)}-")]


def test_a_wrong_checksum_is_a_usage_error_and_the_file_is_not_kept(
    site: tuple[str, Served, dict[str, str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _base, served, env = site
    monkeypatch.setenv("BABYSIT_FDDB_PICS_SUM", "sha256:" + "0" * 64)
    data = tmp_path / "data"
    with pytest.raises(UsageError) as caught:
        fddb.load(_request(data))
    message = str(caught.value)
    assert caught.value.exit_code == 2 and "\n" not in message
    assert "does not match its checksum" in message and env["BABYSIT_FDDB_PICS_URL"] in message
    assert "tar -xzf originalPics.tar.gz" in message  # the manual steps
    assert "name its checksum with BABYSIT_FDDB_PICS_SUM=sha256:" in message
    # Neither the bad archive, nor its .part, nor a tree built from it.
    assert not (data / fddb.PICS_DIR).exists()
    assert not (data / fddb.DOWNLOAD_DIR).exists()
    # The same bad bytes are refused again, and a right checksum then takes them.
    with pytest.raises(DataError, match="does not match its checksum"):
        fddb.download(data, quiet=True)
    monkeypatch.setenv("BABYSIT_FDDB_PICS_SUM", env["BABYSIT_FDDB_PICS_SUM"])
    fddb.download(data, quiet=True)
    assert (data / fddb.PICS_DIR).is_dir() and (data / fddb.FOLDS_DIR).is_dir()
    assert [path for path, _ in served.log].count("/pics.tar.gz") == 3
    monkeypatch.setenv("BABYSIT_FDDB_FOLDS_SUM", "sha256:abc")
    with pytest.raises(UsageError, match="BABYSIT_FDDB_FOLDS_SUM: expected a checksum like"):
        fddb.download(tmp_path / "other", quiet=True)


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    data = b"escaped\n" if kind == tarfile.REGTYPE else None
    info.size = len(data) if data else 0
    return info, data


@pytest.mark.parametrize(
    "bad",
    [
        ("../../escape.txt", tarfile.REGTYPE, ""),
        ("2002/../../../escape.txt", tarfile.REGTYPE, ""),
        # {outside}: an absolute path into this test's own folder, outside the data folder.
        ("{outside}/abs.txt", tarfile.REGTYPE, ""),
        ("2002/link", tarfile.SYMTYPE, "../../../../escape-dir"),
        ("2002/abs-link", tarfile.SYMTYPE, "/etc"),
        ("2002/hard", tarfile.LNKTYPE, "../../../escape.txt"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-out", "symlink-abs", "hardlink-out"],
)
def test_an_archive_that_escapes_its_folder_is_refused(
    bad: tuple[str, bytes, str],
    site: tuple[str, Served, dict[str, str]],
    archives: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    _base, served, _env = site
    good = _member("2002/07/01/big/img_1.jpg")
    # A harmless member first, so a refusal has something to throw away.
    name, kind, link = bad
    name = name.format(outside=tmp_path / "outside")
    body = _tar([good, _member(name, kind, link), _member("2002/07/01/big/img_2.jpg")])
    served.files["/pics.tar.gz"] = body
    monkeypatch.setenv("BABYSIT_FDDB_PICS_SUM", "sha256:" + hashlib.sha256(body).hexdigest())
    data = tmp_path / "deep" / "er" / "data"
    with pytest.raises(UsageError, match=r"refused originalPics.tar.gz: .*nothing from it"):
        fddb.download(data, quiet=True)
    assert _files(tmp_path) == set()
    assert not any(p.is_symlink() for p in tmp_path.rglob("*"))
    assert not (data / fddb.PICS_DIR).exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_and_offline_both_exit_2_with_the_manual_steps(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/originalPics.tar.gz"
    env = cli_env(BABYSIT_FDDB_PICS_URL=url)
    data = tmp_path / "data"
    args = ["run", "--dataset", "fddb", "--data-dir", str(data), "--quiet"]
    proc = babysit(*args, "--download", cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert f"cannot reach {url}" in lines[0] and "tar -xzf FDDB-folds.tgz" in lines[0]
    assert "check the connection and run again" in lines[0]
    assert not (data / fddb.PICS_DIR).exists()
    # Offline nothing is fetched: the same steps, and no network needed, whether it is the
    # flag or the environment (a cluster node) that says so.
    for how, flags, offline_env in (
        ("--offline", ["--offline"], env),
        ("BABYSIT_OFFLINE=1", [], cli_env(BABYSIT_FDDB_PICS_URL=url, BABYSIT_OFFLINE="1")),
    ):
        proc = babysit(*args, *flags, cwd=tmp_path, env=offline_env, timeout=120)
        assert proc.returncode == 2, (how, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, how
        assert lines[0].startswith("babysit: FDDB not found in "), how
        assert "downloads it (about 580 MB) unless --offline or BABYSIT_OFFLINE=1" in lines[0]
        assert "tar -xzf FDDB-folds.tgz" in lines[0] and "cannot reach" not in lines[0]
    with pytest.raises(UsageError, match=r"FDDB not found .*; `babysit run` downloads it"):
        fddb.load(_request(data, download=False))
    both = babysit(*args, "--download", "--offline", cwd=tmp_path, env=env, timeout=120)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


@pytest.mark.parametrize("how", ["as typed", "--download over BABYSIT_OFFLINE"])
def test_cli_run_download_reaches_the_loaded_data(
    site: tuple[str, Served, dict[str, str]], tmp_path: Path, how: str
) -> None:
    # A whole protocol on FDDB patches takes over a minute here; a user model that stops
    # the run as it is built (right after the data is loaded) shows the same path: the
    # flag, the download, the loader. Its message carries the shape the data gave it.
    (tmp_path / "fddb_probe.py").write_text(
        "def build(num_classes, in_channels, image_size):\n"
        "    raise RuntimeError('probe reached')\n"
    )
    _base, served, env = site
    data = tmp_path / "data"
    proc = babysit(
        "run",
        "--dataset",
        "fddb",
        "--model",
        "fddb_probe:build",
        *(["--download"] if how.startswith("--download") else []),
        "--data-dir",
        str(data),
        *FOLD_SETS,
        cwd=tmp_path,
        env=cli_env(**env, BABYSIT_OFFLINE="1" if how.startswith("--download") else ""),
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    # Before the transfer: what, how big, where to, and how not to.
    assert (
        f"FDDB is not in {data}: downloading it (about 580 MB) into {data}; --offline or "
        "BABYSIT_OFFLINE=1 stops this"
    ) in proc.stderr
    assert "failed to build for (2, 3, " in proc.stderr and "probe reached" in proc.stderr
    assert [path for path, _ in served.log] == ["/pics.tar.gz", "/folds.tgz"]
    # What `babysit datasets` reports for the folder.
    described = fddb.describe(data)
    assert described["present"] is True and described["folds"] == [1, 2, 3]
