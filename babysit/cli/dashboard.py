"""`babysit dashboard`: optuna-dashboard on a run's storage and artifact store.

optuna-dashboard's WSGI app in a threaded wsgiref server that this module binds itself, so a
port already taken is a one-line error before anything starts and Ctrl-C ends it cleanly.
"""

from __future__ import annotations

import errno
import socket
import sys
import threading
import warnings
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler
from wsgiref.simple_server import WSGIServer
from wsgiref.simple_server import make_server

from babysit.errors import UsageError
from babysit.record.runs import run_names
from babysit.storage import Storage

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_WILDCARD = ("0.0.0.0", "::", "")


class _Server(ThreadingMixIn, WSGIServer):
    # The page polls while open; a tab left behind must not keep the process alive.
    daemon_threads = True
    # Daemon request threads are not joined on close, so a request still in flight could log
    # after "dashboard stopped"; the log line and the stop share this lock and flag.
    log_lock = threading.Lock()
    stopped = False


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        pass


class _LoggingHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        server = self.server
        assert isinstance(server, _Server)
        with server.log_lock:
            if not server.stopped:
                sys.stderr.write(f"dashboard: {self.address_string()} {format % args}\n")


def serve(storage: Storage, host: str = "127.0.0.1", port: int = 8080, quiet: bool = False) -> int:
    """Serve the dashboard until Ctrl-C (or SIGTERM); 0 when stopped that way.

    A port already in use, or an address this machine does not have, is a UsageError
    (exit 2) raised before anything is served.
    """
    import optuna_dashboard

    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is not a port number; use 1-65535 (0: any free port)")
    with warnings.catch_warnings():
        # optuna-dashboard still passes a few Optuna arguments positionally.
        warnings.simplefilter("ignore", FutureWarning)
        app = optuna_dashboard.wsgi(storage.rdb, artifact_store=storage.artifacts)
    server_class = _Server6 if ":" in host else _Server
    handler = _QuietHandler if quiet else _LoggingHandler
    try:
        httpd = make_server(host, port, app, server_class=server_class, handler_class=handler)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise UsageError(
                f"port {port} on {host} is already in use (another dashboard?); "
                "pick another with --port"
            ) from None
        if err.errno == errno.EACCES:
            raise UsageError(
                f"no permission to listen on port {port}; use a port above 1023 with --port"
            ) from None
        raise UsageError(
            f"cannot listen on {host}:{port}: {err.strerror or err}; check --host"
        ) from None
    try:
        _announce(storage, host, httpd.server_address[1])
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    with httpd.log_lock:
        httpd.stopped = True
        print("dashboard stopped", file=sys.stderr, flush=True)
    return 0


def _announce(storage: Storage, host: str, port: int) -> None:
    err = sys.stderr
    if host not in _LOOPBACK:
        print(
            f"babysit: warning: the dashboard listens on {host}, reachable from other "
            "machines; it has no login, and anyone who reaches it can change or delete "
            "studies. Use --host 127.0.0.1 (the default) and an SSH tunnel instead.",
            file=err,
            flush=True,
        )
    shown = socket.gethostname() if host in _WILDCARD else host
    if ":" in shown:
        shown = f"[{shown}]"
    runs = run_names(storage)
    print(
        f"storage: {storage.shown}; artifacts: {storage.artifact_where}; "
        f"{len(runs)} run{'s' if len(runs) != 1 else ''}"
        f"{': ' + ', '.join(runs) if runs else ''}",
        file=err,
        flush=True,
    )
    print(f"dashboard: http://{shown}:{port}/dashboard/ (Ctrl-C to stop)", file=err, flush=True)
