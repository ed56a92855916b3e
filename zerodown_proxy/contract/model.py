"""The routing model every provider produces and every release command reads: `Instance`,
`AppState`, `RegistryState`, and the rules their fields obey.

The rules are written once, here, as `check_*` functions that raise `ContractError` with a
message naming the offending field. The file registry's parser and the Consul provider call
them on raw input (so the message says where in the file or which service); the watcher calls
`validate_state` on every state a provider emits (so a provider bug cannot put a value the data
path would choke on, such as an HSMS session id of 99999, into a snapshot).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# E37: the session id (device id) is 15 bits; the top bit of that header field is the W-bit.
HSMS_DEVICE_ID_MAX = 0x7FFF
CHECK_STATUSES = ("passing", "warning", "critical")

# App and group names end up in Consul service names, tags and KV keys (`<prefix>/<app>/active`),
# so they are kept to characters that are safe in all three.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Ids, versions, addresses and host names: printable, no whitespace, bounded.
_TOKEN = re.compile(r"[!-~]{1,256}")


class ContractError(ValueError):
    """A value does not follow the data model; str() names the field and says what is wrong."""


@dataclass(frozen=True, slots=True)
class Instance:
    """One backend instance of an app: an HTTP port and (optionally) an HSMS port.

    `healthy` is the HTTP side's health (routable or not); `hsms_port` is set only while the
    HSMS side is healthy, so an instance whose HSMS side fails keeps serving HTTP but gets no
    new HSMS session. `checks` is the worst check status over both sides, as operators see it;
    `alloc` the Nomad allocation id when Nomad registered the instance.
    """

    id: str
    app: str
    group: str
    version: str
    address: str
    http_port: int
    hsms_port: int | None = None
    healthy: bool = True
    alloc: str | None = None
    checks: str = "passing"
    # (address, http_port): the key of the instance's pools, in-flight counts and ejections.
    # Computed once here because the data path reads it several times per request.
    http_key: tuple[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "http_key", (self.address, self.http_port))


@dataclass(frozen=True, slots=True)
class AppState:
    """What a provider knows about one app.

    `active_group` None means the provider could not tell which group is Active; `problem` then
    says why (e.g. "the Active key is empty"). `generation` is the app's own generation when the
    provider has one per app (Consul: the ModifyIndex of its key); None: the state's.
    """

    name: str
    active_group: str | None
    instances: tuple[Instance, ...]
    hosts: tuple[str, ...] = ()
    path_prefix: str = "/"
    hsms_device_id: int | None = None
    generation: int | None = None
    problem: str | None = None
    # This app's own HSMS listener ("host:port"); None: the proxy's [proxy] hsms_listen.
    hsms_listen: str | None = None
    # Pilots (contract/pilots.py): tools on `pilot_group` while it is the Standby group.
    pilot_group: str | None = None
    pilots: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RegistryState:
    """A whole description of the world from one provider, with its generation."""

    generation: int
    apps: tuple[AppState, ...]
    source: str = ""


# -- the rules ------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_name(value: Any, where: str, what: str = "name") -> str:
    """An app or group name: 1-64 of A-Z a-z 0-9 _ . - (not starting with . _ or -)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ContractError(
            f"{where}: {what} {value!r} is not a valid name (1-64 letters, digits, '_', '.', "
            "'-', starting with a letter or digit)"
        )
    return value


def check_token(value: Any, where: str, what: str) -> str:
    """An id, version, address or host: 1-256 printable characters without whitespace."""
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ContractError(
            f"{where}: {what} {value!r} must be 1-256 printable characters without spaces"
        )
    return value


def check_port(value: Any, where: str, what: str) -> int:
    if not _is_int(value):
        raise ContractError(f"{where}: {what} must be a port number, got {value!r}")
    if not 0 < value < 65536:
        raise ContractError(f"{where}: {what} {value} is out of range (1-65535)")
    return value


def check_device_id(value: Any, where: str) -> int:
    """The HSMS session id the backends expect (SEMI E37: 0..32767)."""
    if not _is_int(value) or not 0 <= value <= HSMS_DEVICE_ID_MAX:
        raise ContractError(
            f"{where}: hsms_device_id must be an integer 0-{HSMS_DEVICE_ID_MAX} (E37 session "
            f"id), got {value!r}"
        )
    return value


def check_generation(value: Any, where: str) -> int:
    if not _is_int(value) or not 0 <= value < 2**63:
        raise ContractError(f"{where}: generation must be a non-negative integer, got {value!r}")
    return value


def check_path_prefix(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.startswith("/") or not _TOKEN.fullmatch(value):
        raise ContractError(
            f"{where}: path_prefix must be a path starting with '/' (no spaces), got {value!r}"
        )
    return value


def check_listen(value: Any, where: str) -> str:
    """An HSMS listen address: host:port ([v6]:port), port 0-65535 (0: any free port)."""
    if isinstance(value, str) and _TOKEN.fullmatch(value):
        host, sep, port = value.rpartition(":")
        if sep and host and port.isascii() and port.isdigit() and int(port) <= 65535:
            return value
    raise ContractError(f"{where}: hsms_listen must be host:port, got {value!r}")


def check_hosts(value: Iterable[Any], where: str) -> tuple[str, ...]:
    return tuple(check_token(h, where, "host") for h in value)


def validate_instance(i: Instance, where: str) -> None:
    check_token(i.id, where, "id")
    check_name(i.app, where, "app")
    check_name(i.group, where, "group")
    check_token(i.version, where, "version")
    check_token(i.address, where, "address")
    check_port(i.http_port, where, "http_port")
    if i.hsms_port is not None:
        check_port(i.hsms_port, where, "hsms_port")
    if not isinstance(i.healthy, bool):
        raise ContractError(f"{where}: healthy must be true or false, got {i.healthy!r}")
    if i.checks not in CHECK_STATUSES:
        raise ContractError(f"{where}: checks must be one of {CHECK_STATUSES}, got {i.checks!r}")


def validate_state(state: RegistryState) -> None:
    """Every rule above over a whole state. Raises ContractError naming the first violation."""
    check_generation(state.generation, "registry")
    seen_apps: set[str] = set()
    listens: dict[str, str] = {}
    for a in state.apps:
        where = f"app {a.name}"
        check_name(a.name, "registry", "app")
        if a.name in seen_apps:
            raise ContractError(f"registry: app {a.name} appears twice")
        seen_apps.add(a.name)
        if a.active_group is not None:
            check_name(a.active_group, where, "active group")
        if a.generation is not None:
            check_generation(a.generation, where)
        check_hosts(a.hosts, where)
        check_path_prefix(a.path_prefix, where)
        if a.hsms_device_id is not None:
            check_device_id(a.hsms_device_id, where)
        if a.hsms_listen is not None:
            check_listen(a.hsms_listen, where)
            if not a.hsms_listen.endswith(":0") and a.hsms_listen in listens:
                raise ContractError(
                    f"{where}: hsms_listen {a.hsms_listen} is also app {listens[a.hsms_listen]}'s"
                )
            listens[a.hsms_listen] = a.name
        _check_pilots(a, where)
        ids: set[str] = set()
        for i in a.instances:
            validate_instance(i, f"{where} instance {i.id!r}")
            if i.app != a.name:
                raise ContractError(f"{where}: instance {i.id} belongs to app {i.app}")
            if i.id in ids:
                raise ContractError(f"{where}: duplicate instance id {i.id}")
            ids.add(i.id)


def _check_pilots(a: AppState, where: str) -> None:
    from .pilots import parse_pilot_list  # pilots.py builds on the rules above

    got = parse_pilot_list({"group": a.pilot_group, "tools": list(a.pilots)}, where)
    if got.tools != a.pilots:
        raise ContractError(f"{where}: pilots {list(a.pilots)} are not in canonical form")
