"""The data model in Consul (DESIGN.md, "Data model in Consul"), shared by the proxy's Consul
provider and the release commands: names, KV keys, the parsing of Consul's answers and the one
rule that joins an instance's HTTP and HSMS services.

- Each backend instance registers `<app>` (HTTP port) and `<app>-hsms` (HSMS port), both tagged
  `zerodown-group=<group>` and `zerodown-version=<version>`; `Meta["hsms_device_id"]` on the
  HSMS service gives the app's HSMS session id; `Meta["zerodown-instance"]` (optional) names the
  instance both services belong to.
  `Meta["hsms_listen"]` (host:port) gives the app an HSMS listener of its own on every proxy.
- The Active group of an app is the value of `<prefix>/<app>/active`; `previous` records the
  group a switch left (for rollback); `history/<ns>` is the audit trail; `pilots` holds the
  app's pilots as JSON (format: contract/pilots.py), written with CAS like `active`.
- Without the key, the old stack's tags decide: instances tagged `active` are Active.
- Each proxy registers `zerodown-proxy` with its admin address in `Meta["admin"]`.

The join (one rule, both sides): an HTTP entry's partner is the HSMS entry with the same
`Meta["zerodown-instance"]`, else the same Nomad allocation id in the service id
(`_nomad-task-<alloc>-...`), else the id `<http service id>-hsms`, and last the only HSMS
entry of the same group at the same address. The instance id is `<alloc[:8]>-<group>` for a
Nomad allocation (as Nomad's own CLI shortens them), else the HTTP service id.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .model import (
    Instance,
    check_device_id,
    check_listen,
    check_name,
    check_port,
    check_token,
)

GROUP_TAG = "zerodown-group="
VERSION_TAG = "zerodown-version="
ROLE_ACTIVE = "active"  # the old stack's role tags
ROLE_STANDBY = "standby"
META_INSTANCE = "zerodown-instance"
META_DEVICE = "hsms_device_id"
META_LISTEN = "hsms_listen"
META_VERSION = "version"
PROXY_SERVICE = "zerodown-proxy"
PROXY_META_ADMIN = "admin"  # host:port of the proxy's admin API (the CLI reads /v1/status)
PROXY_META_HTTP = "http"  # host:port of its HTTP listener (Standby preview smoke test)
DEFAULT_KEY_PREFIX = "zerodown"
UNKNOWN_VERSION = "unknown"

_NOMAD_ID = re.compile(
    r"^_nomad-task-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-(?:group-(.+?)-)?"
)


def http_service(app: str) -> str:
    return app


def hsms_service(app: str) -> str:
    return f"{app}-hsms"


@dataclass(frozen=True, slots=True)
class Keys:
    """The KV keys of the data model under one prefix (`[consul] key_prefix`)."""

    prefix: str = DEFAULT_KEY_PREFIX

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", self.prefix.strip("/"))

    def _key(self, app: str, *rest: str) -> str:
        return "/".join(p for p in (self.prefix, app, *rest) if p)

    def active(self, app: str) -> str:
        return self._key(app, "active")

    def previous(self, app: str) -> str:
        return self._key(app, "previous")

    def pilots(self, app: str) -> str:
        return self._key(app, "pilots")

    def history(self, app: str, ns: int) -> str:
        return self._key(app, "history", str(ns))

    def history_prefix(self, app: str) -> str:
        return self._key(app, "history") + "/"

    def lock(self, app: str) -> str:
        """The release lock (a Consul session lock held by deploy, switch and rollback)."""
        return self._key(app, "lock")


class ConsulDataError(ValueError):
    """A Consul answer does not have the documented shape (treated as a garbage answer)."""


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    """One element of /v1/health/service/<name>, reduced to what routing and releases need."""

    service_id: str
    name: str
    node: str
    address: str
    port: int
    tags: tuple[str, ...]
    meta: Mapping[str, str]
    passing: bool
    status: str  # the worst check status: passing | warning | critical
    check_summary: str  # e.g. "passing" or "http: critical"

    def tag_value(self, prefix: str) -> str | None:
        for t in self.tags:
            if t.startswith(prefix):
                return t[len(prefix) :]
        return None

    @property
    def alloc(self) -> str | None:
        m = _NOMAD_ID.match(self.service_id)
        return m.group(1) if m else None

    @property
    def group(self) -> str | None:
        g = self.tag_value(GROUP_TAG)
        if g:
            return g
        m = _NOMAD_ID.match(self.service_id)
        if m and m.group(2):
            return m.group(2)
        return None

    @property
    def version(self) -> str:
        return self.tag_value(VERSION_TAG) or self.meta.get(META_VERSION) or UNKNOWN_VERSION

    @property
    def role_tag(self) -> str | None:
        """The old stack's role tag: "active" or "standby" (None when neither is present)."""
        if ROLE_ACTIVE in self.tags:
            return ROLE_ACTIVE
        if ROLE_STANDBY in self.tags:
            return ROLE_STANDBY
        return None

    def join_keys(self) -> list[str]:
        keys = []
        if self.meta.get(META_INSTANCE):
            keys.append("meta:" + self.meta[META_INSTANCE])
        alloc = self.alloc
        if alloc:
            keys.append("alloc:" + alloc)
        return keys

    def problem(self) -> str | None:
        """Why this entry cannot be used (bad tags or Meta), or None. The same rules as the
        file registry's fields (contract.model)."""
        where = f"service {self.service_id!r}"
        try:
            check_token(self.service_id, "a service", "ID")
            check_port(self.port, where, "Port")
            check_token(self.address, where, "address")
            group = self.group
            if group is not None:
                check_name(group, where, "group (tag zerodown-group=)")
            check_token(self.version, where, "version (tag zerodown-version=)")
            device = self.meta.get(META_DEVICE)
            if device not in (None, ""):
                check_device_id(_int_or_text(device), f"{where} Meta")
            if self.meta.get(META_LISTEN):
                check_listen(self.meta[META_LISTEN], f"{where} Meta")
            if META_INSTANCE in self.meta:
                check_token(self.meta[META_INSTANCE], where, f"Meta {META_INSTANCE}")
        except ValueError as exc:
            return str(exc)
        return None


def _int_or_text(text: str) -> int | str:
    try:
        return int(text, 10)
    except ValueError:
        return text


def _worst(statuses: Sequence[str]) -> str:
    for s in ("critical", "warning", "passing"):
        if s in statuses:
            return s
    return "critical" if statuses else "passing"  # an unknown status is not passing


def _obj(x: Any, what: str) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise ConsulDataError(f"{what} is not a JSON object")
    return x


def parse_health(body: Any) -> tuple[ServiceEntry, ...]:
    """Parse the decoded JSON of /v1/health/service/<name>. Raises ConsulDataError.

    An entry is *passing* when every check listed with it (the node's serfHealth included) is
    `passing`; `warning` is not routable, as with Consul's own `?passing` filter."""
    if not isinstance(body, list):
        raise ConsulDataError("health answer is not a JSON list")
    out = []
    for n, raw in enumerate(body):
        e = _obj(raw, f"health entry #{n}")
        svc = _obj(e.get("Service"), f"health entry #{n} Service")
        node = _obj(e.get("Node") or {}, f"health entry #{n} Node")
        checks = e.get("Checks") or []
        if not isinstance(checks, list):
            raise ConsulDataError(f"health entry #{n}: Checks is not a list")
        sid, name, port = svc.get("ID"), svc.get("Service"), svc.get("Port")
        if not isinstance(sid, str) or not isinstance(name, str):
            raise ConsulDataError(f"health entry #{n}: Service.ID/Service missing")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 65536:
            raise ConsulDataError(f"health entry #{n} ({sid}): bad Service.Port {port!r}")
        tags = svc.get("Tags") or []
        meta = svc.get("Meta") or {}
        if not isinstance(tags, list) or not isinstance(meta, dict):
            raise ConsulDataError(f"health entry #{n} ({sid}): bad Tags/Meta")
        failing, statuses = [], []
        for c in checks:
            c = _obj(c, f"health entry #{n} check")
            status = c.get("Status")
            statuses.append(status if isinstance(status, str) else "")
            if status != "passing":
                failing.append(f"{c.get('Name') or c.get('CheckID')}: {status}")
        out.append(
            ServiceEntry(
                service_id=sid,
                name=name,
                node=str(node.get("Node", "")),
                # Consul semantics: an empty service address means the node's address.
                address=str(svc.get("Address") or node.get("Address") or ""),
                port=port,
                tags=tuple(str(t) for t in tags),
                meta={str(k): str(v) for k, v in meta.items()},
                passing=not failing,
                status=_worst(statuses),
                check_summary="; ".join(failing) if failing else "passing",
            )
        )
    return tuple(out)


@dataclass(frozen=True, slots=True)
class KvValue:
    """A KV key's value and ModifyIndex (value None: the key is absent; the index is then the
    404's X-Consul-Index)."""

    value: str | None
    modify_index: int


def parse_kv(body: Any, key: str) -> KvValue:
    """Parse the decoded JSON of GET /v1/kv/<key> (a one-element list). Raises ConsulDataError."""
    if not isinstance(body, list) or len(body) != 1:
        raise ConsulDataError(f"KV answer for {key} is not a one-element list")
    e = _obj(body[0], f"KV entry {key}")
    mi = e.get("ModifyIndex")
    if not isinstance(mi, int) or isinstance(mi, bool) or mi < 0:
        raise ConsulDataError(f"KV entry {key}: bad ModifyIndex {mi!r}")
    raw = e.get("Value")
    if raw is None:
        return KvValue("", mi)
    if not isinstance(raw, str):
        raise ConsulDataError(f"KV entry {key}: Value is not base64 text")
    try:
        value = base64.b64decode(raw, validate=True).decode().strip()
    except (binascii.Error, UnicodeDecodeError):
        raise ConsulDataError(f"KV entry {key}: Value is not base64 UTF-8 text") from None
    return KvValue(value, mi)


@dataclass(frozen=True, slots=True)
class Joined:
    """The instances of one app as Consul has them, and what could not be used."""

    instances: tuple[Instance, ...]
    entries: Mapping[str, ServiceEntry]  # instance id -> its HTTP entry
    unmatched_hsms: tuple[str, ...] = ()  # HSMS service ids without an HTTP partner
    ignored: tuple[str, ...] = ()  # HTTP service ids without a group
    invalid: Mapping[str, str] = field(default_factory=dict)  # service id -> why


def nomad_instance_id(alloc: str, group: str) -> str:
    return f"{alloc[:8]}-{group}"


def instance_id(entry: ServiceEntry, group: str) -> str:
    alloc = entry.alloc
    return nomad_instance_id(alloc, group) if alloc else entry.service_id


def join_instances(app: str, http: Sequence[ServiceEntry], hsms: Sequence[ServiceEntry]) -> Joined:
    """Join HTTP and HSMS entries into instances (the rule in the module docstring). Entries
    with invalid tags or Meta are left out and listed in `invalid`."""
    invalid: dict[str, str] = {}
    for e in (*http, *hsms):
        why = e.problem()
        if why is not None:
            invalid[e.service_id] = why
    http = [e for e in http if e.service_id not in invalid]
    hsms = [e for e in hsms if e.service_id not in invalid]
    by_key: dict[str, ServiceEntry] = {}
    for h in hsms:
        for k in h.join_keys():
            by_key.setdefault(k, h)
        by_key.setdefault("id:" + h.service_id, h)
    used: set[str] = set()
    pairs: list[tuple[ServiceEntry, ServiceEntry | None]] = []
    ignored: list[str] = []
    for e in http:
        if e.group is None:
            ignored.append(e.service_id)
            continue
        partner = None
        for k in [*e.join_keys(), "id:" + e.service_id + "-hsms"]:
            cand = by_key.get(k)
            if cand is not None and cand.service_id not in used:
                partner = cand
                break
        if partner is not None:
            used.add(partner.service_id)
        pairs.append((e, partner))
    # Last resort: same address and group, when that pairing is unambiguous.
    for h in [h for h in hsms if h.service_id not in used]:
        lonely = [
            n
            for n, (e, p) in enumerate(pairs)
            if p is None and e.address == h.address and e.group == h.group
        ]
        if len(lonely) == 1:
            pairs[lonely[0]] = (pairs[lonely[0]][0], h)
            used.add(h.service_id)
    instances, entries = [], {}
    for e, p in pairs:
        group = e.group
        assert group is not None
        iid = instance_id(e, group)
        entries[iid] = e
        instances.append(
            Instance(
                id=iid,
                app=app,
                group=group,
                version=e.version,
                address=e.address,
                http_port=e.port,
                hsms_port=p.port if p is not None and p.passing else None,
                healthy=e.passing,
                alloc=e.alloc,
                checks=_worst([e.status] + ([p.status] if p is not None else [])),
            )
        )
    return Joined(
        instances=tuple(instances),
        entries=entries,
        unmatched_hsms=tuple(h.service_id for h in hsms if h.service_id not in used),
        ignored=tuple(ignored),
        invalid=invalid,
    )


def device_id(hsms: Sequence[ServiceEntry]) -> int | None:
    """The HSMS session id the backends expect: `Meta["hsms_device_id"]` of the `<app>-hsms`
    services when they agree on one valid value (else None: the proxy's [hsms] default)."""
    values = {e.meta.get(META_DEVICE) for e in hsms if e.problem() is None} - {None, ""}
    if len(values) != 1:
        return None
    return int(values.pop())  # type: ignore[arg-type]  # problem() checked it is an integer


def hsms_listen(hsms: Sequence[ServiceEntry]) -> str | None:
    """The app's own HSMS listener: `Meta["hsms_listen"]` of the `<app>-hsms` services when they
    agree on one valid value (else None: the proxy's [proxy] hsms_listen)."""
    values = {e.meta.get(META_LISTEN) for e in hsms if e.problem() is None} - {None, ""}
    return values.pop() if len(values) == 1 else None


def active_from_tags(app: str, instances: Sequence[Instance], entries: Mapping[str, ServiceEntry]
                     ) -> tuple[str | None, str | None]:  # fmt: skip
    """The old stack's rule when the Active key is absent: the group of the instances tagged
    `active`. Returns (group, None) or (None, why not)."""
    groups = sorted({i.group for i in instances if entries[i.id].role_tag == ROLE_ACTIVE})
    if len(groups) == 1:
        return groups[0], None
    if not groups:
        return None, (
            f"app {app}: no Active key and no instance tagged 'active' "
            "(set the key with `zerodown switch --to GROUP`)"
        )
    return None, f"app {app}: no Active key and 'active' tags on several groups {groups}"
