"""`enroll-server devices`, `certs` and `audit`: what was enrolled, issued and done."""

from __future__ import annotations

import json

import click

from .common import Context, cell, json_option, operator, pass_context, render
from .tpm import evidence_records, print_evidence


@click.group()
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


@click.group(epilog="""\b
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
    repository = ctx.repository()
    report = repository.device_report(device_id)
    if report is None:
        raise click.ClickException(f"no device {device_id!r}; see `enroll-server devices "
                                   "list`")
    info = {key: report[key] for key in ("device_id", "group", "status", "enrolled_by")}
    info["identity_pin"] = report["identity_pin"] or None
    info["created_at"] = report["created_at"]
    info["certificates"] = [{"serial": format(int(c["serial"]), "x"), "status": c["status"],
                             "via": c["via"], "not_before": c["not_before"],
                             "not_after": c["not_after"]} for c in report["certificates"]]
    info["audit"] = [{"at": e.at, "action": e.action, "outcome": e.outcome, "code": e.code}
                     for e in repository.audit_events(device_id, limit=20)]
    if report["ak_name"]:
        info["ak_name"] = report["ak_name"]
    if evidence:
        info["evidence"] = evidence_records(repository, device_id)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    for key in ("device_id", "group", "status", "enrolled_by", "identity_pin", "created_at"):
        click.echo(f"{key:13} {cell(info[key])}")
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


@click.command("audit", epilog="\b\nExample:\n  enroll-server audit --device sensor-0042")
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
