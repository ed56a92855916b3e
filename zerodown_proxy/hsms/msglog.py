"""Per-tool message log in SML text, for troubleshooting; off unless `[hsms] message_log_dir`.

One line per data message crossing a tool's connection, as the tool sees it:

    2026-12-02T06:01:02.345678Z tool->host 127.0.0.1:40512 session=1 sys=0x00000007
      backend=drimeap-blue-1 version=v1 host_sys=0x0000002a S6F11 W <L[3] <U4 7> ...>.

(on one line) with the direction (`tool->host`, `host->tool`, or `proxy->tool` for the SxF0 the
proxy answers itself), the tool's address, session id and system bytes, the backend instance and
the version serving it with the system bytes on that backend session, then the message in SML:
stream/function, W-bit, the body decoded by secs2.py (cut at BODY_CHARS characters).

Files: `<message_log_dir>/<tool address>.sml`, rotated to `.sml.1` ... `.sml.<files-1>` so a
tool's files together never exceed `message_log_max_bytes` (each file at most max_bytes / files;
a line is cut to fit). `message_log_tools` (comma-separated tool IP addresses or device ids)
limits which tools are logged; empty: every tool. Tools at the same address share one file set.
Writes are buffered and flushed every FLUSH_EVERY seconds and when the proxy closes. When the log
is off the data path pays one `is not None` test per message: `ToolLink.msglog` is None.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import secs2
from .codec import Frame

if TYPE_CHECKING:
    from ..config import HsmsSection
    from .backend_link import BackendLink
    from .tool_link import ToolLink

log = logging.getLogger("zerodown.hsms")

BODY_CHARS = 4000
FLUSH_EVERY = 0.5
MIN_FILE_BYTES = 4096


def parse_tools(text: str) -> tuple[frozenset[str], frozenset[int]]:
    """`message_log_tools` -> (IP addresses, device ids). Raises ValueError naming the entry."""
    addrs: set[str] = set()
    ids: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part.isdigit():
            if int(part) > 0x7FFF:
                raise ValueError(f"device id {part} is not 0..32767")
            ids.add(int(part))
        elif all(c.isalnum() or c in ".:-_" for c in part):
            addrs.add(part)
        else:
            raise ValueError(f"{part!r} is neither an IP address nor a device id")
    return frozenset(addrs), frozenset(ids)


def config_problem(files: int, max_bytes: int, tools: str) -> str | None:
    """What is wrong with the [hsms] message_log_* keys, or None."""
    if not 1 <= files <= 100:
        return "message_log_files must be 1..100"
    if max_bytes < files * MIN_FILE_BYTES:
        return (f"message_log_max_bytes must be at least message_log_files x {MIN_FILE_BYTES} "
                f"= {files * MIN_FILE_BYTES}")  # fmt: skip
    try:
        parse_tools(tools)
    except ValueError as exc:
        return f"message_log_tools: {exc}"
    return None


class RotatingFile:
    """`path`, rotated to path.1 .. path.<files-1> before a line would take it past its share."""

    def __init__(self, path: Path, max_bytes: int, files: int) -> None:
        self.path = path
        self.files = max(1, files)
        self.limit = max(MIN_FILE_BYTES, max_bytes // self.files)
        self.users = 0
        self._f = open(path, "ab")  # noqa: SIM115 (held open for the tool's lifetime)
        self.size = os.fstat(self._f.fileno()).st_size  # tell() is 0 in append mode

    def write(self, line: bytes) -> None:
        if len(line) > self.limit:
            line = line[: self.limit - 5] + b"...\n"
        if self.size + len(line) > self.limit:
            self._rotate()
        self._f.write(line)
        self.size += len(line)

    def _rotate(self) -> None:
        self._f.close()
        base = str(self.path)
        if self.files > 1:
            for k in range(self.files - 1, 1, -1):
                if os.path.exists(f"{base}.{k - 1}"):
                    os.replace(f"{base}.{k - 1}", f"{base}.{k}")
            os.replace(base, f"{base}.1")
        self._f = open(base, "wb")  # noqa: SIM115
        self.size = 0

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class ToolLog:
    """What one tool's link calls; formats and writes to its address's file set."""

    __slots__ = ("out", "peer", "owner", "failed")

    def __init__(self, out: RotatingFile, peer: str, owner: MessageLog) -> None:
        self.out = out
        self.peer = peer
        self.owner = owner
        self.failed = False

    def up(self, f: Frame, link: BackendLink, host_sys: int) -> None:
        """`f` (tool numbering) went from the tool to `link` as `host_sys`."""
        self._line("tool->host", f, f.session_id, f.system, link, host_sys)

    def down(self, f: Frame, link: BackendLink, tool_sys: int, tool_session: int) -> None:
        """`f` (backend numbering) went from `link` to the tool as `tool_sys`."""
        self._line("host->tool", f, tool_session, tool_sys, link, f.system)

    def proxy_reply(self, f: Frame) -> None:
        """The proxy answered the tool's primary `f` itself with SxF0."""
        self._line("proxy->tool", f._replace(byte2=f.byte2 & 0x7F, byte3=0, body=b""),
                   f.session_id, f.system, None, None)  # fmt: skip

    def _line(
        self, way: str, f: Frame, session: int, system: int,
        link: BackendLink | None, host_sys: int | None,
    ) -> None:  # fmt: skip
        now = time.time()
        stamp = f"{self.owner.second(now)}.{int(now % 1 * 1e6):06d}Z"
        if link is not None:
            i = link.instance
            where = f"backend={i.id} version={i.version} host_sys=0x{host_sys:08x}"
        else:
            where = "backend=- version=-"
        w = " W" if f.byte2 & 0x80 else ""
        body = secs2.to_sml(f.body, BODY_CHARS) if f.body else ""
        sml = f"S{f.byte2 & 0x7F}F{f.byte3}{w}" + (f" {body}" if body else "") + "."
        text = f"{stamp} {way} {self.peer} session={session} sys=0x{system:08x} {where} {sml}\n"
        try:
            self.out.write(text.encode("utf-8", "replace"))
        except (OSError, ValueError) as exc:  # a full disk (or a log closed at shutdown) must
            # not stop the traffic: the log has a gap
            if not self.failed:
                self.failed = True
                log.warning("HSMS message log %s: %s; lines are missing", self.out.path, exc)
            return
        self.owner.dirty()

    def close(self) -> None:
        self.owner.release(self.out)


class MessageLog:
    """The proxy's message log: which tools are logged, one file set per tool address."""

    def __init__(self, cfg: HsmsSection) -> None:
        self.dir = Path(cfg.message_log_dir)
        self.max_bytes = cfg.message_log_max_bytes
        self.files_per_tool = cfg.message_log_files
        self.addrs, self.ids = parse_tools(cfg.message_log_tools)
        self._open: dict[str, RotatingFile] = {}
        self._second = (-1, "")
        self._flush: asyncio.TimerHandle | None = None
        self.dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_config(cls, cfg: HsmsSection) -> MessageLog | None:
        return cls(cfg) if cfg.message_log_dir else None

    def wants(self, addr: str, device_id: int | None) -> bool:
        if not self.addrs and not self.ids:
            return True
        return addr in self.addrs or (device_id is not None and device_id in self.ids)

    def for_tool(self, tool: ToolLink, addr: str) -> ToolLog | None:
        """The log for `tool` if it is to be logged (at connect by address; a rule by device id
        is checked again once the tool's session id is known)."""
        if not self.wants(addr, tool.sid):
            return None
        out = self._open.get(addr)
        if out is None:
            name = "".join(c if c.isalnum() or c in ".-" else "_" for c in addr) or "unknown"
            try:
                out = RotatingFile(self.dir / f"{name}.sml", self.max_bytes, self.files_per_tool)
            except OSError as exc:
                log.warning("HSMS message log for %s not written: %s", addr, exc)
                return None
            self._open[addr] = out
        out.users += 1
        return ToolLog(out, tool.peer, self)

    def release(self, out: RotatingFile) -> None:
        out.users -= 1
        if out.users <= 0:
            for addr, o in list(self._open.items()):
                if o is out:
                    del self._open[addr]
            out.close()

    def second(self, now: float) -> str:
        """`now` as YYYY-MM-DDTHH:MM:SS UTC (formatted once per second, not once per line)."""
        s = int(now)
        if s != self._second[0]:
            self._second = (s, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)))
        return self._second[1]

    def dirty(self) -> None:
        if self._flush is None:
            # The loop running the proxy (dirty() is only called from its callbacks).
            self._flush = asyncio.get_event_loop().call_later(FLUSH_EVERY, self.flush)

    def flush(self) -> None:
        self._flush = None
        for out in self._open.values():
            try:
                out.flush()
            except OSError as exc:
                log.warning("HSMS message log %s: %s", out.path, exc)

    def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
        self.flush()
        for out in self._open.values():
            out.close()
        self._open.clear()
