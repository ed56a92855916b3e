"""`zerodown sample-app`: the sample drimEAP backend (HTTP, and HSMS when --hsms-port is given).

HTTP: `GET /` answers JSON {service, version, instance} with header X-Backend-Version; `GET
/health`; `POST /echo` streams the body back; `GET /sleep?s=N` answers after N seconds (to hold a
request in flight across a switch); `POST /fault?status=500&delay=0.2` makes `GET /` and `GET
/info` answer that status and/or that much later from then on (`POST /fault` with neither: back
to normal; /health is never affected, so health checks still pass: a release that is bad only
for real traffic, as `switch --verify` must catch). With --hsms-port, an HSMS host (sample_hsms.py) also runs, and
`GET /hsms/received` / `POST /hsms/command?rcmd=X&timeout=S` expose what it received and let a test
make it send S2F41. Exits cleanly on SIGTERM: stops accepting, Separates HSMS sessions, finishes
requests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from .sample_hsms import HsmsHost


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", required=True, help="version this instance reports (e.g. v1)")
    p.add_argument("--http-port", type=int, required=True, help="HTTP port (0 = any free port)")
    p.add_argument("--hsms-port", type=int, default=None, help="HSMS port (passive, host side)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--instance-id", default=None, help="instance id reported in answers")
    p.add_argument("--device-id", type=int, default=0, help="HSMS session (device) id")
    p.add_argument("--ready-file", default=None, help="write bound ports as JSON here when ready")


def make_app(version: str, instance: str, hsms: HsmsHost | None = None) -> web.Application:
    headers = {"X-Backend-Version": version, "X-Backend-Instance": instance}
    body = orjson.dumps({"service": "drimeap", "version": version, "instance": instance})
    fault = {"status": 0, "delay": 0.0}

    async def faulty() -> web.Response | None:
        if fault["delay"]:
            await asyncio.sleep(fault["delay"])
        if fault["status"]:
            return web.Response(status=fault["status"], text="injected fault\n", headers=headers)
        return None

    async def index(request: web.Request) -> web.Response:
        if fault["status"] or fault["delay"]:
            if (bad := await faulty()) is not None:
                return bad
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def set_fault(request: web.Request) -> web.Response:
        try:
            status = int(request.query.get("status", "0"))
            delay = float(request.query.get("delay", "0"))
        except ValueError:
            return _error(400, "status must be an HTTP status code, delay a number of seconds")
        if not (status == 0 or 200 <= status <= 599) or not 0 <= delay <= 60:
            return _error(400, "give status=200..599 (0: off) and delay=0..60 seconds")
        fault.update(status=status, delay=delay)
        return web.json_response(fault)

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok\n", headers=headers)

    async def echo(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers=headers)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        async for chunk in request.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def sleep(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "1")))
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def info(request: web.Request) -> web.Response:
        if fault["status"] or fault["delay"]:
            if (bad := await faulty()) is not None:
                return bad
        return web.json_response(
            {"version": version, "instance": instance, "headers": dict(request.headers)},
            headers=headers,
        )

    app = web.Application(client_max_size=1024**4)
    app.router.add_get("/", index)
    app.router.add_get("/health", health)
    app.router.add_post("/echo", echo)
    app.router.add_get("/sleep", sleep)
    app.router.add_get("/info", info)
    app.router.add_post("/fault", set_fault)
    if hsms is not None:
        add_hsms_routes(app, hsms, instance)
    return app


def add_hsms_routes(app: web.Application, hsms: HsmsHost, instance: str) -> None:
    """GET /hsms/received and POST /hsms/command (host-initiated S2F41), per HSMS_PEERS.md."""
    from .hsms_secsgem import NotSelected, PeerError, TransactionTimeout

    async def received(request: web.Request) -> web.Response:
        dataids, total = hsms.received_dataids()  # a copy under the host's lock: quick
        body = {"version": hsms.version, "instance": instance, "s6f11": dataids, "total": total}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def command(request: web.Request) -> web.Response:
        rcmd = request.query.get("rcmd", "")
        try:
            timeout = float(request.query.get("timeout", "10"))
        except ValueError:
            timeout = -1.0
        if not rcmd or not 0 < timeout <= 600:
            return _error(400, "give rcmd=NAME and timeout=SECONDS (0 < timeout <= 600)")
        try:
            # secsgem blocks its caller until the reply: run it off the event loop
            result = await asyncio.to_thread(hsms.send_command, rcmd, timeout)
        except NotSelected as exc:
            return _error(409, str(exc))
        except TransactionTimeout as exc:
            return _error(504, str(exc))
        except PeerError as exc:
            return _error(502, str(exc))
        return web.json_response(result)

    app.router.add_get("/hsms/received", received)
    app.router.add_post("/hsms/command", command)


def _error(status: int, msg: str) -> web.Response:
    return web.json_response({"error": msg}, status=status)


async def serve(args: argparse.Namespace) -> int:
    instance = args.instance_id or f"drimeap-{socket.gethostname()}-{os.getpid()}"
    hsms = None
    if args.hsms_port is not None:
        from .sample_hsms import start_hsms_host

        # the host owns its listening socket, so port 0 is bound once, without a race
        hsms = start_hsms_host(
            args.hsms_port,
            args.version,
            device_id=args.device_id,
            instance_id=instance,
            host=args.host,
        )
    app = make_app(args.version, instance, hsms)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.http_port, reuse_address=True)
    await site.start()
    ports: dict[str, Any] = {
        "http": site._server.sockets[0].getsockname()[1],  # type: ignore[union-attr]
        "pid": os.getpid(),
    }
    if hsms is not None:
        ports["hsms"] = hsms.port
    if args.ready_file:
        tmp = Path(args.ready_file + ".tmp")
        tmp.write_bytes(orjson.dumps(ports))
        os.replace(tmp, args.ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if hsms is not None:
        await asyncio.to_thread(hsms.stop)
    await runner.cleanup()
    return 0


def run(args: argparse.Namespace) -> int:
    import uvloop

    return uvloop.run(serve(args))
