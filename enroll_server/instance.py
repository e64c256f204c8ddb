"""`enroll-server init`: create a complete, self-contained service instance in a directory.

    DIR/config.toml            the instance's settings (see config.py)
    DIR/enroll.db              SQLite database (WAL)
    DIR/ca/root-ca.pem|.key    root CA; key encrypted with secrets/root-ca.pass: take both
                               offline once the instance works
    DIR/ca/issuing-ca.pem      issuing CA certificate; its key is in the PKCS#11 token
                               (label issuing-ca); `ca rotate` adds issuing-ca-2.pem ...
    DIR/ca/ca-chain.pem        active issuing CA + root: the trust anchor file to give
                               clients (rewritten by `ca rotate`; trusting the root alone
                               works too: servers send their chain)
    DIR/ca/ocsp-responder.pem  delegated OCSP responder certificate (RFC 6960 4.2.2.2);
                               ocsp-responder-<ca>.pem for later CA generations
    DIR/ca/notice-signer.pem   notice-signing certificate (signed MQTT notices)
                               Their keys are in the CA's PKCS#11 token; with --ca-key file,
                               encrypted files beside them (ca/delegated.py)
    DIR/softhsm/               SoftHSM2 token store (only when no token was configured)
    DIR/tls/server.pem|.key    the EST listener's TLS certificate and key
    DIR/secrets/               HSM user PIN, root (and file CA) key passphrases (0600)

Secrets at rest (SECURITY-CHECKLIST 36): the directory is 0700 and every file the
service writes is readable by its user only (umask 077; the SQLite database and its
-wal, -shm and writer-lock files 0600). The operator credential is shown once and only
its SHA-256 is kept (config.toml, operator.credential_sha256); the SoftHSM SO PIN is
never stored; no PIN is ever on a child process's command line (ca/softhsm.py).

Refuses to touch a directory that already holds an instance.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .authorities import seed_first_ca
from .ca import delegated, hierarchy
from .ca.keys import (
    Pkcs11PrivateKey,
    generate_pkcs11_ec_key,
    load_file_private_key,
    write_file_private_key,
)
from .ca.profiles import FIRST_CA_NAME
from .ca.signer import Signer
from .ca.softhsm import SOFTHSM_MODULE, init_softhsm_token
from .config import load_settings
from .secrets_at_rest import tighten_instance_files
from .store.db import migrate, open_database
from .store.repository import Repository


@dataclass(frozen=True)
class InitOptions:
    directory: Path
    ca_key: str = "pkcs11"  # or "file"
    hostnames: tuple[str, ...] = ("localhost", "127.0.0.1")
    port: int = 8443
    organization: str = "Enroll Fleet"
    pkcs11_module: Path | None = None  # None: a SoftHSM token created under DIR
    token_label: str = "enroll-ca"
    pin_file: Path | None = None  # PIN of an existing token (with pkcs11_module)


class InstanceExists(RuntimeError):
    pass


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")


def _pem(certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def init_instance(options: InitOptions) -> dict[str, str]:
    """Create the instance; returns paths and the one-time operator credential."""
    directory = options.directory.resolve()
    if (directory / "config.toml").exists() or (directory.exists() and any(
            directory.iterdir())):
        raise InstanceExists(f"{directory} is not empty; refusing to overwrite an "
                             "instance (choose a new --dir)")
    os.umask(0o077)  # this process writes instance files only: the service user's
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)  # also when it existed (empty)
    for sub in ("ca", "tls", "secrets"):
        (directory / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    config: dict = {
        "server": {"public_url": f"https://{options.hostnames[0]}:{options.port}",
                   "port": options.port},
        "tls": {"cert": "tls/server.pem", "key": "tls/server.key"},
        "database": {"url": "sqlite:///enroll.db"},
        "ca": {"backend": options.ca_key, "certificate": "ca/issuing-ca.pem",
               "root_certificate": "ca/root-ca.pem"},
    }

    root_key = ec.generate_private_key(ec.SECP384R1())
    root_passphrase = secrets.token_urlsafe(24)
    _write_secret(directory / "secrets/root-ca.pass", root_passphrase)
    write_file_private_key(directory / "ca/root-ca.key", root_key, root_passphrase.encode())
    root_certificate = hierarchy.make_root_ca(root_key, options.organization)
    (directory / "ca/root-ca.pem").write_bytes(_pem(root_certificate))

    issuing_key, issuing_public = _create_issuing_key(options, directory, config)
    issuing_certificate = hierarchy.make_issuing_ca(issuing_public, root_certificate,
                                                    root_key, options.organization)
    (directory / "ca/issuing-ca.pem").write_bytes(_pem(issuing_certificate))
    (directory / "ca/ca-chain.pem").write_bytes(_pem(issuing_certificate)
                                                + _pem(root_certificate))

    server_key = ec.generate_private_key(ec.SECP256R1())
    write_file_private_key(directory / "tls/server.key", server_key, None)
    server_certificate = hierarchy.make_tls_server_certificate(
        server_key.public_key(), issuing_certificate, issuing_key, list(options.hostnames))
    (directory / "tls/server.pem").write_bytes(_pem(server_certificate)
                                               + _pem(issuing_certificate))

    operator_credential = new_operator_credential()
    config["operator"] = {"credential_sha256": credential_sha256(operator_credential)}
    (directory / "config.toml").write_text(tomli_w.dumps(config))

    settings = load_settings(directory / "config.toml", environ={})
    if settings.database.url.startswith("sqlite"):
        # SQLite gives -wal and -shm the database file's mode: create it 0600 first.
        os.close(os.open(directory / "enroll.db", os.O_WRONLY | os.O_CREAT, 0o600))
    database = open_database(settings.database.url, settings.instance_dir)
    with database.connection_context():
        migrate(database)
    repository = Repository(database)
    seed_first_ca(settings, repository)  # the CA generation "issuing-ca"
    _prepare_revocation(settings, repository, Signer(
        issuing_certificate, issuing_key, (root_certificate,), name=FIRST_CA_NAME))
    repository.audit(actor=f"operator:{_whoami()}", action="instance.init",
                     outcome="success", detail={"ca_key": options.ca_key,
                                                "directory": str(directory)})
    database.close()
    tighten_instance_files(settings)
    return {"directory": str(directory), "config": str(directory / "config.toml"),
            "trust_anchor": str(directory / "ca/ca-chain.pem"),
            "operator_credential": operator_credential}


def new_operator_credential() -> str:
    """A fresh operator API credential: 256 random bits (so a plain SHA-256 is a safe
    way to keep it: nothing to brute-force)."""
    return "op_" + secrets.token_urlsafe(32)


def credential_sha256(credential: str) -> str:
    return hashlib.sha256(credential.encode()).hexdigest()


def _prepare_revocation(settings, repository: Repository, signer: Signer) -> None:
    """The OCSP responder and notice-signing delegates, and CRL number 1, so a fresh
    instance serves every revocation artefact from its first request."""
    from .revocation import CrlPublisher
    from .services import delegates_dir

    directory = delegates_dir(settings)
    delegated.ocsp_responder(directory, signer, settings.revocation.responder_lifetime_days)
    delegated.notice_signer(directory, signer)
    with repository.transaction():
        CrlPublisher(settings.revocation, signer,
                     lambda: dt.datetime.now(dt.UTC)).publish()


def _create_issuing_key(options: InitOptions, directory: Path, config: dict):
    if options.ca_key == "file":
        key = ec.generate_private_key(ec.SECP256R1())
        passphrase = secrets.token_urlsafe(24)
        _write_secret(directory / "secrets/issuing-ca.pass", passphrase)
        write_file_private_key(directory / "ca/issuing-ca.key", key, passphrase.encode())
        config["ca"].update(key_file="ca/issuing-ca.key",
                            key_passphrase_file="secrets/issuing-ca.pass")
        return load_file_private_key(directory / "ca/issuing-ca.key",
                                     passphrase.encode()), key.public_key()
    module = options.pkcs11_module or SOFTHSM_MODULE
    pkcs11: dict = {"module": str(module), "token_label": options.token_label,
                    "key_label": "issuing-ca"}
    if options.pkcs11_module is None:
        softhsm_conf = directory / "softhsm/softhsm2.conf"
        pin = secrets.token_hex(16)
        _write_secret(directory / "secrets/hsm.pin", pin)
        init_softhsm_token(softhsm_conf, directory / "softhsm/tokens", options.token_label,
                           pin)  # the SO PIN is random and forgotten (ca/softhsm.py)
        os.environ["SOFTHSM2_CONF"] = str(softhsm_conf)
        pkcs11.update(softhsm_conf="softhsm/softhsm2.conf", pin_file="secrets/hsm.pin")
    else:
        if options.pin_file is None:
            raise ValueError("--pin-file is required with --pkcs11-module")
        pin = options.pin_file.read_text().strip()
        pkcs11["pin_file"] = str(options.pin_file.resolve())
    public_key = generate_pkcs11_ec_key(module, options.token_label, "issuing-ca", pin)
    config["ca"]["pkcs11"] = pkcs11
    return Pkcs11PrivateKey(module, options.token_label, "issuing-ca", pin), public_key


def _whoami() -> str:
    try:
        import getpass

        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
