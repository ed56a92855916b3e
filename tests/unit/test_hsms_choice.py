"""Backend choice for a new session: round robin, T5 avoidance, the instance_down hook."""

from __future__ import annotations

from zerodown_proxy.config import HsmsSection
from zerodown_proxy.hsms.choice import BackendChoice, Pick, Wait
from zerodown_proxy.routing import EMPTY, AppState, Instance, RegistryState, build_snapshot


def snap(n: int = 2, device: int | None = None, hsms: bool = True):  # type: ignore[no-untyped-def]
    insts = tuple(
        Instance(f"i{k}", "app", "blue", "v1", "127.0.0.1", 8000 + k, 9000 + k if hsms else None)
        for k in range(n)
    )
    return build_snapshot(
        RegistryState(1, (AppState("app", "blue", insts, hsms_device_id=device),))
    )


def test_round_robin_over_the_active_instances_with_the_device_id():
    c = BackendChoice(HsmsSection(device_id=5))
    picks = [c.pick(snap(), 0.0) for _ in range(4)]
    assert [p.instance.id for p in picks] == ["i1", "i0", "i1", "i0"]  # type: ignore[union-attr]
    assert {p.device_id for p in picks} == {5}  # type: ignore[union-attr]
    p = BackendChoice(HsmsSection(device_id=5)).pick(snap(device=7), 0.0)
    assert isinstance(p, Pick) and p.device_id == 7  # the registry's hsms_device_id wins


def test_a_failed_instance_is_avoided_for_t5_then_tried_again():
    c = BackendChoice(HsmsSection(t5=10.0))
    s = snap()
    c.failed(s.apps["app"].active[0], 100.0)
    assert {c.pick(s, 101.0).instance.id for _ in range(3)} == {"i1"}  # type: ignore[union-attr]
    c.failed(s.apps["app"].active[1], 102.0)
    w = c.pick(s, 103.0)
    assert isinstance(w, Wait) and w.seconds == 7.0 and "T5" in w.reason
    assert isinstance(c.pick(s, 110.5), Pick)
    c.succeeded(s.apps["app"].active[1])
    assert c.pick(s, 103.0).instance.id == "i1"  # type: ignore[union-attr]


def test_instances_the_health_checker_says_are_down_are_skipped():
    down = {"i0"}
    c = BackendChoice(HsmsSection(), instance_down=lambda i: i.id in down)
    assert {c.pick(snap(), 0.0).instance.id for _ in range(4)} == {"i1"}  # type: ignore[union-attr]
    down.add("i1")
    w = c.pick(snap(), 0.0)
    assert isinstance(w, Wait) and "down" in w.reason


def test_a_checker_that_raises_does_not_stop_routing():
    def broken(_i: Instance) -> bool:
        raise RuntimeError("checker bug")

    assert isinstance(BackendChoice(HsmsSection(), instance_down=broken).pick(snap(), 0.0), Pick)


def test_no_hsms_instance_means_wait():
    c = BackendChoice(HsmsSection())
    assert isinstance(c.pick(EMPTY, 0.0), Wait)
    assert isinstance(c.pick(snap(hsms=False), 0.0), Wait)
