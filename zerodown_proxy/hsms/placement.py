"""Where a tool's backend session belongs: which app serves it (the listener it came in on) and
which group of that app (Active, or Standby while the tool is a pilot).

One function, `place`, used both when a session is opened (choice.py) and when a snapshot swap
or a newly learnt device id may move a tool (handover.py), so the two can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..routing import AppRoute, Instance, Snapshot


@dataclass(frozen=True, slots=True)
class Placement:
    app: AppRoute | None
    instances: tuple[Instance, ...]  # the group's instances with an HSMS port
    pilot: bool  # on the Standby group because the tool is a pilot


def place(snap: Snapshot, app_name: str | None, address: str, device_id: int | None) -> Placement:
    """The group a tool (connected from `address`, sending `device_id`) is served by. A pilot
    whose Standby group has no HSMS instance stays on Active (served, not parked)."""
    app = snap.hsms_app(app_name)
    if app is None:
        return Placement(None, (), False)
    pilots = app.pilots
    if pilots is not None and pilots.hsms(address, device_id):
        standby = tuple(i for i in app.standby if i.hsms_port)
        if standby:
            return Placement(app, standby, True)
    return Placement(app, tuple(i for i in app.active if i.hsms_port), False)
