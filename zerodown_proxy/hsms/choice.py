"""Which Active instance a tool's new backend session goes to.

Round robin over the instances `placement.place` gives the tool (its app's Active group, or the
Standby group for a pilot),
skipping instances that failed within T5 (E37's minimum between connect attempts to an entity)
and instances the proxy's own health checks say are down (`instance_down`, injected by whoever
runs the checks; the default says none is). Sessions already open are not moved by this: a hung
session is found by the liveness checks of links.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..config import HsmsSection
from ..routing import Instance, Snapshot
from .placement import place

log = logging.getLogger("zerodown.hsms")

NO_BACKEND_RETRY = 0.5  # re-check for a routable HSMS instance (a snapshot swap also triggers it)


@dataclass(frozen=True, slots=True)
class Pick:
    instance: Instance
    device_id: int | None  # session id for messages to it (None: the tool's own)
    pilot: bool = False  # on the Standby group because the tool is a pilot


@dataclass(frozen=True, slots=True)
class Wait:
    """No instance can take a session now; ask again after `seconds`."""

    seconds: float
    reason: str


def never_down(_instance: Instance) -> bool:
    return False


class BackendChoice:
    def __init__(
        self, cfg: HsmsSection, instance_down: Callable[[Instance], bool] = never_down
    ) -> None:
        self.t5 = cfg.t5
        self.device_id = cfg.device_id
        self.instance_down = instance_down
        self.failed_until: dict[tuple[str, int | None], float] = {}
        self._rr = 0

    def pick(
        self,
        snap: Snapshot,
        now: float,
        app_name: str | None = None,
        address: str = "",
        device_id: int | None = None,
    ) -> Pick | Wait:
        """An instance for a tool of `app_name` (None: the proxy's own listener's app)
        connected from `address`, whose data messages carry `device_id`."""
        placed = place(snap, app_name, address, device_id)
        app, insts = placed.app, placed.instances
        if app is None or not insts:
            where = f" of app {app_name}" if app_name else ""
            return Wait(NO_BACKEND_RETRY, f"no Active instance{where} with an HSMS port")
        failed = self.failed_until
        ok = [i for i in insts if failed.get((i.address, i.hsms_port), 0) <= now]
        if not ok:
            soonest = min(failed[(i.address, i.hsms_port)] for i in insts)
            return Wait(max(soonest - now, 0.01), "every Active instance failed within T5")
        up = [i for i in ok if not self._down(i)]
        if not up:
            return Wait(NO_BACKEND_RETRY, "every Active instance is down (health checks)")
        self._rr += 1
        device = app.hsms_device_id if app.hsms_device_id is not None else self.device_id
        return Pick(up[self._rr % len(up)], device, placed.pilot)

    def failed(self, inst: Instance, now: float) -> None:
        """Do not open sessions to `inst` for T5."""
        failed = self.failed_until
        for key in [k for k, until in failed.items() if until <= now]:
            del failed[key]  # instances that left the registry do not pile up
        failed[(inst.address, inst.hsms_port)] = now + self.t5

    def succeeded(self, inst: Instance) -> None:
        self.failed_until.pop((inst.address, inst.hsms_port), None)

    def _down(self, inst: Instance) -> bool:
        try:
            return bool(self.instance_down(inst))
        except Exception:  # a checker bug must not stop HSMS routing: trust the registry
            log.exception("instance_down(%s) failed; treating the instance as up", inst.id)
            return False
