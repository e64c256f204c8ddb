"""EstEnrollment: orders an EST enrollment (RFC 7030 4.2.1) and re-enrollment (4.2.2).

    shape (no crypto) -> credential (read-only snapshot) -> CSR vetting -> replay?
    -> approval -> issue (one write transaction that re-checks the credential and the
    device, signs and stores; store/devices.py)

Refusals raise an EnrollError; the HTTP edge audits them (http/common.py). The database
is left untouched except for the audit row (and a pending-approval row, which is a
decision, not a refusal).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from cryptography import x509

from .credentials import (
    RequestContext,
    authenticate_enroll,
    authenticate_reenroll,
    refuse_if_revoked,
)
from .issuance import Issuer
from .policy.csr import decode_est_base64, read_csr, vet_csr
from .store.repository import Repository


class EstEnrollment:
    def __init__(self, repository: Repository, issuer: Issuer,
                 clock: Callable[[], dt.datetime]) -> None:
        self.repository = repository
        self.issuer = issuer
        self.clock = clock

    def simpleenroll(self, ctx: RequestContext, body: bytes) -> x509.Certificate:
        """RFC 7030 4.2.1: a token or a bootstrap certificate."""
        return self._enroll(ctx, body, renewal=False)

    def simplereenroll(self, ctx: RequestContext, body: bytes) -> x509.Certificate:
        """RFC 7030 4.2.2: the device's current certificate over mTLS."""
        return self._enroll(ctx, body, renewal=True)

    def _enroll(self, ctx: RequestContext, body: bytes, renewal: bool) -> x509.Certificate:
        action = "est.simplereenroll" if renewal else "est.simpleenroll"
        request = read_csr(decode_est_base64(body))
        authenticate = authenticate_reenroll if renewal else authenticate_enroll
        with self.repository.snapshot():  # checks only; issuing re-checks
            identity = authenticate(self.repository, ctx, request, self.clock())
        csr = vet_csr(request, identity.group.key_policy,
                      device_id=None if renewal else identity.device_id)
        replay = identity.replay_certificate
        if replay is not None and replay.public_key_sha256 == csr.key_sha256:
            return self.issuer.replay(identity, replay, ctx, action)
        if identity.replay_refusal is not None:
            raise identity.replay_refusal
        if identity.group.requires_approval and not renewal:
            self.issuer.require_approval(identity, csr.key_sha256)
        return self.issuer.issue(identity, csr, ctx, action, refuse_if_revoked)
