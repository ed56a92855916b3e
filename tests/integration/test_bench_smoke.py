"""The benchmark machinery on a tiny scale, against real processes on 127.0.0.1.

The load generator's own tests run everywhere (their backend is the sample app); the scenario
tests need nginx and wrk (`make sysdeps`) and are skipped cleanly without them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from benchmarks.closed_loop import parse_wrk, pin_cores, taskset
from benchmarks.instructions import callgrind_total
from benchmarks.loadgen import LoadRun, LoadSpec, RawLoad, run_load
from benchmarks.loadgen_worker import CONN_ERROR, OK
from benchmarks.nginx import BenchError
from benchmarks.readme import END, START, ReadmeError, update_readme
from benchmarks.stats import SwitchEvent, propagation, summarise, time_series
from benchmarks.targets import Backends, ZerodownProxy
from orchestrator.cli import main as zerodown

from ..helpers import wait_until

needs_nginx = pytest.mark.skipif(
    not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()) or not shutil.which("wrk"),
    reason="nginx and wrk are not installed (make sysdeps)",
)


def _spec(port: int, **kw) -> LoadSpec:
    return LoadSpec(**{"host": "127.0.0.1", "port": port, "preconnect": 4, **kw})


def test_generator_runs_every_scheduled_request_on_time(sample_app):
    app = sample_app("gen-1", "v7")
    raw = run_load(_spec(app.port, rate=200, seconds=2, timeout=5))
    s = summarise(raw)
    assert s.scheduled == 400
    assert (s.requests, s.successes, s.failures, s.dropped) == (400, 400, 0, 0)
    assert s.per_version == {"v7": 400}
    assert s.achieved_rate == pytest.approx(200)
    # Slots are spread evenly over the run: 200 a second, 5 ms apart.
    assert sorted(np.round(raw.sched * 200).astype(int).tolist()) == list(range(400))
    series = time_series(raw)
    assert sum(series["throughput"]) + series["late"] == 400  # late: completed after 2 s


def test_generator_counts_failures_when_the_backend_stops(sample_app):
    app = sample_app("gen-2", "v1")
    run = LoadRun(_spec(app.port, rate=200, seconds=2.5, timeout=2))
    # Stop the backend one second into the run (a deadline on the shared monotonic clock).
    wait_until(lambda: time.monotonic() >= run.t0 + 1.0, 10, "one second of load")
    app.kill()
    raw = run.wait()
    s = summarise(raw)
    assert s.successes > 50 and s.failures > 50, s
    assert s.failures == s.conn_errors  # refused/reset, not HTTP errors or timeouts
    assert s.requests + s.dropped == s.scheduled == 500
    ok_sched = raw.sched[raw.outcome == OK]
    bad_sched = raw.sched[raw.outcome == CONN_ERROR]
    assert ok_sched.max() < bad_sched.max()  # the failures come after the successes
    assert sum(time_series(raw)["failures"]) == s.failures


def test_generator_drops_iterations_at_the_in_flight_limit(sample_app):
    app = sample_app("gen-3", "v1")
    # Each request takes 200 ms and at most 2 may be in flight: about 10 a second can start,
    # the other ~90 a second are dropped iterations, and latency counts from the schedule.
    raw = run_load(_spec(app.port, rate=100, seconds=2, max_in_flight=2, path="/sleep?s=0.2"))
    s = summarise(raw)
    assert s.requests + s.dropped == 200
    assert 5 <= s.requests <= 30, s
    assert s.dropped >= 170
    assert s.failures == 0
    assert s.p50_ms >= 195
    assert sum(time_series(raw)["dropped"]) == s.dropped


def _raw(sched, latency, version, outcome=None, versions=("v1", "v2")) -> RawLoad:
    n = len(sched)
    return RawLoad(
        spec=LoadSpec("127.0.0.1", 1, rate=n / 10, seconds=10),
        t0=0.0,
        sched=np.array(sched, dtype=np.float64),
        latency=np.array(latency, dtype=np.float64),
        outcome=np.array(outcome or [OK] * n, dtype=np.int8),
        version=np.array(version, dtype=np.int16),
        versions=versions,
        dropped=np.zeros(0),
        lag=np.zeros(n),
        retries=0,
        connect_errors=0,
        processes=1,
    )


def test_propagation_times_first_new_and_last_old_response():
    # Switch v1 -> v2 at t=5.0: old answers until 5.03, new from 5.02; one old response to a
    # request that started after the first new one arrived is "mixed".
    raw = _raw(
        sched=[4.0, 4.99, 5.01, 5.015, 5.025, 6.0],
        latency=[0.001, 0.04, 0.01, 0.015, 0.001, 0.001],
        version=[0, 0, 1, 0, 0, 1],
    )
    (p,) = propagation(raw, [SwitchEvent(at=5.0, old="v1", new="v2", applied=5.005)])
    assert p.first_new_ms == pytest.approx(20, abs=0.01)
    assert p.last_old_ms == pytest.approx(30, abs=0.01)
    assert p.applied_ms == pytest.approx(5, abs=0.01)
    assert p.mixed == 1
    assert p.old_after_applied == 2  # the requests that started at 5.015 and 5.025
    s = summarise(raw)
    assert s.per_version == {"v1": 4, "v2": 2}
    assert s.max_ms == pytest.approx(40)


def test_wrk_output_is_parsed():
    out = """Running 2s test @ http://127.0.0.1:1/
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.50ms  300.00us   12.00ms   90.00%
    Req/Sec    10.00k     1.00k   12.00k    70.00%
  Latency Distribution
     50%    1.20ms
     75%    1.60ms
     90%    2.00ms
     99%    3.50ms
  40000 requests in 2.00s, 5.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  20000.00
Transfer/sec:      2.50MB
"""
    r = parse_wrk(out, 50, 2, 2)
    assert (r.requests, r.rps, r.errors, r.non_2xx) == (40000, 20000.0, 3, 4)
    assert (r.avg_ms, r.p50_ms, r.p99_ms, r.max_ms) == (1.5, 1.2, 3.5, 12.0)


def test_readme_section_is_replaced_and_the_rest_kept(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# top\n\n{START}\nold table\n{END}\n\n## after\n")
    update_readme(readme, "| a | b |\n|---|---|\n| 1 | 2 |\n", "zerodown bench all")
    text = readme.read_text()
    assert text.startswith("# top\n\n") and text.endswith(f"{END}\n\n## after\n")
    assert "old table" not in text and "| 1 | 2 |" in text and "`zerodown bench all`" in text
    assert "cores" in text
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(ReadmeError, match="markers"):
        update_readme(tmp_path / "plain.md", "x", "y")
    assert (tmp_path / "plain.md").read_text() == "no markers\n"


def test_datapath_scenario_measures_the_python_path(tmp_path, capsys):
    assert zerodown(["bench", "datapath", "--quick", "--results-dir", str(tmp_path)]) == 0
    d = orjson.loads((tmp_path / "results.json").read_bytes())["datapath"]
    assert 0 < d["us_per_request"] < 10000
    assert "HTTP data path" in capsys.readouterr().out


def test_bench_refuses_bad_options(capsys, tmp_path):
    assert zerodown(["bench", "steady", "--seconds", "301", "--results-dir", str(tmp_path)]) == 2
    assert "--seconds must be between 1 and 300" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        zerodown(["bench", "steady", "--proxies", "haproxy"])
    assert exc.value.code == 2
    assert "unknown proxy haproxy" in capsys.readouterr().err


@needs_nginx
def test_steady_and_closed_scenarios_end_to_end(tmp_path, capsys):
    out = tmp_path / "results"
    code = zerodown(
        ["bench", "steady", "--quick", "--seconds", "3", "--rates", "150"]
        + ["--switch-every", "1", "--proxies", "zerodown,nginx-reload"]
        + ["--results-dir", str(out), "--no-readme"]
    )
    assert code == 0, capsys.readouterr().err
    results = orjson.loads((out / "results.json").read_bytes())
    for name in ("zerodown", "nginx-reload"):
        r = results["steady"]["150"][name]
        s = r["summary"]
        assert s["requests"] + s["dropped"] == 450
        assert "v1" in s["per_version"]
        assert len(r["switches"]) == 2 and len(r["propagation"]) == 2
        assert len(r["series"]["p95_ms"]) == 3
    # zerodown: nothing fails, and both versions answer (requests after each applied switch go
    # to the new group). nginx's reload timing on a busy machine is not something to assert.
    zs = results["steady"]["150"]["zerodown"]["summary"]
    assert zs["failures"] == 0 and set(zs["per_version"]) == {"v1", "v2"}, zs
    zd = results["steady"]["150"]["zerodown"]["propagation"]
    assert all(p["first_new_ms"] is not None and p["applied_ms"] is not None for p in zd)
    assert all(p["old_after_applied"] == 0 for p in zd)
    assert (out / "steady-150-zerodown.png").stat().st_size > 1000
    assert "| zerodown |" in (out / "summary.md").read_text()
    assert "nginx variant / zerodown" in capsys.readouterr().out

    out2 = tmp_path / "closed"
    code = zerodown(
        ["bench", "closed", "--closed-seconds", "1", "--seconds", "1", "--connections", "4"]
        + ["--results-dir", str(out2), "--no-readme"]
    )
    assert code == 0, capsys.readouterr().err
    closed = orjson.loads((out2 / "results.json").read_bytes())["closed"]
    assert set(closed) == {"unpinned", "pinned"}
    for mode in closed.values():
        assert set(mode) == {"direct", "zerodown", "nginx-reload"}
        assert set(mode["zerodown"]) == {"1", "2"}
        for per_workers in mode.values():
            for r in per_workers.values():
                assert r["requests"] > 0 and r["errors"] == 0 and r["non_2xx"] == 0
        for name in ("zerodown", "nginx-reload"):
            assert all(r["cpu_us_per_request"] > 0 for r in mode[name].values())
    assert "| pinned | zerodown | 1 |" in (out2 / "summary.md").read_text()


needs_valgrind = pytest.mark.skipif(
    not shutil.which("valgrind"), reason="valgrind is not installed (make sysdeps)"
)


@needs_nginx
@pytest.mark.skipif(pin_cores() is None, reason="pinning needs 2 cores and taskset")
def test_pinned_proxy_and_backends_run_on_their_own_cores(tmp_path):
    import psutil

    proxy_core, rest_core = pin_cores()  # type: ignore[misc]
    backends = Backends(tmp_path, per_group=1, wrapper=taskset(rest_core))
    proxy = ZerodownProxy(backends, tmp_path, wrapper=taskset(proxy_core))
    try:
        backends.start()
        proxy.start(1)
        assert psutil.Process(proxy.pid()).cpu_affinity() == [proxy_core]
        for ng in backends._procs:
            assert psutil.Process(ng.proc.pid).cpu_affinity() == [rest_core]
    finally:
        proxy.stop()
        backends.stop()


@needs_nginx
@needs_valgrind
def test_instructions_scenario_counts_zerodown_and_nginx(tmp_path, capsys):
    out = tmp_path / "instr"
    code = zerodown(
        ["bench", "instructions", "--small", "20", "--large", "60", "--connections", "2"]
        + ["--results-dir", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    r = orjson.loads((out / "results.json").read_bytes())["instructions"]
    z, n = r["zerodown"], r["nginx"]
    for t in (z, n):
        (run,) = t["runs"]
        assert run["large"]["instructions"] > run["small"]["instructions"] > 0
        assert t["per_request"] == pytest.approx(
            (run["large"]["instructions"] - run["small"]["instructions"]) / 40
        )
    # nginx's C does a proxied request in tens of thousands of instructions; zerodown's
    # Python in more. Neither can be near zero: start-up has cancelled out, not the requests.
    assert 5_000 < n["per_request"] < z["per_request"] < 5_000_000
    assert r["ratio"] == pytest.approx(z["per_request"] / n["per_request"])
    assert "zerodown / nginx" in (out / "summary.md").read_text()


def test_instructions_scenario_refuses_bad_sizes(tmp_path, capsys):
    code = zerodown(
        ["bench", "instructions", "--small", "300", "--large", "100"]
        + ["--results-dir", str(tmp_path)]
    )
    assert code == 1
    assert "--small must be positive and below --large" in capsys.readouterr().err


def test_callgrind_totals_are_read_from_its_output(tmp_path):
    f = tmp_path / "callgrind.out"
    f.write_text(
        "# callgrind format\nversion: 1\ncmd: x\nevents: Ir\nfn=main\n5 10\n\ntotals: 123456\n"
    )
    assert callgrind_total(f) == 123456
    f.write_text("events: Ir\n")
    with pytest.raises(BenchError, match="no totals line"):
        callgrind_total(f)


@needs_nginx
def test_fab_scenario_small(tmp_path, capsys):
    out = tmp_path / "fab"
    code = zerodown(
        ["bench", "fab", "--tools", "20", "--switches", "1", "--switch-every", "2"]
        + ["--idle-clients", "50", "--apps", "1,3", "--instances", "2", "--wrk-seconds", "1"]
        + ["--results-dir", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    fab = orjson.loads((out / "results.json").read_bytes())["fab"]
    h = fab["hsms"]
    # 20 tools x 1 S6F11 a second x 4 s, every one acknowledged and in a backend's record.
    assert h["sent"] >= 20 * 3 and h["replied"] == h["sent"], h
    assert (h["disconnects"], h["lost"], h["duplicated"], h["acked_not_recorded"]) == (0, 0, 0, 0)
    (sw,) = h["switch_log"]
    assert sw["to"] == "green" and sw["sessions_handed_over"] == 20 and h["all_handed_over"]
    assert 0 < sw["handover_ms"]["p50"] <= sw["handover_ms"]["p99"] <= sw["handover_ms"]["max"]
    idle = fab["idle"]
    assert (idle["clients"], idle["failed"], idle["closed_by_proxy"]) == (50, 0, 0)
    assert idle["rss_clients_mib"] > 0
    growth = fab["growth"]
    assert [(g["apps"], g["per_group"], g["instances"]) for g in growth] == [(1, 2, 4), (3, 2, 12)]
    for g in growth:
        assert g["rps"] > 0 and g["errors"] == 0 and g["cpu_us_per_request"] > 0
        assert g["first_new_ms"][0] > 0 and g["applied_ms"][0] > 0
    text = (out / "summary.md").read_text()
    assert "20 HSMS tools" in text and "idle keep-alive HTTP clients" in text
