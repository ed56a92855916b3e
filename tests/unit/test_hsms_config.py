"""[hsms] configuration: defaults, and refusals that name the key."""

from __future__ import annotations

import pytest

from zerodown_proxy.config import ConfigError, load_config


def test_hsms_defaults():
    h = load_config(env={}).hsms
    assert (h.t3, h.t5, h.t6, h.t7, h.t8) == (45.0, 10.0, 5.0, 10.0, 5.0)
    assert h.device_id is None and h.max_queued == 1000
    # A hung backend session is found within linktest_interval + t6 (issue 9: at most 10 s).
    assert h.linktest_interval + h.t6 <= 10
    assert h.max_partial_bytes == 4 * h.max_message_bytes
    assert (h.warn_limit, h.warn_interval) == (10, 10.0)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"t3": 0}, "[hsms] t3 must be a positive"),
        ({"t8": -1}, "[hsms] t8 must be a positive"),
        ({"linktest_interval": -1}, "[hsms] linktest_interval"),
        ({"max_message_bytes": 5}, "[hsms] max_message_bytes must be at least 10"),
        ({"max_queued": -1}, "[hsms] max_queued"),
        ({"device_id": 40000}, "[hsms] device_id must be 0..32767"),
        ({"device_id": "x"}, "[hsms] device_id must be a number"),
        ({"max_partial_bytes": 1000}, "[hsms] max_partial_bytes (1000) must hold at least one"),
        ({"max_message_bytes": 2**26}, "max_message_bytes + 4 = 67108868"),
        ({"warn_limit": -1}, "[hsms] warn_limit"),
        ({"warn_interval": 0}, "warn_interval more than 0"),
    ],
)
def test_hsms_bad_values_are_refused(values, message):
    with pytest.raises(ConfigError) as exc:
        load_config(overrides={"hsms": values}, env={})
    assert message in str(exc.value)


def test_hsms_device_id_from_file(tmp_path):
    p = tmp_path / "proxy.toml"
    p.write_text("[hsms]\ndevice_id = 7\nlinktest_interval = 0\n")
    h = load_config(p, env={}).hsms
    assert h.device_id == 7 and h.linktest_interval == 0
