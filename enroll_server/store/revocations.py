"""Revocations, CRL rows, certificate status for OCSP, and the relay's periodic writes.

A revocation is one transaction (docs/design.md): the devices it concerns are locked
first (PostgreSQL: SELECT ... FOR UPDATE; SQLite: the write lock), the same lock the
issuing transaction takes, and only then are their certificates read and revoked. So a
certificate issued concurrently is either seen and revoked, or its issuance sees the
revocation and is refused.

Superseded certificates (issue 9.2) count as revoked from their ``revoke_after`` on:
OCSP and CRLs read it that way at once; ``revoke_superseded`` (the relay's duty) records
it as a revocation.

``crl_entries``, ``next_crl_number``, ``store_crl`` and ``latest_crl`` run in the
caller's transaction: CRL publishing builds and signs between reading and storing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import peewee as pw

from ..errors import BadRequest, NotFound
from .audit import Audit
from .models import Certificate, Device, EnrollmentGroup, PublishedCrl, naive_utc
from .records import CrlRecord, RevokedSerial

KEY_COMPROMISE = "keyCompromise"
SUPERSEDED = "superseded"

# notify(device row, serial of its newest affected certificate, scope): queues the
# signed notice in the revocation's transaction (scope "device" or "certificate").
Notify = Callable[[Any, str, str], None]


@dataclass
class Revoked:
    devices: list[str] = field(default_factory=list)
    serials: list[str] = field(default_factory=list)
    already_revoked: int = 0
    issuers: list[str] = field(default_factory=list)  # CAs whose CRL changed


def _revoked_now(now: dt.datetime) -> pw.Expression:
    """Revoked, or superseded past its grace period."""
    return (Certificate.status == "revoked") | (
        (Certificate.status == "superseded") & (Certificate.revoke_after <= now))


def crl_entries(issuer: str, now: dt.datetime) -> list[RevokedSerial]:
    """Every revoked, unexpired certificate ``issuer`` issued, as a CRL lists it."""
    naive = naive_utc(now)
    return [RevokedSerial(serial, revoked_at if status == "revoked" else revoke_after,
                          (reason or "unspecified") if status == "revoked" else SUPERSEDED)
            for serial, status, revoked_at, reason, revoke_after in Certificate.select(
                Certificate.serial, Certificate.status, Certificate.revoked_at,
                Certificate.revocation_reason, Certificate.revoke_after)
            .where(_revoked_now(naive) & (Certificate.issuer == issuer)
                   & (Certificate.not_after > naive)).tuples()]


def next_crl_number(issuer: str) -> int:
    return (PublishedCrl.select(pw.fn.MAX(PublishedCrl.crl_number)).where(
        PublishedCrl.issuer == issuer).scalar() or 0) + 1


def store_crl(issuer: str, number: int, der: bytes, entries: int, this_update: dt.datetime,
              next_update: dt.datetime) -> CrlRecord:
    row = PublishedCrl.create(issuer=issuer, crl_number=number, der=der,
                              this_update=naive_utc(this_update),
                              next_update=naive_utc(next_update), entries=entries,
                              created_at=naive_utc(this_update))
    return CrlRecord.of(row)


def latest_crl(issuer: str) -> CrlRecord | None:
    """The newest CRL of issuing CA ``issuer`` (a CA generation name)."""
    row = (PublishedCrl.select().where(PublishedCrl.issuer == issuer)
           .order_by(PublishedCrl.crl_number.desc()).first())
    return CrlRecord.of(row) if row is not None else None


class Revocations(Audit):
    # -- revoking ----------------------------------------------------------------------
    def revoke(self, *, reason: str, now: dt.datetime, actor: str, notify: Notify,
               device_id: str | None = None, serial: str | None = None,
               group: str | None = None) -> Revoked:
        """Revoke a device (all its certificates), one certificate (by decimal serial),
        or every device of a group; keyCompromise also revokes every other certificate
        carrying the same public key. One transaction, audit row included."""
        naive_now = naive_utc(now)
        result = Revoked()
        with self.transaction():
            devices, certificates = self._targets(device_id, serial, group, naive_now)
            if reason == KEY_COMPROMISE:
                certificates = self._same_key(certificates, naive_now)
            result.already_revoked = sum(c.status == "revoked" for c in certificates)
            live = [c for c in certificates if c.status != "revoked"]
            if live:
                Certificate.update(status="revoked", revoked_at=naive_now,
                                   revocation_reason=reason).where(
                    Certificate.id.in_([c.id for c in live])).execute()
            blocked = [d for d in devices if d.status != "revoked"]
            if blocked:
                Device.update(status="revoked", revoked_at=naive_now,
                              revocation_reason=reason, updated_at=naive_now).where(
                    Device.id.in_([d.id for d in blocked])).execute()
            notified = self._notify(blocked, live, notify)
            result.devices = sorted(d.device_id for d in notified)
            result.serials = [c.serial for c in live]
            result.issuers = sorted({c.issuer for c in live})
            self._append_audit(
                actor=actor, action="revoke", outcome="success",
                device_id=device_id or (result.devices[0] if len(result.devices) == 1
                                        else None),
                group=group, detail={"reason": reason, "serials": result.serials[:50],
                                     "devices": len(result.devices), "target": {
                                         "device": device_id, "serial": serial,
                                         "group": group}})
        return result

    def _lock_devices(self, condition: pw.Expression) -> list[Device]:
        """The devices matching ``condition``, locked in id order (no deadlock between
        revocations; an issuance locks one device only)."""
        query = Device.select(Device, EnrollmentGroup).join(EnrollmentGroup).where(
            condition).order_by(Device.id)
        return list(query.for_update(of=Device) if self.postgres else query)

    def _targets(self, device_id: str | None, serial: str | None, group: str | None,
                 now: dt.datetime) -> tuple[list[Device], list[Certificate]]:
        unexpired = Certificate.not_after > now
        if device_id is not None:
            devices = self._lock_devices(Device.device_id == device_id)
            if not devices:
                raise NotFound("No such device.", code="revoke.unknown_device")
            return devices, self._certificates_of(devices, unexpired)
        if serial is not None:
            try:
                decimal = str(int(serial, 16))
            except ValueError:
                raise BadRequest("The serial must be hexadecimal.", code="revoke.bad_serial"
                                 ) from None
            found = self._first(Certificate.serial, decimal)
            if found is None:
                raise NotFound("No certificate with this serial.",
                               code="revoke.unknown_serial")
            self._lock_devices(Device.id == found.device_id)
            return [], [self._certificate_with_device(Certificate.serial == decimal)[0]]
        group_row = EnrollmentGroup.get_or_none(EnrollmentGroup.name == group)
        if group_row is None:
            raise NotFound("No such enrollment group.", code="revoke.unknown_group")
        devices = self._lock_devices(Device.group == group_row.id)
        return devices, self._certificates_of(devices, unexpired)

    def _certificates_of(self, devices: list[Device],
                         condition: pw.Expression) -> list[Certificate]:
        if not devices:
            return []
        return self._certificate_with_device(
            Certificate.device.in_([d.id for d in devices]) & condition)

    @staticmethod
    def _certificate_with_device(condition: pw.Expression) -> list[Certificate]:
        return list(Certificate.select(Certificate, Device, EnrollmentGroup)
                    .join(Device).join(EnrollmentGroup).where(condition)
                    .order_by(Certificate.id))

    def _same_key(self, certificates: list[Certificate],
                  now: dt.datetime) -> list[Certificate]:
        """RFC 5280 5.3.1 keyCompromise: the key is out, so every unexpired certificate
        that carries it goes, whichever device and CA it belongs to."""
        keys = {c.public_key_sha256 for c in certificates}
        if not keys:
            return certificates
        same_key = (Certificate.public_key_sha256.in_(list(keys))) & (
            Certificate.not_after > now)
        owners = {d for (d,) in Certificate.select(Certificate.device).where(same_key).tuples()}
        self._lock_devices(Device.id.in_(list(owners)))
        known = {c.id for c in certificates}
        return certificates + [c for c in self._certificate_with_device(same_key)
                               if c.id not in known]

    @staticmethod
    def _notify(blocked: list[Device], live: list[Certificate],
                notify: Notify) -> list[Device]:
        """One notice per device concerned, naming its newest revoked certificate (or,
        for a device revoked without one, its latest certificate)."""
        newest: dict[int, Certificate] = {}
        for certificate in live:
            known = newest.get(certificate.device_id)
            if known is None or certificate.id > known.id:
                newest[certificate.device_id] = certificate
        blocked_ids = {d.id for d in blocked}
        notified = {d.id: d for d in blocked} | {c.device.id: c.device for c in live}
        for device in notified.values():
            latest = newest.get(device.id) or Certificate.select().where(
                Certificate.device == device).order_by(Certificate.id.desc()).first()
            if latest is not None:  # a device that never had a certificate needs none
                # scope: the device itself (it may not enroll again until readmitted)
                # or only this certificate (it may re-attest and get a new one).
                scope = "device" if device.id in blocked_ids or (
                    device.status == "revoked") else "certificate"
                notify(device, latest.serial, scope)
        return list(notified.values())

    def readmit(self, device_id: str, now: dt.datetime, actor: str) -> bool:
        """Let a revoked device enroll again (its old certificates stay revoked)."""
        with self.transaction():
            changed = Device.update(status="active", revoked_at=None, revocation_reason=None,
                                    updated_at=naive_utc(now)).where(
                (Device.device_id == device_id) & (Device.status == "revoked")).execute()
            if changed:
                self._append_audit(actor=actor, action="readmit", outcome="success",
                                   device_id=device_id)
            return bool(changed)

    def revoke_superseded(self, now: dt.datetime, limit: int = 1000) -> list[str]:
        """Record the revocation (reason superseded, at ``revoke_after``) of superseded
        certificates whose grace period is over; returns the CAs whose CRL changed."""
        naive = naive_utc(now)
        with self.transaction():
            due = list(Certificate.select(Certificate.id, Certificate.issuer).where(
                (Certificate.status == "superseded") & (Certificate.revoke_after <= naive))
                .limit(limit))
            if due:
                Certificate.update(status="revoked", revoked_at=Certificate.revoke_after,
                                   revocation_reason=SUPERSEDED).where(
                    Certificate.id.in_([c.id for c in due])).execute()
            return sorted({c.issuer for c in due})

    # -- status: OCSP and CRLs -----------------------------------------------------------
    def certificate_status(self, serial: int, issuer: str | None,
                           now: dt.datetime) -> RevokedSerial | str:
        """RFC 6960 2.2: "good", "unknown" (not ours, or another CA generation's when
        ``issuer`` is given), or the revocation."""
        with self.transaction(readonly=True):
            row = self._first(Certificate.serial, str(serial))
        if row is None or (issuer is not None and row.issuer != issuer):
            return "unknown"
        if row.status == "revoked":
            return RevokedSerial(row.serial, row.revoked_at,
                                 row.revocation_reason or "unspecified")
        if row.status == "superseded" and row.revoke_after is not None \
                and row.revoke_after <= naive_utc(now):
            return RevokedSerial(row.serial, row.revoke_after, SUPERSEDED)
        return "good"

    def latest_crl(self, issuer: str) -> CrlRecord | None:
        with self.transaction(readonly=True):
            return latest_crl(issuer)

    def crl_is_stale(self, issuer: str, now: dt.datetime, refresh: dt.timedelta) -> bool:
        """No CRL yet, an old one, or a revocation newer than the newest CRL."""
        with self.transaction(readonly=True):
            latest = latest_crl(issuer)
            if latest is None:
                return True
            if latest.created_at < naive_utc(now) - refresh:
                return True
            newest = Certificate.select(pw.fn.MAX(Certificate.revoked_at)).where(
                Certificate.issuer == issuer).scalar()
            return newest is not None and newest > latest.created_at

    def crl_snapshot(self, issuer: str, now: dt.datetime) -> tuple[list[RevokedSerial], int]:
        """The entries and the next number of ``issuer``'s CRL, read beside the writers."""
        with self.transaction(readonly=True):
            return crl_entries(issuer, now), next_crl_number(issuer)

    def add_crl(self, issuer: str, number: int, der: bytes, entries: int,
                this_update: dt.datetime, next_update: dt.datetime) -> CrlRecord:
        """Store a built CRL (a short write); IntegrityError if the number is taken."""
        with self.transaction():
            return store_crl(issuer, number, der, entries, this_update, next_update)

    # -- renewals ------------------------------------------------------------------------
    def schedule_renewals(self, now: dt.datetime, notify: Callable[[Any, Any], None],
                          limit: int = 500) -> int:
        """Certificates past their renew_at get ``notify(device, certificate)`` (a
        renewal-due notice), once; returns how many."""
        naive = naive_utc(now)
        with self.transaction():
            due = list(Certificate.select(Certificate, Device, EnrollmentGroup)
                       .join(Device).join(EnrollmentGroup).where(
                (Certificate.status == "active") & (Device.status == "active")
                & Certificate.renewal_noticed_at.is_null()
                & (Certificate.renew_at <= naive)).limit(limit))
            for certificate in due:
                notify(certificate.device, certificate)
            if due:
                Certificate.update(renewal_noticed_at=naive).where(
                    Certificate.id.in_([c.id for c in due])).execute()
        return len(due)
