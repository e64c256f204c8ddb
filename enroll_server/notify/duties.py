"""Periodic duties of the relay process, each cheap when there is nothing to do.

- renewal: certificates whose ``renew_at`` has come get a signed renewal-due notice
  (once), in the same transaction that marks them noticed;
- CRL: rebuilt when stale (older than revocation.crl_refresh_hours, or older than the
  newest revocation, e.g. when the revoking process could not rebuild it);
- broker CRL: the broker's crlfile follows the newest published CRL (SIGHUP).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable

from ..errors import EnrollError
from ..revocation import CrlPublisher
from ..store.models import Certificate, Device
from ..store.repository import Repository, naive_utc
from .broker import BrokerCrlSync
from .issuer import NoticeIssuer

log = logging.getLogger(__name__)


def schedule_renewals(repository: Repository, notices: NoticeIssuer, now: dt.datetime,
                      limit: int = 500) -> int:
    """Queue renewal-due notices for certificates past their renew_at; returns how many."""
    with repository.transaction():
        due = list(Certificate.select(Certificate, Device).join(Device).where(
            (Certificate.status == "active") & (Device.status == "active")
            & Certificate.renewal_noticed_at.is_null()
            & (Certificate.renew_at <= naive_utc(now))).limit(limit))
        for certificate in due:
            notices.enqueue(certificate.device, "renewal_due", certificate.serial, now,
                            extra={"not_after": certificate.not_after.isoformat() + "Z"})
        if due:
            Certificate.update(renewal_noticed_at=naive_utc(now)).where(
                Certificate.id.in_([c.id for c in due])).execute()
    return len(due)


class Duties:
    """Runs each duty at most every ``every`` seconds; failures are logged, not raised."""

    def __init__(self, repository: Repository, notices: NoticeIssuer, crl: CrlPublisher,
                 broker: BrokerCrlSync | None, clock: Callable[[], dt.datetime],
                 every: float = 1.0) -> None:
        self.repository, self.notices, self.crl, self.broker = repository, notices, crl, broker
        self.clock = clock
        self.every = every
        self._last = 0.0

    def __call__(self) -> None:
        if time.monotonic() - self._last < self.every:
            return
        self._last = time.monotonic()
        for duty in (self.renewals, self.refresh_crl, self.sync_broker):
            try:
                duty()
            except EnrollError as error:
                log.warning("duty %s failed: %s", duty.__name__, error.detail)

    def renewals(self) -> None:
        count = schedule_renewals(self.repository, self.notices, self.clock())
        if count:
            log.info("queued %d renewal-due notice(s)", count)

    def refresh_crl(self) -> None:
        with self.repository.transaction():
            if self.crl.is_stale():
                number = self.crl.publish().crl_number
                log.info("published CRL number %d", number)

    def sync_broker(self) -> None:
        if self.broker is None:
            return
        latest = self.repository.run(self.crl.latest)
        if latest is not None and self.broker.sync(latest.crl_number, bytes(latest.der)):
            log.info("broker CRL updated to number %d", latest.crl_number)
