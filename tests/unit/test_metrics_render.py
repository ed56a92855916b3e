"""The Prometheus text the registry renders (pure: no network)."""

from __future__ import annotations

from zerodown_proxy.metrics import Registry, register_process_info


def test_gauge_set_drops_label_sets_that_are_gone_and_help_is_escaped():
    reg = Registry()
    current = [(("a",), 1.0), (("b",), 0.0)]
    reg.gauge_set("zerodown_x", "line one\nback\\slash", ("k",), lambda: current)
    text = reg.render()
    assert "# HELP zerodown_x line one\\nback\\\\slash\n" in text
    assert 'zerodown_x{k="a"} 1\nzerodown_x{k="b"} 0\n' in text
    current = [(("b",), 1.0)]
    text = reg.render()
    assert 'k="a"' not in text and 'zerodown_x{k="b"} 1' in text


def test_process_metrics_are_this_process():
    import os
    import time

    reg = Registry()
    register_process_info(reg)
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in reg.render().splitlines()
        if line.startswith("process_")
    }
    assert values["process_open_fds"] == len(os.listdir("/proc/self/fd"))
    assert 0 < values["process_start_time_seconds"] <= time.time()
    assert values["process_resident_memory_bytes"] > 1024 * 1024
    assert values["process_cpu_seconds_total"] > 0
