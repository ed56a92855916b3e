"""The `zerodown` CLI against the local stack, as a user runs it (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from ..helpers import ROOT, wait_until


def zd(state: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for var in ("ZERODOWN_BACKEND", "CONSUL_HTTP_ADDR", "NOMAD_ADDR"):
        env.pop(var, None)
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args, "--state-dir", str(state)],
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
    assert [h["action"] for h in history] == ["deploy", "switch", "switch"]
    assert history[1]["from"] == "blue" and history[1]["to"] == "green"


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
