"""`enroll-server token`: one-time enrollment tokens (HTTP Bearer for simpleenroll)."""

from __future__ import annotations

import json

import click

from ..ca.profiles import is_topic_safe
from .common import (
    Context,
    cell,
    group_or_fail,
    json_option,
    operator,
    parse_duration,
    pass_context,
)


@click.group(epilog="""\b
Examples:
  enroll-server token create --group default
  enroll-server token create --group default --device sensor-0042 --ttl 2h --json
""")
def token() -> None:
    """One-time enrollment tokens (HTTP Bearer for EST simpleenroll)."""


@token.command("create")
@click.option("--group", "group_name", default="default", show_default=True)
@click.option("--device", "device_id", help="Bind the token to this device id.")
@click.option("--ttl", default="24h", show_default=True, help="Lifetime, e.g. 30m, 24h, 7d.")
@json_option
@pass_context
def token_create(ctx: Context, group_name: str, device_id: str | None, ttl: str,
                 as_json: bool) -> None:
    """Create a single-use token; it is shown once and stored only as a hash."""
    lifetime = parse_duration(ttl)
    if device_id is not None and not is_topic_safe(device_id):
        raise click.BadParameter("1-64 characters of A-Z a-z 0-9 . _ -",
                                 param_hint="--device")
    repository = ctx.repository()
    group_row = group_or_fail(repository, group_name)
    secret, row = repository.create_token(group_row, lifetime, operator(), device_id)
    repository.audit(actor=operator(), action="token.create", outcome="success",
                     group=group_name, device_id=device_id,
                     detail={"token_id": row.id, "expires_at": row.expires_at})
    if as_json:
        click.echo(json.dumps({"token": secret, "group": group_name, "device_id": device_id,
                               "expires_at": row.expires_at.isoformat() + "Z"}))
    else:
        click.echo(secret)
        click.echo(f"(single use, group {group_name}, expires {cell(row.expires_at)})",
                   err=True)
