"""The Nomad double validates jobs as the real agent does (check interval/timeout >= 1 s, with
Nomad's wording), and every job this project registers, live or against the double, passes."""

from __future__ import annotations

import copy
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orchestrator.devstack.fakes.nomad import FakeNomad
from orchestrator.devstack.fakes.nomad_validate import go_duration, validate_job
from tests.fake_agents import raw_exec_job

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "nomad"


def test_go_durations() -> None:
    assert [go_duration(n) for n in (0, 500_000_000, 10**9, 1_500_000_000, 90 * 10**9)] == [
        "0s", "500ms", "1s", "1.5s", "1m30s",
    ]  # fmt: skip


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.json")), ids=lambda p: p.name)
def test_shipped_jobs_are_valid(path: Path) -> None:
    assert validate_job(json.loads(path.read_text())["Job"]) is None


def test_jobs_the_tests_register_are_valid() -> None:
    from tests.live.test_nomad_live import Agents

    assert validate_job(raw_exec_job()) is None  # the double's fixture
    assert validate_job(Agents().job()) is None  # the live tests' job (was 500 ms: refused)


def sub_second(ms: int = 500) -> dict:
    job = copy.deepcopy(raw_exec_job())
    for tg in job["TaskGroups"]:
        tg["Services"][0]["Checks"][0]["Interval"] = ms * 1_000_000
    return job


NOMAD_TEXT = (  # go-multierror: each of the four nested lists ends with a blank line
    "2 errors occurred:\n"
    "\t* Task group blue validation failed: 1 error occurred:\n"
    "\t* Task group service validation failed: 1 error occurred:\n"
    "\t* Service[0] drimeap validation failed: 1 error occurred:\n"
    "\t* Check http invalid: interval (500ms) cannot be lower than 1s\n\n\n\n\n\n"
    "\n\t* Task group green validation failed: 1 error occurred:\n"
    "\t* Task group service validation failed: 1 error occurred:\n"
    "\t* Service[0] drimeap validation failed: 1 error occurred:\n"
    "\t* Check http invalid: interval (500ms) cannot be lower than 1s\n\n\n\n\n\n\n\n"
)


def test_sub_second_interval_is_refused_like_nomad(tmp_path: Path) -> None:
    assert validate_job(sub_second()) == NOMAD_TEXT
    nomad = FakeNomad(workdir=tmp_path / "nomad")
    nomad.start()
    try:
        for path in ("/v1/jobs", "/v1/job/drimeap/plan"):
            body = json.dumps({"Job": sub_second()}).encode()
            req = urllib.request.Request(nomad.url + path, data=body, method="POST")
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=10)
            assert err.value.code == 500
            text = err.value.read().decode()
            assert "Check http invalid: interval (500ms) cannot be lower than 1s" in text
            assert text == NOMAD_TEXT
        with pytest.raises(ValueError, match=r"interval \(500ms\) cannot be lower than 1s"):
            nomad.register_job(sub_second())
        assert nomad.job("drimeap") is None  # nothing was registered
        job = sub_second(1000)  # exactly 1 s is allowed
        for tg in job["TaskGroups"]:
            tg["Services"][1]["Checks"][0]["Timeout"] = 100_000_000
        assert (
            "Check hsms-tcp invalid: timeout (100ms) is lower than required minimum timeout 1s"
            in (validate_job(job) or "")
        )
    finally:
        nomad.stop()
