"""Operator commands for secrets at rest (SECURITY-CHECKLIST 36):

    enroll-server operator rotate           a new operator API credential, shown once
    enroll-server delegated-keys migrate    plain delegated signing keys into the HSM
"""

from __future__ import annotations

import json
import os
import tempfile
import tomllib
from pathlib import Path

import click
import tomli_w

from .common import Context, json_option, operator, pass_context, render


@click.group("operator", epilog="""\b
Examples:
  enroll-server operator rotate
  enroll-server operator rotate --json""")
def operator_group() -> None:
    """The operator API credential (Authorization: Bearer ... on /api/v1)."""


@operator_group.command("rotate", epilog="""\b
Examples:
  enroll-server --config ./instance/config.toml operator rotate
\b
Only the credential's SHA-256 is kept (config.toml, operator.credential_sha256): store
the new credential now, it is not shown again. The old one works until the server reloads
its configuration (SIGHUP to the gunicorn master, or a restart). A plain
secrets/operator.token left by an older version is deleted.""")
@json_option
@pass_context
def rotate(ctx: Context, as_json: bool) -> None:
    """Replace the operator API credential with a new one."""
    from ..instance import credential_sha256, new_operator_credential

    settings = ctx.settings()
    config_path = Path(ctx.config)
    credential = new_operator_credential()
    document = tomllib.loads(config_path.read_text())
    document.setdefault("operator", {})["credential_sha256"] = credential_sha256(credential)
    _replace_file(config_path, tomli_w.dumps(document))
    plain = settings.instance_dir / "secrets" / "operator.token"
    removed = plain.exists()
    if removed:
        plain.unlink()
    ctx.repository().audit(actor=operator(), action="operator.rotate", outcome="success",
                           detail={"plain_credential_file_removed": removed})
    if as_json:
        click.echo(json.dumps({"operator_credential": credential,
                               "plain_file_removed": str(plain) if removed else None}))
        return
    click.echo(f"New operator credential (shown once; only its hash is kept): {credential}")
    if removed:
        click.echo(f"Deleted {plain} (it held the old credential in plain).")
    click.echo("It takes effect when the server reloads: SIGHUP to the gunicorn master, "
               "or a restart.")
    if os.environ.get("ENROLL_OPERATOR__CREDENTIAL_SHA256"):
        click.echo("warning: ENROLL_OPERATOR__CREDENTIAL_SHA256 is set and overrides "
                   "config.toml: update it too", err=True)


def _replace_file(path: Path, text: str) -> None:
    """Write path atomically, keeping it readable by its owner only."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w") as handle:  # mkstemp: 0600
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@click.group("delegated-keys", epilog="""\b
Examples:
  enroll-server delegated-keys migrate""")
def delegated_keys() -> None:
    """The OCSP responder and notice-signing keys (signed by the CA, short-lived)."""


@delegated_keys.command("migrate", epilog="""\b
Examples:
  enroll-server --config ./instance/config.toml delegated-keys migrate --json
\b
For instances made before delegated keys were protected: each unencrypted ca/<name>.key
is replaced, when the CA key is in a PKCS#11 token by a new key generated in that token
(with a new certificate; the file is deleted), otherwise by the same key encrypted in
place. Reload the server and restart the relay afterwards (they keep the old key in
memory until then; its certificate stays valid until it expires).""")
@json_option
@pass_context
def migrate(ctx: Context, as_json: bool) -> None:
    """Move plain delegated signing keys into the HSM token (or encrypt them)."""
    from ..ca import delegated
    from ..ca.keys import Pkcs11PrivateKey, write_file_private_key
    from ..services import delegates_dir, load_authorities

    settings = ctx.settings()
    authorities = load_authorities(settings, ctx.repository())
    directory = delegates_dir(settings)
    owners = {delegated.NOTICE_SIGNER: authorities.active,
              **{delegated.responder_name(s.name): s for s in authorities.live()}}
    rows = []
    for name, signer in owners.items():
        path = delegated.key_path(directory, name)
        if not delegated.is_plain_key_file(path):
            continue
        if isinstance(signer.private_key, Pkcs11PrivateKey):
            with delegated.creation_lock(directory):
                signer.private_key.sibling(name, create=True)
            path.unlink()
            _ensure(directory, name, signer, settings)
            rows.append({"key": name, "now": "in the HSM token (new key and certificate)"})
        else:
            key = delegated.load_ec_key(path, None)
            write_file_private_key(path, key, delegated.file_passphrase(directory),
                                   overwrite=True)
            rows.append({"key": name, "now": "encrypted file (same key and certificate)"})
    ctx.repository().audit(actor=operator(), action="delegated_keys.migrate",
                           outcome="success", detail={"migrated": [r["key"] for r in rows]})
    render(rows, as_json, empty="Nothing to migrate: no plain delegated key left.")
    if rows and not as_json:
        click.echo("Reload the server (SIGHUP) and restart the relay to use them.")


def _ensure(directory: Path, name: str, signer, settings) -> None:  # noqa: ANN001
    from ..ca import delegated

    if name == delegated.NOTICE_SIGNER:
        delegated.notice_signer(directory, signer)
    else:
        delegated.ocsp_responder(directory, signer, settings.revocation.responder_lifetime_days)
