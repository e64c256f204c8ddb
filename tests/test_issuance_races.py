"""Revocation is serialised with issuance (issue 9.1, docs/design.md), on SQLite and on
PostgreSQL, in process.

No test here waits for a race to happen: each puts the competing request exactly where
it hurts, between the read-only credential checks and the issuing transaction, or
inside that transaction, and then checks the outcome the product promises: a revoked
device has no active certificate, and OCSP and the CRL say "revoked" for every
certificate it was ever issued. The served stress tests (test_issuance_stress.py) run the
same contests with real concurrency.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest
from cryptography import x509
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from device_sdk.tpm import TpmDevice
from simulators.manufacturer import Manufacturer
from simulators.swtpm import SwtpmInstance
from tests.support.attest_helpers import AttestClient
from tests.support.est_helpers import (
    FactoryCA,
    cert_pem,
    csr_body,
    ec_key,
    enroll,
    http_client,
    issued_certificate,
    ocsp_request_der,
    post_est,
    token_used,
    write_identity,
)
from tests.support.inprocess import InProcessInstance


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def app(backend, request, tmp_path) -> Iterator[InProcessInstance]:
    """The in-process instance on SQLite, or on a fresh PostgreSQL database."""
    overrides = {}
    if backend == "postgres":
        overrides["DATABASE__URL"] = request.getfixturevalue("pg_url")
    instance = InProcessInstance(tmp_path / "instance", **overrides)
    try:
        yield instance
    finally:
        instance.close()


# -- the competing request, placed exactly --------------------------------------------
@contextlib.contextmanager
def before_issuing(app: InProcessInstance, competitor: Callable[[], object]) -> Iterator[None]:
    """Run ``competitor`` once, after the next request's read-only checks and before its
    issuing transaction begins."""
    original = app.repository.issue
    fired: list[bool] = []

    def issue(*args: object, **kwargs: object):  # noqa: ANN202
        if not fired:
            fired.append(True)
            competitor()
        return original(*args, **kwargs)

    app.repository.issue = issue  # type: ignore[method-assign]
    try:
        yield
    finally:
        del app.repository.issue
    assert fired, "the request never reached its issuing transaction"


@contextlib.contextmanager
def while_signing(app: InProcessInstance, backend: str, database_url: str,
                  competitor: Callable[[], object]) -> Iterator[list[BaseException]]:
    """Start ``competitor`` in another thread when the next request signs, inside its
    issuing transaction, and let the signing go on only once the competitor has either
    finished or is waiting for a lock the transaction holds."""
    signer = app.services.signer
    original = signer.issue
    errors: list[BaseException] = []
    threads: list[threading.Thread] = []

    def run() -> None:
        try:
            competitor()
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    def issue(*args: object, **kwargs: object):  # noqa: ANN202
        if not threads:
            thread = threading.Thread(target=run)
            threads.append(thread)
            thread.start()
            wait_until_done_or_blocked(thread, backend, database_url)
        return original(*args, **kwargs)

    signer.issue = issue  # type: ignore[method-assign]
    try:
        yield errors
    finally:
        del signer.issue
        for thread in threads:
            thread.join()
    assert threads, "the request never signed"


def wait_until_done_or_blocked(thread: threading.Thread, backend: str,
                               database_url: str) -> None:
    """Until ``thread`` ended or waits for a lock: on PostgreSQL a backend waiting for a
    row lock (pg_stat_activity), on SQLite the thread inside the writer queue. The
    deadline only stops a broken run from hanging; it is no assertion about speed."""
    deadline = time.monotonic() + 60
    while thread.is_alive() and time.monotonic() < deadline:
        if backend == "postgres" and _postgres_lock_waits(database_url):
            return
        if backend == "sqlite" and _in_writer_queue(thread):
            return
        time.sleep(0.005)
    assert not thread.is_alive(), "the competitor neither finished nor waited for a lock"


def _postgres_lock_waits(url: str) -> int:
    with contextlib.closing(psycopg2.connect(url)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                       "AND datname = current_database()")
        return int(cursor.fetchone()[0])


def _in_writer_queue(thread: threading.Thread) -> bool:
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__enter__" and code.co_filename.endswith(
                str(Path("store", "transactions.py"))):
            return True
        frame = frame.f_back
    return False


# -- what must hold afterwards -------------------------------------------------------
def statuses(app: InProcessInstance, device_id: str) -> dict[int, str]:
    return {int(c.serial): c.status for c in app.repository.certificates(device_id)}


def ocsp_status(app: InProcessInstance, serial: int) -> ocsp.OCSPCertStatus:
    """The responder's answer for one serial."""
    response = ocsp.load_der_ocsp_response(app.services.ocsp.respond(
        ocsp_request_der(app.services.signer.ca_certificate, serial)))
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    return response.certificate_status


def crl_serials(app: InProcessInstance) -> set[int]:
    """The serials on a CRL built now (what every relying party downloads next)."""
    app.services.revocation.republish_crls()
    latest = app.repository.latest_crl(app.services.signer.name)
    return {entry.serial_number for entry in x509.load_der_x509_crl(latest.der)}


def assert_no_escape(app: InProcessInstance, device_id: str) -> None:
    """The device's every certificate is revoked: in the database, in OCSP, in the CRL."""
    found = statuses(app, device_id)
    assert found and set(found.values()) == {"revoked"}, found
    on_crl = crl_serials(app)
    for serial in found:
        assert ocsp_status(app, serial) is ocsp.OCSPCertStatus.REVOKED
        assert serial in on_crl


# -- enrolled devices ------------------------------------------------------------------
def enrolled(app: InProcessInstance, device_id: str):
    key = ec_key()
    certificate = enroll(app, key, device_id)
    return certificate, key


def reenroll(app: InProcessInstance, tmp_path: Path, certificate: x509.Certificate, key,
             new_key=None):
    cert_path, key_path = write_identity(tmp_path, f"id-{certificate.serial_number}",
                                         certificate, key)
    common_name = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    with http_client(app, cert_path, key_path) as client:
        return post_est(app, csr_body(new_key or ec_key(), common_name),
                        operation="simplereenroll", client=client)


def revoke(app: InProcessInstance, **target: str) -> Callable[[], object]:
    return lambda: app.services.revocation.revoke(actor="operator:test",
                                                  reason="keyCompromise", **target)


def refusal(response) -> tuple[int, str | None]:
    return response.status_code, response.headers.get("X-Error-Code")


# -- re-enrollment (simplereenroll over mTLS) ------------------------------------------
def test_a_device_revoked_after_the_checks_gets_no_renewal(app, tmp_path):
    certificate, key = enrolled(app, "race-renew-1")
    with before_issuing(app, revoke(app, device_id="race-renew-1")):
        response = reenroll(app, tmp_path, certificate, key)
    assert refusal(response) == (403, "device.revoked")
    assert_no_escape(app, "race-renew-1")


def test_a_certificate_revoked_after_the_checks_renews_nothing(app, tmp_path):
    certificate, key = enrolled(app, "race-renew-2")
    serial = format(certificate.serial_number, "x")
    with before_issuing(app, revoke(app, serial=serial)):
        response = reenroll(app, tmp_path, certificate, key)
    assert refusal(response) == (403, "cert.revoked")
    assert statuses(app, "race-renew-2") == {certificate.serial_number: "revoked"}
    assert app.repository.device("race-renew-2").status == "active"  # scope: certificate


def test_two_renewals_with_one_certificate_issue_one_successor(app, tmp_path):
    certificate, key = enrolled(app, "race-renew-3")
    competing: list = []
    with before_issuing(app, lambda: competing.append(reenroll(app, tmp_path, certificate,
                                                               key))):
        response = reenroll(app, tmp_path, certificate, key)
    (winner,) = competing
    assert winner.status_code == 200
    assert refusal(response) == (403, "cert.superseded")
    found = statuses(app, "race-renew-3")
    assert sorted(found.values()) == ["active", "superseded"]
    assert found[issued_certificate(winner).serial_number] == "active"


def test_a_revocation_inside_the_issuing_transaction_waits_and_revokes_the_renewal(
        app, backend, tmp_path):
    certificate, key = enrolled(app, "race-renew-4")
    with while_signing(app, backend, app.settings.database.url,
                       revoke(app, device_id="race-renew-4")) as errors:
        response = reenroll(app, tmp_path, certificate, key)
    assert errors == []
    assert response.status_code == 200  # it committed first ...
    assert_no_escape(app, "race-renew-4")  # ... and the revocation then revoked it


# -- the other issuing paths -----------------------------------------------------------
def test_a_token_re_provisioning_a_device_revoked_after_the_checks_is_refused(app,
                                                                               tmp_path):
    enrolled(app, "race-token-1")
    token = app.token("default", device_id="race-token-1")  # the operator re-provisions
    with before_issuing(app, revoke(app, device_id="race-token-1")):
        response = post_est(app, csr_body(ec_key(), "race-token-1"), token=token)
    assert refusal(response) == (403, "device.revoked")
    assert not token_used(app, token)
    assert_no_escape(app, "race-token-1")


def test_a_token_used_after_the_checks_is_refused(app, tmp_path):
    token = app.token("default")
    competing: list = []
    with before_issuing(app, lambda: competing.append(
            post_est(app, csr_body(ec_key(), "race-token-2"), token=token))):
        response = post_est(app, csr_body(ec_key(), "race-token-3"), token=token)
    assert competing[0].status_code == 200
    assert refusal(response) == (401, "auth.token_used")
    assert app.repository.device("race-token-3") is None


def test_a_bootstrap_device_revoked_after_the_checks_is_refused(app, tmp_path):
    factory = FactoryCA.create("Race Factory")
    app.create_group("factory", auth_methods="bootstrap",
                     bootstrap_ca_pem=cert_pem(factory.certificate).decode())
    idevid, idevid_key = factory.idevid("race-boot-1")
    cert_path, key_path = write_identity(tmp_path, "idevid", idevid, idevid_key)
    with http_client(app, cert_path, key_path) as client:
        first = post_est(app, csr_body(ec_key(), "race-boot-1"), label="factory",
                         client=client)
        assert first.status_code == 200
        with before_issuing(app, revoke(app, device_id="race-boot-1")):
            response = post_est(app, csr_body(ec_key(), "race-boot-1"), label="factory",
                                client=client)
    assert refusal(response) == (403, "device.revoked")
    assert_no_escape(app, "race-boot-1")


# -- TPM-attested enrollment (swtpm) -----------------------------------------------------
@pytest.fixture
def tpm(tmp_path: Path) -> Iterator[TpmDevice]:
    with SwtpmInstance(tmp_path / "tpm") as instance:
        Manufacturer.create(tmp_path / "vendor").provision(instance.tcti)
        with TpmDevice(instance.tcti) as device:
            yield device


@pytest.mark.integration
def test_a_tpm_device_revoked_after_the_checks_gets_no_certificate(app, tmp_path, tpm):
    vendor = Manufacturer.load(tmp_path / "vendor")
    app.create_group("fleet", auth_methods="tpm",
                     ek_roots_pem="".join(vendor.ca_certificate_pems))
    client = AttestClient(app, tpm, "fleet")
    first = client.post("enroll", client.evidence(client.challenge()))
    assert first.status_code == 200
    device_id = first_device_id(app)
    answer = client.challenge()  # the device's next (re-)enrollment starts ...
    with before_issuing(app, revoke(app, device_id=device_id)):  # ... the operator acts
        response = client.post("enroll", client.evidence(answer))
    assert refusal(response) == (403, "device.revoked")
    assert_no_escape(app, device_id)


def first_device_id(app: InProcessInstance) -> str:
    (device,) = app.repository.devices()
    return device.device_id
