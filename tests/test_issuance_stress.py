"""Revocation against racing renewals, on a served instance (gunicorn: two worker
processes of eight threads, real mTLS) over SQLite and over PostgreSQL (issue 9.1).

Trial after trial, a device renews in a loop from two threads while the operator revokes
it; then no certificate of the device may be left unrevoked, and OCSP and the CRL must
say "revoked" for every one. And four renewals presenting one certificate at once must
give exactly one new certificate. Nothing here depends on how the threads interleave:
every interleaving must end in the same outcome. (test_issuance_races.py forces the
dangerous interleavings one by one; these show them under real concurrency.)
"""

from __future__ import annotations

import datetime as dt
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.x509 import ocsp

from enroll_server.config import load_settings
from enroll_server.store.db import open_database
from enroll_server.store.repository import Repository
from simulators.served import ServedInstance, unthrottled
from tests.support.est_helpers import (
    csr_body,
    ec_key,
    enroll,
    http_client,
    issued_certificate,
    ocsp_request_der,
    post_est,
    write_identity,
)

pytestmark = pytest.mark.integration
TRIALS = 12
DEADLINE = 120  # seconds: only stops a broken run from hanging, asserts nothing


class Served:
    """A served instance and the test's own view of its database."""

    def __init__(self, instance: ServedInstance) -> None:
        self.instance = instance
        settings = load_settings(instance.config, environ=instance.env)
        self.repository = Repository(open_database(settings.database.url,
                                                   settings.instance_dir))
        self.tokens = ["et_" + secrets.token_urlsafe(32) for _ in range(4 * TRIALS)]
        self.repository.create_tokens("default", self.tokens, dt.timedelta(hours=1),
                                      "operator:test")
        self.operator = instance.operator_token
        self.ca = x509.load_pem_x509_certificates(instance.trust_anchor.read_bytes())[0]

    def enroll(self, device_id: str):
        key = ec_key()
        return enroll(self.instance, key, device_id, self.tokens.pop()), key

    def renew(self, directory: Path, certificate: x509.Certificate, key, new_key,
              device_id: str) -> httpx.Response:
        cert_path, key_path = write_identity(directory, f"c{secrets.token_hex(8)}",
                                             certificate, key)
        with http_client(self.instance, cert_path, key_path) as client:
            return post_est(self.instance, csr_body(new_key, device_id), client=client,
                            operation="simplereenroll")

    def revoke(self, device_id: str) -> None:
        with http_client(self.instance) as client:
            response = client.post(f"{self.instance.url}/api/v1/revocations",
                                   json={"device_id": device_id, "reason": "keyCompromise"},
                                   headers={"Authorization": f"Bearer {self.operator}"})
        assert response.status_code == 200, response.text

    def statuses(self, device_id: str) -> dict[int, str]:
        return {int(c.serial): c.status for c in self.repository.certificates(device_id)}

    def ocsp(self, serial: int) -> ocsp.OCSPCertStatus:
        with http_client(self.instance) as client:
            answer = client.post(f"{self.instance.url}/ocsp",
                                 content=ocsp_request_der(self.ca, serial),
                                 headers={"Content-Type": "application/ocsp-request"})
        return ocsp.load_der_ocsp_response(answer.content).certificate_status

    def crl_serials(self) -> set[int]:
        self.instance.cli("crl", "publish")
        with http_client(self.instance) as client:
            der = client.get(f"{self.instance.url}/crl/issuing-ca.crl").content
        return {entry.serial_number for entry in x509.load_der_x509_crl(der)}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def served(request) -> Iterator[Served]:
    """One served instance per backend for the module (the tests use their own devices)."""
    env = unthrottled()
    database_url = None
    if request.param == "postgres":
        postgres = request.getfixturevalue("postgres")
        database_url = env["ENROLL_DATABASE__URL"] = postgres.create_database()
    instance = ServedInstance(env=env)
    try:
        with instance:
            yield Served(instance)
    finally:
        instance.cleanup()
        if database_url is not None:
            postgres.drop_database(database_url)


def test_renewals_racing_a_revocation_never_leave_a_certificate_unrevoked(served,
                                                                           tmp_path):
    devices = [f"stress-revoke-{trial}" for trial in range(TRIALS)]
    for device_id in devices:
        refusals = renewals_racing_a_revocation(served, tmp_path, device_id)
        assert set(refusals) <= {"device.revoked", "cert.revoked"}, refusals
        found = served.statuses(device_id)
        assert set(found.values()) == {"revoked"}, (device_id, found)  # zero escapes
        for serial in found:
            assert served.ocsp(serial) is ocsp.OCSPCertStatus.REVOKED
    on_crl = served.crl_serials()
    for device_id in devices:
        assert set(served.statuses(device_id)) <= on_crl


def renewals_racing_a_revocation(served: Served, tmp_path: Path,
                                 device_id: str) -> list[str | None]:
    """Two threads renew the device in a loop, each from the newest certificate, until
    refused; the operator revokes it once a renewal went through. Returns the refusals."""
    certificate, key = served.enroll(device_id)
    latest = {"certificate": certificate, "key": key}
    lock = threading.Lock()
    renewed = threading.Event()
    refusals: list[str | None] = []

    def renewer() -> None:
        while True:
            with lock:
                current, current_key = latest["certificate"], latest["key"]
            new_key = ec_key()
            response = served.renew(tmp_path, current, current_key, new_key, device_id)
            if response.status_code == 200:
                with lock:
                    latest.update(certificate=issued_certificate(response), key=new_key)
                renewed.set()
                continue
            code = response.headers.get("X-Error-Code")
            if code == "cert.superseded":  # the other thread renewed first
                continue
            refusals.append(code)
            return

    threads = [threading.Thread(target=renewer) for _ in range(2)]
    for thread in threads:
        thread.start()
    assert renewed.wait(DEADLINE)
    served.revoke(device_id)  # while both keep renewing
    for thread in threads:
        thread.join(DEADLINE)
    return refusals


def test_four_renewals_with_one_certificate_give_exactly_one_successor(served, tmp_path):
    for trial in range(TRIALS):
        device_id = f"stress-renew-{trial}"
        outcomes = four_renewals_with_one_certificate(served, tmp_path, device_id)
        assert outcomes == [(200, None)] + [(403, "cert.superseded")] * 3, (trial, outcomes)
        found = served.statuses(device_id)
        assert sorted(found.values()) == ["active", "superseded"], (trial, found)


def four_renewals_with_one_certificate(served: Served, tmp_path: Path,
                                       device_id: str) -> list[tuple[int, str | None]]:
    certificate, key = served.enroll(device_id)
    barrier = threading.Barrier(4, timeout=DEADLINE)
    responses: list[httpx.Response] = []

    def renewal() -> None:
        new_key = ec_key()
        barrier.wait()
        responses.append(served.renew(tmp_path, certificate, key, new_key, device_id))

    threads = [threading.Thread(target=renewal) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    return sorted((r.status_code, r.headers.get("X-Error-Code")) for r in responses)
