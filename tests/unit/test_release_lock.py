"""The release lock's pure parts and the flock variant in one process: who holds it, whether a
recorded holder is still alive here, the refusal's wording, a dead holder's record."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.release_lock import FileReleaseLock, Holder, LockBusy, busy_message


def test_holder_round_trip_and_message() -> None:
    me = Holder.me("switch")
    assert Holder.from_json(me.to_json()) == me
    assert Holder.from_json(b"") is None and Holder.from_json(b'{"pid": "x"}') is None
    at = time.mktime((2026, 12, 1, 12, 3, 55, 0, 0, -1))
    h = replace(me, pid=4242, host="fab-ops-1", since=at)
    assert busy_message(h, "switching", "x") == (
        "another release command is running (switch, pid 4242 on host fab-ops-1, "
        "since 12:03:55); not switching."
    )
    assert busy_message(None, "deploying", "release.lock is empty") == (
        "another release command is running (holder unknown: release.lock is empty); not deploying."
    )


def test_alive_tells_dead_reused_and_foreign_holders_apart() -> None:
    me = Holder.me("deploy")
    assert me.alive() is True
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert replace(me, pid=p.pid).alive() is False  # gone
    assert replace(me, started=(me.started or 0) + 1).alive() is False  # pid reused since
    assert replace(me, boot_id="another-boot").alive() is None  # another machine: can't tell
    assert replace(me, pid_ns="pid:[1]").alive() is None  # another pid namespace
    assert replace(me, boot_id="").alive() is None


def test_flock_refuses_a_second_holder_and_recovers_a_dead_one(tmp_path: Path) -> None:
    said: list[str] = []

    async def scenario() -> None:
        path = tmp_path / "release.lock"
        first = FileReleaseLock(path)
        await first.acquire("switch", "switching", said.append)
        assert path.stat().st_mode & 0o777 == 0o600
        second = FileReleaseLock(path)
        with pytest.raises(LockBusy) as err:
            await second.acquire("deploy", "deploying", said.append)
        assert err.value.holder is not None and err.value.holder.pid == os.getpid()
        assert re.fullmatch(
            r"another release command is running \(switch, pid \d+ on host \S+, since "
            r"\d\d:\d\d:\d\d\); not deploying\.",
            str(err.value),
        )
        await first.release()
        assert path.read_bytes() == b""  # released cleanly: no record left
        await second.acquire("deploy", "deploying", said.append)
        assert second.previous is None
        await second.release()

        # A holder process that died holding it (SIGKILL): the kernel freed the flock, its
        # record stayed; the next holder takes the lock and says so.
        code = (
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(path)!r}, os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, sys.argv[1].encode())\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n"
        )
        record = Holder.me("rollback").to_json().decode()
        child = subprocess.Popen([sys.executable, "-c", code, record], stdout=subprocess.PIPE)
        assert child.stdout is not None and child.stdout.readline() == b"held\n"
        with pytest.raises(LockBusy):  # alive (the record names this process: alive here)
            await FileReleaseLock(path).acquire("switch", "switching", said.append)
        child.kill()
        child.wait()
        third = FileReleaseLock(path)
        await third.acquire("switch", "switching", said.append)
        assert third.previous is not None and third.previous.action == "rollback"
        assert any("the previous release command (rollback, pid" in m for m in said)
        await third.release()

    asyncio.run(scenario())
