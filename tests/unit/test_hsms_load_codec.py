"""The benchmark's raw HSMS client encodes what secsgem decodes, and reads what secsgem sends."""

from __future__ import annotations

import secsgem.secs

from benchmarks.hsms_bench import hsms_metrics, metric_delta
from benchmarks.hsms_load import S6F12_ACK0, parse_s1f2_softrev, s6f11_body

FUNCS = secsgem.secs.functions.StreamsFunctions()


def test_s6f11_body_is_what_secsgem_decodes() -> None:
    fn = FUNCS.function(6, 11)()
    fn.decode(s6f11_body(4_000_000_123, 1000))
    assert fn.DATAID.get() == 4_000_000_123 and fn.CEID.get() == 1000 and fn.RPT.get() == []


def test_replies_encoded_by_secsgem_are_understood() -> None:
    assert FUNCS.function(6, 12)(0).encode() == S6F12_ACK0
    assert FUNCS.function(6, 12)(1).encode() != S6F12_ACK0
    s1f2 = FUNCS.function(1, 2)(["drimeap-blue-1", "v2.3.1"]).encode()
    assert parse_s1f2_softrev(s1f2) == "v2.3.1"
    assert parse_s1f2_softrev(FUNCS.function(1, 2)().encode()) is None  # a host's empty S1F2
    assert parse_s1f2_softrev(b"\x01\x02\x41") is None  # truncated


def test_metrics_parsing_and_delta() -> None:
    before = hsms_metrics("zerodown_hsms_handovers_total 2\nother_metric 5\n# HELP x\n")
    after = hsms_metrics(
        'zerodown_hsms_handovers_total 5\nzerodown_hsms_rejected_total{side="backend",reason="4"} 1\n'
    )
    assert before == {"zerodown_hsms_handovers_total": 2.0}
    assert metric_delta(before, after) == {
        "zerodown_hsms_handovers_total": 3.0,
        'zerodown_hsms_rejected_total{side="backend",reason="4"}': 1.0,
    }
