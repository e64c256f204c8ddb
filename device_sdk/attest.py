"""TPM-attested enrollment, the device side of docs/protocol.md ("TPM-attested enrollment").

One attempt is: POST .../attest/challenge with the EK (public + certificate) and the AK
public; TPM2_ActivateCredential on the answer; TPM2_Certify of the device key and, when
asked, TPM2_Quote, both with the server's nonce; a CSR signed in the TPM with CN = the
device_id the server derived from the EK; POST .../attest/enroll; a certs-only answer.

Retries: connection errors and 503/429 (Retry-After honoured, else exponential backoff
with full jitter) restart the *whole* attempt with a fresh challenge, since a challenge
and its nonce are single use. A 4xx refusal is final and raised as EstError at once.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import hashlib
import hmac
import random
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tpm2_pytss import TPM2B_PUBLIC

from .est import EstError, decode_certs_only, parse_error, tls_context
from .tpm import EK_PROFILE_ORDER, EkKind, TpmDevice

RETRY_STATUSES = frozenset({429, 503, 502, 504})  # 502/504: a proxy in front lost the server
MAX_RETRY_AFTER = 600.0  # seconds: a Retry-After beyond this is treated as this
T = TypeVar("T")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def parse_attest_error(response: httpx.Response) -> EstError:
    """EST text ("error: <code>\\n<message>", RFC 7030 4.2.3) or RFC 9457 problem+json."""
    if response.headers.get("Content-Type", "").startswith("application/problem+json"):
        try:
            problem = response.json()
        except ValueError:
            problem = {}
        if isinstance(problem, dict):
            code = response.headers.get("X-Error-Code") or str(
                problem.get("code") or f"http.{response.status_code}")
            message = str(problem.get("detail") or problem.get("title") or "")[:500]
            error = parse_error(response)  # keeps the 202 subclass and digit Retry-After
            error.code, error.message = code, message
            return error
    error = parse_error(response)
    first_line = response.text.split("\n", 1)[0]
    if "X-Error-Code" not in response.headers and first_line.startswith("error: "):
        error.code = first_line.removeprefix("error: ").strip()[:100]  # a proxy dropped it
    return error


def retry_after_seconds(response: httpx.Response, now: dt.datetime | None = None) -> float | None:
    """Retry-After as delta-seconds or an HTTP-date (RFC 9110 10.2.3), capped; None if absent."""
    value = response.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = now or dt.datetime.now(dt.UTC)
    return min(max((when - now).total_seconds(), 0.0), MAX_RETRY_AFTER)


def device_id_of(ek_public: bytes) -> str:
    """SHA-256 hex of the EK's DER SubjectPublicKeyInfo: the identity the server derives."""
    public, _ = TPM2B_PUBLIC.unmarshal(ek_public)
    return hashlib.sha256(public.publicArea.to_der()).hexdigest()


class _Retry(Exception):
    """One attempt failed in a way worth another attempt after ``delay`` (None: backoff)."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.delay = delay


class AttestedEnrollment:
    """Enroll the device key of ``tpm`` with the server at ``server_url``.

    ``server_ca`` is the explicit trust anchor for the server (RFC 7030 3.6.1). ``timeout``
    bounds each HTTP exchange; real TPMs take seconds per command, so the TPM work between
    challenge and enroll must also fit the challenge TTL (120 s by default).
    """

    def __init__(self, server_url: str, server_ca: Path, tpm: TpmDevice,
                 label: str | None = None, timeout: float = 60.0, *, attempts: int = 6,
                 backoff: float = 1.0, max_backoff: float = 60.0,
                 ek_kind: EkKind | None = None, context: ssl.SSLContext | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None) -> None:  # fmt: skip
        self.base = server_url.rstrip("/") + "/.well-known/est/" + (f"{label}/" if label else "")
        self.tpm = tpm
        self.attempts, self.backoff, self.max_backoff = attempts, backoff, max_backoff
        self.ek_kind = ek_kind
        self._sleep, self._rng = sleep, rng or random.SystemRandom()
        self.http = httpx.Client(verify=context or tls_context(server_ca),
                                 timeout=httpx.Timeout(timeout))
        self.device_id: str | None = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> AttestedEnrollment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def enroll(self, common_name: str | None = None) -> x509.Certificate:
        """Run the two-step flow (with retries) and return the issued certificate.

        ``common_name``, when given, is the identity the caller expects: the server's
        device_id must equal it (the CSR's CN is always the server's device_id).
        """
        return self._with_retries(lambda: self._attempt(common_name))

    def cacerts(self) -> list[x509.Certificate]:
        """RFC 7030 4.1: the issuing CA and root, for the state dir's chain file."""
        return self._with_retries(
            lambda: decode_certs_only(self._exchange("GET", "cacerts").content))

    def _with_retries(self, attempt: Callable[[], T]) -> T:
        for number in range(1, self.attempts + 1):
            try:
                return attempt()
            except _Retry as retry:
                if number == self.attempts:
                    raise EstError(0, "client.retries_exhausted",
                                   f"gave up after {number} attempts: {retry}") from retry
                ceiling = min(self.max_backoff, self.backoff * 2 ** (number - 1))
                delay = self._rng.uniform(0, ceiling)  # full jitter: a fleet must not sync up
                if retry.delay is not None:  # the server's Retry-After, plus a little jitter
                    delay = retry.delay + self._rng.uniform(0, min(ceiling, retry.delay / 10 + 1))
                self._sleep(delay)
        raise EstError(0, "client.retries_exhausted", f"attempts={self.attempts}")

    # -- one attempt ---------------------------------------------------------------

    def _attempt(self, common_name: str | None) -> x509.Certificate:
        kind, ek_public, ek_certificate = self._endorsement()
        _, ak_public, _ = self.tpm.attestation_key()
        request: dict[str, Any] = {"ek_public": _b64(ek_public), "ak_public": _b64(ak_public)}
        if ek_certificate is not None:
            request["ek_certificate"] = _b64(ek_certificate)
            chain = self.tpm.ek_certificate_chain()[:8]  # the server takes at most 8
            if chain:
                request["ek_chain"] = [_b64(certificate) for certificate in chain]
        self.device_id = device_id_of(ek_public)  # known before the server answers
        challenge = _json_object(self._exchange("POST", "attest/challenge", json=request))
        device_id = str(challenge.get("device_id", ""))
        if not hmac.compare_digest(device_id.encode(), device_id_of(ek_public).encode()):
            raise EstError(200, "client.device_id_mismatch",
                           "the server's device_id is not the hash of this TPM's EK")
        if common_name is not None and common_name != device_id:
            raise EstError(200, "client.identity_mismatch",
                           f"server says device {device_id}, expected {common_name}")
        self.device_id = device_id
        nonce = _field(challenge, "nonce")
        secret = self.tpm.activate_credential(_field(challenge, "credential_blob"),
                                              _field(challenge, "encrypted_secret"), kind)
        _, device_key_public = self.tpm.device_key()
        certify_info, certify_signature = self.tpm.certify(nonce)
        evidence = {
            "challenge_id": str(challenge.get("challenge_id", "")),
            "activated_secret": _b64(secret),
            "device_key_public": _b64(device_key_public),
            "certify_info": _b64(certify_info),
            "certify_signature": _b64(certify_signature),
            "csr": _b64(self.tpm.csr(device_id).public_bytes(serialization.Encoding.DER)),
        }
        quote = challenge.get("quote")
        if isinstance(quote, dict) and quote.get("pcrs"):
            quote_info, quote_signature = self.tpm.quote(nonce, quote["pcrs"])
            evidence |= {"quote_info": _b64(quote_info), "quote_signature": _b64(quote_signature)}
        response = self._exchange("POST", "attest/enroll", json=evidence)
        try:
            certificates = decode_certs_only(response.content)
        except ValueError as error:
            raise EstError(200, "client.bad_response", "enroll answer is not certs-only "
                                                       "PKCS#7") from error
        if len(certificates) != 1:
            raise EstError(response.status_code, "client.bad_response",
                           f"expected one certificate, got {len(certificates)}")
        return certificates[0]

    def _endorsement(self) -> tuple[EkKind, bytes, bytes | None]:
        """The EK to use: the first profile with a certificate in NV (tpm_templates.
        EK_PROFILE_ORDER: ECC first, low range first), else the low-range ECC EK."""
        kinds: tuple[EkKind, ...] = (self.ek_kind,) if self.ek_kind else EK_PROFILE_ORDER
        for kind in kinds:
            certificate = self.tpm.read_ek_certificate(kind)
            if certificate is not None:
                return kind, self.tpm.endorsement_key(kind)[1], certificate
        return kinds[0], self.tpm.endorsement_key(kinds[0])[1], None

    def _exchange(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; transient failures become _Retry, refusals EstError."""
        try:
            response = self.http.request(method, self.base + path, **kwargs)
        except httpx.TransportError as error:  # connect/read/write errors and timeouts
            raise _Retry(f"{path}: {type(error).__name__}: {error}") from error
        if response.status_code in RETRY_STATUSES:
            raise _Retry(f"{path}: {parse_attest_error(response)}",
                         retry_after_seconds(response))
        if response.status_code != 200:
            raise parse_attest_error(response)
        return response


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        value = response.json()
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise EstError(response.status_code, "client.bad_response", "not a JSON object")
    return value


def _field(challenge: dict[str, Any], name: str) -> bytes:
    try:
        return base64.b64decode(str(challenge[name]), validate=True)
    except (KeyError, ValueError) as error:
        raise EstError(200, "client.bad_response", f"challenge field {name!r} missing or "
                                                   "not base64") from error
