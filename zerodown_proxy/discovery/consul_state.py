"""Pure translation of the Consul provider's latest answers into one app's `AppState` (no I/O,
unit-testable). The data model itself (names, parsing, the instance join) is the contract's:
zerodown_proxy/contract/consul.py.

Inputs are the bodies of `GET /v1/health/service/<app>` and `<app>-hsms` (every instance with
all its checks) and of `GET /v1/kv/<prefix>/<app>/active`. Rules:

- The Active group is the KV value; the app's generation is its ModifyIndex. Without the key,
  the old stack's tags decide (contract.consul.active_from_tags). The generation is then the
  highest X-Consul-Index among the app's answers (the KV 404 carries the tombstone index): raft
  indexes only grow, so the generation never goes backwards when the key is deleted, and the
  ModifyIndex of a key created later is larger than all of them.
- Whether the Active group can be routed (has a healthy instance) is not decided here but by
  the watcher (routing.active_problem), for every provider alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import orjson

from ..contract.consul import (
    KvValue,
    ServiceEntry,
    active_from_tags,
    device_id,
    hsms_listen,
    join_instances,
)
from ..contract.model import AppState, ContractError, check_name
from ..contract.pilots import NO_PILOTS, PilotList, parse_pilot_list


@dataclass(frozen=True, slots=True)
class AppView:
    """The latest answers for one app, as the watches saw them."""

    name: str
    http: tuple[ServiceEntry, ...]
    hsms: tuple[ServiceEntry, ...]
    active: KvValue  # value None: the key is absent (modify_index: the 404's X-Consul-Index)
    http_index: int
    hsms_index: int
    pilots: KvValue | None = None  # `<prefix>/<app>/pilots` (None or value None: no pilots)


@dataclass(frozen=True, slots=True)
class AppResult:
    """What `build_app` made of one app, and what it could not use (for status and logs)."""

    state: AppState
    generation_source: str  # "kv" | "tags"
    unmatched_hsms: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    invalid: Mapping[str, str] = field(default_factory=dict)  # service id -> why not used

    @property
    def generation(self) -> int:
        assert self.state.generation is not None
        return self.state.generation


def build_app(view: AppView) -> AppResult:
    """One app's `AppState` (with its own generation) from the latest answers."""
    joined = join_instances(view.name, view.http, view.hsms)
    problem = None
    active: str | None
    if view.active.value is not None:
        source = "kv"
        generation = view.active.modify_index
        active = view.active.value or None
        if active is None:
            problem = f"app {view.name}: the Active key is empty"
        else:
            try:
                check_name(active, f"app {view.name}", "the Active key's value")
            except ContractError as exc:
                active, problem = None, str(exc)
    else:
        source = "tags"
        # An empty answer (e.g. no <app>-hsms service) carries the index of the whole catalog,
        # which moves with every other service: it would make the generation churn.
        generation = max(
            view.active.modify_index,
            view.http_index if view.http else 0,
            view.hsms_index if view.hsms else 0,
        )
        active, problem = active_from_tags(view.name, joined.instances, joined.entries)
    invalid = dict(joined.invalid)
    pilots = _pilots(view, invalid)
    if view.pilots is not None and view.pilots.value is not None:
        # A pilot change is applied (and waited for) like a switch: it moves the generation.
        generation = max(generation, view.pilots.modify_index)
    state = AppState(
        name=view.name,
        active_group=active,
        instances=joined.instances,
        hsms_device_id=device_id(view.hsms),
        generation=generation,
        problem=problem,
        hsms_listen=hsms_listen(view.hsms),
        pilot_group=pilots.group,
        pilots=pilots.tools,
    )
    return AppResult(state, source, joined.unmatched_hsms, joined.ignored, invalid)


def _pilots(view: AppView, invalid: dict[str, str]) -> PilotList:
    """The app's pilots; a value that breaks the format means no pilots (listed in `invalid`
    under the key's name): routing goes on, everyone on Active."""
    kv = view.pilots
    if kv is None or not kv.value:
        return NO_PILOTS
    try:
        return parse_pilot_list(orjson.loads(kv.value), f"app {view.name} pilots key")
    except orjson.JSONDecodeError as exc:
        invalid["pilots"] = f"app {view.name}: the pilots key is not JSON ({exc})"
    except ContractError as exc:
        invalid["pilots"] = str(exc)
    return NO_PILOTS
