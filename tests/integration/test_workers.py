"""Multi-worker mode: SO_REUSEPORT workers, one routing follower each, supervisor admin."""

from __future__ import annotations

import os
import signal

import aiohttp

from zerodown_proxy.workers import merge_metrics

from ..helpers import instance, registry, wait_until, write_registry


async def test_two_workers_share_the_port_and_switch_together(
    tmp_path, backend_factory, start_proxy
):
    blue = await backend_factory("v1", "blue-0")
    green = await backend_factory("v2", "green-0")
    insts = [instance("blue-0", "blue", "v1", blue), instance("green-0", "green", "v2", green)]
    reg = tmp_path / "registry.json"
    write_registry(reg, registry(1, "blue", insts))
    proxy = start_proxy(reg, "workers = 2")
    st = proxy.status()
    assert len(st["workers"]) == 2 and st["generation"] == 1
    url = f"http://127.0.0.1:{proxy.http}/"
    async with aiohttp.ClientSession() as s:
        for _ in range(40):  # new connections each time: both workers get some
            async with s.get(url, headers={"Connection": "close"}) as r:
                assert r.headers["X-Backend-Version"] == "v1"
        write_registry(reg, registry(2, "green", insts))
        st = proxy.wait_generation(2)  # the lowest generation over both workers
        assert all(w["generation"] == 2 for w in st["workers"])
        for _ in range(20):
            async with s.get(url, headers={"Connection": "close"}) as r:
                assert r.headers["X-Backend-Version"] == "v2"
        async with s.get(f"http://127.0.0.1:{proxy.admin}/metrics") as r:
            text = await r.text()
    served = [
        line for line in text.splitlines() if line.startswith("zerodown_http_requests_total{")
    ]
    assert {line.split('"')[1] for line in served} == {"0", "1"}, served

    # A worker that dies is restarted and catches up with the registry.
    victim = st["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: (
            (w := proxy.status())["worker_restarts"] == 1
            and all(x["generation"] == 2 for x in w["workers"])
        ),
        20,
        "the killed worker to be replaced",
    )
    assert proxy.terminate() == 0


def test_merge_metrics_keeps_families_contiguous():
    a = '# HELP x_total X\n# TYPE x_total counter\nx_total{code="200"} 1\n# HELP g G\n# TYPE g gauge\ng 3\n'
    b = '# HELP x_total X\n# TYPE x_total counter\nx_total{code="200"} 2\n# HELP g G\n# TYPE g gauge\ng 4\n'
    lines = merge_metrics([a, b]).splitlines()
    assert lines == [
        "# HELP x_total X",
        "# TYPE x_total counter",
        'x_total{worker="0",code="200"} 1',
        'x_total{worker="1",code="200"} 2',
        "# HELP g G",
        "# TYPE g gauge",
        'g{worker="0"} 3',
        'g{worker="1"} 4',
    ]
