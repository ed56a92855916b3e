"""`python -m zerodown_proxy` (and `zerodown proxy`): the proxy's own command line.

The data plane starts itself from here, so the supervisor launches its workers without going
through the orchestrator's CLI (layers import downward only: the CLI may call this, never the
reverse).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

# Every flag that overrides a configuration key: (flag, section, key). One table for the
# parser, the overrides and the multi-worker supervisor, which forwards each one given to its
# workers (supervisor.worker_argv), so a worker always runs with its supervisor's settings.
OVERRIDES: tuple[tuple[str, str, str], ...] = (
    ("--http-listen", "proxy", "http_listen"),
    ("--hsms-listen", "proxy", "hsms_listen"),
    ("--admin-listen", "proxy", "admin_listen"),
    ("--advertise-admin", "proxy", "advertise_admin"),
    ("--workers", "proxy", "workers"),
    ("--name", "proxy", "name"),
    ("--registry", "discovery", "file"),
    ("--discovery", "discovery", "provider"),
    ("--no-register", "consul", "register_self"),  # a switch: register_self = false
)


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--config", default=None, help="TOML config file")
    sp.add_argument("--http-listen", default=None, help="override [proxy] http_listen")
    sp.add_argument("--hsms-listen", default=None, help="override [proxy] hsms_listen")
    sp.add_argument("--admin-listen", default=None, help="override [proxy] admin_listen")
    sp.add_argument(
        "--advertise-admin", default=None, help="override [proxy] advertise_admin (host[:port])"
    )
    sp.add_argument("--registry", default=None, help="override [discovery] file")
    sp.add_argument("--discovery", choices=("file", "consul"), default=None)
    sp.add_argument("--ready-file", default=None, help="write bound ports as JSON here")
    sp.add_argument("--workers", type=int, default=None, help="override [proxy] workers")
    sp.add_argument("--name", default=None, help="override [proxy] name")
    sp.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    sp.add_argument("--no-register", action="store_true", help="do not register in Consul")
    # Set by the multi-worker supervisor on its workers only.
    sp.add_argument("--supervisor-admin", default=None, help=argparse.SUPPRESS)
    sp.add_argument("--supervisor-pid", type=int, default=None, help=argparse.SUPPRESS)


def overrides_from(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The configuration keys the flags override (None: not given)."""
    out: dict[str, dict[str, Any]] = {}
    for flag, section, key in OVERRIDES:
        value = getattr(args, flag[2:].replace("-", "_"))
        if flag == "--no-register":
            value = False if value else None
        out.setdefault(section, {})[key] = value
    return out


def run_proxy(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .jsonlog import setup_logging
    from .server import run

    overrides = overrides_from(args)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"zerodown proxy: {exc}", file=sys.stderr, flush=True)
        return 2
    setup_logging(cfg.proxy.log_level)
    return run(
        cfg,
        args.ready_file,
        reuse_port=args.reuse_port,
        config_path=args.config,
        overrides=overrides,
        supervisor_admin=args.supervisor_admin,
        supervisor_pid=args.supervisor_pid,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m zerodown_proxy", description="the zerodown edge proxy"
    )
    add_arguments(p)
    return run_proxy(p.parse_args(argv))
