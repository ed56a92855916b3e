"""`deploy --dry-run` and `history` with `--backend nomad`, against the Nomad double (running the
drimeap raw_exec job as real processes) and the Consul double."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson

from ..fake_agents import NomadStack
from ..helpers import wait_until
from .test_nomad_release import KEY, TOKEN, history, proxies, run_cli  # noqa: F401 (fixture)
from .test_switch_verify import VERIFY, Load


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


def test_flags_that_do_not_apply_to_the_nomad_backend_are_refused(
    nomad_stack: NomadStack, tmp_path: Path
) -> None:
    for command in ("down", "up"):
        r = run_cli(nomad_stack, tmp_path, command)
        assert r.returncode == 1
        assert r.stderr.startswith(f"zerodown: zerodown {command} manages the local stack only")
    r = run_cli(nomad_stack, tmp_path, "switch", "--admin-token", "t")
    assert r.returncode == 1 and r.stderr.startswith("zerodown: --admin-token applies to deploy")
    r = run_cli(nomad_stack, tmp_path, "history", "--job", "x")
    assert r.returncode == 1 and r.stderr.startswith("zerodown: --job does not apply to history")
    assert not (tmp_path / "state").exists()
    assert nomad_stack.consul.kv_get(KEY)[0] == "blue"


def test_switch_verify_rolls_back_a_release_that_answers_500(
    nomad_stack: NomadStack,
    proxies: Callable,  # noqa: F811 (the fixture of test_nomad_release)
    tmp_path: Path,
) -> None:
    stack = nomad_stack
    (px,) = proxies(stack, 1)
    px.wait_generation(stack.consul.kv_get(KEY)[1])
    r = run_cli(stack, tmp_path, "deploy", "v2", "--admin-token", TOKEN)
    assert r.returncode == 0, r.stderr
    st = orjson.loads(run_cli(stack, tmp_path, "status", "--json").stdout)
    assert st["standby"]["group"] == "green"
    for i in st["standby"]["instances"]:
        req = urllib.request.Request(f"http://{i['address']}:{i['http_port']}/fault?status=500",
                                     b"")  # fmt: skip
        urllib.request.urlopen(req, timeout=5).close()
    load = Load(px.http)
    try:
        wait_until(lambda: load.total() >= 20, 30, "traffic on v1 for the baseline")
        r = run_cli(stack, tmp_path, "switch", "--verify", "60s", *VERIFY)
    finally:
        load.close()
    assert r.returncode == 1, (r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("zerodown: verification of v2 failed: HTTP 5xx 100.00% of "), last
    assert last.endswith("; rolled back drimeap to blue (v1)")
    assert stack.consul.kv_get(KEY)[0] == "blue"
    assert load.seen[("v2", 500)] > 0 and load.last == ("v1", 200)
    switch, rollback = history(stack)[-2:]
    assert (switch["action"], switch["result"]) == ("switch", "ok")
    assert (rollback["action"], rollback["result"]) == ("rollback", "ok")
    assert rollback["reason"].startswith("automatic rollback: v2 failed verification: HTTP 5xx")
