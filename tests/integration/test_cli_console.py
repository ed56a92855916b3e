"""The operator's CLI as a user runs it: the history table, status --watch, colours on a TTY
only, deploy --dry-run on the local stack, flags that do not apply refused, a closed pipe, the
bench extra."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from orchestrator import audit

from ..helpers import ROOT, wait_until
from .test_local_stack import zd


def cli(*args: str, env: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", "orchestrator", *args]


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    for var in ("ZERODOWN_BACKEND", "CONSUL_HTTP_ADDR", "NOMAD_ADDR", "NO_COLOR"):
        if var not in extra:
            env.pop(var, None)
    return env


def write_history(state: Path, n: int, app: str = "drimeap") -> None:
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "history.jsonl", "ab") as f:
        for i in range(n):
            rec = audit.record("local", app, {
                "action": "switch", "from": "blue", "to": "green", "from_version": "v1",
                "to_version": f"v{i}", "result": "ok" if i % 2 else "refused",
                "reason": "" if i % 2 else "group green is not healthy",
            }, ns=1_700_000_000_000_000_000 + i)  # fmt: skip
            f.write(orjson.dumps(rec) + b"\n")


@pytest.fixture
def stack(local_stack: Path) -> Path:
    return local_stack


def test_history_is_a_table_with_n_and_app_and_json(tmp_path: Path):
    state = tmp_path / "state"
    write_history(state, 3)
    write_history(state, 1, app="other")
    deploy = audit.record("local", "drimeap", {"action": "deploy", "version": "v9", "group":
                          "green", "from_version": "v1", "result": "ok"})  # fmt: skip
    with open(state / "history.jsonl", "ab") as f:
        f.write(orjson.dumps(deploy) + b"\n")
    r = zd(state, "history")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["TIME", "WHO", "ACTION", "FROM", "->", "TO", "VERSIONS",
                                "RESULT", "REASON"]  # fmt: skip
    assert len(lines) == 5  # header, 3 switches and the deploy of drimeap; not the other app
    cols = lines[0].index("RESULT")
    assert lines[1][cols:].startswith("refused  group green is not healthy")
    assert "switch  blue -> green  v1 -> v0" in lines[1]
    assert "deploy  -> green       v1 -> v9" in lines[4]
    assert lines[2].rstrip() == lines[2]  # no trailing blanks when there is no reason
    r = zd(state, "history", "-n", "2")
    assert len(r.stdout.splitlines()) == 3
    r = zd(state, "history", "--last", "1", "-json")  # --last kept as an alias of -n
    (rec,) = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert rec["action"] == "deploy"
    r = zd(state, "history", "--app", "other", "--json")
    assert [orjson.loads(x)["app"] for x in r.stdout.splitlines()] == ["other"]
    r = zd(state, "history", "--app", "nothing")
    assert r.returncode == 0 and r.stdout == "no release history for nothing\n"
    r = zd(state, "history", "-n", "-1")
    assert r.returncode == 1 and "-n must be a number of records" in r.stderr


def test_history_into_a_closed_pipe_ends_quietly(tmp_path: Path):
    state = tmp_path / "state"
    write_history(state, 3000)  # far more than a pipe buffer holds
    p = subprocess.Popen(cli("history", "--state-dir", str(state)), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=child_env())  # fmt: skip
    assert p.stdout is not None and p.stderr is not None
    first = p.stdout.readline()
    assert first.startswith(b"TIME")
    p.stdout.close()  # what `| head -1` does
    err = p.stderr.read().decode()
    assert p.wait(60) == 141
    assert err == "", err  # no "Broken pipe", no traceback


def read_until(fd: int, want: bytes, timeout: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while want not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed its side
                break
            if not chunk:
                break
            out += chunk
    return out


def test_status_watch_redraws_on_change_and_ctrl_c_exits_0(stack: Path):
    p = subprocess.Popen(cli("status", "--watch", "--interval", "0.5s", "--state-dir",
                             str(stack)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=child_env())  # fmt: skip
    assert p.stdout is not None
    try:
        os.set_blocking(p.stdout.fileno(), False)
        got = read_until(p.stdout.fileno(), b"proxies (1", 30)
        assert got.startswith(b"--- ") and b"Active   blue" in got, got
        assert b"\x1b[" not in got  # not a TTY: no colours, no screen clearing
        r = zd(stack, "switch")
        assert r.returncode == 0, r.stderr
        got = read_until(p.stdout.fileno(), b"Active   green", 30)
        assert b"Active   green" in got, got
        time.sleep(1.5)  # three more looks with nothing changed: nothing more is printed
        assert read_until(p.stdout.fileno(), b"---", 0.1) == b""
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 0
        assert p.stderr is not None and b"Traceback" not in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def run_on_tty(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, bytes]:
    """Run with stdout and stderr on a pseudo-terminal; (exit code, everything written)."""
    leader, follower = pty.openpty()
    p = subprocess.Popen(args, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL,
                         env=env)  # fmt: skip
    os.close(follower)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif p.poll() is not None:
            break
    os.close(leader)
    return p.wait(30), out


def test_colours_and_progress_on_a_tty_only(stack: Path):
    args = cli("status", "--state-dir", str(stack))
    rc, out = run_on_tty(args, child_env())
    assert rc == 0 and b"\x1b[32m2/2 healthy\x1b[0m" in out, out
    rc, out = run_on_tty(args, child_env(NO_COLOR="1"))
    assert rc == 0 and b"2/2 healthy" in out and b"\x1b[" not in out, out
    r = zd(stack, "status")
    assert "2/2 healthy" in r.stdout and "\x1b[" not in r.stdout
    # progress of a switch: one line redrawn in place, with the elapsed time
    rc, out = run_on_tty(cli("switch", "--state-dir", str(stack)), child_env())
    assert rc == 0, out
    assert b"\r\x1b[K" in out and b"s]\x1b[0m switched drimeap: blue (v1) -> green (v1)" in out
    assert b"\r\nswitched drimeap to green (v1); 1 proxy(ies) applied" in out  # a line of its own


def test_deploy_dry_run_on_the_local_stack_changes_nothing(stack: Path):
    before = orjson.loads((stack / "stack.json").read_bytes())["instances"]
    reg = (stack / "registry.json").read_bytes()
    r = zd(stack, "deploy", "v2", "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "deploy v2 of drimeap (local stack), dry run:"
    assert [ln.split()[:2] for ln in lines[1:5]] == [
        ["restart", "drimeap-green-1"], ["restart", "drimeap-green-2"],
        ["keep", "drimeap-blue-1"], ["keep", "drimeap-blue-2"],
    ]  # fmt: skip
    assert lines[-1].endswith("Active group blue untouched; nothing was changed")
    assert orjson.loads((stack / "stack.json").read_bytes())["instances"] == before
    assert (stack / "registry.json").read_bytes() == reg
    assert not (stack / "history.jsonl").exists()  # nothing done, nothing audited
    r = zd(stack, "deploy", "v2", "--dry-run", "--image", "x:1")
    assert r.returncode == 1 and "--image applies to the Nomad backend" in r.stderr


def test_down_with_the_nomad_backend_is_refused_and_stops_nothing(stack: Path):
    r = zd(stack, "down", "--backend", "nomad")
    assert r.returncode == 1
    assert r.stderr == ("zerodown: zerodown down manages the local stack only; with --backend "
                        "nomad the services are Nomad's: use `nomad job run` / `nomad job stop` "
                        "(nothing was changed)\n")  # fmt: skip
    env = child_env(ZERODOWN_BACKEND="nomad")
    r = subprocess.run(cli("down", "--state-dir", str(stack)), capture_output=True, text=True,
                       env=env, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "with ZERODOWN_BACKEND=nomad" in r.stderr
    wait_until(lambda: (stack / "stack.json").exists(), 1, "the stack still recorded")
    assert zd(stack, "status", "--json").returncode == 0  # still up


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (("status", "--job", "x"), "--job applies to the Nomad backend"),
        (("deploy", "v2", "--admin-token", "t"), "--admin-token applies to the Nomad backend"),
        (
            ("history", "--config", "c.toml"),
            "--config applies to the Nomad backend and to switch --verify",
        ),
        (("up", "--job", "x"), "--job does not apply to zerodown up"),
        (("up", "--app", "other"), "the local stack runs drimeap only; --app other does not"),
        (("status", "--interval", "1s"), "--interval applies only with --watch"),
        (("status", "--watch", "--json"), "--watch redraws a table for people"),
        (("status", "--watch", "--interval", "0s"), "--interval must be between 0.2s and 60s"),
    ],
)
def test_flags_that_do_not_apply_are_refused(tmp_path: Path, args: tuple[str, ...], why: str):
    r = zd(tmp_path / "state", *args)
    assert r.returncode == 1, r.stdout
    assert r.stderr.startswith(f"zerodown: {why}"), r.stderr
    assert len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "state").exists()  # refused before anything was created


def test_bench_without_the_bench_extra_says_what_to_install(monkeypatch, capsys):
    import importlib.metadata as md

    from orchestrator.cli import main

    real = md.distribution

    def without_matplotlib(name: str):
        if name == "matplotlib":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "distribution", without_matplotlib)
    assert main(["bench", "all"]) == 1  # refused before any load is started
    err = capsys.readouterr().err
    assert err == ("zerodown: benchmarks need the bench extra (matplotlib not installed): "
                   "pip install 'zerodown[bench]'\n")  # fmt: skip
