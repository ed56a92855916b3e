"""The switch gate: makes N SO_REUSEPORT workers flip their Active groups at one instant.

Each worker follows the registry itself, so each *learns* of a switch at a slightly different
moment. The gate separates learning from applying (two phases):

1. prepare: a worker whose new snapshot would change an Active group keeps it pending and
   publishes the snapshot's *target* (a 64-bit id of the app -> Active group map) in its slot;
2. commit: the supervisor, when every live worker's slot holds the same target, writes it to
   the committed word. Every worker's data path compares that word with its pending target on
   each request (one 8-byte read from shared memory, only while a switch is pending) and applies
   the pending snapshot on first use after the commit: no request dispatched after the commit
   instant sees the old group, none before it sees the new one, in any worker.

Shared state is one small file, mmapped by the supervisor and every worker (layout below).
Publishing a slot and committing are each done under an exclusive flock of that file, so a
worker that withdraws a prepare (the registry moved on) and a supervisor that commits it cannot
interleave; the data path never locks, it only reads the committed word.

Layout (native 64-bit words): [0] committed target, [1] commit count, [2 + i] worker i's slot
(0 = not taking part: not started yet, or dead).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

GATE_ENV = "ZERODOWN_SWITCH_GATE"  # path of the gate file (set by the supervisor)
NOTIFY_ENV = "ZERODOWN_SWITCH_GATE_NOTIFY"  # abstract unix datagram address of the supervisor
INDEX_ENV = "ZERODOWN_WORKER_INDEX"
_HEADER_WORDS = 2


def target_id(active: Mapping[str, str]) -> int:
    """A stable (same in every process) non-zero 64-bit id of an app -> Active group map."""
    text = "\n".join(f"{app}={group}" for app, group in sorted(active.items()))
    value = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return value or 1


def decide_commit(committed: int, slots: Sequence[int]) -> int | None:
    """The target to commit, or None. `slots` are those of the live workers: commit only when
    every one of them prepared the same (non-zero) target and it is not already committed."""
    if not slots:
        return None
    first = slots[0]
    if first == 0 or first == committed or any(s != first for s in slots):
        return None
    return first


def waiting_for(committed: int, slots: Sequence[int]) -> list[int]:
    """Positions in `slots` that hold back a switch some other live worker has prepared: empty
    when no switch is pending. A slot of 0 (a worker still starting) always holds back."""
    prepared = {s for s in slots if s not in (0, committed)}
    if not prepared:
        return []
    # The most-prepared target is the one the registry now says; the others are late.
    target = max(prepared, key=lambda t: sum(1 for s in slots if s == t))
    return [i for i, s in enumerate(slots) if s != target]


class GateFile:
    """The mmapped gate file. `create` (supervisor) sizes and zeroes it; `open` (workers) maps it."""

    def __init__(self, path: Path, fd: int, slots: int) -> None:
        self.path = path
        self.fd = fd
        self.slots = slots
        self._mm = mmap.mmap(fd, (_HEADER_WORDS + slots) * 8)
        # Item access on a 'Q' view is one aligned 8-byte load/store: a reader never sees a
        # half-written word.
        self.words = memoryview(self._mm).cast("Q")

    @classmethod
    def create(cls, path: Path, slots: int) -> GateFile:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, (_HEADER_WORDS + slots) * 8)
        return cls(path, fd, slots)

    @classmethod
    def open(cls, path: Path) -> GateFile:
        fd = os.open(path, os.O_RDWR)
        size = os.fstat(fd).st_size
        if size < _HEADER_WORDS * 8 or size % 8:
            os.close(fd)
            raise ValueError(f"switch gate {path} has a bad size ({size} bytes)")
        return cls(path, fd, size // 8 - _HEADER_WORDS)

    def close(self) -> None:
        try:
            self.words.release()
            self._mm.close()
        except BufferError:  # a view is still held elsewhere: the process is exiting anyway
            pass
        os.close(self.fd)

    @property
    def committed(self) -> int:
        return self.words[0]

    @property
    def commits(self) -> int:
        return self.words[1]

    def slot(self, index: int) -> int:
        return self.words[_HEADER_WORDS + index]

    def publish(self, index: int, target: int) -> int:
        """Set worker `index`'s slot; return the committed target as of that instant (atomic
        with respect to `commit`)."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            self.words[_HEADER_WORDS + index] = target
            return self.words[0]
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def commit_if_ready(self, live: Sequence[int]) -> int | None:
        """Supervisor: commit when every live worker prepared the same target. Returns it."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            words = self.words
            target = decide_commit(words[0], [words[_HEADER_WORDS + i] for i in live])
            if target is not None:
                words[0] = target
                words[1] += 1
            return target
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)


class WorkerGate:
    """A worker's end of the gate: its slot, the committed word, and a nudge to the supervisor."""

    def __init__(self, gate: GateFile, index: int, notify: str | None) -> None:
        if not 0 <= index < gate.slots:
            raise ValueError(f"worker index {index} is outside the gate's {gate.slots} slots")
        self.gate = gate
        self.index = index
        self.notify = notify
        self._sock: socket.socket | None = None
        if notify:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerGate | None:
        env = os.environ if env is None else env
        path = env.get(GATE_ENV)
        if not path or path == "off":
            return None
        return cls(GateFile.open(Path(path)), int(env.get(INDEX_ENV, "0")), env.get(NOTIFY_ENV))

    @property
    def committed(self) -> int:
        return self.gate.committed

    def publish(self, target: int) -> int:
        committed = self.gate.publish(self.index, target)
        if self._sock is not None and target != committed:
            try:  # wake the supervisor now rather than at its next periodic check
                self._sock.sendto(b"p", "\0" + self.notify)  # type: ignore[operator]
            except OSError:
                pass  # the periodic check commits anyway
        return committed

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self.gate.close()
