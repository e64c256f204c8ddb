"""What every operator command shares: output (human tables by default, `--json` for
scripts), the operator's name for the audit log, error reporting, option parsing."""

from __future__ import annotations

import datetime as dt
import getpass
import json
import re
from pathlib import Path
from typing import Any

import click
from cryptography import x509

from ..errors import EnrollError
from .root import Context

pass_context = click.make_pass_decorator(Context)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def operator() -> str:
    try:
        return "operator:" + getpass.getuser()
    except (KeyError, OSError):
        return "operator:unknown"


def render(rows: list[dict[str, Any]], as_json: bool, columns: list[str] | None = None,
           empty: str = "(none)") -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo(empty)
        return
    columns = columns or list(rows[0])
    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def cell(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%SZ")
    return "-" if value in (None, "") else str(value)


def parse_duration(text: str) -> dt.timedelta:
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match:
        raise click.BadParameter("use a number with s, m, h or d, e.g. 30m or 7d")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
    return dt.timedelta(**{unit: int(match.group(1))})


def read_pem_bundle(path: Path | None, option: str) -> str:
    if path is None:
        return ""
    text = path.read_text()
    try:
        x509.load_pem_x509_certificates(text.encode())
    except ValueError:
        raise click.BadParameter("not a PEM certificate bundle", param_hint=option) from None
    return text


def fail(error: EnrollError) -> None:
    raise click.ClickException(f"{error.public} [{error.code}]")


def group_or_fail(repository, name: str):  # -> EnrollmentGroup
    """The enrollment group, or a clear error naming the code (`group list` shows them)."""
    try:
        return repository.group(name)
    except EnrollError as error:
        fail(error)
