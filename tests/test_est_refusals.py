"""EST refusals, in process (Flask's test client over create_app, a file CA key, SQLite;
client certificates through the trusted-proxy header). What needs the real TLS listener
(a handshake with an untrusted client certificate, a renewal over real mTLS) runs against
the served instance (integration).

Each refusal is checked as SECURITY-CHECKLIST defines "reject" (tests/support/est_helpers
assert_refused): status, stable code, nothing written, one audit row, still serving.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import threading

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.support.est_helpers import (
    FactoryCA,
    StoreSnapshot,
    assert_refused,
    certificate_status,
    cn_name,
    csr_body,
    csr_der,
    db_write,
    ec_key,
    enroll,
    est_body,
    http_client,
    issued_certificate,
    make_csr,
    post_est,
    token_used,
    write_identity,
)
from tests.support.fixtures import db_count


# -- request shape: refused before any cryptographic work (checklist 2) ----------------
def _good_der() -> bytes:
    return csr_der(make_csr(ec_key(), "rf-shape-dev"))


@pytest.mark.parametrize(("body", "code"), [
    pytest.param(lambda: est_body(_good_der()[:-9]), "csr.malformed", id="truncated"),
    pytest.param(lambda: est_body(_good_der() + b"\x00garbage"), "csr.trailing_data",
                 id="trailing-bytes"),
    pytest.param(lambda: b"MIIB*not-base64!" + est_body(_good_der()), "csr.not_base64",
                 id="not-base64"),
    pytest.param(lambda: b"", "csr.empty", id="empty"),
    pytest.param(lambda: b" \r\n", "csr.empty", id="whitespace-only"),
])
def test_simpleenroll_refuses_malformed_csr_body(app, body, code):
    token = app.token("default")
    before = StoreSnapshot.take(app)
    response = post_est(app, body(), token=token)
    assert_refused(app, before, response, 400, code)
    assert not token_used(app, token)


@pytest.mark.parametrize("content_type", ["application/octet-stream", "text/plain", None])
def test_simpleenroll_refuses_wrong_content_type(app, content_type):
    token = app.token("default")
    before = StoreSnapshot.take(app)
    response = post_est(app, csr_body(ec_key(), "rf-ctype-dev"), token=token,
                        content_type=content_type)
    assert_refused(app, before, response, 415, "request.content_type")
    assert not token_used(app, token)


def test_simpleenroll_refuses_body_over_16_kib(app):
    token = app.token("default")
    before = StoreSnapshot.take(app)
    oversized = csr_body(ec_key(), "rf-big-dev") + b"A" * (16 * 1024)
    response = post_est(app, oversized, token=token)
    assert_refused(app, before, response, 413, "request.too_large")
    assert not token_used(app, token)


def test_simpleenroll_refuses_chunked_body_over_16_kib(app):
    """No Content-Length: the limit must hold on the stream itself, not be truncated to a
    16 KiB prefix and parsed."""
    token = app.token("default")
    before = StoreSnapshot.take(app)
    oversized = csr_body(ec_key(), "rf-chunk-dev") + b"\n" * (17 * 1024)
    response = post_est(app, iter([oversized[:8000], oversized[8000:]]), token=token)
    assert_refused(app, before, response, 413, "request.too_large")


# -- CSR content (checklist 5, 6, 7) ----------------------------------------------------
def test_simpleenroll_refuses_csr_with_bad_signature(app):
    der = bytearray(_good_der())
    der[-1] ^= 0x01  # the last byte of the ECDSA signature's s
    token = app.token("default")
    before = StoreSnapshot.take(app)
    response = post_est(app, est_body(bytes(der)), token=token)
    assert_refused(app, before, response, 400, "csr.bad_signature")
    assert not token_used(app, token)


def test_simpleenroll_refuses_rsa_1024_key(app):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    token = app.token("default")
    before = StoreSnapshot.take(app)
    response = post_est(app, csr_body(weak, "rf-rsa1024-dev"), token=token)
    assert_refused(app, before, response, 403, "csr.weak_key")
    assert not token_used(app, token)


@pytest.mark.parametrize("curve", [ec.SECP256K1(), ec.SECP521R1()], ids=lambda c: c.name)
def test_simpleenroll_refuses_curve_outside_group_policy(app, curve):
    token = app.token("default")
    before = StoreSnapshot.take(app)
    response = post_est(app, csr_body(ec_key(curve), "rf-curve-dev"), token=token)
    assert_refused(app, before, response, 403, "csr.key_type_not_allowed")
    assert not token_used(app, token)


CN, ORG = NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME


@pytest.mark.parametrize("subject", [
    pytest.param(cn_name("fleet/dev-1"), id="slash"),
    pytest.param(cn_name("dev+1"), id="plus"),
    pytest.param(cn_name("dev#1"), id="hash"),
    pytest.param(cn_name("dev\x001"), id="nul"),
    pytest.param(x509.Name([x509.NameAttribute(ORG, "Acme/Evil"),
                            x509.NameAttribute(CN, "rf-dev-o")]), id="slash-in-o"),
    pytest.param(x509.Name([x509.NameAttribute(CN, "rf-dev-a"),
                            x509.NameAttribute(CN, "rf-dev-b")]), id="two-cns"),
    pytest.param(x509.Name([x509.RelativeDistinguishedName([
        x509.NameAttribute(CN, "rf-dev-m"), x509.NameAttribute(ORG, "Acme")])]),
        id="multi-valued-rdn"),
])
def test_simpleenroll_refuses_subject_unsafe_for_mqtt(app, subject):
    token = app.token("default")
    before = StoreSnapshot.take(app)
    response = post_est(app, csr_body(ec_key(), subject), token=token)
    assert_refused(app, before, response, 400, "csr.bad_subject")
    assert not token_used(app, token)


# -- credentials ------------------------------------------------------------------------
def test_simpleenroll_without_credentials_is_401_with_www_authenticate(app):
    before = StoreSnapshot.take(app)
    response = post_est(app, csr_body(ec_key(), "rf-anon-dev"))
    assert_refused(app, before, response, 401, "auth.required")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_simpleenroll_refuses_unknown_token(app):
    before = StoreSnapshot.take(app)
    response = post_est(app, csr_body(ec_key(), "rf-forged-dev"),
                        token="et_" + "A" * 43)
    assert_refused(app, before, response, 401, "auth.token_invalid")
    assert "WWW-Authenticate" in response.headers


def test_simpleenroll_refuses_reused_token_and_keeps_first_certificate(app):
    token = app.token("default")
    first = enroll(app, ec_key(), "rf-reuse-dev-1", token)
    before = StoreSnapshot.take(app)
    for common_name in ("rf-reuse-dev-1", "rf-reuse-dev-2"):  # same id or another, new key
        response = post_est(app, csr_body(ec_key(), common_name), token=token)
        assert_refused(app, before, response, 401, "auth.token_used")
        before = StoreSnapshot.take(app)
    assert certificate_status(app, first) == "active"


def test_simpleenroll_refuses_expired_token(app):
    token = app.token("default", ttl=dt.timedelta(seconds=1))
    app.clock.advance(seconds=2)
    before = StoreSnapshot.take(app)
    response = post_est(app, csr_body(ec_key(), "rf-late-dev"), token=token)
    assert_refused(app, before, response, 401, "auth.token_expired")
    assert not token_used(app, token)


def test_simpleenroll_refuses_token_of_another_group_on_labelled_path(app):
    app.create_group("refusals-other")
    token = app.token("refusals-other")
    before = StoreSnapshot.take(app)
    response = post_est(app, csr_body(ec_key(), "rf-label-dev"), token=token,
                        label="default")
    assert_refused(app, before, response, 403, "auth.token_group_mismatch")
    assert not token_used(app, token)


@pytest.mark.parametrize(("label", "status", "code"), [
    ("no-such-group", 404, "est.unknown_label"),  # before the token is even looked at
    ("x" * 65, 400, "est.bad_label"),  # longer than any group name (or audit column)
])
def test_simpleenroll_refuses_unknown_or_invalid_est_label(app, label, status,
                                                           code):
    token = app.token("default")
    before = StoreSnapshot.take(app)
    response = post_est(app, csr_body(ec_key(), "rf-nolabel-dev"), token=token,
                        label=label)
    assert_refused(app, before, response, status, code)
    assert not token_used(app, token)


# -- identities and retries (checklist 15) ---------------------------------------------
def test_unbound_token_cannot_take_over_an_enrolled_device_id(app):
    first = enroll(app, ec_key(), "rf-taken-dev")
    token = app.token("default")
    before = StoreSnapshot.take(app)
    response = post_est(app, csr_body(ec_key(), "rf-taken-dev"), token=token)
    assert_refused(app, before, response, 409, "identity.taken")
    assert not token_used(app, token)
    assert certificate_status(app, first) == "active"


def test_token_retry_with_same_key_returns_the_same_certificate(app):
    key, token = ec_key(), app.token("default")
    first = enroll(app, key, "rf-retry-dev", token)
    certificates = db_count(app, "certificate")
    again = enroll(app, key, "rf-retry-dev", token)
    assert again == first
    assert db_count(app, "certificate") == certificates
    assert certificate_status(app, first) == "active"


def _race(instance, requests: list[tuple[bytes, str]]) -> list[httpx.Response]:
    """Send all requests at once, each on its own connection."""
    barrier = threading.Barrier(len(requests), timeout=30)

    def send(request: tuple[bytes, str]) -> httpx.Response:
        body, token = request
        with http_client(instance) as client:
            client.get(instance.url + "/healthz")  # connect first, then race the POSTs
            barrier.wait()
            return post_est(instance, body, token=token, client=client)

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(send, requests))


def test_one_token_racing_concurrently_issues_exactly_one_certificate(app):
    token = app.token("default")
    before = StoreSnapshot.take(app)
    responses = _race(app, [(csr_body(ec_key(), "rf-race-dev"), token)
                                     for _ in range(6)])
    statuses = sorted((r.status_code, r.headers.get("X-Error-Code")) for r in responses)
    assert statuses == [(200, None)] + [(401, "auth.token_used")] * 5
    assert db_count(app, "certificate") == before.certificates + 1
    assert db_count(app, "device", "device_id = 'rf-race-dev'") == 1
    assert sorted(o for _a, o, _c in before.audit_since(app)) == (
        ["refused"] * 5 + ["success"])


def test_distinct_tokens_racing_for_one_device_id_issue_one_certificate(app):
    """Two operators' unbound tokens, one id: the loser must never supersede the winner."""
    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # six operators, in parallel
        tokens = list(pool.map(lambda _: app.token("default"), range(6)))
    before = StoreSnapshot.take(app)
    responses = _race(app, [(csr_body(ec_key(), "rf-contested-dev"), token)
                                     for token in tokens])
    statuses = sorted((r.status_code, r.headers.get("X-Error-Code")) for r in responses)
    assert statuses == [(200, None)] + [(409, "identity.taken")] * 5
    (winner,) = [issued_certificate(r) for r in responses if r.status_code == 200]
    assert certificate_status(app, winner) == "active"
    assert db_count(app, "certificate") == before.certificates + 1
    assert db_count(app, "enrollment_token", "used_at IS NOT NULL") == (
        before.used_tokens + 1)


# -- re-enrollment over mTLS (RFC 7030 4.2.2; checklist 1, 8, 26) ----------------------
def enrolled(instance, tmp_path, common_name: str):
    """A device enrolled with a token: its certificate, key and mTLS client."""
    key = ec_key()
    certificate = enroll(instance, key, common_name)
    cert_path, key_path = write_identity(tmp_path, common_name, certificate, key)
    return certificate, key, http_client(instance, cert_path, key_path)


def reenroll(instance, client, key, subject) -> httpx.Response:
    return post_est(instance, csr_body(key, subject), operation="simplereenroll",
                    client=client)


def assert_reenroll_refused(instance, before, response, status, code) -> None:
    assert_refused(instance, before, response, status, code, action="est.simplereenroll")


def test_reenroll_with_a_new_key_supersedes_the_old_certificate(app, tmp_path):
    old, _key, client = enrolled(app, tmp_path, "rf-renew-dev")
    new_key = ec_key()
    with client:
        new = issued_certificate(reenroll(app, client, new_key, "rf-renew-dev"))
    assert new.public_key() == new_key.public_key() and new.subject == old.subject
    assert certificate_status(app, old) == "superseded"
    assert certificate_status(app, new) == "active"


def test_reenroll_refuses_subject_change(app, tmp_path):
    old, _key, client = enrolled(app, tmp_path, "rf-rename-dev")
    before = StoreSnapshot.take(app)
    with client:
        response = reenroll(app, client, ec_key(), "rf-rename-dev-2")
    assert_reenroll_refused(app, before, response, 403, "reenroll.names_changed")
    assert certificate_status(app, old) == "active"


@pytest.mark.parametrize(("column", "value", "status", "code"), [
    ("status", "revoked", 403, "cert.revoked"),
    ("not_after", "2001-01-01 00:00:00", 401, "cert.expired"),
])
def test_reenroll_refuses_revoked_or_expired_certificate(app, tmp_path, column,
                                                         value, status, code):
    old, key, client = enrolled(app, tmp_path, f"rf-dead-dev-{column}")
    # Test setup: there is no revoke command yet, and a real expiry takes a year.
    db_write(app, f"UPDATE certificate SET {column} = ? WHERE serial = ?",
             (value, str(old.serial_number)))
    before = StoreSnapshot.take(app)
    with client:
        response = reenroll(app, client, key, f"rf-dead-dev-{column}")
    assert_reenroll_refused(app, before, response, status, code)
    if column == "not_after":
        assert certificate_status(app, old) == "active"


def test_reenroll_without_client_certificate_is_401(app):
    before = StoreSnapshot.take(app)
    response = post_est(app, csr_body(ec_key(), "rf-nocert-dev"),
                        operation="simplereenroll")
    assert_reenroll_refused(app, before, response, 401, "auth.required")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_reenroll_retry_with_superseded_cert_and_same_key_returns_same_certificate(
        app, tmp_path):
    old, _key, client = enrolled(app, tmp_path, "rf-lost-reply-dev")
    new_key = ec_key()
    with client:
        new = issued_certificate(reenroll(app, client, new_key, "rf-lost-reply-dev"))
        certificates = db_count(app, "certificate")
        again = issued_certificate(reenroll(app, client, new_key, "rf-lost-reply-dev"))
    assert again == new
    assert db_count(app, "certificate") == certificates
    assert certificate_status(app, old) == "superseded"
    assert certificate_status(app, new) == "active"


def test_reenroll_refuses_superseded_certificate_with_another_key(app, tmp_path):
    _old, _key, client = enrolled(app, tmp_path, "rf-stale-dev")
    with client:
        new = issued_certificate(reenroll(app, client, ec_key(), "rf-stale-dev"))
        before = StoreSnapshot.take(app)
        response = reenroll(app, client, ec_key(), "rf-stale-dev")
    assert_reenroll_refused(app, before, response, 403, "cert.superseded")
    assert certificate_status(app, new) == "active"


@pytest.mark.integration
def test_reenroll_with_untrusted_client_certificate_fails_tls_handshake(est_instance,
                                                                        tmp_path):
    rogue = FactoryCA.create("Rogue")  # self-signed, not in the server's trust store
    cert_path, key_path = write_identity(tmp_path, "rogue", rogue.certificate, rogue.key)
    before = StoreSnapshot.take(est_instance)
    with pytest.raises((httpx.ConnectError, httpx.ReadError)) as raised, \
            http_client(est_instance, cert_path, key_path) as client:
        post_est(est_instance, csr_body(ec_key(), "rf-rogue-dev"), client=client,
                 operation="simplereenroll")
    # TLS 1.3: the client's handshake ends first; the server's alert comes on the read.
    assert "ALERT_UNKNOWN_CA" in str(raised.value)
    assert StoreSnapshot.take(est_instance).certificates == before.certificates
    assert before.audit_since(est_instance) == []  # never reached the application
    assert db_count(est_instance, "device", "device_id = 'rf-rogue-dev'") == 0
