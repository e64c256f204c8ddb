"""Strict unmarshalling of TPM structures, object names, and TPM keys as cryptography keys.

Wire formats (the bytes tpm2-tools 5.4 writes, checked against swtpm):

* public areas: a marshalled ``TPM2B_PUBLIC`` (2-byte size, then ``TPMT_PUBLIC``), as
  ``tpm2_createek -u``, ``tpm2_createak -u``, ``tpm2_create -u`` and ``tpm2_readpublic -o``
  write it; a bare marshalled ``TPMT_PUBLIC`` is accepted too (TPM 2.0 Part 2 12.2.4/12.2.5).
* attestation data: the marshalled ``TPMS_ATTEST`` *without* the ``TPM2B_ATTEST`` size,
  as ``tpm2_certifycreation --attestation`` and ``tpm2_quote -m`` write it and as the
  signature covers it
  (TPM 2.0 Part 2 10.12.12; it starts with TPM_GENERATED_VALUE ``ff 54 43 47``).
* signatures: a marshalled ``TPMT_SIGNATURE`` (Part 2 11.3.4), the default ``tss`` format
  of ``tpm2_certifycreation -o`` / ``tpm2_quote -s``.

"Strict" means: the whole input is consumed, and marshalling the parsed value again gives
back exactly the input. The round trip catches trailing bytes, a ``TPM2B`` size that does
not match its content (libtss2's unmarshaller does not check that for ``TPM2B_PUBLIC``),
and any non-canonical encoding, so a name computed here is the name the TPM computed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import TPM2B_PUBLIC, TPMS_ATTEST, TPMT_PUBLIC, TPMT_SIGNATURE

from enroll_server.attestation.verdict import MalformedEvidence

MAX_STRUCTURE_SIZE = 4096  # larger than any TPM2B_PUBLIC / TPMS_ATTEST / TPMT_SIGNATURE
TPM_GENERATED_VALUE = 0xFF544347  # TPM 2.0 Part 2 6.2: "\xffTCG"

# Hashes allowed as an object's nameAlg (Part 1 16). SHA-1 names are not accepted.
NAME_HASHES: dict[int, hashes.HashAlgorithm] = {
    TPM2_ALG.SHA256: hashes.SHA256(),
    TPM2_ALG.SHA384: hashes.SHA384(),
    TPM2_ALG.SHA512: hashes.SHA512(),
}
# Hashes a PCR bank may use (Part 2 6.3); the bank's values are only hashed again.
PCR_BANK_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha1": hashes.SHA1(),  # noqa: S303 - a PCR bank algorithm, not a signature hash
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}
PCR_BANK_ALGS: dict[str, int] = {
    "sha1": TPM2_ALG.SHA1, "sha256": TPM2_ALG.SHA256,
    "sha384": TPM2_ALG.SHA384, "sha512": TPM2_ALG.SHA512,
}  # fmt: skip
_CURVES: dict[int, ec.EllipticCurve] = {
    TPM2_ECC.NIST_P256: ec.SECP256R1(),
    TPM2_ECC.NIST_P384: ec.SECP384R1(),
}
MIN_RSA_BITS = 2048

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def _unmarshal_exactly(cls: type, data: bytes, field: str):  # type: ignore[no-untyped-def]
    """Unmarshal ``cls`` from ``data``, refusing truncation, trailing bytes, non-canonical input."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedEvidence(field, "expected bytes")
    data = bytes(data)
    if not data:
        raise MalformedEvidence(field, "empty")
    if len(data) > MAX_STRUCTURE_SIZE:
        raise MalformedEvidence(field, f"longer than {MAX_STRUCTURE_SIZE} bytes")
    try:
        value, consumed = cls.unmarshal(data)
    except TSS2_Exception as exc:
        problem = "truncated" if "large enough" in str(exc) else f"not a valid {cls.__name__}"
        raise MalformedEvidence(field, problem, detail=f"{field}: {cls.__name__}: {exc}") from exc
    if consumed != len(data):
        trailing = len(data) - consumed
        raise MalformedEvidence(field, f"{trailing} trailing bytes after {cls.__name__}")
    if value.marshal() != data:
        raise MalformedEvidence(field, f"non-canonical {cls.__name__} encoding (size fields)")
    return value


def parse_public(data: bytes, field: str = "public") -> TPMT_PUBLIC:
    """A public area from a marshalled TPM2B_PUBLIC (or a bare TPMT_PUBLIC), strictly.

    A bare TPMT_PUBLIC starts with its type (0x0001 RSA, 0x0023 ECC); anything else is
    read as a TPM2B_PUBLIC, whose size would have to be 1 or 35 to be confused with them,
    too small for any RSA or ECC public area. Only RSA and ECC objects with a
    SHA-256/384/512 nameAlg are accepted.
    """
    data = bytes(data) if isinstance(data, bytearray | memoryview) else data
    bare = isinstance(data, bytes) and len(data) >= 2 and (
        int.from_bytes(data[:2], "big") in (TPM2_ALG.RSA, TPM2_ALG.ECC)
    )
    if bare:
        public = _unmarshal_exactly(TPMT_PUBLIC, data, field)
    else:
        public = _unmarshal_exactly(TPM2B_PUBLIC, data, field).publicArea
    if public.type not in (TPM2_ALG.RSA, TPM2_ALG.ECC):
        raise MalformedEvidence(field, "not an RSA or ECC key", detail=f"type {public.type}")
    if public.nameAlg not in NAME_HASHES:
        raise MalformedEvidence(field, "unsupported nameAlg", detail=f"nameAlg {public.nameAlg}")
    return public


def marshal_public(public: TPMT_PUBLIC) -> bytes:
    """The TPM2B_PUBLIC wire form of a public area (what tpm2-tools writes with ``-u``)."""
    return TPM2B_PUBLIC(publicArea=public).marshal()


def object_name(public: TPMT_PUBLIC) -> bytes:
    """Name = nameAlg (2 bytes) || H_nameAlg(marshalled TPMT_PUBLIC) (TPM 2.0 Part 1 16)."""
    digest = hashes.Hash(NAME_HASHES[public.nameAlg])
    digest.update(public.marshal())
    return int(public.nameAlg).to_bytes(2, "big") + digest.finalize()


def check_name_format(name: bytes, field: str = "name") -> bytes:
    """A key's Name as sent on the wire: nameAlg || digest of that algorithm's size."""
    if not isinstance(name, bytes) or len(name) < 2:
        raise MalformedEvidence(field, "not a TPM object name")
    algorithm = NAME_HASHES.get(int.from_bytes(name[:2], "big"))
    if algorithm is None or len(name) != 2 + algorithm.digest_size:
        raise MalformedEvidence(field, "not a TPM object name with a SHA-2 nameAlg")
    return name


def parse_attest(data: bytes, field: str = "attest") -> TPMS_ATTEST:
    """A marshalled TPMS_ATTEST (no TPM2B size prefix), strictly (TPM 2.0 Part 2 10.12.12)."""
    return _unmarshal_exactly(TPMS_ATTEST, data, field)


def attest_header(data: bytes, field: str = "attest") -> tuple[int, int]:
    """(magic, type) of a marshalled TPMS_ATTEST, read before the union is unmarshalled.

    Lets a verifier report a wrong magic or attestation type as such, rather than as
    malformed input when the type selects an unknown union member.
    """
    if not isinstance(data, bytes) or len(data) < 6:
        raise MalformedEvidence(field, "truncated")
    return int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:6], "big")


def parse_signature(data: bytes, field: str = "signature") -> TPMT_SIGNATURE:
    """A marshalled TPMT_SIGNATURE (TPM 2.0 Part 2 11.3.4), strictly."""
    return _unmarshal_exactly(TPMT_SIGNATURE, data, field)


def public_key(public: TPMT_PUBLIC, field: str = "public") -> PublicKey:
    """The public key of an RSA (>= 2048 bits) or ECC P-256/P-384 TPM object.

    RSA: modulus from ``unique.rsa``, exponent 0 meaning 65537 (Part 2 12.2.3.5).
    ECC: the point ``unique.ecc`` on ``eccDetail.curveID``; off-curve points are refused.
    """
    try:
        if public.type == TPM2_ALG.RSA:
            modulus = int.from_bytes(bytes(public.unique.rsa), "big")
            exponent = public.parameters.rsaDetail.exponent or 65537
            key: PublicKey = rsa.RSAPublicNumbers(exponent, modulus).public_key()
            if key.key_size < MIN_RSA_BITS or key.key_size != public.parameters.rsaDetail.keyBits:
                raise MalformedEvidence(field, "RSA key size unsupported or inconsistent",
                                        detail=f"{key.key_size} bits")  # fmt: skip
            return key
        if public.type == TPM2_ALG.ECC:
            curve = _CURVES.get(public.parameters.eccDetail.curveID)
            if curve is None:
                raise MalformedEvidence(field, "unsupported ECC curve",
                                        detail=f"curve {public.parameters.eccDetail.curveID}")
            x = int.from_bytes(bytes(public.unique.ecc.x), "big")
            y = int.from_bytes(bytes(public.unique.ecc.y), "big")
            return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
    except ValueError as exc:
        raise MalformedEvidence(field, "not a valid public key", detail=f"{field}: {exc}") from exc
    raise MalformedEvidence(field, "not an RSA or ECC key")


def spki_der(key: PublicKey) -> bytes:
    """DER SubjectPublicKeyInfo (RFC 5280 4.1.2.7): the canonical encoding of a key."""
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def key_identity(key: PublicKey) -> str:
    """Hex SHA-256 of the key's DER SubjectPublicKeyInfo."""
    return hashlib.sha256(spki_der(key)).hexdigest()


def ek_identity(ek_public: bytes | TPMT_PUBLIC) -> str:
    """Device identity: hex SHA-256 of the EK public key's DER SubjectPublicKeyInfo.

    The same value results from the EK certificate's key (``key_identity``), so the
    identity does not depend on which of the two the device sent.
    """
    public = ek_public
    if not isinstance(public, TPMT_PUBLIC):
        public = parse_public(public, "ek_public")
    return key_identity(public_key(public, "ek_public"))


@dataclass(frozen=True)
class ClockInfo:
    """TPMS_CLOCK_INFO plus firmwareVersion from a TPMS_ATTEST (TPM 2.0 Part 2 10.11.1).

    For signing keys outside the endorsement and platform hierarchies the TPM obfuscates
    resetCount, restartCount and firmwareVersion (TPM 2.0 Part 3 18.1): monotonic checks
    need an AK in the endorsement hierarchy, as ``tpm2_createak`` makes it.
    """

    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int


def clock_info(attest: TPMS_ATTEST) -> ClockInfo:
    """The clock and counters a TPMS_ATTEST reports."""
    info = attest.clockInfo
    return ClockInfo(int(info.clock), int(info.resetCount), int(info.restartCount),
                     bool(info.safe), int(attest.firmwareVersion))  # fmt: skip
