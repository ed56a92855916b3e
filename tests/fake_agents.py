"""Pytest fixtures for the Consul and Nomad fakes (orchestrator.devstack.fakes): a started FakeConsul,
and a FakeConsul + FakeNomad pair running the drimeap raw_exec job for real.

The job is deploy/nomad/drimeap-raw-exec.json as shipped, with two test-only changes: the task
runs `<this python> -m orchestrator sample-app ...` (no installed `zerodown` on PATH needed)
and MinHealthyTime is short, so a deploy takes about a second instead of the job's 5 s.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.devstack.fakes.consul import FakeConsul
from orchestrator.devstack.fakes.nomad import FakeNomad

ROOT = Path(__file__).resolve().parents[1]
RAW_EXEC_JOB = ROOT / "deploy" / "nomad" / "drimeap-raw-exec.json"


def raw_exec_job(min_healthy_ms: int = 300) -> dict[str, Any]:
    job = json.loads(RAW_EXEC_JOB.read_text())["Job"]
    for tg in job["TaskGroups"]:
        tg["Update"]["MinHealthyTime"] = min_healthy_ms * 1_000_000
        tg["Update"]["HealthyDeadline"] = 30 * 1_000_000_000
        for task in tg["Tasks"]:
            cfg = task["Config"]
            if cfg["command"] == "zerodown":
                cfg["command"] = sys.executable
                cfg["args"] = ["-m", "orchestrator", *cfg["args"]]
    return job


@dataclass(slots=True)
class NomadStack:
    consul: FakeConsul
    nomad: FakeNomad
    job_id: str = "drimeap"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a `python -m orchestrator ... --backend nomad` child."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "NOMAD_"))}
        env.pop("ZERODOWN_ADMIN_TOKEN", None)
        env.update({"PYTHONPATH": str(ROOT), "CONSUL_HTTP_ADDR": self.consul.url,
                    "NOMAD_ADDR": self.nomad.url, **extra})  # fmt: skip
        return env

    def pids(self, group: str) -> set[int]:
        return {
            pid
            for a in self.nomad.allocations(self.job_id, group)
            if a["client_status"] == "running"
            for pid in a["pids"].values()
        }


@pytest.fixture
def nomad_stack(tmp_path: Path) -> Iterator[NomadStack]:
    """drimeap on FakeNomad (blue and green, 2 sample apps each, v1, deployment successful),
    services in FakeConsul, KV zerodown/drimeap/active = blue."""
    consul = FakeConsul()
    consul.start()
    nomad = FakeNomad(
        consul,
        workdir=tmp_path / "nomad",
        base_env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)},
        check_interval=0.2,
        kill_timeout_cap=2.0,  # the job says 45 s; tests need not wait that long for a kill
    )
    try:
        nomad.start()
        nomad.register_job(raw_exec_job())
        # Bounded by the deployment's own deadlines (HealthyDeadline 30 s per allocation):
        # waiting less than that would fail a deployment that is only slow.
        dep = nomad.wait_deployment("drimeap", 90)
        assert dep["Status"] == "successful", dep
        consul.kv_set("zerodown/drimeap/active", "blue")
        yield NomadStack(consul, nomad)
    finally:
        nomad.stop()
        consul.stop()


@pytest.fixture
def consul() -> Iterator[FakeConsul]:
    """A started FakeConsul on 127.0.0.1:<ephemeral>; stopped after the test."""
    c = FakeConsul()
    c.start()
    try:
        yield c
    finally:
        c.stop()
