"""EK certificate chain, EK public <-> certificate, and EK allowlist checks (no TPM).

``EkPki`` is a small test TPM manufacturer (root -> EK issuing CA -> EK certificates shaped
as the TCG EK Credential Profile says); the live swtpm tests reuse it.
"""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from tpm2_pytss.constants import TPMA_OBJECT
from tpm2_pytss.internal.templates import ek_ecc256, ek_rsa2048
from tpm2_pytss.types import TPM2B_PUBLIC

from enroll_server.attestation import ek, tpm_structs, verdict

TCG_AT_TPM_MANUFACTURER = x509.ObjectIdentifier("2.23.133.2.1")
TCG_AT_TPM_MODEL = x509.ObjectIdentifier("2.23.133.2.2")
TCG_AT_TPM_VERSION = x509.ObjectIdentifier("2.23.133.2.3")
NOT_AFTER_UNDEFINED = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
CaKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _new_key(algorithm: str) -> CaKey:
    if algorithm == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP384R1())


def _hash(key: CaKey) -> hashes.HashAlgorithm:
    return hashes.SHA384() if isinstance(key, ec.EllipticCurvePrivateKey) else hashes.SHA256()


def ca_certificate(
    name: str, key: CaKey, issuer: tuple[x509.Certificate, CaKey] | None, *,
    not_before: dt.datetime, not_after: dt.datetime, ca: bool = True,
    path_length: int | None = None, key_cert_sign: bool = True,
) -> x509.Certificate:  # fmt: skip
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test TPM Vendor"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])  # fmt: skip
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    usage = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment",
                           "data_encipherment", "key_agreement", "encipher_only",
                           "decipher_only"), False)  # fmt: skip
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(key_cert_sign=key_cert_sign, crl_sign=True, **usage),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
    )  # fmt: skip
    return builder.sign(issuer_key, _hash(issuer_key))


class EkPki:
    """Root CA -> EK issuing CA -> EK certificates (TCG EK Credential Profile 2.0, 3.2)."""

    def __init__(self, algorithm: str = "ecc", *, not_before: dt.datetime | None = None,
                 years: int = 30) -> None:  # fmt: skip
        start = not_before or dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(
            minutes=5
        )
        end = start + dt.timedelta(days=365 * years)
        self.root_key, self.ca_key = _new_key(algorithm), _new_key(algorithm)
        self.root = ca_certificate("Test TPM Root CA", self.root_key, None,
                                   not_before=start, not_after=end, path_length=1)
        self.ek_ca = ca_certificate("Test TPM EK CA 001", self.ca_key, (self.root, self.root_key),
                                    not_before=start, not_after=end, path_length=0)
        self.not_before = start

    def issue_ek_certificate(
        self, ek_public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, *,
        not_before: dt.datetime | None = None, not_after: dt.datetime = NOT_AFTER_UNDEFINED,
        issuer: tuple[x509.Certificate, CaKey] | None = None, eku: bool = True,
    ) -> x509.Certificate:  # fmt: skip
        """Empty subject, critical SAN directoryName, CA:false, keyEncipherment/keyAgreement."""
        issuer_certificate, issuer_key = issuer or (self.ek_ca, self.ca_key)
        is_rsa = isinstance(ek_public_key, rsa.RSAPublicKey)
        usage = dict.fromkeys(("digital_signature", "content_commitment", "data_encipherment",
                               "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
                              False)  # fmt: skip
        san = x509.DirectoryName(x509.Name([
            x509.RelativeDistinguishedName([x509.NameAttribute(oid, value)])
            for oid, value in ((TCG_AT_TPM_MANUFACTURER, "id:00001014"),
                               (TCG_AT_TPM_MODEL, "swtpm"), (TCG_AT_TPM_VERSION, "id:20191023"))
        ]))  # fmt: skip
        builder = (
            x509.CertificateBuilder().subject_name(x509.Name([]))
            .issuer_name(issuer_certificate.subject).public_key(ek_public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or self.not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([san]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(key_encipherment=is_rsa, key_agreement=not is_rsa,
                                         **usage), critical=True)
        )  # fmt: skip
        if eku:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ek.TCG_KP_EK_CERTIFICATE]), critical=False
            )
        return builder.sign(issuer_key, _hash(issuer_key))


def der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def software_ek_public(kind: str) -> tuple[bytes, rsa.RSAPublicKey | ec.EllipticCurvePublicKey]:
    """A TCG-template EK public area around a software key (for tests without a TPM)."""
    template = TPM2B_PUBLIC.unmarshal((ek_rsa2048 if kind == "rsa" else ek_ecc256).template
                                      .marshal())[0]  # fmt: skip
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
        template.publicArea.unique.rsa = key.public_numbers().n.to_bytes(256, "big")
    else:
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        numbers = key.public_numbers()
        template.publicArea.unique.ecc.x = numbers.x.to_bytes(32, "big")
        template.publicArea.unique.ecc.y = numbers.y.to_bytes(32, "big")
    return template.marshal(), key


@pytest.fixture(scope="module", params=["ecc", "rsa"])
def pki(request: pytest.FixtureRequest) -> EkPki:
    return EkPki(request.param, not_before=NOW - dt.timedelta(days=30))


@pytest.mark.parametrize("kind", ["rsa", "ecc"])
def test_ek_chain_to_manufacturer_root_is_accepted(pki: EkPki, kind: str) -> None:
    ek_public, key = software_ek_public(kind)
    certificate = pki.issue_ek_certificate(key)
    path = ek.verify_ek_certificate(certificate, [pki.root], [pki.ek_ca], now=NOW)
    assert path == [certificate, pki.ek_ca, pki.root]
    assert ek.check_ek_public(ek_public, certificate).objectAttributes & TPMA_OBJECT.RESTRICTED
    assert tpm_structs.ek_identity(ek_public) == tpm_structs.key_identity(
        certificate.public_key())


def test_default_cryptography_client_verifier_refuses_ek_certificates(pki: EkPki) -> None:
    """Why ek.py builds the path itself: the client verifier wants a TLS-style EKU."""
    from cryptography.x509 import verification

    certificate = pki.issue_ek_certificate(software_ek_public("ecc")[1])
    verifier = (verification.PolicyBuilder().store(verification.Store([pki.root])).time(NOW)
                .build_client_verifier())  # fmt: skip
    with pytest.raises(verification.VerificationError, match="EKU"):
        verifier.verify(certificate, [pki.ek_ca])


def test_ek_issuing_ca_configured_as_anchor_is_enough(pki: EkPki) -> None:
    certificate = pki.issue_ek_certificate(software_ek_public("ecc")[1])
    assert ek.verify_ek_certificate(certificate, [pki.ek_ca], now=NOW) == [certificate, pki.ek_ca]


def test_ek_without_its_intermediate_is_untrusted(pki: EkPki) -> None:
    certificate = pki.issue_ek_certificate(software_ek_public("ecc")[1])
    with pytest.raises(verdict.EkUntrusted) as refused:
        ek.verify_ek_certificate(certificate, [pki.root], now=NOW)
    assert refused.value.code == "ek.untrusted" and refused.value.status == 403


def test_ek_from_untrusted_ca_with_same_names_is_untrusted(pki: EkPki) -> None:
    impostor = EkPki("ecc", not_before=NOW - dt.timedelta(days=30))  # same subject names
    certificate = impostor.issue_ek_certificate(software_ek_public("rsa")[1])
    with pytest.raises(verdict.EkUntrusted) as refused:
        ek.verify_ek_certificate(certificate, [pki.root], [pki.ek_ca, impostor.ek_ca], now=NOW)
    assert "does not verify" in refused.value.detail
    assert "does not verify" not in refused.value.public


def test_expired_ek_certificate_is_refused(pki: EkPki) -> None:
    certificate = pki.issue_ek_certificate(software_ek_public("ecc")[1],
                                           not_after=NOW - dt.timedelta(days=1))  # fmt: skip
    with pytest.raises(verdict.EkExpired) as refused:
        ek.verify_ek_certificate(certificate, [pki.root], [pki.ek_ca], now=NOW)
    assert refused.value.code == "ek.expired"


def test_not_yet_valid_ek_certificate_is_refused(pki: EkPki) -> None:
    certificate = pki.issue_ek_certificate(software_ek_public("ecc")[1],
                                           not_before=NOW + dt.timedelta(days=1))  # fmt: skip
    with pytest.raises(verdict.EkExpired):
        ek.verify_ek_certificate(certificate, [pki.root], [pki.ek_ca], now=NOW)


def test_expired_intermediate_is_refused_as_expired(pki: EkPki) -> None:
    old_ca = ca_certificate("Test TPM EK CA 001", pki.ca_key, (pki.root, pki.root_key),
                            not_before=NOW - dt.timedelta(days=400),
                            not_after=NOW - dt.timedelta(days=1), path_length=0)  # fmt: skip
    certificate = pki.issue_ek_certificate(software_ek_public("ecc")[1])
    with pytest.raises(verdict.EkExpired):
        ek.verify_ek_certificate(certificate, [pki.root], [old_ca], now=NOW)
    # the renewed EK CA certificate (same key and name) repairs the path
    ek.verify_ek_certificate(certificate, [pki.root], [old_ca, pki.ek_ca], now=NOW)


def test_expired_ek_from_untrusted_ca_is_reported_untrusted(pki: EkPki) -> None:
    impostor = EkPki("rsa", not_before=NOW - dt.timedelta(days=30))
    certificate = impostor.issue_ek_certificate(software_ek_public("ecc")[1],
                                                not_after=NOW - dt.timedelta(days=1))
    with pytest.raises(verdict.EkUntrusted):
        ek.verify_ek_certificate(certificate, [pki.root], [impostor.ek_ca], now=NOW)


def test_intermediate_without_ca_flag_cannot_issue(pki: EkPki) -> None:
    not_a_ca_key = _new_key("ecc")
    not_a_ca = ca_certificate("Test TPM EK CA 002", not_a_ca_key, (pki.root, pki.root_key),
                              not_before=pki.not_before, not_after=NOT_AFTER_UNDEFINED,
                              ca=False)  # fmt: skip
    certificate = pki.issue_ek_certificate(software_ek_public("ecc")[1],
                                           issuer=(not_a_ca, not_a_ca_key))  # fmt: skip
    with pytest.raises(verdict.EkUntrusted) as refused:
        ek.verify_ek_certificate(certificate, [pki.root], [not_a_ca], now=NOW)
    assert "not a CA" in refused.value.detail


def test_path_length_constraint_and_max_depth_are_enforced(pki: EkPki) -> None:
    sub_key = _new_key("ecc")
    sub_ca = ca_certificate("Test TPM EK Sub CA", sub_key, (pki.ek_ca, pki.ca_key),
                            not_before=pki.not_before, not_after=NOT_AFTER_UNDEFINED)
    certificate = pki.issue_ek_certificate(software_ek_public("ecc")[1], issuer=(sub_ca, sub_key))
    with pytest.raises(verdict.EkUntrusted) as refused:  # EK CA has pathLen 0
        ek.verify_ek_certificate(certificate, [pki.root], [pki.ek_ca, sub_ca], now=NOW)
    assert "pathLenConstraint" in refused.value.detail
    with pytest.raises(verdict.EkUntrusted) as refused:
        ek.verify_ek_certificate(certificate, [pki.root], [pki.ek_ca, sub_ca], now=NOW,
                                 max_depth=2)
    assert "longer than" in refused.value.detail


def test_ek_certificate_that_is_a_ca_or_has_foreign_eku_is_refused(pki: EkPki) -> None:
    with pytest.raises(verdict.EkUntrusted):
        ek.verify_ek_certificate(pki.ek_ca, [pki.root], now=NOW)
    tls_like = (
        x509.CertificateBuilder().subject_name(x509.Name([]))
        .issuer_name(pki.ek_ca.subject).public_key(software_ek_public("ecc")[1])
        .serial_number(1).not_valid_before(pki.not_before).not_valid_after(NOT_AFTER_UNDEFINED)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .sign(pki.ca_key, _hash(pki.ca_key))
    )  # fmt: skip
    with pytest.raises(verdict.EkUntrusted, match="ek.untrusted"):
        ek.verify_ek_certificate(tls_like, [pki.root], [pki.ek_ca], now=NOW)


def test_ek_certificate_without_eku_is_accepted(pki: EkPki) -> None:
    certificate = pki.issue_ek_certificate(software_ek_public("rsa")[1], eku=False)
    assert len(ek.verify_ek_certificate(certificate, [pki.root], [pki.ek_ca], now=NOW)) == 3


def test_ek_public_not_matching_certificate_is_refused(pki: EkPki) -> None:
    certificate = pki.issue_ek_certificate(software_ek_public("ecc")[1])
    other_public, _ = software_ek_public("ecc")
    with pytest.raises(verdict.EkPublicMismatch) as refused:
        ek.check_ek_public(other_public, certificate)
    assert refused.value.code == "ek.public_mismatch"
    rsa_public, _ = software_ek_public("rsa")
    with pytest.raises(verdict.EkPublicMismatch):
        ek.check_ek_public(rsa_public, certificate)


def test_ek_public_without_ek_attributes_is_refused(pki: EkPki) -> None:
    ek_public, key = software_ek_public("ecc")
    public = tpm_structs.parse_public(ek_public)
    public.objectAttributes &= ~TPMA_OBJECT.RESTRICTED
    with pytest.raises(verdict.EkAttributes):
        ek.check_ek_public(tpm_structs.marshal_public(public), pki.issue_ek_certificate(key))


def test_allowlist_matches_identity_case_insensitively() -> None:
    ek_public, _ = software_ek_public("ecc")
    identity = tpm_structs.ek_identity(ek_public)
    ek.check_ek_allowlisted(identity, ["00" * 32, identity.upper()])
    with pytest.raises(verdict.EkNotAllowlisted) as refused:
        ek.check_ek_allowlisted(identity, ["00" * 32])
    assert refused.value.code == "ek.not_allowlisted" and identity not in refused.value.public


def test_ek_certificate_loader_tolerates_nv_padding_only(pki: EkPki) -> None:
    certificate = pki.issue_ek_certificate(software_ek_public("ecc")[1])
    assert ek.load_ek_certificate(der(certificate) + b"\x00" * 40) == certificate
    assert ek.load_ek_certificate(der(certificate) + b"\xff" * 3) == certificate
    for bad in (der(certificate) + b"\x01", der(certificate)[:-1], b"", b"\x30\x80\x00\x00"):
        with pytest.raises(verdict.MalformedEvidence) as refused:
            ek.load_ek_certificate(bad)
        assert refused.value.status == 400 and refused.value.code == "evidence.malformed"


def test_naive_now_is_a_programming_error(pki: EkPki) -> None:
    certificate = pki.issue_ek_certificate(software_ek_public("ecc")[1])
    with pytest.raises(ValueError, match="timezone"):
        ek.verify_ek_certificate(certificate, [pki.root], now=dt.datetime(2026, 1, 1))


def _crl(issuer: x509.Certificate, key, serials: list[int]) -> x509.CertificateRevocationList:
    revoked = [x509.RevokedCertificateBuilder().serial_number(serial)
               .revocation_date(NOW - dt.timedelta(days=1)).build() for serial in serials]
    return (x509.CertificateRevocationListBuilder(revoked_certificates=revoked)
            .issuer_name(issuer.subject).last_update(NOW - dt.timedelta(days=1))
            .next_update(NOW + dt.timedelta(days=6)).sign(key, hashes.SHA256()))


def test_revoked_ek_certificate_or_ek_ca_is_refused(pki: EkPki) -> None:
    _, key = software_ek_public("ecc")
    certificate = pki.issue_ek_certificate(key)
    path = ek.verify_ek_certificate(certificate, [pki.root], [pki.ek_ca], now=NOW)
    ek.check_ek_revocation(path, [])  # no CRL configured: nothing to refuse
    ek.check_ek_revocation(path, [_crl(pki.ek_ca, pki.ca_key, [certificate.serial_number + 1])])
    with pytest.raises(verdict.EkRevoked) as refused:
        ek.check_ek_revocation(path, [_crl(pki.ek_ca, pki.ca_key, [certificate.serial_number])])
    assert refused.value.code == "ek.revoked"
    with pytest.raises(verdict.EkRevoked):  # the whole EK CA revoked by the root
        ek.check_ek_revocation(path, [_crl(pki.root, pki.root_key, [pki.ek_ca.serial_number])])


def test_a_crl_not_signed_by_the_issuer_is_ignored(pki: EkPki) -> None:
    _, key = software_ek_public("ecc")
    certificate = pki.issue_ek_certificate(key)
    path = ek.verify_ek_certificate(certificate, [pki.root], [pki.ek_ca], now=NOW)
    forged = _crl(pki.ek_ca, ec.generate_private_key(ec.SECP384R1()),
                  [certificate.serial_number])  # same issuer name, another key
    ek.check_ek_revocation(path, [forged])
    pem = forged.public_bytes(serialization.Encoding.PEM) * 2
    assert len(ek.load_ek_crls(pem)) == 2
    assert len(ek.load_ek_crls(forged.public_bytes(serialization.Encoding.DER))) == 1
