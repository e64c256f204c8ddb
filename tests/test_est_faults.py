"""Bootstrap (IDevID) enrollment and faults, against real served instances.

Instances whose configuration or HSM must differ are started here (ServedInstance with
env); the rest share the session's est_instance. Refusals are checked as in
test_est_refusals (est_helpers.assert_refused). Manual approval and the rate limit are
edge cases of the application alone: tests/test_est_edge.py, in process.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator

import httpx
import pytest

from simulators.served import ServedInstance
from tests.support.est_helpers import (
    FactoryCA,
    StoreSnapshot,
    assert_refused,
    assert_serves_cacerts,
    cert_pem,
    certificate_status,
    csr_body,
    db_rows,
    ec_key,
    enroll,
    http_client,
    issued_certificate,
    post_est,
    token_used,
    write_identity,
)
from tests.support.fixtures import db_count

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker


@pytest.fixture
def own_instance() -> Iterator[Callable[..., ServedInstance]]:
    """Start ServedInstances with their own configuration; all are cleaned up."""
    started: list[ServedInstance] = []

    def start(env: dict[str, str] | None = None,
              before_start: Callable[[ServedInstance], None] | None = None
              ) -> ServedInstance:
        instance = ServedInstance(env=env)
        started.append(instance)
        if before_start is not None:
            before_start(instance)
        instance.start()
        return instance

    yield start
    for instance in started:
        instance.cleanup()


# -- bootstrap (IDevID) enrollment -----------------------------------------------------
@pytest.fixture(scope="module")
def factory(tmp_path_factory) -> Iterator[tuple[ServedInstance, FactoryCA]]:
    """An instance whose 'factory' group trusts a factory CA. Groups exist before the
    server starts: the TLS trust bundle is built at start."""
    factory_ca = FactoryCA.create("Acme Factory")
    ca_path = tmp_path_factory.mktemp("factory") / "factory-ca.pem"
    ca_path.write_bytes(cert_pem(factory_ca.certificate))
    instance = ServedInstance()
    try:
        instance.cli("group", "create", "factory", "--auth", "bootstrap",
                     "--bootstrap-ca", str(ca_path))
        instance.cli("group", "create", "tokens-only")
        with instance:
            yield instance, factory_ca
    finally:
        instance.cleanup()


def idevid_client(instance, tmp_path, issuer: FactoryCA, common_name: str) -> httpx.Client:
    certificate, key = issuer.idevid(common_name)
    cert_path, key_path = write_identity(tmp_path, f"idevid-{id(key)}", certificate, key)
    return http_client(instance, cert_path, key_path)


def test_bootstrap_enrollment_issues_certificate_for_the_idevid_cn(factory, tmp_path):
    instance, factory_ca = factory
    key = ec_key()
    with idevid_client(instance, tmp_path, factory_ca, "factory-dev-1") as client:
        response = post_est(instance, csr_body(key, "factory-dev-1"), label="factory",
                            client=client)
    certificate = issued_certificate(response)
    assert certificate.subject.rfc4514_string() == "CN=factory-dev-1"
    assert certificate.public_key() == key.public_key()
    assert db_count(instance, "device", "device_id = 'factory-dev-1' "
                    "AND enrolled_by = 'bootstrap' AND identity_pin LIKE 'bootstrap:%'") == 1


def test_bootstrap_refuses_idevid_of_an_untrusted_factory_in_tls_handshake(factory,
                                                                           tmp_path):
    instance, _ = factory
    before = StoreSnapshot.take(instance)
    with pytest.raises((httpx.ConnectError, httpx.ReadError), match="UNKNOWN_CA"), \
            idevid_client(instance, tmp_path, FactoryCA.create("Rogue Factory"),
                          "factory-dev-2") as client:
        post_est(instance, csr_body(ec_key(), "factory-dev-2"), label="factory",
                 client=client)
    assert StoreSnapshot.take(instance) == before  # not even an audit row: no request
    assert_serves_cacerts(instance)


def test_bootstrap_refuses_second_idevid_claiming_an_enrolled_cn(factory, tmp_path):
    instance, factory_ca = factory
    with idevid_client(instance, tmp_path, factory_ca, "factory-dev-3") as client:
        first = issued_certificate(post_est(instance, csr_body(ec_key(), "factory-dev-3"),
                                            label="factory", client=client))
    before = StoreSnapshot.take(instance)
    with idevid_client(instance, tmp_path, factory_ca, "factory-dev-3") as clone:
        response = post_est(instance, csr_body(ec_key(), "factory-dev-3"),
                            label="factory", client=clone)
    assert_refused(instance, before, response, 409, "identity.taken")
    assert certificate_status(instance, first) == "active"


@pytest.mark.parametrize(("label", "status", "code"), [
    ("tokens-only", 403, "auth.method_not_allowed"),
    # The built-in default group lists "token,bootstrap" but trusts no bootstrap CA.
    (None, 401, "auth.bootstrap_untrusted"),
])
def test_bootstrap_idevid_is_refused_by_a_group_not_trusting_it(factory, tmp_path, label,
                                                                status, code):
    instance, factory_ca = factory
    before = StoreSnapshot.take(instance)
    with idevid_client(instance, tmp_path, factory_ca, "factory-dev-4") as client:
        response = post_est(instance, csr_body(ec_key(), "factory-dev-4"), label=label,
                            client=client)
    assert_refused(instance, before, response, status, code)


# -- SQLite locked beyond the busy timeout (checklist 20) -------------------------------
def test_database_locked_beyond_busy_timeout_is_503_then_recovers(est_instance):
    token, key = est_instance.token("default"), ec_key()
    body = csr_body(key, "ft-locked-dev")
    before = StoreSnapshot.take(est_instance)
    holder = sqlite3.connect(est_instance.dir / "enroll.db", isolation_level=None,
                             check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(post_est, est_instance, body, token=token)
            time.sleep(7)  # past the 5 s busy timeout of the request's transaction
            holder.execute("ROLLBACK")
            response = pending.result(timeout=30)
    finally:
        holder.close()
    assert int(response.headers["Retry-After"]) >= 1
    assert_refused(est_instance, before, response, 503, "store.unavailable", outcome="error")
    assert not token_used(est_instance, token)
    certificate = enroll(est_instance, key, "ft-locked-dev", token)  # the same request now
    assert certificate_status(est_instance, certificate) == "active"


# -- the HSM (checklist 16) -------------------------------------------------------------
def audit_detail(instance: ServedInstance, code: str) -> str:
    ((detail,),) = db_rows(instance, "SELECT detail FROM audit_event WHERE code = ?",
                           (code,))
    return detail


def test_hsm_token_removed_is_503_and_the_same_token_succeeds_after_it_returns(
        own_instance, tmp_path):
    instance = own_instance({"ENROLL_CA__PKCS11__RECONNECT_BACKOFF_SECONDS": "0.5",
                             "ENROLL_SERVER__WORKERS": "1"})
    enroll(instance, ec_key(), "ft-hsm-dev-1")  # the worker now holds a live HSM session
    tokens = instance.dir / "softhsm" / "tokens"
    token, body = instance.token("default"), csr_body(ec_key(), "ft-hsm-dev-2")
    before = StoreSnapshot.take(instance)
    shutil.move(tokens, tmp_path / "unplugged")
    try:
        response = post_est(instance, body, token=token)
    finally:
        shutil.move(tmp_path / "unplugged", tokens)
    assert int(response.headers["Retry-After"]) >= 1
    assert_refused(instance, before, response, 503, "ca.signer_unavailable",
                   outcome="error")
    assert "C_Sign" in audit_detail(instance, "ca.signer_unavailable")  # the live session
    assert not token_used(instance, token)
    time.sleep(0.6)  # past the reconnect backoff
    certificate = issued_certificate(post_est(instance, body, token=token))
    assert certificate.subject.rfc4514_string() == "CN=ft-hsm-dev-2"
    assert token_used(instance, token)


def test_wrong_hsm_pin_still_serves_cacerts_and_enroll_is_503(own_instance):
    def write_wrong_pin(instance: ServedInstance) -> None:
        (instance.dir / "secrets" / "hsm.pin").write_text("0000-wrong\n")

    instance = own_instance(before_start=write_wrong_pin)
    token = instance.token("default")
    before = StoreSnapshot.take(instance)
    response = post_est(instance, csr_body(ec_key(), "ft-pin-dev"), token=token)
    assert int(response.headers["Retry-After"]) >= 1
    assert_refused(instance, before, response, 503, "ca.signer_unavailable",
                   outcome="error")
    detail = audit_detail(instance, "ca.signer_unavailable")
    assert "PinIncorrect" in detail
    assert "0000-wrong" not in detail + response.text
    assert not token_used(instance, token)
    with http_client(instance) as client:
        assert client.get(instance.url + "/readyz").status_code == 503


# -- reverse-proxy mode: a forwarded client certificate ----------------------------------
def forwarded_reenroll(instance, certificate, key, common_name) -> httpx.Response:
    """What nginx sends: $ssl_client_escaped_cert, i.e. URL-encoded PEM."""
    header = urllib.parse.quote(cert_pem(certificate).decode(), safe="")
    return post_est(instance, csr_body(key, common_name), operation="simplereenroll",
                    headers={"X-SSL-Client-Cert": header})


def test_trusted_proxy_header_authorises_reenroll_without_tls_client_cert(own_instance):
    instance = own_instance({"ENROLL_SERVER__TRUSTED_PROXIES": "127.0.0.1"})
    old = enroll(instance, ec_key(), "ft-proxied-dev")
    new_key = ec_key()
    new = issued_certificate(forwarded_reenroll(instance, old, new_key, "ft-proxied-dev"))
    assert new.public_key() == new_key.public_key()
    assert certificate_status(instance, old) == "superseded"
    assert certificate_status(instance, new) == "active"


def test_forwarded_client_cert_header_is_ignored_without_trusted_proxies(est_instance):
    old = enroll(est_instance, ec_key(), "ft-unproxied-dev")
    before = StoreSnapshot.take(est_instance)
    response = forwarded_reenroll(est_instance, old, ec_key(), "ft-unproxied-dev")
    assert_refused(est_instance, before, response, 401, "auth.required",
                   action="est.simplereenroll")
    assert certificate_status(est_instance, old) == "active"
