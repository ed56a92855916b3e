"""`zerodown demo` (what `make demo` runs) end to end, on ephemeral ports."""

from __future__ import annotations

import os
import subprocess
import sys

from ..helpers import ROOT


def test_demo_releases_with_zero_errors_and_no_old_version_after_the_switch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for var in ("ZERODOWN_BACKEND", "CONSUL_HTTP_ADDR", "NOMAD_ADDR", "ZERODOWN_STATE_DIR"):
        env.pop(var, None)
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator", "demo", "--seconds", "1",
         "--http-listen", "127.0.0.1:0", "--hsms-listen", "127.0.0.1:0",
         "--admin-listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "errors                   0" in out
    assert "v1 answers after the switch was applied: 0" in out
    assert "0 reconnects" in out and "HSMS S1F1 after switch   v2" in out
    assert "result: OK, zero downtime" in out
    assert not (tmp_path / "state" / "stack.json").exists()  # the stack was taken down
