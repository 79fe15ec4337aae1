"""Storages beyond one machine: Optuna's gRPC storage proxy and artifacts on S3.

``grpc://host:port`` is a client of ``babysit storage-proxy`` (Optuna's
``run_grpc_proxy_server`` in front of one RDB storage): many workers, one set of database
connections. ``s3://bucket/prefix`` is an artifact store on S3-compatible object storage
(Optuna's ``Boto3ArtifactStore``), endpoint and credentials from the usual AWS
environment variables (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), as boto3 reads them.

Heartbeats: Optuna's ``GrpcStorageProxy`` is not a heartbeat storage (it has no
``record_heartbeat`` RPC; optuna 5.0, optuna/storages/_grpc/client.py), so through the
proxy a worker killed on another host would leave its trial RUNNING for ever and its
stage waiting for it. :class:`HeartbeatGrpcProxy` adds a heartbeat through the calls the
proxy does have: the time, written as a trial system attr every ``heartbeat`` seconds.
A trial whose last stamp is older than ``grace`` is stale. The stamp is the worker's
clock, not the database's (as with Optuna's JournalStorage heartbeats), so hosts' clocks
must agree to well within the grace period (NTP does that).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any
from typing import BinaryIO
from urllib.parse import urlsplit

import optuna
from optuna.storages import BaseStorage
from optuna.storages import GrpcStorageProxy
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from babysit.errors import UsageError
from babysit.schema import SystemKey
from babysit.storage.private import STORAGE_METHODS

DEFAULT_PROXY_PORT = 13000  # Optuna's run_grpc_proxy_server default


def is_grpc(url: str) -> bool:
    return url.startswith("grpc://")


def is_s3(url: str | None) -> bool:
    return bool(url) and str(url).startswith("s3://")


def parse_grpc(url: str) -> tuple[str, int]:
    """``grpc://host:port`` -> (host, port); anything else is a UsageError."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path not in ("", "/") or parts.query:
        raise UsageError(
            f"cannot parse storage URL '{url}'; a storage proxy is "
            "grpc://HOST:PORT (started with `babysit storage-proxy`)"
        )
    return parts.hostname, port


class HeartbeatGrpcProxy(GrpcStorageProxy, BaseHeartbeat):
    """Optuna's gRPC client with a heartbeat carried as a trial system attr, riding out a
    proxy restart.

    A call made while the proxy is down fails with UNAVAILABLE (the request never reached
    a server), and Optuna's client gives up at once; here each call retries for up to
    ``reconnect`` seconds from the first failure, then raises StorageLost, as
    babysit's RDB storage does for a database restart. A database restart behind the proxy
    is ridden out by the proxy's own storage.
    """

    def __init__(
        self, *, host: str, port: int, heartbeat: int | None, grace: int, reconnect: float = 60.0
    ) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(host=host, port=port)
        self._heartbeat = heartbeat if heartbeat and heartbeat > 0 else None
        self._grace = grace
        self.reconnect = reconnect
        self._down_since: float | None = None

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, SystemKey.HEARTBEAT, time.time())
        except Exception:  # noqa: BLE001 - the thread must live on; a lost proxy shows on
            pass  # the main thread's next call, and the trial finished meanwhile is fine

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [t._trial_id for t in running if _stale(t, now, self._grace)]

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat

    def get_heartbeat_stale_trial_callback(
        self,
    ) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return None


def _retrying(name: str) -> Callable[..., Any]:
    method = getattr(GrpcStorageProxy, name)

    def call(self: HeartbeatGrpcProxy, *args: Any, **kwargs: Any) -> Any:
        import grpc

        from babysit.storage.errors import StorageLost

        delay = 0.25
        while True:
            try:
                result = method(self, *args, **kwargs)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                now = time.monotonic()
                if self._down_since is None:
                    self._down_since = now
                    print(
                        f"babysit: storage proxy {self._host}:{self._port} unreachable; "
                        f"retrying for up to {self.reconnect:g} s",
                        file=sys.stderr,
                        flush=True,
                    )
                if now - self._down_since >= self.reconnect:
                    raise StorageLost(
                        f"lost the storage proxy {self._host}:{self._port} for "
                        f"{self.reconnect:g} s; finished trials are stored, the running one "
                        "is marked FAIL once its heartbeat is stale. Rerun the same command "
                        "when the proxy is back"
                    ) from None
                time.sleep(delay)
                delay = min(2 * delay, 2.0)
                continue
            if self._down_since is not None:
                self._down_since = None
                print(
                    f"babysit: storage proxy {self._host}:{self._port} reachable again",
                    file=sys.stderr,
                    flush=True,
                )
            return result

    call.__name__ = name
    call.__doc__ = method.__doc__
    return call


for _name in STORAGE_METHODS:
    setattr(HeartbeatGrpcProxy, _name, _retrying(_name))


def _stale(trial: FrozenTrial, now: float, grace: int) -> bool:
    # A trial with no stamp yet is never stale, as in Optuna's RDB heartbeat.
    stamp = trial.system_attrs.get(SystemKey.HEARTBEAT)
    return isinstance(stamp, (int, float)) and now - stamp > grace


def open_proxy(
    url: str, heartbeat: int | None, grace: int, reconnect: float = 60.0, wait: float = 10.0
) -> HeartbeatGrpcProxy:
    host, port = parse_grpc(url)
    proxy = HeartbeatGrpcProxy(
        host=host, port=port, heartbeat=heartbeat, grace=grace, reconnect=reconnect
    )
    try:
        proxy.wait_server_ready(timeout=wait)
    except ConnectionError:
        proxy.close()
        raise UsageError(
            f"no storage proxy answers at {host}:{port}; start one there with "
            f"`babysit storage-proxy --storage URL --port {port}`"
        ) from None
    return proxy


def serve_proxy(storage: BaseStorage, host: str, port: int, shown: str, threads: int = 10) -> int:
    """Optuna's gRPC proxy server for ``storage`` until SIGINT/SIGTERM."""
    from concurrent.futures import ThreadPoolExecutor

    # gRPC's C core logs its own line for a failed bind; the UsageError below says it.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    import grpc
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port} is not a port number; use 1-65535")
    # Optuna's own advice (run_grpc_proxy_server): a cached storage, not the bare
    # RDBStorage, or every GetTrials reads all finished trials from the database again.
    # The CLI refuses a grpc:// --storage, so this is the database's own RDB storage or a
    # journal file (which keeps its own replay of the file in memory: served as it is).
    served = (
        optuna.storages._CachedStorage(storage)
        if isinstance(storage, optuna.storages.RDBStorage)
        else storage
    )
    pool = ThreadPoolExecutor(max_workers=threads)
    # Optuna's make_server (optuna/storages/_grpc/server.py) with one change: gRPC sets
    # SO_REUSEPORT by default, so a second proxy on a busy port would start and silently
    # share it; without it the second one fails to bind, as a server should.
    server = grpc.server(pool, options=[("grpc.so_reuseport", 0)])
    api_pb2_grpc.add_StorageServiceServicer_to_server(OptunaStorageProxyService(served), server)
    try:
        # grpc raises RuntimeError when it cannot bind the port.
        server.add_insecure_port(f"{host}:{port}")
        server.start()
    except RuntimeError as err:
        pool.shutdown(wait=False)
        raise UsageError(
            f"cannot listen on {host}:{port} ({str(err).split(';')[0]}); is "
            "the port in use? pick another with --port"
        ) from None
    print(f"storage proxy: grpc://{host}:{port} -> {shown} (Ctrl-C to stop)", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(grace=2).wait()
        pool.shutdown(wait=False)
    return 0


class S3ArtifactStore:
    """Optuna's Boto3ArtifactStore under a key prefix, with seekable readers.

    ``torch.load`` needs to seek; an S3 body is a stream, so a reader is a temporary file
    holding the object (a checkpoint is ~200 MB: on disk, not in memory).
    """

    def __init__(self, url: str) -> None:
        import boto3
        from optuna.artifacts import Boto3ArtifactStore

        self.url = url
        self.bucket, self.prefix = parse_s3(url)
        self.client = boto3.client("s3")
        self._store = Boto3ArtifactStore(self.bucket, client=self.client)

    def _key(self, artifact_id: str) -> str:
        return f"{self.prefix}/{artifact_id}" if self.prefix else artifact_id

    def open_reader(self, artifact_id: str) -> BinaryIO:
        body = self._store.open_reader(self._key(artifact_id))
        spool = tempfile.TemporaryFile()
        try:
            shutil.copyfileobj(body, spool)
        finally:
            body.close()
        spool.seek(0)
        return spool

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self._store.write(self._key(artifact_id), content_body)

    def remove(self, artifact_id: str) -> None:
        self._store.remove(self._key(artifact_id))

    def check(self) -> None:
        """The bucket answers, or a UsageError that says what to set."""
        from botocore.exceptions import BotoCoreError
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            raise UsageError(
                f"artifact store {self.url}: bucket '{self.bucket}' is not "
                f"usable ({code or err}); create it or check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY"
            ) from None
        except BotoCoreError as err:
            endpoint = (
                os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL")
                or "AWS"
            )
            raise UsageError(
                f"artifact store {self.url}: cannot reach {endpoint} "
                f"({str(err).splitlines()[0]}); set AWS_ENDPOINT_URL for an "
                "S3-compatible server, and credentials in AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY"
            ) from None


def parse_s3(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query:
        raise UsageError(
            f"cannot parse artifact store '{url}'; use s3://BUCKET[/PREFIX] or a folder"
        )
    return parts.netloc, parts.path.strip("/")
