"""`zerodown hsms-sim`: equipment simulator on secsgem (HSMS active side).

Each SimTool connects to a host (the proxy on :5000, or a sample-app directly), selects, sends
S6F11 event reports and waits for S6F12, probes S1F1 to learn which version (SOFTREV) answered,
and answers the host's primaries: S2F41 -> S2F42 <L <B 0> <L>> after `reply_delay` seconds (so a
test can hold a host-initiated transaction open across a switch), S1F1 -> S1F2, S1F13 -> S1F14.

The CLI runs N tools at R events/s each for S seconds. Tool k (1-based) numbers its DATAIDs
k*10_000_000 + 1, + 2, ... so every transaction is unique and increasing per tool, and a host's
record shows lost or duplicated reports at a glance.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from typing import Any

import orjson

from .hsms_secsgem import (
    ConnectionLost,
    NotSelected,
    PeerHandler,
    TransactionRejected,
    TransactionTimeout,
    peer_settings,
)

DATAID_STRIDE = 10_000_000  # DATAIDs of tool k are k*STRIDE + seq; U4 holds 428 tools


class SimTool:
    """One simulated tool: an HSMS active secsgem session with counters."""

    def __init__(
        self,
        host: str,
        port: int,
        device_id: int = 0,
        name: str = "tool-1",
        reply_delay: float = 0.0,
        t3: float = 10.0,
        t5: float = 10.0,
    ) -> None:
        self.name = name
        self.target = f"{host}:{port}"
        self.reply_delay = reply_delay
        self.t3 = t3
        self._lock = threading.Lock()
        self._selected = threading.Event()
        self._stats: dict[str, Any] = {
            "sent": 0,
            "replied": 0,
            "timed_out": 0,
            "rejected": 0,
            "nacked": 0,
            "aborted": 0,
            "not_selected": 0,
            "disconnects": 0,
            "selects": 0,
            "versions": Counter(),
            "host_primaries_answered": 0,
            "wrong_device_id": 0,
        }
        self.rtts: list[float] = []  # seconds, one per replied S6F11
        self.errors: list[str] = []  # the first few failure messages, for the report
        self._timers: set[threading.Timer] = set()
        settings = peer_settings(
            passive=False, address=host, port=port, device_id=device_id, t3=t3, t5=t5
        )
        self._handler = PeerHandler(settings)
        h = self._handler
        h.register_stream_function(2, 41, self._on_s2f41)
        h.register_stream_function(1, 1, self._on_s1f1)
        h.register_stream_function(1, 13, self._on_s1f13)
        h.events.communicating += self._on_selected
        h.events.disconnected += self._on_disconnected
        self._started = False

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        self._handler.enable()

    def wait_selected(self, timeout: float) -> None:
        if not self._selected.wait(timeout):
            raise TimeoutError(
                f"{self.name}: not SELECTED by {self.target} within {timeout:g} s "
                "(is the proxy or sample-app listening there?)"
            )

    @property
    def selected(self) -> bool:
        return self._selected.is_set() and self._handler.selected()

    def stop(self) -> None:
        """Separate and close the session (no reconnect); pending delayed replies are cancelled."""
        with self._lock:
            timers = list(self._timers)
        for t in timers:
            t.cancel()
        if self._started:
            self._started = False
            self._handler.disable()

    # -- transactions -------------------------------------------------------------------------

    def send_event(self, dataid: int, ceid: int = 1000) -> bool:
        """S6F11 with this DATAID; True when S6F12 ACKC6=0 came back within T3."""
        h = self._handler
        s6f11 = h.stream_function(6, 11)({"DATAID": dataid, "CEID": ceid, "RPT": []})
        t0 = time.perf_counter()
        try:
            reply = h.hsms.transact(s6f11, self.t3)
        except NotSelected as exc:
            self._fail("not_selected", exc, counted_as_sent=False)
            return False
        except TransactionTimeout as exc:
            self._fail("timed_out", exc)
            return False
        except TransactionRejected as exc:
            self._fail("rejected", exc)
            return False
        except ConnectionLost as exc:
            self._fail("aborted", exc)
            return False
        rtt = time.perf_counter() - t0
        ok = reply.header.stream == 6 and reply.header.function == 12 and h.decode(reply).get() == 0
        with self._lock:
            self._stats["sent"] += 1
            if ok:
                self._stats["replied"] += 1
                self.rtts.append(rtt)
            else:
                self._stats["nacked"] += 1
                self._note(
                    f"S6F11 DATAID {dataid} answered S{reply.header.stream}F{reply.header.function}"
                )
        return ok

    def softrev(self, timeout: float) -> str:
        """S1F1 -> the SOFTREV of whoever answered (raises PeerError, or ValueError on a bad S1F2)."""
        h = self._handler
        reply = h.hsms.transact(h.stream_function(1, 1)(), timeout)
        body = h.decode(reply).get()
        if reply.header.function != 2 or len(body) < 2:
            raise ValueError(f"{self.name}: S1F1 answered without SOFTREV: {body!r}")
        version = str(body[1])
        with self._lock:
            self._stats["versions"][version] += 1
        return version

    @property
    def stats(self) -> dict[str, Any]:
        with self._lock:
            out = dict(self._stats)
            out["versions"] = dict(self._stats["versions"])
        out["wrong_device_id"] = self._handler.wrong_device_id
        return out

    def _fail(self, key: str, exc: Exception, counted_as_sent: bool = True) -> None:
        with self._lock:
            self._stats[key] += 1
            if counted_as_sent:
                self._stats["sent"] += 1
            self._note(str(exc))

    def _note(self, msg: str) -> None:
        if len(self.errors) < 10:
            self.errors.append(f"{self.name}: {msg}")

    # -- secsgem callbacks (dispatcher thread: must not block) --------------------------------

    def _on_selected(self, _data: dict[str, Any]) -> None:
        with self._lock:
            self._stats["selects"] += 1
        self._selected.set()

    def _on_disconnected(self, _data: dict[str, Any]) -> None:
        self._selected.clear()
        if self._started:  # our own stop() is not a disconnect the tool suffered
            with self._lock:
                self._stats["disconnects"] += 1

    def _on_s2f41(self, handler: PeerHandler, message: Any) -> Any:
        reply = handler.stream_function(2, 42)({"HCACK": 0, "PARAMS": []})
        if self.reply_delay <= 0:
            self._count_answered()
            return reply
        # a delayed answer runs on a timer so the dispatcher keeps delivering other replies
        system = message.header.system

        def answer() -> None:
            with self._lock:
                self._timers.discard(timer)
            if handler.send_response(reply, system):
                self._count_answered()

        timer = threading.Timer(self.reply_delay, answer)
        timer.daemon = True
        with self._lock:
            self._timers.add(timer)
        timer.start()
        return None

    def _count_answered(self) -> None:
        with self._lock:
            self._stats["host_primaries_answered"] += 1

    def _on_s1f1(self, handler: PeerHandler, message: Any) -> Any:
        self._count_answered()
        return handler.stream_function(1, 2)([self.name[:20], "hsms-sim"])

    def _on_s1f13(self, handler: PeerHandler, message: Any) -> Any:
        self._count_answered()
        return handler.stream_function(1, 14)({"COMMACK": 0, "MDLN": [self.name[:20], "hsms-sim"]})


# -- CLI ---------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default="127.0.0.1:5000",
        help="HOST:PORT of the proxy or host (default %(default)s)",
    )
    p.add_argument(
        "--tools",
        type=int,
        default=1,
        help="number of simulated tools (sessions) (default %(default)s)",
    )
    p.add_argument(
        "--rate", type=float, default=10.0, help="S6F11 per second per tool (default %(default)s)"
    )
    p.add_argument(
        "--seconds", type=float, default=10.0, help="how long to send (default %(default)s)"
    )
    p.add_argument(
        "--device-id", type=int, default=0, help="HSMS session (device) id (default %(default)s)"
    )
    p.add_argument(
        "--probe-every",
        type=float,
        default=1.0,
        help="S1F1 SOFTREV probe period (s) (default %(default)s)",
    )
    p.add_argument(
        "--t3", type=float, default=10.0, help="reply timeout T3 (s) (default %(default)s)"
    )
    p.add_argument(
        "--reply-delay",
        type=float,
        default=0.0,
        help="delay before answering S2F41 (default %(default)s)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        help="time allowed to select (default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def parse_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--target {target!r} is not HOST:PORT (for example 127.0.0.1:5000)")
    return host, int(port)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _drive(tool: SimTool, index: int, rate: float, seconds: float, probe_every: float) -> None:
    """Send S6F11 at `rate`/s (sequentially: a slow reply delays the next) and probe S1F1."""
    seq = 0
    start = time.monotonic()
    end = start + seconds
    next_probe = start
    interval = 1.0 / rate
    while (now := time.monotonic()) < end:
        if probe_every > 0 and now >= next_probe:
            next_probe = now + probe_every
            try:
                tool.softrev(tool.t3)
            except Exception as exc:  # a failed probe is reported, the run goes on
                tool._note(f"S1F1 probe: {exc}")
        seq += 1
        tool.send_event(index * DATAID_STRIDE + seq)
        delay = min(start + seq * interval, end) - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def run_sim(
    host: str,
    port: int,
    tools: int,
    rate: float,
    seconds: float,
    device_id: int = 0,
    probe_every: float = 1.0,
    t3: float = 10.0,
    reply_delay: float = 0.0,
    connect_timeout: float = 10.0,
) -> dict[str, Any]:
    """Run the simulation and return the report (see `format_report`)."""
    sims = [
        SimTool(host, port, device_id, f"tool-{k}", reply_delay=reply_delay, t3=t3)
        for k in range(1, tools + 1)
    ]
    t_start = time.monotonic()
    try:
        for s in sims:
            s.start()
        deadline = time.monotonic() + connect_timeout
        for s in sims:
            s.wait_selected(max(0.0, deadline - time.monotonic()))
        threads = [
            threading.Thread(target=_drive, args=(s, k, rate, seconds, probe_every), daemon=True)
            for k, s in enumerate(sims, start=1)
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
    finally:
        for s in sims:
            s.stop()
    return _report(sims, f"{host}:{port}", elapsed, time.monotonic() - t_start)


def _report(sims: list[SimTool], target: str, elapsed: float, wall: float) -> dict[str, Any]:
    keys = ("sent", "replied", "timed_out", "rejected", "nacked", "aborted", "not_selected")
    keys += ("disconnects", "selects", "host_primaries_answered", "wrong_device_id")
    total = {k: sum(s.stats[k] for s in sims) for k in keys}
    versions: Counter[str] = Counter()
    for s in sims:
        versions.update(s.stats["versions"])
    rtts = [r for s in sims for r in s.rtts]
    p50, p99 = percentile(rtts, 0.50), percentile(rtts, 0.99)
    return {
        "target": target,
        "tools": len(sims),
        "seconds": round(elapsed, 3),
        "wall_seconds": round(wall, 3),
        **total,
        "tps": round(total["replied"] / elapsed, 1) if elapsed > 0 else 0.0,
        "versions": dict(versions),
        "rtt_ms": {
            "p50": None if p50 is None else round(p50 * 1000, 3),
            "p99": None if p99 is None else round(p99 * 1000, 3),
        },
        "per_tool": {s.name: s.stats for s in sims},
        "errors": [e for s in sims for e in s.errors][:20],
        "ok": total["sent"] == total["replied"] and total["sent"] > 0 and total["disconnects"] == 0,
    }


def format_report(r: dict[str, Any]) -> str:
    rtt = r["rtt_ms"]
    versions = ", ".join(f"{v} x{n}" for v, n in sorted(r["versions"].items())) or "none"
    lines = [
        f"hsms-sim: {r['tools']} tool(s) -> {r['target']} for {r['seconds']:.1f} s",
        f"  S6F11 sent {r['sent']}  replied {r['replied']}  timed out {r['timed_out']}  "
        f"rejected {r['rejected']}  nacked {r['nacked']}  aborted {r['aborted']}  "
        f"not selected {r['not_selected']}",
        f"  throughput {r['tps']:.1f} tx/s   RTT p50 {_ms(rtt['p50'])}  p99 {_ms(rtt['p99'])}",
        f"  sessions: selects {r['selects']}  disconnects {r['disconnects']}  "
        f"host primaries answered {r['host_primaries_answered']}",
        f"  versions that answered S1F1: {versions}",
    ]
    lines += [f"  ! {e}" for e in r["errors"]]
    lines.append(
        "  result: OK" if r["ok"] else "  result: FAILED (lost transactions or disconnects)"
    )
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} ms"


def run(args: argparse.Namespace) -> int:
    try:
        host, port = parse_target(args.target)
        if args.tools < 1 or args.tools * DATAID_STRIDE + DATAID_STRIDE > 2**32:
            raise ValueError(f"--tools must be between 1 and {2**32 // DATAID_STRIDE - 1}")
        if args.rate <= 0 or args.seconds <= 0:
            raise ValueError("--rate and --seconds must be positive")
    except ValueError as exc:
        print(f"zerodown: {exc}", file=sys.stderr)
        return 2
    try:
        report = run_sim(
            host,
            port,
            args.tools,
            args.rate,
            args.seconds,
            device_id=args.device_id,
            probe_every=args.probe_every,
            t3=args.t3,
            reply_delay=args.reply_delay,
            connect_timeout=args.connect_timeout,
        )
    except TimeoutError as exc:
        print(f"zerodown: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_report(report))
    if not report["ok"]:
        print(
            "zerodown: hsms-sim saw lost transactions or disconnects (see report)", file=sys.stderr
        )
        return 1
    return 0
