"""EST edge cases of the application alone, in process (Flask's test client over
create_app): manual approval (RFC 7030 4.2.3) and the rate limit (checklist 4), with
the limiter's clock moved by the test instead of waiting."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.est_helpers import (
    StoreSnapshot,
    assert_refused,
    csr_body,
    ec_key,
    enroll,
    http_client,
    issued_certificate,
    post_est,
    token_used,
)
from tests.support.fixtures import db_count
from tests.support.inprocess import InProcessInstance


def test_approval_group_answers_202_until_an_operator_approves(app):
    app.create_group("faults-held", requires_approval=True)
    key, token = ec_key(), app.token("faults-held")
    body = csr_body(key, "ft-held-dev")
    before = StoreSnapshot.take(app)
    for _attempt in range(2):  # a retry before the decision changes nothing
        response = post_est(app, body, token=token, label="faults-held")
        assert response.status_code == 202
        assert response.headers["X-Error-Code"] == "enroll.pending_approval"
        assert int(response.headers["Retry-After"]) >= 1
        assert db_count(app, "pending_request", "device_id = 'ft-held-dev'") == 1
    assert (db_count(app, "certificate"), db_count(app, "device")) == (
        before.certificates, before.devices)
    assert not token_used(app, token)
    assert [o for _a, o, _c in before.audit_since(app)] == ["pending"] * 2

    assert app.repository.decide_pending("ft-held-dev", True, "operator:test") == 1
    certificate = issued_certificate(post_est(app, body, token=token, label="faults-held"))
    assert certificate.subject.rfc4514_string() == "CN=ft-held-dev"
    assert token_used(app, token)
    assert db_count(app, "pending_request", "device_id = 'ft-held-dev'") == 0


def test_a_rejected_request_stays_refused(app):
    app.create_group("faults-rejected", requires_approval=True)
    key, token = ec_key(), app.token("faults-rejected")
    body = csr_body(key, "ft-rejected-dev")
    assert post_est(app, body, token=token, label="faults-rejected").status_code == 202
    app.repository.decide_pending("ft-rejected-dev", False, "operator:test")
    before = StoreSnapshot.take(app)
    response = post_est(app, body, token=token, label="faults-rejected")
    assert_refused(app, before, response, 403, "enroll.rejected")
    assert not token_used(app, token)


class MonotonicClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def throttled(tmp_path) -> Iterator[tuple[InProcessInstance, MonotonicClock]]:
    instance = InProcessInstance(tmp_path / "instance", SERVER__RATE_LIMIT_PER_SECOND="1",
                                 SERVER__RATE_LIMIT_BURST="2")
    clock = MonotonicClock()
    instance.services.rate_limiter.clock = clock
    try:
        yield instance, clock
    finally:
        instance.close()


def test_flood_from_one_address_gets_429_with_retry_after(throttled):
    app, clock = throttled
    token = app.token("default")
    body = csr_body(ec_key(), "ft-flood-dev")
    with http_client(app) as client:
        for _burst in range(2):  # the burst: anonymous, refused 401 but not limited
            assert post_est(app, body, client=client).status_code == 401
        before = StoreSnapshot.take(app)
        response = post_est(app, body, token=token, client=client)
    assert_refused(app, before, response, 429, "rate_limited")
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 2
    clock.now += retry_after
    assert enroll(app, ec_key(), "ft-flood-dev", token).subject.rfc4514_string() == (
        "CN=ft-flood-dev")
