"""The issuing CA generations (table issuing_ca): which exist, which one is active."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, TypeVar

import peewee as pw

from ..errors import Conflict
from .models import Certificate, Device, EnrollmentGroup, IssuingCa, naive_utc
from .transactions import Transactions

T = TypeVar("T")


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

    def unexpired_certificates(self, issuer: str, now: dt.datetime) -> int:
        """How many certificates of this CA generation are unexpired and not revoked."""
        with self.transaction(readonly=True):
            return Certificate.select().where(
                (Certificate.issuer == issuer) & (Certificate.status != "revoked")
                & (Certificate.not_after > naive_utc(now))).count()

    def rotate_ca(self, new_ca: dict[str, Any], previous: str, now: dt.datetime,
                  in_transaction: Callable[[list[str], list[Any]], T]) -> T:
        """Step 4 of a CA rotation (rotation.py), one transaction: the active generation
        (``previous``) retired, ``new_ca`` recorded as the active one, then
        ``in_transaction(retired names, certificates)`` with every unexpired active
        certificate of an active device (rows with .serial and .device, oldest first):
        the new CA's first CRL, the renewal notices and the audit record commit with it.

        Conflict ca.rotation_conflict when another rotation finished meanwhile."""
        naive = naive_utc(now)
        with self.transaction():
            retired = [row.name for row in IssuingCa.select().where(
                IssuingCa.status == "active")]
            if retired != [previous] or IssuingCa.select().where(
                    IssuingCa.name == new_ca["name"]).exists():
                raise Conflict("Another rotation finished meanwhile; see `enroll-server ca "
                               "list` before rotating again.", code="ca.rotation_conflict")
            IssuingCa.update(status="retired", retired_at=naive).where(
                IssuingCa.status == "active").execute()
            IssuingCa.create(status="active", created_at=naive, **new_ca)
            current = list(Certificate.select(Certificate, Device, EnrollmentGroup)
                           .join(Device).join(EnrollmentGroup).where(
                (Certificate.status == "active") & (Device.status == "active")
                & (Certificate.not_after > naive)).order_by(Certificate.id))
            return in_transaction(retired, current)
