"""CRLs (RFC 5280 5) built by enroll_server.ca.crl, read back by cryptography and openssl."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enroll_server.ca.crl import RevokedEntry, build_crl, check_crl
from enroll_server.ca.hierarchy import make_root_ca
from enroll_server.ca.profiles import CertProfile, revocation_urls
from enroll_server.ca.signer import Signer

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


class DeviceCA:
    """A real EC P-256 CA issuing device certificates through the project's Signer."""

    def __init__(self, organization: str = "CRL Test") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.certificate = make_root_ca(self.key, organization)
        self.signer = Signer(self.certificate, self.key)

    def issue(self, device_id: str) -> x509.Certificate:
        profile = CertProfile(device_id=device_id, group="sensors",
                              lifetime=dt.timedelta(days=30), backdate=dt.timedelta(minutes=5),
                              **revocation_urls("https://enroll.example"))
        return self.signer.issue(ec.generate_private_key(ec.SECP256R1()).public_key(), profile)

    def crl(self, entries: list[RevokedEntry], crl_number: int = 1) -> bytes:
        return build_crl(self.key, self.certificate, entries, crl_number, NOW,
                         NOW + dt.timedelta(days=1))


@pytest.fixture(scope="module")
def ca() -> DeviceCA:
    return DeviceCA()


def _pem(path: Path, certificate: x509.Certificate) -> Path:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


def _openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                          check=False)


def test_openssl_lists_every_entry_with_its_reason_number_and_aki(ca: DeviceCA,
                                                                  tmp_path: Path) -> None:
    entries = [RevokedEntry(0x1001, NOW - dt.timedelta(hours=2), x509.ReasonFlags.key_compromise),
               RevokedEntry(0x1002, NOW - dt.timedelta(hours=1), x509.ReasonFlags.superseded),
               RevokedEntry(0x1003, NOW, x509.ReasonFlags.unspecified),
               RevokedEntry(0x1004, NOW, None)]
    crl_path = tmp_path / "ca.crl"
    crl_path.write_bytes(ca.crl(entries, crl_number=7))

    result = _openssl("crl", "-inform", "DER", "-in", crl_path, "-noout", "-text")

    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "X509v3 CRL Number: \n                7" in text
    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert "X509v3 Authority Key Identifier" in text
    assert ski.value.digest.hex(":").upper() in text
    blocks = {block.split("\n", 1)[0].strip(): block
              for block in text.split("Serial Number: ")[1:]}
    assert set(blocks) == {"1001", "1002", "1003", "1004"}
    assert "Key Compromise" in blocks["1001"]
    assert "Superseded" in blocks["1002"]
    # RFC 5280 5.3.1: no reasonCode for "unspecified" (or no reason at all).
    assert "CRL Reason Code" not in blocks["1003"]
    assert "CRL Reason Code" not in blocks["1004"]


def test_crl_reads_back_with_the_signature_hash_and_entries(ca: DeviceCA) -> None:
    entries = [RevokedEntry(serial, NOW - dt.timedelta(minutes=serial), None)
               for serial in range(1, 5_001)]

    crl = x509.load_der_x509_crl(ca.crl(entries, crl_number=3))

    assert crl.is_signature_valid(ca.certificate.public_key())
    assert crl.signature_hash_algorithm.name == "sha256"
    assert crl.issuer == ca.certificate.subject
    assert len(crl) == 5_000
    assert crl.get_revoked_certificate_by_serial_number(42).revocation_date_utc == \
        NOW - dt.timedelta(minutes=42)
    assert (crl.last_update_utc, crl.next_update_utc) == (NOW, NOW + dt.timedelta(days=1))
    number = crl.extensions.get_extension_for_class(x509.CRLNumber)
    assert number.value.crl_number == 3 and not number.critical


def test_openssl_verify_refuses_the_revoked_certificate_and_accepts_the_good_one(
        ca: DeviceCA, tmp_path: Path) -> None:
    revoked = ca.issue("device-revoked")
    good = ca.issue("device-good")
    crl = x509.load_der_x509_crl(ca.crl([RevokedEntry(revoked.serial_number, NOW,
                                                      x509.ReasonFlags.key_compromise)]))
    crl_pem = tmp_path / "ca.crl.pem"
    crl_pem.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    ca_pem = _pem(tmp_path / "ca.pem", ca.certificate)

    def verify(certificate: x509.Certificate) -> subprocess.CompletedProcess[str]:
        return _openssl("verify", "-crl_check", "-CAfile", ca_pem, "-CRLfile", crl_pem,
                        _pem(tmp_path / f"{certificate.serial_number}.pem", certificate))

    refused = verify(revoked)
    accepted = verify(good)

    assert refused.returncode != 0
    assert "certificate revoked" in refused.stdout + refused.stderr
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert accepted.stdout.strip().endswith(": OK")


def test_a_serial_listed_twice_appears_once_with_its_first_entry(ca: DeviceCA) -> None:
    first = RevokedEntry(77, NOW - dt.timedelta(days=1), x509.ReasonFlags.key_compromise)
    again = RevokedEntry(77, NOW, x509.ReasonFlags.superseded)

    crl = x509.load_der_x509_crl(ca.crl([first, again, RevokedEntry(78, NOW)]))

    assert sorted(entry.serial_number for entry in crl) == [77, 78]
    entry = crl.get_revoked_certificate_by_serial_number(77)
    assert entry.revocation_date_utc == first.revoked_at
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is \
        x509.ReasonFlags.key_compromise


def test_build_refuses_a_key_that_is_not_the_issuers(ca: DeviceCA) -> None:
    other_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError, match="does not belong"):
        build_crl(other_key, ca.certificate, [], 1, NOW, NOW + dt.timedelta(days=1))
    with pytest.raises(ValueError, match="later than thisUpdate"):
        build_crl(ca.key, ca.certificate, [], 1, NOW, NOW)
    with pytest.raises(ValueError, match="20 octets"):
        build_crl(ca.key, ca.certificate, [], 1 << 159, NOW, NOW + dt.timedelta(days=1))


@pytest.mark.parametrize(("serial", "revoked_at", "reason", "message"), [
    (0, NOW, None, "positive"),
    (1 << 159, NOW, None, "20 octets"),
    (5, NOW.replace(tzinfo=None), None, "timezone-aware"),
    (5, NOW, x509.ReasonFlags.remove_from_crl, "delta CRLs"),
], ids=["zero", "too-long", "naive-time", "remove-from-crl"])
def test_revoked_entry_refuses_what_a_crl_cannot_carry(serial: int, revoked_at: dt.datetime,
                                                       reason: x509.ReasonFlags | None,
                                                       message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RevokedEntry(serial, revoked_at, reason)


def test_check_accepts_a_good_successor(ca: DeviceCA) -> None:
    crl = check_crl(ca.crl([RevokedEntry(9, NOW)], crl_number=4), ca.certificate, 3)
    assert crl.get_revoked_certificate_by_serial_number(9) is not None
    check_crl(ca.crl([], crl_number=1), ca.certificate, None)  # the first one


def test_check_refuses_what_must_never_replace_the_published_crl(ca: DeviceCA) -> None:
    other_issuer_crl = DeviceCA("Other").crl([], crl_number=11)
    same_name_other_key = DeviceCA("CRL Test").crl([], crl_number=12)  # ca's subject name
    assert x509.load_der_x509_crl(same_name_other_key).issuer == ca.certificate.subject
    tampered = bytearray(ca.crl([RevokedEntry(5, NOW)], crl_number=13))
    tampered[-1] ^= 0x01  # flip a bit in the signature value
    refused = [
        (b"\x30\x03junk", "parsing asn1"),
        (other_issuer_crl, "issuer does not match"),
        (same_name_other_key, "signature does not verify"),
        (bytes(tampered), "signature does not verify"),
        (ca.crl([], crl_number=10), "does not increase"),
        (ca.crl([], crl_number=9), "does not increase"),
    ]
    for der, message in refused:
        with pytest.raises(ValueError, match=message):
            check_crl(der, ca.certificate, 10)
