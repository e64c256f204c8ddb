"""The one worker-pool loop of the benchmarks and the fleet simulator.

``ClientPool``: C spawned client processes (never forked: the parent may hold a PKCS#11
session or TPM state) that each warm up, report "ready", wait for a common start, then
take work items from one shared index until the work runs out, and report "done" with
their records. The parent watches them (a dead client or server ends the run with
BenchError / ServerProcessError instead of a hang), shows progress, and stops every
client on the way out, also on Ctrl-C. Used by `bench est`, `bench attest` and the load
mode of `fleet`.

``map_processes``: one call per argument tuple in C spawned processes, results in input
order, progress as they finish (the fleet's devices).

Client side: ``Shared`` is what a client process gets; ``Shared.take(count)`` yields the
next work index until ``count`` is reached and counts each finished item.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing as mp
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .bench_report import Progress, no_progress, progress_bar, signals_held

Check = Callable[[], None]  # raises when something the run depends on died


class BenchError(RuntimeError):
    """The benchmark could not run (server failed to start, a client process died)."""


@dataclass
class Shared:
    """The synchronisation objects a client process receives (picklable for spawn)."""

    next_index: Any
    done: Any
    start: Any
    results: Any
    started_at: Any  # the parent's time.monotonic() at start (system-wide on Linux)

    def take(self, count: int) -> Iterator[int]:
        """Indices 0..count-1, each handed to exactly one client of the pool."""
        while True:
            with self.next_index.get_lock():
                index = self.next_index.value
                if index >= count:
                    return
                self.next_index.value = index + 1
            yield index
            with self.done.get_lock():
                self.done.value += 1

    def ready(self, payload: Any = None) -> None:
        self.results.put(("ready", payload))

    def wait_start(self) -> float:
        """Block until the parent starts the measured phase; returns its start time."""
        self.start.wait()
        return self.started_at.value

    def finished(self, payload: Any) -> None:
        self.results.put(("done", payload))


class ClientPool:
    def __init__(self) -> None:
        self.context = mp.get_context("spawn")
        self.shared = Shared(self.context.Value("i", 0), self.context.Value("i", 0),
                             self.context.Event(), self.context.Queue(),
                             self.context.Value("d", 0.0))
        self.workers: list[mp.process.BaseProcess] = []

    def spawn(self, target: Callable[..., None], *args: Any) -> None:
        """One client process running ``target(*args, shared)``."""
        worker = self.context.Process(target=target, args=(*args, self.shared), daemon=True)
        worker.start()
        self.workers.append(worker)

    def check_clients(self) -> None:
        for worker in self.workers:
            if worker.exitcode not in (None, 0):
                raise BenchError(f"client process exited with {worker.exitcode}")

    def _next(self, check: Check, deadline: float) -> tuple[str, Any]:
        while time.monotonic() < deadline:
            try:
                return self.shared.results.get(timeout=0.25)
            except queue.Empty:
                self.check_clients()
                check()
        raise BenchError("no answer from the client processes in time")

    def wait_ready(self, check: Check = lambda: None, timeout: float = 300.0) -> list[Any]:
        """Wait for every client's "ready" (the end of its warm-up); their payloads."""
        deadline = time.monotonic() + timeout
        payloads = []
        while len(payloads) < len(self.workers):
            kind, payload = self._next(check, deadline)
            if kind == "ready":
                payloads.append(payload)
        return payloads

    def go(self) -> float:
        """Start the measured phase; returns its start (time.monotonic())."""
        self.shared.started_at.value = started = time.monotonic()
        self.shared.start.set()
        return started

    def collect(self, total: int, label: str, progress: Progress = no_progress,
                check: Check = lambda: None, timeout: float = 3600.0,
                tick: float = 0.5) -> list[Any]:
        """Every client's "done" payload; progress shows items done of ``total``."""
        started = self.shared.started_at.value or time.monotonic()
        deadline = time.monotonic() + timeout
        reports: list[Any] = []
        next_tick = 0.0
        while len(reports) < len(self.workers):
            try:
                kind, payload = self.shared.results.get(timeout=0.25)
            except queue.Empty:
                self.check_clients()
                check()
                if time.monotonic() > deadline:
                    raise BenchError("the client processes did not finish in time") from None
            else:
                if kind == "done":
                    reports.append(payload)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + tick
                count = self.shared.done.value
                rate = count / max(time.monotonic() - started, 1e-9)
                progress(f"{label} {progress_bar(count, total)}  {rate:.1f}/s", False)
        for worker in self.workers:
            worker.join(10)
        return reports

    def close(self) -> None:
        """Stop every client (terminate, then kill); a second Ctrl-C waits for it."""
        with signals_held():
            for worker in self.workers:
                if worker.is_alive():
                    worker.terminate()
                worker.join(5)
                if worker.is_alive():
                    worker.kill()
                    worker.join(5)


def map_processes(function: Callable[..., Any], arguments: Sequence[tuple[Any, ...]],
                  concurrency: int, on_result: Callable[[Any, int], None] | None = None,
                  ) -> list[Any]:  # fmt: skip
    """``function(*args)`` for each tuple in ``concurrency`` spawned processes; results
    in input order; ``on_result(result, finished_count)`` as each one finishes."""
    results: list[Any] = [None] * len(arguments)
    if not arguments:
        return results
    context = mp.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(concurrency, mp_context=context) as pool:
        futures = {pool.submit(function, *args): number
                   for number, args in enumerate(arguments)}
        for finished, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            results[futures[future]] = future.result()
            if on_result is not None:
                on_result(results[futures[future]], finished)
    return results
