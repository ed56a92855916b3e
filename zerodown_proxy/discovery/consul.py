"""Consul discovery provider: follows Consul with blocking queries and offers one routing
snapshot (HTTP and HSMS together) to the router; registers the proxy as `zerodown-proxy`.

Per app in `[consul] apps` three watches run (see consul_client.Watch): the health of `<app>`
and `<app>-hsms` (every instance with its checks) and the KV key `<prefix>/<app>/active`.
Whenever one of them answers with a new index, the latest answers of all watches are turned
into a `RegistryState` (consul_state) and offered in the same event-loop turn. A view that
changes an app's Active group is first confirmed by one parallel, non-blocking re-read of the
key and both services (`recheck_on_switch`, see `rebuild`), so a switch is applied one agent
round trip after Consul answers the KV query, and never on health one answer old.

Failures never touch routing: while Consul is unreachable, hangs, denies the token or answers
garbage, the last good snapshot keeps serving; /v1/status (`discovery`) and /metrics show the
age of the last contact and the errors by kind, and the watches recover by themselves. An app
whose Active group has no passing instance is not applied: its previous Active group and
generation are kept (with the instances' current health), with a log line, the reason in
status `apps.<app>.problem` and `zerodown_consul_refused_total`.

Multi-worker mode: every worker follows Consul itself; only worker 0 registers (the supervisor
starts the others with --no-register) and it advertises the supervisor's admin address, whose
/v1/status reports the lowest generation of all workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

from ..config import ConsulSection
from ..metrics import Registry
from ..routing import Router
from .consul_client import Answer, ConsulClient, ConsulError, Watch, quote_path
from .consul_register import SelfRegistration
from .consul_state import (
    AppResult,
    AppView,
    ConsulDataError,
    KvValue,
    ServiceEntry,
    build_app,
    build_state,
    parse_health,
    parse_kv,
)

log = logging.getLogger("zerodown.discovery.consul")


class ConsulProvider:
    def __init__(
        self,
        cfg: ConsulSection,
        router: Router,
        metrics: Registry,
        admin_addr: str,
        proxy_name: str,
    ) -> None:
        self.cfg = cfg
        self.router = router
        self.proxy_name = proxy_name
        self.client = ConsulClient(
            cfg.addr, cfg.token, cfg.datacenter, cfg.cacert, cfg.connect_timeout
        )
        self.watches: list[Watch] = []
        # watch name -> latest parsed value: health entries with their index, or a KvValue
        self._health: dict[str, tuple[tuple[ServiceEntry, ...], int]] = {}
        self._kv: dict[str, KvValue] = {}
        self._confirming: set[str] = set()  # apps whose Active change is being re-read
        self._good: dict[str, AppResult] = {}  # last applicable result per app
        self._problems: dict[str, str] = {}  # app -> why its latest view is not applied
        self._results: dict[str, AppResult] = {}
        self.refused = 0
        self.offers = 0
        self.last_error: str | None = None
        self.last_error_at = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._confirms: set[asyncio.Task[None]] = set()
        for app in cfg.apps:
            for svc in (app, f"{app}-hsms"):
                self._watch(f"health:{svc}", f"/v1/health/service/{quote_path(svc)}")
            self._watch(f"kv:{app}", f"/v1/kv/{quote_path(self._key(app))}")
        self.registration = (
            SelfRegistration(
                self.client,
                admin_addr,
                proxy_name,
                cfg.check_ttl,
                cfg.deregister_after,
                self._routing_note,
            )
            if cfg.register_self
            else None
        )
        self._errors = metrics.counter(
            "zerodown_consul_errors_total",
            "Failed Consul calls by kind (unreachable, timeout, tls, acl_denied, http_error, garbage)",
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

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(w.run(), name=w.name) for w in self.watches]
        if self.registration is not None:
            self._tasks.append(loop.create_task(self.registration.run(), name="consul-register"))
        log.info(
            "following Consul at %s (apps %s, datacenter %s)",
            self.cfg.addr,
            ",".join(self.cfg.apps),
            self.cfg.datacenter or "default",
        )

    def set_listen_ports(self, ports: dict[str, int]) -> None:
        if self.registration is not None:
            self.registration.set_ports(ports)

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._confirms]
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
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
            else:
                self._health[name] = (parse_health(answer.body), answer.index)
        except ConsulDataError as exc:
            raise ConsulError("garbage", f"{watch.name}: {exc}") from None
        if watch.stats.consecutive_errors:
            log.info(
                "Consul watch %s recovered after %d errors",
                watch.name,
                watch.stats.consecutive_errors,
            )
        self.rebuild(t0=t0)

    @staticmethod
    def _parse_kv(answer: Answer, path: str) -> KvValue:
        if answer.status == 404:
            return KvValue(None, answer.index)
        return parse_kv(answer.body, path.removeprefix("/v1/kv/"))

    def rebuild(self, confirmed: str | None = None, t0: float | None = None) -> bool:
        """Build the routing state from the latest answers and offer it. Returns True when the
        router applied it.

        A view that would change an app's Active group is not applied straight away: the
        watches answer independently, so it may combine a fresh KV value with health that is
        one answer old (the target group went critical or was deregistered just before the
        switch), or fresh health with a KV value one answer old. `_confirm` re-reads the key
        and both services once (one parallel round trip to the agent) and then applies the
        switch only if it still holds. Meanwhile the app keeps its current routing."""
        t0 = time.perf_counter() if t0 is None else t0
        for app in self.cfg.apps:
            if app in self._confirming:
                continue
            view = self._view(app)
            if view is None:
                continue
            result = build_app(view)
            prev = self._good.get(app)
            if (
                self.cfg.recheck_on_switch
                and app != confirmed
                and result.problem is None
                and prev is not None
                and prev.state.active_group != result.state.active_group
            ):
                self._start_confirm(app, t0)
                continue
            self._results[app] = result
            if result.problem is None:
                self._good[app] = result
                if app in self._problems:
                    log.info("app %s is routable again (%s)", app, result.generation_source)
                self._problems.pop(app, None)
                continue
            if prev is not None:
                self._good[app] = keep_active(prev, result)
            if self._problems.get(app) != result.problem:
                log.error(
                    "Consul view of %s not applied, keeping the previous routing: %s",
                    app,
                    result.problem,
                )
                self.refused += 1
                self._refused_metric.inc((app,))
            self._problems[app] = result.problem
        good = [self._good[a] for a in self.cfg.apps if a in self._good]
        if not good:
            return False
        state = build_state(good, source=f"consul:{self.cfg.addr}")
        self.offers += 1
        applied = self.router.offer(state)
        if not applied:
            self.refused += 1
        kind = "switch" if confirmed is not None else "update"
        self._apply_time.observe(time.perf_counter() - t0, (kind,))
        return applied

    def _start_confirm(self, app: str, t0: float) -> None:
        self._confirming.add(app)
        task = asyncio.get_running_loop().create_task(self._confirm(app, t0))
        self._confirms.add(task)
        task.add_done_callback(self._confirms.discard)

    async def _confirm(self, app: str, t0: float) -> None:
        """Re-read the Active key and the app's two services (non-blocking, in parallel), keep
        whatever is newer than the watches' answers, and rebuild with the switch allowed. A
        failed read falls back to the last known answer (logged)."""
        key = f"/v1/kv/{quote_path(self._key(app))}"
        paths = {
            "kv": key,
            app: f"/v1/health/service/{quote_path(app)}",
            f"{app}-hsms": f"/v1/health/service/{quote_path(app + '-hsms')}",
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
                except (ConsulError, ConsulDataError) as exc:
                    log.warning(
                        "switch of %s: re-read of %s failed (%s); using the last known answer",
                        app,
                        name,
                        exc,
                    )
        finally:
            self._confirming.discard(app)
        self.rebuild(confirmed=app, t0=t0)

    def _key(self, app: str) -> str:
        return f"{self.cfg.key_prefix.strip('/')}/{app}/active"

    def _on_error(self, watch: Watch, exc: ConsulError) -> None:
        self._errors.inc((exc.kind,))
        self.last_error, self.last_error_at = f"{exc.kind}: {exc}", time.time()
        st = watch.stats
        # One line when a failure starts or changes; then every 10th, not every retry.
        if st.consecutive_errors == 1 or st.consecutive_errors % 10 == 0:
            log.error(
                "Consul watch %s failed (%s, %d in a row), routing stays on generation %s: %s",
                watch.name,
                exc.kind,
                st.consecutive_errors,
                self.router.snapshot.generation,
                exc,
            )

    def _view(self, app: str) -> AppView | None:
        http = self._health.get(app)
        hsms = self._health.get(f"{app}-hsms")
        kv = self._kv.get(app)
        if http is None or hsms is None or kv is None:
            return None  # not every watch of this app has answered yet
        return AppView(app, http[0], hsms[0], kv, http[1], hsms[1])

    def _routing_note(self) -> tuple[bool, str]:
        gen = self.router.snapshot.generation
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
            }
        return {
            "provider": "consul",
            "addr": self.cfg.addr,
            "datacenter": self.cfg.datacenter or None,
            "healthy": self.healthy(),
            "last_contact_age_s": self.last_contact_age() if self.last_contact() else None,
            "errors": sum(by_kind.values()),
            "errors_by_kind": by_kind,
            "last_error": self.last_error,
            "last_error_age_s": round(time.time() - self.last_error_at, 3)
            if self.last_error
            else None,
            "refused": self.refused,
            "apps": apps,
            "watches": {
                w.name: {
                    "index": w.stats.index,
                    "requests": w.stats.requests,
                    "errors": w.stats.errors,
                    "consecutive_errors": w.stats.consecutive_errors,
                    "last_error": w.stats.last_error,
                    "last_error_kind": w.stats.last_error_kind,
                    "index_resets": w.stats.index_resets,
                    "last_ok_age_s": round(time.time() - w.stats.last_ok, 3)
                    if w.stats.last_ok
                    else None,
                }
                for w in self.watches
            },
            "registration": self.registration.status() if self.registration else None,
        }


def keep_active(prev: AppResult, current: AppResult) -> AppResult:
    """The app's view cannot be applied (e.g. the new Active group has no passing instance):
    keep the previous Active group and generation, but with the instances' current health, so
    a refused switch does not also freeze stale health. Falls back to `prev` unchanged when the
    previous Active group has no passing instance now either."""
    group = prev.state.active_group
    instances = current.state.instances
    if not any(i.healthy for i in instances if i.group == group):
        return prev
    state = replace(current.state, active_group=group)
    return replace(prev, state=state, problem=None)
