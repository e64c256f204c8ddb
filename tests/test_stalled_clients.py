"""Stalled and vanishing clients never starve the server (issue 9, item 3;
SECURITY-CHECKLIST 31 and 32), against a served instance over real TLS.

With gunicorn's gthread worker, 16 such connections held every thread of a 2 x 8 server
and /healthz timed out; here 256 of each kind are held while a health check, cacerts, a
token enrollment and a TPM-attested enrollment are answered. No timing is asserted: the
clients wait generously, and the stalls must still be open when the answers came.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from device_sdk.attest import AttestedEnrollment
from device_sdk.tpm import TpmDevice
from simulators.manufacturer import Manufacturer
from simulators.served import ServedInstance
from simulators.swtpm import SwtpmInstance
from tests.support.attest_helpers import roots_file
from tests.support.est_helpers import csr_body, ec_key, issued_certificate, post_est
from tests.support.stalls import (
    KINDS,
    StalledClients,
    closed_by_server,
    open_stalled,
    raise_file_limit,
    read_until_closed,
    tls_context,
)

STALLS_PER_KIND = 256
GENEROUS = httpx.Timeout(120.0)


@pytest.fixture(scope="module")
def manufacturer(tmp_path_factory: pytest.TempPathFactory) -> Manufacturer:
    return Manufacturer.create(tmp_path_factory.mktemp("vendor"))


@pytest.fixture(scope="module")
def server(manufacturer: Manufacturer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedInstance]:
    """Its own instance: the read timeout is long here, so that nothing but the fix can
    explain the answers (a short one would free the threads too); tests that need it
    short restart it with other settings."""
    instance = ServedInstance(env={"ENROLL_SERVER__READ_TIMEOUT_SECONDS": "900"})
    try:
        roots = roots_file(tmp_path_factory.mktemp("roots"), manufacturer.ca_certificate_pems)
        instance.cli("group", "create", "tpm-stall", "--auth", "tpm", "--ek-roots", str(roots))
        with instance:
            yield instance
    finally:
        instance.cleanup()


def restarted(instance: ServedInstance, **settings: str) -> None:
    instance.stop()
    instance.env.update({f"ENROLL_SERVER__{k.upper()}": v for k, v in settings.items()})
    instance.start()


def client(instance: ServedInstance) -> httpx.Client:
    return httpx.Client(verify=tls_context(instance.trust_anchor), timeout=GENEROUS)


def test_health_cacerts_and_both_enrollments_answer_while_256_stalls_of_each_kind_are_held(
        server: ServedInstance, manufacturer: Manufacturer, tmp_path: Path) -> None:
    raise_file_limit(len(KINDS) * STALLS_PER_KIND + 512)
    with StalledClients(server.port, tls_context(server.trust_anchor)) as stalls, \
            client(server) as http:
        for kind in KINDS:
            stalls.open(kind, STALLS_PER_KIND)

        assert http.get(f"{server.url}/healthz").json() == {"status": "ok"}
        cacerts = http.get(f"{server.url}/.well-known/est/cacerts")
        assert cacerts.status_code == 200 and cacerts.content
        enrolled = issued_certificate(post_est(server, csr_body(ec_key(), "stall-token-dev"),
                                               token=server.token(), client=http))
        with SwtpmInstance(tmp_path / "tpm") as swtpm:
            manufacturer.provision(swtpm.tcti)
            with TpmDevice(swtpm.tcti) as tpm, AttestedEnrollment(
                    server.url, server.trust_anchor, tpm, "tpm-stall",
                    timeout=GENEROUS.read) as enrollment:
                attested = enrollment.enroll()

        # The stalls were held the whole time: the server answered beside them.
        assert stalls.still_open() == {kind: STALLS_PER_KIND for kind in KINDS}
    assert enrolled.serial_number != attested.serial_number
    assert "Traceback" not in server.log_text()


def test_stalled_connections_are_closed_after_the_read_timeout(server: ServedInstance) -> None:
    restarted(server, read_timeout_seconds="2", keepalive_seconds="2")
    try:
        context = tls_context(server.trust_anchor)
        with StalledClients(server.port, context) as stalls:
            for kind in KINDS:
                stalls.open(kind, 8)
            kept_alive = open_stalled("idle_after_tls", server.port, context)
            kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert kept_alive.recv(4096).startswith(b"HTTP/1.1 200")  # then idle
            deadline = time.monotonic() + 120  # an upper bound to give up, not a measure
            while any(stalls.still_open().values()) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert stalls.still_open() == {kind: 0 for kind in KINDS}
            while not closed_by_server(kept_alive) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert closed_by_server(kept_alive)
            kept_alive.close()
        with client(server) as http:
            assert http.get(f"{server.url}/healthz").status_code == 200
    finally:
        restarted(server, read_timeout_seconds="900", keepalive_seconds="30")


def test_a_request_cut_off_by_the_read_timeout_gets_408(server: ServedInstance) -> None:
    restarted(server, read_timeout_seconds="2")
    try:
        stalled = open_stalled("half_body", server.port, tls_context(server.trust_anchor))
        stalled.settimeout(120)
        answer = read_until_closed(stalled)
        stalled.close()
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"X-Error-Code: request.timeout" in answer
    finally:
        restarted(server, read_timeout_seconds="900")


@pytest.mark.parametrize("hang_up", ["shutdown_write", "reset"])
@pytest.mark.parametrize("where", ["half_handshake", "half_headers", "half_body"])
def test_a_client_hanging_up_mid_request_is_never_a_5xx(server: ServedInstance,
                                                        hang_up: str, where: str) -> None:
    before = server.log_text()
    connection = open_stalled(where, server.port, tls_context(server.trust_anchor))
    if hang_up == "shutdown_write":
        socket.socket.shutdown(connection, socket.SHUT_WR)  # TCP FIN mid-request
        connection.settimeout(120)
        answer = read_until_closed(connection)
        tls_alert = where == "half_handshake" and answer.startswith(b"\x15")  # RFC 8446 6
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4") or tls_alert, answer[:200]
    else:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    connection.close()  # with SO_LINGER 0: a RST
    with client(server) as http:  # and the server carries on
        assert http.get(f"{server.url}/healthz").status_code == 200
    new_log = server.log_text()[len(before):]
    assert "Traceback" not in new_log and "Error handling request" not in new_log


def test_pipelined_requests_on_one_connection_are_answered_in_order(
        server: ServedInstance) -> None:
    connection = open_stalled("idle_after_tls", server.port, tls_context(server.trust_anchor))
    connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
                       b"GET /.well-known/est/nope/cacerts/x HTTP/1.1\r\nHost: localhost\r\n\r\n"
                       b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    connection.settimeout(120)
    answers = read_until_closed(connection)
    connection.close()
    assert [status for status, _ in responses(answers)] == [200, 404, 200]


def responses(stream: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each HTTP/1.1 response in stream (Content-Length framed)."""
    parsed = []
    while stream:
        head, _, rest = stream.partition(b"\r\n\r\n")
        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
        length = int(fields.get(b"Content-Length", b"0"))
        parsed.append((int(head.split(b" ")[1]), rest[:length]))
        stream = rest[length:]
    return parsed


def test_expect_100_continue_gets_an_interim_answer_and_then_the_certificate(
        server: ServedInstance) -> None:
    body = csr_body(ec_key(), "stall-continue-dev")
    head = ("POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: Bearer {server.token()}\r\n"
            "Content-Type: application/pkcs10\r\nExpect: 100-continue\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    connection = open_stalled("idle_after_tls", server.port, tls_context(server.trust_anchor))
    connection.settimeout(120)
    connection.sendall(head)
    assert connection.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"  # RFC 9110 10.1.1
    connection.sendall(body)
    answer = read_until_closed(connection)
    connection.close()
    while answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):  # more interim answers
        answer = answer.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")  # may come (15.2)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), answer[:300]
    assert b"application/pkcs7-mime" in head and body


def test_broken_chunked_framing_is_a_400_from_the_server_itself(
        server: ServedInstance) -> None:
    connection = open_stalled("idle_after_tls", server.port, tls_context(server.trust_anchor))
    connection.settimeout(120)
    connection.sendall(b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\n"
                       b"Content-Type: application/pkcs10\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\nabc\r\n0\r\n\r\n")
    answer = read_until_closed(connection)
    connection.close()
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"X-Error-Code: request.bad_chunked_body" in answer


def test_tls_errors_close_only_that_connection(server: ServedInstance) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as plain:
        plain.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")  # not TLS
        assert not read_until_closed(plain).startswith(b"HTTP")  # at most a TLS alert
    untrusting = ssl.create_default_context()  # does not trust the server's CA
    with pytest.raises(ssl.SSLCertVerificationError), socket.create_connection(
            ("127.0.0.1", server.port), timeout=120) as raw:
        untrusting.wrap_socket(raw, server_hostname="localhost")
    with client(server) as http:
        assert http.get(f"{server.url}/healthz").status_code == 200


def test_a_request_cannot_make_the_server_buffer_more_than_its_limits(
        server: ServedInstance) -> None:
    """A thousand one-byte chunks with long extensions (RFC 9112 7.1.1): within the chunk
    count and the body limit, but no server buffers 200 KB for a 1 KB body."""
    connection = open_stalled("idle_after_tls", server.port, tls_context(server.trust_anchor))
    connection.settimeout(120)
    chunks = b"".join(b"1;ext=" + b"e" * 200 + b"\r\nA\r\n" for _ in range(1000))
    try:
        connection.sendall(b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\n"
                           b"Content-Type: application/pkcs10\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n" + chunks)
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
        pass  # the server may answer and close before we are done sending
    answer = read_until_closed(connection)
    connection.close()
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"X-Error-Code: request.too_large" in answer


@pytest.mark.parametrize(("fields", "status"), [
    (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"400"),  # smuggling, 9112 6.1
    (b"Content-Length: 5\r\nContent-Length: 6\r\n", b"400"),
    (b"Content-Length: abc\r\n", b"400"),
    (b"Transfer-Encoding: gzip\r\n", b"400"),
    (b"Content-Length: 99999\r\n", b"413"),  # refused without waiting for the body
])
def test_ambiguous_or_oversized_framing_is_a_4xx_over_the_wire(
        server: ServedInstance, fields: bytes, status: bytes) -> None:
    before = server.log_text()
    connection = open_stalled("idle_after_tls", server.port, tls_context(server.trust_anchor))
    connection.settimeout(120)
    connection.sendall(b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\n"
                       b"Content-Type: application/pkcs10\r\n" + fields + b"\r\nhello")
    answer = read_until_closed(connection)
    connection.close()
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:200]
    assert "Traceback" not in server.log_text()[len(before):]
