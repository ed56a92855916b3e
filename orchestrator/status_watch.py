"""`zerodown status --watch`: look every interval, redraw only when something changed.

On a TTY the screen is cleared and redrawn, headed by the time of the last change; elsewhere
each change is appended as a new block after a `--- <time>` line, so a log of it reads in order.
A status that cannot be read (an agent down) is shown as such and watching goes on. Ctrl-C
ends it (exit code 0, cli.py).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable

from .backend import AppStatus, Backend, Refused
from .terminal import Style, colour_wanted
from .verify import parse_duration

DEFAULT_INTERVAL = 2.0
MIN_INTERVAL, MAX_INTERVAL = 0.2, 60.0


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
    render: Callable[[AppStatus, Style], list[str]],
) -> int:
    every = interval_from(interval)
    tty = sys.stdout.isatty()
    style = Style(colour_wanted(sys.stdout))
    shown: list[str] | None = None
    while True:
        try:
            lines = render(await backend.status(app), style)
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
