"""Secrets at rest on an instance's files (SECURITY-CHECKLIST 36), checked when `serve`
starts and after `init`.

The database (audit log, TPM evidence, token hashes) and its SQLite companions (-wal,
-shm and the writer-queue lock) are made 0600; anything else found too open, or a secret
an older version kept that nothing needs any more, is reported with what to do, never
deleted: the operator may hold the only copy.
"""

from __future__ import annotations

import stat
from pathlib import Path

from .ca import delegated
from .config import Settings

_SQLITE_COMPANIONS = ("", "-wal", "-shm", "-writer.lock")


def sqlite_files(settings: Settings) -> list[Path]:
    """The SQLite database file and its companions (whether they exist or not)."""
    url = settings.database.url
    if not url.startswith("sqlite:///") or url.endswith((":memory:", "///")):
        return []
    database = Path(url[len("sqlite:///"):])
    if not database.is_absolute():
        database = settings.instance_dir / database
    return [database.with_name(database.name + suffix) for suffix in _SQLITE_COMPANIONS]


def tighten_instance_files(settings: Settings) -> list[str]:
    """chmod 0600 the SQLite files readable by others; returns what was changed."""
    changed = []
    for path in sqlite_files(settings):
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            path.chmod(0o600)
            changed.append(f"{path}: {mode:o} -> 600")
    return changed


def findings(settings: Settings) -> list[str]:
    """What is still wrong at rest, each with what to do about it."""
    found = []
    directory = settings.instance_dir
    if stat.S_IMODE(directory.stat().st_mode) & 0o077:
        found.append(f"{directory} is open to other users: chmod 700 {directory}")
    secrets_dir = directory / "secrets"
    if (secrets_dir / "operator.token").exists():
        found.append(f"{secrets_dir / 'operator.token'} keeps the operator credential in "
                     "plain, and the server needs only its hash: store it elsewhere and "
                     "delete the file, or run `enroll-server operator rotate`")
    if (secrets_dir / "hsm-so.pin").exists():
        found.append(f"{secrets_dir / 'hsm-so.pin'} keeps the token's SO PIN, which "
                     "nothing needs after init: move it offline or delete it")
    ca_dir = settings.resolve(settings.ca.certificate).parent
    for key_file in sorted(ca_dir.glob("*.key")):
        name = key_file.name.removesuffix(".key")
        if (name == delegated.NOTICE_SIGNER or name.startswith("ocsp-responder")) \
                and delegated.is_plain_key_file(key_file):
            found.append(f"{key_file} is an unencrypted delegated signing key: run "
                         "`enroll-server delegated-keys migrate`")
    return found
