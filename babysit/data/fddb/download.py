"""Fetching FDDB: the two published archives, their checksums, and placing them safely.

``BABYSIT_FDDB_PICS_URL`` / ``BABYSIT_FDDB_FOLDS_URL`` (and ``..._SUM``) name a mirror.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from babysit.data.core import DataError
from babysit.data.core import say_download
from babysit.data.download import Archive
from babysit.data.download import ChecksumError
from babysit.data.download import DownloadError
from babysit.data.download import fetch
from babysit.data.download import parse_digest
from babysit.data.download import unpack_tar
from babysit.data.fddb.annotations import FOLDS_DIR
from babysit.data.fddb.annotations import PICS_DIR
from babysit.data.fddb.annotations import _folds_present

_HOW_TO_GET = (
    "{first}, or get {pics_url} and {folds_url}, then "
    "`mkdir -p {data_dir}/originalPics && tar -xzf originalPics.tar.gz -C "
    "{data_dir}/originalPics && tar -xzf FDDB-folds.tgz -C {data_dir}`"
)
PICS_URL = "http://tamaraberg.com/faceDataset/originalPics.tar.gz"
FOLDS_URL = "http://vis-www.cs.umass.edu/fddb/FDDB-folds.tgz"
# Checksums of the published archives. Not measured here (this machine has no internet):
# they are the ones other projects pin for the same URLs, and a first real download should
# confirm them and add a SHA-256. originalPics.tar.gz: md5 from the get_data.sh of
# github.com/penolove/FDDB_DataSet_4_faster_rcnn (a wget of the vis-www.cs.umass.edu copy
# reports 579061091 bytes). FDDB-folds.tgz: md5 from that script and sha1 from vipy's
# dataset/fddb.py, two independent sources. Should a copy differ, the error says how to
# name another checksum (BABYSIT_FDDB_PICS_SUM / BABYSIT_FDDB_FOLDS_SUM).
PICS_DIGESTS = {"md5": "cf414253ac596cd858daae0cc321d793"}
FOLDS_DIGESTS = {
    "md5": "4cf9badc939a3398a0d6f3a3c8540f55",
    "sha1": "94ce19ba3348425dfbb8bcbe55802490f8f152f8",
}
DOWNLOAD_DIR = ".babysit-download"


def _archives() -> tuple[Archive, Archive]:
    """The photos and the folds archives, with the URL and checksum overrides applied.

    ``BABYSIT_FDDB_PICS_URL`` / ``BABYSIT_FDDB_FOLDS_URL`` point at a mirror (or a test
    server); ``BABYSIT_FDDB_PICS_SUM`` / ``BABYSIT_FDDB_FOLDS_SUM`` (``sha256:HEX``,
    ``sha1:HEX`` or ``md5:HEX``) replace the pinned checksums. A URL override alone keeps the
    pinned checksums: a mirror must serve the published bytes.
    """
    out = []
    for name, url, digests, var in (
        ("originalPics.tar.gz", PICS_URL, PICS_DIGESTS, "BABYSIT_FDDB_PICS"),
        ("FDDB-folds.tgz", FOLDS_URL, FOLDS_DIGESTS, "BABYSIT_FDDB_FOLDS"),
    ):
        url = os.environ.get(f"{var}_URL") or url
        given = os.environ.get(f"{var}_SUM")
        if given:
            algorithm, hexdigest = parse_digest(given, f"{var}_SUM")
            digests = {algorithm: hexdigest}
        out.append(Archive(name, url, dict(digests)))
    return out[0], out[1]


def _how_to_get(data_dir: Path, downloading: bool = False) -> str:
    try:
        pics, folds = _archives()
        urls = {"pics_url": pics.url, "folds_url": folds.url}
    except DataError:
        urls = {"pics_url": PICS_URL, "folds_url": FOLDS_URL}
    first = (
        "check the connection and run again"
        if downloading
        else "`babysit run` downloads it (about 580 MB) unless --offline or BABYSIT_OFFLINE=1"
    )
    return _HOW_TO_GET.format(data_dir=data_dir, first=first, **urls)


def _place(root: Path, target: Path) -> None:
    """Move the unpacked tree into place in one rename: the loader sees all of it or none."""
    try:
        os.rename(root, target)
    except OSError:
        if not target.is_dir():
            raise
        # Another run placed the same tree first; theirs is as good as ours.


def download(data_dir: Path, quiet: bool = False) -> None:
    """Fetch, check and unpack whichever of ``originalPics/`` and ``FDDB-folds/`` is missing.

    The photos archive holds ``2002/``, ``2003/`` at its top (it unpacks *into*
    ``originalPics/``); the folds archive holds ``FDDB-folds/``. Either wrapping is accepted.
    """
    data_dir = Path(data_dir)
    pics, folds = _archives()
    work = data_dir / DOWNLOAD_DIR
    if not all((data_dir / d).is_dir() for d in (PICS_DIR, FOLDS_DIR)):
        say_download("FDDB", "about 580 MB", data_dir, quiet)
    for archive, target in ((pics, data_dir / PICS_DIR), (folds, data_dir / FOLDS_DIR)):
        if target.is_dir():
            continue
        try:
            path = fetch(archive, work, quiet=quiet)
            staging = unpack_tar(path, work, quiet=quiet)
            try:
                root = staging / target.name if (staging / target.name).is_dir() else staging
                if target.name == PICS_DIR and next(root.rglob("*.jpg"), None) is None:
                    raise DownloadError(f"{archive.name} from {archive.url} holds no .jpg photos")
                if target.name == FOLDS_DIR and not _folds_present(root):
                    raise DownloadError(
                        f"{archive.name} from {archive.url} holds no FDDB-fold-XX.txt with its "
                        "FDDB-fold-XX-ellipseList.txt"
                    )
                _place(root, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        except ChecksumError as err:
            _drop_if_empty(work)
            var = "BABYSIT_FDDB_PICS_SUM" if target.name == PICS_DIR else "BABYSIT_FDDB_FOLDS_SUM"
            raise DataError(
                f"FDDB download failed: {err}; retry with --download, or, if you trust this "
                f"copy, name its checksum with {var}=sha256:<hex>; "
                + _how_to_get(data_dir, downloading=True)
            ) from None
        except DataError as err:
            _drop_if_empty(work)
            raise DataError(
                f"FDDB download failed: {err}; {_how_to_get(data_dir, downloading=True)}"
            ) from None
        except OSError as err:
            _drop_if_empty(work)
            raise DataError(
                f"FDDB download failed: cannot write under {work} ({err.strerror or err}); "
                + _how_to_get(data_dir, downloading=True)
            ) from None
        # The archive is only a means; 550 MB kept beside the unpacked photos helps no one.
        path.unlink(missing_ok=True)
    _drop_if_empty(work)


def _drop_if_empty(folder: Path) -> None:
    # A .part worth resuming keeps the folder; an empty one is clutter in the data folder.
    with contextlib.suppress(OSError):
        folder.rmdir()
