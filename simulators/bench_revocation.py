"""Revocation artefacts in process: CRL build time and OCSP responder throughput.

Throwaway EC P-256 keys, no HSM, no HTTP, no database: this measures enroll_server.ca.crl
and enroll_server.ca.ocsp themselves, single-threaded. Compare with FIELD-NOTES
("Crypto costs"): cryptography's CRL builder, fed one entry at a time, took 24.6 s for
100k entries; a bare OCSP build+sign runs at about 12,500/s.
"""

from __future__ import annotations

import datetime as dt
import itertools
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from enroll_server.ca.crl import RevokedEntry, build_crl, check_crl
from enroll_server.ca.hierarchy import make_root_ca
from enroll_server.ca.ocsp import OcspResponder, issue_ocsp_responder_certificate

_REASONS = (None, x509.ReasonFlags.key_compromise, x509.ReasonFlags.superseded,
            x509.ReasonFlags.cessation_of_operation)


def _throwaway_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, make_root_ca(key, "Bench Revocation")


def bench_crl(entries: int = 100_000) -> dict[str, Any]:
    """Build and sign one CRL of `entries` revoked serials (DER out), then build one more
    and check it as the publisher does before storing it (parse + signature verify)."""
    ca_key, ca_certificate = _throwaway_ca()
    now = dt.datetime.now(dt.UTC)
    revoked = [RevokedEntry(x509.random_serial_number(), now - dt.timedelta(seconds=index),
                            _REASONS[index % len(_REASONS)]) for index in range(entries)]

    def build(crl_number: int) -> bytes:
        return build_crl(ca_key, ca_certificate, revoked, crl_number=crl_number,
                         this_update=now, next_update=now + dt.timedelta(days=1))

    started = time.perf_counter()
    crl_der = build(1)
    build_seconds = time.perf_counter() - started
    started = time.perf_counter()
    check_crl(build(2), ca_certificate, 1)
    rebuild_seconds = time.perf_counter() - started
    return {"entries": entries, "build_seconds": round(build_seconds, 3),
            "rebuild_and_check_seconds": round(rebuild_seconds, 3),
            "size_bytes": len(crl_der)}


def _rate(seconds: float, answer: Any, requests: list[bytes]) -> float:
    """Responses per second from answer(request), cycling over requests."""
    count = 0
    cycle = itertools.cycle(requests)
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        for _ in range(100):
            answer(next(cycle))
        count += 100
    return count / (time.perf_counter() - started)


def bench_ocsp(seconds: float = 3.0, serials: int = 1_000) -> dict[str, Any]:
    """OCSP responses/s through OcspResponder.respond: request parse + status lookup +
    cache hit, and with a nonce (parse + lookup + build + ECDSA sign every time)."""
    ca_key, ca_certificate = _throwaway_ca()
    responder_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    responder_certificate = issue_ocsp_responder_certificate(
        ca_key, ca_certificate, responder_key.public_key(), dt.timedelta(days=1), now)
    revoked = {serial: (ocsp.OCSPCertStatus.REVOKED, now, x509.ReasonFlags.key_compromise)
               for serial in range(1, serials + 1, 10)}
    good = (ocsp.OCSPCertStatus.GOOD, None, None)

    def lookup(serial: int) -> tuple[ocsp.OCSPCertStatus, dt.datetime | None,
                                     x509.ReasonFlags | None]:
        return revoked.get(serial, good)

    responder = OcspResponder(ca_certificate, responder_certificate, responder_key, lookup)

    # What a client sends: the issuer's name and key hashes (SHA-1, as openssl does).
    probe = ocsp.OCSPRequestBuilder().add_certificate(
        ca_certificate, ca_certificate, hashes.SHA1()).build()  # noqa: S303

    def request(serial: int, nonce: bool) -> bytes:
        builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
            probe.issuer_name_hash, probe.issuer_key_hash, serial, hashes.SHA1())  # noqa: S303
        if nonce:
            builder = builder.add_extension(x509.OCSPNonce(serial.to_bytes(16)), critical=False)
        return builder.build().public_bytes(serialization.Encoding.DER)

    cached_requests = [request(serial, nonce=False) for serial in range(1, serials + 1)]
    nonce_requests = [request(serial, nonce=True) for serial in range(1, serials + 1)]
    for der in cached_requests:  # warm the cache: the first answer of each is signed
        responder.respond(der)
    signed_before = responder.signed_responses
    cached_rate = _rate(seconds, responder.respond, cached_requests)
    if responder.signed_responses != signed_before:
        raise RuntimeError("the cache path signed responses: the benchmark is wrong")
    fresh_rate = _rate(seconds, responder.respond, nonce_requests)
    return {"cached_responses_per_second": round(cached_rate),
            "fresh_signed_responses_per_second": round(fresh_rate),
            "serials": serials, "seconds_each": seconds}


if __name__ == "__main__":
    print(bench_crl())
    print(bench_ocsp())
