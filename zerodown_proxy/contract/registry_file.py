"""The local stack's registry file: one JSON document, written by `orchestrator.registry` (atomic
rename) and watched by the proxy's file provider. This module is the one owner of its format::

    {"generation": 7,
     "apps": {"drimeap": {"active": "blue", "previous": "green", "hosts": [], "path_prefix": "/",
                          "hsms_device_id": 0, "hsms_listen": "0.0.0.0:5001",
                          "pilots": {"group": "green", "tools": ["10.1.2.3"]},
                          "instances": [{"id": "drimeap-blue-1", "group": "blue",
                                         "version": "v1", "address": "127.0.0.1",
                                         "http_port": 9001, "hsms_port": 9101,
                                         "healthy": true}]}},
     "proxies": [{"name": "local", "admin": "127.0.0.1:8081"}]}

Every field is type-checked (contract.model's rules): `"healthy": "false"` is an error, not a
healthy instance; `"hosts": 5` is an error, not a TypeError later. Keys an app or an instance
does not know are errors too, so that a typo (`"helathy": false`) cannot silently mean the
default. Unknown top-level keys are ignored (room for the orchestrator's own bookkeeping).
"""

from __future__ import annotations

from typing import Any

import orjson

from .model import (
    AppState,
    ContractError,
    Instance,
    RegistryState,
    check_device_id,
    check_generation,
    check_hosts,
    check_listen,
    check_name,
    check_path_prefix,
    check_port,
    check_token,
)
from .pilots import parse_pilot_list

# A new field is declared here first (the file's one owner); anything else is an error.
# "previous": the group the last switch left, for `zerodown rollback` (local stack).
# "hsms_listen": the app's own HSMS listener; "pilots": contract/pilots.py's object.
APP_KEYS = frozenset(
    {"active", "previous", "hosts", "path_prefix", "hsms_device_id", "hsms_listen", "pilots",
     "instances"}
)  # fmt: skip
INSTANCE_KEYS = frozenset(
    {"id", "group", "version", "address", "http_port", "hsms_port", "healthy"}
)
DEFAULT_ADDRESS = "127.0.0.1"


class RegistryError(ContractError):
    """The registry file cannot be used; the message says what is wrong with it."""


def _req(obj: dict[str, Any], key: str, typ: type, where: str) -> Any:
    if key not in obj:
        raise RegistryError(f"{where}: missing {key!r}")
    value = obj[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise RegistryError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _unknown(obj: dict[str, Any], known: frozenset[str], where: str) -> None:
    extra = sorted(set(obj) - known)
    if extra:
        raise RegistryError(
            f"{where}: unknown key {extra[0]!r} (known: {', '.join(sorted(known))})"
        )


def _instance(app: str, i: Any, where: str) -> Instance:
    if not isinstance(i, dict):
        raise RegistryError(f"{where}: not an object")
    _unknown(i, INSTANCE_KEYS, where)
    hsms = i.get("hsms_port")
    healthy = i.get("healthy", True)
    if not isinstance(healthy, bool):
        raise RegistryError(f"{where}: 'healthy' must be true or false, got {healthy!r}")
    return Instance(
        id=check_token(_req(i, "id", str, where), where, "'id'"),
        app=app,
        group=check_name(_req(i, "group", str, where), where, "'group'"),
        version=check_token(_req(i, "version", str, where), where, "'version'"),
        address=check_token(i.get("address", DEFAULT_ADDRESS), where, "'address'"),
        http_port=check_port(_req(i, "http_port", int, where), where, "'http_port'"),
        hsms_port=None if hsms is None else check_port(hsms, where, "'hsms_port'"),
        healthy=healthy,
        checks="passing" if healthy else "critical",
    )


def _app(name: str, a: Any) -> AppState:
    where = f"app {name}"
    if not isinstance(a, dict):
        raise RegistryError(f"{where}: not an object")
    _unknown(a, APP_KEYS, where)
    active = a.get("active")
    if active is not None and not isinstance(active, str):
        raise RegistryError(f"{where}: 'active' must be a group name or null, got {active!r}")
    if active is not None:
        check_name(active, where, "'active'")
    previous = a.get("previous")
    if previous is not None:
        check_name(previous, where, "'previous'")
    hosts = a.get("hosts", [])
    if not isinstance(hosts, list):
        raise RegistryError(f"{where}: 'hosts' must be a list of host names, got {hosts!r}")
    device = a.get("hsms_device_id")
    listen = a.get("hsms_listen")
    pilots = parse_pilot_list(a.get("pilots"), where)
    instances = []
    seen: set[str] = set()
    for n, raw in enumerate(_req(a, "instances", list, where)):
        inst = _instance(name, raw, f"{where} instance #{n}")
        if inst.id in seen:
            raise RegistryError(f"{where}: duplicate instance id {inst.id}")
        seen.add(inst.id)
        instances.append(inst)
    return AppState(
        name=name,
        active_group=active,
        instances=tuple(instances),
        hosts=check_hosts(hosts, where),
        path_prefix=check_path_prefix(a.get("path_prefix", "/"), where),
        hsms_device_id=None if device is None else check_device_id(device, where),
        hsms_listen=None if listen is None else check_listen(listen, where),
        pilot_group=pilots.group,
        pilots=pilots.tools,
    )


def _proxies(value: Any) -> None:
    if not isinstance(value, list):
        raise RegistryError("registry: 'proxies' must be a list")
    for n, p in enumerate(value):
        where = f"proxy #{n}"
        if not isinstance(p, dict):
            raise RegistryError(f"{where}: not an object")
        check_token(_req(p, "name", str, where), where, "'name'")
        check_token(_req(p, "admin", str, where), where, "'admin'")


def parse_registry(raw: bytes, source: str = "file") -> RegistryState:
    """Validate and convert the registry JSON. Raises RegistryError (a ContractError) naming
    the field; never anything else for any input bytes."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RegistryError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RegistryError("top level is not an object")
    try:
        generation = check_generation(_req(data, "generation", int, "registry"), "registry")
        apps_obj = _req(data, "apps", dict, "registry")
        apps = []
        for name, a in apps_obj.items():
            check_name(name, "registry", "app")
            apps.append(_app(name, a))
        if "proxies" in data:
            _proxies(data["proxies"])
    except RegistryError:
        raise
    except ContractError as exc:  # a rule from contract.model: same error, same message
        raise RegistryError(str(exc)) from None
    return RegistryState(generation=generation, apps=tuple(apps), source=source)
