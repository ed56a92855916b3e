"""`zerodown version`'s facts: the version comes from the installed package's metadata only."""

from __future__ import annotations

import tomllib
from importlib import metadata

from zerodown_proxy import buildinfo

from ..helpers import ROOT


def test_version_is_the_installed_metadata_which_is_pyproject_s():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert buildinfo.version() == metadata.version("zerodown") == declared
    text = buildinfo.build_info().describe().splitlines()
    assert text[0] == f"zerodown {declared}" and text[1].startswith("python ")


def test_a_tree_that_was_never_installed_says_unknown(monkeypatch):
    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(buildinfo.metadata, "version", missing)
    assert buildinfo.version() == "unknown"
