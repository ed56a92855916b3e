"""Consul HTTP client for the proxy: one aiohttp session, blocking queries, error classification.

aiohttp rather than python-consul2: the proxy already runs on asyncio/uvloop with aiohttp, and
the watch loop needs things that library does not expose — a per-request client timeout longer
than `wait` (the watchdog), the raw X-Consul-Index of 404 answers, plain-text error bodies, and
classification of failures (unreachable, timeout, ACL denied, garbage) for status and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

log = logging.getLogger("zerodown.discovery.consul")

BURST = 5  # requests a watch may make back to back before the rate limit applies
# "internal": the answer could not be used because of a bug on our side (a traceback is logged);
# the watch goes on, like for any other failed call.
ERROR_KINDS = (
    "unreachable", "timeout", "tls", "acl_denied", "http_error", "garbage", "internal",
)  # fmt: skip


class ConsulError(Exception):
    """A failed Consul call; `kind` is one of ERROR_KINDS."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Answer:
    status: int  # 200, or 404 for a missing KV key
    index: int  # X-Consul-Index
    body: Any  # decoded JSON (None for a 404)


def make_ssl(addr: str, cacert: str) -> ssl.SSLContext | None:
    """A TLS context trusting CONSUL_CACERT when given; None for plain http."""
    if cacert:
        try:
            return ssl.create_default_context(cafile=cacert)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"[consul] cacert {cacert!r} cannot be used: {exc}") from None
    if addr.startswith("https://"):
        return ssl.create_default_context()
    return None


class ConsulClient:
    def __init__(
        self,
        addr: str,
        token: str = "",
        datacenter: str = "",
        cacert: str = "",
        connect_timeout: float = 2.0,
    ) -> None:
        self.addr = addr.rstrip("/")
        self.datacenter = datacenter
        self.connect_timeout = connect_timeout
        self._headers = {"X-Consul-Token": token} if token else {}
        self._ssl = make_ssl(self.addr, cacert)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # keepalive: the re-read on a switch reuses an idle connection instead of a new one.
            connector = aiohttp.TCPConnector(
                ssl=self._ssl if self._ssl is not None else False, keepalive_timeout=120
            )
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _params(self, path: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        p = dict(extra or {})
        # Agent endpoints are the local agent's own (they take no dc); every other call names
        # the datacenter, so a proxy can follow a datacenter other than its agent's.
        if self.datacenter and not path.startswith("/v1/agent/"):
            p["dc"] = self.datacenter
        return p

    async def get(
        self, path: str, index: int = 0, wait: float = 0.0, timeout: float = 10.0
    ) -> Answer:
        """GET a JSON resource; a blocking query when index > 0. A 404 is an answer (missing
        KV key), not an error. `timeout` bounds the whole call (the watchdog)."""
        params = {}
        if index > 0:
            params = {"index": str(index), "wait": f"{max(int(wait * 1000), 1)}ms"}
        url = self.addr + path
        t = aiohttp.ClientTimeout(total=timeout, sock_connect=self.connect_timeout)
        try:
            async with self.session().get(url, params=self._params(path, params), timeout=t) as r:
                data = await r.read()
                return self._answer(r.status, r.headers, data, path)
        except TimeoutError:
            raise ConsulError("timeout", f"no answer from Consul within {timeout:.1f}s") from None
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            raise ConsulError(
                "tls", f"TLS with Consul at {self.addr} failed (check cacert): {exc}"
            ) from None
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise ConsulError("unreachable", f"Consul at {self.addr} unreachable: {exc}") from None
        except aiohttp.ClientError as exc:
            raise ConsulError("garbage", f"bad HTTP answer from Consul: {exc}") from None

    def _answer(self, status: int, headers: Any, data: bytes, path: str) -> Answer:
        if status == 403:
            text = data.decode(errors="replace").strip()[:200]
            raise ConsulError("acl_denied", f"Consul denied {path}: 403 {text} (check the token)")
        if status not in (200, 404):
            text = data.decode(errors="replace").strip()[:200]
            raise ConsulError("http_error", f"Consul answered {status} to {path}: {text}")
        raw_index = headers.get("X-Consul-Index")
        try:
            index = int(raw_index)
            if index < 0:
                raise ValueError
        except (TypeError, ValueError):
            raise ConsulError(
                "garbage", f"Consul answer to {path} has no valid X-Consul-Index ({raw_index!r})"
            ) from None
        if status == 404:
            return Answer(404, index, None)
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ConsulError("garbage", f"Consul answer to {path} is not JSON") from None
        return Answer(200, index, body)

    async def put(self, path: str, body: Any = None, timeout: float = 5.0) -> bytes:
        """PUT (agent endpoints). Returns the body; raises ConsulError with the reason."""
        t = aiohttp.ClientTimeout(total=timeout, sock_connect=self.connect_timeout)
        data = orjson.dumps(body) if body is not None else None
        try:
            async with self.session().put(
                self.addr + path, data=data, params=self._params(path), timeout=t
            ) as r:
                text = await r.read()
                if r.status == 403:
                    raise ConsulError("acl_denied", f"Consul denied {path}: 403 {text[:200]!r}")
                if r.status == 404:
                    raise ConsulError("not_found", text.decode(errors="replace").strip()[:200])
                if r.status != 200:
                    msg = text.decode(errors="replace").strip()[:200]
                    raise ConsulError("http_error", f"Consul answered {r.status} to {path}: {msg}")
                return text
        except TimeoutError:
            raise ConsulError("timeout", f"no answer from Consul within {timeout:.1f}s") from None
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            raise ConsulError(
                "tls", f"TLS with Consul at {self.addr} failed (check cacert): {exc}"
            ) from None
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise ConsulError("unreachable", f"Consul at {self.addr} unreachable: {exc}") from None


def quote_path(s: str) -> str:
    return quote(s, safe="/")


@dataclass(slots=True)
class WatchStats:
    index: int = 0
    requests: int = 0
    errors: int = 0
    consecutive_errors: int = 0
    last_ok: float = 0.0  # time.time() of the last successful answer
    last_error: str | None = None
    last_error_kind: str | None = None
    index_resets: int = 0


# Called with every answer whose index changed (and after every resynchronising call); it may
# raise ConsulError("garbage", ...) when the body has the wrong shape.
OnAnswer = Callable[["Watch", Answer], None]
OnError = Callable[["Watch", ConsulError], None]


class Watch:
    """One blocking query loop on one resource.

    Index handling as Consul documents it: the first call (and the first after an error, to
    resynchronise even when blocking queries hang) is non-blocking; then each call blocks on the
    last X-Consul-Index. An index that goes backwards (agent restarted, snapshot restored) is
    reset and re-read; an index of 0 is never blocked on. Requests of one watch start at least
    `min_interval` apart on average (a token bucket with a burst of BURST, so a few quick changes
    in a row are followed at once, without making the health view lag behind the KV view, but a
    server that answers instantly cannot make a hot loop). The client
    timeout is `wait` plus Consul's own jitter (wait/16) plus `watchdog`; errors back off
    exponentially (with jitter) up to `backoff_max`.
    """

    def __init__(
        self,
        name: str,
        path: str,
        client: ConsulClient,
        on_answer: OnAnswer,
        on_error: OnError,
        wait: float,
        watchdog: float,
        min_interval: float,
        backoff_min: float,
        backoff_max: float,
    ) -> None:
        self.name = name
        self.path = path
        self.client = client
        self.on_answer = on_answer
        self.on_error = on_error
        self.wait = wait
        self.watchdog = watchdog
        self.min_interval = min_interval
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.stats = WatchStats()
        self._blocking_ok = False  # block only after a successful answer
        self._tokens = float(BURST)
        self._refilled = time.monotonic()
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def _take_token(self) -> float:
        """Token bucket: returns how long to wait before the next request may start."""
        if self.min_interval <= 0:
            return 0.0
        now = time.monotonic()
        elapsed = max(0.0, now - self._refilled)
        self._tokens = min(BURST, self._tokens + elapsed / self.min_interval)
        self._refilled = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        wait = (1 - self._tokens) * self.min_interval
        self._tokens = 0.0
        self._refilled = now + wait
        return wait

    def backoff(self, n: int) -> float:
        """Delay before retry number n (1-based): exponential, capped, with 20% jitter."""
        base = min(self.backoff_max, self.backoff_min * (2 ** min(n - 1, 30)))
        return base * random.uniform(0.8, 1.0)

    async def run(self) -> None:
        while True:
            delay = self._take_token()
            if delay > 0:
                await self._sleep(delay)
            index = self.stats.index if self._blocking_ok and self.stats.index > 0 else 0
            # Jitter the wait a little so many proxies do not wake in lockstep.
            wait = self.wait * random.uniform(0.9, 1.0)
            self.stats.requests += 1
            try:
                answer = await self.client.get(
                    self.path, index, wait, timeout=wait * 17 / 16 + self.watchdog
                )
                # Parsing happens in on_answer; a body it cannot use counts as a garbage answer.
                if answer.index != self.stats.index or not self._blocking_ok:
                    self._deliver(answer)
            except ConsulError as exc:
                st = self.stats
                st.errors += 1
                st.consecutive_errors += 1
                st.last_error, st.last_error_kind = str(exc), exc.kind
                self._blocking_ok = False
                self.on_error(self, exc)
                await self._sleep(self.backoff(st.consecutive_errors))
                continue
            self._accept(answer)

    def _deliver(self, answer: Answer) -> None:
        try:
            self.on_answer(self, answer)
        except ConsulError:
            raise
        except Exception as exc:  # never let a bug end the watch: count it, back off, go on
            log.exception("Consul watch %s: the answer could not be used", self.name)
            raise ConsulError(
                "internal", f"{self.name}: the answer could not be used ({exc!r})"
            ) from None

    def _accept(self, answer: Answer) -> None:
        st = self.stats
        previous = st.index
        st.consecutive_errors = 0
        st.last_ok = time.time()
        st.index = max(answer.index, 1)  # never block on 0
        # An index that went backwards is reset: the next call is non-blocking (Consul docs).
        self._blocking_ok = answer.index >= previous
        if not self._blocking_ok:
            st.index_resets += 1
