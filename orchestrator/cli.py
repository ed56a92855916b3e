"""The `zerodown` command. Exit codes: 0 success, 1 refused or failed (reason on stderr), 2 usage.

The release commands (status, deploy, switch, rollback) talk to a backend: the local stack by
default, or Consul + Nomad with `--backend nomad` (or ZERODOWN_BACKEND=nomad).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import orjson

from .backend import Backend, Refused
from .cli_checks import (
    BENCH_EXTRA,
    DEFAULT_APP,
    backend_kind,
    missing_bench_extra,
    refuse_inapplicable,
)
from .terminal import LiveProgress

_live = LiveProgress(sys.stderr)


def _err(msg: str) -> None:
    _live.close()
    print(f"zerodown: {msg}", file=sys.stderr, flush=True)


def _say(text: str) -> None:
    """A command's result on stdout, below its finished progress steps."""
    _live.close()
    print(text, flush=True)


def _progress(msg: str) -> None:
    """Progress of a command: one updating line with the elapsed time on a TTY (terminal.py)."""
    _live(msg)


def make_backend(args: argparse.Namespace) -> Backend:
    kind = backend_kind(args)
    if kind == "local":
        from .release_local import LocalBackend

        return LocalBackend(Path(args.state_dir).resolve())
    if kind == "nomad":
        from .release_nomad import NomadConsulBackend

        return NomadConsulBackend.from_env(args)
    raise Refused(f"unknown backend {kind!r}: use local or nomad")


# -- commands ---------------------------------------------------------------------------------


def cmd_proxy(args: argparse.Namespace) -> int:
    from zerodown_proxy.cli import run_proxy

    return run_proxy(args)


def cmd_up(args: argparse.Namespace) -> int:
    from .local_stack import up

    up(
        Path(args.state_dir).resolve(),
        http_listen=args.http_listen,
        hsms_listen=args.hsms_listen,
        admin_listen=args.admin_listen,
        version=args.version,
        per_group=args.instances,
        hsms=not args.no_hsms,
        progress=_progress,
    )
    print(f"local stack up in {Path(args.state_dir).resolve()}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from .local_stack import down

    down(Path(args.state_dir).resolve(), progress=_progress)
    return 0


async def _status(args: argparse.Namespace) -> int:
    if args.watch:
        from .status_view import watch

        return await watch(make_backend(args), args.app, args.interval)
    st = await make_backend(args).status(args.app)
    if args.json:
        print(orjson.dumps(st.to_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        from .status_view import print_status

        print_status(st)
    return 0


async def _deploy(args: argparse.Namespace) -> int:
    backend = make_backend(args)
    if args.dry_run:
        plan = await backend.plan_deploy(args.app, args.version, args.image)
        _say("\n".join(plan.lines))
        if plan.refusal:
            raise Refused(plan.refusal)
        return 0
    msg = await backend.deploy(args.app, args.version, args.image, _progress)
    _say(msg)
    return 0


async def _switch(args: argparse.Namespace) -> int:
    from . import verify

    policy = verify.policy_from_args(args)
    backend = make_backend(args)
    if policy.window:
        out, verdict = await verify.switch_verified(backend, args.app, args.to, policy, _progress)
    else:
        out, verdict = await backend.switch(args.app, args.to, _progress), None
    _say(f"switched {out.app} to {out.to_group} ({out.to_version}); {out.proxies} proxy(ies) "
          f"applied generation {out.generation} in {out.propagation_s * 1000:.1f} ms")  # fmt: skip
    if verdict is not None:
        _say(f"verified {out.to_version} for {policy.window:g}s: {verdict.reason}")
        for line in verdict.lines:
            _say(f"  {line}")
    return 0


async def _rollback(args: argparse.Namespace) -> int:
    out = await make_backend(args).rollback(args.app, _progress)
    _say(f"rolled back {out.app} to {out.to_group} ({out.to_version}); {out.proxies} proxy(ies) "
          f"applied generation {out.generation} in {out.propagation_s * 1000:.1f} ms")  # fmt: skip
    return 0


async def _pilot(args: argparse.Namespace) -> int:
    from . import pilot

    out = await pilot.run(make_backend(args), args.action, args.app, args.tool, _progress)
    if args.json:
        print(orjson.dumps(out.to_json()).decode())
    else:
        if args.action != "list":
            print(f"pilot {args.action} {args.tool}: {out.proxies} proxy(ies) applied generation "
                  f"{out.generation} in {out.propagation_s * 1000:.1f} ms")  # fmt: skip
        print(pilot.describe(out))
    return 0


async def _history(args: argparse.Namespace) -> int:
    from . import audit

    if args.last < 0:
        raise Refused(f"-n must be a number of records (0: all), got {args.last}")
    records = await make_backend(args).history(args.app)
    records = records[-args.last :] if args.last else records
    if args.json:
        for rec in records:
            print(orjson.dumps(rec).decode())
    elif records:
        print("\n".join(audit.table(records)))
    else:
        print(f"no release history for {args.app}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .devstack.demo import run_demo

    return run_demo(args)


def cmd_sample_app(args: argparse.Namespace) -> int:
    from .devstack.sample_app import run

    return run(args)


def cmd_hsms_sim(args: argparse.Namespace) -> int:
    from .devstack.hsms_sim import run

    return run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    missing = missing_bench_extra()
    if missing:  # say so now, not after minutes of load when the plots need matplotlib
        raise Refused(f"benchmarks need the bench extra ({', '.join(missing)} not installed): "
                      f"{BENCH_EXTRA}")  # fmt: skip
    from benchmarks.cli import run

    return run(args)


# -- version and healthcheck ------------------------------------------------------------------


class _VersionAction(argparse.Action):
    """`zerodown --version`: reads the package metadata only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print version, Python and platform")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        cmd_version(argparse.Namespace())
        parser.exit(0)


def cmd_version(args: argparse.Namespace) -> int:
    from zerodown_proxy.buildinfo import build_info

    print(build_info().describe())
    return 0


def cmd_proxy_reload(args: argparse.Namespace) -> int:
    from .proxy_reload import reload_proxy

    outcome = reload_proxy(args.admin, args.config, args.token, args.timeout)
    if not outcome.ok:
        _err(f"proxy-reload: {outcome.message}")
        return 1
    print(outcome.message)
    return 0


def cmd_healthcheck(args: argparse.Namespace) -> int:
    from .healthcheck import run

    health = run(args.admin, args.config, args.timeout)
    if not health.ok:
        _err(f"healthcheck: {health.message}")
        return 1
    print(health.message)
    return 0


# -- parser -----------------------------------------------------------------------------------


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line. The options of the heavy commands (hsms-sim: secsgem; bench:
    numpy and the load generator) are only imported when `command` is that one (None: all):
    every instance the local stack and the Nomad jobs start is `zerodown sample-app`, and must
    not pay a second of imports it never uses (on a loaded machine that is what made instances
    miss their health deadline)."""
    p = argparse.ArgumentParser(prog="zerodown", description=__doc__.splitlines()[0])
    p.add_argument("--version", action=_VersionAction)

    def wanted(name: str) -> bool:
        return command is None or command == name

    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def release_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--app", default=None, help=f"app name (default {DEFAULT_APP})")
        sp.add_argument(
            "--state-dir",
            default=os.environ.get("ZERODOWN_STATE_DIR", ".zerodown"),
            help="local stack state directory (default ./.zerodown)",
        )
        sp.add_argument("--backend", choices=("local", "nomad"), default=None,
                        help="local stack (default) or Consul + Nomad")  # fmt: skip
        sp.add_argument("--job", default=None, help="Nomad job id (default: the app name)")
        sp.add_argument("--admin-token", default=None,
                        help="proxy admin token for the Standby preview smoke test "
                             "(default $ZERODOWN_ADMIN_TOKEN; Nomad backend)")  # fmt: skip
        sp.add_argument("--config", default=None,
                        help="the proxies' config file: the Nomad backend uses its [consul] "
                             "section (addr, token, datacenter, key_prefix), switch its [verify] "
                             "section (default $ZERODOWN_CONFIG)")  # fmt: skip

    sp = sub.add_parser("proxy", help="run the edge proxy")
    from zerodown_proxy.cli import add_arguments as proxy_args

    proxy_args(sp)
    sp.set_defaults(fn=cmd_proxy)

    sp = sub.add_parser("up", help="start the local stack")
    release_opts(sp)
    sp.add_argument("--http-listen", default="0.0.0.0:8080")
    sp.add_argument("--hsms-listen", default="0.0.0.0:5000")
    sp.add_argument("--admin-listen", default="127.0.0.1:8081")
    sp.add_argument("--version", default="v1", help="version both groups start on")
    sp.add_argument("--instances", type=int, default=2, help="instances per group")
    sp.add_argument("--no-hsms", action="store_true", help="HTTP only")
    sp.set_defaults(fn=cmd_up)

    sp = sub.add_parser("down", help="stop the local stack")
    release_opts(sp)
    sp.set_defaults(fn=cmd_down)

    sp = sub.add_parser("status", help="Active/Standby groups, health, proxies in sync")
    release_opts(sp)
    sp.add_argument("--json", "-json", action="store_true",
                    help="machine-readable (zerodown.status/v1)")  # fmt: skip
    sp.add_argument("--watch", action="store_true",
                    help="redraw whenever the status changes; Ctrl-C to quit")  # fmt: skip
    sp.add_argument("--interval", default=None,
                    help="--watch: seconds between two looks (0.2s..60s, default 2s)")  # fmt: skip
    sp.set_defaults(afn=_status)

    sp = sub.add_parser("deploy", help="put VERSION on the Standby group; wait until healthy")
    release_opts(sp)
    sp.add_argument("version", help="version to deploy (e.g. v2)")
    sp.add_argument("--image", default=None, help="docker image (Nomad backend)")
    sp.add_argument("--dry-run", action="store_true",
                    help="print what would change (Nomad: its plan per task group); change "
                         "nothing")  # fmt: skip
    sp.set_defaults(afn=_deploy)

    sp = sub.add_parser("switch", help="flip Active<->Standby; wait for every proxy")
    release_opts(sp)
    sp.add_argument("--to", default=None, help="group to make Active (default: the Standby)")
    from .verify import add_arguments as verify_args

    verify_args(sp)
    sp.set_defaults(afn=_switch)

    sp = sub.add_parser("rollback", help="switch back to the previous group")
    release_opts(sp)
    sp.set_defaults(afn=_rollback)

    sp = sub.add_parser("pilot", help="run tools on the Standby version before the switch")
    release_opts(sp)
    sp.add_argument("action", choices=("add", "remove", "list"))
    sp.add_argument("tool", nargs="?", default=None,
                    help="IP address (10.1.2.3), device id (7 or device:7), or HTTP header rule "
                         "(header:NAME=VALUE)")  # fmt: skip
    sp.add_argument("--json", action="store_true", help="the pilot list as JSON")
    sp.set_defaults(afn=_pilot)

    sp = sub.add_parser("history", help="the audit trail of deploy/switch/rollback")
    release_opts(sp)
    sp.add_argument("--json", "-json", action="store_true", help="one JSON record per line")
    sp.add_argument("-n", "--last", type=int, default=0, metavar="N",
                    help="only the last N records (default: all)")  # fmt: skip
    sp.set_defaults(afn=_history)

    sp = sub.add_parser("demo", help="local stack + load + deploy + switch + summary")
    sp.add_argument("--http-listen", default="127.0.0.1:8080")
    sp.add_argument("--hsms-listen", default="127.0.0.1:5000")
    sp.add_argument("--admin-listen", default="127.0.0.1:8081")
    sp.add_argument("--clients", type=int, default=8, help="keep-alive HTTP clients")
    sp.add_argument("--seconds", type=float, default=3.0, help="load before and after the switch")
    sp.add_argument("--state-dir", default=None, help="default: a temporary directory")
    sp.add_argument("--no-hsms", action="store_true", help="HTTP only")
    sp.set_defaults(fn=cmd_demo)

    sp = sub.add_parser("sample-app", help="the sample drimEAP backend")
    from .devstack.sample_app import add_arguments as sample_args

    sample_args(sp)
    sp.set_defaults(fn=cmd_sample_app)

    sp = sub.add_parser("hsms-sim", help="equipment simulator (HSMS active side)")
    try:
        if wanted("hsms-sim"):
            from .devstack.hsms_sim import add_arguments as sim_args

            sim_args(sp)
    except ImportError as exc:  # the simulator needs secsgem; say so instead of a traceback
        sp.set_defaults(unavailable=f"hsms-sim is unavailable: {exc}")
    sp.set_defaults(fn=cmd_hsms_sim)

    sp = sub.add_parser("bench", help="benchmarks (see benchmarks/README.md)")
    try:
        if wanted("bench"):
            from benchmarks.cli import add_arguments as bench_args

            bench_args(sp)
    except ImportError as exc:
        sp.set_defaults(unavailable=f"benchmarks need the bench extra ({exc}): {BENCH_EXTRA}")
    sp.set_defaults(fn=cmd_bench)

    sp = sub.add_parser("version", help="print version, Python and platform")
    sp.set_defaults(fn=cmd_version)

    sp = sub.add_parser("healthcheck", help="exit 0 if the local proxy is up and routing, else 1")
    sp.add_argument("--admin", default=None, metavar="ADDR",
                    help="the proxy's admin address (default: [proxy] admin_listen of --config, "
                         "$ZERODOWN_ADMIN_LISTEN, or 127.0.0.1:8081)")  # fmt: skip
    sp.add_argument(
        "--config", default=None, help="the proxy's TOML config, to find its admin address"
    )
    sp.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for /health (default 3)"
    )
    sp.set_defaults(fn=cmd_healthcheck)

    sp = sub.add_parser("proxy-reload", help="replace the running proxy process, nothing dropped")
    sp.add_argument("--admin", default=None, metavar="ADDR",
                    help="the proxy's admin address (default: [proxy] admin_listen of --config, "
                         "$ZERODOWN_ADMIN_LISTEN, or 127.0.0.1:8081)")  # fmt: skip
    sp.add_argument("--config", default=None, help="the proxy's TOML config (admin address, token)")
    sp.add_argument("--token", default=None, help="admin token (default: $ZERODOWN_ADMIN_TOKEN, "
                                                   "then [proxy] admin_token of --config)")  # fmt: skip
    sp.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    sp.set_defaults(fn=cmd_proxy_reload)
    return p


async def _with_ticker(args: argparse.Namespace) -> int:
    """Run an async command; on a TTY the progress line's clock moves while it waits."""
    ticker = asyncio.create_task(_live.run_ticker()) if _live.tty else None
    try:
        return await args.afn(args)
    finally:
        if ticker is not None:
            ticker.cancel()
        _live.close()


def _quiet_stdout() -> None:
    """After EPIPE: send what is still buffered for stdout to /dev/null, so the interpreter's
    flush at exit does not fail (and print) a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    if getattr(args, "unavailable", None):
        _err(args.unavailable)
        return 1
    try:
        refuse_inapplicable(args)
        if getattr(args, "app", "") is None:
            args.app = DEFAULT_APP
        if getattr(args, "afn", None) is not None:
            return asyncio.run(_with_ticker(args))
        return int(args.fn(args) or 0)
    except Refused as exc:
        _err(str(exc))
        return 1
    except BrokenPipeError:  # `zerodown history | head`: the reader left; not an error of ours
        _quiet_stdout()
        return 141  # what a shell reports for a process ended by SIGPIPE (128 + 13)
    except KeyboardInterrupt:
        _live.close()
        return 0 if getattr(args, "watch", False) else 130
    except Exception as exc:  # a command that fails says why in one line; details in debug
        from zerodown_proxy.discovery.file import RegistryError

        if isinstance(exc, RegistryError | OSError):
            _err(str(exc))
            return 1
        raise
