"""Request bodies: the one size-checked reader, and the one JSON reader every JSON route
uses (SECURITY-CHECKLIST 3 and 32: bad input is a 4xx, never a 5xx).

JSON (RFC 8259) is refused before ``json.loads`` when it nests deeper than MAX_DEPTH:
Python's parser recurses, and about 1,000 levels (2 KB of ``[``) raise RecursionError. The
non-standard constants NaN and Infinity are refused too. The document must be an object
and is validated by a marshmallow schema that refuses unknown fields, wrong types and
absurd lengths, naming the field (http/schemas.py).
"""

from __future__ import annotations

import json
import re
from typing import Any

from flask import request
from marshmallow import Schema
from werkzeug.exceptions import RequestEntityTooLarge

from ..errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from . import schemas

MAX_DEPTH = 16  # every document this API accepts nests at most 3 deep
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = re.compile(rb"[^\[\]{}]+")


def read_body(limit: int) -> bytes:
    """At most limit bytes, else PayloadTooLarge. A chunked body has no Content-Length
    and werkzeug silently cuts its stream at MAX_CONTENT_LENGTH, so probe past it."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"The request body may be at most {limit} bytes.")
    try:
        body = request.stream.read(limit)
        if len(body) == limit and request.stream.read(1):
            raise RequestEntityTooLarge()
    except RequestEntityTooLarge:
        raise PayloadTooLarge(f"The request body may be at most {limit} bytes.") from None
    return body


def read_json(schema: Schema, limit: int) -> dict[str, Any]:
    """The body as JSON validated by schema: 415, 413 or 400 with a stable code."""
    if (request.mimetype or "").lower() != "application/json":
        raise UnsupportedMediaType("This endpoint expects Content-Type application/json.",
                                   code="request.content_type")
    return schemas.load(schema, parse_json(read_body(limit)))


def parse_json(body: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """A JSON value, or BadRequest (request.invalid_json, request.json_too_deep)."""
    if nesting_depth(body) > max_depth:
        raise BadRequest(f"The JSON body nests deeper than {max_depth} levels.",
                         code="request.json_too_deep")
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # includes UnicodeDecodeError, int digit limits
        raise BadRequest("The body is not valid JSON.", code="request.invalid_json") from None


def nesting_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects, strings ignored; malformed input gets a
    number too (json.loads refuses it afterwards)."""
    brackets = _NOT_BRACKETS.sub(b"", _STRINGS.sub(b"", body))
    depth = deepest = 0
    for bracket in brackets:
        if bracket in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON (RFC 8259 6)")
