"""Write the latest benchmark summary into README.md between `<!-- bench:start -->` and `<!-- bench:end -->`."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"


class ReadmeError(ValueError):
    """README.md cannot be updated; the message says why."""


def render_block(summary_md: str, command: str, when: datetime | None = None) -> str:
    when = when or datetime.now(UTC)
    cpu = platform.processor() or platform.machine()
    return (
        f"{START}\n"
        f"_Measured {when:%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores ({cpu}, "
        f"{platform.system()} {platform.release()}); command: `{command}`._\n\n"
        f"{summary_md.strip()}\n{END}"
    )


def update_readme(path: Path, summary_md: str, command: str, when: datetime | None = None) -> None:
    """Replace the text between the markers; the rest of README.md is untouched."""
    text = path.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ReadmeError(f"{path} has no {START} ... {END} section; add the two markers first")
    new = text[:start] + render_block(summary_md, command, when) + text[end + len(END) :]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
