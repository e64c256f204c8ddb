"""Devices and their certificates, and the issuing transaction (docs/design.md).

``issue`` is the one place a certificate is written. Inside its write transaction it
re-checks everything a concurrent request could have changed since the caller's
read-only checks (issue 9.1): the token is unused, the device row (locked on PostgreSQL
by SELECT ... FOR UPDATE, the write lock on SQLite) is admitted, the presented
certificate is still the device's active one, the CA still the active one. A revocation
takes the same device lock, so either the issuance commits first and the revocation then
revokes what it issued, or the revocation commits first and the issuance is refused.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import peewee as pw
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ..errors import Conflict, EnrollError, Forbidden, ServiceUnavailable, Unauthorized
from ..policy.csr import public_key_sha256
from .audit import Audit
from .groups import Groups
from .models import (
    AttestationEvidence,
    Certificate,
    Device,
    EnrollmentGroup,
    IssuingCa,
    PendingRequest,
    naive_utc,
)
from .records import CertificateRecord, DeviceRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Issuance:
    """What one issuing transaction re-checks and writes."""

    device_id: str
    group_id: int
    method: str  # "token", "bootstrap", "reenroll", "tpm"
    identity_pin: str  # what pins a new device id (bootstrap key, EK)
    known_device: bool  # the caller saw the device enrolled already
    issuer: str  # the CA generation that signs (must still be the active one)
    supersede_grace: dt.timedelta  # the group's: how long the replaced certificate lives
    now: dt.datetime  # the service's clock
    token_id: int | None = None  # consumed here, exactly once
    presented_certificate_id: int | None = None  # re-enrollment: must still be active
    ak_name: str | None = None  # TPM: pinned on first enrollment
    reset_count: int | None = None  # TPM: the quoted resetCount
    evidence: dict[str, Any] | None = None  # TPM: archived with the certificate
    audit: dict[str, Any] = field(default_factory=dict)  # the success row: actor, action...


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    revoked_now: tuple[str, ...]  # issuers whose CRL changed (grace 0 revokes at once)


class Devices(Groups, Audit):
    # -- reads ------------------------------------------------------------------------
    def device(self, device_id: str) -> DeviceRecord | None:
        row = self._first(Device.device_id, device_id)
        return DeviceRecord.of(row) if row is not None else None

    def device_by_pk(self, device_pk: int) -> DeviceRecord:
        return DeviceRecord.of(self._first(Device.id, device_pk))

    def certificate_by_fingerprint(self, fingerprint: str) -> CertificateRecord | None:
        row = self._first(Certificate.fingerprint_sha256, fingerprint)
        return CertificateRecord.of(row) if row is not None else None

    def active_certificate_for_key(self, device_pk: int,
                                   key_sha256: str) -> CertificateRecord | None:
        row = (Certificate.select()
               .where((Certificate.device == device_pk)
                      & (Certificate.public_key_sha256 == key_sha256)
                      & (Certificate.status == "active"))
               .order_by(Certificate.id.desc()).first())
        return CertificateRecord.of(row) if row is not None else None

    def active_ca_name(self) -> str | None:
        """The name of the issuing CA generation that signs device certificates now (the
        issuing path checks it in its transaction: one compiled, indexed read)."""
        row = self._first(IssuingCa.status, "active")
        return row.name if row is not None else None

    def devices(self, group: str | None = None) -> list[Device]:
        with self.transaction(readonly=True):
            query = Device.select(Device, EnrollmentGroup).join(EnrollmentGroup)
            if group:
                query = query.where(EnrollmentGroup.name == group)
            return list(query.order_by(Device.device_id))

    def certificates(self, device_id: str | None = None, status: str | None = None,
                     limit: int = 1000) -> list[Certificate]:
        with self.transaction(readonly=True):
            query = Certificate.select(Certificate, Device).join(Device)
            if device_id:
                query = query.where(Device.device_id == device_id)
            if status:
                query = query.where(Certificate.status == status)
            return list(query.order_by(Certificate.id.desc()).limit(limit))

    def device_report(self, device_id: str) -> dict[str, Any] | None:
        """A device, its group and its certificates, newest first (operator API)."""
        with self.transaction(readonly=True):
            row = (Device.select(Device, EnrollmentGroup).join(EnrollmentGroup)
                   .where(Device.device_id == device_id).first())
            if row is None:
                return None
            certificates = list(Certificate.select().where(Certificate.device == row)
                                .order_by(Certificate.id.desc()))
        return {"device_id": row.device_id, "group": row.group.name, "status": row.status,
                "enrolled_by": row.enrolled_by, "identity_pin": row.identity_pin,
                "ak_name": row.ak_name, "created_at": row.created_at,
                "updated_at": row.updated_at, "revoked_at": row.revoked_at,
                "revocation_reason": row.revocation_reason,
                "certificates": [{"serial": c.serial, "status": c.status,
                                  "via": c.issued_via, "not_before": c.not_before,
                                  "not_after": c.not_after, "revoked_at": c.revoked_at,
                                  "reason": c.revocation_reason,
                                  "revoke_after": c.revoke_after} for c in certificates]}

    def evidence(self, device_id: str) -> list[AttestationEvidence]:
        """What justified each attested certificate of a device (newest first)."""
        with self.transaction(readonly=True):
            return list(AttestationEvidence.select(AttestationEvidence, Certificate)
                        .join(Certificate).join(Device).where(Device.device_id == device_id)
                        .order_by(AttestationEvidence.id.desc()))

    def unpin_ak(self, device_id: str) -> bool:
        with self.transaction():
            return bool(Device.update(ak_name="").where(
                Device.device_id == device_id).execute())

    # -- the issuing transaction ------------------------------------------------------
    def issue(self, issuance: Issuance, admit: Callable[[DeviceRecord | None], None],
              sign: Callable[[], x509.Certificate],
              renew_at: Callable[[x509.Certificate], dt.datetime]) -> Issued:
        """Re-check, sign and store in one write transaction (see the module doc).

        ``admit(device)`` is the caller's admission rule (device not revoked, the TPM's
        AK pin ...), applied here to the locked, latest row (None: a new device id);
        raising refuses. ``sign()`` signs (the CA key) once every check passed."""
        for _attempt in range(3):
            try:
                with self.transaction():
                    return self._issue_once(issuance, admit, sign, renew_at)
            except pw.IntegrityError as exc:  # a serial collision: sign again
                last_error = exc
        raise EnrollError(code="ca.serial_collision",
                          detail=f"three serial collisions: {last_error}")

    def _issue_once(self, issuance: Issuance, admit: Callable[[DeviceRecord | None], None],
                    sign: Callable[[], x509.Certificate],
                    renew_at: Callable[[x509.Certificate], dt.datetime]) -> Issued:
        if issuance.token_id is not None and not self.consume_token(issuance.token_id,
                                                                     issuance.device_id):
            raise Unauthorized("The enrollment token has already been used.",
                               code="auth.token_used")
        device = self._locked(Device.select().where(
            Device.device_id == issuance.device_id)).first()
        if device is not None and not issuance.known_device:  # enrolled meanwhile
            raise Conflict("This device identity is already enrolled.", code="identity.taken",
                           detail=f"device {issuance.device_id} enrolled concurrently")
        admit(DeviceRecord.of(device) if device is not None else None)
        if issuance.presented_certificate_id is not None:
            self._require_still_active(issuance.presented_certificate_id)
        self._require_active_ca(issuance.issuer)
        certificate = sign()
        now = naive_utc(issuance.now)
        if device is None:
            device = Device.create(device_id=issuance.device_id, group=issuance.group_id,
                                   enrolled_by=issuance.method, status="active",
                                   identity_pin=issuance.identity_pin,
                                   ak_name=issuance.ak_name or "",
                                   last_reset_count=issuance.reset_count)
        else:
            updates: dict[str, Any] = {"updated_at": now}
            if issuance.ak_name is not None:
                updates["ak_name"] = issuance.ak_name
            if issuance.reset_count is not None:
                updates["last_reset_count"] = issuance.reset_count
            Device.update(**updates).where(Device.id == device.id).execute()
        revoked_now = self._supersede(device.id, now, issuance.supersede_grace)
        row = self._record_certificate(device.id, certificate, issuance.method,
                                       renew_at(certificate), issuance.issuer)
        if issuance.evidence is not None:
            AttestationEvidence.create(certificate=row.id, **issuance.evidence)
        PendingRequest.delete().where(PendingRequest.device_id == issuance.device_id).execute()
        if issuance.audit:
            self._append_audit(**issuance.audit, device_id=issuance.device_id, detail={
                "serial": str(certificate.serial_number), "via": issuance.method,
                "not_after": certificate.not_valid_after_utc.isoformat()})
        return Issued(certificate, revoked_now)

    def _require_still_active(self, certificate_id: int) -> None:
        """The certificate presented over mTLS is still the device's active one (a
        concurrent renewal or revocation may have changed that since it was read)."""
        presented = self._first(Certificate.id, certificate_id)
        if presented is None or presented.status == "revoked":
            raise Forbidden("The client certificate has been revoked.", code="cert.revoked")
        if presented.status != "active":
            raise Forbidden("The client certificate has been superseded.",
                            code="cert.superseded")

    def _require_active_ca(self, issuer: str) -> None:
        """After `enroll-server ca rotate` a server that has not reloaded yet (SIGHUP)
        would sign with a retired CA; it answers 503 + Retry-After until it reloads."""
        active = self.active_ca_name()
        if active is not None and active != issuer:
            log.error("issuing CA %r was retired (the active CA is %r): reload this "
                      "server (SIGHUP) to issue from the new CA", issuer, active)
            raise ServiceUnavailable(
                "The issuing CA is being rotated; retry shortly.", code="ca.rotated",
                retry_after=10, detail=f"this process signs with retired CA {issuer!r}; "
                                       f"active is {active!r}")

    def _supersede(self, device_pk: int, now: dt.datetime,
                   grace: dt.timedelta) -> tuple[str, ...]:
        """A device holds one active certificate: older ones become superseded, and are
        revoked (reason superseded) after the group's grace period; at once when it is
        zero. Returns the issuers of the certificates revoked now."""
        replaced = Certificate.status == "active"
        if grace > dt.timedelta(0):
            Certificate.update(status="superseded", revoke_after=now + grace).where(
                (Certificate.device == device_pk) & replaced).execute()
            return ()
        issuers = tuple(sorted({issuer for (issuer,) in Certificate.select(
            Certificate.issuer).where((Certificate.device == device_pk) & replaced).tuples()}))
        if issuers:
            Certificate.update(status="revoked", revoked_at=now, revoke_after=now,
                               revocation_reason="superseded").where(
                (Certificate.device == device_pk) & replaced).execute()
        return issuers

    def _record_certificate(self, device_pk: int, certificate: x509.Certificate,
                            issued_via: str, renew_at: dt.datetime | None,
                            issuer: str) -> Certificate:
        der = certificate.public_bytes(serialization.Encoding.DER)
        return Certificate.create(
            serial=str(certificate.serial_number), device=device_pk,
            fingerprint_sha256=certificate.fingerprint(hashes.SHA256()).hex(),
            public_key_sha256=public_key_sha256(certificate.public_key()),
            subject=certificate.subject.rfc4514_string(),
            not_before=naive_utc(certificate.not_valid_before_utc),
            not_after=naive_utc(certificate.not_valid_after_utc),
            der=der, issued_via=issued_via, issuer=issuer,
            renew_at=naive_utc(renew_at) if renew_at is not None else None)

