"""The systemd unit files the bundle ships, checked by systemd's own parser where it exists."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from ..helpers import ROOT

UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))


def test_units_start_the_proxy_from_the_prefix_and_stop_it_gracefully():
    assert [u.name for u in UNITS] == ["zerodown-proxy-workers.service", "zerodown-proxy.service"]
    for unit in UNITS:
        text = unit.read_text()
        assert re.search(r"^ExecStart=@PREFIX@/bin/zerodown proxy --config \S+", text, re.M)
        assert "KillSignal=SIGTERM" in text and "Restart=on-failure" in text
    # The supervisor alone gets SIGTERM and stops its workers; SIGKILL for all after the timeout.
    workers = (ROOT / "deploy" / "systemd" / "zerodown-proxy-workers.service").read_text()
    assert "KillMode=mixed" in workers and "--workers ${ZERODOWN_WORKERS}" in workers


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_rendered_units(tmp_path):
    prefix = tmp_path / "opt"
    (prefix / "bin").mkdir(parents=True)
    exe = prefix / "bin" / "zerodown"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    rendered = []
    for unit in UNITS:  # as install.sh renders them
        out = tmp_path / unit.name
        out.write_text(unit.read_text().replace("@PREFIX@", str(prefix)))
        rendered.append(str(out))
    r = subprocess.run(["systemd-analyze", "verify", *rendered], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    complaints = [line for line in (r.stdout + r.stderr).splitlines()
                  if str(tmp_path) in line or "Unknown" in line or "Invalid" in line]  # fmt: skip
    assert r.returncode == 0 and not complaints, r.stdout + r.stderr
