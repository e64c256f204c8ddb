"""RevocationService: the one place that orders a revocation; CrlPublisher: the CRL.

    revoke: find the certificates -> one transaction: certificates revoked (time, RFC 5280
            5.3.1 reason), device(s) revoked, signed notices into the outbox, audit row
            -> commit (from here the revocation survives any crash) -> publish a new CRL.

What learns of it and when:
- OCSP answers from the database on every request: at once, in every replica;
- the CRL of the CA that issued each revoked certificate (CA generations: a retired CA
  keeps publishing its own CRL) is rebuilt right after the commit; if that fails, the
  relay's periodic duty rebuilds it (it notices a revocation newer than the newest CRL);
- the broker's crlfile and the device notice follow from the relay (notify/).

A revoked device cannot enroll again in any way until an operator re-admits it
(``readmit``); its certificates stay revoked. Revoking one certificate by serial blocks
only that certificate (e.g. a key rotated after a suspected compromise).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import peewee as pw
from cryptography import x509

from .ca.crl import RevokedEntry, build_crl, check_crl
from .ca.signer import Signer
from .config import RevocationSettings
from .errors import BadRequest, EnrollError, NotFound
from .notify.issuer import NoticeIssuer
from .store.models import Certificate, Device, EnrollmentGroup, PublishedCrl
from .store.repository import Repository, naive_utc

log = logging.getLogger(__name__)

# RFC 5280 5.3.1 CRLReason names; removeFromCRL is for delta CRLs only.
REASONS = {flag.value: flag for flag in x509.ReasonFlags
           if flag is not x509.ReasonFlags.remove_from_crl}


def parse_reason(name: str) -> x509.ReasonFlags:
    try:
        return REASONS[name]
    except KeyError:
        raise BadRequest(f"Unknown revocation reason {name[:40]!r}; use one of "
                         f"{', '.join(REASONS)}.", code="revoke.bad_reason") from None


@dataclass
class RevocationResult:
    devices: list[str] = field(default_factory=list)
    serials: list[str] = field(default_factory=list)
    already_revoked: int = 0
    crl_number: int | None = None  # None if a CRL could not be rebuilt now
    crl_numbers: dict[str, int | None] = field(default_factory=dict)  # per issuing CA


def latest_crl(issuer: str) -> PublishedCrl | None:
    """The newest CRL of issuing CA ``issuer`` (a CA generation name)."""
    return (PublishedCrl.select().where(PublishedCrl.issuer == issuer)
            .order_by(PublishedCrl.crl_number.desc()).first())


class CrlPublisher:
    """Builds one issuing CA's CRL from the database and stores it (PublishedCrl).

    Every CA generation has its own: the entries are the revoked, unexpired certificates
    it issued (Certificate.issuer), the numbers increase per issuer, and a retired CA
    keeps signing its CRL until its certificate expires.
    """

    def __init__(self, settings: RevocationSettings, signer: Signer,
                 clock: Callable[[], dt.datetime]) -> None:
        self.settings = settings
        self.signer = signer
        self.issuer = signer.name
        self.clock = clock

    def publish(self) -> PublishedCrl:
        """A complete CRL of every revoked, unexpired certificate; numbers increase.
        Runs in the caller's transaction (rotation, instance creation)."""
        now = self.clock()
        entries, number = self._snapshot(now)
        return self._store(number, self._build(entries, number, now), len(entries), now)

    def publish_from(self, repository: Repository) -> PublishedCrl:
        """The same, without holding the database's write lock while signing: read in a
        read-only transaction, build and sign outside, insert in a short write one."""
        for _attempt in range(3):
            now = self.clock()
            with repository.transaction(readonly=True):
                entries, number = self._snapshot(now)
            der = self._build(entries, number, now)
            try:
                with repository.transaction():
                    return self._store(number, der, len(entries), now)
            except pw.IntegrityError:  # another process published this number meanwhile
                continue
        raise EnrollError(code="crl.publish_conflict", detail="three CRL number collisions")

    def _snapshot(self, now: dt.datetime) -> tuple[list[RevokedEntry], int]:
        entries = [RevokedEntry(int(serial), revoked_at.replace(tzinfo=dt.UTC),
                                REASONS.get(reason or "unspecified"))
                   for serial, revoked_at, reason in Certificate.select(
                       Certificate.serial, Certificate.revoked_at,
                       Certificate.revocation_reason)
                   .where((Certificate.status == "revoked")
                          & (Certificate.issuer == self.issuer)
                          & (Certificate.not_after > naive_utc(now))).tuples()]
        number = (PublishedCrl.select(pw.fn.MAX(PublishedCrl.crl_number)).where(
            PublishedCrl.issuer == self.issuer).scalar() or 0) + 1
        return entries, number

    def _build(self, entries: list[RevokedEntry], number: int, now: dt.datetime) -> bytes:
        """Build, sign and check: a CRL that does not verify is never stored."""
        next_update = now + dt.timedelta(hours=self.settings.crl_validity_hours)
        der = build_crl(self.signer.private_key, self.signer.ca_certificate, entries,
                        number, now, next_update)
        try:
            check_crl(der, self.signer.ca_certificate, number - 1 if number > 1 else None)
        except ValueError as error:
            raise EnrollError(code="crl.build_invalid", detail=f"{self.issuer}: {error}"
                              ) from error
        return der

    def _store(self, number: int, der: bytes, entries: int, now: dt.datetime) -> PublishedCrl:
        next_update = now + dt.timedelta(hours=self.settings.crl_validity_hours)
        return PublishedCrl.create(issuer=self.issuer, crl_number=number, der=der,
                                   this_update=naive_utc(now),
                                   next_update=naive_utc(next_update),
                                   entries=entries, created_at=naive_utc(now))

    def latest(self) -> PublishedCrl | None:
        return latest_crl(self.issuer)

    def is_stale(self) -> bool:
        """No CRL yet, an old one, or a revocation newer than the newest CRL."""
        latest = self.latest()
        if latest is None:
            return True
        if latest.created_at < naive_utc(self.clock()) - dt.timedelta(
                hours=self.settings.crl_refresh_hours):
            return True
        newest_revocation = Certificate.select(pw.fn.MAX(Certificate.revoked_at)).where(
            Certificate.issuer == self.issuer).scalar()
        return newest_revocation is not None and newest_revocation > latest.created_at


class RevocationService:
    """crls: a CrlPublisher per live CA generation (by name)."""

    def __init__(self, repository: Repository, notices: NoticeIssuer,
                 crls: Mapping[str, CrlPublisher], clock: Callable[[], dt.datetime]) -> None:
        if not crls:
            raise ValueError("a RevocationService needs at least one CRL publisher")
        self.repository = repository
        self.notices = notices
        self.crls = dict(crls)
        self.clock = clock
        # The active CA's: published when a revocation touched no certificate at all.
        self.default_issuer = next((name for name, publisher in self.crls.items()
                                    if not publisher.signer.retired), list(self.crls)[-1])
        self.rebuilder: CrlRebuilder | None = None

    def rebuild_in_background(self) -> RevocationService:
        """Server processes: revocations return at commit; a background thread rebuilds
        the CRLs, once for any number of revocations that arrive while it works."""
        self.rebuilder = CrlRebuilder(self)
        return self

    def revoke(self, *, actor: str, reason: str = "unspecified", device_id: str | None = None,
               serial: str | None = None, group: str | None = None) -> RevocationResult:
        """Revoke a device (all its certificates), one certificate, or a whole group."""
        if sum(x is not None for x in (device_id, serial, group)) != 1:
            raise BadRequest("Name exactly one of device, serial or group.",
                             code="revoke.target")
        flag = parse_reason(reason)
        now = self.clock()
        result = RevocationResult()
        with self.repository.transaction():
            devices, certificates = self._targets(device_id, serial, group, now)
            result.already_revoked = sum(c.status == "revoked" for c in certificates)
            live = [c for c in certificates if c.status != "revoked"]
            if live:
                Certificate.update(status="revoked", revoked_at=naive_utc(now),
                                   revocation_reason=flag.value).where(
                    Certificate.id.in_([c.id for c in live])).execute()
            blocked = [d for d in devices if d.status != "revoked"]
            if blocked:
                Device.update(status="revoked", revoked_at=naive_utc(now),
                              revocation_reason=flag.value,
                              updated_at=naive_utc(now)).where(
                    Device.id.in_([d.id for d in blocked])).execute()
            newest: dict[int, Certificate] = {}
            for certificate in live:
                known = newest.get(certificate.device_id)
                if known is None or certificate.id > known.id:
                    newest[certificate.device_id] = certificate
            notified = {d.id: d for d in blocked} | {c.device.id: c.device for c in live}
            for device in notified.values():
                latest = newest.get(device.id) or Certificate.select().where(
                    Certificate.device == device).order_by(Certificate.id.desc()).first()
                if latest is not None:  # a device that never had a certificate needs none
                    # scope: the device itself (it may not enroll again until readmitted)
                    # or only this certificate (it may re-attest and get a new one).
                    scope = "device" if device.id in {d.id for d in blocked} or (
                        device.status == "revoked") else "certificate"
                    self.notices.enqueue(device, "revocation", latest.serial, now,
                                         reason=flag.value, extra={"scope": scope})
            result.devices = sorted(d.device_id for d in notified.values())
            result.serials = [c.serial for c in live]
            self.repository.audit(
                actor=actor, action="revoke", outcome="success",
                device_id=device_id or (result.devices[0] if len(result.devices) == 1 else None),
                group=group, detail={"reason": flag.value, "serials": result.serials[:50],
                                     "devices": len(result.devices), "target": {
                                         "device": device_id, "serial": serial, "group": group}})
        # The CRLs of the CAs that issued what was just revoked (the active CA's if none).
        issuers = sorted({c.issuer for c in live}) or [self.default_issuer]
        if self.rebuilder is not None:  # a server: one rebuild serves a burst
            self.rebuilder.request(issuers)
            result.crl_numbers = dict.fromkeys(issuers)
            return result
        result.crl_numbers = self.republish_crls(issuers)
        result.crl_number = (None if None in result.crl_numbers.values()
                             else max(result.crl_numbers.values(), default=None))
        return result

    def republish_crls(self, issuers: list[str] | None = None) -> dict[str, int | None]:
        """After a commit, the CRL of each CA in issuers (default: every live CA): its
        new number, or None where that failed. A failure loses nothing: the relay
        rebuilds stale CRLs, the last good one stays published meanwhile."""
        numbers: dict[str, int | None] = {}
        for issuer in issuers if issuers is not None else list(self.crls):
            publisher = self.crls.get(issuer)
            if publisher is None:  # a CA this process does not know yet: the relay does
                log.warning("no CRL publisher for issuing CA %r here; the relay rebuilds "
                            "its CRL", issuer)
                numbers[issuer] = None
                continue
            try:
                numbers[issuer] = publisher.publish_from(self.repository).crl_number
            except EnrollError as error:  # HSM or database unavailable
                log.warning("CRL rebuild of %s failed, the previous CRL stays published: "
                            "%s", issuer, error.detail)
                numbers[issuer] = None
        return numbers

    def _targets(self, device_id: str | None, serial: str | None, group: str | None,
                 now: dt.datetime) -> tuple[list[Device], list[Certificate]]:
        unexpired = Certificate.not_after > naive_utc(now)
        if device_id is not None:
            device = self.repository.device(device_id)
            if device is None:
                raise NotFound("No such device.", code="revoke.unknown_device")
            return [device], list(Certificate.select().where(
                (Certificate.device == device) & unexpired))
        if serial is not None:
            try:
                decimal = str(int(serial, 16))
            except ValueError:
                raise BadRequest("The serial must be hexadecimal.", code="revoke.bad_serial"
                                 ) from None
            certificate = Certificate.get_or_none(Certificate.serial == decimal)
            if certificate is None:
                raise NotFound("No certificate with this serial.", code="revoke.unknown_serial")
            return [], [certificate]
        group_row = EnrollmentGroup.get_or_none(EnrollmentGroup.name == group)
        if group_row is None:
            raise NotFound("No such enrollment group.", code="revoke.unknown_group")
        devices = list(Device.select().where(Device.group == group_row))
        return devices, list(Certificate.select().join(Device).where(
            (Device.group == group_row) & unexpired))

    def readmit(self, device_id: str, actor: str) -> None:
        """Let a revoked device enroll again (its old certificates stay revoked)."""
        with self.repository.transaction():
            changed = Device.update(status="active", revoked_at=None, revocation_reason=None,
                                    updated_at=naive_utc(self.clock())).where(
                (Device.device_id == device_id) & (Device.status == "revoked")).execute()
            if not changed:
                raise NotFound("No revoked device with this id.", code="readmit.not_revoked")
            self.repository.audit(actor=actor, action="readmit", outcome="success",
                                  device_id=device_id)


class CrlRebuilder:
    """One thread per process; ``request`` marks CAs dirty and returns at once."""

    def __init__(self, service: RevocationService) -> None:
        self.service = service
        self._dirty: set[str] = set()
        self._wake = threading.Condition()
        self.rebuilds = 0
        threading.Thread(target=self._run, name="crl-rebuilder", daemon=True).start()

    def request(self, issuers: list[str]) -> None:
        with self._wake:
            self._dirty.update(issuers)
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._dirty:
                    self._wake.wait()
                issuers, self._dirty = sorted(self._dirty), set()
            self.service.republish_crls(issuers)  # logs failures; the relay retries
            self.rebuilds += 1
