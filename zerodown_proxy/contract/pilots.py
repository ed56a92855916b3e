"""Pilots: the tools (and HTTP clients) of an app that run on the Standby group before a switch.

An app's pilots are part of its routing state (`AppState.pilots`, `AppState.pilot_group`), so
the watcher applies them atomically with the rest of the snapshot. This module owns their
format, written the same way in the registry file and in Consul KV (`<prefix>/<app>/pilots`)::

    {"group": "green", "tools": ["127.0.0.2", "device:7", "header:x-tool-id=ETCH01"]}

- `group`: the Standby group the pilots were added for. Pilots apply only while that group is
  the Standby group; after a switch to it (or away from it) they mean nothing, so a switch that
  writes the Active pointer first and clears the list after can never send a pilot back.
- a tool is an IP address (an HSMS tool's or an HTTP client's source address), `device:N` (an
  HSMS tool's device id, the session id of its data messages; a bare number is accepted on
  input), or `header:NAME=VALUE` (HTTP requests carrying that header with that value).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .model import HSMS_DEVICE_ID_MAX, ContractError, check_name

DEVICE = "device:"
HEADER = "header:"
MAX_PILOTS = 256  # a pilot is a handful of tools, not a fab; a bound keeps the key small
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")  # an RFC 9110 token
_HEADER_VALUE = re.compile(r"[!-~]([ -~]{0,254}[!-~])?")


def parse_tool(text: Any) -> str:
    """The canonical form of one pilot, or ContractError saying which forms are accepted."""
    if not isinstance(text, str):
        raise ContractError(f"pilot {text!r} is not text")
    t = text.strip()
    if t.lower().startswith(HEADER):
        name, eq, value = t[len(HEADER) :].partition("=")
        if not eq or not _HEADER_NAME.fullmatch(name) or not _HEADER_VALUE.fullmatch(value):
            raise ContractError(
                f"pilot {text!r}: a header rule is header:NAME=VALUE (NAME a header name, VALUE "
                "1-256 printable characters)"
            )
        return f"{HEADER}{name.lower()}={value}"
    number = t[len(DEVICE) :] if t.lower().startswith(DEVICE) else t
    if number.isascii() and number.isdigit():
        n = int(number)
        if n > HSMS_DEVICE_ID_MAX:
            raise ContractError(
                f"pilot {text!r}: a device id is 0-{HSMS_DEVICE_ID_MAX} (E37 session id)"
            )
        return f"{DEVICE}{n}"
    try:
        return str(_address(t))
    except ValueError:
        raise ContractError(
            f"pilot {text!r} is not a tool: give an IP address (10.1.2.3), a device id (7 or "
            "device:7) or an HTTP header rule (header:NAME=VALUE)"
        ) from None


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    a = ipaddress.ip_address(text)
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped  # what a dual-stack listener reports for an IPv4 peer
    return a


def canonical_address(text: str) -> str:
    """A peer address as pilots compare it (IPv4-mapped IPv6 as plain IPv4); text unchanged
    when it is not an address."""
    try:
        return str(_address(text))
    except ValueError:
        return text


def parse_tools(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise ContractError(f"{where}: pilots 'tools' must be a list, got {value!r}")
    if len(value) > MAX_PILOTS:
        raise ContractError(f"{where}: {len(value)} pilots, at most {MAX_PILOTS}")
    out: list[str] = []
    for v in value:
        try:
            p = parse_tool(v)
        except ContractError as exc:
            raise ContractError(f"{where}: {exc}") from None
        if p not in out:
            out.append(p)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class PilotList:
    """One app's pilots as stored (file or KV), validated."""

    group: str | None
    tools: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, "tools": list(self.tools)}


NO_PILOTS = PilotList(None, ())


def parse_pilot_list(value: Any, where: str) -> PilotList:
    """The stored object ({"group": ..., "tools": [...]}); ContractError naming the field."""
    if value is None:
        return NO_PILOTS
    if not isinstance(value, Mapping):
        raise ContractError(f"{where}: pilots must be an object {{group, tools}}, got {value!r}")
    extra = sorted(set(value) - {"group", "tools"})
    if extra:
        raise ContractError(f"{where}: pilots: unknown key {extra[0]!r} (known: group, tools)")
    tools = parse_tools(value.get("tools", []), where)
    group = value.get("group")
    if group is None:
        if tools:
            raise ContractError(f"{where}: pilots need the Standby 'group' they were added for")
        return NO_PILOTS
    return PilotList(check_name(group, where, "pilots group"), tools)


@dataclass(frozen=True, slots=True)
class Pilots:
    """The pilots in force for one app's routing (sets for the data path's lookups)."""

    group: str
    tools: tuple[str, ...]
    addresses: frozenset[str]
    devices: frozenset[int]
    headers: tuple[tuple[bytes, bytes], ...]  # (lower-case name, value)

    @classmethod
    def build(cls, group: str, tools: Iterable[str]) -> Pilots:
        tools = tuple(tools)
        addresses, devices, headers = set(), set(), []
        for t in tools:
            if t.startswith(DEVICE):
                devices.add(int(t[len(DEVICE) :]))
            elif t.startswith(HEADER):
                name, _, value = t[len(HEADER) :].partition("=")
                headers.append((name.encode("latin-1"), value.encode("latin-1")))
            else:
                addresses.add(t)
        return cls(group, tools, frozenset(addresses), frozenset(devices), tuple(headers))

    def hsms(self, address: str, device_id: int | None) -> bool:
        """Is the HSMS tool at `address` (canonical) with this device id a pilot?"""
        return address in self.addresses or (device_id is not None and device_id in self.devices)

    def http(self, address: str, headers: Mapping[bytes, bytes] | None) -> bool:
        """Is an HTTP request from `address` with these (lower-cased) headers a pilot?"""
        if address in self.addresses:
            return True
        if headers:
            for name, value in self.headers:
                got = headers.get(name)
                if got is not None and got.strip() == value:
                    return True
        return False
