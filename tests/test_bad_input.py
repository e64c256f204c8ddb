"""Bad input stays a 4xx (issue 9, item 4; SECURITY-CHECKLIST 3, 32 and 33), against a
served instance: every JSON endpoint refuses nested, oversized, mistyped and unknown input
with a stable code and writes nothing; no response is ever built from the Host header.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import httpx
import pytest

from simulators.served import ServedInstance, unthrottled
from tests.support.attest_helpers import Snapshot
from tests.support.fixtures import db_count
from tests.support.stalls import tls_context

NESTED = b"[" * 1100 + b"]" * 1100  # ~2 KB: RecursionError in json.loads (was a 500)
A = "QUJD"  # base64 of "ABC"

# (name, body, content type, expected status, expected code)
BAD_BODIES: list[tuple[str, bytes, str, int, str]] = [
    ("nested arrays", NESTED, "application/json", 400, "request.json_too_deep"),
    ("nested objects", b'{"a":' * 1100 + b"1" + b"}" * 1100, "application/json", 400,
     "request.json_too_deep"),
    ("nested in a field", b'{"ek_public": ' + NESTED + b"}", "application/json", 400,
     "request.json_too_deep"),
    ("oversized", json.dumps({"ek_public": "A" * 20000}).encode(), "application/json", 413,
     "request.too_large"),
    ("not JSON", b"{not json", "application/json", 400, "request.invalid_json"),
    ("not UTF-8", b'{"ek_public": "\xff\xfe"}', "application/json", 400,
     "request.invalid_json"),
    ("NaN", b'{"ek_public": NaN}', "application/json", 400, "request.invalid_json"),
    ("5000-digit number", b'{"ek_public": ' + b"9" * 5000 + b"}", "application/json", 400,
     "request.invalid_json"),
    ("an array", b"[1, 2]", "application/json", 400, "request.invalid_json"),
    ("null", b"null", "application/json", 400, "request.invalid_json"),
    ("empty", b"", "application/json", 400, "request.invalid_json"),
    ("wrong content type", b"{}", "text/plain", 415, "request.content_type"),
]

CHALLENGE_FIELDS: list[tuple[str, dict]] = [
    ("unknown field", {"ek_public": A, "ak_public": A, "ek_publik": A}),
    ("number for bytes", {"ek_public": 5, "ak_public": A}),
    ("list for bytes", {"ek_public": [A], "ak_public": A}),
    ("object for bytes", {"ek_public": {"a": A}, "ak_public": A}),
    ("absurd length", {"ek_public": "A" * 12000, "ak_public": A}),
    ("missing field", {"ek_public": A}),
    ("not base64", {"ek_public": "%%%%", "ak_public": A}),
]
ENROLL_FIELDS: list[tuple[str, dict]] = [
    ("absurd challenge id", {"challenge_id": "c" * 5000}),
    ("number challenge id", {"challenge_id": 7}),
    ("unknown field", {"challenge_id": "c", "extra": True}),
    ("null csr", {"challenge_id": "c", "csr": None}),
]
REVOCATION_FIELDS: list[tuple[str, dict]] = [
    ("absurd device id", {"device_id": "d" * 10000}),
    ("number device id", {"device_id": 12}),
    ("list serial", {"serial": ["ab"]}),
    ("serial not hex", {"serial": "xyz"}),
    ("unknown reason", {"device_id": "d", "reason": "because"}),
    ("object reason", {"device_id": "d", "reason": {"a": 1}}),
    ("unknown field", {"device_id": "d", "everything": True}),
    ("nothing to revoke", {}),
    ("two targets", {"device_id": "d", "group": "default"}),
]


@pytest.fixture(scope="module")
def server() -> Iterator[ServedInstance]:
    instance = ServedInstance(env=unthrottled())  # dozens of requests from one address
    try:
        with instance:
            yield instance
    finally:
        instance.cleanup()


@pytest.fixture(scope="module")
def http(server: ServedInstance) -> Iterator[httpx.Client]:
    with httpx.Client(verify=tls_context(server.trust_anchor), timeout=60) as client:
        yield client


def operator_headers(server: ServedInstance) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.operator_credential}"}


ENDPOINTS = {"challenge": "/.well-known/est/attest/challenge",
             "enroll": "/.well-known/est/attest/enroll",
             "revocations": "/api/v1/revocations"}


def assert_refused_cleanly(server: ServedInstance, response: httpx.Response, status: int,
                           code: str | None, before: Snapshot, revoked: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status and problem["code"] == response.headers["X-Error-Code"]
    if code is not None:
        assert problem["code"] == code, problem
    assert "Traceback" not in response.text
    after = Snapshot.take(server)
    assert (after.certificates, after.devices, after.evidence) == (
        before.certificates, before.devices, before.evidence)
    assert db_count(server, "certificate", "status = 'revoked'") == revoked


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@pytest.mark.parametrize(("name", "body", "content_type", "status", "code"), BAD_BODIES,
                         ids=[case[0] for case in BAD_BODIES])
def test_every_json_endpoint_refuses_bad_bodies_with_a_4xx(
        server: ServedInstance, http: httpx.Client, endpoint: str, name: str, body: bytes,
        content_type: str, status: int, code: str) -> None:  # fmt: skip
    before, revoked = Snapshot.take(server), db_count(server, "certificate",
                                                      "status = 'revoked'")
    response = http.post(server.url + ENDPOINTS[endpoint], content=body,
                         headers={"Content-Type": content_type, **operator_headers(server)})
    assert_refused_cleanly(server, response, status, code, before, revoked)


@pytest.mark.parametrize(("endpoint", "name", "fields"),
                         [("challenge", *case) for case in CHALLENGE_FIELDS]
                         + [("enroll", *case) for case in ENROLL_FIELDS]
                         + [("revocations", *case) for case in REVOCATION_FIELDS],
                         ids=lambda value: value if isinstance(value, str) else None)
def test_every_json_endpoint_refuses_wrong_fields_naming_a_field(
        server: ServedInstance, http: httpx.Client, endpoint: str, name: str,
        fields: dict) -> None:  # fmt: skip
    before, revoked = Snapshot.take(server), db_count(server, "certificate",
                                                      "status = 'revoked'")
    response = http.post(server.url + ENDPOINTS[endpoint], json=fields,
                         headers=operator_headers(server))
    assert_refused_cleanly(server, response, 400, None, before, revoked)
    assert response.headers["X-Error-Code"].startswith(("request.", "revoke."))


def test_the_server_log_holds_no_traceback_after_all_that(server: ServedInstance) -> None:
    assert "Traceback" not in server.log_text()


@pytest.mark.parametrize("path", ["/.well-known/est//cacerts", "//healthz",
                                  "/.well-known//est/cacerts", "/healthz/",
                                  "/.well-known/est/cacerts/"])
def test_no_redirect_is_built_from_the_host_header(server: ServedInstance, path: str) -> None:
    """Before: `/.well-known/est//cacerts` with `Host: evil.example` answered 308 to
    https://evil.example/... (werkzeug merged the slashes and redirected)."""
    result = subprocess.run(
        ["curl", "-sS", "--cacert", str(server.trust_anchor), "-H", "Host: evil.example",
         "--path-as-is", "-D", "-", "-o", "/dev/null", "-w", "%{http_code}",
         server.url + path], capture_output=True, text=True, timeout=60)
    headers, _, status = result.stdout.rpartition("\n")
    assert result.returncode == 0, result.stderr
    assert status in ("200", "404"), result.stdout  # answered or not found, never 3xx
    assert "evil.example" not in result.stdout
    assert "location:" not in headers.lower()
