"""Certificate renewal for the agent, and the revocation check it falls back on.

Renewal keeps the device key: a new CSR for the same TPM-resident key (CN = device id,
signed in the TPM), sent to EST simplereenroll (RFC 7030 4.2.2) over mTLS with the
current certificate and that same key through the tpm2 provider. Keeping the key keeps
renewal idempotent: when an answer is lost, the server gives the same certificate back
for the same key (a rotated key would be refused as "cert.superseded"); the key never
leaves the TPM, so rotating it buys little. When the certificate has expired (or the
server no longer accepts it for renewal) the device proves itself again with a fresh
TPM-attested enrollment (device_sdk.attest), which needs no certificate at all.

``crl_revocation`` answers "is this certificate revoked?" from the CA's CRL (signature
checked against the issuing CA from the state dir), for when the broker refuses the
device and no notice can reach it.
"""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from tpm2_pytss import TPM2B_PUBLIC

from .attest import AttestedEnrollment
from .est import EstClient, EstError
from .state import DeviceState, issuer_first
from .tls import tpm_client_context
from .tpm import TpmDevice

# Refusals that mean "this device or certificate is revoked" (enroll_server.identity).
REVOKED_CODES = frozenset({"device.revoked", "cert.revoked"})
# Refusals of a renewal that a fresh attested enrollment can overcome.
ATTEST_INSTEAD_CODES = frozenset({"cert.expired", "cert.superseded", "auth.unknown_certificate",
                                  "reenroll.names_changed"})
TRANSIENT_STATUSES = frozenset({0, 202, 429, 500, 502, 503, 504})


class RenewalDeferred(Exception):
    """A transient failure (server down, busy, pending): try again later."""


@dataclass
class RevokedByServer(Exception):
    code: str
    message: str


@dataclass(frozen=True)
class Renewed:
    certificate: x509.Certificate
    chain: list[x509.Certificate]
    via: str  # "est" (simplereenroll) or "attest"


class Renewer:
    def __init__(self, state: DeviceState, tcti: str, server: str, server_ca: Path,
                 group: str | None, timeout: float = 60.0) -> None:
        self.state, self.tcti, self.server, self.server_ca = state, tcti, server, server_ca
        self.group, self.timeout = group, timeout

    def renew(self, device_id: str, now: dt.datetime | None = None) -> Renewed:
        """A new certificate for device_id, stored in the state dir; raises
        RenewalDeferred, RevokedByServer, or EstError (a final refusal)."""
        now = now or dt.datetime.now(dt.UTC)
        current = self.state.certificate()
        try:
            if current is None or now >= current.not_valid_after_utc:
                renewed = self._attest(device_id)
            else:
                try:
                    renewed = self._reenroll(device_id)
                except EstError as error:
                    if error.code not in ATTEST_INSTEAD_CODES:
                        raise
                    renewed = self._attest(device_id)
        except httpx.HTTPError as error:
            raise RenewalDeferred(f"{type(error).__name__}: {error}") from error
        except EstError as error:
            if error.code in REVOKED_CODES:
                raise RevokedByServer(error.code, error.message) from error
            if error.status in TRANSIENT_STATUSES:
                raise RenewalDeferred(str(error)) from error
            raise
        return renewed

    def _reenroll(self, device_id: str) -> Renewed:
        context = tpm_client_context(self.server_ca, self.state.certificate_path,
                                     self.state.key_path, self.tcti)
        with TpmDevice(self.tcti) as tpm:
            csr = tpm.csr(device_id)
            key_pem = tpm.tss2_private_key_pem()
            with EstClient(self.server, self.server_ca, context=context,
                           timeout=self.timeout) as est:
                certificate = est.simplereenroll(csr)
                chain = est.cacerts()
        return self._store(device_id, certificate, chain, key_pem, csr.public_key(), "est")

    def _attest(self, device_id: str) -> Renewed:
        with TpmDevice(self.tcti) as tpm:
            with AttestedEnrollment(self.server, self.server_ca, tpm, self.group,
                                    self.timeout, attempts=3) as enrollment:
                certificate = enrollment.enroll(common_name=device_id)
                chain = enrollment.cacerts()
            key_pem = tpm.tss2_private_key_pem()
            key = device_public_key(tpm)
        return self._store(device_id, certificate, chain, key_pem, key, "attest")

    def _store(self, device_id: str, certificate: x509.Certificate,
               chain: list[x509.Certificate], key_pem: bytes, key: object,
               via: str) -> Renewed:
        """Check what the server sent before it replaces anything in the state dir."""
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        names = certificate.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
        if not names or names[0].value != device_id:
            raise EstError(200, "client.bad_response", "the new certificate names another "
                                                       "device")
        if (certificate.public_key().public_bytes(der, spki)
                != key.public_bytes(der, spki)):  # type: ignore[attr-defined]
            raise EstError(200, "client.bad_response", "the new certificate is not for the "
                                                       "TPM's device key")
        ordered = issuer_first(certificate, chain)
        try:
            certificate.verify_directly_issued_by(ordered[0])
        except (IndexError, ValueError, TypeError, InvalidSignature) as error:
            raise EstError(200, "client.bad_response",
                           f"the new certificate is not issued by the CA: {error}") from error
        self.state.save(certificate, ordered, key_pem, group=self.group)
        return Renewed(certificate, ordered, via)


def device_public_key(tpm: TpmDevice) -> object:
    """The TPM's device key as a cryptography public key."""
    _, public = tpm.device_key()
    area = TPM2B_PUBLIC.unmarshal(public)[0].publicArea
    return serialization.load_der_public_key(area.to_der())


def crl_revocation(certificate: x509.Certificate, chain: list[x509.Certificate],
                   server_ca: Path, timeout: float = 30.0,
                   now: dt.datetime | None = None) -> str | None:
    """The CRLReason name if the CA's CRL lists ``certificate``, else None.

    The CRL comes from the certificate's CRL distribution point over TLS to the server's
    trust anchor, and must be signed by the certificate's issuer and current; anything
    else raises ValueError / httpx.HTTPError (no verdict).
    """
    now = now or dt.datetime.now(dt.UTC)
    points = certificate.extensions.get_extension_for_class(
        x509.CRLDistributionPoints).value
    urls = [name.value for point in points for name in point.full_name or ()
            if isinstance(name, x509.UniformResourceIdentifier)]
    if not urls:
        raise ValueError("the certificate names no CRL")
    issuer = issuer_first(certificate, chain)[0]
    response = httpx.get(urls[0], verify=ssl.create_default_context(cafile=str(server_ca)),
                         timeout=timeout)
    response.raise_for_status()
    crl = x509.load_der_x509_crl(response.content)
    if crl.issuer != issuer.subject or not crl.is_signature_valid(
            issuer.public_key()):  # type: ignore[arg-type]
        raise ValueError("the CRL is not signed by the certificate's issuer")
    if crl.next_update_utc is not None and crl.next_update_utc < now:
        raise ValueError(f"the CRL is stale (nextUpdate {crl.next_update_utc.isoformat()})")
    entry = crl.get_revoked_certificate_by_serial_number(certificate.serial_number)
    if entry is None:
        return None
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
    except x509.ExtensionNotFound:
        return "unspecified"
