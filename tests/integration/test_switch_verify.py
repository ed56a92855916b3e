"""`zerodown switch --verify`: a release that goes bad for real traffic right after the switch is
rolled back automatically (audited with the measured reason, exit 1); a good one passes with
its numbers (exit 0). Local stack, real processes, load through the real proxy."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from ..helpers import ROOT, wait_until
from .test_local_stack import zd


class Load:
    """Keep-alive GET / through the proxy from two threads until stopped (at most 180 s)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: Counter[tuple[str, int]] = Counter()
        self.last: tuple[str, int] | None = None
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 180
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                conn.request("GET", "/")
                r = conn.getresponse()
                r.read()
                key = (r.headers.get("X-Backend-Version") or "-", r.status)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                key = ("-", 0)
            with self.lock:
                self.seen[key] += 1
                self.last = key
        conn.close()

    def total(self) -> int:
        with self.lock:
            return sum(self.seen.values())

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)


@pytest.fixture
def stack(local_stack: Path) -> Path:
    return local_stack


@pytest.fixture
def load(stack: Path) -> Iterator[Load]:
    port = orjson.loads((stack / "stack.json").read_bytes())["proxy"]["http"]
    ld = Load(port)
    yield ld
    ld.close()


def status(state: Path) -> dict:
    r = zd(state, "status", "--json")
    assert r.returncode == 0, r.stderr
    return orjson.loads(r.stdout)


def history(state: Path) -> list[dict]:
    return [orjson.loads(x) for x in (state / "history.jsonl").read_bytes().splitlines()]


def fault(state: Path, group: str, query: str) -> None:
    for i in status(state)["standby" if status(state)["standby"]["group"] == group else "active"][
        "instances"
    ]:
        req = urllib.request.Request(f"http://127.0.0.1:{i['http_port']}/fault?{query}", b"")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200


VERIFY = ("--verify-baseline", "2s", "--verify-min-requests", "20")


@pytest.mark.parametrize(
    ("query", "why"),
    [("status=500", "HTTP 5xx 100.00% of "), ("delay=0.3", "HTTP p99 ")],
    ids=["answers-500", "slow"],
)
def test_a_release_bad_after_the_switch_is_rolled_back(stack: Path, load: Load, query, why):
    r = zd(stack, "deploy", "v2")
    assert r.returncode == 0, r.stderr
    fault(stack, "green", query)  # /health stays fine: only real traffic sees it
    wait_until(lambda: load.total() >= 20, 30, "traffic on v1 for the baseline")

    r = zd(stack, "switch", "--verify", "60s", *VERIFY, timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"zerodown: verification of v2 failed: {why}"), r.stderr
    assert last.endswith("; rolled back drimeap to blue (v1)"), r.stderr
    assert "switched drimeap: blue (v1) -> green (v2)" in r.stderr
    st = status(stack)
    assert (st["active"]["group"], st["active"]["version"]) == ("blue", "v1")
    switch, rollback = history(stack)[-2:]
    assert (switch["action"], switch["result"], switch["to"]) == ("switch", "ok", "green")
    assert (rollback["action"], rollback["result"], rollback["to"]) == ("rollback", "ok", "blue")
    assert rollback["reason"].startswith(f"automatic rollback: v2 failed verification: {why}")
    measured = rollback["reason"].removeprefix("automatic rollback: v2 failed verification: ")
    assert measured in last  # the same measured numbers on screen and in the trail
    if query == "status=500":
        assert load.seen[("v2", 500)] > 0  # it did serve the bad release for a moment
    n = load.total()
    wait_until(lambda: load.total() >= n + 5, 30, "traffic after the rollback")
    assert load.last == ("v1", 200)
    r = zd(stack, "history")
    assert "automatic rollback: v2 failed verification" in r.stdout.splitlines()[-1]


def test_a_good_release_passes_verification_with_its_numbers(stack: Path, load: Load):
    r = zd(stack, "deploy", "v2")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: load.total() >= 20, 30, "traffic on v1 for the baseline")
    r = zd(stack, "switch", "--verify", "4s", *VERIFY, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    out = r.stdout.splitlines()
    assert out[0].startswith("switched drimeap to green (v2)")
    assert out[1] == "verified v2 for 4s: passed", r.stdout
    assert out[2].startswith("  HTTP 5xx 0.00% of "), r.stdout
    assert out[3].startswith("  HTTP p99 "), r.stdout
    assert status(stack)["active"]["group"] == "green"
    assert [e["action"] for e in history(stack)][-1] == "switch"


def test_verify_without_traffic_is_not_judged_and_keeps_the_switch(stack: Path):
    r = zd(stack, "switch", "--verify", "2s", "--verify-baseline", "0s", timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "verified v1 for 2s: not judged (too little traffic); not rolled back" in r.stdout
    assert "HTTP not judged: 0 requests in the window, fewer than the 50 needed" in r.stdout


def test_verify_flags_need_verify_and_bad_values_are_refused(stack: Path):
    r = zd(stack, "switch", "--verify-baseline", "3s")
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "zerodown: --verify-baseline applies only to a verified switch: add --verify DURATION "
        "(or set [verify] window in the config)"
    )
    r = zd(stack, "switch", "--verify", "soon")
    assert r.returncode == 1
    assert "verify window must be a duration like 30s, 2m or 500ms, got 'soon'" in r.stderr
    r = zd(stack, "switch", "--verify", "10s", "--verify-max-5xx-increase", "5")
    assert r.returncode == 1 and "max_5xx_increase must be a fraction" in r.stderr
    assert status(stack)["active"]["group"] == "blue"  # nothing was switched


def test_verify_window_from_the_config_file(stack: Path, tmp_path: Path):
    cfg = tmp_path / "release.toml"
    cfg.write_text('[verify]\nwindow = "1s"\nbaseline = "0s"\n')
    r = zd(stack, "switch", "--config", str(cfg), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "verified v1 for 1s: not judged" in r.stdout


def test_ctrl_c_during_the_watch_leaves_the_switch_and_says_so(stack: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ZERODOWN_BACKEND", None)
    p = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "switch", "--state-dir", str(stack), "--verify",
         "5m", "--verify-baseline", "0s"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    assert p.stderr is not None
    try:
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = p.stderr.readline()
            seen.append(line)
            if line.startswith("verify: watching v1 for 300s") or not line:
                break
        assert seen[-1].startswith("verify: watching"), seen
        p.send_signal(signal.SIGINT)
        rest = p.stderr.read()
        assert p.wait(30) == 130
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert "verify: interrupted; green (v1) stays Active, not verified" in rest, rest
    assert "Traceback" not in rest
    assert status(stack)["active"]["group"] == "green"
