"""Operator commands for TPM attestation: EK allowlists, golden PCRs, evidence, AK pins
(cli/__init__.py adds them to the `group` and `devices` command groups).

    enroll-server group allow-ek GROUP (--ek-cert F | --ek-public F | --ek-sha256 HEX
                                        | --from CSV-or-directory)
    enroll-server group set-pcrs GROUP --pcrread F [--pcrs sha256:0,1,2,7] | --clear
    enroll-server devices evidence ID            (also: devices show ID --evidence)
    enroll-server devices unpin-ak ID
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import click
from cryptography.hazmat.primitives import serialization

from .. import attestation as att
from .common import Context, cell, group_or_fail, json_option, operator, pass_context
from .ek_files import ek_identity, read_allowlist


@click.command("allow-ek", epilog="""\b
Examples:
  enroll-server group allow-ek fleet --ek-cert ek.der --note "rack 4, unit 12"
  tpm2_createek -c ek.ctx -G ecc -u ek.pub && enroll-server group allow-ek fleet --ek-public ek.pub
  enroll-server group allow-ek fleet --ek-sha256 3f1c...e9 --remove
  enroll-server group allow-ek fleet --from eks.csv        # header: ek_public,note
  enroll-server group allow-ek fleet --from ./createek-outputs/   # ek.pub / ek.pem files
""")
@click.argument("group_name")
@click.option("--ek-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="EK certificate (DER as read from NV, or PEM).")
@click.option("--ek-public", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="EK TPM2B_PUBLIC as `tpm2_createek -u` writes it.")
@click.option("--ek-sha256", help="The device id: hex SHA-256 of the EK public key (SPKI).")
@click.option("--from", "source", type=click.Path(exists=True, path_type=Path),
              help="Many EKs at once: a CSV, or a directory of tpm2_createek outputs.")
@click.option("--note", default="", help="Free text kept with the entry.")
@click.option("--remove", is_flag=True, help="Remove the EK from the allowlist instead.")
@pass_context
def group_allow_ek(ctx: Context, group_name: str, ek_cert: Path | None,
                   ek_public: Path | None, ek_sha256: str | None, source: Path | None,
                   note: str, remove: bool) -> None:
    """Allow TPMs (by their EK) to enroll in a group with --ek-policy allowlist."""
    if source is not None:
        if ek_cert or ek_public or ek_sha256:
            raise click.UsageError("--from replaces --ek-cert/--ek-public/--ek-sha256")
        _allow_many(ctx, group_name, read_allowlist(source), note, remove)
        return
    identity = ek_identity(ek_cert, ek_public, ek_sha256)
    repository = ctx.repository()
    group_row = group_or_fail(repository, group_name)
    changed = repository.allowlist_ek(group_row.id, identity, note, remove)
    repository.audit(actor=operator(), action="group.allow_ek", outcome="success",
                     group=group_name, device_id=identity,
                     detail={"remove": remove, "changed": bool(changed)})
    verb = "Removed" if remove else "Allowed"
    click.echo(f"{verb} EK {identity} {'from' if remove else 'in'} group {group_name!r}"
               f"{'' if changed else ' (no change)'}.")
    if not remove and group_row.ek_policy != "allowlist":
        click.echo("Note: this group trusts any TPM of its manufacturers (--ek-policy "
                   "manufacturer); the allowlist is consulted only with --ek-policy "
                   "allowlist.", err=True)


def _allow_many(ctx: Context, group_name: str, entries: list[tuple[str, str]], note: str,
                remove: bool) -> None:
    repository = ctx.repository()
    group_row = group_or_fail(repository, group_name)
    changed = repository.allowlist_eks(  # all entries or none
        group_row.id, [(identity, entry_note or note) for identity, entry_note in entries],
        remove)
    repository.audit(actor=operator(), action="group.allow_ek", outcome="success",
                     group=group_name, detail={"remove": remove, "entries": len(entries),
                                               "changed": changed})
    verb = "Removed" if remove else "Allowed"
    click.echo(f"{verb} {changed} of {len(entries)} EKs {'from' if remove else 'in'} group "
               f"{group_name!r} ({len(entries) - changed} unchanged).")
    if not remove and group_row.ek_policy != "allowlist":
        click.echo("Note: this group trusts any TPM of its manufacturers (--ek-policy "
                   "manufacturer); the allowlist is consulted only with --ek-policy "
                   "allowlist.", err=True)


def _parse_selection(text: str) -> dict[str, list[int]]:
    selection: dict[str, list[int]] = {}
    for part in text.split("+"):
        bank, _, indexes = part.partition(":")
        try:
            selection[bank.strip()] = sorted({int(i) for i in indexes.split(",") if i.strip()})
        except ValueError:
            raise click.BadParameter("like sha256:0,1,2,7 (banks joined by +)",
                                     param_hint="--pcrs") from None
    return selection


@click.command("set-pcrs", epilog="""\b
Examples (record golden values from a reference device running good firmware):
  tpm2_pcrread sha256:0,1,2,3,7 -o /dev/null > reference.yaml
  enroll-server group set-pcrs fleet --pcrread reference.yaml
  enroll-server group set-pcrs fleet --pcrread reference.yaml --pcrs sha256:0,7
  enroll-server group set-pcrs fleet --clear
""")
@click.argument("group_name")
@click.option("--pcrread", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Output of `tpm2_pcrread` on a reference device.")
@click.option("--pcrs", help="Which PCRs of it make the policy (default: all it lists).")
@click.option("--clear", is_flag=True, help="Remove the boot-state policy.")
@pass_context
def group_set_pcrs(ctx: Context, group_name: str, pcrread: Path | None, pcrs: str | None,
                   clear: bool) -> None:
    """Set the group's boot-state policy: golden PCR values every device must quote."""
    if clear == (pcrread is not None):
        raise click.UsageError("give --pcrread FILE or --clear")
    document = ""
    if pcrread is not None:
        try:
            reference = att.parse_tpm2_pcrread(pcrread.read_text())
            chosen = _parse_selection(pcrs) if pcrs else {b: list(v) for b, v in
                                                          reference.items()}
            policy = att.golden_pcr_policy(reference, chosen)
        except (ValueError, KeyError) as error:
            raise click.BadParameter(str(error), param_hint="--pcrread/--pcrs") from None
        document = json.dumps(att.pcr_policy_to_json(policy), sort_keys=True)
    repository = ctx.repository()
    group_or_fail(repository, group_name)
    repository.change_group(group_name, pcr_policy=document)
    repository.audit(actor=operator(), action="group.set_pcrs", outcome="success",
                     group=group_name, detail=document or "cleared")
    if clear:
        click.echo(f"Group {group_name!r} has no boot-state policy now.")
    else:
        summary = ", ".join(f"{bank}:{','.join(map(str, sorted(values)))}"
                            for bank, values in policy.items())
        click.echo(f"Group {group_name!r} now requires a quote of {summary} with these "
                   "values.")


@click.command("set-ek-crls", epilog="""\b
Examples (CRLs your TPM manufacturers publish; refresh them as they do):
  curl -o vendor-ek-ca.crl http://pki.example-tpm-vendor.com/ek-ca-001.crl
  enroll-server group set-ek-crls fleet --crl vendor-ek-ca.crl --crl vendor-root.crl
  enroll-server group set-ek-crls fleet --clear
""")
@click.argument("group_name")
@click.option("--crl", "crls", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A manufacturer CRL, DER or PEM (repeatable).")
@click.option("--clear", is_flag=True, help="Remove the group's EK CRLs.")
@pass_context
def group_set_ek_crls(ctx: Context, group_name: str, crls: tuple[Path, ...],
                      clear: bool) -> None:
    """Manufacturer CRLs: an EK certificate (or EK CA) on one of them is refused."""
    if clear == bool(crls):
        raise click.UsageError("give --crl FILE (repeatable) or --clear")
    loaded = []
    for path in crls:
        try:
            loaded += att.load_ek_crls(path.read_bytes())
        except ValueError as error:
            raise click.BadParameter(f"{path}: not a CRL ({error})", param_hint="--crl") from None
    pem = "".join(crl.public_bytes(serialization.Encoding.PEM).decode() for crl in loaded)
    repository = ctx.repository()
    group_or_fail(repository, group_name)
    repository.change_group(group_name, ek_crls_pem=pem)
    revoked = sum(len(list(crl)) for crl in loaded)
    repository.audit(actor=operator(), action="group.set_ek_crls", outcome="success",
                     group=group_name, detail={"crls": len(loaded), "revoked": revoked})
    click.echo(f"Group {group_name!r}: {len(loaded)} EK CRL(s) with {revoked} revoked "
               "certificate(s)." if loaded else f"Group {group_name!r} has no EK CRLs now.")


def evidence_records(repository, device_id: str) -> list[dict[str, Any]]:  # noqa: ANN001
    """What justified each attested certificate of a device (newest first)."""
    return [_describe(row) for row in repository.evidence(device_id)]


def _describe(row) -> dict[str, Any]:  # noqa: ANN001 - an attestation_evidence row
    certify = att.parse_attest(bytes(row.certify_info))
    record: dict[str, Any] = {
        "serial": format(int(row.certificate.serial), "x"), "at": row.created_at,
        "ak_name": att.object_name(att.parse_public(bytes(row.ak_public))).hex(),
        "device_key_name": att.object_name(
            att.parse_public(bytes(row.device_key_public))).hex(),
        "certify_type": "creation" if int(certify.type) == 0x801A else "certify",
        "nonce": bytes(row.nonce).hex(), "ek_certificate": None, "quote": None,
        "raw": {name: base64.b64encode(bytes(value)).decode() for name in (
            "ek_certificate", "ek_public", "ak_public", "certify_info", "certify_signature",
            "device_key_public", "quote_info", "quote_signature")
            if (value := getattr(row, name)) is not None},
    }
    if row.ek_certificate is not None:
        cert = att.load_ek_certificate(bytes(row.ek_certificate))
        record["ek_certificate"] = {"issuer": cert.issuer_text,
                                    "serial": format(cert.serial_number, "x"),
                                    "not_after": cert.not_valid_after_utc,
                                    "tpm": cert.tpm_identity()}
    if row.quote_info is not None:
        quote = att.parse_attest(bytes(row.quote_info))
        clock = att.clock_info(quote)
        record["quote"] = {"pcrs": {bank: list(pcrs) for bank, pcrs in
                                    att.quote.quoted_selection(quote)},
                           "pcr_digest": bytes(quote.attested.quote.pcrDigest).hex(),
                           "reset_count": clock.reset_count}
    return record


def print_evidence(records: list[dict[str, Any]]) -> None:
    if not records:
        click.echo("(no attestation evidence: not enrolled with a TPM)")
    for record in records:
        click.echo(f"certificate {record['serial']}  ({cell(record['at'])})")
        ek = record["ek_certificate"]
        ek_text = f"{ek['issuer']}, serial {ek['serial']}" if ek else "- (allowlisted EK)"
        click.echo(f"  EK certificate   {ek_text}")
        click.echo(f"  AK name          {record['ak_name']}")
        click.echo(f"  device key name  {record['device_key_name']} ({record['certify_type']})")
        click.echo(f"  nonce            {record['nonce']}")
        quote = record["quote"]
        if quote:
            click.echo(f"  quote            {quote['pcrs']} digest {quote['pcr_digest'][:16]}... "
                       f"resetCount {quote['reset_count']}")


@click.command("evidence",
                 epilog="\b\nExample:\n  enroll-server devices evidence 3f1c...e9 --json")
@click.argument("device_id")
@json_option
@pass_context
def devices_evidence(ctx: Context, device_id: str, as_json: bool) -> None:
    """The TPM evidence behind each certificate of a device (--json: raw structures)."""
    repository = ctx.repository()
    records = evidence_records(repository, device_id)
    if as_json:
        click.echo(json.dumps(records, indent=2, default=str))
    else:
        print_evidence(records)


@click.command("unpin-ak", epilog="\b\nExample:\n  enroll-server devices unpin-ak 3f1c...e9")
@click.argument("device_id")
@pass_context
def devices_unpin_ak(ctx: Context, device_id: str) -> None:
    """Re-admit a TPM whose attestation key changed (e.g. after TPM2_Clear)."""
    repository = ctx.repository()
    if not repository.unpin_ak(device_id):
        raise click.ClickException(f"no device {device_id!r}; see `enroll-server devices list`")
    repository.audit(actor=operator(), action="device.unpin_ak", outcome="success",
                     device_id=device_id)
    click.echo(f"Device {device_id}'s next attested enrollment pins the AK it presents.")
