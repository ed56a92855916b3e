"""What is running: zerodown's version (from the installed package's metadata), Python, platform.

The version has one owner, `[project] version` in pyproject.toml, which reaches a running
process only through the installed distribution's metadata; nothing else spells it.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from importlib import metadata

DISTRIBUTION = "zerodown"


@dataclass(frozen=True, slots=True)
class BuildInfo:
    version: str  # "0.1.0", or "unknown" when zerodown runs from a tree that was never installed
    python: str  # "3.11.7"
    implementation: str  # "CPython"
    executable: str  # the interpreter, which tells which installation (venv) this is
    platform: str  # "Linux-6.1.0-x86_64-with-glibc2.36"
    machine: str  # "x86_64"

    def describe(self) -> str:
        """The `zerodown version` text: what an operator pastes into a bug report."""
        return (
            f"zerodown {self.version}\n"
            f"python {self.python} ({self.implementation}, {self.executable})\n"
            f"platform {self.platform} ({self.machine})"
        )


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def build_info() -> BuildInfo:
    return BuildInfo(
        version=version(),
        python=platform.python_version(),
        implementation=platform.python_implementation(),
        executable=sys.executable,
        platform=platform.platform(),
        machine=platform.machine(),
    )
