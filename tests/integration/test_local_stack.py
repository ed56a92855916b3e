"""The `zerodown` CLI against the local stack, as a user runs it (real processes)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from ..helpers import ROOT, HeldProxy, wait_until


def zd(state: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for var in ("ZERODOWN_BACKEND", "CONSUL_HTTP_ADDR", "NOMAD_ADDR"):
        env.pop(var, None)
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", args[0], "--state-dir", str(state), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture
def stack(tmp_path: Path):
    state = tmp_path / "state"
    r = zd(
        state,
        "up",
        "--http-listen", "127.0.0.1:0",
        "--hsms-listen", "127.0.0.1:0",
        "--admin-listen", "127.0.0.1:0",
        "--no-hsms",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    yield state
    if (state / "stack.json").exists():
        zd(state, "down")


def status(state: Path) -> dict:
    r = zd(state, "status", "--json")
    assert r.returncode == 0, r.stderr
    return orjson.loads(r.stdout)


def test_release_cycle_and_status_schema(stack: Path):
    st = status(stack)
    assert st["schema"] == "zerodown.status/v1"
    assert st["backend"] == "local" and st["app"] == "drimeap"
    assert st["active"]["group"] == "blue" and st["active"]["version"] == "v1"
    assert st["standby"]["group"] == "green" and st["standby"]["healthy"] == 2
    assert st["in_sync"] is True and st["proxies"][0]["in_sync"] is True
    for inst in st["active"]["instances"]:
        assert inst["registered"] == "passing" and inst["probe"] == "ok"

    r = zd(stack, "deploy", "v2")
    assert r.returncode == 0, r.stderr
    assert "Active group blue untouched" in r.stdout
    assert "smoke test" in r.stderr
    st = status(stack)
    assert st["active"]["version"] == "v1" and st["standby"]["version"] == "v2"

    r = zd(stack, "switch")
    assert r.returncode == 0, r.stderr
    assert "switched drimeap to green (v2)" in r.stdout and " ms" in r.stdout
    st = status(stack)
    assert st["active"]["group"] == "green" and st["active"]["version"] == "v2"
    assert st["in_sync"]

    r = zd(stack, "rollback")
    assert r.returncode == 0, r.stderr
    assert status(stack)["active"]["group"] == "blue"
    history = [orjson.loads(x) for x in (stack / "history.jsonl").read_text().splitlines()]
    assert [(h["action"], h["result"]) for h in history] == [
        ("deploy", "ok"),
        ("switch", "ok"),
        ("rollback", "ok"),  # recorded as what it was, not as a plain switch
    ]
    assert (history[0]["version"], history[0]["group"], history[0]["from_version"]) == (
        "v2", "green", "v1",
    )  # fmt: skip
    assert (history[1]["from"], history[1]["to"]) == ("blue", "green")
    assert (history[1]["from_version"], history[1]["to_version"]) == ("v1", "v2")
    assert (history[2]["from"], history[2]["to"], history[2]["to_version"]) == (
        "green", "blue", "v1",
    )  # fmt: skip
    for h in history:
        assert h["user"] and h["host"] and h["pid"] and h["time"] and h["backend"] == "local"
    assert not (stack / "release.lock").read_bytes()  # released: nobody holds it


def test_refusals_say_why_and_exit_1(stack: Path):
    r = zd(stack, "switch", "--to", "blue")
    assert r.returncode == 1
    assert (
        r.stderr.strip() == "zerodown: group blue is already Active for drimeap; nothing to switch"
    )

    r = zd(stack, "rollback")
    assert r.returncode == 1 and "nothing to roll back to" in r.stderr

    r = zd(stack, "status", "--app", "nope")
    assert r.returncode == 1 and "app nope is not in the local registry" in r.stderr

    r = zd(stack, "deploy", "v2", "--image", "x:1")
    assert r.returncode == 1 and "--image applies to the Nomad backend" in r.stderr

    # A dead Standby instance: the switch is refused and the Active group keeps serving.
    pid = orjson.loads((stack / "stack.json").read_bytes())["instances"]["drimeap-green-1"]["pid"]
    os.kill(pid, signal.SIGKILL)
    r = zd(stack, "switch")
    assert r.returncode == 1
    assert "Standby group green has 1/2 passing instances (drimeap-green-1:" in r.stderr
    assert r.stderr.rstrip().endswith("not switching.")
    assert status(stack)["active"]["group"] == "blue"

    r = zd(
        stack, "up", "--no-hsms", "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"
    )
    assert r.returncode == 1 and "already running" in r.stderr

    r = zd(stack, "switch", "--bogus")
    assert r.returncode == 2


def test_down_stops_everything(stack: Path):
    info = orjson.loads((stack / "stack.json").read_bytes())
    pids = [info["proxy"]["pid"], *(i["pid"] for i in info["instances"].values())]
    r = zd(stack, "down")
    assert r.returncode == 0, r.stderr

    def gone() -> bool:
        for pid in pids:
            try:
                os.kill(pid, 0)
                return False
            except ProcessLookupError:
                continue
        return True

    wait_until(gone, 10, "all stack processes to exit")
    r = zd(stack, "down")
    assert r.returncode == 1 and "nothing to stop" in r.stderr


def history(state: Path) -> list[dict]:
    path = state / "history.jsonl"
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def test_refusals_and_failures_are_audited(stack: Path):
    assert zd(stack, "switch", "--to", "blue").returncode == 1
    assert zd(stack, "rollback").returncode == 1
    pid = orjson.loads((stack / "stack.json").read_bytes())["instances"]["drimeap-green-1"]["pid"]
    os.kill(pid, signal.SIGKILL)
    assert zd(stack, "switch").returncode == 1
    entries = history(stack)
    assert [(e["action"], e["result"]) for e in entries] == [
        ("switch", "refused"),
        ("rollback", "refused"),
        ("switch", "refused"),
    ]
    assert entries[0]["reason"] == "group blue is already Active for drimeap; nothing to switch"
    assert entries[1]["reason"].startswith("nothing to roll back to")
    assert "Standby group green has 1/2 passing instances" in entries[2]["reason"]
    assert (entries[2]["from"], entries[2]["to"]) == ("blue", "green")

    # The proxy is gone: the switch writes the registry, then no proxy confirms it -> failed
    # (something changed), not refused.
    info = orjson.loads((stack / "stack.json").read_bytes())
    os.kill(info["proxy"]["pid"], signal.SIGKILL)
    r = zd(stack, "deploy", "v2")
    assert r.returncode == 1
    last = history(stack)[-1]
    assert (last["action"], last["result"], last["version"]) == ("deploy", "failed", "v2")
    assert last["reason"] == one_line(r.stderr).removeprefix("zerodown: ")


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("zerodown: ")]
    assert len(lines) == 1, stderr
    return lines[0]


BAD_VERSIONS = [
    ("", "it is empty"),
    ("--help", "it starts with '-'"),  # `deploy -- --help`
    ("-crash", "it starts with '-'"),
    ("v2\nrm -rf", "it contains '\\n'"),
    ("../v2", "it starts with '.'"),
    ("v2/evil", "it contains '/'"),
    ("v 2", "it contains ' '"),
    ("v" * 65, "it is 65 characters long"),
]


@pytest.mark.parametrize(("version", "why"), BAD_VERSIONS[:4])
def test_invalid_versions_are_refused_and_change_nothing(stack: Path, version: str, why: str):
    before = orjson.loads((stack / "stack.json").read_bytes())["instances"]
    registry_before = (stack / "registry.json").read_bytes()
    r = zd(stack, "deploy", "--", version)
    assert r.returncode == 1, r.stderr
    line = one_line(r.stderr)
    assert line.startswith(f"zerodown: version {version!r} is not valid ({why}): a version is ")
    assert line.endswith("; not deploying.")
    assert orjson.loads((stack / "stack.json").read_bytes())["instances"] == before
    assert (stack / "registry.json").read_bytes() == registry_before
    for inst in before.values():
        os.kill(inst["pid"], 0)  # still running: nothing was stopped
    (entry,) = history(stack)
    assert (entry["action"], entry["result"], entry["version"]) == ("deploy", "refused", version)
    st = status(stack)
    assert st["standby"]["version"] == "v1" and st["standby"]["healthy"] == 2


def test_version_rule_unit():
    from orchestrator.versions import MAX_LENGTH, check_version, problem

    for version, why in BAD_VERSIONS:
        assert problem(version) == why, version
    for good in ("v2", "2.4.1", "2026.11-rc1", "build_7", "V" * MAX_LENGTH):
        assert problem(good) is None and check_version(good) == good
    r = zd(Path("/nonexistent"), "deploy")  # no version at all: argparse's usage error
    assert r.returncode == 2


def test_proxy_config_holding_the_admin_token_is_private(stack: Path):
    info = orjson.loads((stack / "stack.json").read_bytes())
    assert info["token"] in (stack / "proxy.toml").read_text()
    for name in ("proxy.toml", "stack.json", "history.jsonl", "release.lock"):
        path = stack / name
        if path.exists():
            assert path.stat().st_mode & 0o777 == 0o600, name
    assert (stack / "proxy.toml").stat().st_mode & 0o777 == 0o600


# -- the release lock -------------------------------------------------------------------------


def held_proxy(registry_path: Path) -> HeldProxy:
    """A second proxy of the local stack that reports the registry's generation only when the
    test lets it (see tests/helpers.HeldProxy)."""
    return HeldProxy(lambda: orjson.loads(registry_path.read_bytes())["generation"])


@pytest.fixture
def held(stack: Path):
    from orchestrator import registry

    proxy = held_proxy(stack / "registry.json")
    registry.update(
        stack / "registry.json",
        lambda r: r["proxies"].append({"name": "held", "admin": f"127.0.0.1:{proxy.port}"}),
    )
    yield proxy
    proxy.close()


def first_exit(procs: list[subprocess.Popen[str]], timeout: float = 60) -> None:
    wait_until(lambda: any(p.poll() is not None for p in procs), timeout, "a command to end")


def popen(state: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for var in ("ZERODOWN_BACKEND", "CONSUL_HTTP_ADDR", "NOMAD_ADDR"):
        env.pop(var, None)
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", args[0], "--state-dir", str(state), *args[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


BUSY = re.compile(
    r"^zerodown: another release command is running \((switch|deploy|rollback), pid (\d+) on "
    r"host (\S+), since \d\d:\d\d:\d\d\); not (switching|deploying|rolling back)\.$"
)


def test_two_switches_started_together_one_runs_the_other_refuses(stack: Path, held):
    """Regression: two `zerodown switch` started at the same instant both reported success and
    cancelled each other. Now the second refuses at once, naming the one that runs."""
    active = "blue"
    for n in range(5):
        held.hold()
        procs = [popen(stack, "switch"), popen(stack, "switch")]
        first_exit(procs)  # the one refused; the other waits for the held proxy, lock held
        held.release()
        outs = [p.communicate(timeout=90) for p in procs]
        codes = sorted(p.returncode for p in procs)
        assert codes == [0, 1], (n, outs)
        (winner,) = [p for p in procs if p.returncode == 0]
        (loser,) = [(p, e) for p, (_, e) in zip(procs, outs, strict=True) if p.returncode == 1]
        m = BUSY.match(one_line(loser[1]))
        assert m, loser[1]
        assert m.group(1) == "switch" and int(m.group(2)) == winner.pid
        assert m.group(3) == socket.gethostname() and m.group(4) == "switching"
        active = "green" if active == "blue" else "blue"
        assert status(stack)["active"]["group"] == active, n
    entries = history(stack)
    assert len(entries) == 10
    for n in range(5):
        pair = sorted((e["result"], e["pid"]) for e in entries[2 * n : 2 * n + 2])
        assert [r for r, _ in pair] == ["ok", "refused"]
    refused = [e for e in entries if e["result"] == "refused"]
    assert all(e["holder"]["action"] == "switch" and e["holder"]["pid"] for e in refused)


def test_a_holder_killed_with_sigkill_frees_the_lock_and_is_reported(stack: Path, held):
    p = popen(stack, "switch")
    lock = stack / "release.lock"
    wait_until(lambda: lock.exists() and lock.read_bytes(), 30, "the switch to take the lock")
    holder = orjson.loads(lock.read_bytes())
    assert holder["pid"] == p.pid and holder["action"] == "switch"
    r = zd(stack, "deploy", "v2")
    assert r.returncode == 1
    assert BUSY.match(one_line(r.stderr)).group(2) == str(p.pid)
    p.kill()  # SIGKILL while it holds the lock: the kernel drops the flock
    p.communicate(timeout=30)
    held.release()
    r = zd(stack, "switch")  # whether or not the killed one had flipped, this one runs
    assert r.returncode == 0, r.stderr
    assert f"the previous release command (switch, pid {p.pid} on host" in r.stderr
    assert "another release command is running" not in r.stderr
    last = history(stack)[-1]
    assert last["previous_holder_died"]["pid"] == p.pid


def test_history_command_shows_the_trail(stack: Path):
    assert zd(stack, "switch", "--to", "blue").returncode == 1
    assert zd(stack, "switch").returncode == 0
    r = zd(stack, "history")
    assert r.returncode == 0, r.stderr
    head, *lines = r.stdout.splitlines()
    assert head.split()[:3] == ["TIME", "WHO", "ACTION"]
    assert len(lines) == 2
    assert "switch  blue -> blue" in lines[0] and lines[0].endswith(
        "refused  group blue is already Active for drimeap; nothing to switch"
    )
    assert lines[1].endswith("switch  blue -> green  v1 -> v1  ok")
    r = zd(stack, "history", "--json", "--last", "1")
    (rec,) = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert (rec["action"], rec["result"], rec["to"]) == ("switch", "ok", "green")
