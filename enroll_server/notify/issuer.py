"""NoticeIssuer: turns a decision into signed notices in the outbox, in the caller's
transaction (ARCHITECTURE: "certificate row + outbox row written together").

Each notice takes the device's next sequence number (Device.notice_sequence, bumped in
the same transaction, so it is strictly increasing per device across replicas), is signed
with the notice-signing key, and becomes one outbox row for the device's topic (retained:
a device that connects later gets the latest) plus, for revocations, one for the group's
fleet-wide revocation topic (gateways; not retained, every revocation matters).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from ..ca.delegated import Delegate
from ..config import NoticeSettings
from ..store.outbox import enqueue_notice
from .notices import Notice, fleet_revocation_topic, sign_notice, topic_for


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
            token = sign_notice(notice, self.signer.key, self.signer.chain)
            rows = [{"topic": topic_for(group, device.device_id, self.topic_prefix),
                     "payload": token, "retain": True, "kind": kind,
                     "device_id": device.device_id}]
            if kind == "revocation":
                rows.append({"topic": fleet_revocation_topic(group, self.topic_prefix),
                             "payload": token, "retain": False, "kind": kind,
                             "device_id": device.device_id})
            return rows

        enqueue_notice(device.id, sign, now)
        return signed[0]
