"""The happy path over real TLS against a served instance (gunicorn, SoftHSM CA key)."""

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_sdk.est import EstClient
from tests.support.fixtures import db_count

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker


def csr(key, cn):
    return x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])).sign(key, hashes.SHA256())


def test_token_enrollment_issues_a_profiled_certificate_and_records_it(est_instance):
    token = est_instance.token("default")
    key = ec.generate_private_key(ec.SECP256R1())
    with EstClient(est_instance.url, est_instance.trust_anchor) as client:
        chain = client.cacerts()
        certificate = client.simpleenroll(csr(key, "smoke-1"), token=token)
    # certs-only is a DER SET OF: order is not meaningful, pick the issuer by name.
    (issuer,) = [c for c in chain if c.subject == certificate.issuer]
    assert len(chain) == 2
    now = dt.datetime.now(dt.UTC)
    assert certificate.subject.rfc4514_string() == "CN=smoke-1"
    assert certificate.public_key() == key.public_key()
    certificate.verify_directly_issued_by(issuer)
    assert certificate.serial_number.bit_length() >= 64
    assert dt.timedelta(minutes=4) < now - certificate.not_valid_before_utc \
        < dt.timedelta(minutes=6)
    assert certificate.not_valid_after_utc <= issuer.not_valid_after_utc
    eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:tpm-enroll:device:smoke-1"]
    cdp = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert cdp[0].full_name[0].value.endswith("/crl/issuing-ca.crl")
    assert db_count(est_instance, "certificate",
                    f"serial = '{certificate.serial_number}' AND status = 'active'") == 1
    assert db_count(est_instance, "audit_event",
                    "action = 'est.simpleenroll' AND outcome = 'success' "
                    "AND device_id = 'smoke-1'") == 1
