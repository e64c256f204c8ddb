"""Operator commands for the built-in TPM vendor trust store (cli/__init__.py adds
`ek-vendors` to the root and `set-ek-vendors` to the `group` command group).

    enroll-server ek-vendors list [--vendor NAME] [--json]
    enroll-server group set-ek-vendors GROUP VENDORS | --clear
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import click

from .. import ek_vendors
from ..attestation.ek_cert import CertificateProblem, load_pem_certificates
from ..errors import EnrollError
from .common import Context, fail, group_or_fail, json_option, operator, pass_context, render


def vendor_list(text: str) -> list[str]:
    """--ek-vendors "infineon,stmicro" -> names, or a usage error naming the known ones."""
    try:
        return ek_vendors.parse_vendor_list(text or "")
    except ValueError as error:
        raise click.BadParameter(f"{error} (see `enroll-server ek-vendors list`)",
                                 param_hint="--ek-vendors") from None


def read_ek_roots(path: Path | None) -> str:
    """--ek-roots: a PEM bundle read the way vendors ship certificates (docs/tpm-vendors.md)."""
    if path is None:
        return ""
    text = path.read_text(errors="replace")
    try:
        certificates = load_pem_certificates(text)
    except CertificateProblem as error:
        raise click.BadParameter(f"not a PEM certificate bundle: {error}",
                                 param_hint="--ek-roots") from None
    if not certificates:
        raise click.BadParameter("no -----BEGIN CERTIFICATE----- block in the file",
                                 param_hint="--ek-roots")
    return text


def _rows(vendor: str | None, now: dt.datetime) -> list[dict[str, object]]:
    rows = []
    for entry in ek_vendors.store():
        if vendor and entry.vendor != vendor:
            continue
        certificate = entry.certificate
        days = (certificate.not_valid_after_utc - now).days
        rows.append({
            "vendor": entry.vendor, "role": entry.role, "subject": certificate.subject_text,
            "not_after": certificate.not_valid_after_utc,
            "expires": "expired" if days < 0 else f"in {days // 365}y" if days > 730
            else f"in {days}d",
            "sha256": entry.sha256, "published": entry.published,
            "copied_from": entry.copied_from,
        })  # fmt: skip
    return rows


@click.group("ek-vendors", epilog="""\b
Examples:
  enroll-server ek-vendors list
  enroll-server ek-vendors list --vendor nuvoton --json
  enroll-server group create fleet --auth tpm --ek-vendors infineon,stmicro
""")
def ek_vendors_group() -> None:
    """The TPM manufacturer EK CA certificates shipped with the server."""


@ek_vendors_group.command("list")
@click.option("--vendor", help="Only this vendor.")
@json_option
def ek_vendors_list(vendor: str | None, as_json: bool) -> None:
    """Every shipped EK root and intermediate, when it expires and where it comes from."""
    if vendor and vendor not in ek_vendors.vendor_names():
        raise click.BadParameter(f"known vendors: {', '.join(ek_vendors.vendor_names())}",
                                 param_hint="--vendor")
    rows = _rows(vendor, dt.datetime.now(dt.UTC))
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    table = [{**row, "subject": str(row["subject"])[:64], "sha256": str(row["sha256"])[:16]}
             for row in rows]
    render(table, False, ["vendor", "role", "subject", "not_after", "expires", "sha256"])
    click.echo(f"\n{len(rows)} certificates from {len({r['vendor'] for r in rows})} vendors. "
               "Trust them with `group create NAME --auth tpm --ek-vendors VENDOR,...`.")


@click.command("set-ek-vendors", epilog="""\b
Examples:
  enroll-server group set-ek-vendors fleet infineon,stmicro,nuvoton
  enroll-server group set-ek-vendors fleet --clear
""")
@click.argument("group_name")
@click.argument("vendors", required=False, default="")
@click.option("--clear", is_flag=True, help="Trust no vendor of the built-in store.")
@pass_context
def group_set_ek_vendors(ctx: Context, group_name: str, vendors: str, clear: bool) -> None:
    """Which TPM vendors of the built-in store the group trusts for EK certificates."""
    if clear == bool(vendors.strip()):
        raise click.UsageError("give VENDORS (comma separated) or --clear")
    names = [] if clear else vendor_list(vendors)
    repository = ctx.repository()
    group_row = group_or_fail(repository, group_name)
    try:
        repository.change_group(group_name, ek_vendors=",".join(names))
    except EnrollError as error:
        fail(error)
    repository.audit(actor=operator(), action="group.set_ek_vendors", outcome="success",
                     group=group_name, detail={"vendors": names,
                                               "before": group_row.ek_vendors})
    if names:
        click.echo(f"Group {group_name!r} trusts EK certificates of: {', '.join(names)}.")
    else:
        click.echo(f"Group {group_name!r} trusts no vendor of the built-in store now.")
        if not group_row.ek_roots_pem.strip() and group_row.ek_policy == "manufacturer":
            click.echo("Warning: it has no --ek-roots either, so no TPM can enroll in it.",
                       err=True)
