"""Driving the attested-enrollment endpoints by hand with real swtpm evidence.

``AttestClient`` does what device_sdk.attest does, one step at a time, so a test can
change exactly one field of otherwise genuine evidence before sending it.
"""

from __future__ import annotations

import base64
import sqlite3
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_sdk.tpm import EkKind, TpmDevice
from simulators.served import ServedInstance
from tests.support.fixtures import db_count
from tests.support.inprocess import InProcessInstance


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


@dataclass
class Snapshot:
    """Row counts that a refused request must leave unchanged."""

    certificates: int
    devices: int
    evidence: int
    last_audit_id: int

    @classmethod
    def take(cls, instance: ServedInstance) -> Snapshot:
        return cls(db_count(instance, "certificate"), db_count(instance, "device"),
                   db_count(instance, "attestation_evidence"),
                   last_audit_id(instance))


def last_audit_id(instance: ServedInstance) -> int:
    uri = f"file:{instance.dir / 'enroll.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=10) as connection:
        return connection.execute("SELECT COALESCE(MAX(id), 0) FROM audit_event").fetchone()[0]


def audit_since(instance: ServedInstance, after_id: int) -> list[tuple[str, str, str]]:
    uri = f"file:{instance.dir / 'enroll.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=10) as connection:
        return connection.execute("SELECT action, outcome, code FROM audit_event WHERE id > ? "
                                  "ORDER BY id", (after_id,)).fetchall()


def write_db(instance: ServedInstance, sql: str, *params: Any) -> None:
    with sqlite3.connect(instance.dir / "enroll.db", timeout=10) as connection:
        connection.execute(sql, params)


class AttestClient:
    """One device (a TpmDevice) against one served instance and group."""

    def __init__(self, instance: ServedInstance, tpm: TpmDevice, group: str,
                 ek_kind: EkKind = "ecc") -> None:
        self.instance, self.tpm, self.group, self.ek_kind = instance, tpm, group, ek_kind
        if isinstance(instance, InProcessInstance):  # Flask's test client
            self.http = instance.http_client()
        else:
            context = ssl.create_default_context(cafile=str(instance.trust_anchor))
            self.http = httpx.Client(verify=context, timeout=60)
        self.base = f"{instance.url}/.well-known/est/{group}/attest/"

    def close(self) -> None:
        self.http.close()

    def challenge_request(self) -> dict[str, Any]:
        _, ek_public = self.tpm.endorsement_key(self.ek_kind)
        _, ak_public, _ = self.tpm.attestation_key()
        request = {"ek_public": b64(ek_public), "ak_public": b64(ak_public)}
        certificate = self.tpm.read_ek_certificate(self.ek_kind)
        if certificate is not None:
            request["ek_certificate"] = b64(certificate)
        return request

    def post(self, step: str, body: dict[str, Any]) -> httpx.Response:
        return self.http.post(self.base + step, json=body)

    def challenge(self, request: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self.post("challenge", request or self.challenge_request())
        assert response.status_code == 200, response.text
        return response.json()

    def evidence(self, challenge: dict[str, Any],
                 secret: bytes | None = None) -> dict[str, Any]:
        """Genuine evidence answering ``challenge`` (``secret``: skip the activation)."""
        nonce = unb64(challenge["nonce"])
        if secret is None:
            secret = self.tpm.activate_credential(unb64(challenge["credential_blob"]),
                                                  unb64(challenge["encrypted_secret"]),
                                                  self.ek_kind)
        _, device_key_public = self.tpm.device_key()
        certify_info, certify_signature = self.tpm.certify(nonce)
        csr = self.tpm.csr(challenge["device_id"]).public_bytes(serialization.Encoding.DER)
        body = {"challenge_id": challenge["challenge_id"], "activated_secret": b64(secret),
                "device_key_public": b64(device_key_public), "certify_info": b64(certify_info),
                "certify_signature": b64(certify_signature), "csr": b64(csr)}
        if challenge.get("quote"):
            quote_info, quote_signature = self.tpm.quote(nonce, challenge["quote"]["pcrs"])
            body |= {"quote_info": b64(quote_info), "quote_signature": b64(quote_signature)}
        return body


def refusal(response: httpx.Response) -> tuple[int, str | None]:
    return response.status_code, response.headers.get("X-Error-Code")


def assert_attest_refused(instance: ServedInstance, before: Snapshot, response: httpx.Response,
                          status: int, code: str, action: str,
                          *hidden: str) -> None:  # fmt: skip
    """A refusal: status + stable code as problem+json, nothing written but one audit row,
    no expected value (nonce, secret, names) echoed."""
    assert refusal(response) == (status, code), response.text
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.json()["code"] == code
    assert "Traceback" not in response.text
    for value in hidden:
        assert value not in response.text
    after = Snapshot.take(instance)
    assert (after.certificates, after.devices, after.evidence) == (
        before.certificates, before.devices, before.evidence)
    assert audit_since(instance, before.last_audit_id) == [(action, "refused", code)]


def roots_file(directory: Path, pems: tuple[str, ...] | list[str]) -> Path:
    path = directory / "ek-roots.pem"
    path.write_text("".join(pems))
    return path


def ek_crl(vendor_dir: Path, serials: list[int]) -> bytes:
    """A DER CRL of a simulated manufacturer's EK issuing CA (its key file in
    ``vendor_dir``) revoking ``serials``: what a TPM vendor publishes."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from simulators.manufacturer import Manufacturer

    ca = x509.load_pem_x509_certificate((vendor_dir / Manufacturer.EK_CA_CERT).read_bytes())
    key = load_pem_private_key((vendor_dir / Manufacturer.EK_CA_KEY).read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    revoked = [x509.RevokedCertificateBuilder().serial_number(serial)
               .revocation_date(now - dt.timedelta(minutes=1)).build() for serial in serials]
    crl = (x509.CertificateRevocationListBuilder(revoked_certificates=revoked)
           .issuer_name(ca.subject).last_update(now - dt.timedelta(minutes=1))
           .next_update(now + dt.timedelta(days=7))
           .add_extension(x509.CRLNumber(1), critical=False)
           .sign(key, hashes.SHA384()))  # type: ignore[arg-type]
    return crl.public_bytes(serialization.Encoding.DER)
