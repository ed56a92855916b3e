"""`zerodown pilot add|remove|list`: run a few tools on the Standby version before the switch.

A pilot is a tool named by its IP address or HSMS device id (or, for HTTP, a header rule); the
list is part of the app's routing state (format and rules: zerodown_proxy/contract/pilots.py),
so every proxy applies it atomically with the rest of its snapshot and moves the piloted tools'
sessions to the Standby group exactly as a switch moves everyone. Both backends:

- local stack: the registry file's `pilots` object, changed under the registry lock with the
  same generation check a switch makes;
- Consul: the KV key `<prefix>/<app>/pilots`, written with `?cas=<ModifyIndex>` (a concurrent
  change is reported, not retried); its ModifyIndex is the generation the proxies must reach.

add and remove hold the release lock (a pilot change while a deploy or switch runs is refused)
and are recorded in the audit trail (`pilot-add`, `pilot-remove`); both wait until every proxy
applied the change. The next switch (or rollback) clears the list: the pilots are then on the
Active group like every other tool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from zerodown_proxy.contract.model import ContractError
from zerodown_proxy.contract.pilots import NO_PILOTS, PilotList, parse_pilot_list, parse_tool

from . import registry
from .backend import Progress, Refused
from .probes import wait_proxies

if TYPE_CHECKING:
    from .release_local import LocalBackend
    from .release_nomad import NomadConsulBackend

CLEARED = orjson.dumps(NO_PILOTS.to_json())  # what a switch writes: no pilots


@dataclass(slots=True)
class PilotOutcome:
    app: str
    standby: str | None  # the Standby group the pilots run on
    pilots: PilotList  # the list in force after the command
    generation: int
    propagation_s: float
    proxies: int

    def to_json(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "standby": self.standby,
            "group": self.pilots.group,
            "tools": list(self.pilots.tools),
            "in_force": self.in_force,
            "generation": self.generation,
        }

    @property
    def in_force(self) -> bool:
        return bool(self.pilots.tools) and self.pilots.group == self.standby


def changed(current: PilotList, action: str, tool: str, app: str, standby: str) -> PilotList:
    """The list after `action` (add/remove) of `tool`, or Refused saying why not. Pilots left
    from another Standby group (a switch that did not clear them) do not count."""
    try:
        canon = parse_tool(tool)
    except ContractError as exc:
        raise Refused(f"{exc}; nothing changed") from None
    tools = current.tools if current.group == standby else ()
    if action == "add":
        if canon in tools:
            raise Refused(f"{canon} is already a pilot of {app} (on {standby}); nothing changed")
        return PilotList(standby, (*tools, canon))
    if canon not in tools:
        listed = ", ".join(tools) or "none"
        raise Refused(f"{canon} is not a pilot of {app} (pilots: {listed}); nothing changed")
    rest = tuple(t for t in tools if t != canon)
    return PilotList(standby, rest) if rest else NO_PILOTS


def check_standby(app: str, standby: str | None, members: list[tuple[str, bool]]) -> str:
    """`members`: (instance id, passing) of the Standby group."""
    if standby is None:
        raise Refused(f"app {app} has no Standby group; a pilot runs on the Standby version")
    passing = [iid for iid, ok in members if ok]
    if not passing:
        raise Refused(
            f"Standby group {standby} of {app} has 0/{len(members)} passing instances; "
            "not adding a pilot"
        )
    return standby


def _stored(raw: bytes | None, where: str) -> PilotList:
    if not raw:
        return NO_PILOTS
    try:
        return parse_pilot_list(orjson.loads(raw), where)
    except (orjson.JSONDecodeError, ContractError) as exc:
        raise Refused(f"{where} is not a valid pilot list ({exc}); fix or delete it") from None


# -- local stack ----------------------------------------------------------------------------------


async def local_list(b: LocalBackend, app: str) -> PilotOutcome:
    reg = registry.read(b.paths.registry)
    a = b._app(reg, app)
    _, standby = b._groups(a)
    pilots = parse_pilot_list(a.get("pilots"), f"app {app}")
    return PilotOutcome(app, standby, pilots, reg["generation"], 0.0, len(b._proxies(reg)))


async def local_change(
    b: LocalBackend, action: str, app: str, tool: str, progress: Progress
) -> PilotOutcome:
    async with b._release(app, f"pilot-{action}", f"changing the pilots of {app}", progress) as e:
        e["tool"] = tool
        reg = registry.read(b.paths.registry)
        a = b._app(reg, app)
        active, standby = b._groups(a)
        if action == "add":
            members = [(i["id"], bool(i.get("healthy", True)))
                       for i in a["instances"] if i["group"] == standby]  # fmt: skip
            check_standby(app, standby, members)
        assert standby is not None or action == "remove"
        current = parse_pilot_list(a.get("pilots"), f"app {app}")
        new = changed(current, action, tool, app, standby or "")
        e.update(group=standby, active=active, pilots=list(new.tools))
        expected = reg["generation"]

        def write(r: dict[str, Any]) -> None:
            if r["generation"] != expected:
                raise Refused(f"the registry changed meanwhile (generation {expected} -> "
                              f"{r['generation']}); nothing changed, try again")  # fmt: skip
            x = b._app(r, app)
            if new.tools:
                x["pilots"] = new.to_json()
            else:
                x.pop("pilots", None)

        out = registry.update(b.paths.registry, write)
        written = time.perf_counter()
        e.update(changed=True, generation=out["generation"])
        proxies = b._proxies(out)
        async with aiohttp.ClientSession() as session:
            await wait_proxies(session, proxies, out["generation"], b.proxy_timeout)
        took = time.perf_counter() - written
        e.update(propagation_ms=round(took * 1000, 2), proxies=len(proxies))
        return PilotOutcome(app, standby, new, out["generation"], took, len(proxies))


# -- Consul ---------------------------------------------------------------------------------------


async def consul_list(b: NomadConsulBackend, app: str) -> PilotOutcome:
    async with b._clients() as (_session, _nomad, consul):
        view = b._view(consul)
        instances = await view.registered(app)
        active, index = await view.active(app)
        got = await consul.kv_get(b.keys.pilots(app))
    standby = _standby_of(instances, active)
    pilots = _stored(got[0] if got else None, f"Consul key {b.keys.pilots(app)}")
    return PilotOutcome(app, standby, pilots, max(index, got[1] if got else 0), 0.0, 0)


def _standby_of(instances: list[Any], active: str) -> str | None:
    others = sorted({i.group for i in instances} - {active})
    return others[0] if others else None


async def consul_change(
    b: NomadConsulBackend, action: str, app: str, tool: str, progress: Progress
) -> PilotOutcome:
    entry: dict[str, Any] = {"action": f"pilot-{action}", "tool": tool}
    async with b._clients() as (session, _nomad, consul):
        async with b._locked(consul, app, entry, f"changing the pilots of {app}", progress):
            try:
                out = await _consul_change(b, session, consul, action, app, tool, entry)
            except Refused as exc:
                result = "failed" if entry.get("generation") else "refused"
                await b._audit(consul, app, {**entry, "result": result, "reason": str(exc)},
                               progress)  # fmt: skip
                raise
            await b._audit(consul, app, {**entry, "result": "ok"}, progress)
            return out


async def _consul_change(
    b: NomadConsulBackend,
    session: aiohttp.ClientSession,
    consul: Any,
    action: str,
    app: str,
    tool: str,
    entry: dict[str, Any],
) -> PilotOutcome:
    view = b._view(consul)
    instances = await view.registered(app)
    active, _ = await view.active(app)
    standby = _standby_of(instances, active)
    if action == "add":
        members = [(i.id, i.checks == "passing") for i in instances if i.group == standby]
        check_standby(app, standby, members)
    key = b.keys.pilots(app)
    got = await consul.kv_get(key)
    current = _stored(got[0] if got else None, f"Consul key {key}")
    new = changed(current, action, tool, app, standby or "")
    entry.update(group=standby, active=active, pilots=list(new.tools))
    await b._confirm(f"changing the pilots of {app}")
    if not await consul.kv_put(key, orjson.dumps(new.to_json()), cas=got[1] if got else 0):
        raise Refused(f"someone else changed the pilots of {app} (Consul key {key}) meanwhile; "
                      "nothing changed, try again")  # fmt: skip
    written = time.perf_counter()
    after = await consul.kv_get(key)
    if after is None:
        raise Refused(f"Consul key {key} vanished right after it was written")
    generation = after[1]
    entry["generation"] = generation
    proxies = [p for p in await view.proxies() if not p.critical]
    await wait_proxies(session, [(p.name, p.admin) for p in proxies], generation,
                       b.s.proxy_timeout)  # fmt: skip
    took = time.perf_counter() - written
    entry.update(propagation_ms=round(took * 1000, 2), proxies=len(proxies))
    return PilotOutcome(app, standby, new, generation, took, len(proxies))


async def consul_clear(consul: Any, key: str, progress: Progress) -> bool:
    """After a switch or rollback: no pilots any more (written, not deleted: the key's
    ModifyIndex is part of the app's generation, which must never go back). True: there were
    pilots and they are cleared."""
    try:
        got = await consul.kv_get(key)
        if got is None or not got[0] or _stored(got[0], key).tools == ():
            return False
        return bool(await consul.kv_put(key, CLEARED))
    except Refused as exc:
        progress(f"warning: could not clear the pilots ({key}): {exc}; they no longer apply")
        return False


# -- the command ----------------------------------------------------------------------------------


async def run(backend: Any, action: str, app: str, tool: str | None, progress: Progress
              ) -> PilotOutcome:  # fmt: skip
    local = backend.name == "local"
    if action == "list":
        return await (local_list(backend, app) if local else consul_list(backend, app))
    if not tool:
        raise Refused(f"pilot {action} needs a tool: an IP address, a device id or header:N=V")
    if local:
        return await local_change(backend, action, app, tool, progress)
    return await consul_change(backend, action, app, tool, progress)


def describe(out: PilotOutcome) -> str:
    if not out.pilots.tools:
        return f"app {out.app}: no pilots (Standby group {out.standby or '-'})"
    state = "in force" if out.in_force else f"not in force: {out.standby or 'no group'} is Standby"
    lines = [f"app {out.app}: {len(out.pilots.tools)} pilot(s) on {out.pilots.group} ({state})"]
    lines += [f"  {t}" for t in out.pilots.tools]
    return "\n".join(lines)
