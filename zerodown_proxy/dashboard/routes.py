"""The dashboard's routes on an admin API (a proxy's, or the multi-worker supervisor's).

- `GET /` and `GET /dashboard/<asset>`: the page (static files shipped in the package).
- `GET /v1/dashboard/series`: per-second request rate, 5xx share and p50/p99 per version.
- `GET /v1/dashboard/history?app=A`: the release audit trail (`zerodown history`).
- `GET /v1/dashboard/proxies`: with the Consul provider, every registered proxy and the
  generation it has applied (proxies.py).
- `POST /v1/dashboard/switch|rollback` (JSON `{"app": A}`): the admin token in the
  Authorization header, same-origin only, run as `zerodown switch|rollback` (release.py).
The page itself polls `/v1/status` for everything else; reading needs no token.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from .release import HistoryUnavailable, ReleaseDesk
from .series import series

ASSETS = {
    "charts.js": "text/javascript",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_NO_STORE = {"Cache-Control": "no-store"}

RawSamples = Callable[[int], Awaitable[dict[str, Any]]]
Proxies = Callable[[], Awaitable[dict[str, Any] | None]]


def authorized(request: web.Request, token: str) -> bool:
    """`Authorization: Bearer <admin token>`, compared in constant time (as /v1/reload does)."""
    supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    given = supplied.encode("utf-8", "surrogateescape")
    return bool(token) and hmac.compare_digest(given, token.encode())


def same_origin(request: web.Request) -> str | None:
    """None when the request comes from a page of this very listener; else why not. Browsers
    send Origin with every POST; a cross-site one (CSRF, DNS rebinding to another name) names
    another host than the one asked for."""
    origin = request.headers.get("Origin")
    if not origin:
        return "no Origin header: actions are accepted from the dashboard page only"
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or parts.netloc.lower() != request.host.lower():
        return f"cross-origin request from {origin} refused"
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site != "same-origin":
        return f"cross-site request refused (Sec-Fetch-Site: {site})"
    return None


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json",
        headers=_NO_STORE,
    )  # fmt: skip


def _int_query(request: web.Request, name: str) -> int | None:
    try:
        return int(request.query.get(name, "0"))
    except ValueError:
        return None


def _asset(name: str) -> bytes:
    return (resources.files(__package__) / "static" / name).read_bytes()


class Dashboard:
    def __init__(
        self,
        token: Callable[[], str],
        desk: ReleaseDesk,
        raw_samples: RawSamples,
        proxies: Proxies,
    ) -> None:
        self.token = token
        self.desk = desk
        self.raw_samples = raw_samples  # since -> the raw ring (a worker's, or merged)
        self.proxies = proxies  # the proxies registered in Consul (None: file provider)

    def register(self, app: web.Application) -> None:
        app.router.add_get("/", self.page)
        app.router.add_get("/dashboard/{name}", self.asset)
        app.router.add_get("/v1/dashboard/samples", self.samples)
        app.router.add_get("/v1/dashboard/series", self.series)
        app.router.add_get("/v1/dashboard/history", self.history)
        app.router.add_get("/v1/dashboard/proxies", self.known_proxies)
        app.router.add_post("/v1/dashboard/{action:switch|rollback}", self.act)

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(
            body=_asset("index.html"),
            content_type="text/html",
            charset="utf-8",
            headers={
                "Content-Security-Policy": _CSP,
                "X-Frame-Options": "DENY",  # no clickjacking of the switch button
                "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-cache",
            },
        )

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        kind = ASSETS.get(name)
        if kind is None:
            raise web.HTTPNotFound(text=f"no dashboard asset {name}")
        return web.Response(
            body=_asset(name), content_type=kind, headers={"Cache-Control": "no-cache"}
        )

    async def samples(self, request: web.Request) -> web.Response:
        """The raw ring (counts and histogram bucket deltas per second), for merging."""
        if (since := _int_query(request, "since")) is None:
            return _json({"error": "since must be a unix time in seconds"}, 400)
        return _json(await self.raw_samples(since))

    async def series(self, request: web.Request) -> web.Response:
        if (since := _int_query(request, "since")) is None:
            return _json({"error": "since must be a unix time in seconds"}, 400)
        return _json(series(await self.raw_samples(since)))

    async def known_proxies(self, request: web.Request) -> web.Response:
        """{"proxies": [...]} with the Consul provider; {"proxies": null} with the file one
        (the page shows this proxy and its workers from /v1/status)."""
        found = await self.proxies()
        return _json(found if found is not None else {"proxies": None})

    async def history(self, request: web.Request) -> web.Response:
        app = request.query.get("app", "")
        if not app:
            return _json({"error": "history needs ?app=<app name>"}, 400)
        # The page passes the generation it sees: a new one (a switch) reads the trail afresh.
        generation = _int_query(request, "generation") or 0
        try:
            records = await self.desk.history(app, generation)
        except HistoryUnavailable as exc:
            return _json({"error": f"release history unavailable: {exc}"}, 503)
        return _json({"app": app, "records": records})

    async def act(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if (why := same_origin(request)) is not None:
            return _json({"error": why}, 403)
        if not authorized(request, self.token()):
            return _json({"error": f"{action} needs the admin token (Authorization: Bearer)"}, 401)
        if request.content_type != "application/json":
            return _json({"error": "send the action as application/json"}, 415)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _json({"error": "the request body is not JSON"}, 400)
        app = body.get("app") if isinstance(body, dict) else None
        if not isinstance(app, str) or not app:
            return _json({"error": 'the request needs {"app": "<app name>"}'}, 400)
        to = body.get("to")
        if to is not None and not isinstance(to, str):
            return _json({"error": '"to" must be a group name'}, 400)
        peer = request.remote or "?"
        outcome = await self.desk.act(action, app, to, via=f"dashboard (client {peer})")
        if outcome.ok:
            return _json({"ok": True, "message": outcome.message})
        return _json({"ok": False, "error": outcome.message}, 409)
