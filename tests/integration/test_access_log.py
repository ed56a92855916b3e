"""The HTTP access log: nginx's combined fields plus upstream, version, request id and
durations; JSON or combined lines; a file reopened on SIGUSR1 (logrotate); a line per switch."""

from __future__ import annotations

import base64
import os
import re
import signal
import time
from pathlib import Path

import orjson
import pytest

from ..helpers import instance, registry, wait_until, write_registry
from ..rawhttp import request


def lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [orjson.loads(x) for x in path.read_bytes().splitlines() if x]


async def test_json_lines_carry_combined_fields_upstream_and_durations_and_reopen_on_sigusr1(
    tmp_path, backend_factory, start_proxy
):
    blue = await backend_factory("v1", "blue-0")
    green = await backend_factory("v2", "green-0")
    insts = [instance("blue-0", "blue", "v1", blue), instance("green-0", "green", "v2", green)]
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", insts))
    log_path = tmp_path / "access.log"
    proxy = start_proxy(reg, f'access_log = "{log_path}"')
    proxy.wait_generation(1)
    auth = base64.b64encode(b"alice:secret")
    r = await request(
        proxy.http,
        b"GET /info?lot=A17&step=3 HTTP/1.1\r\nHost: x\r\nUser-Agent: mes-client/2\r\n"
        b"Referer: http://mes/\r\nAuthorization: Basic "
        + auth
        + b"\r\nX-Request-Id: rid-7\r\n\r\n",
    )
    assert r.status == 200
    entry = wait_until(lambda: lines(log_path), 10, "an access line")[0]
    assert entry["event"] == "access" and entry["id"] == "rid-7"
    assert entry["method"] == "GET" and entry["uri"] == "/info?lot=A17&step=3"
    assert entry["path"] == "/info" and entry["protocol"] == "HTTP/1.1"
    assert entry["remote_addr"] == "127.0.0.1" and entry["remote_user"] == "alice"
    assert entry["user_agent"] == "mes-client/2" and entry["referer"] == "http://mes/"
    assert entry["status"] == 200 and entry["body_bytes_sent"] == len(r.body)
    assert entry["app"] == "drimeap" and entry["instance"] == "blue-0"
    assert entry["version"] == "v1" and entry["upstream_addr"] == f"127.0.0.1:{blue}"
    assert 0 <= entry["ttfb_ms"] <= entry["total_ms"]

    # A switch is a line of its own, with from/to group and version.
    write_registry(reg, registry(2, "green", insts))
    proxy.wait_generation(2)
    switch = wait_until(
        lambda: [x for x in lines(log_path) if x["event"] == "switch"], 10, "a switch line"
    )
    assert switch[0]["from_group"] == "blue" and switch[0]["from_version"] == "v1"
    assert switch[0]["to_group"] == "green" and switch[0]["to_version"] == "v2"
    assert switch[0]["generation"] == 2
    # ... and in the process log (stderr), with the same fields.
    logged = wait_until(
        lambda: [
            x
            for x in (orjson.loads(t) for t in proxy.output(100_000).splitlines() if t[:1] == "{")
            if x.get("event") == "switch"
        ],
        10, "the switch in the process log",
    )  # fmt: skip
    assert logged[0]["msg"] == "switch: drimeap blue (v1) -> green (v2), generation 2"
    assert logged[0]["to_version"] == "v2" and logged[0]["from_group"] == "blue"

    # logrotate: move the file away, SIGUSR1, the next lines go to a new file at the path.
    rotated = tmp_path / "access.log.1"
    os.rename(log_path, rotated)
    os.kill(proxy.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 15
    while not lines(log_path):
        assert time.monotonic() < deadline, "no line in the reopened access log"
        r = await request(proxy.http, b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n")
        assert r.status == 200
        time.sleep(0.05)
    assert lines(log_path)[0]["version"] == "v2"
    before = len(lines(rotated))
    await request(proxy.http, b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: len(lines(log_path)) >= 2, 10, "the next line in the new file")
    assert len(lines(rotated)) == before  # the old file is released


COMBINED = re.compile(
    r'^(?P<addr>\S+) - (?P<user>\S+) \[(?P<time>[^\]]+)\] "(?P<request>[^"]*)" (?P<status>\d{3}) '
    r'(?P<bytes>\d+) "(?P<referer>[^"]*)" "(?P<ua>[^"]*)" (?P<extra>.*)$'
)


async def test_combined_format_on_stdout_and_proxy_answers_are_logged(
    tmp_path, backend_factory, start_proxy
):
    blue = await backend_factory("v1", "blue-0")
    reg = tmp_path / "registry.json"
    # A Standby preview request without the token: answered 403 by the proxy itself.
    write_registry(reg, registry(1, "blue", [instance("blue-0", "blue", "v1", blue)]))
    proxy = start_proxy(reg, 'access_log = "-"\naccess_log_format = "combined"')
    proxy.wait_generation(1)
    r = await request(
        proxy.http, b'GET /info?q=%22x%22 HTTP/1.0\r\nHost: x\r\nUser-Agent: a "quoted" ua\r\n\r\n'
    )
    assert r.status == 200
    r2 = await request(
        proxy.http, b"GET / HTTP/1.1\r\nHost: x\r\nX-Zerodown-Preview: standby\r\n\r\n"
    )
    assert r2.status == 403
    proxy.terminate()
    found = [m for line in proxy.output().splitlines() if (m := COMBINED.match(line))]
    assert len(found) == 2, proxy.output()
    ok, refused = found
    assert ok["request"] == "GET /info?q=%22x%22 HTTP/1.0" and ok["status"] == "200"
    assert ok["ua"] == r"a \x22quoted\x22 ua" and ok["referer"] == "-" and ok["user"] == "-"
    assert int(ok["bytes"]) == len(r.body)
    assert re.fullmatch(r"\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}", ok["time"])
    extra = dict(kv.split("=", 1) for kv in ok["extra"].split(" "))
    assert extra["upstream"] == "blue-0" and extra["version"] == "v1" and extra["app"] == "drimeap"
    assert float(extra["ttfb"]) <= float(extra["rt"])
    assert refused["status"] == "403" and int(refused["bytes"]) == len(r2.body)
    assert "upstream=- " in refused["extra"] + " "


def served_by_worker(proxy) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("zerodown_http_requests_total{"):
            worker = line.split('worker="', 1)[1].split('"', 1)[0]
            out[worker] = out.get(worker, 0) + float(line.rsplit(" ", 1)[1])
    return out


async def test_multi_worker_supervisor_passes_sigusr1_to_every_worker(
    tmp_path, backend_factory, start_proxy
):
    blue = await backend_factory("v1", "blue-0")
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("blue-0", "blue", "v1", blue)]))
    log_path = tmp_path / "access.log"
    proxy = start_proxy(reg, f'access_log = "{log_path}"\nworkers = 2')
    proxy.wait_generation(1)
    rotated = tmp_path / "access.log.1"
    os.rename(log_path, rotated)
    os.kill(proxy.pid, signal.SIGUSR1)
    # Done when a batch of requests on new connections, served by both workers, wrote every
    # line to the new file and none to the rotated one (a worker that did not reopen would).
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, "the workers did not all reopen the access log"
        old_lines, new_lines, before = (
            len(lines(rotated)),
            len(lines(log_path)),
            served_by_worker(proxy),
        )
        for _ in range(20):
            r = await request(
                proxy.http, b"GET /info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert r.status == 200
        after = served_by_worker(proxy)
        both = len(after) == 2 and all(after[w] > before.get(w, 0) for w in after)
        total = old_lines + new_lines + 20
        wait_until(lambda t=total: len(lines(rotated)) + len(lines(log_path)) >= t, 10, "lines")
        if both and len(lines(rotated)) == old_lines:
            break
        time.sleep(0.1)
    assert len(lines(log_path)) >= 20


async def test_body_bytes_of_chunked_and_head_responses(tmp_path, backend_factory, start_proxy):
    from aiohttp import web

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"X-Backend-Version": "v1"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b"a" * 1000, b"b" * 3000, b"c" * 17):
            await resp.write(part)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/stream", stream)
    port = await backend_factory("v1", "blue-0", app)
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("blue-0", "blue", "v1", port)]))
    log_path = tmp_path / "access.log"
    proxy = start_proxy(reg, f'access_log = "{log_path}"')
    proxy.wait_generation(1)
    r = await request(proxy.http, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 200 and len(r.body) == 4017
    h = await request(proxy.http, b"HEAD /stream HTTP/1.1\r\nHost: x\r\n\r\n", head_only=True)
    assert h.status == 200
    got = wait_until(lambda: len(x := lines(log_path)) == 2 and x, 10, "two access lines")
    assert [(x["method"], x["body_bytes_sent"]) for x in got] == [("GET", 4017), ("HEAD", 0)]


async def test_unparseable_input_is_logged_too(tmp_path, backend_factory, start_proxy):
    blue = await backend_factory("v1", "blue-0")
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("blue-0", "blue", "v1", blue)]))
    log_path = tmp_path / "access.log"
    proxy = start_proxy(reg, f'access_log = "{log_path}"')
    proxy.wait_generation(1)
    r = await request(proxy.http, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert r.status == 400
    bad = wait_until(lambda: lines(log_path), 10, "an access line for the 400")[0]
    assert bad["status"] == 400 and bad["remote_addr"] == "127.0.0.1"
    assert bad["body_bytes_sent"] == len(r.body) and bad["instance"] is None


async def test_sigusr1_without_an_access_log_does_not_stop_the_proxy(
    tmp_path, backend_factory, start_proxy
):
    blue = await backend_factory("v1", "blue-0")
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("blue-0", "blue", "v1", blue)]))
    proxy = start_proxy(reg)
    proxy.wait_generation(1)
    os.kill(proxy.pid, signal.SIGUSR1)
    r = await request(proxy.http, b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 200 and proxy.proc.poll() is None


def test_an_access_log_that_cannot_be_opened_stops_the_start_saying_why(tmp_path, start_proxy):
    from ..helpers import ChildFailed

    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("blue-0", "blue", "v1", 9)]))
    with pytest.raises(ChildFailed, match=r"exited early \(1\).*cannot open the access log"):
        start_proxy(reg, f'access_log = "{tmp_path}"')  # a directory


async def test_sighup_turns_the_access_log_on_without_a_restart(
    tmp_path, backend_factory, start_proxy
):
    blue = await backend_factory("v1", "blue-0")
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", [instance("blue-0", "blue", "v1", blue)]))
    proxy = start_proxy(reg, "access_log = false")
    proxy.wait_generation(1)
    cfg = tmp_path / "proxy.toml"  # the file ProxyProc wrote
    log_path = tmp_path / "access.log"
    cfg.write_text(cfg.read_text().replace("access_log = false", f'access_log = "{log_path}"'))
    os.kill(proxy.pid, signal.SIGHUP)
    deadline = time.monotonic() + 15
    while not lines(log_path):
        assert time.monotonic() < deadline, f"no access line after SIGHUP: {proxy.output()}"
        r = await request(proxy.http, b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n")
        assert r.status == 200
        time.sleep(0.05)
    assert lines(log_path)[0]["version"] == "v1" and lines(log_path)[0]["ttfb_ms"] is not None
