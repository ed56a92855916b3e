"""Fixtures shared by the integration tests of the operator's CLI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_local_stack import zd


@pytest.fixture
def local_stack(tmp_path: Path) -> Iterator[Path]:
    """`zerodown up` on ephemeral ports, HTTP only; its state directory. Stopped after."""
    state = tmp_path / "state"
    r = zd(state, "up", "--http-listen", "127.0.0.1:0", "--hsms-listen", "127.0.0.1:0",
           "--admin-listen", "127.0.0.1:0", "--no-hsms")  # fmt: skip
    assert r.returncode == 0, r.stderr
    yield state
    if (state / "stack.json").exists():
        zd(state, "down")
