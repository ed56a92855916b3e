"""Pure translation of Consul answers into a `RegistryState` (no I/O, unit-testable).

Inputs are the bodies of `GET /v1/health/service/<app>` and `<app>-hsms` (every instance with
all its checks) and of `GET /v1/kv/<prefix>/<app>/active`. Rules (DESIGN.md, "Data model in
Consul"):

- An entry is *passing* when every check listed with it (the node's serfHealth included) is
  `passing`; `warning` is not routable, as with Consul's own `?passing` filter.
- The HTTP and the HSMS service of one instance are joined into one `Instance` (so both
  protocols flip in the same snapshot) by, in order: `Meta["zerodown-instance"]`, the Nomad
  allocation id inside the service id (`_nomad-task-<alloc>-group-...`), the HTTP service id
  plus `-hsms`, and last the address when exactly one HTTP instance of that group lives there.
- `healthy` follows the HTTP entry; `hsms_port` is set only while the HSMS entry passes, so an
  instance whose HSMS side fails still serves HTTP but gets no new HSMS sessions.
- `Meta["hsms_device_id"]` on the `<app>-hsms` services gives the app's HSMS session id.
- Group and version come from the tags `zerodown-group=` / `zerodown-version=` (falling back to
  the group in a Nomad service id, and `Meta["version"]`).
- The Active group is the KV value; the generation is its ModifyIndex. Without the key, the
  old stack's tags decide: the group of the instances tagged `active` is Active. The
  generation is then the highest X-Consul-Index among the app's answers (the KV 404 carries the
  tombstone index): raft indexes only grow, so the generation never goes backwards when the key
  is deleted, and the ModifyIndex of a key created later is larger than all of them.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..routing import AppState, Instance, RegistryState

GROUP_TAG = "zerodown-group="
VERSION_TAG = "zerodown-version="
INSTANCE_META = "zerodown-instance"
DEVICE_META = "hsms_device_id"
_NOMAD_ID = re.compile(
    r"^_nomad-task-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-(?:group-(.+?)-)?"
)


class ConsulDataError(ValueError):
    """A Consul answer does not have the documented shape (treated as a garbage answer)."""


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    """One element of /v1/health/service/<name>, reduced to what routing needs."""

    service_id: str
    name: str
    node: str
    address: str
    port: int
    tags: tuple[str, ...]
    meta: Mapping[str, str]
    passing: bool
    check_summary: str  # e.g. "passing" or "http: critical"

    def tag_value(self, prefix: str) -> str | None:
        for t in self.tags:
            if t.startswith(prefix):
                return t[len(prefix) :]
        return None

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
        return self.tag_value(VERSION_TAG) or self.meta.get("version") or "unknown"

    @property
    def role_tag(self) -> str | None:
        """The old stack's role tag: "active" or "standby" (None when neither is present)."""
        if "active" in self.tags:
            return "active"
        if "standby" in self.tags:
            return "standby"
        return None

    def join_keys(self) -> list[str]:
        keys = []
        if self.meta.get(INSTANCE_META):
            keys.append("meta:" + self.meta[INSTANCE_META])
        m = _NOMAD_ID.match(self.service_id)
        if m:
            keys.append("alloc:" + m.group(1))
        return keys


@dataclass(frozen=True, slots=True)
class KvValue:
    """The `active` key: its value and ModifyIndex (None when the key is absent)."""

    value: str | None
    modify_index: int


def _obj(x: Any, what: str) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise ConsulDataError(f"{what} is not a JSON object")
    return x


def parse_health(body: Any) -> tuple[ServiceEntry, ...]:
    """Parse the decoded JSON of /v1/health/service/<name>. Raises ConsulDataError."""
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
        failing = []
        for c in checks:
            c = _obj(c, f"health entry #{n} check")
            status = c.get("Status")
            if status != "passing":
                failing.append(f"{c.get('Name') or c.get('CheckID')}: {status}")
        out.append(
            ServiceEntry(
                service_id=sid,
                name=name,
                node=str(node.get("Node", "")),
                # Consul semantics: an empty service address means the node's address.
                address=svc.get("Address") or str(node.get("Address") or ""),
                port=port,
                tags=tuple(str(t) for t in tags),
                meta={str(k): str(v) for k, v in meta.items()},
                passing=not failing,
                check_summary="; ".join(failing) if failing else "passing",
            )
        )
    return tuple(out)


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
class AppView:
    """The latest answers for one app, as the watchers saw them."""

    name: str
    http: tuple[ServiceEntry, ...]
    hsms: tuple[ServiceEntry, ...]
    active: KvValue  # value None: the key is absent (modify_index: the 404's X-Consul-Index)
    http_index: int
    hsms_index: int


@dataclass(frozen=True, slots=True)
class AppResult:
    """What `build_app` made of one app, and why (for status and logs)."""

    state: AppState
    generation: int
    generation_source: str  # "kv" | "tags"
    problem: str | None  # set when the app cannot be routed from this view
    unmatched_hsms: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()


def join_instances(
    app: str, http: Sequence[ServiceEntry], hsms: Sequence[ServiceEntry]
) -> tuple[tuple[Instance, ...], tuple[str, ...], tuple[str, ...]]:
    """Join HTTP and HSMS entries into instances. Returns (instances, unmatched HSMS service
    ids, ignored HTTP service ids without a group)."""
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
    rest = [h for h in hsms if h.service_id not in used]
    for h in rest:
        lonely = [
            i
            for i, (e, p) in enumerate(pairs)
            if p is None and e.address == h.address and e.group == h.group
        ]
        if len(lonely) == 1:
            pairs[lonely[0]] = (pairs[lonely[0]][0], h)
            used.add(h.service_id)
    instances = []
    for e, p in pairs:
        assert e.group is not None
        instances.append(
            Instance(
                id=e.service_id,
                app=app,
                group=e.group,
                version=e.version,
                address=e.address,
                http_port=e.port,
                hsms_port=p.port if p is not None and p.passing else None,
                healthy=e.passing,
            )
        )
    unmatched = tuple(h.service_id for h in hsms if h.service_id not in used)
    return tuple(instances), unmatched, tuple(ignored)


def build_app(view: AppView) -> AppResult:
    """One app's `AppState`, its generation and, when it cannot be routed, the reason."""
    instances, unmatched, ignored = join_instances(view.name, view.http, view.hsms)
    problem = None
    if view.active.value is not None:
        source = "kv"
        generation = view.active.modify_index
        active: str | None = view.active.value
        if not active:
            problem = f"app {view.name}: the Active key is empty"
            active = None
    else:
        source = "tags"
        # An empty answer (e.g. no <app>-hsms service) carries the index of the whole catalog,
        # which moves with every other service: it would make the generation churn.
        generation = max(
            view.active.modify_index,
            view.http_index if view.http else 0,
            view.hsms_index if view.hsms else 0,
        )
        by_entry = {e.service_id: e for e in view.http}
        groups = sorted(
            {i.group for i in instances if by_entry[i.id].role_tag == "active"},
        )
        active = groups[0] if len(groups) == 1 else None
        if not groups:
            problem = (
                f"app {view.name}: no Active key and no instance tagged 'active' "
                "(set the key with `zerodown switch --to GROUP`)"
            )
        elif len(groups) > 1:
            problem = f"app {view.name}: no Active key and 'active' tags on several groups {groups}"
    if problem is None and active is not None:
        members = [i for i in instances if i.group == active]
        if not any(i.healthy for i in members):
            problem = (
                f"app {view.name}: Active group {active} has 0/{len(members)} passing instances"
            )
    state = AppState(
        name=view.name,
        active_group=active,
        instances=instances,
        hsms_device_id=device_id(view.hsms),
    )
    return AppResult(state, generation, source, problem, unmatched, ignored)


def device_id(hsms: Sequence[ServiceEntry]) -> int | None:
    """The HSMS session id the backends expect: `Meta["hsms_device_id"]` of the `<app>-hsms`
    services, when they agree on one integer (else None: the proxy's [hsms] default applies)."""
    values = {e.meta.get(DEVICE_META) for e in hsms} - {None, ""}
    if len(values) != 1:
        return None
    try:
        return int(values.pop())  # type: ignore[arg-type]
    except ValueError:
        return None


def build_state(results: Sequence[AppResult], source: str) -> RegistryState:
    """Combine apps into one RegistryState; the generation is the highest app generation
    (raft indexes are global, so a switch of any app raises it)."""
    return RegistryState(
        generation=max((r.generation for r in results), default=0),
        apps=tuple(r.state for r in results),
        source=source,
    )
