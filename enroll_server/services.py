"""Builds the object graph from Settings: database, repository, CA signer, services.

Nothing below this module reads the environment or configuration files.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import peewee as pw
from cryptography import x509
from cryptography.x509 import ocsp

from .authorities import Authorities, seed_first_ca
from .ca import delegated
from .ca.ocsp import OcspDispatcher, OcspResponder
from .ca.signer import Signer
from .config import Settings
from .est_enrollment import EstEnrollment
from .http.ratelimit import RateLimiter
from .issuance import Issuer
from .notify.issuer import NoticeIssuer
from .revocation import REASONS, CrlPublisher, RevocationService
from .store.db import migrate, open_database
from .store.repository import Repository
from .tpm_enrollment import TpmEnrollment


@dataclass
class Services:
    settings: Settings
    database: pw.Database
    repository: Repository
    signer: Signer  # the active issuing CA: it signs device certificates
    authorities: Authorities  # every live CA generation (the active one and retired ones)
    enrollment: EstEnrollment
    attestation: TpmEnrollment
    rate_limiter: RateLimiter
    crls: dict[str, CrlPublisher]  # per CA generation name
    revocation: RevocationService
    ocsp: OcspDispatcher

    @property
    def crl(self) -> CrlPublisher:
        """The active CA's CRL publisher."""
        return self.crls[self.signer.name]

    def close(self) -> None:
        """Stop the background CRL rebuilder and close the database (tests, reloads)."""
        if self.revocation.rebuilder is not None:
            self.revocation.rebuilder.stop()
        self.database.close()


def open_store(settings: Settings) -> tuple[pw.Database, Repository]:
    """The database, migrated, with the first issuing CA recorded (authorities.py)."""
    database = open_database(settings.database.url, settings.instance_dir)
    with database.connection_context():
        migrate(database)
    repository = Repository(database)
    seed_first_ca(settings, repository)
    return database, repository


def load_authorities(settings: Settings, repository: Repository | None = None) -> Authorities:
    """Every live CA generation, from the database (opened here if not given)."""
    if repository is None:
        repository = open_store(settings)[1]
    return Authorities(settings, repository)


def load_signer(settings: Settings) -> Signer:
    """The active issuing CA (the one that signs device certificates)."""
    return load_authorities(settings).active


def delegates_dir(settings: Settings) -> Path:
    """Where the OCSP responder and notice-signing keys live (beside the CA files)."""
    return settings.resolve(settings.ca.certificate).parent


def notice_issuer(settings: Settings, signer: Signer) -> NoticeIssuer:
    """Signs notices with the notice signer certified by ``signer`` (the active CA)."""
    return NoticeIssuer(settings.notices, delegated.notice_signer(delegates_dir(settings),
                                                                  signer),
                        settings.mqtt.topic_prefix)


def certificate_status(repository: Repository, serial: int, issuer: str | None,
                       now: dt.datetime) -> tuple[ocsp.OCSPCertStatus, dt.datetime | None,
                                                  x509.ReasonFlags | None]:  # fmt: skip
    """RFC 6960 2.2 status of one of our serials, straight from the database. With
    issuer, a serial another CA generation issued is "unknown" to this one."""
    status = repository.certificate_status(serial, issuer, now)
    if status == "unknown":
        return ocsp.OCSPCertStatus.UNKNOWN, None, None
    if status == "good":
        return ocsp.OCSPCertStatus.GOOD, None, None
    return (ocsp.OCSPCertStatus.REVOKED, status.revoked_at.replace(tzinfo=dt.UTC),
            REASONS.get(status.reason))


def crl_publishers(settings: Settings, authorities: Authorities,
                   clock) -> dict[str, CrlPublisher]:  # noqa: ANN001
    return {signer.name: CrlPublisher(settings.revocation, signer, clock)
            for signer in authorities.live()}


def build_revocation(settings: Settings, repository: Repository) -> RevocationService:
    """For processes that only revoke (the CLI): no OCSP responder, no Flask."""
    authorities = load_authorities(settings, repository)
    clock = lambda: dt.datetime.now(dt.UTC)  # noqa: E731
    return RevocationService(repository, notice_issuer(settings, authorities.active),
                             crl_publishers(settings, authorities, clock), clock)


def ocsp_dispatcher(settings: Settings, repository: Repository, authorities: Authorities,
                    clock) -> OcspDispatcher:  # noqa: ANN001
    """An OCSP responder per live CA generation, each with its own delegated responder
    certificate, behind one dispatcher (the /ocsp endpoint)."""
    directory = delegates_dir(settings)
    responders = {}
    for signer in authorities.live():
        delegate = delegated.ocsp_responder(directory, signer,
                                            settings.revocation.responder_lifetime_days)
        responders[signer.name] = OcspResponder(
            signer.ca_certificate, delegate.certificate, delegate.key,
            lambda serial, name=signer.name: certificate_status(repository, serial, name,
                                                                clock()),
            validity=dt.timedelta(minutes=settings.revocation.ocsp_validity_minutes),
            clock=clock)
    return OcspDispatcher(responders, fallback=authorities.active.name)


def build_services(settings: Settings,
                   clock: Callable[[], dt.datetime] | None = None) -> Services:
    """Every service of a server process. ``clock``: tests move time with it."""
    database, repository = open_store(settings)
    authorities = load_authorities(settings, repository)
    signer = authorities.active
    clock = clock or (lambda: dt.datetime.now(dt.UTC))
    crls = crl_publishers(settings, authorities, clock)
    revocation = RevocationService(repository, notice_issuer(settings, signer), crls,
                                   clock).rebuild_in_background()
    issuer = Issuer(settings, repository, signer, clock, revocation.crls_changed)
    return Services(
        settings=settings, database=database, repository=repository, signer=signer,
        authorities=authorities, enrollment=EstEnrollment(repository, issuer, clock),
        attestation=TpmEnrollment(settings, repository, issuer, clock),
        rate_limiter=RateLimiter(settings.server.rate_limit_per_second,
                                 settings.server.rate_limit_burst),
        crls=crls, revocation=revocation,
        ocsp=ocsp_dispatcher(settings, repository, authorities, clock))
