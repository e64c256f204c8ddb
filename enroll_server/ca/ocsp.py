"""OCSP (RFC 6960) for the issuing CAs: the delegated responder certificate, request
parsing, a responder per CA that caches signed answers, and a dispatcher that picks the
responder of the CA a request names (CA generations: ``enroll-server ca rotate``).

Pure: no I/O, no framework, no database. The HTTP layer hands OcspResponder.respond the
request DER (RFC 6960 A.1) and returns the bytes as application/ocsp-response; the
certificate status comes from a lookup callable the caller supplies.

One certificate per request: cryptography can neither parse nor answer a request list, and
like other public responders (RFC 5019 2.1.1 profile) a request for several certificates
gets malformedRequest. parse_ocsp_request still reports every CertID it carries.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from asn1crypto import ocsp as asn1_ocsp
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import BadRequest, ServiceUnavailable
from .profiles import DIGITAL_SIGNATURE_ONLY
from .signer import signature_hash

# CertID hash algorithms a response can echo (RFC 6960 4.1.1). SHA-1 only names the
# issuer here, it protects nothing, and RFC 5019 2.1.1 requires it (openssl's default).
_CERT_ID_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha1": hashes.SHA1(), "sha224": hashes.SHA224(), "sha256": hashes.SHA256(),  # noqa: S303
    "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}
_MAX_NONCE_OCTETS = 32  # RFC 8954 2.1: longer nonces MUST get malformedRequest
_RESPONDER_BACKDATE = dt.timedelta(minutes=5)  # device clock skew, as for device certs


class OcspRequestError(BadRequest, ValueError):
    """The request cannot be answered; OcspResponder.respond answers malformedRequest."""

    code = "ocsp.malformed"
    public = "The OCSP request is malformed."


class OcspCertId(NamedTuple):
    """A CertID (RFC 6960 4.1.1): hashes of the issuer's name and key, and a serial."""

    serial: int
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    hash_algorithm: hashes.HashAlgorithm


class SerialStatus(NamedTuple):
    """What the status lookup reports for a serial of this CA (RFC 6960 2.2)."""

    status: ocsp.OCSPCertStatus
    revoked_at: dt.datetime | None = None
    reason: x509.ReasonFlags | None = None


StatusLookup = Callable[[int], tuple[ocsp.OCSPCertStatus, dt.datetime | None,
                                     x509.ReasonFlags | None]]


def issue_ocsp_responder_certificate(ca_key: object, ca_certificate: x509.Certificate,
                                     responder_public_key: object, lifetime: dt.timedelta,
                                     now: dt.datetime) -> x509.Certificate:
    """A delegated OCSP responder certificate (RFC 6960 4.2.2.2) issued by the CA.

    Clients do not check its own revocation status (id-pkix-ocsp-nocheck, 4.2.2.2.1), so
    keep lifetime short (days) and rotate it; it never outlives the CA certificate.
    """
    if lifetime <= dt.timedelta(0):
        raise ValueError("lifetime must be positive")
    not_before = max(now - _RESPONDER_BACKDATE, ca_certificate.not_valid_before_utc)
    not_after = min(now + lifetime, ca_certificate.not_valid_after_utc)
    if not_after <= now:
        raise ValueError("issuing CA is expired")
    ca_ski = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    ca_common_names = ca_certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ca_name = ca_common_names[0].value if ca_common_names else "CA"
    subject = x509.Name([
        *(attribute for attribute in ca_certificate.subject
          if attribute.oid != NameOID.COMMON_NAME),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{ca_name} OCSP Responder")])
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(ca_certificate.subject)
        .public_key(responder_public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(DIGITAL_SIGNATURE_ONLY, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]),
                       critical=False)  # RFC 6960 4.2.2.2: id-kp-OCSPSigning
        .add_extension(x509.OCSPNoCheck(), critical=False)  # 4.2.2.2.1: SHOULD be non-critical
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(
            responder_public_key), critical=False)  # type: ignore[arg-type]
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_ski.value), critical=False)
        .sign(ca_key, signature_hash(ca_key)))  # type: ignore[arg-type]


def _hash_algorithm(name: str) -> hashes.HashAlgorithm:
    try:
        return _CERT_ID_HASHES[name]
    except KeyError:
        raise OcspRequestError(detail=f"CertID hash {name!r} is not supported",
                               code="ocsp.unsupported_hash") from None


def _decode(request_der: bytes) -> tuple[list[OcspCertId], bytes | None]:
    """Every CertID of an OCSPRequest (RFC 6960 4.1.1) and its nonce (RFC 8954), if any."""
    try:
        request = ocsp.load_der_ocsp_request(request_der)
    except NotImplementedError:  # cryptography: "more than one request"
        return _decode_request_list(request_der), None
    except ValueError as exc:
        raise OcspRequestError(detail=f"not a DER OCSPRequest: {exc}") from None
    try:
        algorithm = request.hash_algorithm
    except UnsupportedAlgorithm as exc:
        raise OcspRequestError(detail=str(exc), code="ocsp.unsupported_hash") from None
    try:
        nonce: bytes | None = request.extensions.get_extension_for_class(
            x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        nonce = None
    except ValueError as exc:  # e.g. a duplicated or undecodable extension
        raise OcspRequestError(detail=f"bad request extensions: {exc}") from None
    if nonce is not None and not 1 <= len(nonce) <= _MAX_NONCE_OCTETS:
        raise OcspRequestError(detail=f"nonce of {len(nonce)} octets (RFC 8954 2.1: 1 to 32)",
                               code="ocsp.bad_nonce")
    cert_id = OcspCertId(request.serial_number, request.issuer_name_hash,
                         request.issuer_key_hash, _hash_algorithm(algorithm.name))
    return [cert_id], nonce


def _decode_request_list(request_der: bytes) -> list[OcspCertId]:
    """The slow path for multi-certificate requests, which cryptography does not parse."""
    try:
        request = asn1_ocsp.OCSPRequest.load(request_der, strict=True)
        fields = [(cert_id["serial_number"].native, cert_id["issuer_name_hash"].native,
                   cert_id["issuer_key_hash"].native,
                   cert_id["hash_algorithm"]["algorithm"].native)
                  for cert_id in (entry["req_cert"]
                                  for entry in request["tbs_request"]["request_list"])]
    except (ValueError, TypeError, KeyError) as exc:
        raise OcspRequestError(detail=f"not a DER OCSPRequest: {exc}") from None
    return [OcspCertId(serial, name_hash, key_hash, _hash_algorithm(algorithm))
            for serial, name_hash, key_hash, algorithm in fields]


def parse_ocsp_request(request_der: bytes) -> list[OcspCertId]:
    """The CertIDs an OCSPRequest asks about; OcspRequestError if it is not one."""
    return _decode(request_der)[0]


def _single_request(request_der: bytes) -> tuple[OcspCertId, bytes | None] | None:
    """(CertID, nonce) of a request for exactly one certificate (module doc), else None."""
    try:
        cert_ids, nonce = _decode(request_der)
    except OcspRequestError:
        return None
    return (cert_ids[0], nonce) if len(cert_ids) == 1 else None


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    """An OCSPResponse without responseBytes (RFC 6960 4.2.1)."""
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER)


def malformed_request_response() -> bytes:
    return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)


def unauthorized_response() -> bytes:
    return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)


def try_later_response() -> bytes:
    return _unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER)


@dataclass(frozen=True)
class _CachedResponse:
    response_der: bytes
    refresh_at: dt.datetime  # re-sign from here on
    next_update: dt.datetime  # still valid to serve until here, e.g. while the HSM is down


_CacheKey = tuple[int, str, bytes, bytes, SerialStatus]


class OcspResponder:
    """Answers OCSP requests about one issuing CA's certificates (RFC 6960 2.2, 4.2).

    Responses are signed by responder_key, named by key hash (RFC 6960 4.2.1
    ResponderID byKey) and carry responder_certificate: a delegated responder (see
    issue_ocsp_responder_certificate) or the CA certificate itself.

    Cache: a response to a request without a nonce is kept per CertID *and* status, and
    re-signed once refresh_fraction of its validity has passed. Because the status is in
    the key, a revoked serial never gets a cached "good" once the lookup reports the
    revocation; invalidate(serial) drops every response for it at once. Requests with a
    nonce (RFC 8954) are signed fresh and never cached.

    Unavailable dependencies (ServiceUnavailable: HSM, database) are answered tryLater
    (RFC 6960 2.3) and recorded in last_error; while the signer is down a cached response
    is served until its nextUpdate. Thread-safe.
    """

    def __init__(self, issuer_certificate: x509.Certificate,
                 responder_certificate: x509.Certificate, responder_key: object,
                 lookup: StatusLookup, *, validity: dt.timedelta = dt.timedelta(hours=1),
                 refresh_fraction: float = 0.5, max_cached: int = 200_000,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        if validity <= dt.timedelta(0) or not 0 < refresh_fraction <= 1 or max_cached < 1:
            raise ValueError("validity, refresh_fraction (0..1] and max_cached must be positive")
        if responder_key.public_key() != responder_certificate.public_key():  # type: ignore[attr-defined]
            raise ValueError("the responder key does not belong to the responder certificate")
        if responder_certificate != issuer_certificate:
            _check_delegated_responder(responder_certificate, issuer_certificate)
        self._responder_certificate = responder_certificate
        self._responder_key = responder_key
        self._signature_hash = signature_hash(responder_key)
        self._lookup = lookup
        self._validity = validity
        self._refresh_after = validity * refresh_fraction
        self._max_cached = max_cached
        self._clock = clock
        # CertID hashes that name our issuer, per hash algorithm: built the way clients
        # build them (RFC 6960 4.1.1: issuer DN, and the subjectPublicKey BIT STRING value).
        self._issuer_hashes: dict[str, tuple[bytes, bytes]] = {}
        # The probe names the issuer's *key* right; its name hash is of the probe
        # certificate's issuer (the root, for an intermediate CA), so hash the subject here.
        for name, algorithm in _CERT_ID_HASHES.items():
            probe = ocsp.OCSPRequestBuilder().add_certificate(
                issuer_certificate, issuer_certificate, algorithm).build()
            name_hash = hashes.Hash(algorithm)
            name_hash.update(issuer_certificate.subject.public_bytes())
            self._issuer_hashes[name] = (name_hash.finalize(), probe.issuer_key_hash)
        self._lock = threading.Lock()
        self._cache: dict[_CacheKey, _CachedResponse] = {}  # insertion order = age
        self._keys_by_serial: dict[int, set[_CacheKey]] = {}
        self.signed_responses = 0  # signatures made (metrics, tests)
        self.cache_hits = 0
        self.last_error: str | None = None

    def respond(self, request_der: bytes) -> bytes:
        """A DER OCSPResponse for request_der; never raises for a bad request."""
        request = _single_request(request_der)
        return malformed_request_response() if request is None else self.answer(*request)

    def knows(self, cert_id: OcspCertId) -> bool:
        """Whether cert_id names this responder's CA (issuer name and key hashes)."""
        return (cert_id.issuer_name_hash, cert_id.issuer_key_hash) == \
            self._issuer_hashes[cert_id.hash_algorithm.name]

    def answer(self, cert_id: OcspCertId, nonce: bytes | None) -> bytes:
        """The signed answer about one parsed CertID (respond() without the parsing)."""
        now = self._clock()
        try:
            if now >= self._responder_certificate.not_valid_after_utc:
                raise ServiceUnavailable(code="ocsp.responder_expired",
                                         detail="the OCSP responder certificate expired")
            status = self._status(cert_id)
            if nonce is not None:
                return self._sign(cert_id, status, now, nonce)
            return self._cached_or_signed(cert_id, status, now)
        except ServiceUnavailable as exc:
            self.last_error = f"{exc.code}: {exc.detail}"
            return try_later_response()

    def invalidate(self, serial: int) -> None:
        """Forget every cached response for serial: call it when the serial is revoked."""
        with self._lock:
            for key in self._keys_by_serial.pop(serial, ()):
                self._cache.pop(key, None)

    def _status(self, cert_id: OcspCertId) -> SerialStatus:
        if not self.knows(cert_id):
            # RFC 6960 2.2: "unknown" when the responder does not know the issuer.
            return SerialStatus(ocsp.OCSPCertStatus.UNKNOWN)
        status = SerialStatus(*self._lookup(cert_id.serial))
        if status.status is ocsp.OCSPCertStatus.REVOKED and status.revoked_at is None:
            raise ValueError(f"lookup reported serial {cert_id.serial} revoked without a time")
        return status

    def _cached_or_signed(self, cert_id: OcspCertId, status: SerialStatus,
                          now: dt.datetime) -> bytes:
        key: _CacheKey = (cert_id.serial, cert_id.hash_algorithm.name,
                          cert_id.issuer_name_hash, cert_id.issuer_key_hash, status)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and now < cached.refresh_at:
                self.cache_hits += 1
                return cached.response_der
        try:
            response_der = self._sign(cert_id, status, now, None)
        except ServiceUnavailable:
            with self._lock:
                cached = self._cache.get(key)  # not if invalidated meanwhile
            if cached is not None and now < cached.next_update:
                return cached.response_der  # still valid: better than tryLater
            raise
        self._store(key, _CachedResponse(response_der, now + self._refresh_after,
                                         now + self._validity))
        return response_der

    def _store(self, key: _CacheKey, entry: _CachedResponse) -> None:
        with self._lock:
            self._cache.pop(key, None)  # re-insert as the youngest
            while len(self._cache) >= self._max_cached:
                self._forget(next(iter(self._cache)))
            self._cache[key] = entry
            self._keys_by_serial.setdefault(key[0], set()).add(key)

    def _forget(self, key: _CacheKey) -> None:
        del self._cache[key]
        keys = self._keys_by_serial.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._keys_by_serial[key[0]]

    def _sign(self, cert_id: OcspCertId, status: SerialStatus, now: dt.datetime,
              nonce: bytes | None) -> bytes:
        """One SingleResponse echoing the request's CertID (RFC 6960 4.2.1)."""
        revoked = status.status is ocsp.OCSPCertStatus.REVOKED
        # RFC 5280 5.3.1 (referenced by RFC 6960 4.2.1): leave "unspecified" out.
        reason = status.reason if status.reason is not x509.ReasonFlags.unspecified else None
        builder = (
            ocsp.OCSPResponseBuilder()
            .add_response_by_hash(
                issuer_name_hash=cert_id.issuer_name_hash,
                issuer_key_hash=cert_id.issuer_key_hash, serial_number=cert_id.serial,
                algorithm=cert_id.hash_algorithm, cert_status=status.status,
                this_update=now, next_update=now + self._validity,
                revocation_time=status.revoked_at if revoked else None,
                revocation_reason=reason if revoked else None)
            .responder_id(ocsp.OCSPResponderEncoding.HASH, self._responder_certificate)
            .certificates([self._responder_certificate]))
        if nonce is not None:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)  # RFC 8954
        response = builder.sign(self._responder_key, self._signature_hash)  # type: ignore[arg-type]
        with self._lock:
            self.signed_responses += 1
        return response.public_bytes(serialization.Encoding.DER)


class OcspDispatcher:
    """One OCSP endpoint for several issuing CAs (CA generations): each request goes to
    the responder whose CA its CertID names (issuer name and key hashes, RFC 6960
    4.1.1), so a certificate of a retired CA is answered by that CA's own delegated
    responder. A CertID naming none of them is answered "unknown" by the fallback (the
    active CA's responder), as a single responder would (RFC 6960 2.2)."""

    def __init__(self, responders: dict[str, OcspResponder], fallback: str) -> None:
        if fallback not in responders:
            raise ValueError("the fallback responder must be one of the responders")
        self.responders = dict(responders)
        self._fallback = responders[fallback]

    def respond(self, request_der: bytes) -> bytes:
        """A DER OCSPResponse for request_der; never raises for a bad request."""
        request = _single_request(request_der)
        if request is None:
            return malformed_request_response()
        return self.responder_for(request[0]).answer(*request)

    def responder_for(self, cert_id: OcspCertId) -> OcspResponder:
        for responder in self.responders.values():
            if responder.knows(cert_id):
                return responder
        return self._fallback

    def invalidate(self, serial: int) -> None:
        for responder in self.responders.values():
            responder.invalidate(serial)

    @property
    def last_error(self) -> str | None:
        errors = [f"{name}: {r.last_error}" for name, r in self.responders.items()
                  if r.last_error]
        return "; ".join(errors) or None


def _check_delegated_responder(responder: x509.Certificate, issuer: x509.Certificate) -> None:
    """RFC 6960 4.2.2.2: issued directly by the CA and carrying id-kp-OCSPSigning."""
    try:
        responder.verify_directly_issued_by(issuer)
        eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature) as exc:
        raise ValueError(f"not a delegated responder of this CA: {exc}") from None
    if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
        raise ValueError("the responder certificate lacks id-kp-OCSPSigning")
