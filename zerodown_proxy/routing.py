"""The routing snapshot: one immutable value that says where traffic goes.

Providers describe the world as a `RegistryState` (zerodown_proxy.contract); `resolve` turns it
into a `Snapshot`, given the snapshot being served; the watcher (watcher.py) installs it in the
`Router` with a single reference assignment. The data path calls `router.current()` once at the
start of a request or HSMS transaction and never takes a lock.

Two rules of principle 2 ("a snapshot whose Active group has no healthy instance is never
applied") are written here once: `active_problem` says whether an app's Active group can be
routed, and `keep_active` keeps the group being served while refreshing its instances' health.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from .contract.model import AppState, Instance, RegistryState
from .contract.pilots import Pilots
from .switch_gate import target_id

__all__ = [
    "EMPTY",
    "AppRoute",
    "AppState",
    "Instance",
    "Listener",
    "RegistryState",
    "Resolution",
    "Router",
    "Snapshot",
    "SnapshotRejected",
    "active_problem",
    "build_snapshot",
    "keep_active",
    "resolve",
    "snapshot_target",
]


@dataclass(frozen=True, slots=True)
class AppRoute:
    """Routing for one app: its Active and Standby groups, resolved (healthy instances only)."""

    name: str
    hosts: tuple[str, ...]
    path_prefix: str
    active_group: str
    standby_group: str | None
    active: tuple[Instance, ...]
    standby: tuple[Instance, ...]
    hsms_device_id: int | None = None
    generation: int = 0  # the generation this app's Active group was decided at
    hsms_listen: str | None = None  # its own HSMS listener (None: the proxy's hsms_listen)
    pilots: Pilots | None = None  # in force: their group is this route's Standby group

    @property
    def serves_hsms(self) -> bool:
        return any(i.hsms_port for i in self.active + self.standby)

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
    # Header names HTTP pilots look at (any app): the data path keeps those headers only then.
    pilot_headers: frozenset[bytes] = frozenset()

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

    def hsms_app(self, name: str | None = None) -> AppRoute | None:
        """The app whose HSMS tools a listener serves: `name` for an app's own listener; None
        for the proxy's [proxy] hsms_listen: the first app with HSMS ports and no listener of
        its own (the single-app case)."""
        if name is not None:
            return self.apps.get(name)
        for app in self.apps.values():
            if app.hsms_listen is None and app.serves_hsms:
                return app
        return None

    def hsms_listeners(self) -> dict[str, str]:
        """app -> its own HSMS listen address, for apps that have one."""
        return {n: a.hsms_listen for n, a in self.apps.items() if a.hsms_listen is not None}


EMPTY = Snapshot(generation=0, apps=MappingProxyType({}), by_host=MappingProxyType({}), default=())


class SnapshotRejected(ValueError):
    """The provider's state cannot be applied; the previous snapshot stays."""


# -- the rules --------------------------------------------------------------------------------


def active_problem(app: AppState) -> str | None:
    """Why `app` cannot be routed as the provider describes it, or None. The one place that
    decides "the Active group has no healthy instance"."""
    if app.active_group is None:
        return app.problem or f"app {app.name}: no Active group is set"
    members = [i for i in app.instances if i.group == app.active_group]
    if not any(i.healthy for i in members):
        return (
            f"app {app.name}: Active group {app.active_group} has 0/{len(members)} "
            "passing instances"
        )
    return None


def _route(app: AppState, active_group: str, generation: int) -> AppRoute:
    others = sorted({i.group for i in app.instances} - {active_group})
    standby_group = others[0] if others else None
    return AppRoute(
        name=app.name,
        hosts=tuple(h.lower() for h in app.hosts),
        path_prefix=app.path_prefix or "/",
        active_group=active_group,
        standby_group=standby_group,
        active=tuple(i for i in app.instances if i.group == active_group and i.healthy),
        standby=tuple(i for i in app.instances if i.group == standby_group and i.healthy),
        hsms_device_id=app.hsms_device_id,
        generation=generation,
        hsms_listen=app.hsms_listen,
        pilots=(
            Pilots.build(standby_group, app.pilots)
            if app.pilots and standby_group is not None and app.pilot_group == standby_group
            else None
        ),
    )


def keep_active(app: AppState, served: AppRoute) -> AppRoute:
    """Keep the Active group (and generation) being served, with the instances' current health:
    a refused view, or a switch waiting for the gate, does not also freeze stale health. When
    that group has no healthy instance now either, what is served stays exactly as it is."""
    if active_problem(replace(app, active_group=served.active_group)) is not None:
        return served
    return _route(app, served.active_group, served.generation)


@dataclass(frozen=True, slots=True)
class Resolution:
    """What `resolve` made of a state: the snapshot to serve (None: nothing is routable) and,
    per app, why its view was not applied as described (its served routing kept instead)."""

    snapshot: Snapshot | None
    problems: Mapping[str, str]


def resolve(state: RegistryState, served: Snapshot, hold: bool = False) -> Resolution:
    """The snapshot for `state`, given the one being served.

    An app whose Active group cannot be routed (`active_problem`) keeps its served routing
    (`keep_active`) and is reported; an app never served before is left out until it can be
    routed. The generation is the highest app generation, so a refused switch does not raise it.
    `hold` (a switch is waiting for the gate): every app keeps its served Active group and
    generation, new apps wait, and apps the state no longer has stay as served, so the result
    has the same target as `served`."""
    routes: dict[str, AppRoute] = {}
    problems: dict[str, str] = {}
    for a in state.apps:
        prev = served.apps.get(a.name)
        if hold:
            if prev is not None:
                routes[a.name] = keep_active(a, prev)
            continue
        problem = active_problem(a)
        if problem is None:
            assert a.active_group is not None
            gen = a.generation if a.generation is not None else state.generation
            routes[a.name] = _route(a, a.active_group, gen)
        else:
            problems[a.name] = problem
            if prev is not None:
                routes[a.name] = keep_active(a, prev)
    if hold:
        for name, r in served.apps.items():
            routes.setdefault(name, r)
    if not routes:
        return Resolution(None, problems)
    generation = served.generation if hold else max(r.generation for r in routes.values())
    return Resolution(_assemble(routes, generation, state.source), problems)


def _assemble(routes: Mapping[str, AppRoute], generation: int, source: str) -> Snapshot:
    by_host: dict[str, list[AppRoute]] = {}
    default: list[AppRoute] = []
    for app in routes.values():
        if app.hosts:
            for h in app.hosts:
                by_host.setdefault(h, []).append(app)
        else:
            default.append(app)

    def order(rs: Iterable[AppRoute]) -> tuple[AppRoute, ...]:
        return tuple(sorted(rs, key=lambda r: len(r.path_prefix), reverse=True))

    return Snapshot(
        generation=generation,
        apps=MappingProxyType(dict(routes)),
        by_host=MappingProxyType({h: order(r) for h, r in by_host.items()}),
        default=order(default),
        source=source,
        pilot_headers=frozenset(
            name for r in routes.values() if r.pilots for name, _ in r.pilots.headers
        ),
    )


def build_snapshot(state: RegistryState) -> Snapshot:
    """The snapshot of a state on its own (nothing served before). Raises SnapshotRejected when
    an app cannot be routed."""
    res = resolve(state, EMPTY)
    if res.problems:
        raise SnapshotRejected("; ".join(res.problems.values()))
    assert res.snapshot is not None or not state.apps
    return res.snapshot or EMPTY


def snapshot_target(snap: Snapshot) -> int:
    """The switch-gate id of a snapshot: which group is Active for each app."""
    return target_id({name: route.active_group for name, route in snap.apps.items()})


def same_routing(a: Snapshot, b: Snapshot) -> bool:
    return a.generation == b.generation and dict(a.apps) == dict(b.apps)


def active_changed(a: Snapshot, b: Snapshot) -> bool:
    for name, route in b.apps.items():
        prev = a.apps.get(name)
        if prev is None or prev.active_group != route.active_group:
            return True
    return False


# -- the data path's view ---------------------------------------------------------------------

Listener = Callable[[Snapshot, Snapshot], None]


def _nothing_pending() -> None:
    return None


class Router:
    """The snapshot in force, as the data path sees it. Only the watcher (watcher.py) writes it
    and calls the listeners; readers call `current()`.

    `pending` is set (by the watcher) while a switch waits for the multi-worker switch gate;
    `current()` then lets the watcher apply it first if the supervisor has committed it, so no
    request dispatched after the commit instant routes with the old group. Without a pending
    switch that costs one attribute check.
    """

    def __init__(self) -> None:
        self.snapshot: Snapshot = EMPTY
        self.pending: Snapshot | None = None
        self.listeners: list[Listener] = []
        self.apply_committed: Callable[[], None] = _nothing_pending  # set by the watcher

    def subscribe(self, listener: Listener) -> None:
        """Called by the watcher after every swap with (old, new): used to close pooled
        connections to demoted instances and to hand HSMS sessions over."""
        self.listeners.append(listener)

    def current(self) -> Snapshot:
        """The snapshot the data path routes with: read it once per request or transaction."""
        if self.pending is not None:
            self.apply_committed()
        return self.snapshot
