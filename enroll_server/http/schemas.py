"""marshmallow schemas for every JSON body (docs/protocol.md gives each field's TPM type).

Binary fields are base64 (RFC 4648 section 4, padded) and decoded strictly: whitespace
or characters outside the alphabet are a 400, never silently dropped. Unknown fields
are refused so a misspelt optional field (``quote_inf``) is an error, not ignored.
Sizes are capped per field well above what any TPM produces.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate

from ..errors import BadRequest


class Base64Bytes(fields.Field):
    """Strict base64 -> bytes, at most ``max_bytes`` decoded."""

    def __init__(self, *, max_bytes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_bytes = max_bytes

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bytes:
        if not isinstance(value, str):
            raise ValidationError("must be a base64 string")
        if len(value) > (self.max_bytes + 2) // 3 * 4:
            raise ValidationError(f"must decode to at most {self.max_bytes} bytes")
        try:
            decoded = base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ValidationError("is not valid base64 (RFC 4648 section 4)") from None
        if not decoded:
            raise ValidationError("must not be empty")
        return decoded


class ChallengeRequestSchema(Schema):
    class Meta:
        unknown = RAISE

    ek_public = Base64Bytes(required=True, max_bytes=1024)  # TPM2B_PUBLIC
    ak_public = Base64Bytes(required=True, max_bytes=1024)  # TPM2B_PUBLIC
    ek_certificate = Base64Bytes(load_default=None, allow_none=True, max_bytes=4096)
    # EK CA certificates from the TPM's EK certificate chain NV indices (EK Credential
    # Profile 2.2.1.5.2, 0x01C00100..0x01C001FF): untrusted helpers for path building.
    ek_chain = fields.List(Base64Bytes(max_bytes=4096), load_default=list,
                           validate=validate.Length(max=8))


class AttestedEnrollSchema(Schema):
    class Meta:
        unknown = RAISE

    challenge_id = fields.String(required=True, validate=validate.Length(1, 64))
    activated_secret = Base64Bytes(required=True, max_bytes=64)  # TPM2B_DIGEST buffer
    device_key_public = Base64Bytes(required=True, max_bytes=1024)  # TPM2B_PUBLIC
    certify_info = Base64Bytes(required=True, max_bytes=1024)  # TPMS_ATTEST
    certify_signature = Base64Bytes(required=True, max_bytes=1024)  # TPMT_SIGNATURE
    csr = Base64Bytes(required=True, max_bytes=4096)  # DER PKCS#10
    quote_info = Base64Bytes(load_default=None, allow_none=True, max_bytes=2048)
    quote_signature = Base64Bytes(load_default=None, allow_none=True, max_bytes=1024)


def load(schema: Schema, document: Any) -> dict[str, Any]:
    """The validated fields, or a 400 naming each bad field (the client's own input)."""
    if not isinstance(document, dict):
        raise BadRequest("The body must be a JSON object.", code="request.invalid_json")
    try:
        return schema.load(document)
    except ValidationError as error:
        problems = "; ".join(f"{name}: {' '.join(map(str, messages))}"
                             for name, messages in sorted(_flatten(error.messages)))
        raise BadRequest(f"Invalid request fields: {problems[:400]}",
                         code="request.invalid_field") from None


def _flatten(messages: Any) -> list[tuple[str, list[Any]]]:
    if isinstance(messages, dict):
        return [(str(k), v if isinstance(v, list) else [v]) for k, v in messages.items()]
    return [("body", messages if isinstance(messages, list) else [messages])]
