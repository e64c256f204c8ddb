"""JSON bodies: the one parser every JSON route uses, through http.common.read_json
(SECURITY-CHECKLIST 3 and 32: bad input is a 4xx, never a 5xx).

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

from ..errors import BadRequest

MAX_DEPTH = 16  # every document this API accepts nests at most 3 deep
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = re.compile(rb"[^\[\]{}]+")


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
