"""Where an HTTP/1.1 request ends in a byte buffer (RFC 9112 6.3), before anyone reads it.

Pure and incremental: the server's event loop (``enroll_server/worker.py``) feeds it the
bytes received so far and learns whether the request is complete, and how long it is,
before a thread is given the request. Each byte is looked at about once however the
client slices its request (a client dripping one byte per TLS record must not cost the
server quadratic work). It only finds the message's end: validating the request line and
the headers stays gunicorn's parser's job, so a head this module cannot make sense of is
handed over as it is and refused there (400).

Body length (RFC 9112 6.3): ``Transfer-Encoding`` whose final coding is ``chunked``
(7.1), else ``Content-Length``, else no body. A body over ``max_body`` is not waited for:
the application refuses it (413) without reading it (werkzeug's MAX_CONTENT_LENGTH is the
same limit).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

_HEAD_END = b"\r\n\r\n"
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_MAX_CHUNK_LINE = 4096  # chunk size with extensions, or the trailer section (7.1.1, 7.1.2)
MAX_CHUNKS = 1024  # more chunks than any client sends for a body of a few KiB


class Framing(enum.Enum):
    INCOMPLETE = "incomplete"  # wait for more bytes
    COMPLETE = "complete"  # bytes [0, end) are the request; another may follow
    HEAD_ONLY = "head_only"  # [0, end) is the head; its body is not to be read: hand the
    #                          head over and close the connection after the answer
    BODY_TOO_LARGE = "body_too_large"  # chunked body over max_body: oversized_request()
    HEAD_TOO_LARGE = "head_too_large"  # no end of the head within max_head bytes
    BAD_CHUNKS = "bad_chunks"  # broken chunked framing: where the request ends is unknown


@dataclass
class RequestScan:
    """What is known so far about the request at the start of a buffer. One per request:
    start a new one after handing a request over."""

    max_head: int
    max_body: int
    head_end: int = 0  # 0 until the empty line after the fields was seen
    expects_continue: bool = False  # "Expect: 100-continue" (RFC 9110 10.1.1)
    _searched: int = 0  # the head search resumes here
    _body: str = ""  # "none", "length", "chunked" or "refused" once the head is known
    _content_length: int = 0
    _chunk_at: int = 0  # start of the next chunk-size line
    _chunks: int = 0
    _body_size: int = 0

    def extent(self, buffer: bytes | bytearray) -> tuple[Framing, int]:
        """(framing, end): ``end`` is the request's length when COMPLETE or HEAD_ONLY."""
        if not self.head_end:
            found = buffer.find(_HEAD_END, self._searched, self.max_head + len(_HEAD_END))
            if found < 0:
                if len(buffer) > self.max_head:
                    return Framing.HEAD_TOO_LARGE, 0
                self._searched = max(0, len(buffer) - len(_HEAD_END) + 1)
                return Framing.INCOMPLETE, 0
            self.head_end = self._chunk_at = found + len(_HEAD_END)
            self._read_framing_fields(bytes(buffer[:self.head_end]))
        if self._body == "refused":  # malformed or a body too large to wait for
            return Framing.HEAD_ONLY, self.head_end
        if self._body == "none":
            return Framing.COMPLETE, self.head_end
        if self._body == "length":
            end = self.head_end + self._content_length
            return (Framing.COMPLETE, end) if len(buffer) >= end else (Framing.INCOMPLETE, 0)
        return self._chunked_extent(buffer)

    def _read_framing_fields(self, head: bytes) -> None:
        transfer_encoding: list[bytes] = []
        content_length: int | None = None
        malformed = False
        for line in head.split(b"\r\n")[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                continue  # the empty last lines; anything else is the parser's to refuse
            name, value = name.strip().lower(), value.strip()
            if name == b"transfer-encoding":
                transfer_encoding += [c.strip() for c in value.lower().split(b",")]
            elif name == b"content-length":
                malformed |= content_length is not None or not value.isdigit() \
                    or len(value) > 18
                content_length = int(value) if value.isdigit() and len(value) <= 18 else 0
            elif name == b"expect":
                self.expects_continue = value.lower() == b"100-continue"
        if malformed or (transfer_encoding and (content_length is not None
                                                or transfer_encoding[-1] != b"chunked")):
            self._body = "refused"  # gunicorn's parser answers 400 (or 501)
        elif transfer_encoding:
            self._body = "chunked"
        elif content_length is None or content_length == 0:
            self._body = "none"
        elif content_length > self.max_body:
            self._body = "refused"  # the application answers 413 without reading it
        else:
            self._body, self._content_length = "length", content_length

    def _chunked_extent(self, buffer: bytes | bytearray) -> tuple[Framing, int]:
        """RFC 9112 7.1: chunk-size [ext] CRLF data CRLF ... 0 [ext] CRLF trailers CRLF."""
        while True:
            position = self._chunk_at
            line_end = buffer.find(b"\r\n", position, position + _MAX_CHUNK_LINE)
            if line_end < 0:
                return self._incomplete_unless(len(buffer) - position >= _MAX_CHUNK_LINE)
            size_text = bytes(buffer[position:line_end]).split(b";", 1)[0].strip()
            if _CHUNK_SIZE.fullmatch(size_text) is None or self._chunks >= MAX_CHUNKS:
                return Framing.BAD_CHUNKS, 0
            size = int(size_text, 16)
            data_at = line_end + 2
            if size == 0:  # the last chunk, then trailer fields and an empty line
                if buffer[data_at:data_at + 2] == b"\r\n":
                    return Framing.COMPLETE, data_at + 2
                trailers_end = buffer.find(_HEAD_END, data_at, data_at + _MAX_CHUNK_LINE)
                if trailers_end >= 0:
                    return Framing.COMPLETE, trailers_end + len(_HEAD_END)
                return self._incomplete_unless(len(buffer) - data_at >= _MAX_CHUNK_LINE)
            if self._body_size + size > self.max_body:
                return Framing.BODY_TOO_LARGE, 0
            if len(buffer) < data_at + size + 2:
                return Framing.INCOMPLETE, 0
            if buffer[data_at + size:data_at + size + 2] != b"\r\n":
                return Framing.BAD_CHUNKS, 0
            self._chunk_at, self._chunks = data_at + size + 2, self._chunks + 1
            self._body_size += size

    @staticmethod
    def _incomplete_unless(too_long: bool) -> tuple[Framing, int]:
        return (Framing.BAD_CHUNKS, 0) if too_long else (Framing.INCOMPLETE, 0)


def oversized_request(buffer: bytes | bytearray, head_end: int, max_body: int) -> bytes:
    """A chunked request whose body is over max_body, cut to its head and one chunk of
    max_body + 1 bytes: the application reads past its limit and refuses the request
    (413) as it refuses any large body, and the server neither waits for nor buffers the
    rest. The chunk's content is never looked at."""
    filler = b"\0" * (max_body + 1)
    return bytes(buffer[:head_end]) + b"%x\r\n" % len(filler) + filler + b"\r\n0\r\n\r\n"
