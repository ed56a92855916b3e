"""The offline bundle's target (Python and platform) and templates, without building anything."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from ..helpers import ROOT

_spec = importlib.util.spec_from_file_location(
    "build_bundle", ROOT / "deploy" / "bundle" / "build_bundle.py"
)
assert _spec and _spec.loader
bb = importlib.util.module_from_spec(_spec)
sys.modules["build_bundle"] = bb  # dataclasses look their module up by name
_spec.loader.exec_module(bb)


def test_this_machine_needs_no_cross_target_flags():
    t = bb.make_target(None, [])
    assert t.native and t.python_tag == f"cp{sys.version_info[0]}{sys.version_info[1]}"
    assert t.pip_args() == ["--only-binary=:all:"]
    assert t.platform_name.replace("_", "").isalnum() and "-" not in t.platform_name


def test_another_python_and_glibc_gets_every_tag_such_a_host_accepts():
    t = bb.make_target("3.12", ["manylinux_2_17_x86_64"])
    assert not t.native and t.python_tag == "cp312" and t.platform_name == "linux_x86_64"
    args = t.pip_args()
    assert args[:5] == ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    platforms = args[6::2]
    assert platforms[0] == "manylinux_2_17_x86_64"
    # httptools, frozenlist ship manylinux1 / manylinux_2_5 wheels only: a 2.17 host takes them.
    for older in ("manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64",
                  "manylinux_2_5_x86_64", "manylinux1_x86_64"):  # fmt: skip
        assert older in platforms
    assert "manylinux_2_18_x86_64" not in platforms and "manylinux_2_4_x86_64" not in platforms
    assert len(platforms) == len(set(platforms))


def test_platform_names_and_bad_versions():
    assert bb.make_target("3.11", ["manylinux2014_aarch64"]).platform_name == "linux_aarch64"
    assert bb.make_target("3.11", ["musllinux_1_2_x86_64"]).platform_name == "musllinux_x86_64"
    assert bb.expand_platforms(("win_amd64",)) == ["win_amd64"]
    with pytest.raises(bb.BuildError, match="3.11"):
        bb.make_target("3", [])


def test_templates_must_be_filled_except_what_install_sh_fills_on_the_host():
    assert bb.render("v@VERSION@ in @PREFIX@", {"VERSION": "1"}) == "v1 in @PREFIX@"
    with pytest.raises(bb.BuildError, match="@PLATFORM@"):
        bb.render("@PLATFORM@", {"VERSION": "1"})
    values = {k: "x" for k in ("VERSION", "PYTHON_VERSION", "PYTHON_TAG", "PLATFORM", "BUNDLE",
                               "EXTRAS")}  # fmt: skip
    for name in ("install.sh", "INSTALL.md"):  # the real templates use only known placeholders
        bb.render((ROOT / "deploy" / "bundle" / name).read_text(), values)
