"""Pure verification of TPM evidence: bytes in, values or typed errors out.

No Flask, no database, no TPM. The enrollment service orders the calls:

1. ``load_ek_certificate`` + ``verify_ek_certificate`` (or ``check_ek_allowlisted``),
   ``check_ek_public``, ``ek_identity``;
2. ``check_ak_public``, ``object_name`` (AK name), ``make_credential_challenge`` with a
   ``new_secret()``; later ``check_challenge``, ``check_ak_name``,
   ``check_activated_secret``;
3. ``verify_certify`` with the challenge nonce, then ``check_csr_key``;
4. optionally ``verify_quote`` against the group's golden PCR values and
   ``check_reset_count``.

Every refusal is an ``AttestationError`` subclass from ``verdict`` with a stable code.
"""

from enroll_server.attestation.credential import (
    check_activated_secret,
    check_challenge,
    make_credential_challenge,
    new_nonce,
    new_secret,
    to_tools_credential,
)
from enroll_server.attestation.ek import (
    check_ek_allowlisted,
    check_ek_public,
    check_ek_revocation,
    load_ek_certificate,
    load_ek_chain,
    load_ek_crls,
    verify_ek_certificate,
)
from enroll_server.attestation.ek_cert import (
    CertificateProblem,
    EkCertificate,
    load_pem_certificates,
)
from enroll_server.attestation.quote import (
    QuoteResult,
    check_reset_count,
    golden_pcr_policy,
    parse_tpm2_pcrread,
    pcr_policy_from_json,
    pcr_policy_to_json,
    pcr_values_from_pcr_read,
    verify_quote,
)
from enroll_server.attestation.tpm_structs import (
    ClockInfo,
    clock_info,
    ek_identity,
    key_identity,
    object_name,
    parse_attest,
    parse_public,
    parse_signature,
    public_key,
)
from enroll_server.attestation.verdict import AttestationError, Finding, MalformedEvidence
from enroll_server.attestation.verify import (
    check_ak_name,
    check_ak_public,
    check_csr_key,
    check_device_key_attributes,
    verify_certify,
)

__all__ = [
    "AttestationError", "CertificateProblem", "ClockInfo", "EkCertificate", "load_ek_chain",
    "load_pem_certificates", "Finding", "MalformedEvidence", "QuoteResult",
    "check_activated_secret", "check_ak_name", "check_ak_public", "check_challenge",
    "check_csr_key", "check_device_key_attributes", "check_ek_allowlisted",
    "check_ek_public", "check_ek_revocation", "check_reset_count", "clock_info",
    "ek_identity", "load_ek_crls",
    "golden_pcr_policy", "key_identity", "load_ek_certificate", "make_credential_challenge",
    "new_nonce", "new_secret", "object_name", "parse_attest", "parse_public",
    "parse_signature", "parse_tpm2_pcrread", "pcr_policy_from_json", "pcr_policy_to_json",
    "pcr_values_from_pcr_read", "public_key", "to_tools_credential", "verify_certify",
    "verify_ek_certificate", "verify_quote",
]  # fmt: skip
