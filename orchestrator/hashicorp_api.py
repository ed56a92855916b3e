"""Thin async clients for the parts of the Consul and Nomad HTTP APIs the orchestrator uses.

Plain aiohttp rather than python-consul2 / python-nomad: those are synchronous (requests) and
would need a thread per call inside the async backend; they also hide what the release logic
depends on — the exact status codes (Nomad's HTTP 500 for a stale EnforceIndex, Consul's 404 for
a missing key), the `true`/`false` body of a CAS write and the X-Consul-Index header.
Every failure becomes `ApiError` with a one-line message naming the agent and the call.
"""

from __future__ import annotations

import base64
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import orjson

from .backend import Refused

if TYPE_CHECKING:
    from zerodown_proxy.config import ConsulSection


class ApiError(Refused):
    """An agent could not be reached or answered with an error; str() is one line."""

    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def normalize_addr(addr: str, default_scheme: str = "http") -> str:
    addr = addr.strip().rstrip("/")
    return addr if "://" in addr else f"{default_scheme}://{addr}"


def _ssl(cacert: str) -> ssl.SSLContext | None:
    if not cacert:
        return None
    try:
        return ssl.create_default_context(cafile=cacert)
    except (OSError, ssl.SSLError) as exc:
        raise Refused(f"cannot load CA certificate {cacert}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None

    def text(self) -> str:
        return self.body.decode(errors="replace").strip()


class _Agent:
    kind = "agent"
    token_header = ""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        addr: str,
        token: str = "",
        cacert: str = "",
        timeout: float = 10.0,
    ) -> None:
        self.session = session
        self.addr = normalize_addr(addr)
        self.token = token
        self.ssl = _ssl(cacert)
        self.timeout = timeout

    async def call(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        body: Any = None,
        ok: tuple[int, ...] = (200,),
        timeout: float | None = None,
    ) -> Reply:
        headers = {self.token_header: self.token} if self.token else {}
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else orjson.dumps(body)
        where = f"{self.kind} at {self.addr}"
        try:
            async with self.session.request(
                method,
                self.addr + path,
                params=params,
                data=data,
                headers=headers,
                ssl=self.ssl if self.ssl is not None else True,
                timeout=aiohttp.ClientTimeout(total=timeout or self.timeout),
            ) as r:
                reply = Reply(r.status, dict(r.headers), await r.read())
        except aiohttp.ClientConnectorError as exc:
            err = exc.os_error
            # asyncio puts "Connect call failed (...)" in strerror; the errno says it better
            why = (os.strerror(err.errno) if err.errno else err.strerror) if err else ""
            raise ApiError(f"{where} is unreachable ({(why or str(exc)).lower()})") from None
        except TimeoutError:
            raise ApiError(f"{where} did not answer {method} {path} in time") from None
        except aiohttp.ClientError as exc:
            raise ApiError(f"{where}: {method} {path} failed: {exc}") from None
        if reply.status not in ok:
            text = reply.text().splitlines()[0][:300] if reply.text() else ""
            if reply.status == 403:
                hint = f" (check {'NOMAD_TOKEN' if self.kind == 'Nomad' else 'CONSUL_HTTP_TOKEN'})"
            else:
                hint = ""
            raise ApiError(
                f"{where} answered {reply.status} to {method} {path}: {text}{hint}",
                reply.status,
                reply.text(),
            )
        return reply

    async def json(self, method: str, path: str, **kw: Any) -> Any:
        reply = await self.call(method, path, **kw)
        try:
            return reply.json()
        except orjson.JSONDecodeError:
            raise ApiError(
                f"{self.kind} at {self.addr} answered {method} {path} with something that is "
                f"not JSON: {reply.text()[:80]!r}"
            ) from None


class ConsulApi(_Agent):
    kind = "Consul"
    token_header = "X-Consul-Token"

    def __init__(self, *args: Any, datacenter: str = "", **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.datacenter = datacenter

    async def call(
        self, method: str, path: str, params: dict[str, str] | None = None, **kw: Any
    ) -> Reply:
        # Every call names the datacenter the proxies follow ([consul] datacenter), except the
        # agent's own endpoints, which take none.
        if self.datacenter and not path.startswith("/v1/agent/"):
            params = {**(params or {}), "dc": self.datacenter}
        return await super().call(method, path, params, **kw)

    async def health(self, service: str, tag: str | None = None) -> list[dict[str, Any]]:
        params = {"tag": tag} if tag else None
        out = await self.json("GET", f"/v1/health/service/{quote(service)}", params=params)
        if not isinstance(out, list):
            raise ApiError(f"Consul at {self.addr}: /v1/health/service/{service} is not a list")
        return out

    async def kv_get(self, key: str) -> tuple[bytes, int] | None:
        """(value, ModifyIndex) or None when the key does not exist."""
        reply = await self.call("GET", f"/v1/kv/{quote(key)}", ok=(200, 404))
        if reply.status == 404:
            return None
        try:
            entry = orjson.loads(reply.body)[0]
            value = base64.b64decode(entry.get("Value") or b"")
            return value, int(entry["ModifyIndex"])
        except (orjson.JSONDecodeError, LookupError, TypeError, ValueError):
            raise ApiError(
                f"Consul at {self.addr}: unexpected answer for key {key}: {reply.text()[:80]!r}"
            ) from None

    async def kv_put(self, key: str, value: str | bytes, cas: int | None = None) -> bool:
        """Write a key; with `cas`, only if its ModifyIndex is still `cas` (0: only if absent).
        Returns Consul's answer (False: the CAS did not match)."""
        params = {"cas": str(cas)} if cas is not None else None
        data = value.encode() if isinstance(value, str) else value
        reply = await self.call("PUT", f"/v1/kv/{quote(key)}", params=params, body=data)
        answer = reply.text()
        if answer not in ("true", "false"):
            raise ApiError(f"Consul at {self.addr}: PUT {key} answered {answer[:80]!r}")
        return answer == "true"

    async def kv_list(self, prefix: str) -> list[dict[str, Any]]:
        reply = await self.call(
            "GET", f"/v1/kv/{quote(prefix)}", params={"recurse": "true"}, ok=(200, 404)
        )
        return [] if reply.status == 404 else reply.json()


class NomadApi(_Agent):
    kind = "Nomad"
    token_header = "X-Nomad-Token"

    async def job(self, job_id: str) -> dict[str, Any]:
        reply = await self.call("GET", f"/v1/job/{quote(job_id)}", ok=(200, 404))
        if reply.status == 404:
            raise ApiError(f"Nomad at {self.addr} has no job {job_id!r} (use --job)", 404)
        return reply.json()

    async def plan(self, job: dict[str, Any]) -> dict[str, Any]:
        return await self.json(
            "POST", f"/v1/job/{quote(job['ID'])}/plan", body={"Job": job, "Diff": True}
        )

    async def register(self, job: dict[str, Any], enforce_index: int) -> dict[str, Any]:
        return await self.json(
            "POST",
            "/v1/jobs",
            body={"Job": job, "EnforceIndex": True, "JobModifyIndex": enforce_index},
        )

    async def deployment(
        self, job_id: str, index: int = 0, wait: float = 0.0
    ) -> tuple[dict[str, Any] | None, int]:
        """The latest deployment of a job (blocking query when `index` is given)."""
        params = {"index": str(index), "wait": f"{int(wait * 1000)}ms"} if index else None
        reply = await self.call(
            "GET",
            f"/v1/job/{quote(job_id)}/deployment",
            params=params,
            timeout=wait + self.timeout,
        )
        return reply.json(), int(reply.headers.get("X-Nomad-Index", "0") or 0)

    async def deployments(self, job_id: str) -> list[dict[str, Any]]:
        return await self.json("GET", f"/v1/job/{quote(job_id)}/deployments")

    async def allocations(self, job_id: str) -> list[dict[str, Any]]:
        return await self.json("GET", f"/v1/job/{quote(job_id)}/allocations")


def consul_section(
    config: str | None = None, env: Mapping[str, str] | None = None
) -> ConsulSection:
    """The Consul settings the proxies use: the [consul] section of a proxy config file (when
    given) with the same environment overrides the proxy applies (CONSUL_HTTP_ADDR,
    CONSUL_HTTP_TOKEN, CONSUL_CACERT, ZERODOWN_CONSUL_DATACENTER, ZERODOWN_CONSUL_KEY_PREFIX).
    One loader for both sides, so a release writes the key the proxies watch."""
    from zerodown_proxy.config import ConfigError, check_consul, load_config

    try:
        section = load_config(config, env=dict(os.environ if env is None else env)).consul
        check_consul(section)
    except ConfigError as exc:
        raise Refused(f"{exc}" + (f" (in {config})" if config else "")) from None
    return section


def env_settings(env: os._Environ[str] | dict[str, str] | None = None) -> dict[str, str]:
    """The standard HashiCorp environment variables, with their documented defaults."""
    env = os.environ if env is None else env
    consul_scheme = "https" if env.get("CONSUL_HTTP_SSL", "").lower() in ("1", "true") else "http"
    return {
        "nomad_addr": normalize_addr(env.get("NOMAD_ADDR") or "http://127.0.0.1:4646"),
        "nomad_token": env.get("NOMAD_TOKEN", ""),
        "nomad_cacert": env.get("NOMAD_CACERT", ""),
        "consul_addr": normalize_addr(
            env.get("CONSUL_HTTP_ADDR") or "127.0.0.1:8500", consul_scheme
        ),
        "consul_token": env.get("CONSUL_HTTP_TOKEN", ""),
        "consul_cacert": env.get("CONSUL_CACERT", ""),
    }
