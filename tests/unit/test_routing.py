from __future__ import annotations

import pytest

from zerodown_proxy.routing import (
    AppState,
    Instance,
    RegistryState,
    Router,
    SnapshotRejected,
    build_snapshot,
)


def inst(
    iid: str, group: str, version: str = "v1", healthy: bool = True, app: str = "a"
) -> Instance:
    return Instance(iid, app, group, version, "127.0.0.1", 9000 + len(iid), 9100, healthy)


def state(gen: int, active: str | None, *instances: Instance, **kw) -> RegistryState:
    return RegistryState(gen, (AppState("a", active, tuple(instances), **kw),))


def test_active_and_standby_resolved_and_unhealthy_filtered():
    snap = build_snapshot(
        state(
            3,
            "blue",
            inst("b1", "blue"),
            inst("b2", "blue", healthy=False),
            inst("g1", "green", "v2"),
        )
    )
    app = snap.apps["a"]
    assert snap.generation == 3
    assert [i.id for i in app.active] == ["b1"]
    assert app.standby_group == "green" and app.standby_version == "v2"
    assert app.active_version == "v1"


def test_active_group_without_healthy_instance_is_rejected():
    with pytest.raises(SnapshotRejected, match="Active group blue has 0/1 healthy"):
        build_snapshot(state(1, "blue", inst("b1", "blue", healthy=False), inst("g1", "green")))
    with pytest.raises(SnapshotRejected, match="no Active group"):
        build_snapshot(state(1, None, inst("b1", "blue")))


def test_router_keeps_previous_snapshot_on_rejection_and_notifies_on_swap():
    r = Router()
    calls = []
    r.subscribe(lambda old, new: calls.append((old.generation, new.generation)))
    assert r.offer(state(1, "blue", inst("b1", "blue"), inst("g1", "green")))
    assert not r.offer(state(2, "green", inst("b1", "blue"), inst("g1", "green", healthy=False)))
    assert r.snapshot.generation == 1 and r.rejected == 1 and "green" in r.last_error
    assert r.offer(state(3, "green", inst("b1", "blue"), inst("g1", "green")))
    assert r.snapshot.apps["a"].active_group == "green"
    assert calls == [(0, 1), (1, 3)]
    assert r.switches == 1
    # The same state again is not a new swap.
    r.offer(state(3, "green", inst("b1", "blue"), inst("g1", "green")))
    assert calls == [(0, 1), (1, 3)]


def test_route_by_host_and_longest_prefix():
    apps = (
        AppState("api", "blue", (inst("x", "blue", app="api"),), path_prefix="/api"),
        AppState("web", "blue", (inst("y", "blue", app="web"),)),
        AppState("eap", "blue", (inst("z", "blue", app="eap"),), hosts=("eap.fab",)),
    )
    snap = build_snapshot(RegistryState(1, apps))
    assert snap.route(None, "/api/v1").name == "api"
    assert snap.route("other:8080", "/index").name == "web"
    assert snap.route("EAP.fab:8080", "/anything").name == "eap"
    assert snap.route("eap.fab", "/").name == "eap"


def test_listener_failure_does_not_undo_swap():
    r = Router()

    def boom(old, new):
        raise RuntimeError("listener bug")

    r.subscribe(boom)
    assert r.offer(state(1, "blue", inst("b1", "blue")))
    assert r.snapshot.generation == 1
