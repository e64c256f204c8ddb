"""The AK challenge: TPM2_MakeCredential done in software, and its one-time checks.

The server encrypts a fresh secret to the EK, bound to the AK's Name (TPM 2.0 Part 1 24,
"Credential Protection"; Part 3 12.6 TPM2_MakeCredential). Only the TPM that holds the
EK private key, and only when the AK with exactly that Name is loaded in it, recovers the
secret with TPM2_ActivateCredential (Part 3 12.5): the TPM checks the HMAC over the
encrypted credential and the Name before it decrypts. So a correct secret proves the AK
lives in the same TPM as the certified EK. A credential made for another AK's name makes
the TPM fail with TPM_RC_INTEGRITY; the device then has no secret to return.

Wire format: ``id_object`` is a marshalled TPM2B_ID_OBJECT and ``encrypted_secret`` a
marshalled TPM2B_ENCRYPTED_SECRET (Part 2 12.4.3, 11.4.33), both size-prefixed.
``to_tools_credential`` wraps them in the file tpm2-tools 5.4 ``tpm2_makecredential -o``
writes and ``tpm2_activatecredential -i`` reads: ``BADCC0DE`` magic, version 1 (4 bytes
each, big endian), TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets

from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import TPM2B_ENCRYPTED_SECRET, TPM2B_ID_OBJECT, TPM2B_NAME
from tpm2_pytss.utils import credential_to_tools, make_credential

from enroll_server.attestation.ek import check_ek_attributes
from enroll_server.attestation.tpm_structs import (
    check_name_format,
    marshal_public,
    parse_public,
)
from enroll_server.attestation.verdict import (
    ChallengeExpired,
    ChallengeReused,
    ChallengeUnknown,
    MalformedEvidence,
    WrongSecret,
)

SECRET_SIZE = 32  # a TPM2B_DIGEST; 32 bytes fits every TPM (sizeof(TPMU_HA) >= 32)
NONCE_SIZE = 32  # TPM2B_DATA qualifyingData; a TPM accepts up to sizeof(TPMT_HA)


def new_secret() -> bytes:
    """A fresh credential secret from the OS CSPRNG."""
    return secrets.token_bytes(SECRET_SIZE)


def new_nonce() -> bytes:
    """A fresh nonce for TPM2_Certify / TPM2_Quote qualifyingData."""
    return secrets.token_bytes(NONCE_SIZE)


def make_credential_challenge(
    ek_public: bytes, ak_name: bytes, secret: bytes
) -> tuple[bytes, bytes]:
    """(TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET) that only the EK's TPM with the AK opens.

    ``ek_public`` is the EK's marshalled TPM2B_PUBLIC (the EK's nameAlg and symmetric
    parameters drive the KDFs, Part 1 24.4/24.5), ``ak_name`` the AK's Name as computed by
    the server from the AK public area, ``secret`` 16..32 bytes. Needs no TPM.
    """
    public = parse_public(ek_public, "ek_public")
    # Only a restricted decryption key (an EK) opens the blob solely through
    # TPM2_ActivateCredential, which checks the AK Name; an unrestricted decryption key
    # would let software recover the seed without the AK (Part 1 24.1).
    check_ek_attributes(public)
    check_name_format(ak_name, "ak_name")
    if not isinstance(secret, bytes) or not 16 <= len(secret) <= SECRET_SIZE:
        raise ValueError("the credential secret must be 16..32 bytes")
    try:
        id_object, encrypted_secret = make_credential(public, secret, TPM2B_NAME(ak_name))
    except (ValueError, TypeError, TSS2_Exception) as exc:
        # e.g. an EK without a symmetric algorithm: not a storage/endorsement key
        raise MalformedEvidence("ek_public", "cannot make a credential for this key",
                                detail=f"make_credential({marshal_public(public).hex()}): {exc}"
                                ) from exc  # fmt: skip
    return id_object.marshal(), encrypted_secret.marshal()


def to_tools_credential(id_object: bytes, encrypted_secret: bytes) -> bytes:
    """The ``tpm2_activatecredential -i`` file holding the two marshalled TPM2Bs."""
    id_value, id_used = TPM2B_ID_OBJECT.unmarshal(id_object)
    secret_value, secret_used = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
    if id_used != len(id_object) or secret_used != len(encrypted_secret):
        raise ValueError("id_object / encrypted_secret must be exactly one marshalled TPM2B")
    return credential_to_tools(id_value, secret_value)


def check_activated_secret(expected: bytes, received: bytes) -> None:
    """The secret the device recovered with TPM2_ActivateCredential; constant time.

    The detail names only the received length and a short fingerprint of the expected
    secret, never the secret itself (it is single-use, but audit logs outlive it).
    """
    if not isinstance(received, bytes) or not hmac.compare_digest(expected, received):
        fingerprint = hashlib.sha256(b"credential-secret:" + expected).hexdigest()[:16]
        size = len(received) if isinstance(received, bytes) else "non-bytes"
        raise WrongSecret(detail=f"activated secret ({size} bytes) does not match the "
                                 f"challenge secret (fingerprint {fingerprint})")  # fmt: skip


def check_challenge(
    expires_at: dt.datetime | None, consumed: bool, now: dt.datetime, *, challenge_id: str = ""
) -> None:
    """Single use, short TTL: ``expires_at`` None means no such challenge was issued.

    The caller looks the challenge up (and marks it consumed in the same transaction);
    this only decides. A reused challenge is reported as reused even when also expired.
    """
    if expires_at is None:
        raise ChallengeUnknown(detail=f"challenge {challenge_id!r} not found")
    if consumed:
        raise ChallengeReused(detail=f"challenge {challenge_id!r} already used")
    if now >= expires_at:
        raise ChallengeExpired(detail=f"challenge {challenge_id!r} expired at {expires_at}, "
                                      f"now {now}")  # fmt: skip
