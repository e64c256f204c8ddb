"""The picture of a load run (`enroll-sim fleet --rate ... --plot FILE.png|.svg`):
latency percentiles over time above, enrollments and errors per second below.

matplotlib is an optional dependency (`pip install 'tpm-enroll[plot]'`); it is imported
only here, with the Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot_load(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'tpm-enroll[plot]'"
                              ) from error
    windows = report["windows"]
    options, machine = report["options"], report["machine"]
    middle = [w["t"] + w["width"] / 2 for w in windows]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True,
                                         height_ratios=(3, 2))
    for key, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
        values = [w["latency_ms"][key] for w in windows]
        points = [(x, y) for x, y in zip(middle, values, strict=True) if y is not None]
        if points:
            top.plot(*zip(*points, strict=True), style, marker="o", markersize=3,
                     label=f"latency {key}")
    top.set_ylabel("ms from the due time")
    top.set_ylim(bottom=0)
    top.grid(alpha=0.3)
    top.legend(loc="upper left")
    width = windows[0]["width"] if windows else 1.0
    ok = [w["succeeded"] / w["width"] for w in windows]
    failed = [w["failed"] / w["width"] for w in windows]
    starts = [w["t"] for w in windows]
    bottom.bar(starts, ok, width=width * 0.9, align="edge", color="tab:green", alpha=0.45,
               label="started and enrolled / s (by due time)")
    bottom.bar(starts, failed, width=width * 0.9, align="edge", bottom=ok, color="tab:red",
               label="errors / s (by due time)")
    finished = [w["finished_per_second"] for w in windows]
    bottom.plot(middle, finished, "-", color="tab:blue", marker="o", markersize=3,
                label="completed / s (by finish time)")
    bottom.plot([options["ramp"], options["duration"]], [options["rate"]] * 2, "k--",
                linewidth=1, label=f"target {options['rate']:g}/s")
    if options["ramp"]:
        bottom.plot([0, options["ramp"]], [0, options["rate"]], "k--", linewidth=1)
    bottom.set_ylabel("enrollments per second")
    bottom.set_ylim(0, max([options["rate"], *finished, *ok]) * 1.3)
    bottom.set_xlabel("seconds since the start")
    bottom.grid(alpha=0.3)
    bottom.legend(loc="upper left")
    errors = report["enrollments"]["errors_by_code"]
    figure.suptitle(
        f"Attested first-boot enrollments at {options['rate']:g}/s for "
        f"{options['duration']:g} s ({options['concurrency']} swtpm workers)\n"
        f"{machine['cpus']} CPUs, load {machine['load_average_1min']} at start; "
        f"errors: {', '.join(f'{k} x{v}' for k, v in errors.items()) or 'none'}",
        fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
