"""Renewal scheduling (SECURITY-CHECKLIST 27): a fleet enrolled together must not come
back together. Pure: Issuer.renew_at on a real certificate, no I/O."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enroll_server.config import Settings
from enroll_server.issuance import Issuer


def certificate(days: int) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "renewal-test")])
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
            .sign(key, hashes.SHA256()))


def test_renewal_points_fall_in_the_jitter_window_and_are_spread() -> None:
    service = Issuer(Settings(), repository=None, signer=None,  # type: ignore[arg-type]
                     clock=lambda: dt.datetime.now(dt.UTC))
    cert = certificate(365)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    shares = [(service.renew_at(cert) - cert.not_valid_before_utc) / lifetime
              for _ in range(500)]
    settings = Settings().notices
    low = settings.renewal_fraction
    high = settings.renewal_fraction + settings.renewal_jitter_fraction
    assert all(low <= share <= high for share in shares)
    # Not one moment for all: 500 draws of 10**6 steps collide ~0.125 times on average;
    # 10 collisions or more has a probability below 1e-15.
    assert len(set(shares)) > 490
    # Spread over the whole window: each tenth gets ~50 of them; fewer than 10 in any
    # tenth has a probability below 1e-11.
    tenths = [min(int((share - low) / (high - low) * 10), 9) for share in shares]
    assert min(tenths.count(tenth) for tenth in range(10)) >= 10
    assert max(shares) - min(shares) > 0.8 * settings.renewal_jitter_fraction
    assert all(service.renew_at(cert) < cert.not_valid_after_utc for _ in range(50))
