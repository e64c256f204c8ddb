"""RevocationService: the one place that orders a revocation; CrlPublisher: the CRL.

    revoke: one transaction (store/revocations.py): the devices locked (the lock the
            issuing transaction takes), their certificates revoked (time, RFC 5280 5.3.1
            reason; keyCompromise: every certificate with the same key), device(s)
            revoked, signed notices into the outbox, audit row -> commit (from here the
            revocation survives any crash) -> publish a new CRL.

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
from typing import Any

import peewee as pw
from cryptography import x509

from .ca.crl import RevokedEntry, build_crl, check_crl
from .ca.signer import Signer
from .config import RevocationSettings
from .errors import BadRequest, EnrollError, NotFound
from .notify.issuer import NoticeIssuer
from .store import revocations as crl_rows
from .store.records import CrlRecord, RevokedSerial
from .store.repository import Repository

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


def revoked_entry(revoked: RevokedSerial) -> RevokedEntry:
    return RevokedEntry(int(revoked.serial), revoked.revoked_at.replace(tzinfo=dt.UTC),
                        REASONS.get(revoked.reason))


@dataclass
class RevocationResult:
    devices: list[str] = field(default_factory=list)
    serials: list[str] = field(default_factory=list)
    already_revoked: int = 0
    crl_number: int | None = None  # None if a CRL could not be rebuilt now
    crl_numbers: dict[str, int | None] = field(default_factory=dict)  # per issuing CA


class CrlPublisher:
    """Builds one issuing CA's CRL from the database and stores it.

    Every CA generation has its own: the entries are the revoked, unexpired certificates
    it issued (Certificate.issuer), superseded ones past their grace period included,
    the numbers increase per issuer, and a retired CA keeps signing its CRL until its
    certificate expires.
    """

    def __init__(self, settings: RevocationSettings, signer: Signer,
                 clock: Callable[[], dt.datetime]) -> None:
        self.settings = settings
        self.signer = signer
        self.issuer = signer.name
        self.clock = clock

    def publish(self) -> CrlRecord:
        """A complete CRL of every revoked, unexpired certificate; numbers increase.
        Runs in the caller's transaction (rotation, instance creation)."""
        now = self.clock()
        entries = crl_rows.crl_entries(self.issuer, now)
        number = crl_rows.next_crl_number(self.issuer)
        der = self._build(entries, number, now)
        return crl_rows.store_crl(self.issuer, number, der, len(entries), now,
                                  self._next_update(now))

    def publish_from(self, repository: Repository) -> CrlRecord:
        """The same, without holding the database's write lock while signing: read in a
        read-only transaction, build and sign outside, insert in a short write one."""
        for _attempt in range(3):
            now = self.clock()
            entries, number = repository.crl_snapshot(self.issuer, now)
            der = self._build(entries, number, now)
            try:
                return repository.add_crl(self.issuer, number, der, len(entries), now,
                                          self._next_update(now))
            except pw.IntegrityError:  # another process published this number meanwhile
                continue
        raise EnrollError(code="crl.publish_conflict", detail="three CRL number collisions")

    def _next_update(self, now: dt.datetime) -> dt.datetime:
        return now + dt.timedelta(hours=self.settings.crl_validity_hours)

    def _build(self, entries: list[RevokedSerial], number: int, now: dt.datetime) -> bytes:
        """Build, sign and check: a CRL that does not verify is never stored."""
        der = build_crl(self.signer.private_key, self.signer.ca_certificate,
                        [revoked_entry(e) for e in entries], number, now,
                        self._next_update(now))
        try:
            check_crl(der, self.signer.ca_certificate, number - 1 if number > 1 else None)
        except ValueError as error:
            raise EnrollError(code="crl.build_invalid", detail=f"{self.issuer}: {error}"
                              ) from error
        return der

    def latest(self, repository: Repository) -> CrlRecord | None:
        return repository.latest_crl(self.issuer)

    def is_stale(self, repository: Repository) -> bool:
        """No CRL yet, an old one, or a revocation newer than the newest CRL."""
        return repository.crl_is_stale(self.issuer, self.clock(), dt.timedelta(
            hours=self.settings.crl_refresh_hours))


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

        def notify(device: Any, serial_: str, scope: str) -> None:
            self.notices.enqueue(device, "revocation", serial_, now, reason=flag.value,
                                 extra={"scope": scope})

        revoked = self.repository.revoke(reason=flag.value, now=now, actor=actor,
                                         notify=notify, device_id=device_id, serial=serial,
                                         group=group)
        result = RevocationResult(devices=revoked.devices, serials=revoked.serials,
                                  already_revoked=revoked.already_revoked)
        # The CRLs of the CAs that issued what was just revoked (the active CA's if none).
        issuers = revoked.issuers or [self.default_issuer]
        result.crl_numbers = self.crls_changed(issuers)
        if self.rebuilder is None:
            result.crl_number = (None if None in result.crl_numbers.values()
                                 else max(result.crl_numbers.values(), default=None))
        return result

    def crls_changed(self, issuers: list[str]) -> dict[str, int | None]:
        """After a commit that revoked certificates of ``issuers``: in a server, one
        background rebuild serves a burst (numbers unknown yet: None); elsewhere the
        CRLs are rebuilt now."""
        if self.rebuilder is not None:
            self.rebuilder.request(issuers)
            return dict.fromkeys(issuers)
        return self.republish_crls(issuers)

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

    def readmit(self, device_id: str, actor: str) -> None:
        """Let a revoked device enroll again (its old certificates stay revoked)."""
        if not self.repository.readmit(device_id, self.clock(), actor):
            raise NotFound("No revoked device with this id.", code="readmit.not_revoked")


class CrlRebuilder:
    """One thread per process; ``request`` marks CAs dirty and returns at once."""

    def __init__(self, service: RevocationService) -> None:
        self.service = service
        self._dirty: set[str] = set()
        self._wake = threading.Condition()
        self._stopped = False
        self.rebuilds = 0
        self._thread = threading.Thread(target=self._run, name="crl-rebuilder", daemon=True)
        self._thread.start()

    def request(self, issuers: list[str]) -> None:
        with self._wake:
            self._dirty.update(issuers)
            self._wake.notify()

    def stop(self) -> None:
        """Finish the rebuild under way and any requested, then end the thread."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._dirty and not self._stopped:
                    self._wake.wait()
                if not self._dirty:
                    return
                issuers, self._dirty = sorted(self._dirty), set()
            self.service.republish_crls(issuers)  # logs failures; the relay retries
            self.rebuilds += 1
