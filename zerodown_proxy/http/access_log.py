"""The HTTP access log: one line per response, to stdout or a file reopened on SIGUSR1.

Fields are nginx's `combined` log format (remote address, remote user, local time, request
line with its query string, status, body bytes sent, Referer, User-Agent) plus what a
blue/green proxy adds: the app, the upstream instance and its address and version, the request
id (X-Request-Id, sent to the backend too), the time to the backend's response head (`ttfb`)
and the total time, both from the moment the request head was read. Two formats:
`json` (one object per line, orjson; the default) and `combined` (nginx's line with the extra
fields appended as key=value). A switch is written as a line of its own (`event: switch`),
so a change of version in the log can be read where it happened.

Every line is one write(2) on an O_APPEND descriptor, so lines are never held in a buffer and
workers sharing a file never interleave within a line. `reopen()` (SIGUSR1, as logrotate's
`postrotate` sends to nginx) opens the path again, so a rotated file is released at once.
Nothing here runs when the access log is off: the accounting holds None and checks it once
per response, and backend connections are plain UpstreamProtocols (LoggedUpstream, which notes
the time to first byte and the body bytes, is used only while the log is on).
"""

from __future__ import annotations

import base64
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import orjson

from ..routing import Snapshot, switch_events
from .upstream import UpstreamProtocol

if TYPE_CHECKING:
    from ..routing import Instance
    from .cycle import RequestCycle

log = logging.getLogger("zerodown.http.access")

FORMATS = ("json", "combined")
STDOUT = ("-", "stdout")


def _header(head: bytes, low: bytes, lname: bytes) -> str:
    """A header's value in a request head as forwarded ("-" when absent); `low` is the head
    lower-cased once per line."""
    at = low.find(b"\r\n" + lname + b":")
    if at < 0:
        return "-"
    start = at + len(lname) + 3
    return head[start : head.find(b"\r\n", start)].strip().decode("latin-1")


def _remote_user(head: bytes, low: bytes) -> str:
    if low.find(b"\r\nauthorization:") < 0:
        return "-"
    scheme, _, value = _header(head, low, b"authorization").partition(" ")
    if scheme.lower() != "basic":
        return "-"
    try:
        return base64.b64decode(value.strip(), validate=True).decode("latin-1").partition(":")[0]
    except ValueError:
        return "-"


def _quote(value: str) -> str:
    """nginx's escaping of a quoted field: `"`, `\\` and control bytes as \\xHH."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return value  # the common case, checked in C
    out = []
    for ch in value:
        if ch in '"\\' or ord(ch) < 0x20 or ord(ch) > 0x7E:
            out.append("".join(f"\\x{b:02X}" for b in ch.encode("latin-1", "replace")))
        else:
            out.append(ch)
    return "".join(out)


_local_time = (0, "")  # (second, nginx's $time_local of it): formatted once per second


def _time_local(now: float) -> str:
    global _local_time
    second = int(now)
    if _local_time[0] != second:
        _local_time = (second, time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(second)))
    return _local_time[1]


def _or_dash(value: Any) -> Any:
    return "-" if value is None else value


def _combined(fields: dict[str, Any], ttfb: float | None, total: float | None) -> bytes:
    """nginx's combined line, then the fields it lacks as key=value (`-` when unknown)."""
    method = fields["method"]
    request = "-" if method == "-" else f"{method} {fields['uri']} {fields['protocol']}"
    extra = " ".join(
        f"{k}={_or_dash(v or None)}"
        for k, v in (
            ("request_id", fields["id"]), ("app", fields["app"]),
            ("upstream", fields["instance"]), ("upstream_addr", fields["upstream_addr"]),
            ("version", fields["version"]),
            ("ttfb", f"{ttfb:.3f}" if ttfb is not None else None),
            ("rt", f"{total:.3f}" if total is not None else None),
        )
    )  # fmt: skip
    return (
        f"{fields['remote_addr']} - {_quote(fields['remote_user'])} [{_time_local(fields['ts'])}] "
        f'"{_quote(request)}" {fields["status"]} {_or_dash(fields["body_bytes_sent"])} '
        f'"{_quote(fields["referer"])}" "{_quote(fields["user_agent"])}" {extra}\n'
    ).encode("latin-1", "replace")


class LoggedUpstream(UpstreamProtocol):
    """A backend connection that also notes, on its request cycle, what the access log reports:
    when the response head arrived (`first_byte`, the monotonic time data_received stamped: no
    clock read) and the body bytes relayed (`sent`). The proxy uses it only while the access
    log is on, so with the log off no request pays for either."""

    __slots__ = ()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None:  # an interim (1xx) head first, then the final one overwrites
            cycle.first_byte = self.last_activity
            cycle.sent = 0

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if cycle is not None and self.frame is not None and not self._done:
            cycle.sent += len(body)  # what on_body relays (not an interim's, not extra bytes)
        super().on_body(body)


class AccessLogError(RuntimeError):
    """The access log file cannot be opened; the message says which and why."""


def open_access_log(target: str | None, fmt: str) -> AccessLog | None:
    """The access log for [proxy] access_log's target (None: off)."""
    if target is None:
        return None
    try:
        return AccessLog(target, fmt)
    except OSError as exc:
        raise AccessLogError(f"cannot open the access log {target}: {exc.strerror}") from None


class AccessLog:
    def __init__(self, target: str, fmt: str = "json") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"access log format must be one of {', '.join(FORMATS)}")
        self.path = None if target in STDOUT else target
        self.fmt = fmt
        self.fd = self._open()
        self.failing = False  # a write failed: logged once, until one succeeds again

    def _open(self) -> int:
        if self.path is None:
            return sys.stdout.fileno()
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def reopen(self) -> None:
        """Open the path again (after logrotate moved it away); stdout stays as it is."""
        if self.path is None:
            return
        try:
            fd = self._open()
        except OSError as exc:
            log.error("cannot reopen the access log %s (still writing the old one): %s",
                      self.path, exc)  # fmt: skip
            return
        old, self.fd = self.fd, fd
        os.close(old)
        log.info("access log reopened", extra={"fields": {"path": self.path}})

    def close(self) -> None:
        if self.path is not None and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _write(self, line: bytes) -> None:
        try:
            os.write(self.fd, line)
        except OSError as exc:  # a full disk must not stop the traffic: say so, once
            if not self.failing:
                log.error("access log write failed (lines are lost until it works): %s", exc)
            self.failing = True
            return
        if self.failing:
            log.info("access log writes work again")
            self.failing = False

    # -- lines --------------------------------------------------------------------------------

    def request(self, cycle: RequestCycle, app: str, inst: Instance | None, total: float) -> None:
        """One response: `total` seconds since the request head was read."""
        head = cycle.head  # the head as forwarded: request line and the client's headers
        low = head.lower()
        method, _, rest = head[: head.find(b"\r\n") if head else 0].partition(b" ")
        first_byte = getattr(cycle, "first_byte", 0.0)  # unset: no backend answered
        # first_byte is a monotonic stamp; total runs on perf_counter: go through "now".
        ttfb = max(total - (time.monotonic() - first_byte), 0.0) if first_byte else None
        fields = {
            "ts": time.time(),
            "event": "access",
            "remote_addr": cycle.client.peer or "-",
            "remote_user": _remote_user(head, low),
            "method": (method or cycle.method).decode("latin-1"),
            "uri": rest[: rest.rfind(b" ")].decode("latin-1") or "-",
            "path": cycle.path.decode("latin-1") or "-",
            "protocol": "HTTP/1.1" if cycle.http11 else "HTTP/1.0",
            "status": cycle.status,
            # Unset: a backend connection opened before the log was turned on (SIGHUP).
            "body_bytes_sent": getattr(cycle, "sent", None),
            "referer": _header(head, low, b"referer"),
            "user_agent": _header(head, low, b"user-agent"),
            "host": cycle.host.decode("latin-1") or "-",
            "app": app,
            "instance": None,
            "upstream_addr": None,
            "version": None,
            "id": cycle.request_id,
            "ttfb_ms": round(ttfb * 1000, 3) if ttfb is not None else None,
            "total_ms": round(total * 1000, 3),
        }
        if inst is not None:
            fields["instance"] = inst.id
            fields["upstream_addr"] = f"{inst.address}:{inst.http_port}"
            fields["version"] = inst.version
        if self.fmt == "json":
            self._write(orjson.dumps(fields) + b"\n")
        else:
            self._write(_combined(fields, ttfb, total))

    def refused(self, peer: str, status: int, body_bytes: int) -> None:
        """Input the proxy could not parse as a request (400, 408, 431, ...): answered and
        closed before any request line could be trusted, so most fields are unknown."""
        fields = {
            "ts": time.time(), "event": "access", "remote_addr": peer or "-", "remote_user": "-",
            "method": "-", "uri": "-", "path": "-", "protocol": "-", "status": status,
            "body_bytes_sent": body_bytes, "referer": "-", "user_agent": "-", "host": "-",
            "app": "-", "instance": None, "upstream_addr": None, "version": None, "id": "",
            "ttfb_ms": None, "total_ms": None,
        }  # fmt: skip
        if self.fmt == "json":
            self._write(orjson.dumps(fields) + b"\n")
        else:
            self._write(_combined(fields, None, None))

    def on_snapshot(self, old: Snapshot, new: Snapshot) -> None:
        """Router listener: a line per app whose Active group changed."""
        for event in switch_events(old, new):
            if self.fmt == "json":
                line = orjson.dumps({"ts": round(time.time(), 6), "event": "switch", **event})
            else:
                local = time.strftime("%d/%b/%Y:%H:%M:%S %z")
                pairs = " ".join(f"{k}={v}" for k, v in event.items())
                line = f"- - - [{local}] switch {pairs}".encode()
            self._write(line + b"\n")
