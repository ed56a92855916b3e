"""`zerodown status` for people: the table (colours on a TTY, terminal.py), and `--watch`:
look every interval, redraw only when something changed.

On a TTY the screen is cleared and redrawn, headed by the time of the last change; elsewhere
each change is appended as a new block after a `--- <time>` line, so a log of it reads in order.
A status that cannot be read (an agent down) is shown as such and watching goes on. Ctrl-C
ends it (exit code 0, cli.py).
"""

from __future__ import annotations

import asyncio
import sys
import time

from .backend import AppStatus, Backend, Refused
from .terminal import Style, colour_wanted
from .verify import parse_duration

DEFAULT_INTERVAL = 2.0
MIN_INTERVAL, MAX_INTERVAL = 0.2, 60.0


def status_lines(st: AppStatus, style: Style | None = None) -> list[str]:
    c = style or Style(False)
    out = [f"app {c('bold', st.app)}  backend {st.backend}  generation {st.generation}"]
    for role, g in (("Active", st.active), ("Standby", st.standby)):
        whole = bool(g.instances) and g.healthy == len(g.instances)
        out.append(f"  {c('bold', f'{role:<8}')} {g.group or '-':<8} version "
                   f"{c('cyan', f'{g.version or chr(45):<10}')} "
                   f"{c.health(f'{g.healthy}/{len(g.instances)} healthy', whole)}")  # fmt: skip
        for i in g.instances:
            ok = i.registered == "passing" and i.probe == "ok"
            out.append(f"    {i.id:<22} {i.address}:{i.http_port:<6} {i.version:<8} "
                       f"{c.health(f'registered={i.registered:<8} probe={i.probe}', ok)}")  # fmt: skip
    pilots = (st.pilots or {}).get("tools") or []
    if pilots:
        out.append(f"  pilots on {(st.pilots or {}).get('group')}: {', '.join(pilots)}")
    sync = c("green", "in sync") if st.in_sync else c("red", "NOT in sync")
    out.append(f"  proxies ({len(st.proxies)}, {sync}):")
    for p in st.proxies:
        gen = p.generation if p.generation is not None else "?"
        extra = f"  ({p.error})" if p.error else ""
        line = f"{p.name:<22} {p.admin:<22} generation {gen}{extra}"
        out.append(f"    {line if p.in_sync else c('yellow', line)}")
        for t in p.tools:
            if t.app == st.app:  # which tool is on this app, and on which group
                role = "  pilot" if t.pilot else ""
                out.append(f"      tool {t.tool:<22} {t.group or '-':<8} {t.version or '-'}{role}")
    return out


def print_status(st: AppStatus) -> None:
    print("\n".join(status_lines(st, Style(colour_wanted(sys.stdout)))))


def interval_from(text: str | None) -> float:
    seconds = DEFAULT_INTERVAL if text is None else parse_duration(text, "--interval")
    if not MIN_INTERVAL <= seconds <= MAX_INTERVAL:
        raise Refused(f"--interval must be between {MIN_INTERVAL:g}s and {MAX_INTERVAL:g}s, "
                      f"got {seconds:g}s")  # fmt: skip
    return seconds


async def watch(
    backend: Backend,
    app: str,
    interval: str | None,
) -> int:
    every = interval_from(interval)
    tty = sys.stdout.isatty()
    style = Style(colour_wanted(sys.stdout))
    shown: list[str] | None = None
    while True:
        try:
            lines = status_lines(await backend.status(app), style)
        except Refused as exc:
            lines = [style("red", f"status unavailable: {exc}")]
        if lines != shown:
            stamp = time.strftime("%H:%M:%S")
            if tty:
                head = style("dim", f"zerodown status --watch  every {every:g}s  last change "
                                    f"{stamp}  (Ctrl-C to quit)")  # fmt: skip
                sys.stdout.write("\x1b[H\x1b[2J" + head + "\n" + "\n".join(lines) + "\n")
            else:
                sys.stdout.write(f"--- {stamp}\n" + "\n".join(lines) + "\n")
            sys.stdout.flush()
            shown = lines
        await asyncio.sleep(every)
