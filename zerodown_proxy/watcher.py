"""The configuration watcher: the one path from a discovery provider to the routing snapshot.

As in Traefik's configurationwatcher: a provider (discovery/file.py, discovery/consul.py) only
emits whole `RegistryState` values into `Watcher.submit`; the watcher validates the state
(contract.model), resolves it against what is served (routing.resolve: an Active group with no
healthy instance is never applied), applies it — through the multi-worker switch gate when
there is one — and calls the router's listeners, in one step. No provider holds the Router.

The control plane may fail; the data plane keeps the last good snapshot (principle 2):
- a state that breaks a rule is refused whole, with the reason in `last_error` and
  `zerodown_discovery_errors_total{kind="invalid"}`;
- a provider failure (file missing, Consul unreachable) is reported by the provider (`failed`);
- any exception, in `submit` or in a provider's own loop, is caught here, logged with its
  traceback, counted (`kind="crash"`), and the provider is restarted with a back-off: the
  watcher never stops following the registry for good;
- `stale()` says when the provider has not confirmed its view for `stale_after` seconds
  (admin /health answers 503 with the reason).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .contract.model import ContractError, RegistryState, validate_state
from .metrics import Registry
from .routing import (
    EMPTY,
    Router,
    Snapshot,
    active_changed,
    resolve,
    same_routing,
    snapshot_target,
    switch_events,
)
from .switch_gate import WorkerGate

log = logging.getLogger("zerodown.watcher")

# While a switch waits for the gate: how often the watcher looks at the committed word (the
# data path also looks on every request), fast at first, then slower if the switch is held up.
GATE_POLL_FAST = 0.001
GATE_POLL_SLOW = 0.02
GATE_POLL_FAST_FOR = 0.25
RESTART_MIN = 0.1  # back-off before restarting a provider that raised
RESTART_MAX = 5.0


class Provider(Protocol):
    """What the watcher needs of a discovery provider."""

    name: str

    def prime(self) -> None:
        """Emit the first state now if it can be had without waiting (the file is read at once,
        so routing is there before the listeners open)."""

    async def run(self) -> None:
        """Follow the source forever, emitting states into the sink it was given."""

    def confirmed_at(self) -> float:
        """time.time() when the provider last knew its view to be current (0: never)."""

    def status(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Verdict:
    """What became of a submitted state."""

    applied: bool  # routed as described (or prepared, waiting for the switch gate)
    problems: Mapping[str, str] = field(default_factory=dict)  # app -> why not (served kept)
    error: str | None = None  # refused as a whole (it breaks a rule, or a bug)


class Watcher:
    def __init__(
        self,
        router: Router,
        metrics: Registry | None = None,
        gate: WorkerGate | None = None,
        stale_after: float = 0.0,
    ) -> None:
        self.router = router
        self.gate = gate
        self.stale_after = stale_after
        self.provider: Provider | None = None
        self.started = time.time()
        self.applied_at = 0.0
        self.switches = 0
        self.rejected = 0
        self.last_error: str | None = None
        self.last_error_at = 0.0
        self.problems: dict[str, str] = {}
        self.pending_since = 0.0
        self._pending_target = 0
        self._poll: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._logged_crash: str | None = None
        if gate is not None:
            router.apply_committed = self.sync
        m = metrics if metrics is not None else Registry()
        self._errors = m.counter(
            "zerodown_discovery_errors_total",
            "Discovery failures by kind (invalid state, crash, and the provider's own kinds); "
            "the last good routing stays",
            ("kind",),
        )
        m.gauge("zerodown_routing_generation", "Applied routing generation",
                fn=lambda: router.snapshot.generation)  # fmt: skip
        m.counter_fn(
            "zerodown_routing_switches_total", "Active group changes applied", lambda: self.switches
        )
        m.counter_fn(
            "zerodown_routing_rejected_total",
            "Views not applied as described (an Active group with no healthy instance, "
            "an invalid state)",
            lambda: self.rejected,
        )
        m.gauge(
            "zerodown_routing_snapshot_age_seconds",
            "Seconds since the applied snapshot was built",
            fn=lambda: (time.time() - router.snapshot.created_at) if router.snapshot.generation
            else 0,
        )  # fmt: skip
        m.gauge(
            "zerodown_discovery_age_seconds",
            "Seconds since the discovery provider last confirmed its view (-1: never)",
            fn=lambda: a if (a := self.age()) is not None else -1,
        )
        m.gauge(
            "zerodown_discovery_stale",
            "1 while discovery has not confirmed its view for [discovery] stale_after seconds",
            fn=lambda: 1 if self.stale() else 0,
        )

    # -- what providers call --------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """The generation being served (read-only for providers: logs, health notes)."""
        return self.router.snapshot.generation

    def submit(self, state: RegistryState) -> Verdict:
        """Validate, resolve and apply a whole state from the provider. Never raises."""
        try:
            validate_state(state)
            router = self.router
            # A refused app keeps the last decision taken for it: a switch being prepared
            # counts (it is what the registry said last time), not only what is served.
            res = resolve(state, router.pending or router.snapshot)
            if res.snapshot is not None:
                self._offer(res.snapshot, state)
        except ContractError as exc:
            return self._refuse("invalid", f"{state.source or 'provider'}: {exc}")
        except Exception as exc:  # a bug must not stop discovery: report, keep routing
            log.exception("applying a state from %s failed", state.source or "the provider")
            return self._refuse("crash", f"applying {state.source or 'a state'} failed: {exc!r}")
        self._note(res.problems)
        return Verdict(applied=res.snapshot is not None and not res.problems,
                       problems=res.problems)  # fmt: skip

    def failed(self, kind: str, message: str) -> None:
        """A provider could not read its source (it logs the detail itself)."""
        self._errors.inc((kind,))
        self.last_error, self.last_error_at = message, time.time()

    # -- provider lifecycle ---------------------------------------------------------------------

    def start(self, provider: Provider) -> None:
        """Emit the provider's first state now (when it can) and follow it from a supervised
        task (needs a running event loop)."""
        self.provider = provider
        self._guard(provider.prime, provider.name)
        self._task = asyncio.get_running_loop().create_task(
            self._supervise(provider), name=f"discovery-{provider.name}"
        )

    def reload(self) -> bool:
        """Admin /v1/reload: make the provider read its source now (file provider)."""
        reload = getattr(self.provider, "reload", None)
        if reload is None:
            raise LookupError("this discovery provider cannot reload")
        return bool(self._guard(reload, getattr(self.provider, "name", "provider")))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.provider is not None:
            await self.provider.close()
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None

    async def _supervise(self, provider: Provider) -> None:
        delay = RESTART_MIN
        while True:
            started = time.monotonic()
            try:
                await provider.run()
                why = "returned"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                why = f"failed ({type(exc).__name__}: {exc})"
                if why != self._logged_crash:  # a traceback per new failure, not per retry
                    log.exception("discovery provider %s %s", provider.name, why)
                    self._logged_crash = why
            if time.monotonic() - started > 10 * RESTART_MAX:
                delay = RESTART_MIN  # it ran fine for a while: a new failure starts over
            self.failed("crash", f"discovery provider {provider.name} {why}; routing stays on "
                                 f"generation {self.generation}, restarting it in {delay:g}s")  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX)

    def _guard(self, fn: Any, name: str) -> Any:
        try:
            return fn()
        except Exception as exc:
            log.exception("discovery provider %s failed", name)
            self.failed("crash", f"discovery provider {name} failed: {exc!r}")
            return None

    # -- applying -------------------------------------------------------------------------------

    def _refuse(self, kind: str, message: str) -> Verdict:
        message = f"{message}; routing stays on generation {self.generation}"
        if message != self.last_error:
            log.error("%s", message)
        self.rejected += 1
        self.failed(kind, message)
        return Verdict(applied=False, error=message)

    def _note(self, problems: Mapping[str, str]) -> None:
        for app, problem in problems.items():
            if self.problems.get(app) != problem:
                log.error("view of %s not applied, keeping its routing: %s", app, problem)
                self.rejected += 1
                self.failed("refused", problem)
        for app in set(self.problems) - set(problems):
            log.info("app %s is routable as described again", app)
        self.problems = dict(problems)
        if problems:
            self.last_error = "; ".join(problems.values())
        else:
            self.last_error = None

    def _offer(self, snap: Snapshot, state: RegistryState) -> None:
        gate = self.gate
        if gate is None:
            self._install(snap)
            return
        router = self.router
        target = snapshot_target(snap)
        # Publishing and reading the committed word is one step under the gate's lock, so a
        # commit of what we prepared before cannot slip in between unseen.
        committed = gate.publish(target)
        if router.pending is not None and committed == self._pending_target:
            self._apply_pending()  # committed before we withdrew it: it is the truth now
        if committed == target:
            # Not a switch (or a fresh worker joining at the committed target): apply now.
            router.pending = None
            self._install(snap)
            return
        if router.pending is None:
            self.pending_since = time.monotonic()
            log.info(
                "generation %s changes the Active group; waiting for every worker (switch gate)",
                snap.generation,
            )
        router.pending = snap
        self._pending_target = target
        self._schedule_poll(GATE_POLL_FAST)
        # While the switch waits, the groups being served still follow the registry (health,
        # instances), at the committed generation (the generation says which switch is applied).
        held = resolve(state, router.snapshot, hold=True).snapshot
        if held is not None:
            self._install(held)

    def sync(self) -> None:
        """Apply the pending switch if the supervisor has committed it (one word read). Called
        by `Router.current()` on the data path while a switch is pending, and by the poll."""
        if self.router.pending is not None and self.gate is not None:
            if self.gate.committed == self._pending_target:
                self._apply_pending()

    def _apply_pending(self) -> None:
        snap = self.router.pending
        assert snap is not None
        self.router.pending = None
        waited = time.monotonic() - self.pending_since
        self._install(snap)
        log.info("switch gate committed generation %s after %.1f ms", snap.generation, waited * 1e3)

    def _schedule_poll(self, delay: float) -> None:
        if self._poll is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (unit tests): callers sync() themselves
        self._poll = loop.call_later(delay, self._poll_gate)

    def _poll_gate(self) -> None:
        self._poll = None
        self.sync()
        if self.router.pending is not None:
            fast = time.monotonic() - self.pending_since < GATE_POLL_FAST_FOR
            self._schedule_poll(GATE_POLL_FAST if fast else GATE_POLL_SLOW)

    def _install(self, snap: Snapshot) -> None:
        """The one place a snapshot is put in force and the listeners are told."""
        router = self.router
        old = router.snapshot
        if same_routing(old, snap):
            return
        router.snapshot = snap  # the one assignment that switches traffic
        self.applied_at = time.time()
        if old is not EMPTY and active_changed(old, snap):
            self.switches += 1
            for e in switch_events(old, snap):
                log.info(
                    "switch: %s %s (%s) -> %s (%s), generation %s", e["app"], e["from_group"],
                    e["from_version"], e["to_group"], e["to_version"], e["generation"],
                    extra={"fields": {"event": "switch", **e}},
                )  # fmt: skip
        log.info("applied generation %s (%s)", snap.generation, snap.source)
        for listener in router.listeners:
            try:
                listener(old, snap)
            except Exception:  # a listener bug must not undo a swap
                log.exception("snapshot listener failed")

    # -- status ---------------------------------------------------------------------------------

    def age(self) -> float | None:
        """Seconds since the provider last confirmed its view (None: no provider, or never)."""
        if self.provider is None:
            return None
        at = self.provider.confirmed_at()
        return round(time.time() - at, 3) if at else None

    def stale(self) -> str | None:
        """Why discovery is stale (no confirmation for `stale_after` seconds), or None."""
        if self.stale_after <= 0 or self.provider is None:
            return None
        at = self.provider.confirmed_at()
        since = time.time() - (at or self.started)
        if since <= self.stale_after:
            return None
        what = "has not confirmed its view" if at else "has not read its source once"
        why = f": {self.last_error}" if self.last_error else ""
        return (
            f"discovery ({self.provider.name}) {what} for {since:.1f}s (stale_after "
            f"{self.stale_after:g}s); routing stays on generation {self.generation}{why}"
        )

    def status(self) -> dict[str, Any]:
        """The discovery section of /v1/status: the provider's own status plus the watcher's."""
        body = dict(self.provider.status()) if self.provider is not None else {}
        body.update(
            {
                "age_s": self.age(),
                "stale": self.stale(),
                "problems": dict(self.problems),
                "watcher_errors": {labels[0]: int(v) for labels, v in self._errors.values.items()},
                "watcher_last_error": self.last_error,
            }
        )
        return body

    def pending_status(self) -> dict[str, Any] | None:
        """A switch this worker has prepared and is waiting to apply (multi-worker mode)."""
        snap = self.router.pending
        if snap is None:
            return None
        waited = time.monotonic() - self.pending_since
        return {"generation": snap.generation, "waiting_s": round(waited, 3)}
