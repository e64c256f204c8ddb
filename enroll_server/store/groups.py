"""Enrollment groups, their one-time tokens, EK allowlists and manual approvals."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from typing import Any

from ..errors import Conflict, NotFound
from ..policy.group import GroupPolicy
from .models import EkAllowlistEntry, EnrollmentGroup, EnrollmentToken, PendingRequest, utcnow
from .records import TokenRecord
from .transactions import Transactions

# Group settings an operator may change after creation (`enroll-server group set-*`).
_CHANGEABLE = {"pcr_policy", "ek_crls_pem", "ek_vendors", "supersede_grace_seconds"}


def token_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Groups(Transactions):
    # -- enrollment groups -------------------------------------------------------------
    def create_group(self, name: str, **fields: Any) -> EnrollmentGroup:
        with self.transaction():
            if EnrollmentGroup.get_or_none(EnrollmentGroup.name == name):
                raise Conflict(f"Enrollment group {name!r} already exists.",
                               code="group.exists")
            return EnrollmentGroup.create(name=name, **fields)

    def group(self, name: str) -> EnrollmentGroup:
        """The group row (operator commands); services use ``group_policy``."""
        with self.transaction(readonly=True):
            group = self._first(EnrollmentGroup.name, name)
        if group is None:
            raise NotFound(f"No enrollment group named {name!r}.", code="group.not_found")
        return group

    def group_policy(self, name: str) -> GroupPolicy:
        """The group's rules as one frozen value (policy/group.py)."""
        return GroupPolicy.of(self.group(name))

    def group_policy_by_id(self, group_id: int) -> GroupPolicy:
        row = self._first(EnrollmentGroup.id, group_id)
        if row is None:  # pragma: no cover - foreign keys forbid it
            raise NotFound("No such enrollment group.", code="group.not_found")
        return GroupPolicy.of(row)

    def groups(self) -> list[EnrollmentGroup]:
        with self.transaction(readonly=True):
            return list(EnrollmentGroup.select().order_by(EnrollmentGroup.name))

    def bootstrap_ca_bundles(self) -> list[str]:
        """Every group's bootstrap CA bundle (PEM), for the TLS trust store."""
        with self.transaction(readonly=True):
            return [g.bootstrap_ca_pem for g in EnrollmentGroup.select(
                EnrollmentGroup.bootstrap_ca_pem) if g.bootstrap_ca_pem.strip()]

    def change_group(self, name: str, **fields: Any) -> None:
        """Change the settings an operator may change after creation."""
        unknown = set(fields) - _CHANGEABLE
        if unknown:  # pragma: no cover - a programming error
            raise ValueError(f"not changeable: {sorted(unknown)}")
        with self.transaction():
            changed = EnrollmentGroup.update(**fields).where(
                EnrollmentGroup.name == name).execute()
        if not changed:
            raise NotFound(f"No enrollment group named {name!r}.", code="group.not_found")

    # -- EK allowlist ------------------------------------------------------------------
    def allowlist_ek(self, group_id: int, ek_sha256: str, note: str, remove: bool) -> bool:
        """Add (or remove) one EK; True if that changed the list."""
        with self.transaction():
            if remove:
                return bool(EkAllowlistEntry.delete().where(
                    (EkAllowlistEntry.group == group_id)
                    & (EkAllowlistEntry.ek_sha256 == ek_sha256)).execute())
            return bool(EkAllowlistEntry.insert(group=group_id, ek_sha256=ek_sha256,
                                                note=note[:256])
                        .on_conflict_ignore().execute())

    def allowlist_eks(self, group_id: int, entries: Iterable[tuple[str, str]],
                      remove: bool) -> int:
        """Add (or remove) many (EK hash, note) entries in one transaction, all or none;
        returns how many changed the list."""
        changed = 0
        with self.transaction():
            for ek_sha256, note in entries:
                changed += self.allowlist_ek(group_id, ek_sha256, note, remove)
        return changed

    def allowlisted(self, group_id: int, ek_sha256: str) -> list[str]:
        """The allowlist entry for this EK, if any: one indexed lookup (the EK hash is
        public, nothing to hide by scanning every entry)."""
        return [entry.ek_sha256 for entry in
                EkAllowlistEntry.select(EkAllowlistEntry.ek_sha256)
                .where((EkAllowlistEntry.group == group_id)
                       & (EkAllowlistEntry.ek_sha256 == ek_sha256))]

    # -- enrollment tokens ------------------------------------------------------------
    def create_token(self, group: EnrollmentGroup, ttl: dt.timedelta, created_by: str,
                     device_id: str | None = None) -> tuple[str, EnrollmentToken]:
        """A one-time bearer secret (256 bits); only its SHA-256 is stored."""
        secret = "et_" + secrets.token_urlsafe(32)
        with self.transaction():
            row = EnrollmentToken.create(
                token_sha256=token_sha256(secret), group=group, device_id=device_id,
                created_by=created_by, expires_at=utcnow() + ttl)
        return secret, row

    def create_tokens(self, group_name: str, secrets_: Iterable[str], ttl: dt.timedelta,
                      created_by: str) -> int:
        """Many tokens in one transaction (benchmarks, factory batches)."""
        now = utcnow()
        with self.transaction():
            group = self.group(group_name)
            rows = [{"token_sha256": token_sha256(secret), "group": group.id,
                     "created_by": created_by, "created_at": now, "expires_at": now + ttl}
                    for secret in secrets_]
            for start in range(0, len(rows), 500):
                EnrollmentToken.insert_many(rows[start:start + 500]).execute()
        return len(rows)

    def find_token(self, secret: str) -> TokenRecord | None:
        """Look up by hash. The index lookup is on a hash of a 256-bit secret, so its
        timing reveals nothing useful; the final comparison is constant time anyway."""
        digest = token_sha256(secret)
        row = self._first(EnrollmentToken.token_sha256, digest)
        if row is None or not hmac.compare_digest(row.token_sha256, digest):
            return None
        return TokenRecord.of(row)

    def consume_token(self, token_id: int, device_id: str) -> bool:
        """Mark used exactly once, in the caller's (issuing) transaction; False when
        another request won the race."""
        updated = (EnrollmentToken.update(used_at=utcnow(), used_by_device=device_id)
                   .where((EnrollmentToken.id == token_id)
                          & (EnrollmentToken.used_at.is_null()))
                   .execute())
        return updated == 1

    # -- manual approval (RFC 7030 4.2.3) ---------------------------------------------
    def approval_state(self, group_id: int, device_id: str, key_sha256: str,
                       credential: str) -> str:
        """Where a request for approval stands: "new" (recorded now), "pending",
        "approved", "rejected", or "conflict" (the key is pending under another
        credential)."""
        with self.transaction():
            pending = self._first(PendingRequest.public_key_sha256, key_sha256)
            if pending is None:
                PendingRequest.create(group=group_id, device_id=device_id,
                                      public_key_sha256=key_sha256, credential=credential)
                return "new"
            if not hmac.compare_digest(pending.credential, credential):
                return "conflict"
            return pending.status

    def decide_pending(self, device_id: str, approve: bool, operator: str) -> int:
        with self.transaction():
            return (PendingRequest.update(status="approved" if approve else "rejected",
                                          decided_by=operator)
                    .where((PendingRequest.device_id == device_id)
                           & (PendingRequest.status == "pending"))
                    .execute())

    def pending_requests(self) -> list[PendingRequest]:
        with self.transaction(readonly=True):
            return list(PendingRequest.select(PendingRequest, EnrollmentGroup)
                        .join(EnrollmentGroup)
                        .where(PendingRequest.status == "pending"))
