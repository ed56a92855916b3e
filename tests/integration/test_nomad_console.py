"""`deploy --dry-run` and `history` with `--backend nomad`, against the Nomad double (running the
drimeap raw_exec job as real processes) and the Consul double."""

from __future__ import annotations

from pathlib import Path

from ..fake_agents import NomadStack
from .test_nomad_release import KEY, run_cli


def test_deploy_dry_run_prints_nomads_plan_and_registers_nothing(
    nomad_stack: NomadStack, tmp_path: Path
) -> None:
    stack = nomad_stack
    job_before = stack.nomad.job("drimeap")
    pids = stack.pids("blue") | stack.pids("green")
    r = run_cli(stack, tmp_path, "deploy", "v2", "--dry-run")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == '+/- Job: "drimeap"'
    assert 'Task Group: "blue" (2 in-place update)' in out
    green = out.index('+/- Task Group: "green" (2 create/destroy update)')
    assert '  +/- Meta[version]: "v1" => "v2"' in out[green:]
    assert "- All tasks successfully allocated." in out
    assert f"Job Modify Index: {job_before['JobModifyIndex']}" in out
    assert out[-3:] == [
        "Standby group green: create/destroy update 2 -> v2 (2 create/destroy update)",
        "Active group blue: untouched (2 in-place update: job version only, no restart)",
        "dry run: nothing was registered (job drimeap unchanged)",
    ]
    job_after = stack.nomad.job("drimeap")
    assert job_after["JobModifyIndex"] == job_before["JobModifyIndex"]
    assert job_after["Version"] == job_before["Version"]
    assert stack.pids("blue") | stack.pids("green") == pids
    assert stack.consul.kv_get(KEY)[0] == "blue"
    r = run_cli(stack, tmp_path, "history")  # a dry run is not a release action: no record
    assert r.returncode == 0 and r.stdout == "no release history for drimeap\n", r.stdout

    r = run_cli(stack, tmp_path, "deploy", "v2", "--dry-run", "--image", "drimeap:v2")
    assert r.returncode == 1
    assert "--image applies to docker tasks; group green uses the raw_exec driver" in r.stderr


def test_history_table_reads_consuls_trail(nomad_stack: NomadStack, tmp_path: Path) -> None:
    stack = nomad_stack
    r = run_cli(stack, tmp_path, "switch", "--to", "blue")
    assert r.returncode == 1
    r = run_cli(stack, tmp_path, "history", "-n", "5")
    assert r.returncode == 0, r.stderr
    head, row = r.stdout.splitlines()
    assert head.split()[:3] == ["TIME", "WHO", "ACTION"]
    assert "switch  blue -> blue" in row
    assert row.endswith("refused  group blue is already Active for drimeap; nothing to switch")


def test_down_and_up_refuse_the_nomad_backend(nomad_stack: NomadStack, tmp_path: Path) -> None:
    for command in ("down", "up"):
        r = run_cli(nomad_stack, tmp_path, command)
        assert r.returncode == 1
        assert r.stderr.startswith(f"zerodown: zerodown {command} manages the local stack only")
    assert not (tmp_path / "state").exists()
