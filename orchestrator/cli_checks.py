"""Checks the CLI makes before a command runs: flags that do not apply to it (or to its
backend) are refused, not ignored; a command whose extra is not installed says which to
install."""

from __future__ import annotations

import argparse
import os

from .backend import Refused

DEFAULT_APP = "drimeap"
LOCAL_STACK_ONLY = ("up", "down")


def backend_kind(args: argparse.Namespace) -> str:
    return getattr(args, "backend", None) or os.environ.get("ZERODOWN_BACKEND") or "local"


def refuse_inapplicable(args: argparse.Namespace) -> None:
    """A flag that does not apply to the command (or its backend) is refused, not ignored."""
    command = args.command
    if not hasattr(args, "backend"):
        return
    kind = backend_kind(args)
    if command in LOCAL_STACK_ONLY:
        if kind != "local":
            how = "--backend nomad" if args.backend else "ZERODOWN_BACKEND=nomad"
            raise Refused(
                f"zerodown {command} manages the local stack only; with {how} the services are "
                "Nomad's: use `nomad job run` / `nomad job stop` (nothing was changed)"
            )
        for flag in ("job", "admin_token", "config"):
            if getattr(args, flag, None):
                raise Refused(f"--{flag.replace('_', '-')} does not apply to zerodown {command} "
                              "(the local stack)")  # fmt: skip
        if args.app not in (None, DEFAULT_APP):
            raise Refused(f"the local stack runs {DEFAULT_APP} only; --app {args.app} does not "
                          f"apply to zerodown {command}")  # fmt: skip
    elif kind != "local":
        if args.admin_token and command != "deploy":
            raise Refused("--admin-token applies to deploy only (its smoke test through the "
                          "proxies' Standby preview)")  # fmt: skip
        if args.job and command == "history":
            raise Refused("--job does not apply to history: the trail is kept per app (--app)")
    else:
        if args.job:
            raise Refused("--job applies to the Nomad backend (a Nomad job id)")
        if args.admin_token:
            raise Refused("--admin-token applies to the Nomad backend; the local stack keeps "
                          "its token in stack.json")  # fmt: skip
        if args.config and command != "switch":
            raise Refused(f"--config applies to the Nomad backend and to switch --verify; not "
                          f"to zerodown {command} on the local stack")  # fmt: skip
    if command == "status":
        if args.watch and args.json:
            raise Refused("--watch redraws a table for people; for scripts poll --json instead")
        if args.interval is not None and not args.watch:
            raise Refused("--interval applies only with --watch")


BENCH_EXTRA = "pip install 'zerodown[bench]'"  # the extra's name: [project.optional-dependencies]


def missing_bench_extra() -> list[str]:
    """Distributions of the bench extra (as the installed package's metadata lists them) that
    are not installed; [] when all are, or when zerodown runs from a source tree without
    metadata (nothing to check against)."""
    import importlib.metadata as md
    import re

    try:
        requires = md.requires("zerodown") or []
    except md.PackageNotFoundError:
        return []
    missing = []
    for req in requires:
        if not re.search(r"""extra\s*==\s*["']bench["']""", req):
            continue
        name = re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0]
        try:
            md.distribution(name)
        except md.PackageNotFoundError:
            missing.append(name)
    return missing
