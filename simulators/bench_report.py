"""Helpers shared by the benchmarks (`enroll-sim bench est`, `enroll-sim bench attest`):
percentiles, the machine description, CPU seconds of processes from /proc, progress
callbacks and the signal guard for cleanup."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import cryptography

Progress = Callable[[str, bool], None]  # (text, final line?)


def no_progress(text: str, final: bool) -> None:
    pass


def progress_bar(done: int, total: int, width: int = 24) -> str:
    """[#########...............]  done/total"""
    filled = width * done // total if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    if not sorted_values:
        return float("nan")
    rank = max(1, int(-(-fraction * len(sorted_values) // 1)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "openssl": ssl.OPENSSL_VERSION,
            "cryptography": cryptography.__version__,
            # Other work on the machine skews every number: recorded, not corrected.
            "load_average_1min": round(os.getloadavg()[0], 2)}


# -- CPU from /proc --------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    return text[text.rindex(")") + 2:].split()  # fields from "state" on (proc(5))


def children_of(root_pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat_fields(int(entry))[1]) == root_pid:
                    children.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile
    return children


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of the given processes (an exited one counts 0)."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


def process_tree_cpu_seconds(root_pid: int) -> float:
    """utime + stime of root_pid and its direct children (gunicorn master + workers)."""
    return cpu_seconds([root_pid, *children_of(root_pid)])


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Cleanup runs to the end: a second Ctrl-C or SIGTERM waits until it is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
