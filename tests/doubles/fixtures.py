"""Pytest fixtures for the API doubles (registered from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .consul import FakeConsul


@pytest.fixture
def consul() -> Iterator[FakeConsul]:
    """A started FakeConsul on 127.0.0.1:<ephemeral>; stopped after the test."""
    c = FakeConsul()
    c.start()
    try:
        yield c
    finally:
        c.stop()
