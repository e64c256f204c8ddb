"""TPM attestation challenges: single use, short TTL, a quota of open ones per EK."""

from __future__ import annotations

import datetime as dt
from typing import Any

from .models import AttestationChallenge, EnrollmentGroup, naive_utc
from .records import ChallengeRecord
from .transactions import Transactions


class Challenges(Transactions):
    def store_challenge(self, fields: dict[str, Any], now: dt.datetime, max_open: int,
                        clean_expired: bool = False) -> int:
        """Store a challenge unless its EK already holds ``max_open`` open ones; returns
        how many it held before. Open means unused and unexpired (issue 9.6): whoever
        holds only an EK's public parts can fill its quota, but never for longer than
        the challenge TTL. ``clean_expired`` also deletes expired challenges."""
        naive_now = naive_utc(now)
        with self.transaction():
            if clean_expired:
                AttestationChallenge.delete().where(
                    AttestationChallenge.expires_at < naive_now).execute()
            open_challenges = AttestationChallenge.select().where(
                (AttestationChallenge.device_id == fields["device_id"])
                & AttestationChallenge.used_at.is_null()
                & (AttestationChallenge.expires_at > naive_now)).count()
            if open_challenges < max_open:
                AttestationChallenge.create(**fields)
            return open_challenges

    def take_challenge(self, challenge_id: str, group_name: str,
                       now: dt.datetime) -> tuple[ChallengeRecord | None, bool]:
        """Look a challenge up and mark it used, committed whatever follows (single use:
        a refused attempt burns it). Returns the challenge (None if unknown, or issued
        under another EST label) and whether this call was the one that used it."""
        with self.transaction():
            row = (AttestationChallenge.select(AttestationChallenge, EnrollmentGroup)
                   .join(EnrollmentGroup)
                   .where(AttestationChallenge.challenge_id == challenge_id[:64]).first())
            if row is None or row.group.name != group_name:
                return None, False
            won = bool(AttestationChallenge.update(used_at=naive_utc(now))
                       .where((AttestationChallenge.id == row.id)
                              & AttestationChallenge.used_at.is_null()).execute())
            return ChallengeRecord.of(row), won
