"""What the CLI does differently on a terminal: colours (off when the stream is not a TTY, when
NO_COLOR is set — https://no-color.org — or TERM=dumb), and progress of long waits as one
updating line with the elapsed time (plain lines elsewhere, so logs and pipes read the same)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from typing import TextIO


def colour_wanted(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Style:
    """ANSI styles, or the text unchanged when colours are off."""

    _CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, style: str, text: str) -> str:
        if not self.enabled:
            return text
        return f"\x1b[{self._CODES[style]}m{text}\x1b[0m"

    def health(self, text: str, good: bool) -> str:
        return self(("green" if good else "red"), text)


class LiveProgress:
    """`progress(msg)` for the backends. On a TTY: each step is kept as a line prefixed with the
    time since the command began, and the current one is redrawn in place every `tick` seconds
    with its running time, so a long wait visibly moves. Elsewhere: one plain line per step."""

    def __init__(self, stream: TextIO = sys.stderr, tick: float = 0.2) -> None:
        self.stream = stream
        self.tick_s = tick
        try:
            self.tty = stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.style = Style(colour_wanted(stream))
        self.start = time.monotonic()
        self.current: str | None = None
        self.since = self.start

    def __call__(self, msg: str) -> None:
        if not self.tty:
            print(msg, file=self.stream, flush=True)
            return
        self._commit()
        self.current, self.since = msg, time.monotonic()
        self._draw()

    def _stamp(self, at: float) -> str:
        return self.style("dim", f"[{at - self.start:6.1f}s]")

    def _draw(self) -> None:
        if self.current is None:
            return
        now = time.monotonic()
        width = shutil.get_terminal_size((100, 24)).columns
        waiting = f" ... {now - self.since:.1f}s" if now - self.since >= 1 else ""
        text = f"{self.current}{waiting}"
        room = max(10, width - 10)
        if len(text) > room:
            text = text[: room - 1] + "…"
        self.stream.write(f"\r\x1b[K{self._stamp(self.since)} {text}")
        self.stream.flush()

    def _commit(self) -> None:
        """The current step becomes a finished line."""
        if self.current is not None:
            self.stream.write(f"\r\x1b[K{self._stamp(self.since)} {self.current}\n")
            self.stream.flush()
            self.current = None

    async def run_ticker(self) -> None:
        """Redraw the current step until cancelled (only useful on a TTY)."""
        while True:
            await asyncio.sleep(self.tick_s)
            self._draw()

    def close(self) -> None:
        if self.tty:
            self._commit()
