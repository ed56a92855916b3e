"""[health_check] (with per-app overrides) and [outlier_detection]: parsed, validated, named."""

from __future__ import annotations

from pathlib import Path

import pytest

from zerodown_proxy.config import ConfigError, load_config


def load(tmp_path: Path, text: str):
    p = tmp_path / "proxy.toml"
    p.write_text(text)
    return load_config(p, env={})


def test_defaults_are_on_and_per_app_overrides_apply_over_the_section(tmp_path):
    cfg = load(tmp_path, "")
    assert cfg.health_check.enabled and cfg.health_check.path == "/health"
    assert cfg.outlier_detection.enabled and cfg.outlier_detection.max_ejection_percent == 50
    cfg = load(
        tmp_path,
        '[health_check]\ninterval = 2\n[health_check.apps.drimeap]\npath = "/ready"\n'
        "timeout = 0.5\n[health_check.apps.legacy]\nenabled = false\n",
    )
    eap = cfg.health_check.for_app("drimeap")
    assert (eap.path, eap.timeout, eap.interval) == ("/ready", 0.5, 2.0)
    assert not cfg.health_check.for_app("legacy").enabled
    assert cfg.health_check.for_app("other").path == "/health"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[health_check]\ninterval = 0", r"\[health_check\] interval must be a positive"),
        ("[health_check]\nunhealthy_threshold = 0", "unhealthy_threshold must be at least 1"),
        ('[health_check]\npath = "health"', "path must be an absolute path"),
        ('[health_check]\npath = "/h\\r\\nX-Evil: 1"', "path must be an absolute path"),
        ('[health_check]\nhost = "a b"', "host must be a plain host"),
        ("[health_check.apps.eap]\ntimeout = -1", r"\[health_check.apps.eap\] timeout"),
        ("[health_check.apps.eap]\npaht = '/x'", r"unknown setting \[health_check.apps.eap\]"),
        ("[health_check]\napps = 5", "one table per app"),
        ("[outlier_detection]\nmax_ejection_percent = 101", "max_ejection_percent must be"),
        ("[outlier_detection]\nbase_ejection_time = 0", "base_ejection_time must be"),
        ("[outlier_detection]\nmax_ejection_time = 1", "max_ejection_time must be at least"),
        ("[outlier_detection]\nconsecutive_5xx = -1", "consecutive_5xx must be 0"),
        ("[http]\neject_after_failures = 2", r"now \[outlier_detection\]"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text)
