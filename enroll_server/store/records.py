"""What the repository hands to services: frozen values, detached from the database.

Services and routes never see a model class: they read these, decide, and ask the
repository to write. Times are naive UTC, as stored.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DeviceRecord:
    id: int
    device_id: str
    group_id: int
    status: str  # "active", "revoked"
    enrolled_by: str  # "token", "bootstrap", "tpm"
    identity_pin: str
    ak_name: str
    last_reset_count: int | None

    @property
    def revoked(self) -> bool:
        return self.status == "revoked"

    @classmethod
    def of(cls, row: Any) -> DeviceRecord:
        return cls(row.id, row.device_id, row.group_id, row.status, row.enrolled_by,
                   row.identity_pin, row.ak_name, row.last_reset_count)


@dataclass(frozen=True)
class CertificateRecord:
    id: int
    serial: str
    device_id: int  # Device.id (the row), not the device's name
    status: str  # "active", "superseded", "revoked"
    public_key_sha256: str
    not_before: dt.datetime
    not_after: dt.datetime
    der: bytes
    revoke_after: dt.datetime | None  # superseded: revoked from then on (schema 4)

    def effective_status(self, now: dt.datetime) -> str:
        """"revoked" once a superseded certificate's grace period is over, even before
        the relay records it (docs/design.md, "Superseded certificates")."""
        if self.status == "superseded" and self.revoke_after is not None \
                and self.revoke_after <= now:
            return "revoked"
        return self.status

    @classmethod
    def of(cls, row: Any) -> CertificateRecord:
        return cls(row.id, row.serial, row.device_id, row.status, row.public_key_sha256,
                   row.not_before, row.not_after, bytes(row.der), row.revoke_after)


@dataclass(frozen=True)
class TokenRecord:
    id: int
    token_sha256: str
    group_id: int
    device_id: str | None  # the device the operator bound it to
    expires_at: dt.datetime
    used_at: dt.datetime | None
    used_by_device: str | None

    @classmethod
    def of(cls, row: Any) -> TokenRecord:
        return cls(row.id, row.token_sha256, row.group_id, row.device_id, row.expires_at,
                   row.used_at, row.used_by_device)


@dataclass(frozen=True)
class ChallengeRecord:
    id: int
    challenge_id: str
    group_id: int
    group_name: str
    device_id: str  # hex SHA-256 of the EK public key
    ek_public: bytes
    ek_certificate: bytes | None
    ak_public: bytes
    ak_name: str
    secret_sha256: str
    nonce: bytes
    expires_at: dt.datetime

    @classmethod
    def of(cls, row: Any) -> ChallengeRecord:
        return cls(row.id, row.challenge_id, row.group_id, row.group.name, row.device_id,
                   bytes(row.ek_public),
                   bytes(row.ek_certificate) if row.ek_certificate is not None else None,
                   bytes(row.ak_public), row.ak_name, row.secret_sha256, bytes(row.nonce),
                   row.expires_at)


@dataclass(frozen=True)
class CrlRecord:
    issuer: str
    crl_number: int
    der: bytes
    this_update: dt.datetime
    next_update: dt.datetime
    entries: int
    created_at: dt.datetime

    @classmethod
    def of(cls, row: Any) -> CrlRecord:
        return cls(row.issuer, row.crl_number, bytes(row.der), row.this_update,
                   row.next_update, row.entries, row.created_at)


@dataclass(frozen=True)
class RevokedSerial:
    """One CRL entry or OCSP "revoked" answer (RFC 5280 5.3.1 reason name)."""

    serial: str
    revoked_at: dt.datetime
    reason: str
