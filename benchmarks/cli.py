"""`zerodown bench <scenario>`: run benchmark scenarios, write tables, JSON and plots.

Scenarios: generator (the load generator against nginx directly), steady (1k and 10k requests/s
open loop with switches; also gives switch propagation), propagation (steady at 1k only),
closed (wrk max throughput at 1 and 2 workers, unpinned and pinned), datapath (Python cost per
request, no sockets), hsms (benchmarks/hsms_bench.py), all; and, with options of their own and
not in `all`: instructions (callgrind, benchmarks/instructions.py), fab (benchmarks/fab.py).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .nginx import BenchError
from .scenarios import BenchConfig, closed, generator_check, machine, steady
from .targets import PROXIES

SCENARIOS = ("generator", "steady", "propagation", "closed", "datapath", "hsms", "all")
# Scenarios with options of their own (module.add_arguments / module.run_from_args), results
# written like the others but never into README.md's generated block.
OWN_OPTIONS = {"instructions": "instructions", "fab": "fab"}
MAX_SECONDS = 300.0
ROOT = Path(__file__).resolve().parent.parent


def _hsms_module() -> Any | None:
    try:
        from . import hsms_bench
    except ImportError:
        return None
    return hsms_bench


def _csv_floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _csv_proxies(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [n for n in names if n not in PROXIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown proxy {', '.join(bad) or repr(text)}: choose from {', '.join(PROXIES)}"
        )
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    helps = {
        "generator": "the load generator against one nginx backend: does it reach the rate?",
        "steady": "open loop at 1k and 10k requests/s, a switch every 10 s, per proxy",
        "propagation": "switch propagation per switch (steady at 1,000 requests/s)",
        "closed": "closed-loop max throughput (wrk -c50), 1 and 2 workers, unpinned and pinned",
        "datapath": "Python CPU per request of the HTTP data path, without sockets",
        "hsms": "HSMS S6F11/S6F12 through the proxy vs direct, with switches",
        "all": "every scenario in turn; updates README.md's benchmark section",
        "instructions": "instructions per proxied request under callgrind, zerodown vs nginx",
        "fab": "1,000 HSMS tools across switches, 10,000 idle HTTP clients, apps x instances",
    }
    for name, module in OWN_OPTIONS.items():
        sp = sub.add_parser(name, help=helps[name])
        importlib.import_module(f".{module}", __package__).add_arguments(sp)
        sp.add_argument("--results-dir", default=None, help="default bench-results/<timestamp>/")
        sp.set_defaults(update_readme=False, no_plots=True)
    for name in SCENARIOS:
        sp = sub.add_parser(name, help=helps[name])
        if name == "hsms":
            mod = _hsms_module()
            if mod is not None:
                mod.add_arguments(sp)
            else:
                sp.set_defaults(
                    unavailable="the HSMS benchmark (benchmarks/hsms_bench.py) is missing"
                )
            continue
        sp.add_argument("--seconds", type=float, default=60.0,
                        help=f"each open-loop run (default 60, at most {MAX_SECONDS:.0f})")  # fmt: skip
        sp.add_argument("--quick", action="store_true",
                        help="a few seconds per run (for tests and a smoke check)")  # fmt: skip
        sp.add_argument("--rates", type=_csv_floats, default=None,
                        help="requests/s, comma separated (default 1000,10000)")  # fmt: skip
        sp.add_argument("--switch-every", type=float, default=10.0,
                        help="seconds between switches (default 10; 0 = none)")  # fmt: skip
        sp.add_argument("--warmup", type=float, default=2.0,
                        help="unrecorded seconds at the rate before each open-loop run (default 2)")  # fmt: skip
        sp.add_argument("--proxies", type=_csv_proxies, default=None,
                        help="zerodown,nginx-watch,nginx-reload (default: all three)")  # fmt: skip
        sp.add_argument("--workers", type=int, default=2,
                        help="proxy workers in open-loop runs, same for every proxy (default 2)")  # fmt: skip
        sp.add_argument("--closed-seconds", type=float, default=None,
                        help="each wrk run (default 20, or --seconds if shorter)")  # fmt: skip
        sp.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
        sp.add_argument("--pinning", choices=("both", "pinned", "unpinned"), default="both",
                        help="closed loop: proxy on one core, wrk + backends on the other (taskset), not, or both (default)")  # fmt: skip
        sp.add_argument("--max-in-flight", type=int, default=1000,
                        help="generator in-flight limit, k6 maxVUs (default 1000)")  # fmt: skip
        sp.add_argument("--processes", type=int, default=0,
                        help="generator processes (default: 1 per 12,000 requests/s)")  # fmt: skip
        sp.add_argument("--results-dir", default=None,
                        help="default bench-results/<timestamp>/")  # fmt: skip
        sp.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
        sp.add_argument("--update-readme", action="store_true", default=name == "all",
                        help="write the summary into README.md (default for `all`)")  # fmt: skip
        sp.add_argument("--no-readme", dest="update_readme", action="store_false",
                        help="do not touch README.md")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Validate the options into a BenchConfig; raises BenchError with a usable message."""
    if not 0 < args.seconds <= MAX_SECONDS:
        raise BenchError(f"--seconds must be between 1 and {MAX_SECONDS:.0f}, got {args.seconds}")
    if args.workers < 1 or args.connections < 1 or args.max_in_flight < 1 or args.processes < 0:
        raise BenchError("--workers, --connections and --max-in-flight must be at least 1")
    if args.switch_every < 0:
        raise BenchError("--switch-every must be 0 (no switches) or positive")
    if not 0 <= args.warmup <= 60:
        raise BenchError(f"--warmup must be between 0 and 60 seconds, got {args.warmup}")
    warmup = min(args.warmup, 0.5) if args.quick else args.warmup
    seconds = args.seconds
    switch_every = args.switch_every
    if args.quick:
        seconds = min(seconds, 4.0)
        switch_every = min(switch_every, 1.5) if switch_every else 0.0
    cfg = BenchConfig(
        seconds=seconds,
        switch_every=switch_every,
        warmup=warmup,
        workers=args.workers,
        connections=args.connections,
        max_in_flight=args.max_in_flight,
        processes=args.processes,
        closed_seconds=args.closed_seconds or min(20.0, seconds),
        check_seconds=min(20.0, seconds),
        pinning=("unpinned", "pinned") if args.pinning == "both" else (args.pinning,),
    )
    if args.rates:
        cfg = replace(cfg, rates=args.rates)
    if args.proxies:
        cfg = replace(cfg, proxies=args.proxies)
    if args.scenario == "propagation":
        cfg = replace(cfg, rates=(args.rates or (1000.0,))[:1])
    return cfg


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run_hsms_all(results: dict[str, Any], out_dir: Path, cfg: BenchConfig) -> None:
    mod = _hsms_module()
    if mod is None:
        _log("hsms: skipped (benchmarks/hsms_bench.py is missing)")
        return
    sp = argparse.ArgumentParser(prog="zerodown bench hsms")
    mod.add_arguments(sp)
    # Its own defaults, shortened like the other scenarios; its files land in our directory.
    hargs = sp.parse_args(["--seconds", f"{min(10.0, cfg.seconds):g}", "--out", str(out_dir)])
    _log("hsms: S6F11/S6F12 through the proxy vs direct")
    code = int(mod.main(hargs))
    md = out_dir / "hsms.md"
    results["hsms"] = {
        "exit_code": code,
        "markdown": md.read_text() if md.exists() else "(no hsms.md written)",
    }


def run(args: argparse.Namespace) -> int:
    if args.scenario == "hsms":
        mod = _hsms_module()
        if mod is None:
            print("zerodown: the HSMS benchmark is missing", file=sys.stderr)
            return 1
        return int(mod.main(args))
    if args.scenario in OWN_OPTIONS:
        return _run_own(args)
    try:
        cfg = config_from_args(args)
    except BenchError as exc:
        print(f"zerodown: {exc}", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.results_dir or Path("bench-results") / stamp)
    command = _command(args)
    results: dict[str, Any] = {
        "scenario": args.scenario,
        "command": command,
        "started": stamp,
        "machine": machine(),
        "config": {
            "seconds": cfg.seconds,
            "rates": list(cfg.rates),
            "switch_every": cfg.switch_every,
            "warmup": cfg.warmup,
            "proxies": list(cfg.proxies),
            "workers": cfg.workers,
            "closed_seconds": cfg.closed_seconds,
            "connections": cfg.connections,
            "max_in_flight": cfg.max_in_flight,
        },
    }
    which = args.scenario
    try:
        if which in ("generator", "all"):
            _log(f"generator: {cfg.check_rate:.0f} rps for {cfg.check_seconds:.0f} s at nginx")
            results["generator"] = generator_check(cfg, _log)
        if which in ("steady", "propagation", "all"):
            _log(
                f"steady: {len(cfg.rates)} rate(s) x {len(cfg.proxies)} proxies, {cfg.seconds:.0f} s each"
            )
            results["steady"] = steady(cfg, _log)
        if which in ("closed", "all"):
            _log(f"closed: wrk -c{cfg.connections}, {cfg.closed_seconds:.0f} s per run")
            results["closed"] = closed(replace(cfg), _log)
        if which in ("datapath", "all"):
            from .datapath import measure

            results["datapath"] = measure(requests=5000 if args.quick else 50000)
            _log(f"datapath: {results['datapath']['us_per_request']:.2f} us/request")
        if which == "all":
            _run_hsms_all(results, out_dir, cfg)
    except (BenchError, RuntimeError, OSError) as exc:
        # Every process a scenario started is stopped by now (finally blocks); say why in one line.
        print(f"zerodown: benchmark {which} failed: {exc}", file=sys.stderr)
        return 1
    return _finish(results, out_dir, args)


def _command(args: argparse.Namespace) -> str:
    argv = sys.argv[1:]
    if argv[:1] == ["bench"]:
        return "zerodown " + " ".join(shlex.quote(a) for a in argv)
    return f"zerodown bench {args.scenario}"


def _run_own(args: argparse.Namespace) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.results_dir or Path("bench-results") / stamp)
    module = importlib.import_module(f".{OWN_OPTIONS[args.scenario]}", __package__)
    results: dict[str, Any] = {
        "scenario": args.scenario,
        "command": _command(args),
        "started": stamp,
        "machine": machine(),
    }
    try:
        results[args.scenario] = module.run_from_args(args, _log)
    except (BenchError, RuntimeError, OSError) as exc:
        print(f"zerodown: benchmark {args.scenario} failed: {exc}", file=sys.stderr)
        return 1
    return _finish(results, out_dir, args)


def _finish(results: dict[str, Any], out_dir: Path, args: argparse.Namespace) -> int:
    from .report import markdown, write_results

    raw, md = write_results(out_dir, results)
    plots: list[Path] = []
    if "steady" in results and not args.no_plots:
        from .plots import plot_steady

        plots = plot_steady(out_dir, results["steady"])
    summary = markdown(results)
    print(summary)
    print(f"results: {raw}, {md}" + (f", {len(plots)} plots in {out_dir}" if plots else ""))
    if args.update_readme:
        from .readme import ReadmeError, update_readme

        try:
            update_readme(ROOT / "README.md", summary, results["command"])
            print(f"README.md updated ({ROOT / 'README.md'})")
        except (ReadmeError, OSError) as exc:
            print(f"zerodown: README.md not updated: {exc}", file=sys.stderr)
    return 0
