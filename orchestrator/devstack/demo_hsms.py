"""HSMS part of `zerodown demo`: simulated tools sending event reports through the proxy's :5000
while the release happens, and the checks that say whether the tools noticed.

Each tool (a secsgem SimTool, HSMS active) selects once and sends S6F11 at a steady rate. Once
the switch is applied, each tool asks S1F1 which version answers (SOFTREV). A clean release
means: every event report answered, no reconnect, one Select per tool, and only the new version
answering after the switch.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .hsms_sim import DATAID_STRIDE, SimTool


@dataclass(frozen=True, slots=True)
class HsmsSummary:
    tools: int
    sent: int
    replied: int
    failed: int
    disconnects: int
    selects: int
    versions_after: dict[str, int]
    errors: tuple[str, ...]

    def ok(self, new_version: str | None) -> bool:
        return (
            self.sent > 0
            and self.failed == 0
            and self.disconnects == 0
            and self.selects == self.tools
            and set(self.versions_after) == {new_version}
        )


class HsmsLoad:
    """N simulated tools on threads (secsgem is thread-based), each one select for the whole run."""

    def __init__(self, port: int, tools: int = 2, rate: float = 50.0) -> None:
        self.tools = [
            SimTool("127.0.0.1", port, name=f"demo-tool-{k}", t3=10.0) for k in range(1, tools + 1)
        ]
        self.rate = rate
        self._stop = threading.Event()
        self._switched = threading.Event()
        self._versions: Counter[str] = Counter()
        self._errors: list[str] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self, timeout: float = 15.0) -> None:
        for t in self.tools:
            t.start()
        for t in self.tools:
            t.wait_selected(timeout)
        for k, t in enumerate(self.tools, 1):
            th = threading.Thread(target=self._drive, args=(k, t), daemon=True)
            th.start()
            self._threads.append(th)

    def switch_applied(self) -> None:
        """Called once every proxy applied the switch: each tool then probes SOFTREV."""
        self._switched.set()

    def _drive(self, k: int, tool: SimTool) -> None:
        period = 1.0 / self.rate if self.rate > 0 else 0.0
        probed = False
        seq = 0
        deadline = time.monotonic() + 600  # bounded even if the demo never stops us
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self._switched.is_set() and not probed:
                probed = True
                try:
                    v = tool.softrev(10.0)
                    with self._lock:
                        self._versions[v] += 1
                except Exception as exc:  # reported in the summary, never raised
                    with self._lock:
                        self._errors.append(f"{tool.name}: S1F1 after the switch failed: {exc}")
            seq += 1
            tool.send_event(k * DATAID_STRIDE + seq)
            if period:
                self._stop.wait(period)

    def stop(self) -> HsmsSummary:
        self._stop.set()
        for th in self._threads:
            th.join(15)
        stats: list[dict[str, Any]] = [t.stats for t in self.tools]
        for t in self.tools:
            t.stop()
        errors = list(self._errors) + [e for t in self.tools for e in t.errors]
        sent = sum(s["sent"] for s in stats)
        replied = sum(s["replied"] for s in stats)
        return HsmsSummary(
            tools=len(self.tools),
            sent=sent,
            replied=replied,
            failed=sent - replied,
            disconnects=sum(s["disconnects"] for s in stats),
            selects=sum(s["selects"] for s in stats),
            versions_after=dict(self._versions),
            errors=tuple(errors[:5]),
        )
