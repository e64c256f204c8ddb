"""Real, published TPM vendor certificates: the shipped store and real EK certificates.

Every certificate shipped in ``enroll_server/ek_vendors`` loads, matches its provenance
line, verifies (openssl agrees) and a tampered copy of it is refused. Real EK certificates
(``tests/data/real_ek``, README there says where each comes from) chain to the store, as
read from NV with padding, and a tampered copy is refused.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from enroll_server import ek_vendors
from enroll_server.attestation import ek, verdict
from enroll_server.attestation.ek_cert import (
    load_pem_certificates,
    parse_certificate,
    signature_problem,
)

REAL_EK = Path(__file__).parent / "data" / "real_ek"
NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
STORE = ek_vendors.store()


def _armor(der: bytes) -> str:
    import base64
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


def _issuer_of(entry: ek_vendors.VendorCertificate) -> ek_vendors.VendorCertificate | None:
    """The shipped certificate that signed ``entry`` (itself for a self-signed root); None
    for an anchor whose issuer is not published for TPM use (AMD Pluton Global Factory
    ICA under AMD Root CA R4)."""
    certificate = entry.certificate
    if certificate.self_issued:
        return entry
    return next((e for e in STORE if e.certificate.subject_key == certificate.issuer_key
                 and signature_problem(certificate, e.certificate.public_key()) is None), None)


def _flip(der: bytes, offset: int) -> bytes:
    return der[:offset] + bytes([der[offset] ^ 0x01]) + der[offset + 1:]


def test_store_covers_the_major_vendors_with_provenance() -> None:
    assert {"infineon", "stmicro", "nuvoton", "intel", "amd", "google-cloud",
            "microsoft"} <= set(ek_vendors.vendor_names())
    for entry in STORE:
        assert entry.published and entry.copied_from
        assert entry.role in ("anchor", "intermediate")


@pytest.mark.parametrize("entry", STORE, ids=lambda e: f"{e.vendor}:{e.certificate.subject_text}")
def test_every_shipped_certificate_verifies_and_openssl_agrees(entry, tmp_path: Path) -> None:
    issuer = _issuer_of(entry)
    if issuer is None:  # an anchor by the vendor's word: openssl must at least read it
        assert entry.role == "anchor"
        issuer = entry
    else:
        assert signature_problem(entry.certificate, issuer.certificate.public_key()) is None
        assert issuer.vendor == entry.vendor
    (tmp_path / "ca.pem").write_text(_armor(issuer.certificate.der))
    (tmp_path / "cert.pem").write_text(_armor(entry.certificate.der))
    flags = ["-partial_chain"] if not issuer.certificate.self_issued else []
    result = subprocess.run(["openssl", "verify", "-check_ss_sig", *flags, "-no-CApath",
                             "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "cert.pem")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("entry", STORE, ids=lambda e: f"{e.vendor}:{e.certificate.subject_text}")
def test_a_tampered_copy_of_every_shipped_certificate_is_refused(entry) -> None:
    """One bit flipped in the signed part (the subject public key) breaks the signature."""
    der = entry.certificate.der
    spki_end = der.index(entry.certificate.spki) + len(entry.certificate.spki)
    tampered = parse_certificate(_flip(der, spki_end - 3))
    issuer = _issuer_of(entry)
    if issuer is not None:
        assert signature_problem(tampered, issuer.certificate.public_key()) is not None
    with pytest.raises(ek_vendors.VendorStoreError):  # and the store would refuse it too
        ek_vendors.parse_vendor_bundle(entry.vendor, _provenance(entry) + _armor(tampered.der))


def _provenance(entry: ek_vendors.VendorCertificate) -> str:
    return (f"# vendor={entry.vendor} | role={entry.role} | "
            f"subject={entry.certificate.subject_text} | sha256={entry.sha256} | "
            f"not_after=x | published={entry.published} | copied-from={entry.copied_from}\n")


def test_provenance_line_round_trips_and_a_wrong_fingerprint_is_refused() -> None:
    entry = STORE[0]
    assert ek_vendors.parse_vendor_bundle(entry.vendor, _provenance(entry)
                                          + _armor(entry.certificate.der))[0] == entry
    wrong = _provenance(entry).replace(entry.sha256, "00" * 32)
    with pytest.raises(ek_vendors.VendorStoreError, match="fingerprint"):
        ek_vendors.parse_vendor_bundle(entry.vendor, wrong + _armor(entry.certificate.der))


def test_nuvoton_roots_with_unsorted_set_load_though_cryptography_refuses_them() -> None:
    nuvoton = [e.certificate for e in STORE if "Nuvoton TPM Root CA" in e.certificate.subject_text]
    assert len(nuvoton) == 5  # 1110, 1111, 2110, 2111, 2112
    for certificate in nuvoton:
        with pytest.raises(ValueError, match="InvalidSetOrdering"):
            x509.load_der_x509_certificate(certificate.der)
        assert certificate.self_issued
        assert signature_problem(certificate, certificate.public_key()) is None


def test_intel_on_die_root_with_null_ecdsa_parameters_loads() -> None:
    (intel,) = [e.certificate for e in STORE if e.vendor == "intel"]
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate(intel.der)
    assert signature_problem(intel, intel.public_key()) is None


def _real(name: str) -> bytes:
    return load_pem_certificates((REAL_EK / name).read_text())[0].der


REAL = [("stm-rsa-ek-st33htphahd8.pem", "stmicro", "STM TPM EK Intermediate CA 06"),
        ("stm-rsa-ek-st33ktpm2x.pem", "stmicro", "STSAFE TPM RSA Intermediate CA 10"),
        ("gce-vtpm-rsa-ek.pem", "google-cloud", "EK/AK CA Intermediate")]


@pytest.mark.parametrize(("name", "vendor", "issuer"), REAL)
def test_real_ek_certificate_chains_to_the_vendor_store(name: str, vendor: str,
                                                        issuer: str) -> None:
    anchors, intermediates = ek_vendors.trust_for(vendor)
    path = ek.verify_ek_certificate(ek.load_ek_certificate(_real(name)), anchors,
                                    intermediates, now=NOW)
    assert issuer in path[1].subject_text and path[-1] in anchors


def test_stmicro_ek_as_read_from_nv_with_ff_padding_verifies() -> None:
    """ST33HTPH TPMs pad the EK certificate NV index to 1600 bytes with 0xFF."""
    der = _real("stm-rsa-ek-st33htphahd8.pem")
    padded = der + b"\xff" * (1600 - len(der))
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate(padded)  # what a strict parser does with it
    certificate = ek.load_ek_certificate(padded)
    assert certificate.der == der
    assert certificate.tpm_identity() == {"manufacturer": "id:53544D20", "model": "ST33HTPHAHD8",
                                          "version": "id:00010102"}
    ek.verify_ek_certificate(certificate, *ek_vendors.trust_for("stmicro"), now=NOW)


@pytest.mark.parametrize(("name", "vendor", "issuer"), REAL)
def test_tampered_real_ek_certificate_is_refused(name: str, vendor: str, issuer: str) -> None:
    der = _real(name)
    tampered = ek.load_ek_certificate(_flip(der, len(der) // 3))  # inside the public key
    with pytest.raises(verdict.EkUntrusted) as refused:
        ek.verify_ek_certificate(tampered, *ek_vendors.trust_for(vendor), now=NOW)
    assert "does not verify" in refused.value.detail


def test_real_ek_of_another_vendor_is_untrusted() -> None:
    certificate = ek.load_ek_certificate(_real("stm-rsa-ek-st33ktpm2x.pem"))
    with pytest.raises(verdict.EkUntrusted):
        ek.verify_ek_certificate(certificate, *ek_vendors.trust_for("infineon,nuvoton"), now=NOW)


def test_real_ek_chain_sent_by_the_device_is_used_but_not_trusted() -> None:
    """The intermediate from the device's NV chain helps build the path; an anchor is
    still needed (a chain that ends in the device's own certificates is untrusted)."""
    stsafe = next(e.certificate for e in STORE if "STSAFE TPM RSA" in e.certificate.subject_text)
    leaf = ek.load_ek_certificate(_real("stm-rsa-ek-st33ktpm2x.pem"))
    anchors = [e.certificate for e in STORE if e.certificate.subject_text.startswith(
        "CN=STSAFE RSA Root CA 02")]
    chain = ek.load_ek_chain([stsafe.der + b"\xff" * 100])
    assert len(ek.verify_ek_certificate(leaf, anchors, chain, now=NOW)) == 3
    with pytest.raises(verdict.EkUntrusted):
        ek.verify_ek_certificate(leaf, [], chain, now=NOW)
    with pytest.raises(verdict.MalformedEvidence):
        ek.load_ek_chain([stsafe.der] * (ek.MAX_CHAIN_CERTIFICATES + 1))


def test_unknown_vendor_names_are_refused_with_the_known_ones() -> None:
    assert ek_vendors.parse_vendor_list("STMicro, infineon,") == ["infineon", "stmicro"]
    with pytest.raises(ValueError, match="unknown TPM vendor.*acme.*known: amd"):
        ek_vendors.parse_vendor_list("infineon,acme")
