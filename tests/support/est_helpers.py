"""Helpers for EST refusal and fault tests against a served instance (no mocks).

A refusal is checked the way SECURITY-CHECKLIST defines "reject": the status, the stable
code (X-Error-Code and the first body line), no new certificate/device/pending rows and no
consumed token, one audit row for the refusal, and the server still answering cacerts.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import sqlite3
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from simulators.served import ServedInstance
from tests.support.fixtures import db_count
from tests.support.inprocess import InProcessInstance

PKCS10 = "application/pkcs10"


# -- keys, CSRs and certificates ------------------------------------------------------
def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def cn_name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_csr(key, subject: str | x509.Name | None) -> x509.CertificateSigningRequest:
    name = cn_name(subject) if isinstance(subject, str) else subject or x509.Name([])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(
        key, hashes.SHA256())


def csr_der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


def est_body(der: bytes) -> bytes:
    """RFC 8951: base64 with line breaks, as the device SDK sends it."""
    return base64.encodebytes(der)


def csr_body(key, subject) -> bytes:
    """An EST simpleenroll body for a CSR of ``key`` with CN ``subject``."""
    return est_body(csr_der(make_csr(key, subject)))


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def write_identity(directory: Path, name: str, certificate: x509.Certificate,
                   key) -> tuple[Path, Path]:
    """The certificate and key as PEM files, for an mTLS client."""
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert_pem(certificate))
    key_path.write_bytes(key_pem(key))
    return cert_path, key_path


@dataclass
class FactoryCA:
    """A device manufacturer's IDevID CA (self-signed, CA:true, keyCertSign)."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def create(cls, name: str) -> FactoryCA:
        key = ec_key()
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                             x509.NameAttribute(NameOID.COMMON_NAME, f"{name} IDevID CA")])
        now = dt.datetime.now(dt.UTC)
        certificate = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
        return cls(key, certificate)

    def idevid(self, common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A factory leaf certificate (clientAuth) and its key."""
        key = ec_key()
        now = dt.datetime.now(dt.UTC)
        ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        certificate = (
            x509.CertificateBuilder().subject_name(cn_name(common_name))
            .issuer_name(self.certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ski.value), critical=False)
            .sign(self.key, hashes.SHA256()))
        return certificate, key


# -- HTTP -------------------------------------------------------------------------------
def http_client(instance: ServedInstance, client_cert: Path | None = None,
                client_key: Path | None = None) -> httpx.Client:
    if isinstance(instance, InProcessInstance):  # Flask's test client, cert via the proxy
        return instance.http_client(x509.load_pem_x509_certificate(client_cert.read_bytes())
                                    if client_cert is not None else None)
    context = ssl.create_default_context(cafile=str(instance.trust_anchor))
    if client_cert is not None:
        context.load_cert_chain(str(client_cert), str(client_key))
    return httpx.Client(verify=context, timeout=30)


def est_url(instance: ServedInstance, operation: str, label: str | None = None) -> str:
    return f"{instance.url}/.well-known/est/{label + '/' if label else ''}{operation}"


def post_est(instance: ServedInstance, body: bytes | None, *, token: str | None = None,
             operation: str = "simpleenroll", label: str | None = None,
             content_type: str | None = PKCS10, headers: dict[str, str] | None = None,
             client: httpx.Client | None = None) -> httpx.Response:
    """POST a raw body, exactly as given, to an EST operation."""
    sent = dict(headers or {})
    if content_type is not None:
        sent["Content-Type"] = content_type
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    own = client is None
    client = client or http_client(instance)
    try:
        return client.post(est_url(instance, operation, label), content=body, headers=sent)
    finally:
        if own:
            client.close()


def issued_certificate(response: httpx.Response) -> x509.Certificate:
    from device_sdk.est import decode_certs_only

    assert response.status_code == 200, (response.status_code, response.text)
    (certificate,) = decode_certs_only(response.content)
    return certificate


def enroll(instance: ServedInstance, key, common_name: str,
           token: str | None = None) -> x509.Certificate:
    """A successful token enrollment (a fresh token unless one is given)."""
    token = token or instance.token("default")
    return issued_certificate(post_est(instance, est_body(csr_der(make_csr(key, common_name))),
                                       token=token))


def assert_serves_cacerts(instance: ServedInstance) -> None:
    with http_client(instance) as client:
        response = client.get(est_url(instance, "cacerts"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/pkcs7-mime")


# -- database ---------------------------------------------------------------------------
def db_rows(instance: ServedInstance, sql: str, parameters: tuple = ()) -> list[tuple]:
    uri = f"file:{instance.dir / 'enroll.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=10) as connection:
        return connection.execute(sql, parameters).fetchall()


def db_write(instance: ServedInstance, sql: str, parameters: tuple = ()) -> None:
    """Test setup only (e.g. there is no revoke command yet)."""
    connection = sqlite3.connect(instance.dir / "enroll.db", timeout=10)
    try:
        with connection:
            connection.execute(sql, parameters)
    finally:
        connection.close()


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_used(instance: ServedInstance, token: str) -> bool:
    return db_count(instance, "enrollment_token",
                    f"token_sha256 = '{token_sha256(token)}' AND used_at IS NOT NULL") == 1


def certificate_status(instance: ServedInstance, certificate: x509.Certificate) -> str:
    ((status,),) = db_rows(instance, "SELECT status FROM certificate WHERE serial = ?",
                           (str(certificate.serial_number),))
    return status


@dataclass(frozen=True)
class StoreSnapshot:
    """What a refusal must not change, and where the audit log stood."""

    certificates: int
    devices: int
    pending: int
    used_tokens: int
    last_audit_id: int

    @classmethod
    def take(cls, instance: ServedInstance) -> StoreSnapshot:
        ((last_audit_id,),) = db_rows(instance, "SELECT COALESCE(MAX(id), 0) FROM audit_event")
        return cls(db_count(instance, "certificate"), db_count(instance, "device"),
                   db_count(instance, "pending_request"),
                   db_count(instance, "enrollment_token", "used_at IS NOT NULL"),
                   last_audit_id)

    def audit_since(self, instance: ServedInstance) -> list[tuple[str, str, str]]:
        """(action, outcome, code) of the audit events written since the snapshot."""
        return db_rows(instance, "SELECT action, outcome, code FROM audit_event "
                                 "WHERE id > ? ORDER BY id", (self.last_audit_id,))


def assert_refused(instance: ServedInstance, before: StoreSnapshot,
                   response: httpx.Response, status: int, code: str, *,
                   action: str = "est.simpleenroll", outcome: str = "refused") -> None:
    """The whole refusal contract; see the module docstring."""
    assert (response.status_code, response.headers.get("X-Error-Code")) == (status, code), \
        response.text
    assert response.text.startswith(f"error: {code}\n")
    assert "Traceback" not in response.text
    after = StoreSnapshot.take(instance)
    assert (after.certificates, after.devices, after.pending, after.used_tokens) == (
        before.certificates, before.devices, before.pending, before.used_tokens)
    assert before.audit_since(instance) == [(action, outcome, code)]
    assert_serves_cacerts(instance)


def ocsp_request_der(issuer: x509.Certificate, serial: int) -> bytes:
    """An RFC 6960 request for one serial (CertID by SHA-1 of the issuer's name and key)."""
    from cryptography.x509 import ocsp

    name_hash = hashes.Hash(hashes.SHA1())
    name_hash.update(issuer.subject.public_bytes())
    key_hash = hashes.Hash(hashes.SHA1())  # of the subjectPublicKey BIT STRING (EC point)
    key_hash.update(issuer.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))
    return ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        name_hash.finalize(), key_hash.finalize(), serial, hashes.SHA1()).build().public_bytes(
        serialization.Encoding.DER)
