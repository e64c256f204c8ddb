"""Certificates as TPM vendors ship them: one lenient parse, one strict check (pure).

cryptography's DER parser refuses certificates that real TPMs and vendor CAs carry: the
Nuvoton TPM Root CAs put their name in one multi-valued RDN whose SET is not in DER order,
Intel's On Die CA root adds a NULL parameter to ecdsa-with-SHA384, STMicro intermediates
have non-minimal serial numbers. openssl accepts all of them. ``parse_certificate`` reads
every certificate the same way (asn1crypto, which accepts BER), keeps the exact
to-be-signed bytes, and ``verify_signature`` checks the issuer's signature over exactly
those bytes. What was parsed is therefore what was signed: leniency in the parser lets a
vendor's encoding quirk through, never a forged certificate.

Names are compared as RFC 5280 7.1 says (attribute values prepared per RFC 4518: case and
whitespace folded, PrintableString and UTF8String alike, RDN values as a set), so an
issuer encoded as UTF8String still matches a subject encoded as PrintableString (STM's
ECC intermediate 02, AMD's PRG-RPL intermediate).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from asn1crypto import core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from enroll_server.attestation.verdict import MalformedEvidence

MAX_CERTIFICATE_BYTES = 16384
# Signature algorithms accepted on EK chains (RFC 4055, RFC 5758): SHA-2 only.
_HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
_RSA_PKCS1 = {"1.2.840.113549.1.1.11": "sha256", "1.2.840.113549.1.1.12": "sha384",
              "1.2.840.113549.1.1.13": "sha512"}
_ECDSA = {"1.2.840.10045.4.3.2": "sha256", "1.2.840.10045.4.3.3": "sha384",
          "1.2.840.10045.4.3.4": "sha512"}
_RSA_PSS = "1.2.840.113549.1.1.10"
_TPM_SAN_FIELDS = {"2.23.133.2.1": "manufacturer", "2.23.133.2.2": "model",
                   "2.23.133.2.3": "version"}


class CertificateProblem(ValueError):
    """The bytes are not a certificate this verifier can read (caller maps it to a code)."""


@dataclass(frozen=True)
class Extension:
    oid: str  # dotted
    critical: bool
    value: bytes  # the extnValue OCTET STRING contents


@dataclass(frozen=True, eq=False)
class EkCertificate:
    """One parsed certificate; ``der`` and ``tbs`` are the exact bytes received."""

    der: bytes
    tbs: bytes
    version: int
    serial_number: int
    signature_algorithm: bytes  # DER AlgorithmIdentifier (outer)
    signature: bytes
    issuer_key: str  # RFC 5280 7.1 comparison key of the issuer name
    subject_key: str
    issuer_text: str
    subject_text: str
    not_valid_before_utc: dt.datetime
    not_valid_after_utc: dt.datetime
    spki: bytes
    extensions: tuple[Extension, ...] = field(repr=False)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, x509.Certificate):
            return self.der == other.public_bytes(serialization.Encoding.DER)
        return isinstance(other, EkCertificate) and self.der == other.der

    def __hash__(self) -> int:
        return hash(self.der)

    @property
    def fingerprint_sha256(self) -> bytes:
        return hashlib.sha256(self.der).digest()

    @property
    def self_issued(self) -> bool:
        return self.issuer_key == self.subject_key

    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        try:
            key = serialization.load_der_public_key(self.spki)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise CertificateProblem(f"unreadable public key: {exc}") from exc
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise CertificateProblem(f"public key type {type(key).__name__} not allowed")
        return key

    def extension(self, oid: str) -> Extension | None:
        for extension in self.extensions:
            if extension.oid == oid:
                return extension
        return None

    def describe(self) -> str:
        return f"{self.subject_text or '<empty subject>'} (serial {self.serial_number:x})"

    def tpm_identity(self) -> dict[str, str]:
        """TPM manufacturer / model / version from the SAN directoryName (EK Cred. Profile
        3.2.9), empty when absent or unreadable."""
        san = self.extension("2.5.29.17")
        found: dict[str, str] = {}
        if san is None:
            return found
        try:
            names = asn1_x509.GeneralNames.load(san.value)
            for general_name in names:
                if general_name.name != "directory_name":
                    continue
                for rdn in general_name.chosen.chosen:
                    for attribute in rdn:
                        oid = attribute["type"].dotted
                        if oid in _TPM_SAN_FIELDS:
                            found[_TPM_SAN_FIELDS[oid]] = str(attribute["value"].native)
        except (ValueError, TypeError):
            return {}
        return found


def _tlv_end(data: bytes, start: int) -> int:
    """End offset of the definite-length TLV at ``start`` (low-tag-number form only)."""
    if start + 2 > len(data):
        raise CertificateProblem("truncated")
    first = data[start + 1]
    if first < 0x80:
        return start + 2 + first
    octets = first & 0x7F
    if octets == 0:
        raise CertificateProblem("indefinite length")
    if octets > 4 or start + 2 + octets > len(data):
        raise CertificateProblem("bad length")
    return start + 2 + octets + int.from_bytes(data[start + 2:start + 2 + octets], "big")


def certificate_length(data: bytes) -> int:
    """Bytes of the DER certificate at the start of ``data`` (NV areas may be padded)."""
    if len(data) < 4 or data[0] != 0x30:
        raise CertificateProblem("not a DER certificate")
    end = _tlv_end(data, 0)
    if end > len(data):
        raise CertificateProblem("truncated")
    return end


def _split_certificate(der: bytes) -> tuple[bytes, bytes, bytes]:
    """(tbsCertificate, signatureAlgorithm, signatureValue) TLVs, exactly as received."""
    header_end = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)
    parts, offset = [], header_end
    while offset < len(der):
        end = _tlv_end(der, offset)
        if end > len(der):
            raise CertificateProblem("truncated")
        parts.append(der[offset:end])
        offset = end
    if len(parts) != 3 or parts[0][0] != 0x30 or parts[1][0] != 0x30 or parts[2][0] != 0x03:
        raise CertificateProblem("not a Certificate SEQUENCE {tbs, algorithm, signature}")
    return parts[0], parts[1], parts[2]


def _time(value: asn1_x509.Time) -> dt.datetime:
    native = value.native
    if not isinstance(native, dt.datetime):  # asn1crypto's extended year 0 etc.
        raise CertificateProblem(f"unusable time {value.dump().hex()}")
    return native.astimezone(dt.UTC)


_SHORT_NAMES = {"common_name": "CN", "organization_name": "O", "organizational_unit_name": "OU",
                "country_name": "C", "locality_name": "L", "state_or_province_name": "ST",
                "serial_number": "serialNumber"}


def _name(value: asn1_x509.Name) -> tuple[str, str]:
    """(comparison key per RFC 5280 7.1, RFC 4514-like display text)."""
    parts = []
    for rdn in reversed(list(value.chosen)):
        parts.append("+".join(
            f"{_SHORT_NAMES.get(a['type'].native, a['type'].native)}={a['value'].native}"
            for a in rdn))
    return value.hashable, ",".join(str(part) for part in parts)


def parse_certificate(der: bytes) -> EkCertificate:
    """One DER certificate (no trailing bytes), read leniently; CertificateProblem if not."""
    if not isinstance(der, bytes) or len(der) > MAX_CERTIFICATE_BYTES:
        raise CertificateProblem("not a certificate of a sensible size")
    if certificate_length(der) != len(der):
        raise CertificateProblem(f"{len(der) - certificate_length(der)} trailing bytes")
    tbs_bytes, algorithm_bytes, signature_bytes = _split_certificate(der)
    try:
        tbs = asn1_x509.TbsCertificate.load(tbs_bytes, strict=True)
        signature = core.BitString.load(signature_bytes, strict=True)
        if signature.contents[:1] != b"\x00":
            raise CertificateProblem("signature BIT STRING with unused bits")
        if tbs["signature"].dump() != algorithm_bytes:  # RFC 5280 4.1.1.2
            raise CertificateProblem("signature algorithm differs inside and outside tbs")
        issuer_key, issuer_text = _name(tbs["issuer"])
        subject_key, subject_text = _name(tbs["subject"])
        extensions, seen = [], set()
        for extension in tbs["extensions"] or ():
            oid = extension["extn_id"].dotted
            if oid in seen:  # RFC 5280 4.2: at most one instance of each
                raise CertificateProblem(f"extension {oid} appears twice")
            seen.add(oid)
            extensions.append(Extension(oid, bool(extension["critical"].native),
                                        extension["extn_value"].contents))
        return EkCertificate(
            der=der, tbs=tbs_bytes, version=int(tbs["version"].native[1:]) - 1
            if isinstance(tbs["version"].native, str) else 0,
            serial_number=int(tbs["serial_number"].native), signature_algorithm=algorithm_bytes,
            signature=signature.contents[1:], issuer_key=issuer_key, subject_key=subject_key,
            issuer_text=issuer_text, subject_text=subject_text,
            not_valid_before_utc=_time(tbs["validity"]["not_before"]),
            not_valid_after_utc=_time(tbs["validity"]["not_after"]),
            spki=tbs["subject_public_key_info"].dump(), extensions=tuple(extensions))
    except CertificateProblem:
        raise
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise CertificateProblem(f"unparseable certificate: {exc}") from exc


def load_certificate_bytes(data: bytes, field_name: str = "ek_certificate") -> EkCertificate:
    """A DER certificate as read from TPM NV: padding after it (all 0x00 or all 0xFF, TCG EK
    Credential Profile 2.2.1.5 indices are often bigger than the certificate) is dropped,
    anything else trailing is refused. Refusals are MalformedEvidence (400)."""
    try:
        length = certificate_length(data) if isinstance(data, bytes) else -1
        if length < 0:
            raise CertificateProblem("not bytes")
        padding_bytes = data[length:]
        if padding_bytes.strip(b"\x00") and padding_bytes.strip(b"\xff"):
            raise MalformedEvidence(field_name, f"{len(padding_bytes)} trailing bytes after "
                                                "the certificate")
        return parse_certificate(data[:length])
    except CertificateProblem as exc:
        raise MalformedEvidence(field_name, "not a DER certificate",
                                detail=f"{field_name}: {exc}") from exc


def split_certificates(data: bytes) -> list[EkCertificate]:
    """Concatenated DER certificates (an EK chain NV index), with trailing NV padding."""
    found, offset = [], 0
    while offset < len(data) and data[offset] == 0x30:
        end = certificate_length(data[offset:]) + offset
        found.append(parse_certificate(data[offset:end]))
        offset = end
    rest = data[offset:]
    if not found or (rest.strip(b"\x00") and rest.strip(b"\xff")):
        raise CertificateProblem("not a sequence of DER certificates")
    return found


def load_pem_certificates(text: bytes | str) -> list[EkCertificate]:
    """Every "-----BEGIN CERTIFICATE-----" block of a PEM bundle (comments allowed)."""
    import base64
    import binascii

    data = text.encode() if isinstance(text, str) else text
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    certificates = []
    for chunk in data.split(begin)[1:]:
        if end not in chunk:
            raise CertificateProblem("PEM block without END line")
        body = chunk.split(end, 1)[0]
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
        except binascii.Error as exc:
            raise CertificateProblem(f"bad base64 in PEM: {exc}") from exc
        certificates.append(parse_certificate(der))
    return certificates


def as_ek_certificate(certificate: EkCertificate | x509.Certificate) -> EkCertificate:
    if isinstance(certificate, EkCertificate):
        return certificate
    return parse_certificate(certificate.public_bytes(serialization.Encoding.DER))


def _pss_parameters(algorithm: bytes) -> tuple[str, int]:
    from asn1crypto import algos

    parsed = algos.SignedDigestAlgorithm.load(algorithm)
    params = parsed["parameters"]
    hash_name = params["hash_algorithm"]["algorithm"].native
    mgf_hash = params["mask_gen_algorithm"]["parameters"]["algorithm"].native
    if params["mask_gen_algorithm"]["algorithm"].native != "mgf1" or mgf_hash != hash_name:
        raise CertificateProblem("RSASSA-PSS with an MGF other than MGF1 of the same hash")
    if params["trailer_field"].native not in (None, "trailer_field_bc"):
        raise CertificateProblem("RSASSA-PSS trailer field")
    return hash_name, int(params["salt_length"].native)


def signature_problem(child: EkCertificate, issuer_key: object) -> str | None:
    """None if ``issuer_key`` signed exactly ``child.tbs`` with an allowed algorithm."""
    oid = core.Sequence.load(child.signature_algorithm)[0].dotted
    try:
        if oid in _RSA_PKCS1 and isinstance(issuer_key, rsa.RSAPublicKey):
            issuer_key.verify(child.signature, child.tbs, padding.PKCS1v15(),
                              _HASHES[_RSA_PKCS1[oid]]())
        elif oid == _RSA_PSS and isinstance(issuer_key, rsa.RSAPublicKey):
            hash_name, salt = _pss_parameters(child.signature_algorithm)
            if hash_name not in _HASHES:
                return f"RSASSA-PSS with {hash_name} not allowed"
            hash_algorithm = _HASHES[hash_name]()
            issuer_key.verify(child.signature, child.tbs,
                              padding.PSS(padding.MGF1(hash_algorithm), salt), hash_algorithm)
        elif oid in _ECDSA and isinstance(issuer_key, ec.EllipticCurvePublicKey):
            issuer_key.verify(child.signature, child.tbs, ec.ECDSA(_HASHES[_ECDSA[oid]]()))
        else:
            return (f"signature does not verify: algorithm {oid} not allowed with a "
                    f"{type(issuer_key).__name__}")
    except InvalidSignature:
        return "signature does not verify"
    except (ValueError, TypeError, KeyError, CertificateProblem) as exc:
        return f"signature not checkable: {exc}"
    return None


def iter_pem_blocks(text: str) -> Iterator[tuple[list[str], str]]:
    """(comment lines just before, PEM block) pairs of a commented bundle."""
    comments: list[str] = []
    block: list[str] | None = None
    for line in text.splitlines():
        if block is not None:
            block.append(line)
            if line.startswith("-----END CERTIFICATE-----"):
                yield comments, "\n".join(block) + "\n"
                comments, block = [], None
        elif line.startswith("-----BEGIN CERTIFICATE-----"):
            block = [line]
        elif line.startswith("#"):
            comments.append(line.lstrip("#").strip())
        elif not line.strip():
            continue
        else:
            comments = []
