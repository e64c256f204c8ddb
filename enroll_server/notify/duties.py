"""Periodic duties of the relay process, each cheap when there is nothing to do.

- CA generations: re-read from the database every ``refresh_every`` seconds, so a
  rotation (`enroll-server ca rotate`) reaches the relay without a restart: the new CA's
  CRL is kept fresh, notices are signed by the active CA's notice signer, and a retired
  CA's CRL is kept until its certificate expires;
- renewal: certificates whose ``renew_at`` has come get a signed renewal-due notice
  (once), in the same transaction that marks them noticed;
- deferred notices: notices written while the notice signer (in the HSM) was away are
  signed and released (notify/issuer.py);
- superseded certificates: once a renewed certificate's grace period is over (the
  group's ``supersede_grace_seconds``), its revocation (reason superseded) is recorded.
  OCSP and every CRL built from then on already count it as revoked; recording it makes
  the CRL stale, so the next duty publishes it at once;
- CRL: each live CA's CRL is rebuilt when stale (older than revocation.crl_refresh_hours,
  or older than the newest revocation of that CA, e.g. when the revoking process could
  not rebuild it);
- broker CRL: the broker's crlfile follows the newest CRL of every live CA, its cafile
  the live CAs (SIGHUP).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable

from ..authorities import Authorities
from ..ca.signer import Signer
from ..config import RevocationSettings
from ..errors import EnrollError
from ..revocation import CrlPublisher
from ..store.repository import Repository
from .broker import BrokerCrlSync
from .issuer import NoticeIssuer

log = logging.getLogger(__name__)


def schedule_renewals(repository: Repository, notices: NoticeIssuer, now: dt.datetime,
                      limit: int = 500) -> int:
    """Queue renewal-due notices for certificates past their renew_at; returns how many."""
    return repository.schedule_renewals(now, lambda device, certificate: notices.enqueue(
        device, "renewal_due", certificate.serial, now,
        extra={"not_after": certificate.not_after.isoformat() + "Z"}), limit)


class Duties:
    """Runs each duty at most every ``every`` seconds; failures are logged, not raised."""

    def __init__(self, repository: Repository, authorities: Authorities,
                 notices_for: Callable[[Signer], NoticeIssuer], settings: RevocationSettings,
                 broker: BrokerCrlSync | None, clock: Callable[[], dt.datetime],
                 every: float = 1.0, refresh_every: float = 10.0) -> None:
        self.repository, self.authorities, self.broker = repository, authorities, broker
        self.notices_for = notices_for
        self.settings = settings
        self.clock = clock
        self.every = every
        self.refresh_every = refresh_every
        self._last = 0.0
        self._last_refresh = time.monotonic()
        self._adopt()

    def _adopt(self) -> None:
        """Publishers and the notice signer for the CAs ``authorities`` holds now."""
        active = self.authorities.active
        self.crls = {signer.name: CrlPublisher(self.settings, signer, self.clock)
                     for signer in self.authorities.live()}
        self.notices = self.notices_for(active)
        self._notices_from = active.name

    def __call__(self) -> None:
        if time.monotonic() - self._last < self.every:
            return
        self._last = time.monotonic()
        for duty in (self.refresh_authorities, self.sign_deferred_notices, self.renewals,
                     self.revoke_superseded,
                     self.refresh_crl, self.sync_broker):
            try:
                duty()
            except EnrollError as error:
                log.warning("duty %s failed: %s", duty.__name__, error.detail)

    def refresh_authorities(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_refresh < self.refresh_every:
            return
        self._last_refresh = time.monotonic()
        if self.authorities.refresh():
            self._adopt()
            log.info("issuing CAs now %s (active %s)",
                     ", ".join(self.crls), self.authorities.active.name)

    def sign_deferred_notices(self) -> None:
        count = self.notices.sign_deferred(self.repository, self.clock())
        if count:
            log.info("signed %d held-back notice(s)", count)

    def renewals(self) -> None:
        count = schedule_renewals(self.repository, self.notices, self.clock())
        if count:
            log.info("queued %d renewal-due notice(s)", count)

    def revoke_superseded(self) -> None:
        issuers = self.repository.revoke_superseded(self.clock())
        if issuers:
            log.info("recorded the revocation of superseded certificates of %s",
                     ", ".join(issuers))

    def refresh_crl(self) -> None:
        failures = []
        for name, publisher in self.crls.items():
            try:
                if publisher.is_stale(self.repository):
                    number = publisher.publish_from(self.repository).crl_number
                    log.info("published CRL number %d of %s", number, name)
            except EnrollError as error:  # one CA's failure does not stop the others
                failures.append(error)
        if failures:
            raise failures[0]

    def sync_broker(self) -> None:
        if self.broker is None:
            return
        crls = []
        for name, publisher in self.crls.items():
            latest = publisher.latest(self.repository)
            if latest is not None:
                crls.append((name, latest.crl_number, bytes(latest.der)))
        trusted = [signer.ca_certificate for signer in self.authorities.live()] + list(
            self.authorities.chain)
        if self.broker.sync(crls, trusted):
            log.info("broker CRLs updated: %s", ", ".join(
                f"{name} #{number}" for name, number, _ in crls))
