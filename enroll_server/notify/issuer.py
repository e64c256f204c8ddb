"""NoticeIssuer: turns a decision into signed notices in the outbox, in the caller's
transaction (ARCHITECTURE: "certificate row + outbox row written together").

Each notice takes the device's next sequence number (Device.notice_sequence, bumped in
the same transaction, so it is strictly increasing per device across replicas), is signed
with the notice-signing key, and becomes one outbox row for the device's topic (retained:
a device that connects later gets the latest) plus, for revocations, one for the group's
fleet-wide revocation topic (gateways; not retained, every revocation matters).

The notice signer lives in the HSM token when the CA key does (ca/delegated.py). A token
outage must not block a revocation, so a notice that cannot be signed now is written
unsigned and held back (its rows are never due: nothing behind them on the same topic is
published either, so order is kept); the relay's duties sign it once the token answers
(``sign_deferred``). Devices only ever receive signed notices.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from typing import Any

from ..ca.delegated import Delegate
from ..config import NoticeSettings
from ..errors import SignerUnavailable
from ..store.outbox import HELD_BACK, enqueue_notice
from .notices import Notice, fleet_revocation_topic, sign_notice, topic_for

log = logging.getLogger(__name__)
DEFERRED = "unsigned-notice:"  # payload prefix of a notice waiting for its signature


class NoticeIssuer:
    def __init__(self, settings: NoticeSettings, signer: Delegate, topic_prefix: str = "fleet"):
        self.settings = settings
        self.signer = signer
        self.topic_prefix = topic_prefix

    def enqueue(self, device: Any, kind: str, serial: int | str, now: dt.datetime,
                reason: str | None = None,
                extra: Mapping[str, object] | None = None) -> Notice:  # fmt: skip
        """Sign a notice for ``device`` (a device row the repository handed over: id,
        device_id, group.name) and write its outbox rows. Call inside the transaction
        that made the decision."""
        group = device.group.name
        signed: list[Notice] = []

        def sign(sequence: int) -> list[dict[str, Any]]:
            notice = Notice(device_id=device.device_id, type=kind, serial=str(serial),
                            sequence=sequence, issued_at=now,
                            expires_at=now + dt.timedelta(days=self.settings.ttl_days),
                            group=group, reason=reason, extra=dict(extra or {}))
            signed.append(notice)
            try:
                token, held = sign_notice(notice, self.signer.key, self.signer.chain), {}
            except SignerUnavailable as error:
                log.warning("notice %s #%d for %s held back until the notice signer is "
                            "available: %s", kind, sequence, device.device_id, error.detail)
                token, held = DEFERRED + json.dumps(_fields(notice)), {"available_at": HELD_BACK}
            rows = [{"topic": topic_for(group, device.device_id, self.topic_prefix),
                     "payload": token, "retain": True, "kind": kind,
                     "device_id": device.device_id, **held}]
            if kind == "revocation":
                rows.append({"topic": fleet_revocation_topic(group, self.topic_prefix),
                             "payload": token, "retain": False, "kind": kind,
                             "device_id": device.device_id, **held})
            return rows

        enqueue_notice(device.id, sign, now)
        return signed[0]

    def sign_deferred(self, repository: Any, now: dt.datetime, limit: int = 500) -> int:
        """Sign held-back notices and release their rows; returns how many notices.
        Raises SignerUnavailable (nothing changed) while the signer is still away."""
        def sign(payload: str) -> str:
            notice = _notice(json.loads(payload.removeprefix(DEFERRED)))
            return sign_notice(notice, self.signer.key, self.signer.chain)

        return repository.release_held_back(DEFERRED, sign, now, limit)


def _fields(notice: Notice) -> dict[str, object]:
    return {"device_id": notice.device_id, "type": notice.type, "serial": notice.serial,
            "sequence": notice.sequence, "issued_at": notice.issued_at.isoformat(),
            "expires_at": notice.expires_at.isoformat(), "group": notice.group,
            "reason": notice.reason, "extra": dict(notice.extra)}


def _notice(fields: dict) -> Notice:
    return Notice(**{**fields, "issued_at": dt.datetime.fromisoformat(fields["issued_at"]),
                     "expires_at": dt.datetime.fromisoformat(fields["expires_at"])})
