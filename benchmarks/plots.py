"""PNG plots of the open-loop runs: latency percentiles and throughput per second, switches marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import LABELS


def _pyplot():  # imported lazily: matplotlib is slow to import and only needed here
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mark_switches(ax: Any, switches: list[dict[str, Any]]) -> None:
    for i, sw in enumerate(switches):
        ax.axvline(sw["at"], color="grey", linestyle="--", linewidth=0.8,
                   label="switch" if i == 0 else None)  # fmt: skip


def _ms(values: list[float | None]) -> list[float]:
    # Seconds without any started request have no latency: a gap in the line, not a zero.
    return [float("nan") if v is None else max(v, 1e-3) for v in values]


def plot_steady(out_dir: Path, steady: dict[str, Any]) -> list[Path]:
    """Per rate and proxy: throughput (top) and p50/p95/p99 (bottom); per rate: p99 compared."""
    plt = _pyplot()
    paths = []
    for rate, per_proxy in steady.items():
        for name, r in per_proxy.items():
            s = r["series"]
            fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
            top.plot(s["second"], s["throughput"], label="responses/s")
            if any(s["failures"]) or any(s["dropped"]):
                top.plot(s["second"], s["failures"], label="failures/s", color="red")
                top.plot(s["second"], s["dropped"], label="dropped/s", color="orange")
            top.axhline(float(rate), color="green", linewidth=0.6, label="target")
            # Headroom above the target: a line at exactly the target would hide in the frame.
            top.set_ylim(0, max([float(rate), *s["throughput"]]) * 1.15)
            top.set_ylabel("per second")
            top.set_title(f"{LABELS.get(name, name)} at {int(rate):,} requests/s")
            _mark_switches(top, r["switches"])
            top.legend(loc="lower right")
            for key in ("p50_ms", "p95_ms", "p99_ms"):
                bottom.plot(s["second"], _ms(s[key]), label=key[:-3])
            bottom.set_yscale("log")
            bottom.set_ylabel("latency ms (log)")
            bottom.set_xlabel("seconds")
            _mark_switches(bottom, r["switches"])
            bottom.legend(loc="upper right")
            fig.tight_layout()
            path = out_dir / f"steady-{rate}-{name}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            paths.append(path)
        fig, ax = plt.subplots(figsize=(10, 4))
        for name, r in per_proxy.items():
            s = r["series"]
            ax.plot(s["second"], _ms(s["p99_ms"]), label=LABELS.get(name, name))
        first = next(iter(per_proxy.values()), None)
        if first:
            _mark_switches(ax, first["switches"])
        ax.set_yscale("log")
        ax.set_ylabel("p99 latency ms (log)")
        ax.set_xlabel("seconds")
        ax.set_title(f"p99 per second at {int(rate):,} requests/s")
        ax.legend(loc="upper right")
        fig.tight_layout()
        path = out_dir / f"steady-{rate}-p99.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
