"""Operator commands for revocation: revoke, readmit, crl.

    enroll-server revoke --device ID | --serial HEX | --group NAME [--reason R]
    enroll-server readmit ID
    enroll-server crl publish | show [--ca NAME]
"""

from __future__ import annotations

import json

import click

from ..errors import EnrollError
from ..revocation import REASONS
from .common import Context, fail, json_option, operator, pass_context


@click.command(epilog="""\b
Examples:
  enroll-server revoke --device 3f1c...e9 --reason keyCompromise
  enroll-server revoke --serial 4A1F...C3 --reason superseded
  enroll-server revoke --group lab-2024 --reason cessationOfOperation --json
\b
The revocation is committed before this command returns: CRL, OCSP and the broker's
CRL follow at once, and a signed notice to the device goes out through the relay.""")
@click.option("--device", "device_id", help="Revoke the device and all its certificates.")
@click.option("--serial", help="Revoke one certificate (hex, as `certs list` shows it).")
@click.option("--group", "group_name", help="Revoke every device of an enrollment group.")
@click.option("--reason", default="unspecified", show_default=True,
              type=click.Choice(list(REASONS)), help="RFC 5280 5.3.1 CRLReason.")
@json_option
@pass_context
def revoke(ctx: Context, device_id: str | None, serial: str | None, group_name: str | None,
           reason: str, as_json: bool) -> None:
    """Revoke a device, a certificate or a whole group (RFC 5280 reason)."""
    from ..services import build_revocation

    if sum(v is not None for v in (device_id, serial, group_name)) != 1:
        raise click.UsageError("give exactly one of --device, --serial, --group")
    service = build_revocation(ctx.settings(), ctx.repository())
    try:
        result = service.revoke(actor=operator(), reason=reason, device_id=device_id,
                                serial=serial, group=group_name)
    except EnrollError as error:
        fail(error)
    if as_json:
        click.echo(json.dumps({"devices": result.devices,
                               "serials": [format(int(s), "x") for s in result.serials],
                               "already_revoked": result.already_revoked,
                               "crl_number": result.crl_number,
                               "crl_numbers": result.crl_numbers}))
        return
    click.echo(f"Revoked {len(result.serials)} certificate(s) of {len(result.devices)} "
               f"device(s), reason {reason}."
               + (f" {result.already_revoked} already revoked." if result.already_revoked
                  else ""))
    if result.crl_number is None:
        failed = ", ".join(n for n, number in result.crl_numbers.items() if number is None)
        click.echo(f"warning: the CRL of {failed} could not be rebuilt now (HSM or database "
                   "busy); the relay rebuilds it. OCSP already answers 'revoked'.", err=True)
    else:
        published = ", ".join(f"{name} number {number}"
                              for name, number in result.crl_numbers.items())
        click.echo(f"CRL published ({published}); notices queued for the relay.")


@click.command(epilog="\b\nExample:\n  enroll-server readmit 3f1c...e9")
@click.argument("device_id")
@pass_context
def readmit(ctx: Context, device_id: str) -> None:
    """Let a revoked device enroll again (its old certificates stay revoked)."""
    from ..services import build_revocation

    service = build_revocation(ctx.settings(), ctx.repository())
    try:
        service.readmit(device_id, operator())
    except EnrollError as error:
        fail(error)
    click.echo(f"Device {device_id} may enroll again; its revoked certificates stay revoked.")


@click.group()
def crl() -> None:
    """The certificate revocation lists of the issuing CAs (one per CA generation)."""


@crl.command("publish")
@pass_context
def crl_publish(ctx: Context) -> None:
    """Build and publish a new CRL of every live issuing CA now."""
    from ..services import build_revocation

    service = build_revocation(ctx.settings(), ctx.repository())
    numbers = service.republish_crls()
    failed = [name for name, number in numbers.items() if number is None]
    if failed:
        raise click.ClickException(f"the CRL of {', '.join(failed)} could not be built; "
                                   "see the log")
    for name, number in numbers.items():
        click.echo(f"Published CRL number {number} of {name}.")


@crl.command("show")
@click.option("--ca", "ca_name", help="Issuing CA generation (default: the active one; "
              "see `enroll-server ca list`).")
@json_option
@pass_context
def crl_show(ctx: Context, ca_name: str | None, as_json: bool) -> None:
    """The newest published CRL of an issuing CA."""
    repository = ctx.repository()
    name = ca_name or repository.read(repository.active_ca_name) or "issuing-ca"
    latest = repository.latest_crl(name)
    if latest is None:
        raise click.ClickException(f"no CRL of {name} published yet: enroll-server crl "
                                   "publish")
    info = {"ca": name, "crl_number": latest.crl_number, "entries": latest.entries,
            "this_update": latest.this_update, "next_update": latest.next_update,
            "bytes": len(bytes(latest.der))}
    if as_json:
        click.echo(json.dumps(info, default=str))
    else:
        for key, value in info.items():
            click.echo(f"{key:12} {value}")
