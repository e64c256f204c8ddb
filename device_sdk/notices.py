"""Verify signed notices (revocation, renewal due, CA rotation) on the device.

A notice is a JWS Compact Serialization (RFC 7515 7.1), ES256 or ES384 (RFC 7518 3.4),
whose x5c header (RFC 7515 4.1.6) carries the notice-signing certificate and its issuing
CA. The server side is enroll_server.notify.notices; this module never imports it, so the
constants it shares with it are repeated here (tests pin that they agree).

verify_notice checks in a fixed order and raises NoticeRejected with a stable code at the
first failure; the agent ignores a rejected notice (SECURITY-CHECKLIST 25) and logs the code.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey

NOTICE_TYPES = frozenset({"revocation", "renewal_due", "ca_rotation"})
NOTICE_TYP = "tpm-enroll-notice+jwt"  # RFC 7515 4.1.9, RFC 8725 3.11
# The notice-signing EKU: a UUID-derived private OID (X.667), sub-arc .1 of the project's
# arc. Same value as enroll_server.notify.notices.NOTICE_SIGNING_EKU.
NOTICE_SIGNING_EKU = x509.ObjectIdentifier("2.25.239345125169379312074460888417539569493.1")
ANY_EXTENDED_KEY_USAGE = x509.ObjectIdentifier("2.5.29.37.0")  # RFC 5280 4.2.1.12

# The only algorithms accepted, with the curve each requires (RFC 7518 3.4). Never "none"
# or HS* (RFC 8725 3.1, 2.1): the alg header is checked against this list before anything.
ALGORITHMS = {"ES256": "secp256r1", "ES384": "secp384r1"}

MAX_TOKEN_LENGTH = 16 * 1024  # two P-256/P-384 certificates in x5c are about 1.5 KiB
MAX_X5C_CERTIFICATES = 4
MAX_CHAIN_DEPTH = 2  # intermediate CAs between the notice signer and a trust anchor
_MAX_JSON_INT = 2**53 - 1  # I-JSON (RFC 7493 2.2)
_MAX_NUMERIC_DATE = 253402300799  # 9999-12-31T23:59:59Z, the last second datetime holds
_SERIAL = re.compile(r"[1-9][0-9]{0,48}")  # RFC 5280 4.1.2.2

MALFORMED = "notice.malformed"
BAD_ALG = "notice.bad_alg"
UNTRUSTED_SIGNER = "notice.untrusted_signer"
BAD_SIGNATURE = "notice.bad_signature"
WRONG_DEVICE = "notice.wrong_device"
EXPIRED = "notice.expired"
REPLAYED = "notice.replayed"
UNKNOWN_TYPE = "notice.unknown_type"


class NoticeRejected(Exception):
    """A notice the device must ignore; code is stable, message is for the log."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class VerifiedNotice:
    device_id: str
    type: str
    serial: str  # the device certificate's serial number, decimal
    sequence: int  # store it: the next notice must carry a greater one
    issued_at: dt.datetime
    expires_at: dt.datetime
    group: str
    signer: x509.Certificate  # the notice-signing certificate that verified
    reason: str | None = None
    extra: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))


def _registry(algorithms: Sequence[str]) -> jws.JWSRegistry:
    """joserfc's registry limited to algorithms. Its 512-byte header cap is too small for
    x5c (the whole token is bounded by MAX_TOKEN_LENGTH instead); header parameters it does
    not know are ignored, as RFC 7515 4 asks of parameters not listed in "crit"."""
    registry = jws.JWSRegistry(algorithms=list(algorithms), strict_check_header=False)
    registry.max_header_length = MAX_TOKEN_LENGTH
    return registry


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """RFC 7519 4: duplicate claim names are rejected, not resolved."""
    claims = dict(pairs)
    if len(claims) != len(pairs):
        raise ValueError("duplicate claim name")
    return claims


def _is_int(value: object, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= _MAX_JSON_INT


def _claims_problem(claims: dict[str, object]) -> str | None:
    """The shape of the claims set (what sign_notice writes), or what is wrong with it."""
    for name in ("sub", "aud", "type", "serial", "group"):
        if not isinstance(claims.get(name), str):
            return f"claim {name!r} missing or not a string"
    if _SERIAL.fullmatch(claims["serial"]) is None:  # type: ignore[arg-type]
        return "claim 'serial' is not a decimal serial number"
    if not all(_is_int(claims.get(name)) for name in ("iat", "exp", "seq")):
        return "claims 'iat', 'exp', 'seq' must be non-negative integers"
    if claims["exp"] > _MAX_NUMERIC_DATE:  # type: ignore[operator]
        return "claim 'exp' is beyond the year 9999"
    if claims["exp"] <= claims["iat"]:  # type: ignore[operator]
        return "claim 'exp' is not after 'iat'"
    if not isinstance(claims.get("reason", ""), str):
        return "claim 'reason' is not a string"
    if not isinstance(claims.get("extra", {}), dict):
        return "claim 'extra' is not an object"
    return None


def _parse(token: str | bytes) -> tuple[jws.CompactSignature, dict, dict]:
    """RFC 7515 5.2 steps 1-7 (via joserfc) and the claims set; notice.malformed."""
    if isinstance(token, str):
        token = token.encode("utf-8")
    if not isinstance(token, bytes) or len(token) > MAX_TOKEN_LENGTH:
        raise NoticeRejected(MALFORMED, "not a JWS compact serialization of acceptable size")
    registry = _registry(list(ALGORITHMS))
    try:
        compact = jws.extract_compact(token.strip(), registry=registry)
        header = compact.protected
        if not isinstance(header, dict):
            raise ValueError("protected header is not a JSON object")
        registry.check_header(header)  # types of the registered parameters (RFC 7515 4.1)
        # RFC 7519 7.2 step 10: the claims set is UTF-8 JSON (json.loads would guess).
        claims = json.loads(compact.payload.decode("utf-8"),
                            object_pairs_hook=_reject_duplicates, parse_constant=_refuse_constant)
    except (JoseError, ValueError) as exc:  # JSONDecodeError, UnicodeError are ValueErrors
        raise NoticeRejected(MALFORMED, f"cannot parse: {exc}") from exc
    if not isinstance(header.get("alg"), str):
        raise NoticeRejected(MALFORMED, "header 'alg' is not a string")
    typ = header.get("typ")
    # RFC 7515 4.1.9: compared case-insensitively, "application/" may be omitted.
    if not isinstance(typ, str) or typ.lower().removeprefix("application/") != NOTICE_TYP:
        raise NoticeRejected(MALFORMED, "header 'typ' is not a notice")
    if "crit" in header or "b64" in header:
        # RFC 7515 4.1.11: no extension is understood here, so none may be critical.
        raise NoticeRejected(MALFORMED, "header has extensions ('crit'/'b64')")
    if not isinstance(claims, dict):
        raise NoticeRejected(MALFORMED, "payload is not a JSON object")
    problem = _claims_problem(claims)
    if problem:
        raise NoticeRejected(MALFORMED, problem)
    return compact, header, claims


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON (RFC 8259 6)")


def _check_key_usage(policy: verification.Policy, certificate: x509.Certificate,
                     key_usage: x509.KeyUsage) -> None:
    if not key_usage.digital_signature:
        raise ValueError("keyUsage lacks digitalSignature")


def _check_notice_eku(policy: verification.Policy, certificate: x509.Certificate,
                      usages: x509.ExtendedKeyUsage) -> None:
    if NOTICE_SIGNING_EKU not in usages or ANY_EXTENDED_KEY_USAGE in usages:
        raise ValueError("not a notice-signing certificate (extendedKeyUsage)")


# The CA/B web PKI end-entity profile (basicConstraints not CA, AKI, ...), except: a SAN
# is optional (it names nothing here), and the EKU must be the notice-signing one, never
# clientAuth alone: a device certificate from the same CA can never sign a notice.
_NOTICE_SIGNER_POLICY = (
    verification.ExtensionPolicy.webpki_defaults_ee()
    .may_be_present(x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None)
    .require_present(x509.KeyUsage, verification.Criticality.AGNOSTIC, _check_key_usage)
    .require_present(x509.ExtendedKeyUsage, verification.Criticality.AGNOSTIC,
                     _check_notice_eku))


def _verify_signer(header: dict, trust_anchors: Sequence[x509.Certificate],
                   now: dt.datetime) -> x509.Certificate:
    """x5c[0], chained through x5c[1:] to a trust anchor, valid at now (RFC 5280 6.1)."""
    chain = header.get("x5c")
    if not isinstance(chain, list) or not chain:
        raise NoticeRejected(UNTRUSTED_SIGNER, "no x5c certificate chain")
    if len(chain) > MAX_X5C_CERTIFICATES or not all(isinstance(c, str) for c in chain):
        raise NoticeRejected(MALFORMED, "x5c is not a short list of strings")
    try:
        # RFC 7515 4.1.6: standard base64 (not base64url) of the DER certificate.
        certificates = [x509.load_der_x509_certificate(base64.b64decode(c, validate=True))
                        for c in chain]
    except ValueError as exc:  # binascii.Error is a ValueError
        raise NoticeRejected(MALFORMED, f"x5c entry is not a DER certificate: {exc}") from exc
    verifier = (verification.PolicyBuilder()
                .store(verification.Store(list(trust_anchors)))
                .time(now).max_chain_depth(MAX_CHAIN_DEPTH)
                .extension_policies(ee_policy=_NOTICE_SIGNER_POLICY,
                                    ca_policy=verification.ExtensionPolicy.webpki_defaults_ca())
                .build_client_verifier())
    try:
        verifier.verify(certificates[0], certificates[1:])
    except (verification.VerificationError, x509.UnsupportedGeneralNameType) as exc:
        raise NoticeRejected(UNTRUSTED_SIGNER, f"signer not trusted: {exc}") from exc
    return certificates[0]


def _verify_signature(compact: jws.CompactSignature, alg: str,
                      signer: x509.Certificate) -> None:
    """RFC 7515 5.2 step 8 with the signer's key, through joserfc (RFC 7518 3.4)."""
    public_key = signer.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or (
            public_key.curve.name != ALGORITHMS[alg]):
        raise NoticeRejected(BAD_ALG, f"{alg} does not match the signer's key")
    try:
        valid = jws.validate_compact(compact, ECKey.import_key(public_key),
                                     registry=_registry([alg]))
    except JoseError as exc:
        raise NoticeRejected(BAD_SIGNATURE, f"signature check failed: {exc}") from exc
    if not valid:
        raise NoticeRejected(BAD_SIGNATURE, "signature does not verify")


def verify_notice(token: str | bytes, trust_anchors: list[x509.Certificate], device_id: str,
                  last_sequence: int | None, now: dt.datetime) -> VerifiedNotice:
    """The notice, if it is for device_id, signed by a notice signer of a trusted CA,
    unexpired at now and newer than last_sequence; otherwise NoticeRejected.

    Order: malformed, bad_alg, untrusted_signer, bad_signature, wrong_device, expired,
    replayed, unknown_type. trust_anchors are the CA certificates the device trusts (from
    EST /cacerts). A revocation seen on the fleet topic is the revoked device's own
    notice: its audience is that device, so every other device rejects it (wrong_device).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone aware")
    if not trust_anchors:
        raise ValueError("no trust anchors configured")
    compact, header, claims = _parse(token)
    alg = header["alg"]
    if alg not in ALGORITHMS:
        raise NoticeRejected(BAD_ALG, f"alg {alg[:16]!r} is not allowed")
    signer = _verify_signer(header, trust_anchors, now)
    _verify_signature(compact, alg, signer)
    if claims["aud"] != device_id or claims["sub"] != device_id:  # RFC 7519 4.1.3
        raise NoticeRejected(WRONG_DEVICE, "notice is addressed to another device")
    expires_at = dt.datetime.fromtimestamp(claims["exp"], dt.UTC)
    if now >= expires_at:  # RFC 7519 4.1.4: not accepted on or after exp
        raise NoticeRejected(EXPIRED, f"notice expired at {expires_at.isoformat()}")
    if last_sequence is not None and claims["seq"] <= last_sequence:
        raise NoticeRejected(REPLAYED, f"sequence {claims['seq']} is not after "
                                       f"{last_sequence}")
    if claims["type"] not in NOTICE_TYPES:
        raise NoticeRejected(UNKNOWN_TYPE, f"notice type {claims['type'][:32]!r} is unknown")
    return VerifiedNotice(
        device_id=device_id, type=claims["type"], serial=claims["serial"],
        sequence=claims["seq"], issued_at=dt.datetime.fromtimestamp(claims["iat"], dt.UTC),
        expires_at=expires_at, group=claims["group"], signer=signer,
        reason=claims.get("reason"), extra=MappingProxyType(dict(claims.get("extra", {}))))
