"""Operator commands for the issuing CA generations.

    enroll-server ca list [--json]
    enroll-server ca rotate [--spread 1h] [--root-key F] [--root-passphrase-file F] [--json]
    enroll-server ca reissue-tls [--broker-dir DIR] [--json]
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import EnrollError
from .common import Context, fail, json_option, operator, parse_duration, pass_context, render


@click.group(epilog="""\b
Examples:
  enroll-server ca list
  enroll-server ca rotate --spread 6h
\b
The first issuing CA is "issuing-ca"; each rotation adds issuing-ca-<n> in the same
token (or key directory) and retires the previous one: a retired CA signs only its CRL
(/crl/<name>.crl) and its OCSP responder until its certificate expires.""")
def ca() -> None:
    """Issuing CA generations: list them, rotate to a new one."""


@ca.command("list")
@json_option
@pass_context
def ca_list(ctx: Context, as_json: bool) -> None:
    """Every issuing CA generation, its status and the certificates it still has."""
    from ..rotation import describe

    render(describe(ctx.settings(), ctx.repository()), as_json,
           ["name", "status", "live", "not_after", "certificates", "key", "subject"])


@ca.command("rotate", epilog="""\b
Examples:
  enroll-server ca rotate
  enroll-server ca rotate --spread 12h --json
  enroll-server ca rotate --root-key /media/offline/root-ca.key \\
      --root-passphrase-file /media/offline/root-ca.pass
\b
It also re-issues the EST server's and the broker's TLS certificates from the new CA
(same keys and names) and sends the broker SIGHUP. Then reload every server (SIGHUP to the
`enroll-server serve` process, e.g. `systemctl reload enroll-server`): until it reloads a
server answers enrollments with 503 ca.rotated (Retry-After) and presents its old TLS
certificate. The relay adopts the new CA by itself.""")
@click.option("--spread", default="1h", show_default=True,
              help="Window over which devices are told to renew (30m, 12h, 2d).")
@click.option("--root-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The root CA key (default: ca/root-ca.key of the instance).")
@click.option("--root-passphrase-file",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Its passphrase (default: secrets/root-ca.pass of the instance).")
@json_option
@pass_context
def ca_rotate(ctx: Context, spread: str, root_key: Path | None,
              root_passphrase_file: Path | None, as_json: bool) -> None:
    """Create the next issuing CA, make it active, retire the current one, and queue a
    signed ca_rotation notice (jittered renew_after) for every active device."""
    from ..rotation import iso, rotate

    window = parse_duration(spread)
    try:
        result = rotate(ctx.settings(), ctx.repository(), window, actor=operator(),
                        root_key=root_key, root_passphrase_file=root_passphrase_file)
    except EnrollError as error:
        fail(error)
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    click.echo(f"Issuing CA {result.name} is active: "
               f"{result.certificate.subject.rfc4514_string()}, valid until "
               f"{result.certificate.not_valid_after_utc:%Y-%m-%d}.")
    if result.retired:
        click.echo(f"Retired: {', '.join(result.retired)} (signs only its CRL and OCSP "
                   "responder from now on).")
    times = sorted(result.renew_after)
    if times:
        click.echo(f"Queued {result.notices} ca_rotation notice(s); devices renew between "
                   f"{iso(times[0])} and {iso(times[-1])}.")
    else:
        click.echo("No active device to notify.")
    click.echo(f"Trust anchor file for clients: {result.trust_anchor} (new CA + root).")
    echo_reissued(result.tls)
    click.echo("Next: reload every server (SIGHUP, e.g. systemctl reload enroll-server); "
               "the relay adopts the new CA by itself.")


def echo_reissued(results: list) -> None:  # list[tls_certificates.Reissued]
    for item in results:
        done = (f"re-issued by {item.certificate.issuer.rfc4514_string()}"
                if item.certificate is not None else "not re-issued")
        click.echo(f"TLS certificate of the {item.listener} ({item.path}): {done}; "
                   f"{item.next_step}.")


@ca.command("reissue-tls", epilog="""\b
Examples:
  enroll-server ca reissue-tls
  enroll-server ca reissue-tls --broker-dir /etc/mosquitto/enroll --json
\b
`ca rotate` does this itself; run it when that step failed, when the broker directory is
on another host (run it there), or to renew the certificates before they expire. Keys
and names stay; only the certificate files change. Then reload every server (SIGHUP).""")
@click.option("--broker-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The broker directory (default: the one `broker-config` wrote for "
                   "this instance, if any).")
@json_option
@pass_context
def ca_reissue_tls(ctx: Context, broker_dir: Path | None, as_json: bool) -> None:
    """Re-issue the EST server's and the broker's TLS certificates from the active CA."""
    from ..authorities import records
    from ..services import load_authorities
    from ..tls_certificates import reissue_tls_certificates

    settings, repository = ctx.settings(), ctx.repository()
    authorities = load_authorities(settings, repository)
    ours = {record.certificate.subject for record in records(repository)}
    try:
        results = reissue_tls_certificates(settings, authorities.active, ours, broker_dir)
    except (OSError, ValueError) as error:
        raise click.ClickException(f"could not re-issue: {error}") from None
    repository.audit(actor=operator(), action="ca.reissue_tls", outcome="success", detail={
        "ca": authorities.active.name,
        "reissued": [str(r.path) for r in results if r.certificate is not None]})
    if as_json:
        click.echo(json.dumps([r.to_json() for r in results]))
        return
    echo_reissued(results)
