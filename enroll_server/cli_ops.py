"""Operator commands: enrollment groups, tokens, devices, certificates, audit.

Human tables by default, `--json` for scripts. Every change is an audit event.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import re
from pathlib import Path
from typing import Any

import click
from cryptography import x509

from .ca.profiles import GROUP_NAME_PATTERN, KEY_TYPES, is_topic_safe
from .cli import Context, main
from .errors import EnrollError

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
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
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


# -- enrollment groups ------------------------------------------------------------------
@main.group(epilog="""\b
Examples:
  enroll-server group create factory-a --auth bootstrap --bootstrap-ca idevid-ca.pem
  enroll-server group create lab --lifetime-days 30 --key-types ec-p256 --approval
  enroll-server group create fleet --auth tpm --ek-vendors infineon,stmicro,nuvoton
  enroll-server group create lab --auth tpm --ek-roots tpm-vendor-roots.pem
  enroll-server group allow-ek fleet --ek-cert ek.der
  enroll-server group set-pcrs fleet --pcrread reference-pcrs.yaml
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
@pass_context
def group_create(ctx: Context, name: str, auth: str, lifetime_days: int, key_types: str,
                 min_rsa_bits: int, bootstrap_ca: Path | None, approval: bool,
                 ek_roots: Path | None, ek_vendors: str, ek_policy: str) -> None:
    """Create an enrollment group (its name is the EST label)."""
    from .cli_vendors import read_ek_roots, vendor_list

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
                                ek_vendors=",".join(vendors), ek_policy=ek_policy)
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
             "bootstrap_cas": len(x509.load_pem_x509_certificates(
                 g.bootstrap_ca_pem.encode())) if g.bootstrap_ca_pem.strip() else 0}
            for g in ctx.repository().groups()]
    render(rows, as_json)


# -- enrollment tokens ------------------------------------------------------------------
@main.group(epilog="""\b
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
        click.echo(f"(single use, group {group_name}, expires {_cell(row.expires_at)})",
                   err=True)


# -- certificates and devices -----------------------------------------------------------
@main.group()
def certs() -> None:
    """Issued certificates."""


@certs.command("list", epilog="\b\nExample:\n  enroll-server certs list --status active --json")
@click.option("--device", "device_id")
@click.option("--status", type=click.Choice(["active", "superseded", "revoked"]))
@click.option("--limit", default=1000, show_default=True)
@json_option
@pass_context
def certs_list(ctx: Context, device_id: str | None, status: str | None, limit: int,
               as_json: bool) -> None:
    """List issued certificates, newest first."""
    rows = [{"serial": format(int(c.serial), "x"), "device": c.device.device_id,
             "status": c.status, "via": c.issued_via, "not_after": c.not_after,
             "subject": c.subject}
            for c in ctx.repository().certificates(device_id, status, limit)]
    render(rows, as_json)


@main.group(epilog="""\b
Examples:
  enroll-server devices list
  enroll-server devices show sensor-0042 --json
  enroll-server devices approve sensor-0042
  enroll-server devices show 3f1c...e9 --evidence
""")
def devices() -> None:
    """Enrolled devices."""


@devices.command("list")
@click.option("--group", "group_name")
@json_option
@pass_context
def devices_list(ctx: Context, group_name: str | None, as_json: bool) -> None:
    """List devices."""
    rows = [{"device_id": d.device_id, "group": d.group.name, "status": d.status,
             "enrolled_by": d.enrolled_by, "created_at": d.created_at,
             "updated_at": d.updated_at}
            for d in ctx.repository().devices(group_name)]
    render(rows, as_json)


@devices.command("show")
@click.argument("device_id")
@click.option("--evidence", is_flag=True, help="Also the TPM evidence behind each certificate.")
@json_option
@pass_context
def devices_show(ctx: Context, device_id: str, evidence: bool, as_json: bool) -> None:
    """One device: identity, certificates and recent audit events."""
    from .cli_tpm import evidence_records, print_evidence

    repository = ctx.repository()
    device = repository.run(lambda: repository.device(device_id))
    if device is None:
        raise click.ClickException(f"no device {device_id!r}; see `enroll-server devices "
                                   "list`")
    info = {"device_id": device.device_id, "group": repository.run(lambda: device.group.name),
            "status": device.status, "enrolled_by": device.enrolled_by,
            "identity_pin": device.identity_pin or None, "created_at": device.created_at,
            "certificates": [{"serial": format(int(c.serial), "x"), "status": c.status,
                              "via": c.issued_via, "not_before": c.not_before,
                              "not_after": c.not_after}
                             for c in repository.certificates(device_id)],
            "audit": [{"at": e.at, "action": e.action, "outcome": e.outcome, "code": e.code}
                      for e in repository.audit_events(device_id, limit=20)]}
    if device.ak_name:
        info["ak_name"] = device.ak_name
    if evidence:
        info["evidence"] = repository.run(lambda: evidence_records(device_id))
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    for key in ("device_id", "group", "status", "enrolled_by", "identity_pin", "created_at"):
        click.echo(f"{key:13} {_cell(info[key])}")
    click.echo("\nCertificates:")
    render(info["certificates"], False)
    click.echo("\nRecent audit events:")
    render(info["audit"], False)
    if evidence:
        click.echo("\nTPM evidence:")
        print_evidence(info["evidence"])


def _decide(ctx: Context, device_id: str, approve: bool) -> None:
    repository = ctx.repository()
    count = repository.decide_pending(device_id, approve, operator())
    if not count:
        raise click.ClickException(f"no pending enrollment for {device_id!r}")
    action = "enroll.approve" if approve else "enroll.reject"
    repository.audit(actor=operator(), action=action, outcome="success", device_id=device_id)
    click.echo(f"{'Approved' if approve else 'Rejected'} the pending enrollment of "
               f"{device_id}; the device gets its answer on its next retry.")


@devices.command("approve")
@click.argument("device_id")
@pass_context
def devices_approve(ctx: Context, device_id: str) -> None:
    """Approve a device's pending enrollment (groups created with --approval)."""
    _decide(ctx, device_id, True)


@devices.command("reject")
@click.argument("device_id")
@pass_context
def devices_reject(ctx: Context, device_id: str) -> None:
    """Reject a device's pending enrollment."""
    _decide(ctx, device_id, False)


@devices.command("pending")
@json_option
@pass_context
def devices_pending(ctx: Context, as_json: bool) -> None:
    """Enrollments waiting for approval."""
    rows = [{"device_id": p.device_id, "group": p.group.name, "since": p.created_at}
            for p in ctx.repository().pending_requests()]
    render(rows, as_json)


@main.command("audit", epilog="\b\nExample:\n  enroll-server audit --device sensor-0042")
@click.option("--device", "device_id")
@click.option("--limit", default=50, show_default=True)
@json_option
@pass_context
def audit(ctx: Context, device_id: str | None, limit: int, as_json: bool) -> None:
    """Recent audit events, newest first."""
    rows = [{"at": e.at, "actor": e.actor, "action": e.action, "outcome": e.outcome,
             "code": e.code, "device": e.device_id, "remote": e.remote_addr,
             "detail": e.detail}
            for e in ctx.repository().audit_events(device_id, limit)]
    render(rows, as_json, ["at", "actor", "action", "outcome", "code", "device", "remote"])
