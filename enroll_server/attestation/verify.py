"""AK checks and TPM2_Certify verification: the device key lives in the AK's TPM.

A restricted signing key signs a digest only if the TPM produced the message or checked
that it does not start with TPM_GENERATED_VALUE (TPM 2.0 Part 1 11.4.6.3 "Restricted
signing keys"). So a TPMS_ATTEST with the right magic, signed by an AK that is restricted,
fixedTPM and fixedParent, was produced by that TPM. TPM2_Certify (Part 3 18.2) puts the
certified object's Name and the caller's qualifyingData (the server nonce) into it.

Check order: the AK's attributes; the magic and the attestation type (constants, so a
forged structure is reported as such); the signature; the nonce (constant time); then
the content (certified Name, device key attributes).
"""

from __future__ import annotations

import dataclasses
import hmac
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss.constants import TPM2_ALG, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import TPMS_ATTEST, TPMT_PUBLIC, TPMT_SIGNATURE

from enroll_server.attestation import verdict
from enroll_server.attestation.tpm_structs import (
    TPM_GENERATED_VALUE,
    attest_header,
    object_name,
    parse_attest,
    parse_public,
    parse_signature,
    public_key,
    spki_der,
)

# Part 2 8.3 TPMA_OBJECT. An AK (TCG "Attestation Key", tpm2_createak's template):
AK_REQUIRED_ATTRIBUTES = (
    TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH
)  # fmt: skip
# A device key: generated in this TPM (sensitiveDataOrigin), never duplicable (fixedTPM,
# fixedParent), an unrestricted signing key that never decrypts.
DEVICE_KEY_REQUIRED_ATTRIBUTES = (
    TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
)  # fmt: skip
DEVICE_KEY_FORBIDDEN_ATTRIBUTES = TPMA_OBJECT.DECRYPT | TPMA_OBJECT.RESTRICTED
SIGNATURE_HASHES: dict[int, hashes.HashAlgorithm] = {
    TPM2_ALG.SHA256: hashes.SHA256(), TPM2_ALG.SHA384: hashes.SHA384(),
}  # fmt: skip
_RSA_SCHEMES = (TPM2_ALG.RSASSA, TPM2_ALG.RSAPSS)


def signing_scheme(ak: TPMT_PUBLIC) -> tuple[int, int]:
    """(scheme algorithm, hash algorithm) of a key's signing scheme (Part 2 12.2.3.5/6)."""
    if ak.type == TPM2_ALG.RSA:
        scheme = ak.parameters.rsaDetail.scheme
    else:
        scheme = ak.parameters.eccDetail.scheme
    return int(scheme.scheme), int(scheme.details.anySig.hashAlg)


def check_ak_public(ak_public: bytes) -> TPMT_PUBLIC:
    """The AK is a restricted signing key bound to its TPM, with a usable scheme.

    Required: restricted, sign, fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth;
    decrypt clear. Scheme: ECDSA (P-256/P-384) or RSASSA/RSAPSS (>= 2048 bits) with
    SHA-256 or SHA-384. A restricted key's scheme is fixed, so the TPM signs only with it.
    """
    public = parse_public(ak_public, "ak_public")
    attributes = public.objectAttributes
    if (attributes & AK_REQUIRED_ATTRIBUTES) != AK_REQUIRED_ATTRIBUTES or (
        attributes & TPMA_OBJECT.DECRYPT
    ):
        raise verdict.AkAttributes(detail=f"AK objectAttributes {attributes!s}")
    scheme, hash_alg = signing_scheme(public)
    usable = scheme == TPM2_ALG.ECDSA if public.type == TPM2_ALG.ECC else scheme in _RSA_SCHEMES
    if not usable or hash_alg not in SIGNATURE_HASHES:
        raise verdict.AkAttributes(detail=f"AK signing scheme {TPM2_ALG(scheme)!s} with "
                                          f"{TPM2_ALG(hash_alg)!s} not usable")  # fmt: skip
    public_key(public, "ak_public")  # refuses weak / unsupported keys as malformed
    return public


def check_ak_name(ak_public: bytes, expected_name: bytes) -> TPMT_PUBLIC:
    """The AK sent now is the one the credential challenge was made for (by Name)."""
    public = parse_public(ak_public, "ak_public")
    name = object_name(public)
    if not hmac.compare_digest(name, expected_name):
        raise verdict.AkNameMismatch(detail=f"AK name {name.hex()}, challenge made for "
                                            f"{expected_name.hex()}")  # fmt: skip
    return public


def signature_problem(signature: TPMT_SIGNATURE, ak: TPMT_PUBLIC, message: bytes) -> str | None:
    """Why ``signature`` is not the AK's signature over ``message`` (None if it is).

    The signature must use the AK's own scheme and hash. ECDSA r, s become a DER
    ECDSA-Sig-Value; RSASSA is PKCS #1 v1.5, RSAPSS any salt length (Part 1 C.7, B.7).
    """
    scheme, hash_alg = signing_scheme(ak)
    if int(signature.sigAlg) != scheme or int(signature.signature.any.hashAlg) != hash_alg:
        return (f"signature {TPM2_ALG(int(signature.sigAlg))!s}/"
                f"{TPM2_ALG(int(signature.signature.any.hashAlg))!s} is not the AK's scheme")
    algorithm = SIGNATURE_HASHES[hash_alg]
    key = public_key(ak, "ak_public")
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            r = int.from_bytes(bytes(signature.signature.ecdsa.signatureR), "big")
            s = int.from_bytes(bytes(signature.signature.ecdsa.signatureS), "big")
            if r <= 0 or s <= 0:
                return "ECDSA r or s is zero"
            key.verify(encode_dss_signature(r, s), message, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            raw = bytes(signature.signature.rsassa.sig)
            if scheme == TPM2_ALG.RSASSA:
                key.verify(raw, message, padding.PKCS1v15(), algorithm)
            else:
                pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.AUTO)
                key.verify(raw, message, pss, algorithm)
    except InvalidSignature:
        return "signature does not verify"
    return None


@dataclass(frozen=True)
class AttestKind:
    """The attestation type a verifier expects and the errors it raises (one per check)."""

    field: str
    attest_type: int
    bad_magic: type[verdict.AttestationError]
    wrong_type: type[verdict.AttestationError]
    bad_signature: type[verdict.AttestationError]
    nonce_mismatch: type[verdict.AttestationError]


CERTIFY = AttestKind("certify_info", TPM2_ST.ATTEST_CERTIFY, verdict.CertifyBadMagic,
                     verdict.CertifyWrongType, verdict.CertifyBadSignature,
                     verdict.CertifyNonceMismatch)  # fmt: skip
# TPM2_CertifyCreation (Part 3 18.3) proves the same thing for a key this TPM created: the
# TPM signs only after checking its own creation ticket over (creationHash, objectName).
# tpm2-tools 5.4's tpm2_certify cannot pass qualifyingData; tpm2_certifycreation -q can.
CERTIFY_CREATION = dataclasses.replace(CERTIFY, attest_type=TPM2_ST.ATTEST_CREATION)


def verify_attest(
    kind: AttestKind, attest: bytes, signature: bytes, ak_public: bytes, nonce: bytes
) -> TPMS_ATTEST:
    """The checks every TPMS_ATTEST gets: AK, magic, type, signature, extraData == nonce."""
    ak = check_ak_public(ak_public)
    parsed_signature = parse_signature(signature, kind.field.replace("_info", "_signature"))
    magic, attest_type = attest_header(attest, kind.field)
    if magic != TPM_GENERATED_VALUE:
        raise kind.bad_magic(detail=f"{kind.field} magic 0x{magic:08x}")
    if attest_type != kind.attest_type:
        raise kind.wrong_type(detail=f"{kind.field} type 0x{attest_type:04x}, "
                                     f"expected 0x{int(kind.attest_type):04x}")  # fmt: skip
    parsed = parse_attest(attest, kind.field)
    problem = signature_problem(parsed_signature, ak, attest)
    if problem:
        raise kind.bad_signature(detail=f"{kind.field}: {problem} "
                                        f"(AK {object_name(ak).hex()})")  # fmt: skip
    extra_data = bytes(parsed.extraData)
    if not hmac.compare_digest(extra_data, nonce):
        raise kind.nonce_mismatch(detail=f"{kind.field} extraData {extra_data.hex()}, "
                                         f"issued nonce {nonce.hex()}")  # fmt: skip
    return parsed


def check_device_key_attributes(device_key: TPMT_PUBLIC) -> None:
    """fixedTPM, fixedParent, sensitiveDataOrigin, sign; not decrypt, not restricted.

    An imported or duplicable key has fixedTPM clear (Part 3 13.3 TPM2_Import refuses
    fixedTPM objects); a loaded external key cannot have fixedTPM either (Part 3 12.3).
    """
    attributes = device_key.objectAttributes
    if (attributes & DEVICE_KEY_REQUIRED_ATTRIBUTES) != DEVICE_KEY_REQUIRED_ATTRIBUTES or (
        attributes & DEVICE_KEY_FORBIDDEN_ATTRIBUTES
    ):
        raise verdict.KeyAttributes(detail=f"device key objectAttributes {attributes!s}")


def verify_certify(
    certify_info: bytes, signature: bytes, ak_public: bytes, nonce: bytes,
    device_key_public: bytes,
) -> TPMS_ATTEST:  # fmt: skip
    """TPM2_Certify evidence that ``device_key_public`` is a TPM-bound key (Part 3 18.2).

    A TPMS_ATTEST of type TPM_ST_ATTEST_CREATION (TPM2_CertifyCreation, Part 3 18.3) is
    accepted the same way: its objectName plays the role of the certified Name.

    ``certify_info`` is the marshalled TPMS_ATTEST (``tpm2_certifycreation --attestation``;
    tpm2-tools 5.4's tpm2_certify cannot take a nonce), ``signature`` a TPMT_SIGNATURE by
    the AK, ``nonce`` the server's fresh qualifyingData, and
    ``device_key_public`` the device key's TPM2B_PUBLIC. The certified Name must equal
    nameAlg || H(device key TPMT_PUBLIC), so its attributes are the TPM's, not a claim.
    """
    _, attest_type = attest_header(certify_info, CERTIFY.field)
    creation = attest_type == TPM2_ST.ATTEST_CREATION
    kind = CERTIFY_CREATION if creation else CERTIFY
    attest = verify_attest(kind, certify_info, signature, ak_public, nonce)
    device_key = parse_public(device_key_public, "device_key_public")
    certified_name = bytes(attest.attested.creation.objectName if creation
                           else attest.attested.certify.name)
    expected_name = object_name(device_key)
    if not hmac.compare_digest(certified_name, expected_name):
        raise verdict.CertifyNameMismatch(detail=f"certified name {certified_name.hex()}, "
                                                 f"device key name {expected_name.hex()}")
    check_device_key_attributes(device_key)
    public_key(device_key, "device_key_public")
    return attest


def check_csr_key(device_key_public: bytes, csr_public_key: PublicKeyTypes) -> None:
    """The CSR's SubjectPublicKeyInfo is exactly the certified device key."""
    device_key = spki_der(public_key(parse_public(device_key_public, "device_key_public"),
                                     "device_key_public"))  # fmt: skip
    if not isinstance(csr_public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey) or (
        not hmac.compare_digest(spki_der(csr_public_key), device_key)
    ):
        raise verdict.CsrKeyMismatch(detail=f"CSR key type {type(csr_public_key).__name__} "
                                            "differs from the certified device key")
