"""The routing snapshot and the watcher's one apply path (no network): resolving Active and
Standby, the single "keep the Active group, refresh its health" rule, listeners, and what
happens to states that break the data model or to a bug while applying one."""

from __future__ import annotations

import pytest

from zerodown_proxy.metrics import Registry
from zerodown_proxy.routing import (
    EMPTY,
    AppState,
    Instance,
    RegistryState,
    Router,
    SnapshotRejected,
    build_snapshot,
    resolve,
)
from zerodown_proxy.watcher import Watcher


def inst(
    iid: str, group: str, version: str = "v1", healthy: bool = True, app: str = "a"
) -> Instance:
    return Instance(iid, app, group, version, "127.0.0.1", 9000 + len(iid), 9100, healthy)


def state(gen: int, active: str | None, *instances: Instance, **kw) -> RegistryState:
    return RegistryState(gen, (AppState("a", active, tuple(instances), **kw),))


def watcher() -> tuple[Watcher, Router, list[tuple[int, int]]]:
    r = Router()
    w = Watcher(r, Registry())
    calls: list[tuple[int, int]] = []
    r.subscribe(lambda old, new: calls.append((old.generation, new.generation)))
    return w, r, calls


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
    with pytest.raises(SnapshotRejected, match="Active group blue has 0/1 passing"):
        build_snapshot(state(1, "blue", inst("b1", "blue", healthy=False), inst("g1", "green")))
    with pytest.raises(SnapshotRejected, match="no Active group"):
        build_snapshot(state(1, None, inst("b1", "blue")))


def test_watcher_keeps_active_group_on_refusal_and_notifies_on_swap():
    w, r, calls = watcher()
    assert w.submit(state(1, "blue", inst("b1", "blue"), inst("g1", "green"))).applied
    verdict = w.submit(state(2, "green", inst("b1", "blue"), inst("g1", "green", healthy=False)))
    assert not verdict.applied and "green has 0/1 passing" in verdict.problems["a"]
    # Refused: blue stays Active at generation 1, but health follows the registry (one rule,
    # routing.keep_active, for every provider): the failing Standby instance is not listed.
    assert r.snapshot.generation == 1 and w.rejected == 1 and "green" in w.last_error
    assert r.snapshot.apps["a"].active_group == "blue" and r.snapshot.apps["a"].standby == ()
    assert w.submit(state(3, "green", inst("b1", "blue"), inst("g1", "green"))).applied
    assert r.snapshot.apps["a"].active_group == "green" and w.last_error is None
    assert calls == [(0, 1), (1, 1), (1, 3)]
    assert w.switches == 1
    # The same state again is not a new swap.
    w.submit(state(3, "green", inst("b1", "blue"), inst("g1", "green")))
    assert calls == [(0, 1), (1, 1), (1, 3)]


def test_a_refused_view_whose_served_group_died_too_keeps_routing_as_it_was():
    w, r, _ = watcher()
    w.submit(state(1, "blue", inst("b1", "blue"), inst("g1", "green")))
    served = r.snapshot
    w.submit(
        state(2, "green", inst("b1", "blue", healthy=False), inst("g1", "green", healthy=False))
    )
    assert r.snapshot is served  # principle 2: never route to nobody


def test_an_app_never_routable_is_left_out_and_the_others_route():
    apps = (
        AppState("a", "blue", (inst("b1", "blue"),)),
        AppState("b", "blue", (inst("x", "blue", app="b", healthy=False),)),
    )
    res = resolve(RegistryState(4, apps), EMPTY)
    assert res.snapshot is not None and list(res.snapshot.apps) == ["a"]
    assert "Active group blue has 0/1" in res.problems["b"]


def test_per_app_generation_a_refused_app_does_not_raise_the_generation():
    first = resolve(RegistryState(0, (AppState("a", "blue", (inst("b1", "blue"),), generation=10),
                                      AppState("b", "blue", (inst("x", "blue", app="b"),),
                                               generation=20))), EMPTY).snapshot  # fmt: skip
    assert first is not None and first.generation == 20
    apps = (
        AppState("a", "green", (inst("b1", "blue"), inst("g1", "green", healthy=False)),
                 generation=30),
        AppState("b", "blue", (inst("x", "blue", app="b"),), generation=20),
    )  # fmt: skip
    res = resolve(RegistryState(30, apps), first)
    assert res.snapshot.generation == 20 and res.snapshot.apps["a"].generation == 10


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
    w, r, _ = watcher()

    def boom(old, new):
        raise RuntimeError("listener bug")

    r.subscribe(boom)
    assert w.submit(state(1, "blue", inst("b1", "blue"))).applied
    assert r.snapshot.generation == 1


@pytest.mark.parametrize(
    "bad, message",
    [
        (Instance("b2", "a", "blue", "v1", "127.0.0.1", 9002, 99999), "hsms_port 99999 is out"),
        (Instance("b2", "a", "blue", "v1", "127.0.0.1", 9002, healthy="false"), "healthy must"),  # type: ignore[arg-type]
        (Instance("b2", "a", "bl ue", "v1", "127.0.0.1", 9002), "not a valid name"),
        (Instance("b1", "a", "blue", "v1", "127.0.0.1", 9002), "duplicate instance id b1"),
    ],
)
def test_a_state_that_breaks_the_data_model_is_refused_whole(bad: Instance, message: str):
    w, r, _ = watcher()
    w.submit(state(1, "blue", inst("b1", "blue")))
    verdict = w.submit(state(2, "blue", inst("b1", "blue"), bad))
    assert not verdict.applied and message in verdict.error
    assert r.snapshot.generation == 1 and message in w.last_error
    assert w.submit(state(3, "blue", inst("b1", "blue"))).applied  # and it goes on


def test_device_id_out_of_the_e37_range_is_refused():
    w, r, _ = watcher()
    verdict = w.submit(state(1, "blue", inst("b1", "blue"), hsms_device_id=99999))
    assert "hsms_device_id must be an integer 0-32767" in verdict.error
    assert r.snapshot.generation == 0


def test_a_bug_while_applying_is_reported_and_the_watcher_goes_on(monkeypatch):
    w, r, _ = watcher()
    import zerodown_proxy.watcher as watcher_module

    real = watcher_module.resolve
    monkeypatch.setattr(watcher_module, "resolve", lambda *a, **k: 1 / 0)
    verdict = w.submit(state(1, "blue", inst("b1", "blue")))
    assert not verdict.applied and "ZeroDivisionError" in verdict.error
    assert w._errors.get(("crash",)) == 1
    monkeypatch.setattr(watcher_module, "resolve", real)
    assert w.submit(state(2, "blue", inst("b1", "blue"))).applied
    assert r.snapshot.generation == 2
