"""The Consul data model shared by the proxy and the release commands
(zerodown_proxy/contract/consul.py): names, prefix-aware KV keys, and the validation of tags
and Meta (the same rules as the file registry's fields)."""

from __future__ import annotations

from typing import Any

import pytest

from zerodown_proxy.contract.consul import (
    Keys,
    hsms_service,
    http_service,
    join_instances,
    parse_health,
)


def test_keys_follow_the_prefix() -> None:
    assert Keys().active("drimeap") == "zerodown/drimeap/active"
    k = Keys("/fab/east/zerodown/")
    assert k.prefix == "fab/east/zerodown"
    assert k.active("drimeap") == "fab/east/zerodown/drimeap/active"
    assert k.previous("drimeap") == "fab/east/zerodown/drimeap/previous"
    assert k.history("drimeap", 42) == "fab/east/zerodown/drimeap/history/42"
    assert k.history_prefix("drimeap") == "fab/east/zerodown/drimeap/history/"
    assert (http_service("eap"), hsms_service("eap")) == ("eap", "eap-hsms")


def entry(sid: str, port: int, tags: list[str], meta: dict[str, str] | None = None) -> Any:
    return {"Node": {"Node": "n", "Address": "10.0.0.1"},
            "Service": {"ID": sid, "Service": "x", "Port": port, "Address": "", "Tags": tags,
                        "Meta": meta or {}},
            "Checks": [{"Status": "passing"}]}  # fmt: skip


GOOD_TAGS = ["zerodown-group=blue", "zerodown-version=v1"]


@pytest.mark.parametrize(
    "port, tags, meta, why",
    [
        (0, GOOD_TAGS, {}, "Port 0 is out of range"),
        (8001, ["zerodown-group=blue green", "zerodown-version=v1"], {}, "not a valid name"),
        (8001, ["zerodown-group=blue", "zerodown-version=v1 beta"], {}, "version"),
        (8001, GOOD_TAGS, {"hsms_device_id": "99999"}, "hsms_device_id must be an integer 0-32767"),
        (8001, GOOD_TAGS, {"hsms_device_id": "seven"}, "hsms_device_id must be an integer"),
        (8001, GOOD_TAGS, {"zerodown-instance": "a b"}, "Meta zerodown-instance"),
    ],
)
def test_bad_tags_or_meta_leave_the_service_out_with_the_reason(
    port: int, tags: list[str], meta: dict[str, str], why: str
) -> None:
    http = [entry("good", 8000, GOOD_TAGS), entry("bad", port, tags, meta)]
    joined = join_instances("x", parse_health(http), ())
    assert [i.id for i in joined.instances] == ["good"]
    assert list(joined.invalid) == ["bad"] and why in joined.invalid["bad"]


def test_valid_meta_is_accepted() -> None:
    e = entry("ok", 8000, GOOD_TAGS, {"hsms_device_id": "32767", "zerodown-instance": "i-1"})
    joined = join_instances("x", parse_health([e]), ())
    assert joined.invalid == {} and len(joined.instances) == 1


def test_a_service_id_with_spaces_is_left_out_not_the_whole_state() -> None:
    joined = join_instances("x", parse_health([entry("good", 8000, GOOD_TAGS),
                                               entry("my service", 8001, GOOD_TAGS)]), ())  # fmt: skip
    assert [i.id for i in joined.instances] == ["good"]
    assert "ID 'my service' must be" in joined.invalid["my service"]
