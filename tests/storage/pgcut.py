"""A TCP proxy in front of PostgreSQL that reads the client's side of the wire protocol and
loses the server's reply to the COMMIT of a chosen transaction: the server has committed,
the client never hears it, and its connection is gone. That is the worst moment for a
connection to drop, and a restart or a network cut cannot aim at it."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field

# A transaction as the proxy saw it: (query text, raw Bind payload) per executed statement.
Txn = list[tuple[str, bytes]]

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104


@dataclass
class Trigger:
    """Cut at the ``nth`` COMMIT (counted from 1) whose transaction ``matches``."""

    name: str
    matches: Callable[[Txn], bool]
    nth: int = 1
    seen: int = 0
    fired: bool = False


@dataclass
class _Conn:
    client: socket.socket
    upstream: socket.socket
    statements: dict[str, str] = field(default_factory=dict)  # prepared name -> query
    txn: Txn = field(default_factory=list)
    swallow: bool = False


class CommitCutter:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.triggers: list[Trigger] = []
        self.fired: list[str] = []
        self._lock = threading.Lock()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen()
        self.port = self._server.getsockname()[1]
        self._conns: list[_Conn] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, name: str, matches: Callable[[Txn], bool], nth: int = 1) -> None:
        with self._lock:
            self.triggers.append(Trigger(name, matches, nth))

    def close(self) -> None:
        for s in [self._server, *(x for c in self._conns for x in (c.client, c.upstream))]:
            _close(s)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            conn = _Conn(client, upstream)
            self._conns.append(conn)
            threading.Thread(target=self._from_client, args=(conn,), daemon=True).start()
            threading.Thread(target=self._from_server, args=(conn,), daemon=True).start()

    def _from_server(self, conn: _Conn) -> None:
        try:
            while data := conn.upstream.recv(65536):
                if conn.swallow:
                    break  # the reply to the chosen COMMIT: the client never sees it
                conn.client.sendall(data)
        except OSError:
            pass
        _close(conn.client)
        _close(conn.upstream)

    def _from_client(self, conn: _Conn) -> None:
        buf = b""
        startup = True
        try:
            while data := conn.client.recv(65536):
                buf += data
                out = b""
                while True:
                    if startup:
                        if len(buf) < 8:
                            break
                        (length,) = struct.unpack("!I", buf[:4])
                        if len(buf) < length:
                            break
                        code = struct.unpack("!I", buf[4:8])[0]
                        startup = code in (_SSL_REQUEST, _GSSENC_REQUEST)
                        out, buf = out + buf[:length], buf[length:]
                        continue
                    if len(buf) < 5:
                        break
                    kind = buf[:1]
                    (length,) = struct.unpack("!I", buf[1:5])
                    if len(buf) < 1 + length:
                        break
                    message, buf = buf[: 1 + length], buf[1 + length :]
                    if self._observe(conn, kind, message[5:]):
                        conn.swallow = True  # before the COMMIT reaches the server
                    out += message
                conn.upstream.sendall(out)
        except OSError:
            pass
        if not conn.swallow:
            _close(conn.client)
            _close(conn.upstream)

    def _observe(self, conn: _Conn, kind: bytes, payload: bytes) -> bool:
        """Track the transaction; True when this message is the COMMIT to cut after."""
        if kind == b"P":
            name, query = payload.split(b"\0")[:2]
            conn.statements[name.decode()] = query.decode(errors="replace")
        elif kind == b"B":
            stmt = payload.split(b"\0")[1].decode()
            conn.txn.append((conn.statements.get(stmt, ""), payload))
        elif kind == b"Q":
            query = payload.rstrip(b"\0").decode(errors="replace").strip().upper()
            if query.startswith(("BEGIN", "ROLLBACK")):
                conn.txn = []
            elif query.startswith("COMMIT"):
                txn, conn.txn = conn.txn, []
                with self._lock:
                    for t in self.triggers:
                        if not t.fired and t.matches(txn):
                            t.seen += 1
                            if t.seen == t.nth:
                                t.fired = True
                                self.fired.append(t.name)
                                return True
            else:
                conn.txn.append((query, b""))
        return False


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


def updates_state(state: str) -> Callable[[Txn], bool]:
    """A transaction that sets a trial's state to ``state`` (an UPDATE, not the INSERT)."""
    return lambda txn: any(
        q.lstrip().upper().startswith("UPDATE TRIALS SET STATE") and state.encode() in p
        for q, p in txn
    )


def deletes_study(txn: Txn) -> bool:
    return any(q.lstrip().upper().startswith("DELETE FROM STUDIES") for q, _ in txn)
