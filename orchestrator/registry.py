"""The local stack's registry file: read, and change under a lock with an atomic rename.

The proxy's file provider watches this file (format: zerodown_proxy/contract/registry_file.py).
Every change bumps `generation`; `update` holds an exclusive flock for the read-modify-write so
two CLI commands cannot interleave (the local equivalent of Consul's CAS).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from zerodown_proxy.contract.registry_file import RegistryError, parse_registry

Registry = dict[str, Any]


def read(path: Path) -> Registry:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RegistryError(
            f"no registry at {path}: is the local stack up? (zerodown up)"
        ) from None
    parse_registry(raw)  # validates
    return orjson.loads(raw)


def write_atomic(path: Path, data: Registry) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(data, option=orjson.OPT_INDENT_2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a+") as fd:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def update(path: Path, change: Callable[[Registry], None]) -> Registry:
    """Apply `change` to the registry under the lock, bump the generation, write atomically."""
    with locked(path):
        data = read(path) if path.exists() else {"generation": 0, "apps": {}, "proxies": []}
        change(data)
        data["generation"] = int(data.get("generation", 0)) + 1
        parse_registry(orjson.dumps(data))  # never write what the proxy would reject
        write_atomic(path, data)
        return data
