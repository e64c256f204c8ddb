"""What every `enroll-sim` command shares: the progress line on stderr and the option
blocks that recur (report format, server layout, keeping the work directory)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from .bench_report import Progress

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def progress_printer(quiet: bool) -> Progress:
    """Progress on stderr: one rewritten line on a terminal, final lines only otherwise."""
    tty = sys.stderr.isatty()

    def progress(text: str, final: bool) -> None:
        if quiet:
            return
        if tty:
            click.echo(f"\r\x1b[K  {text}", err=True, nl=final)
        elif final:
            click.echo(f"  {text}", err=True)

    return progress


def _stack(*decorators: Decorator) -> Decorator:
    def apply(function: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


def report_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """--json and --quiet (``as_json``, ``quiet``)."""
    return _stack(
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
        click.option("--quiet", "-q", is_flag=True, help="No progress on stderr."),
    )(function)


def server_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """--workers and --threads of the private instance's gunicorn, and --keep."""
    return _stack(
        click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1),
                     help="gunicorn worker processes."),
        click.option("--threads", default=8, show_default=True, type=click.IntRange(min=1),
                     help="gunicorn threads per worker."),
        keep_option,
    )(function)


keep_option = click.option("--keep", is_flag=True,
                           help="Keep the work directory (instance, logs, TPM states).")


def count(number: int, noun: str) -> str:
    plural = noun + ("es" if noun.endswith("s") else "s")
    return f"{number} {noun if number == 1 else plural}"


def mark(met: bool) -> str:
    return "ok" if met else "MISSED"
