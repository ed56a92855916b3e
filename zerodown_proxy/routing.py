"""The routing snapshot: one immutable value that says where traffic goes.

Discovery providers (file registry, Consul) describe the world as a `RegistryState`; `build_snapshot`
turns it into a `Snapshot`; the `Router` holds the current one and swaps it with a single reference
assignment. The data path reads `router.snapshot` once at the start of a request or HSMS transaction
and never takes a lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING

from .switch_gate import target_id

if TYPE_CHECKING:
    from .switch_gate import WorkerGate

log = logging.getLogger("zerodown.routing")


@dataclass(frozen=True, slots=True)
class Instance:
    """One backend instance of an app: an HTTP port and (optionally) an HSMS port."""

    id: str
    app: str
    group: str
    version: str
    address: str
    http_port: int
    hsms_port: int | None = None
    healthy: bool = True

    @property
    def http_key(self) -> tuple[str, int]:
        return (self.address, self.http_port)


@dataclass(frozen=True, slots=True)
class AppState:
    """What a provider knows about one app (input to `build_snapshot`)."""

    name: str
    active_group: str | None
    instances: tuple[Instance, ...]
    hosts: tuple[str, ...] = ()
    path_prefix: str = "/"
    hsms_device_id: int | None = None


@dataclass(frozen=True, slots=True)
class RegistryState:
    """A whole description of the world from one provider, with its generation."""

    generation: int
    apps: tuple[AppState, ...]
    source: str = ""


@dataclass(frozen=True, slots=True)
class AppRoute:
    """Routing for one app: its Active and Standby groups, resolved."""

    name: str
    hosts: tuple[str, ...]
    path_prefix: str
    active_group: str
    standby_group: str | None
    active: tuple[Instance, ...]
    standby: tuple[Instance, ...]
    hsms_device_id: int | None = None

    @property
    def active_version(self) -> str | None:
        return _group_version(self.active)

    @property
    def standby_version(self) -> str | None:
        return _group_version(self.standby)


def _group_version(instances: tuple[Instance, ...]) -> str | None:
    versions = sorted({i.version for i in instances})
    if not versions:
        return None
    return versions[0] if len(versions) == 1 else ",".join(versions)


@dataclass(frozen=True, slots=True)
class Snapshot:
    generation: int
    apps: Mapping[str, AppRoute]
    by_host: Mapping[str, tuple[AppRoute, ...]]
    default: tuple[AppRoute, ...]
    created_at: float = field(default_factory=time.time)
    source: str = ""

    def route(self, host: str | None, path: str) -> AppRoute | None:
        """Pick the app for a request: by Host (without port), then longest path prefix."""
        candidates = self.default
        if host:
            h = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            candidates = self.by_host.get(h.lower(), self.default)
        for app in candidates:  # sorted longest prefix first
            if path.startswith(app.path_prefix):
                return app
        return None

    def hsms_app(self) -> AppRoute | None:
        """The app that serves HSMS (the first one with HSMS ports)."""
        for app in self.apps.values():
            if any(i.hsms_port for i in app.active + app.standby):
                return app
        return None


EMPTY = Snapshot(generation=0, apps=MappingProxyType({}), by_host=MappingProxyType({}), default=())


class SnapshotRejected(ValueError):
    """The provider's state cannot be applied; the previous snapshot stays."""


def build_snapshot(state: RegistryState) -> Snapshot:
    """Resolve Active/Standby per app. Raises SnapshotRejected when an Active group has no
    healthy instance (principle 2: never apply a snapshot that routes to nobody)."""
    apps: dict[str, AppRoute] = {}
    for a in state.apps:
        groups = sorted({i.group for i in a.instances})
        if a.active_group is None:
            raise SnapshotRejected(f"app {a.name}: no Active group is set")
        active = tuple(i for i in a.instances if i.group == a.active_group)
        if not any(i.healthy for i in active):
            raise SnapshotRejected(
                f"app {a.name}: Active group {a.active_group} has 0/{len(active)} healthy instances"
            )
        others = [g for g in groups if g != a.active_group]
        standby_group = others[0] if others else None
        standby = tuple(i for i in a.instances if i.group == standby_group)
        apps[a.name] = AppRoute(
            name=a.name,
            hosts=tuple(h.lower() for h in a.hosts),
            path_prefix=a.path_prefix or "/",
            active_group=a.active_group,
            standby_group=standby_group,
            active=tuple(i for i in active if i.healthy),
            standby=tuple(i for i in standby if i.healthy),
            hsms_device_id=a.hsms_device_id,
        )
    by_host: dict[str, list[AppRoute]] = {}
    default: list[AppRoute] = []
    for app in apps.values():
        if app.hosts:
            for h in app.hosts:
                by_host.setdefault(h, []).append(app)
        else:
            default.append(app)

    def order(routes: Iterable[AppRoute]) -> tuple[AppRoute, ...]:
        return tuple(sorted(routes, key=lambda r: len(r.path_prefix), reverse=True))

    return Snapshot(
        generation=state.generation,
        apps=MappingProxyType(apps),
        by_host=MappingProxyType({h: order(r) for h, r in by_host.items()}),
        default=order(default),
        source=state.source,
    )


Listener = Callable[[Snapshot, Snapshot], None]

# While a switch waits for the gate: how often the router itself looks at the committed word (the
# data path also looks on every request), fast at first, then slower if the switch is held up.
GATE_POLL_FAST = 0.001
GATE_POLL_SLOW = 0.02
GATE_POLL_FAST_FOR = 0.25


class Router:
    """Holds the current snapshot. `apply` is the only writer; readers read `.snapshot`.

    With a switch gate (multi-worker mode, see switch_gate.py) a snapshot that changes an Active
    group is not applied when it arrives: it waits in `pending` until the supervisor commits its
    target. Readers on the data path therefore call `router.current()`, which applies a committed
    switch first; without a gate `pending` is always None, so that costs one attribute check.
    """

    def __init__(self, gate: WorkerGate | None = None) -> None:
        self.snapshot: Snapshot = EMPTY
        self.applied_at: float = 0.0
        self.switches: int = 0
        self.rejected: int = 0
        self.last_error: str | None = None
        self.gate = gate
        self.pending: Snapshot | None = None
        self.pending_since: float = 0.0
        self._pending_target = 0
        self._committed = gate.committed_word() if gate is not None else None
        self._poll: asyncio.TimerHandle | None = None
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """Called after every swap with (old, new); used to close pooled connections to demoted
        instances and to hand HSMS sessions over."""
        self._listeners.append(listener)

    def offer(self, state: RegistryState) -> bool:
        """Build and apply a snapshot from a provider's state. Returns False (and keeps the
        previous snapshot) when the state is rejected. With a gate, a switch is only prepared
        here (True: accepted) and applied when committed."""
        try:
            snap = build_snapshot(state)
        except SnapshotRejected as exc:
            self.rejected += 1
            self.last_error = str(exc)
            log.error("snapshot rejected, keeping generation %s: %s", self.snapshot.generation, exc)
            return False
        if self.gate is None:
            self.apply(snap)
        else:
            self._offer_gated(snap)
            if self.pending is not None:
                self._refresh_applied(state)
        return True

    def _offer_gated(self, snap: Snapshot) -> None:
        assert self.gate is not None
        target = snapshot_target(snap)
        # Publishing and reading the committed word is one step under the gate's lock, so a
        # commit of what we prepared before cannot slip in between unseen.
        committed = self.gate.publish(target)
        if self.pending is not None and committed == self._pending_target:
            self._apply_pending()  # committed before we withdrew it: it is the truth now
        if committed == target:
            # Not a switch (or a fresh worker joining at the committed target): apply now.
            self.pending = None
            self.apply(snap)
            return
        if self.pending is None:
            self.pending_since = time.monotonic()
            log.info(
                "generation %s changes the Active group; waiting for every worker (switch gate)",
                snap.generation,
            )
        self.pending = snap
        self._pending_target = target
        if self._poll is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (unit tests): callers sync() themselves
            self._poll = loop.call_later(GATE_POLL_FAST, self._poll_gate)

    def _refresh_applied(self, state: RegistryState) -> None:
        # While a switch waits, the groups being served still follow the registry (health,
        # instances): the new state, with the Active groups still committed, at the same
        # generation (the generation says which switch is applied).
        current = self.snapshot
        if current is EMPTY:
            return
        try:
            apps = tuple(
                replace(a, active_group=current.apps[a.name].active_group) for a in state.apps
            )
            snap = build_snapshot(RegistryState(current.generation, apps, state.source))
        except (KeyError, SnapshotRejected) as exc:
            log.warning("while a switch waits, keeping generation %s as it was: %s",
                        current.generation, exc)  # fmt: skip
            return
        self.apply(snap)

    def current(self) -> Snapshot:
        """The snapshot the data path routes with: read it once per request or transaction.

        While a gated switch waits (multi-worker mode), this is also where a committed switch
        takes effect: one attribute check when nothing is pending."""
        if self.pending is not None:
            self.sync()
        return self.snapshot

    def sync(self) -> None:
        """Apply the pending snapshot if its switch has been committed (cheap: one word read)."""
        if self.pending is not None and self._committed[0] == self._pending_target:  # type: ignore[index]
            self._apply_pending()

    def _apply_pending(self) -> None:
        snap = self.pending
        assert snap is not None
        self.pending = None
        waited = time.monotonic() - self.pending_since
        self.apply(snap)
        log.info("switch gate committed generation %s after %.1f ms", snap.generation, waited * 1e3)

    def _poll_gate(self) -> None:
        self._poll = None
        self.sync()
        if self.pending is not None:
            fast = time.monotonic() - self.pending_since < GATE_POLL_FAST_FOR
            delay = GATE_POLL_FAST if fast else GATE_POLL_SLOW
            self._poll = asyncio.get_running_loop().call_later(delay, self._poll_gate)

    def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None

    def apply(self, snap: Snapshot) -> None:
        old = self.snapshot
        if _same_routing(old, snap):
            return
        self.snapshot = snap  # the one assignment that switches traffic
        self.applied_at = time.time()
        self.last_error = None
        if old is not EMPTY and _active_changed(old, snap):
            self.switches += 1
        log.info("applied generation %s (%s)", snap.generation, snap.source)
        for listener in self._listeners:
            try:
                listener(old, snap)
            except Exception:  # a listener bug must not undo a swap
                log.exception("snapshot listener failed")


def snapshot_target(snap: Snapshot) -> int:
    """The switch-gate id of a snapshot: which group is Active for each app."""
    return target_id({name: route.active_group for name, route in snap.apps.items()})


def _same_routing(a: Snapshot, b: Snapshot) -> bool:
    return a.generation == b.generation and dict(a.apps) == dict(b.apps)


def _active_changed(a: Snapshot, b: Snapshot) -> bool:
    for name, route in b.apps.items():
        prev = a.apps.get(name)
        if prev is None or prev.active_group != route.active_group:
            return True
    return False
