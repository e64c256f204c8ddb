"""Vendor encoding quirks, reproduced on a test PKI and re-signed, so both sides are known.

Each case edits the to-be-signed bytes of a genuine certificate (as a vendor's CA would
have produced them), signs them again with the real CA key and checks that the verifier
accepts the quirk and still refuses any change after signing.
"""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from enroll_server.attestation import ek, verdict
from enroll_server.attestation.ek_cert import CertificateProblem, parse_certificate
from tests.test_attestation_ek import NOW, EkPki, ca_certificate, der, software_ek_public

CN, O_ = "2.5.4.3", "2.5.4.10"


def tlv(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def children(data: bytes) -> list[bytes]:
    """Top-level TLVs inside the SEQUENCE ``data``."""
    offset = 2 + (data[1] & 0x7F if data[1] & 0x80 else 0)
    found = []
    while offset < len(data):
        size_octets = data[offset + 1] & 0x7F if data[offset + 1] & 0x80 else 0
        length = (int.from_bytes(data[offset + 2:offset + 2 + size_octets], "big")
                  if size_octets else data[offset + 1])
        end = offset + 2 + size_octets + length
        found.append(data[offset:end])
        offset = end
    return found


def resign(certificate: x509.Certificate, key, edit) -> bytes:
    """The certificate with ``edit(tbs fields)`` applied, signed again by ``key``."""
    tbs, algorithm, _ = children(der(certificate))
    fields = edit(children(tbs))
    new_tbs = tlv(0x30, b"".join(fields))
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(new_tbs, padding.PKCS1v15(), hashes.SHA256())
    else:
        signature = key.sign(new_tbs, ec.ECDSA(hashes.SHA384()))
    return tlv(0x30, new_tbs + algorithm + tlv(0x03, b"\x00" + signature))


def oid(dotted: str) -> bytes:
    return tlv(0x06, {CN: b"\x55\x04\x03", O_: b"\x55\x04\x0a"}[dotted])


def one_rdn(*attributes: tuple[str, str]) -> bytes:
    """A Name with ONE multi-valued RDN, its SET members in the order given (Nuvoton)."""
    members = b"".join(tlv(0x30, oid(o) + tlv(0x13, v.encode())) for o, v in attributes)
    return tlv(0x30, tlv(0x31, members))


@pytest.fixture(scope="module")
def pki() -> EkPki:
    return EkPki("ecc", not_before=NOW - dt.timedelta(days=30))


def test_unsorted_set_in_names_verifies_like_openssl(pki: EkPki) -> None:
    ca_name_sorted = one_rdn((CN, "Quirk EK CA"), (O_, "Quirk Vendor"))  # CN sorts first
    ca_name_unsorted = one_rdn((O_, "Quirk Vendor"), (CN, "Quirk EK CA"))
    assert ca_name_sorted != ca_name_unsorted
    ek_ca = resign(pki.ek_ca, pki.root_key, lambda f: [*f[:5], ca_name_sorted, *f[6:]])
    _, key = software_ek_public("ecc")
    leaf = resign(pki.issue_ek_certificate(key), pki.ca_key,
                  lambda f: [*f[:3], ca_name_unsorted, *f[4:]])
    with pytest.raises(ValueError, match="InvalidSetOrdering"):
        x509.load_der_x509_certificate(leaf)
    path = ek.verify_ek_certificate(ek.load_ek_certificate(leaf), [pki.root],
                                    [parse_certificate(ek_ca)], now=NOW)
    assert len(path) == 3
    tampered = leaf.replace(b"Quirk EK CA", b"Quirk EK CB")  # the name, after signing
    with pytest.raises(verdict.EkUntrusted):
        ek.verify_ek_certificate(ek.load_ek_certificate(tampered), [pki.root],
                                 [parse_certificate(ek_ca)], now=NOW)


@pytest.mark.parametrize("serial", [b"\xff\x12\x34", b"\x00\x00\x06",
                                    b"\x01" + b"\x23" * 24],
                         ids=["negative", "non-minimal", "over-long"])
def test_odd_serial_numbers_are_read_and_still_signed(pki: EkPki, serial: bytes) -> None:
    _, key = software_ek_public("rsa")
    leaf = resign(pki.issue_ek_certificate(key), pki.ca_key,
                  lambda f: [f[0], tlv(0x02, serial), *f[2:]])
    certificate = ek.load_ek_certificate(leaf)
    assert certificate.serial_number == int.from_bytes(serial, "big", signed=True)
    ek.verify_ek_certificate(certificate, [pki.root], [pki.ek_ca], now=NOW)
    changed = leaf.replace(tlv(0x02, serial), tlv(0x02, serial[:-1] + b"\x07"))
    with pytest.raises(verdict.EkUntrusted, match="does not verify"):
        ek.verify_ek_certificate(ek.load_ek_certificate(changed), [pki.root], [pki.ek_ca],
                                 now=NOW)


def _with_extension(extension_oid: str, critical: bool):
    value = tlv(0x04, tlv(0x0C, b"vendor data"))
    ext = tlv(0x30, tlv(0x06, bytes.fromhex(extension_oid)) + (b"\x01\x01\xff" if critical
                                                                 else b"") + value)

    def edit(fields: list[bytes]) -> list[bytes]:
        extensions = fields[-1]  # [3] EXPLICIT Extensions
        inner = children(extensions)[0]
        return [*fields[:-1], tlv(0xA3, tlv(0x30, b"".join(children(inner)) + ext))]
    return edit


GOOGLE_VENDOR_EXTENSION = "2b06010401d679020115"  # 1.3.6.1.4.1.11129.2.1.21 (GCE vTPM)


def test_vendor_extension_is_ignored_unless_critical(pki: EkPki) -> None:
    _, key = software_ek_public("rsa")
    leaf = pki.issue_ek_certificate(key)
    plain = resign(leaf, pki.ca_key, _with_extension(GOOGLE_VENDOR_EXTENSION, False))
    ek.verify_ek_certificate(ek.load_ek_certificate(plain), [pki.root], [pki.ek_ca], now=NOW)
    critical = resign(leaf, pki.ca_key, _with_extension(GOOGLE_VENDOR_EXTENSION, True))
    with pytest.raises(verdict.EkUntrusted, match="unhandled critical extension"):
        ek.verify_ek_certificate(ek.load_ek_certificate(critical), [pki.root], [pki.ek_ca],
                                 now=NOW)


def test_duplicate_extension_is_refused(pki: EkPki) -> None:
    _, key = software_ek_public("rsa")
    leaf = pki.issue_ek_certificate(key)
    twice = resign(leaf, pki.ca_key, _with_extension("551d13", False))  # basicConstraints again
    with pytest.raises(verdict.MalformedEvidence):
        ek.load_ek_certificate(twice)


def test_signature_algorithm_mismatch_inside_and_outside_is_refused(pki: EkPki) -> None:
    _, key = software_ek_public("rsa")
    leaf = der(pki.issue_ek_certificate(key))
    tbs, algorithm, signature = children(leaf)
    other = tlv(0x30, tlv(0x06, bytes.fromhex("2a8648ce3d040302")))  # ecdsa-with-SHA256
    with pytest.raises(CertificateProblem, match="differs"):
        parse_certificate(tlv(0x30, tbs + other + signature))


@pytest.mark.parametrize("tail", [b"\x00\x01", b"\xff\x00", b"junk"])
def test_trailing_bytes_other_than_nv_padding_are_refused(pki: EkPki, tail: bytes) -> None:
    _, key = software_ek_public("ecc")
    with pytest.raises(verdict.MalformedEvidence, match="trailing"):
        ek.load_ek_certificate(der(pki.issue_ek_certificate(key)) + tail)


def test_sha1_signed_ek_certificate_is_refused(pki: EkPki) -> None:
    _, key = software_ek_public("ecc")
    leaf = pki.issue_ek_certificate(key)
    tbs, _, _ = children(der(leaf))
    sha1_ecdsa = tlv(0x30, tlv(0x06, bytes.fromhex("2a8648ce3d0401")))
    fields = children(tbs)
    new_tbs = tlv(0x30, b"".join([fields[0], fields[1], sha1_ecdsa, *fields[3:]]))
    signature = pki.ca_key.sign(new_tbs, ec.ECDSA(hashes.SHA1()))  # noqa: S303
    certificate = tlv(0x30, new_tbs + sha1_ecdsa + tlv(0x03, b"\x00" + signature))
    with pytest.raises(verdict.EkUntrusted, match="not allowed"):
        ek.verify_ek_certificate(ek.load_ek_certificate(certificate), [pki.root], [pki.ek_ca],
                                 now=NOW)


def test_a_device_chain_of_same_name_cas_signing_each_other_is_bounded(pki: EkPki) -> None:
    """Eight attacker CAs of one name over two keys, four variants each signed by the other
    key: path building would try 4+16+48+144 signatures; it stops after
    MAX_SIGNATURE_CHECKS and refuses."""
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(2)]
    start, end = NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=365)
    seeds = [ca_certificate("Loop CA", key, None, not_before=start, not_after=end)
             for key in keys]
    loop = [ca_certificate("Loop CA", keys[i % 2], (seeds[(i + 1) % 2], keys[(i + 1) % 2]),
                           not_before=start, not_after=end) for i in range(8)]
    _, key = software_ek_public("ecc")
    leaf = pki.issue_ek_certificate(key, issuer=(loop[0], keys[0]))
    with pytest.raises(verdict.EkUntrusted, match="gave up after 64"):
        ek.verify_ek_certificate(leaf, [pki.root], loop, now=NOW)
