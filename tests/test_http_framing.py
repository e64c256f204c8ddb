"""Where a request ends (enroll_server/http/framing.py, RFC 9112 6.3 and 7.1): pure."""

from __future__ import annotations

import pytest

from enroll_server.http.framing import MAX_CHUNKS, Framing, RequestScan, oversized_request

HEAD = b"POST /x HTTP/1.1\r\nHost: a\r\n"


def extent(data: bytes, max_head: int = 1024, max_body: int = 100) -> tuple[Framing, int]:
    return RequestScan(max_head, max_body).extent(data)


def fed_byte_by_byte(data: bytes, max_head: int = 1024,
                     max_body: int = 100) -> tuple[Framing, int, int]:
    """The first answer that is not INCOMPLETE, and after how many bytes."""
    scan = RequestScan(max_head, max_body)
    for length in range(1, len(data) + 1):
        framing, end = scan.extent(data[:length])
        if framing is not Framing.INCOMPLETE:
            return framing, end, length
    return Framing.INCOMPLETE, 0, len(data)


REQUESTS = {
    "no body": HEAD + b"\r\n",
    "content-length": HEAD + b"Content-Length: 5\r\n\r\nhello",
    "chunked": HEAD + b"Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\n\r\n",
    "chunked with trailers": HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n"
                             b"X-Sum: 1\r\n\r\n",
}


@pytest.mark.parametrize("name", list(REQUESTS))
def test_a_complete_request_ends_exactly_where_it_ends(name: str) -> None:
    request = REQUESTS[name]
    assert extent(request + b"GET /next HTTP/1.1\r\n") == (Framing.COMPLETE, len(request))
    assert fed_byte_by_byte(request) == (Framing.COMPLETE, len(request), len(request))


@pytest.mark.parametrize("cut", [5, len(HEAD), len(HEAD) + 25])
def test_half_a_request_is_incomplete(cut: int) -> None:
    request = HEAD + b"Content-Length: 50\r\n\r\n" + b"x" * 50
    assert extent(request[:cut]) == (Framing.INCOMPLETE, 0)


def test_a_body_over_the_limit_is_not_waited_for() -> None:
    declared = HEAD + b"Content-Length: 101\r\n\r\n"
    assert extent(declared) == (Framing.HEAD_ONLY, len(declared))
    chunked = HEAD + b"Transfer-Encoding: chunked\r\n\r\n40\r\n" + b"a" * 64 + b"\r\n40\r\n"
    scan = RequestScan(1024, 100)
    assert scan.extent(chunked)[0] is Framing.BODY_TOO_LARGE
    cut = oversized_request(chunked, scan.head_end, 100)
    assert cut.startswith(chunked[:scan.head_end] + b"65\r\n")
    assert extent(cut, max_body=200) == (Framing.COMPLETE, len(cut))  # 101 bytes in one chunk


@pytest.mark.parametrize("fields", [
    b"Content-Length: 5\r\nContent-Length: 5\r\n",  # repeated (RFC 9112 6.3 item 5)
    b"Content-Length: -1\r\n",
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",  # smuggling (6.1)
    b"Transfer-Encoding: chunked, gzip\r\n",  # chunked not last (6.3 item 4)
])
def test_ambiguous_framing_is_handed_over_head_only_for_the_parser_to_refuse(
        fields: bytes) -> None:
    request = HEAD + fields + b"\r\n"
    assert extent(request + b"hello") == (Framing.HEAD_ONLY, len(request))


@pytest.mark.parametrize("body", [b"zz\r\nab\r\n0\r\n\r\n", b"2\r\nabc\r\n0\r\n\r\n",
                                  b"1" * 5000])
def test_broken_chunks_are_refused(body: bytes) -> None:
    assert extent(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + body)[0] is Framing.BAD_CHUNKS


def test_too_many_chunks_are_refused() -> None:
    body = b"1\r\na\r\n" * (MAX_CHUNKS + 1) + b"0\r\n\r\n"
    request = HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + body
    assert extent(request, max_body=10**6)[0] is Framing.BAD_CHUNKS


def test_a_head_without_end_is_too_large_once_over_the_limit() -> None:
    assert extent(HEAD + b"X: " + b"a" * 2000)[0] is Framing.HEAD_TOO_LARGE
    assert extent(HEAD + b"X: " + b"a" * 500) == (Framing.INCOMPLETE, 0)


def test_expect_100_continue_is_seen_once_the_head_is_complete() -> None:
    scan = RequestScan(1024, 100)
    request = HEAD + b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    assert scan.extent(request) == (Framing.INCOMPLETE, 0)
    assert scan.expects_continue and scan.head_end == len(request)
    assert scan.extent(request + b"abc") == (Framing.COMPLETE, len(request) + 3)
