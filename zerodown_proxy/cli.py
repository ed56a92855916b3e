"""`python -m zerodown_proxy` (and `zerodown proxy`): the proxy's own command line.

The data plane starts itself from here, so the supervisor launches its workers without going
through the orchestrator's CLI (layers import downward only: the CLI may call this, never the
reverse).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--config", default=None, help="TOML config file")
    sp.add_argument("--http-listen", default=None, help="override [proxy] http_listen")
    sp.add_argument("--hsms-listen", default=None, help="override [proxy] hsms_listen")
    sp.add_argument("--admin-listen", default=None, help="override [proxy] admin_listen")
    sp.add_argument("--registry", default=None, help="override [discovery] file")
    sp.add_argument("--discovery", choices=("file", "consul"), default=None)
    sp.add_argument("--ready-file", default=None, help="write bound ports as JSON here")
    sp.add_argument("--workers", type=int, default=None, help="override [proxy] workers")
    sp.add_argument("--name", default=None, help="override [proxy] name")
    sp.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    sp.add_argument("--no-register", action="store_true", help=argparse.SUPPRESS)


def run_proxy(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .jsonlog import setup_logging
    from .server import run

    overrides: dict[str, dict[str, Any]] = {
        "proxy": {
            "http_listen": args.http_listen,
            "hsms_listen": args.hsms_listen,
            "admin_listen": args.admin_listen,
            "workers": args.workers,
            "name": args.name,
        },
        "discovery": {"file": args.registry, "provider": args.discovery},
        "consul": {"register_self": False if args.no_register else None},
    }
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"zerodown proxy: {exc}", file=sys.stderr, flush=True)
        return 2
    setup_logging(cfg.proxy.log_level)
    return run(cfg, args.ready_file, reuse_port=args.reuse_port, config_path=args.config)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m zerodown_proxy", description="the zerodown edge proxy"
    )
    add_arguments(p)
    return run_proxy(p.parse_args(argv))
