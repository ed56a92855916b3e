"""`zerodown switch --verify 60s`: after the flip, watch the new Active version through every
proxy's /metrics and judge it against the previous version's baseline; past a threshold the
caller rolls back (cli.py, through the backend's own rollback).

What is compared (scrape.py reads the proxies' series):
- HTTP 5xx rate of the new version (plus the proxy's own 5xx for the app, version "-") against
  the old version's over the baseline: fail if higher by more than `max_5xx_increase`;
- HTTP p99 latency (from the histogram buckets): fail if above `latency_factor` times the
  baseline's and `latency_min_increase` seconds more;
- HSMS error rate (SxF0 sent by the proxy, Reject.req sent or received, per primary forwarded;
  the HSMS series carry no version, so the window's counts are the new Active's): fail if higher
  by more than `max_hsms_error_increase`.
Nothing is judged before `min_requests` responses (or `min_hsms_primaries`) were seen; a side
with fewer by the end of the window is reported as not judged, which does not fail the switch.
The baseline is the old version's counts over `baseline` seconds just before the flip, or, when
that window saw fewer than `min_requests`, everything the proxies counted for it since they
started.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from . import scrape
from .backend import Backend, Refused, SwitchOutcome
from .scrape import Reading, Totals

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
MAX_WINDOW = 3600.0


def parse_duration(text: str | float, what: str = "duration") -> float:
    """Seconds from "60s", "2m", "500ms", "1h" or a plain number of seconds."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        m = _DURATION.match(text)
        if m is None:
            raise Refused(f"{what} must be a duration like 30s, 2m or 500ms, got {text!r}")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds < 0:
        raise Refused(f"{what} must not be negative, got {text!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class Policy:
    """The thresholds of one verification; defaults: [verify] in zerodown_proxy/config.py."""

    window: float  # seconds to watch after the flip; 0: no verification
    baseline: float  # seconds to measure the old version before the flip
    min_requests: int
    max_5xx_increase: float  # absolute: 0.01 = one percentage point more than the baseline
    latency_factor: float
    latency_min_increase: float  # seconds
    min_hsms_primaries: int
    max_hsms_error_increase: float
    interval: float = 1.0  # seconds between two readings of the proxies

    def check(self) -> Policy:
        if not 0 <= self.window <= MAX_WINDOW:
            raise Refused(f"--verify must be between 0s and {MAX_WINDOW:g}s, got {self.window:g}s")
        if not 0 <= self.baseline <= 600:
            raise Refused(f"--verify-baseline must be between 0s and 600s, got {self.baseline:g}s")
        if not 0.1 <= self.interval <= 60:
            raise Refused(f"verify interval must be between 0.1s and 60s, got {self.interval:g}s")
        for name in ("min_requests", "min_hsms_primaries"):
            if getattr(self, name) < 1:
                raise Refused(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_5xx_increase", "max_hsms_error_increase"):
            if not 0 <= getattr(self, name) <= 1:
                raise Refused(f"{name} must be a fraction between 0 and 1, got "
                              f"{getattr(self, name)}")  # fmt: skip
        if self.latency_factor < 1:
            raise Refused(f"latency_factor must be at least 1, got {self.latency_factor}")
        return self


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str  # one line: why it failed, or what was found
    lines: tuple[str, ...]  # the measured numbers, one line per side


def policy_from(config: str | None, flags: dict[str, Any]) -> Policy:
    """[verify] of the config file (and its defaults), then the flags that were given."""
    from zerodown_proxy.config import ConfigError, load_config

    try:
        section = load_config(config).verify
    except ConfigError as exc:
        raise Refused(f"{exc}" + (f" (in {config})" if config else "")) from None
    values: dict[str, Any] = {f: getattr(section, f) for f in section.__dataclass_fields__}
    values.update({k: v for k, v in flags.items() if v is not None})
    for name in ("window", "baseline", "latency_min_increase"):
        values[name] = parse_duration(values[name], f"verify {name}")
    return Policy(**values).check()


_FLAGS = {  # flag dest -> [verify] setting
    "verify": "window",
    "verify_baseline": "baseline",
    "verify_min_requests": "min_requests",
    "verify_max_5xx_increase": "max_5xx_increase",
    "verify_latency_factor": "latency_factor",
    "verify_latency_min_increase": "latency_min_increase",
    "verify_min_hsms_primaries": "min_hsms_primaries",
    "verify_max_hsms_error_increase": "max_hsms_error_increase",
}


def add_arguments(sp: argparse.ArgumentParser) -> None:
    """The flags of `zerodown switch` that set the verification (defaults: [verify])."""
    sp.add_argument("--verify", default=None, metavar="DURATION",
                    help="watch the new Active this long (30s, 2m) through the proxies' metrics "
                         "and roll back automatically if it does worse than the old one "
                         "(default: [verify] window of --config, else off)")  # fmt: skip
    sp.add_argument(
        "--verify-baseline",
        default=None,
        metavar="DURATION",
        help="measure the old version this long before the flip (default 5s)",
    )
    sp.add_argument(
        "--verify-min-requests",
        type=int,
        default=None,
        metavar="N",
        help="HTTP responses needed before judging (default 50)",
    )
    sp.add_argument(
        "--verify-max-5xx-increase",
        type=float,
        default=None,
        metavar="FRACTION",
        help="5xx rate allowed above the baseline's (default 0.01: 1 point)",
    )
    sp.add_argument(
        "--verify-latency-factor",
        type=float,
        default=None,
        metavar="X",
        help="p99 allowed up to X times the baseline's (default 2)",
    )
    sp.add_argument(
        "--verify-latency-min-increase",
        default=None,
        metavar="DURATION",
        help="... and at least this much above it (default 50ms)",
    )
    sp.add_argument(
        "--verify-min-hsms-primaries",
        type=int,
        default=None,
        metavar="N",
        help="HSMS primaries needed before judging HSMS (default 20)",
    )
    sp.add_argument(
        "--verify-max-hsms-error-increase",
        type=float,
        default=None,
        metavar="FRACTION",
        help="SxF0/Reject rate allowed above the baseline's (default 0.01)",
    )


def policy_from_args(args: argparse.Namespace) -> Policy:
    config = getattr(args, "config", None) or os.environ.get("ZERODOWN_CONFIG") or None
    p = policy_from(config, {k: getattr(args, d) for d, k in _FLAGS.items()})
    given = [f"--{d.replace('_', '-')}" for d in _FLAGS if d != "verify"
             if getattr(args, d) is not None]  # fmt: skip
    if not p.window and given:
        raise Refused(f"{given[0]} applies only to a verified switch: add --verify DURATION "
                      "(or set [verify] window in the config)")  # fmt: skip
    return p


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f} ms"


def judge(base: Totals, new: Totals, p: Policy, final: bool) -> Verdict | None:
    """The verdict on `new` (what the new version did in the window so far) against `base`.
    Before the end of the window (`final` False) only a failure is returned; None: keep
    watching."""
    fails: list[str] = []
    lines: list[str] = []
    http_judged = new.requests >= p.min_requests
    base_ok = base.requests >= p.min_requests
    if http_judged:
        limit = (base.error_rate if base_ok else 0.0) + p.max_5xx_increase
        said = (f"HTTP 5xx {_pct(new.error_rate)} of {int(new.requests)} requests (baseline "
                f"{_pct(base.error_rate)} of {int(base.requests)}; limit {_pct(limit)})")  # fmt: skip
        lines.append(said)
        if new.error_rate > limit:
            fails.append(said)
        p99, b99 = new.quantile(0.99), base.quantile(0.99) if base_ok else None
        if p99 is not None and b99 is not None:
            limit_s = max(b99 * p.latency_factor, b99 + p.latency_min_increase)
            said = f"HTTP p99 {_ms(p99)} (baseline {_ms(b99)}; limit {_ms(limit_s)})"
            lines.append(said)
            if p99 > limit_s:
                fails.append(said)
        else:
            lines.append(f"HTTP p99 {_ms(p99)} (no baseline to compare with)")
    else:
        lines.append(f"HTTP not judged: {int(new.requests)} requests in the window, fewer than "
                     f"the {p.min_requests} needed")  # fmt: skip
    if new.hsms_primaries >= p.min_hsms_primaries:
        base_hsms = base.hsms_error_rate if base.hsms_primaries >= p.min_hsms_primaries else 0.0
        limit = base_hsms + p.max_hsms_error_increase
        said = (f"HSMS SxF0/Reject {_pct(new.hsms_error_rate)} of {int(new.hsms_primaries)} "
                f"primaries (baseline {_pct(base_hsms)}; limit {_pct(limit)})")  # fmt: skip
        lines.append(said)
        if new.hsms_error_rate > limit:
            fails.append(said)
    elif new.hsms_primaries:
        lines.append(f"HSMS not judged: {int(new.hsms_primaries)} primaries, fewer than the "
                     f"{p.min_hsms_primaries} needed")  # fmt: skip
    if fails:
        return Verdict(False, "; ".join(fails), tuple(lines))
    if not final:
        return None
    judged = http_judged or new.hsms_primaries >= p.min_hsms_primaries
    reason = "passed" if judged else "not judged (too little traffic); not rolled back"
    return Verdict(True, reason, tuple(lines))


def _labels(version: str | None) -> list[str]:
    """The version labels a group's responses are counted under (a group on mixed versions
    has them comma-joined in the status), plus the proxy's own answers for the app."""
    return [*(version or "").split(","), scrape.NO_BACKEND]


async def baseline(
    session: aiohttp.ClientSession,
    admins: Sequence[str],
    app: str,
    version: str | None,
    p: Policy,
    progress: Callable[[str], None],
) -> Totals:
    """The old version's counts before the flip (see the module docstring)."""
    labels = _labels(version)
    first = await scrape.read(session, admins, app, labels)
    if not first.per_proxy:
        raise Refused(f"no proxy answered /metrics ({', '.join(admins) or 'none known'}); "
                      "cannot verify the switch, not switching")  # fmt: skip
    if p.baseline > 0:
        progress(f"verify: measuring the baseline of {version} for {p.baseline:g}s")
        await asyncio.sleep(p.baseline)
        last = await scrape.read(session, admins, app, labels)
        window = last.since(first)
        if window.requests >= p.min_requests:
            return window
        first = last
    lifetime = Totals()
    for t in first.per_proxy.values():
        lifetime.add(t)
    progress(f"verify: baseline from the proxies' counters of {version} since they started "
             f"({int(lifetime.requests)} requests)")  # fmt: skip
    return lifetime


async def watch(
    session: aiohttp.ClientSession,
    admins: Sequence[str],
    app: str,
    version: str | None,
    base: Totals,
    p: Policy,
    progress: Callable[[str], None],
    start: Reading | None = None,
) -> Verdict:
    """Read the proxies every `interval` for `window` seconds after the flip; the first failure
    ends the watch early."""
    labels = _labels(version)
    begin = time.monotonic()
    first = start if start is not None else await scrape.read(session, admins, app, labels)
    progress(f"verify: watching {version} for {p.window:g}s through {len(admins)} proxy(ies)")
    while True:
        elapsed = time.monotonic() - begin
        final = elapsed >= p.window
        if not final:
            await asyncio.sleep(min(p.interval, p.window - elapsed))
            final = time.monotonic() - begin >= p.window
        now = await scrape.read(session, admins, app, labels)
        for admin, t in now.per_proxy.items():  # a proxy first heard of now starts from here
            first.per_proxy.setdefault(admin, t)
        verdict = judge(base, now.since(first), p, final)
        if verdict is not None:
            return verdict


async def switch_verified(
    backend: Backend,
    app: str,
    to_group: str | None,
    p: Policy,
    progress: Callable[[str], None],
) -> tuple[SwitchOutcome, Verdict]:
    """Baseline, switch, watch; on a failed verdict roll back through the backend's own
    rollback (audited with the verdict as its reason) and raise Refused saying so."""
    before = await backend.status(app)
    admins = [x.admin for x in before.proxies]
    if not admins:
        raise Refused(f"no proxy is known for {app}, so nothing can be measured; not switching")
    async with aiohttp.ClientSession() as session:
        base = await baseline(session, admins, app, before.active.version, p, progress)
        out = await backend.switch(app, to_group, progress)
        try:
            verdict = await watch(session, admins, app, out.to_version, base, p, progress)
        except (asyncio.CancelledError, KeyboardInterrupt):
            progress(f"verify: interrupted; {out.to_group} ({out.to_version}) stays Active, not "
                     "verified ('zerodown rollback' goes back)")  # fmt: skip
            raise
    if verdict.ok:
        return out, verdict
    for line in verdict.lines:
        progress(f"verify: {line}")
    progress(f"verify: {out.to_version} failed ({verdict.reason}); rolling back")
    try:
        back = await backend.rollback(
            app, progress, reason=f"automatic rollback: {out.to_version} failed verification: "
            f"{verdict.reason}"
        )  # fmt: skip
    except Refused as exc:
        raise Refused(f"verification of {out.to_version} failed ({verdict.reason}) and the "
                      f"automatic rollback did not complete: {exc}") from None  # fmt: skip
    raise Refused(f"verification of {out.to_version} failed: {verdict.reason}; rolled back "
                  f"{app} to {back.to_group} ({back.to_version})")  # fmt: skip
