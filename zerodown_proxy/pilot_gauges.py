"""`zerodown_pilots{app}`: how many pilots each app has in force, from every applied snapshot
(pilots: contract/pilots.py; the HSMS sessions they move: zerodown_hsms_pilot_*)."""

from __future__ import annotations

from .metrics import Registry
from .routing import Router, Snapshot


def register(router: Router, metrics: Registry) -> None:
    gauge = metrics.gauge(
        "zerodown_pilots", "Pilots in force per app (tools and HTTP rules on Standby)", ("app",)
    )

    def update(old: Snapshot, new: Snapshot) -> None:
        for name in old.apps.keys() - new.apps.keys():
            gauge.values.pop((name,), None)
        for name, app in new.apps.items():
            gauge.set(len(app.pilots.tools) if app.pilots else 0, (name,))

    router.subscribe(update)
