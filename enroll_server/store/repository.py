"""The repository: the only writer of enrollment state, and the owner of every
transaction boundary (docs/design.md, "Layers").

One object, assembled from one class per aggregate:

    groups.py       enrollment groups, tokens, EK allowlists, manual approvals
    devices.py      devices and certificates; the issuing transaction
    challenges.py   TPM attestation challenges
    revocations.py  revocations, CRL rows, certificate status (OCSP), renewals
    outbox.py       notices for the relay
    audit.py        the audit log and the /metrics numbers
    cas.py          the issuing CA generations

Services and routes receive frozen records (records.py) and policies (policy/), never
model classes. SQLite "database is locked" after the busy timeout, and lost PostgreSQL
connections, become StoreUnavailable (503 + Retry-After), never a 500 (transactions.py).
"""

from __future__ import annotations

from .cas import CaGenerations
from .challenges import Challenges
from .devices import Devices, Issuance, Issued
from .groups import token_sha256
from .models import naive_utc
from .outbox import Outbox
from .revocations import Revocations, Revoked

__all__ = ["Issuance", "Issued", "Repository", "Revoked", "naive_utc", "token_sha256"]


class Repository(Devices, Challenges, Revocations, Outbox, CaGenerations):
    """Every read a service needs and every write, each in its own transaction."""
