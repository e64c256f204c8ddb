"""Pure CSR checks (SECURITY-CHECKLIST 2, 5, 6, 7): shape, signature, key policy, subject."""

import base64

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from enroll_server.errors import BadRequest, PolicyRefused
from enroll_server.policy.csr import (
    KeyPolicy,
    check_key,
    check_signature,
    decode_est_base64,
    parse_csr,
    requested_common_name,
)

P256 = ec.generate_private_key(ec.SECP256R1())


def csr_for(key=P256, names=None, rdns=None):
    if rdns is not None:
        subject = x509.Name(rdns)
    else:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n)
                             for n in (names or ["sensor-1"])])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(
        key, hashes.SHA256())


def der(csr):
    return csr.public_bytes(serialization.Encoding.DER)


def code_of(excinfo):
    return excinfo.value.code


def test_base64_with_line_breaks_is_accepted():
    raw = der(csr_for())
    assert decode_est_base64(base64.encodebytes(raw)) == raw


@pytest.mark.parametrize(("body", "code"), [
    (b"", "csr.empty"), (b"not*base64!", "csr.not_base64"), (b"QUJD=A", "csr.not_base64"),
])
def test_bad_base64_is_refused(body, code):
    with pytest.raises(BadRequest) as excinfo:
        decode_est_base64(body)
    assert code_of(excinfo) == code


def test_truncated_and_trailing_garbage_are_told_apart():
    raw = der(csr_for())
    with pytest.raises(BadRequest) as excinfo:
        parse_csr(raw[:-10])
    assert code_of(excinfo) == "csr.malformed"
    with pytest.raises(BadRequest) as excinfo:
        parse_csr(raw + b"\x00\x01")
    assert code_of(excinfo) == "csr.trailing_data"


def test_bad_signature_is_refused():
    raw = bytearray(der(csr_for()))
    raw[-5] ^= 0x01  # inside the signature BIT STRING
    csr = parse_csr(bytes(raw))
    with pytest.raises(BadRequest) as excinfo:
        check_signature(csr)
    assert code_of(excinfo) == "csr.bad_signature"
    check_signature(csr_for())  # the untouched one verifies


def test_key_policy():
    policy = KeyPolicy(("ec-p256", "rsa"))
    assert check_key(csr_for(), policy) == "ec-p256"
    with pytest.raises(PolicyRefused) as excinfo:
        check_key(csr_for(ec.generate_private_key(ec.SECP384R1())), policy)
    assert code_of(excinfo) == "csr.key_type_not_allowed"
    with pytest.raises(PolicyRefused) as excinfo:
        check_key(csr_for(ec.generate_private_key(ec.SECP256K1())), KeyPolicy(KEY_ALL))
    assert code_of(excinfo) == "csr.key_type_not_allowed"
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(PolicyRefused) as excinfo:
        check_key(csr_for(weak), policy)
    assert code_of(excinfo) == "csr.weak_key"


KEY_ALL = ("ec-p256", "ec-p384", "rsa")


@pytest.mark.parametrize("names", [["a/b"], ["a+b"], ["a#b"], ["a\x00b"], ["a", "b"],
                                   ["has space"], ["-leading-dash"]])
def test_subjects_that_cannot_be_topic_levels_are_refused(names):
    with pytest.raises(BadRequest) as excinfo:
        requested_common_name(csr_for(names=names))
    assert code_of(excinfo) == "csr.bad_subject"


def test_multi_valued_rdn_is_refused():
    rdn = x509.RelativeDistinguishedName([
        x509.NameAttribute(NameOID.COMMON_NAME, "a"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "b")])
    with pytest.raises(BadRequest):
        requested_common_name(csr_for(rdns=[rdn]))


def test_slash_in_another_attribute_is_refused():
    with pytest.raises(BadRequest):
        requested_common_name(csr_for(rdns=[x509.RelativeDistinguishedName(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "evil/#")])]))


def test_good_subject_gives_its_cn():
    assert requested_common_name(csr_for(names=["sensor-1.a_b"])) == "sensor-1.a_b"
    assert requested_common_name(csr_for(rdns=[])) is None


def test_ecdsa_csr_with_null_algorithm_parameters_from_tpm2_openssl_is_accepted():
    """tpm2-openssl 1.1.1 writes ecdsa-with-SHA256 with NULL parameters (RFC 5758 3.2 says
    absent); signatureAlgorithm is not signed, so the request is repaired, not refused."""
    from asn1crypto import core
    from asn1crypto import csr as asn1_csr
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from enroll_server.policy.csr import check_signature, parse_csr

    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "null-params")])).sign(key, hashes.SHA256())
    request = asn1_csr.CertificationRequest.load(csr.public_bytes(serialization.Encoding.DER))
    algorithm = asn1_csr.SignedDigestAlgorithm({"algorithm": "sha256_ecdsa"})
    algorithm["parameters"] = core.Null()
    with_null = asn1_csr.CertificationRequest({
        "certification_request_info": request["certification_request_info"],
        "signature_algorithm": algorithm, "signature": request["signature"]}).dump()
    with pytest.raises(ValueError):
        x509.load_der_x509_csr(with_null)  # what cryptography alone says
    repaired = parse_csr(with_null)
    check_signature(repaired)
    assert repaired.public_key() == key.public_key()
