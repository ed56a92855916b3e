"""The switch gate's pure parts and the gated watcher (two workers' watchers sharing one gate
file, the supervisor's commit called by hand): no network, no processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from zerodown_proxy.routing import (
    AppState,
    Instance,
    RegistryState,
    Router,
    Snapshot,
    snapshot_target,
)
from zerodown_proxy.switch_gate import (
    GateFile,
    WorkerGate,
    decide_commit,
    target_id,
    waiting_for,
)
from zerodown_proxy.watcher import Watcher


def inst(iid: str, group: str, version: str, healthy: bool = True) -> Instance:
    return Instance(iid, "a", group, version, "127.0.0.1", 9000 + len(iid), None, healthy)


INSTANCES = (inst("b1", "blue", "v1"), inst("b22", "blue", "v1"), inst("g1", "green", "v2"))


def state(gen: int, active: str, *instances: Instance) -> RegistryState:
    return RegistryState(gen, (AppState("a", active, instances or INSTANCES),))


def active(w: Watcher) -> str:
    return w.router.snapshot.apps["a"].active_group


@pytest.fixture
def gate(tmp_path: Path):
    g = GateFile.create(tmp_path / "gate", 2)
    yield g
    g.close()


def worker(gate: GateFile, index: int) -> tuple[Watcher, list[tuple[int, int]]]:
    router = Router()
    w = Watcher(router, gate=WorkerGate(GateFile.open(gate.path), index, None))
    calls: list[tuple[int, int]] = []
    router.subscribe(lambda old, new: calls.append((old.generation, new.generation)))
    return w, calls


def test_target_id_is_stable_order_free_and_non_zero():
    a = target_id({"x": "blue", "y": "green"})
    assert a == target_id({"y": "green", "x": "blue"})
    assert a != target_id({"x": "green", "y": "green"})
    assert a != 0 and a < 2**64
    # Fixed across processes (no per-process hash seed): blake2b of "x=blue\ny=green".
    assert a == target_id(dict([("x", "blue"), ("y", "green")]))


def test_decide_commit_needs_every_live_worker_on_one_new_target():
    assert decide_commit(1, [2, 2]) == 2
    assert decide_commit(1, [2, 1]) is None  # one worker has not prepared
    assert decide_commit(1, [2, 3]) is None  # they disagree: wait for the registry to settle
    assert decide_commit(2, [2, 2]) is None  # already committed
    assert decide_commit(1, [2, 0]) is None  # a worker still starting holds it back
    assert decide_commit(0, [5]) == 5  # the first target at startup
    assert decide_commit(1, []) is None


def test_waiting_for_names_the_late_workers_only_during_a_switch():
    assert waiting_for(1, [1, 1, 1]) == []
    assert waiting_for(1, [1, 0]) == []  # a worker starting, no switch prepared
    assert waiting_for(1, [2, 1, 2]) == [1]
    assert waiting_for(1, [2, 0]) == [1]
    assert waiting_for(0, [0, 7]) == [0]


def test_gate_file_publish_and_commit(gate: GateFile):
    other = GateFile.open(gate.path)
    assert other.slots == 2 and other.committed == 0
    assert other.publish(0, 5) == 0
    assert gate.commit_if_ready([0, 1]) is None
    assert other.publish(1, 5) == 0
    assert gate.commit_if_ready([0, 1]) == 5
    assert other.committed == 5 and other.commits == 1
    assert gate.commit_if_ready([0, 1]) is None and gate.commits == 1
    other.close()


def test_gate_file_of_a_bad_size_is_refused(tmp_path: Path):
    p = tmp_path / "gate"
    p.write_bytes(b"\0" * 13)
    with pytest.raises(ValueError, match="bad size"):
        GateFile.open(p)


def test_worker_gate_from_env(gate: GateFile):
    assert WorkerGate.from_env({}) is None
    assert WorkerGate.from_env({"ZERODOWN_SWITCH_GATE": "off"}) is None
    w = WorkerGate.from_env({"ZERODOWN_SWITCH_GATE": str(gate.path), "ZERODOWN_WORKER_INDEX": "1"})
    assert w is not None and w.index == 1
    w.close()
    with pytest.raises(ValueError, match="outside"):
        WorkerGate.from_env({"ZERODOWN_SWITCH_GATE": str(gate.path), "ZERODOWN_WORKER_INDEX": "2"})


def test_worker_gate_committed_reads_the_committed_word(gate: GateFile):
    w = WorkerGate(GateFile.open(gate.path), 0, None)
    assert w.committed == 0  # was an AttributeError (it read a `_words` that does not exist)
    w.publish(7)
    gate.publish(1, 7)
    assert gate.commit_if_ready([0, 1]) == 7
    assert w.committed == 7
    w.close()


def start_both(gate: GateFile) -> tuple[Watcher, Watcher, list, list]:
    w0, c0 = worker(gate, 0)
    w1, c1 = worker(gate, 1)
    w0.submit(state(1, "blue"))
    w1.submit(state(1, "blue"))
    # Nothing committed yet: neither serves anything until the supervisor commits.
    assert w0.router.snapshot.generation == 0 and w0.router.pending is not None
    assert gate.commit_if_ready([0, 1]) is not None
    w0.sync()
    w1.sync()
    assert active(w0) == active(w1) == "blue"
    return w0, w1, c0, c1


def test_a_switch_waits_until_every_worker_prepared_it(gate: GateFile):
    w0, w1, c0, c1 = start_both(gate)
    w0.submit(state(2, "green"))
    w0.sync()
    assert active(w0) == "blue" and w0.router.pending is not None  # prepared, not applied
    assert c0 == [(0, 1)]  # listeners fire on apply only
    assert gate.commit_if_ready([0, 1]) is None
    w1.submit(state(2, "green"))
    assert active(w1) == "blue"
    assert gate.commit_if_ready([0, 1]) == snapshot_target(w1.router.pending)  # type: ignore[arg-type]
    w0.sync()
    w1.sync()
    assert active(w0) == active(w1) == "green"
    assert w0.router.pending is None and w0.switches == 1
    assert c0 == [(0, 1), (1, 2)] and c1 == [(0, 1), (1, 2)]


def test_changes_within_the_active_group_apply_at_once(gate: GateFile):
    w0, _, c0, _ = start_both(gate)
    b1, b22, g1 = INSTANCES
    w0.submit(state(2, "blue", b1, inst("b22", "blue", "v1", healthy=False), g1))
    assert w0.router.pending is None and w0.router.snapshot.generation == 2
    assert [i.id for i in w0.router.snapshot.apps["a"].active] == ["b1"]


def test_while_a_switch_waits_the_served_group_still_follows_health(gate: GateFile):
    w0, _, c0, _ = start_both(gate)
    b1, b22, g1 = INSTANCES
    w0.submit(state(2, "green", inst("b1", "blue", "v1", healthy=False), b22, g1))
    assert w0.router.pending is not None and active(w0) == "blue"
    assert w0.router.snapshot.generation == 1  # still the committed switch
    assert [i.id for i in w0.router.snapshot.apps["a"].active] == ["b22"]
    # The old group losing every instance keeps what was served (principle 2), still waiting.
    w0.submit(
        state(3, "green", inst("b1", "blue", "v1", False), inst("b22", "blue", "v1", False), g1)
    )
    assert [i.id for i in w0.router.snapshot.apps["a"].active] == [
        "b22"
    ] and w0.router.pending.generation == 3


def test_a_switch_withdrawn_before_the_commit_is_never_applied(gate: GateFile):
    w0, w1, c0, _ = start_both(gate)
    w0.submit(state(2, "green"))
    w0.submit(state(3, "blue"))  # the registry moved back before worker 1 saw generation 2
    assert w0.router.pending is None and active(w0) == "blue" and w0.router.snapshot.generation == 3
    w1.submit(state(3, "blue"))
    assert gate.commit_if_ready([0, 1]) is None
    assert active(w0) == active(w1) == "blue"


def test_a_commit_that_raced_the_withdrawal_is_applied_first(gate: GateFile):
    w0, w1, c0, _ = start_both(gate)
    w0.submit(state(2, "green"))
    w1.submit(state(2, "green"))
    assert gate.commit_if_ready([0, 1]) is not None
    # Worker 0 did not look at the gate since, and now reads generation 3 (back to blue): what
    # was committed is the truth; generation 3 is a new switch that must wait for worker 1.
    w0.submit(state(3, "blue"))
    assert active(w0) == "green" and w0.router.snapshot.generation == 2
    assert w0.router.pending is not None and w0.router.pending.generation == 3
    w1.sync()
    assert active(w1) == "green"


def test_a_dead_worker_does_not_hold_a_switch_and_its_replacement_joins(gate: GateFile):
    w0, w1, _, _ = start_both(gate)
    gate.publish(1, 0)  # supervisor: worker 1 died
    w0.submit(state(2, "green"))
    assert gate.commit_if_ready([0]) is not None
    w0.sync()
    assert active(w0) == "green"
    fresh, calls = worker(gate, 1)  # the replacement reads the committed target: applies at once
    fresh.submit(state(2, "green"))
    assert fresh.router.pending is None and active(fresh) == "green" and calls == [(0, 2)]


def test_a_replacement_that_reads_an_uncommitted_switch_serves_nothing_until_commit(
    gate: GateFile,
):
    w0, _, _, _ = start_both(gate)
    gate.publish(1, 0)
    fresh, _ = worker(gate, 1)
    fresh.submit(state(2, "green"))  # worker 0 has not read generation 2 yet
    assert fresh.router.pending is not None and fresh.router.snapshot.generation == 0
    assert gate.commit_if_ready([0, 1]) is None
    w0.submit(state(2, "green"))
    assert gate.commit_if_ready([0, 1]) is not None
    fresh.sync()
    w0.sync()
    assert active(fresh) == active(w0) == "green"


def test_without_a_gate_nothing_waits():
    r = Watcher(Router())
    r.submit(state(1, "blue"))
    r.submit(state(2, "green"))
    assert r.router.pending is None and active(r) == "green"
    r.sync()  # harmless
    assert isinstance(r.router.snapshot, Snapshot)


def test_the_data_path_read_applies_a_committed_switch_through_the_watcher(gate: GateFile):
    """`Router.current()` is the one data-path call: after the supervisor's commit, the first
    read routes with the new group, and the listeners have been told before it returns."""
    w0, w1, c0, _ = start_both(gate)
    w0.submit(state(2, "green"))
    w1.submit(state(2, "green"))
    assert w0.router.current().apps["a"].active_group == "blue"  # prepared, not committed
    assert gate.commit_if_ready([0, 1]) is not None
    snap = w0.router.current()  # no sync(), no poll: the read itself
    assert snap.apps["a"].active_group == "green" and w0.router.pending is None
    assert c0 == [(0, 1), (1, 2)]


def test_a_refused_view_keeps_the_switch_being_prepared(gate: GateFile):
    """The base for "keep the Active group" is the last decision (the prepared switch), so a
    refused view does not withdraw a switch the registry already asked for."""
    w0, w1, _, _ = start_both(gate)
    w0.submit(state(2, "green"))
    b1, b22, g1 = INSTANCES
    verdict = w0.submit(state(3, "purple", b1, b22, g1, inst("p1", "purple", "v3", False)))
    assert "purple has 0/1 passing" in verdict.problems["a"]
    assert w0.router.pending is not None and w0.router.pending.apps["a"].active_group == "green"
    w1.submit(state(2, "green"))
    assert gate.commit_if_ready([0, 1]) is not None
    assert active(w0) == "blue" and w0.router.current().apps["a"].active_group == "green"
