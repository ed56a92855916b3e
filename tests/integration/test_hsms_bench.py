"""`zerodown bench hsms` end to end, tiny: direct and through the proxy, with switches."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from benchmarks.hsms_bench import run_hsms_bench

pytest.importorskip("zerodown_proxy.hsms.proxy", reason="the HSMS proxy has not landed")


def test_hsms_bench_small_run(tmp_path: Path) -> None:
    r = run_hsms_bench(1.5, 2, 0.4, tmp_path, window=2, instances=1, log=lambda _m: None)
    assert "proxy_error" not in r, r.get("proxy_error")
    names = [ph["phase"] for ph in r["phases"]]
    assert names == [
        "direct 1x1",
        "direct 1x1 secsgem tool",
        "direct",
        "proxy 1x1",
        "proxy",
        "proxy+switches",
    ]
    for ph in r["phases"]:
        assert ph["replied"] > 0 and ph["replied"] == ph["sent"], ph
        assert ph["integrity"]["ok"] and ph["disconnects"] == 0, ph
    switches = r["phases"][-1]["switches"]
    assert len(switches) >= 2
    assert [s["to"] for s in switches] == ["green", "blue", "green"][: len(switches)]
    assert all(s["new_version_visible_ms"] is not None for s in switches)
    assert orjson.loads((tmp_path / "hsms.json").read_bytes())["scenario"] == "hsms"
    assert r["phases"][-1]["cpu_us_per_tx"]["proxy"] > 0
    md = (tmp_path / "hsms.md").read_text()
    assert "| proxy+switches |" in md and "handovers" in md
