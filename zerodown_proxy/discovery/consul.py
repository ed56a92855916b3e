"""Consul discovery provider: follows Consul with blocking queries and emits one whole routing
state (HTTP and HSMS together) to the watcher; registers the proxy as `zerodown-proxy`.

Per app in `[consul] apps` four watches run (see consul_client.Watch), all with `dc=` when a
datacenter is configured: the health of `<app>` and `<app>-hsms` (every instance with its
checks) and the KV keys `<key_prefix>/<app>/active` and `.../pilots` (names:
contract/consul.py). Whenever one of
them answers with a new index, the latest answers of all watches are turned into a
`RegistryState` (consul_state) and emitted in the same event-loop turn. A view that changes an
app's Active group is first confirmed by one parallel, non-blocking re-read of the key and both
services (`recheck_on_switch`, see `rebuild`), so a switch is applied one agent round trip after
Consul answers the KV query, and never on health one answer old.

Failures never touch routing: while Consul is unreachable, hangs, denies the token or answers
garbage, the last good snapshot keeps serving; /v1/status (`discovery`) and /metrics show the
age of the last contact and the errors by kind, and the watches recover by themselves. Whether
an app's view can be applied (its Active group has a passing instance) is the watcher's call;
a refused view is reported here too (`apps.<app>.problem`, `zerodown_consul_refused_total`).
Services whose tags or Meta break the data model's rules are left out and listed
(`apps.<app>.invalid`).

Multi-worker mode: every worker follows Consul itself; only worker 0 registers (the supervisor
starts the others with --no-register) and it advertises the supervisor's admin address, whose
/v1/status reports the lowest generation of all workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..config import ConsulSection
from ..contract.consul import (
    ConsulDataError,
    Keys,
    KvValue,
    ServiceEntry,
    hsms_service,
    http_service,
    parse_health,
    parse_kv,
)
from ..contract.model import AppState, RegistryState
from ..metrics import Registry
from .consul_client import Answer, ConsulClient, ConsulError, Watch, quote_path
from .consul_register import SelfRegistration
from .consul_state import AppResult, AppView, build_app
from .file import Sink

log = logging.getLogger("zerodown.discovery.consul")


class ConsulProvider:
    name = "consul"

    def __init__(
        self,
        cfg: ConsulSection,
        sink: Sink,
        metrics: Registry,
        admin_addr: str,
        proxy_name: str,
    ) -> None:
        self.cfg = cfg
        self.sink = sink
        self.keys = Keys(cfg.key_prefix)
        self.proxy_name = proxy_name
        self.client = ConsulClient(
            cfg.addr, cfg.token, cfg.datacenter, cfg.cacert, cfg.connect_timeout
        )
        self.watches: list[Watch] = []
        # watch name -> latest parsed value: health entries with their index, or a KvValue
        self._health: dict[str, tuple[tuple[ServiceEntry, ...], int]] = {}
        self._kv: dict[str, KvValue] = {}
        self._pilots: dict[str, KvValue] = {}  # app -> its pilots key
        self._confirming: set[str] = set()  # apps whose Active change is being re-read
        self._sent: dict[str, AppState] = {}  # the last view emitted per app
        self._accepted: dict[str, str] = {}  # app -> Active group of its last applied view
        self._problems: dict[str, str] = {}  # app -> why its latest view is not applied
        self._results: dict[str, AppResult] = {}
        self._invalid: dict[str, tuple[str, ...]] = {}
        self.refused = 0
        self.offers = 0
        self.last_error: str | None = None
        self.last_error_at = 0.0
        self._confirms: set[asyncio.Task[None]] = set()
        for app in cfg.apps:
            for svc in (http_service(app), hsms_service(app)):
                self._watch(f"health:{svc}", f"/v1/health/service/{quote_path(svc)}")
            self._watch(f"kv:{app}", f"/v1/kv/{quote_path(self.keys.active(app))}")
            self._watch(f"pilots:{app}", f"/v1/kv/{quote_path(self.keys.pilots(app))}")
        self.registration = (
            SelfRegistration(self.client, admin_addr, proxy_name, cfg.check_ttl,
                             cfg.deregister_after, self._routing_note)
            if cfg.register_self
            else None
        )  # fmt: skip
        self._errors = metrics.counter(
            "zerodown_consul_errors_total",
            "Failed Consul calls by kind (unreachable, timeout, tls, acl_denied, http_error, "
            "garbage, internal)",
            ("kind",),
        )
        self._refused_metric = metrics.counter(
            "zerodown_consul_refused_total",
            "Consul views not applied (for example an Active group with no passing instance)",
            ("app",),
        )
        self._apply_time = metrics.histogram(
            "zerodown_consul_apply_seconds",
            "From a Consul answer with a new index to the routing offer being done "
            "(kind=switch: the Active group changed and health was re-read first)",
            ("kind",),
        )
        metrics.gauge(
            "zerodown_consul_last_contact_age_seconds",
            "Seconds since Consul last answered any watch (-1: never)",
            fn=lambda: self.last_contact_age() if self.last_contact() else -1,
        )
        metrics.gauge(
            "zerodown_consul_healthy",
            "1 when every Consul watch's last call succeeded",
            fn=lambda: 1 if self.healthy() else 0,
        )
        metrics.gauge(
            "zerodown_consul_registered",
            "1 while this proxy is registered in Consul as zerodown-proxy",
            fn=lambda: 1 if self.registration is not None and self.registration.registered else 0,
        )

    def _watch(self, name: str, path: str) -> None:
        c = self.cfg
        self.watches.append(
            Watch(name, path, self.client, self._on_answer, self._on_error, c.wait, c.watchdog,
                  c.min_request_interval, c.backoff_min, c.backoff_max)
        )  # fmt: skip

    # -- Provider (run by the watcher) ----------------------------------------------------------

    def prime(self) -> None:
        log.info("following Consul at %s (apps %s, datacenter %s, key prefix %s)", self.cfg.addr,
                 ",".join(self.cfg.apps), self.cfg.datacenter or "default", self.keys.prefix)  # fmt: skip

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for w in self.watches:
                tg.create_task(w.run(), name=w.name)
            if self.registration is not None:
                tg.create_task(self.registration.run(), name="consul-register")

    def confirmed_at(self) -> float:
        """The view is as fresh as its stalest watch (each blocking query answers at least
        every `wait`, so a healthy watch confirms that often)."""
        oks = [w.stats.last_ok for w in self.watches]
        return min(oks) if oks and all(oks) else 0.0

    def set_listen_ports(self, ports: dict[str, int]) -> None:
        if self.registration is not None:
            self.registration.set_ports(ports)

    async def close(self) -> None:
        confirms = list(self._confirms)
        for t in confirms:
            t.cancel()
        await asyncio.gather(*confirms, return_exceptions=True)
        if self.registration is not None:
            await self.registration.deregister()
        await self.client.close()

    # -- answers --------------------------------------------------------------------------------

    def _on_answer(self, watch: Watch, answer: Answer) -> None:
        t0 = time.perf_counter()
        kind, _, name = watch.name.partition(":")
        try:
            if kind == "kv":
                self._kv[name] = self._parse_kv(answer, watch.path)
            elif kind == "pilots":
                self._pilots[name] = self._parse_kv(answer, watch.path)
            else:
                self._health[name] = (parse_health(answer.body), answer.index)
        except ConsulDataError as exc:
            raise ConsulError("garbage", f"{watch.name}: {exc}") from None
        if watch.stats.consecutive_errors:
            log.info("Consul watch %s recovered after %d errors", watch.name,
                     watch.stats.consecutive_errors)  # fmt: skip
        self.rebuild(t0=t0)

    @staticmethod
    def _parse_kv(answer: Answer, path: str) -> KvValue:
        if answer.status == 404:
            return KvValue(None, answer.index)
        return parse_kv(answer.body, path.removeprefix("/v1/kv/"))

    def rebuild(self, confirmed: str | None = None, t0: float | None = None) -> bool:
        """Build the routing state from the latest answers and emit it. Returns True when the
        watcher applied it as described.

        A view that would change an app's Active group is not emitted straight away: the
        watches answer independently, so it may combine a fresh KV value with health that is
        one answer old (the target group went critical or was deregistered just before the
        switch), or fresh health with a KV value one answer old. `_confirm` re-reads the key
        and both services once (one parallel round trip to the agent) and then emits the
        switch only if it still holds. Meanwhile the app's last emitted view stands."""
        t0 = time.perf_counter() if t0 is None else t0
        views: list[AppState] = []
        for app in self.cfg.apps:
            view = None if app in self._confirming else self._view(app)
            if view is None:
                if app in self._sent:
                    views.append(self._sent[app])
                continue
            result = build_app(view)
            self._results[app] = result
            new = result.state.active_group
            old = self._accepted.get(app)
            if (self.cfg.recheck_on_switch and app != confirmed and new is not None
                    and old is not None and old != new):  # fmt: skip
                self._start_confirm(app, t0)
                if app in self._sent:
                    views.append(self._sent[app])
                continue
            self._sent[app] = result.state
            views.append(result.state)
        if not views:
            return False
        state = RegistryState(
            generation=max(v.generation or 0 for v in views),
            apps=tuple(views),
            source=f"consul:{self.cfg.addr}",
        )
        self.offers += 1
        verdict = self.sink.submit(state)
        self._record(views, verdict.problems)
        for app, result in self._results.items():
            self._report_invalid(app, result)
        kind = "switch" if confirmed is not None else "update"
        self._apply_time.observe(time.perf_counter() - t0, (kind,))
        return bool(verdict.applied)

    def _record(self, views: list[AppState], problems: Any) -> None:
        for v in views:
            problem = problems.get(v.name)
            if problem is None:
                if v.active_group is not None:
                    self._accepted[v.name] = v.active_group
                self._problems.pop(v.name, None)
                continue
            if self._problems.get(v.name) != problem:
                self.refused += 1
                self._refused_metric.inc((v.name,))
            self._problems[v.name] = problem

    def _report_invalid(self, app: str, result: AppResult) -> None:
        invalid = tuple(sorted(result.invalid.values()))
        if invalid and invalid != self._invalid.get(app):
            message = f"app {app}: {len(invalid)} Consul service(s) left out: {'; '.join(invalid)}"
            log.error("%s", message)
            self.sink.failed("invalid", message)
        self._invalid[app] = invalid

    def _start_confirm(self, app: str, t0: float) -> None:
        self._confirming.add(app)
        task = asyncio.get_running_loop().create_task(self._confirm(app, t0))
        self._confirms.add(task)
        task.add_done_callback(self._confirms.discard)

    async def _confirm(self, app: str, t0: float) -> None:
        """Re-read the Active key and the app's two services (non-blocking, in parallel), keep
        whatever is newer than the watches' answers, and rebuild with the switch allowed. A
        failed read falls back to the last known answer (logged)."""
        key = f"/v1/kv/{quote_path(self.keys.active(app))}"
        paths = {
            "kv": key,
            http_service(app): f"/v1/health/service/{quote_path(http_service(app))}",
            hsms_service(app): f"/v1/health/service/{quote_path(hsms_service(app))}",
        }
        timeout = self.cfg.connect_timeout + 1.0
        try:
            answers = await asyncio.gather(
                *(self.client.get(p, timeout=timeout) for p in paths.values()),
                return_exceptions=True,
            )
            for name, a in zip(paths, answers, strict=True):
                try:
                    if isinstance(a, BaseException):
                        raise a
                    if name == "kv":
                        # Newer unless the watch delivered a later answer meanwhile.
                        if a.index >= self._kv[app].modify_index:
                            self._kv[app] = self._parse_kv(a, key)
                    else:
                        entries = parse_health(a.body)
                        cached = self._health.get(name)
                        if cached is None or a.index >= cached[1]:
                            self._health[name] = (entries, a.index)
                except Exception as exc:  # ConsulError, garbage, or worse: use what we have
                    log.warning("switch of %s: re-read of %s failed (%s); using the last known "
                                "answer", app, name, exc)  # fmt: skip
        finally:
            self._confirming.discard(app)
        self.rebuild(confirmed=app, t0=t0)

    def _on_error(self, watch: Watch, exc: ConsulError) -> None:
        self._errors.inc((exc.kind,))
        self.last_error, self.last_error_at = f"{exc.kind}: {exc}", time.time()
        self.sink.failed(f"consul_{exc.kind}", f"Consul watch {watch.name}: {exc}")
        st = watch.stats
        # One line when a failure starts or changes; then every 10th, not every retry.
        if st.consecutive_errors == 1 or st.consecutive_errors % 10 == 0:
            log.error(
                "Consul watch %s failed (%s, %d in a row), routing stays on generation %s: %s",
                watch.name, exc.kind, st.consecutive_errors, self.sink.generation, exc,
            )  # fmt: skip

    def _view(self, app: str) -> AppView | None:
        http = self._health.get(http_service(app))
        hsms = self._health.get(hsms_service(app))
        kv = self._kv.get(app)
        pilots = self._pilots.get(app)
        if http is None or hsms is None or kv is None or pilots is None:
            return None  # not every watch of this app has answered yet
        return AppView(app, http[0], hsms[0], kv, http[1], hsms[1], pilots)

    def _routing_note(self) -> tuple[bool, str]:
        gen = self.sink.generation
        if not gen:
            return False, "no routing applied yet"
        return True, f"generation {gen}"

    # -- status ---------------------------------------------------------------------------------

    def last_contact(self) -> float:
        return max((w.stats.last_ok for w in self.watches), default=0.0)

    def last_contact_age(self) -> float:
        last = self.last_contact()
        return round(time.time() - last, 3) if last else -1.0

    def healthy(self) -> bool:
        return all(w.stats.last_ok and not w.stats.consecutive_errors for w in self.watches)

    def status(self) -> dict[str, Any]:
        by_kind = {labels[0]: int(v) for labels, v in self._errors.values.items()}
        apps = {}
        for app in self.cfg.apps:
            r = self._results.get(app)
            apps[app] = {
                "generation_source": r.generation_source if r else None,
                "generation": r.generation if r else None,
                "active_group": r.state.active_group if r else None,
                "problem": self._problems.get(app),
                "unmatched_hsms": list(r.unmatched_hsms) if r else [],
                "ignored": list(r.ignored) if r else [],
                "invalid": dict(r.invalid) if r else {},
            }
        now = time.time()
        return {
            "provider": "consul",
            "addr": self.cfg.addr,
            "datacenter": self.cfg.datacenter or None,
            "key_prefix": self.keys.prefix,
            "healthy": self.healthy(),
            "last_contact_age_s": self.last_contact_age() if self.last_contact() else None,
            "errors": sum(by_kind.values()),
            "errors_by_kind": by_kind,
            "last_error": self.last_error,
            "last_error_age_s": round(now - self.last_error_at, 3) if self.last_error else None,
            "refused": self.refused,
            "apps": apps,
            "watches": {w.name: _watch_status(w, now) for w in self.watches},
            "registration": self.registration.status() if self.registration else None,
        }


def _watch_status(w: Watch, now: float) -> dict[str, Any]:
    st = w.stats
    return {
        "index": st.index,
        "requests": st.requests,
        "errors": st.errors,
        "consecutive_errors": st.consecutive_errors,
        "last_error": st.last_error,
        "last_error_kind": st.last_error_kind,
        "index_resets": st.index_resets,
        "last_ok_age_s": round(now - st.last_ok, 3) if st.last_ok else None,
    }
