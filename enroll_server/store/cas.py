"""The issuing CA generations (table issuing_ca): which exist, which one is active."""

from __future__ import annotations

import datetime as dt
from typing import Any

import peewee as pw

from .models import Certificate, IssuingCa, naive_utc
from .transactions import Transactions


class CaGenerations(Transactions):
    def ca_rows(self) -> list[IssuingCa]:
        """Every recorded CA generation, oldest first."""
        with self.transaction(readonly=True):
            return list(IssuingCa.select().order_by(IssuingCa.id))

    def ca_certificate_pem(self, name: str) -> str | None:
        row = IssuingCa.select(IssuingCa.certificate_pem).where(IssuingCa.name == name).first()
        return row.certificate_pem if row is not None else None

    def record_first_ca(self, fields: dict[str, Any]) -> bool:
        """Record the first CA generation unless one is recorded; True if this did.
        Safe when several processes start at once."""
        with self.transaction(readonly=True):
            if IssuingCa.select().exists():
                return False
        try:
            with self.transaction():
                if IssuingCa.select().exists():
                    return False
                IssuingCa.create(status="active", **fields)
        except pw.IntegrityError:
            return False  # another process recorded it meanwhile
        return True

    def client_trusted_cas(self, now: dt.datetime) -> list[str]:
        """PEM of the issuing CAs whose device certificates may authenticate over TLS:
        the active one, and each retired one while a certificate it issued is unexpired
        and not revoked (newest first)."""
        with self.transaction(readonly=True):
            result = []
            for row in IssuingCa.select().order_by(IssuingCa.id.desc()):
                if row.status != "active" and not Certificate.select().where(
                        (Certificate.issuer == row.name) & (Certificate.status != "revoked")
                        & (Certificate.not_after > naive_utc(now))).exists():
                    continue
                result.append(row.certificate_pem)
            return result
