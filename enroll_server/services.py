"""Builds the object graph from Settings: database, repository, CA signer, services.

Nothing below this module reads the environment or configuration files.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

import peewee as pw
from cryptography import x509
from cryptography.x509 import ocsp

from .attested import AttestationService
from .ca import delegated
from .ca.ocsp import OcspResponder
from .ca.signer import Signer
from .config import Settings
from .enrollment import EnrollmentService
from .notify.issuer import NoticeIssuer
from .ratelimit import RateLimiter
from .revocation import REASONS, CrlPublisher, RevocationService
from .store.db import migrate, open_database
from .store.models import Certificate
from .store.repository import Repository


@dataclass
class Services:
    settings: Settings
    database: pw.Database
    repository: Repository
    signer: Signer
    enrollment: EnrollmentService
    attestation: AttestationService
    rate_limiter: RateLimiter
    crl: CrlPublisher
    revocation: RevocationService
    ocsp: OcspResponder


def read_secret(path: os.PathLike[str]) -> str:
    with open(path) as handle:
        return handle.read().strip()


def load_ca_key(settings: Settings):  # -> cryptography private key (file or PKCS#11)
    """The issuing CA key. PKCS#11 never falls back to a file key, whatever happens."""
    ca = settings.ca
    if ca.backend == "file":
        from .ca.keys import load_file_private_key

        passphrase = (read_secret(ca.key_passphrase_file).encode()
                      if ca.key_passphrase_file else None)
        return load_file_private_key(ca.key_file, passphrase)
    from .ca.keys import Pkcs11PrivateKey

    if ca.pkcs11.softhsm_conf is not None:
        # SoftHSM reads its configuration once, when the module is initialised.
        os.environ["SOFTHSM2_CONF"] = str(ca.pkcs11.softhsm_conf)
    return Pkcs11PrivateKey(ca.pkcs11.module, ca.pkcs11.token_label, ca.pkcs11.key_label,
                            read_secret(ca.pkcs11.pin_file),
                            reconnect_backoff=ca.pkcs11.reconnect_backoff_seconds)


def load_signer(settings: Settings) -> Signer:
    ca_certificate = x509.load_pem_x509_certificate(settings.ca.certificate.read_bytes())
    chain: tuple[x509.Certificate, ...] = ()
    if settings.ca.root_certificate.exists():
        chain = tuple(x509.load_pem_x509_certificates(
            settings.ca.root_certificate.read_bytes()))
    return Signer(ca_certificate, load_ca_key(settings), chain)


def open_store(settings: Settings) -> tuple[pw.Database, Repository]:
    database = open_database(settings.database.url, settings.instance_dir)
    with database.connection_context():
        migrate(database)
    return database, Repository(database)


def delegates_dir(settings: Settings) -> Path:
    """Where the OCSP responder and notice-signing keys live (beside the CA files)."""
    return settings.resolve(settings.ca.certificate).parent


def notice_issuer(settings: Settings, signer: Signer) -> NoticeIssuer:
    return NoticeIssuer(settings.notices, delegated.notice_signer(delegates_dir(settings),
                                                                  signer),
                        settings.mqtt.topic_prefix)


def certificate_status(serial: int) -> tuple[ocsp.OCSPCertStatus, dt.datetime | None,
                                             x509.ReasonFlags | None]:
    """RFC 6960 2.2 status of one of our serials, straight from the database."""
    row = (Certificate.select(Certificate.status, Certificate.revoked_at,
                              Certificate.revocation_reason)
           .where(Certificate.serial == str(serial)).first())
    if row is None:
        return ocsp.OCSPCertStatus.UNKNOWN, None, None
    if row.status == "revoked":
        return (ocsp.OCSPCertStatus.REVOKED, row.revoked_at.replace(tzinfo=dt.UTC),
                REASONS.get(row.revocation_reason or "unspecified"))
    return ocsp.OCSPCertStatus.GOOD, None, None


def build_revocation(settings: Settings, repository: Repository) -> RevocationService:
    """For processes that only revoke (the CLI): no OCSP responder, no Flask."""
    signer = load_signer(settings)
    clock = lambda: dt.datetime.now(dt.UTC)  # noqa: E731
    return RevocationService(repository, notice_issuer(settings, signer),
                             CrlPublisher(settings.revocation, signer, clock), clock)


def build_services(settings: Settings) -> Services:
    database, repository = open_store(settings)
    signer = load_signer(settings)
    clock = lambda: dt.datetime.now(dt.UTC)  # noqa: E731
    enrollment = EnrollmentService(settings, repository, signer, clock)
    crl = CrlPublisher(settings.revocation, signer, clock)
    responder = delegated.ocsp_responder(delegates_dir(settings), signer,
                                         settings.revocation.responder_lifetime_days)
    return Services(
        settings=settings, database=database, repository=repository, signer=signer,
        enrollment=enrollment,
        attestation=AttestationService(settings, repository, enrollment),
        rate_limiter=RateLimiter(settings.server.rate_limit_per_second,
                                 settings.server.rate_limit_burst),
        crl=crl,
        revocation=RevocationService(repository, notice_issuer(settings, signer), crl, clock),
        ocsp=OcspResponder(signer.ca_certificate, responder.certificate, responder.key,
                           lambda serial: repository.read(lambda: certificate_status(serial)),
                           validity=dt.timedelta(
                               minutes=settings.revocation.ocsp_validity_minutes),
                           clock=clock))
