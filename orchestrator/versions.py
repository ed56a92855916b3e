"""Which version strings a release accepts.

A version travels far: it becomes a command-line argument of the instances (`--version
${NOMAD_META_version}`), a docker image tag, a Consul tag (`zerodown-version=<v>`), Nomad meta,
a registry field and an audit record. One pattern that is safe in all of them:

    [A-Za-z0-9][A-Za-z0-9._-]{0,63}

1 to 64 characters; letters, digits, `.`, `_` and `-`; the first a letter or digit. So no empty
string, no leading `-` (it would be read as an option: `deploy -- --help` started instances
with `--version --help`), no whitespace or newline, no path separator, nothing a shell, a
docker reference or a Consul tag would treat specially. `+` (semver build metadata) is left out
on purpose: docker tags do not allow it (`[\\w][\\w.-]{0,127}`), and the Nomad backend retags
images with the version.
"""

from __future__ import annotations

import re

from .backend import Refused

MAX_LENGTH = 64
PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_LENGTH - 1}}}")
RULE = (
    f"1 to {MAX_LENGTH} letters, digits, '.', '_' or '-', starting with a letter or digit "
    "(e.g. v2, 2.4.1, 2026.11-rc1)"
)


def problem(version: str) -> str | None:
    """Why `version` is not acceptable, or None when it is."""
    if PATTERN.fullmatch(version):
        return None
    if not version:
        return "it is empty"
    if len(version) > MAX_LENGTH:
        return f"it is {len(version)} characters long"
    if not (version[0].isascii() and version[0].isalnum()):
        return f"it starts with {version[0]!r}"
    bad = next(c for c in version if not (c.isascii() and (c.isalnum() or c in "._-")))
    return f"it contains {bad!r}"


def check_version(version: str, verb: str = "deploying") -> str:
    """`version` unchanged if acceptable; otherwise Refused in one sentence."""
    why = problem(version)
    if why is not None:
        raise Refused(f"version {version!r} is not valid ({why}): a version is {RULE}; not {verb}.")
    return version
