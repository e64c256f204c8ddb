"""`enroll-server group`: who may enroll, how, and what certificate they get.

The TPM settings of a group (allow-ek, set-pcrs, set-ek-crls) are in cli/tpm.py, its
trusted vendors of the built-in store (set-ek-vendors) in cli/vendors.py.
"""

from __future__ import annotations

from pathlib import Path

import click
from cryptography import x509

from ..ca.profiles import GROUP_NAME_PATTERN, KEY_TYPES
from ..errors import EnrollError
from .common import (
    Context,
    fail,
    json_option,
    operator,
    parse_duration,
    pass_context,
    read_pem_bundle,
    render,
)
from .vendors import read_ek_roots, vendor_list


@click.group(epilog="""\b
Examples:
  enroll-server group create factory-a --auth bootstrap --bootstrap-ca idevid-ca.pem
  enroll-server group create lab --lifetime-days 30 --key-types ec-p256 --approval
  enroll-server group create fleet --auth tpm --ek-vendors infineon,stmicro,nuvoton
  enroll-server group create lab --auth tpm --ek-roots tpm-vendor-roots.pem
  enroll-server group allow-ek fleet --ek-cert ek.der
  enroll-server group set-pcrs fleet --pcrread reference-pcrs.yaml
  enroll-server group set-grace fleet 15m
  enroll-server group list --json
""")
def group() -> None:
    """Enrollment groups: who may enroll, how, and what certificate they get."""


@group.command("create")
@click.argument("name")
@click.option("--auth", default="token", show_default=True,
              help="Accepted credentials, comma separated: token, bootstrap, tpm.")
@click.option("--lifetime-days", default=365, show_default=True, type=click.IntRange(1, 3650))
@click.option("--key-types", default="ec-p256,ec-p384", show_default=True,
              help=f"Allowed device key types: {', '.join(KEY_TYPES)}.")
@click.option("--min-rsa-bits", default=2048, show_default=True, type=click.IntRange(2048))
@click.option("--bootstrap-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="PEM bundle of factory (IDevID) CAs trusted for bootstrap enrollment.")
@click.option("--approval", is_flag=True, help="Hold every enrollment for operator approval.")
@click.option("--ek-roots", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="PEM bundle of TPM manufacturer roots (and intermediates) trusted for "
                   "EK certificates (--auth tpm).")
@click.option("--ek-vendors", default="",
              help="TPM vendors of the built-in trust store, comma separated, e.g. "
                   "infineon,stmicro (`enroll-server ek-vendors list`).")
@click.option("--ek-policy", type=click.Choice(["manufacturer", "allowlist"]),
              default="manufacturer", show_default=True,
              help="Any genuine TPM of those manufacturers, or only allowlisted EKs.")
@click.option("--supersede-grace", default="1h", show_default=True,
              help="How long a renewed device's previous certificate stays valid before it "
                   "is revoked (reason superseded); 0s revokes it at once.")
@pass_context
def group_create(ctx: Context, name: str, auth: str, lifetime_days: int, key_types: str,
                 min_rsa_bits: int, bootstrap_ca: Path | None, approval: bool,
                 ek_roots: Path | None, ek_vendors: str, ek_policy: str,
                 supersede_grace: str) -> None:
    """Create an enrollment group (its name is the EST label)."""
    vendors = vendor_list(ek_vendors)
    if not GROUP_NAME_PATTERN.fullmatch(name):
        raise click.BadParameter("lower-case letters, digits, '-' and '_' (max 64)",
                                 param_hint="NAME")
    methods = [m.strip() for m in auth.split(",") if m.strip()]
    if not methods or set(methods) - {"token", "bootstrap", "tpm"}:
        raise click.BadParameter("choose from token, bootstrap, tpm", param_hint="--auth")
    types = [t.strip() for t in key_types.split(",") if t.strip()]
    if not types or set(types) - set(KEY_TYPES):
        raise click.BadParameter(f"choose from {', '.join(KEY_TYPES)}",
                                 param_hint="--key-types")
    grace = _grace(supersede_grace, "--supersede-grace")
    bundle = read_pem_bundle(bootstrap_ca, "--bootstrap-ca")
    ek_bundle = read_ek_roots(ek_roots)
    if "tpm" in methods and not (ek_bundle or vendors) and ek_policy == "manufacturer":
        raise click.BadParameter("TPM attestation needs --ek-vendors or --ek-roots (or "
                                 "--ek-policy allowlist)", param_hint="--auth")
    if "bootstrap" in methods and not bundle:
        raise click.BadParameter("bootstrap authentication needs --bootstrap-ca",
                                 param_hint="--auth")
    repository = ctx.repository()
    try:
        repository.create_group(name, auth_methods=",".join(methods),
                                lifetime_days=lifetime_days, key_types=",".join(types),
                                min_rsa_bits=min_rsa_bits, requires_approval=approval,
                                bootstrap_ca_pem=bundle, ek_roots_pem=ek_bundle,
                                ek_vendors=",".join(vendors), ek_policy=ek_policy,
                                supersede_grace_seconds=grace)
    except EnrollError as error:
        fail(error)
    repository.audit(actor=operator(), action="group.create", outcome="success", group=name,
                     detail={"auth": methods, "key_types": types, "approval": approval})
    click.echo(f"Created enrollment group {name!r}.")
    if bundle:
        click.echo("Restart (or SIGHUP) the server so TLS trusts the new bootstrap CA.")


@group.command("list")
@json_option
@pass_context
def group_list(ctx: Context, as_json: bool) -> None:
    """List enrollment groups."""
    rows = [{"name": g.name, "auth": g.auth_methods, "lifetime_days": g.lifetime_days,
             "key_types": g.key_types, "approval": g.requires_approval,
             "supersede_grace_seconds": g.supersede_grace_seconds,
             "bootstrap_cas": len(x509.load_pem_x509_certificates(
                 g.bootstrap_ca_pem.encode())) if g.bootstrap_ca_pem.strip() else 0}
            for g in ctx.repository().groups()]
    render(rows, as_json)


@group.command("set-grace", epilog="""\b
Examples:
  enroll-server group set-grace fleet 15m
  enroll-server group set-grace lab 0s      # renewals revoke the old certificate at once
""")
@click.argument("name")
@click.argument("grace")
@pass_context
def group_set_grace(ctx: Context, name: str, grace: str) -> None:
    """How long a renewed device's previous certificate stays valid (reason superseded
    after that; OCSP and the CRL show it). Applies to renewals from now on."""
    seconds = _grace(grace, "GRACE")
    repository = ctx.repository()
    try:
        repository.change_group(name, supersede_grace_seconds=seconds)
    except EnrollError as error:
        fail(error)
    repository.audit(actor=operator(), action="group.set_grace", outcome="success",
                     group=name, detail={"supersede_grace_seconds": seconds})
    when = f"{seconds} s after its renewal" if seconds else "by its renewal, at once"
    click.echo(f"Group {name!r}: a renewed certificate is revoked (superseded) {when}.")


def _grace(text: str, hint: str) -> int:
    seconds = int(parse_duration(text).total_seconds())
    if seconds > 30 * 86400:
        raise click.BadParameter("at most 30d", param_hint=hint)
    return seconds
