"""Fetch a published archive over HTTP and unpack it without trusting it, for ``--download``.

A download goes to ``NAME.part`` beside a small ``NAME.part.json`` that remembers the URL
and the server's validators (ETag, Last-Modified). A dropped connection is resumed with an
HTTP Range request, both within one call (when the attempt had made progress) and by the
next run; a server that ignores Range, or whose file changed (If-Range), sends the whole
file again and the ``.part`` starts over. Only a file whose every pinned digest matches is
renamed to ``NAME``; a mismatch deletes the ``.part``, so a bad file is never taken for a
complete one.

Unpacking goes into a fresh hidden folder beside the target and refuses the whole archive
at the first member that is absolute, climbs out with ``..``, links outside, or is a device
(``tarfile``'s ``data`` filter, plus a refusal of absolute names, which the filter would
only strip). The caller moves the unpacked tree into place with one ``rename``, so a failed
or interrupted unpack never leaves a half tree where the loader looks.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from babysit.data.core import DataError

_CHUNK = 1 << 20
# Seconds without a byte before a connection counts as dropped; long enough for a slow
# academic server, short enough that a dead one does not hang a run.
TIMEOUT = 30.0
# Attempts per call for a transfer that keeps making progress and then drops.
ATTEMPTS = 4
_DIGEST = re.compile(r"^(md5|sha1|sha256):([0-9a-fA-F]+)$")
_HEX_LEN = {"md5": 32, "sha1": 40, "sha256": 64}


class DownloadError(DataError):
    """The transfer, the checksum or the archive failed; the message names the URL or file."""


class ChecksumError(DownloadError):
    """The whole file arrived but is not the one pinned (it has been deleted)."""


@dataclass(frozen=True)
class Archive:
    name: str  # file name on disk, e.g. originalPics.tar.gz
    url: str
    # algorithm -> hex digest; every one must match (at least one is required).
    digests: dict[str, str] = field(default_factory=dict)


def parse_digest(text: str, where: str) -> tuple[str, str]:
    """``md5:HEX``, ``sha1:HEX`` or ``sha256:HEX`` -> (algorithm, lower-case hex)."""
    match = _DIGEST.match(text.strip())
    if not match or len(match.group(2)) != _HEX_LEN[match.group(1)]:
        raise DataError(
            f"{where}: expected a checksum like sha256:<64 hex digits> or md5:<32 hex digits>, "
            f"found '{text}'"
        )
    return match.group(1), match.group(2).lower()


def file_digests(path: Path, algorithms: list[str]) -> dict[str, str]:
    hashers = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            for h in hashers.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashers.items()}


def _mismatches(path: Path, digests: dict[str, str]) -> list[str]:
    got = file_digests(path, sorted(digests))
    return [
        f"{name} {got[name]} (expected {want})"
        for name, want in sorted(digests.items())
        if got[name] != want.lower()
    ]


def _bar(quiet: bool, total: int | None, initial: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        # None: tqdm draws only on a terminal; a log or a pipe gets no carriage-return frames.
        disable=True if quiet else None,
        file=sys.stderr,
        leave=False,
    )


def _read_meta(meta: Path) -> dict[str, Any]:
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _content_range_start(value: str | None) -> int | None:
    # "bytes START-END/TOTAL"
    match = re.match(r"^\s*bytes\s+(\d+)-\d+/(?:\d+|\*)\s*$", value or "")
    return int(match.group(1)) if match else None


class _Dropped(Exception):
    """The connection ended before the whole file arrived."""


def _attempt(archive: Archive, part: Path, meta: Path, quiet: bool, timeout: float) -> bool:
    """One request; True when the ``.part`` now holds the whole file (as far as we can tell)."""
    state = _read_meta(meta)
    have = part.stat().st_size if part.is_file() else 0
    if have and state.get("url") != archive.url:
        # Bytes of another URL (an override changed): they cannot be continued.
        have = 0
    headers = {"User-Agent": "babysit (dataset download)", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        validator = state.get("etag") or state.get("last_modified")
        if validator:
            headers["If-Range"] = validator
    request = urllib.request.Request(archive.url, headers=headers)
    try:
        resp = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:
            # Nothing past our end: the .part is already whole; the checksum decides.
            return True
        raise DownloadError(f"{archive.url} answered HTTP {err.code} {err.reason}") from None
    with resp:
        start = 0
        if have and resp.status == 206:
            start = _content_range_start(resp.headers.get("Content-Range")) or -1
            if start != have:
                raise DownloadError(
                    f"{archive.url} answered a resume from byte {have} with "
                    f"'{resp.headers.get('Content-Range')}'; delete {part} and retry"
                )
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        meta.write_text(
            json.dumps(
                {
                    "url": archive.url,
                    "etag": resp.headers.get("ETag"),
                    "last_modified": resp.headers.get("Last-Modified"),
                    "total": total,
                }
            )
        )
        got = start
        with (
            open(part, "ab" if start else "wb") as fh,
            _bar(quiet, total, start, archive.name) as bar,
        ):
            while True:
                try:
                    chunk = resp.read(_CHUNK)
                except (OSError, http.client.HTTPException) as err:
                    raise _Dropped(f"{type(err).__name__}: {err}", got > start) from None
                if not chunk:
                    break
                fh.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    if total is not None and got < total:
        raise _Dropped(f"the connection closed at byte {got} of {total}", got > start)
    return True


def fetch(
    archive: Archive,
    folder: Path,
    *,
    quiet: bool = False,
    attempts: int = ATTEMPTS,
    timeout: float = TIMEOUT,
) -> Path:
    """``folder/NAME`` with every digest of ``archive`` checked; downloads or resumes it."""
    if not archive.digests:
        raise DataError(f"no checksum is known for {archive.name}; refusing an unchecked download")
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / archive.name
    part = folder / f"{archive.name}.part"
    meta = folder / f"{archive.name}.part.json"
    if final.is_file():
        if not _mismatches(final, archive.digests):
            return final
        # A file renamed into place once matched; it was altered since. Fetch it again.
        final.unlink()
    last = ""
    for attempt in range(attempts):
        try:
            _attempt(archive, part, meta, quiet, timeout)
            break
        except _Dropped as err:
            message, progressed = err.args
            last = message
            # Retry only a transfer that moved: one that cannot even start will not on
            # the next try either, and a run should not sit out a dead server.
            if not progressed or attempt == attempts - 1:
                raise DownloadError(
                    f"the download of {archive.url} broke off ({message}); run again with "
                    f"--download to resume from {part}"
                ) from None
            time.sleep(min(2.0, 0.25 * (attempt + 1)))
        except urllib.error.URLError as err:
            reason = getattr(err, "reason", err)
            raise DownloadError(f"cannot reach {archive.url} ({reason})") from None
        except (OSError, http.client.HTTPException, ValueError) as err:
            # Connection refused / reset before any body, a malformed URL, a full disk.
            raise DownloadError(
                f"cannot download {archive.url} ({type(err).__name__}: {err})"
            ) from None
    else:  # pragma: no cover - the loop always breaks or raises
        raise DownloadError(f"the download of {archive.url} failed ({last})")
    bad = _mismatches(part, archive.digests)
    if bad:
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        raise ChecksumError(
            f"{archive.name} from {archive.url} does not match its checksum: {'; '.join(bad)}; "
            "deleted it (a damaged transfer or a different file)"
        )
    os.replace(part, final)
    meta.unlink(missing_ok=True)
    return final


def _refuse_absolute(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise tarfile.AbsolutePathError(member)
    return member


def unpack_tar(path: Path, parent: Path, *, quiet: bool = False) -> Path:
    """Unpack ``path`` into a new hidden folder under ``parent`` and return that folder.

    Raises DownloadError (and removes the folder) for an unsafe member or a broken archive.
    """
    data_filter: Callable[[tarfile.TarInfo, str], tarfile.TarInfo | None] | None
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is None:
        raise DataError(
            f"unpacking {path.name} safely needs Python 3.11.4 or later (tarfile filters); "
            "upgrade Python or unpack it by hand"
        )

    def safe(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        return data_filter(_refuse_absolute(member, dest), dest)

    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".unpack-{path.name}-", dir=parent))
    try:
        from tqdm import tqdm

        with (
            tarfile.open(path, "r:*") as tar,
            tqdm(
                desc=f"unpack {path.name}",
                unit=" files",
                disable=True if quiet else None,  # drawn on a terminal only
                file=sys.stderr,
                leave=False,
            ) as bar,
        ):

            def counted(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
                out = safe(member, dest)
                bar.update(1)
                return out

            tar.extractall(staging, filter=counted)
    except tarfile.FilterError as err:
        shutil.rmtree(staging, ignore_errors=True)
        # Its checksum matched, so it is the file asked for: fetching it again would not help.
        path.unlink(missing_ok=True)
        raise DownloadError(
            f"refused {path.name}: {err}; a published archive never does this, so nothing "
            "from it was kept"
        ) from None
    except (tarfile.TarError, EOFError, zlib.error) as err:
        shutil.rmtree(staging, ignore_errors=True)
        path.unlink(missing_ok=True)
        raise DownloadError(
            f"{path.name} is not a readable tar archive ({type(err).__name__}: {err}); deleted it"
        ) from None
    except OSError as err:
        # A full or read-only disk: the archive itself is fine and is kept for the next try.
        shutil.rmtree(staging, ignore_errors=True)
        raise DownloadError(
            f"cannot unpack {path} into {parent} ({err.strerror or err})"
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging
