"""The verifier against real evidence from swtpm, made through tpm2-pytss ESAPI.

One private swtpm per module. ``collect_evidence`` (tests/support/tpm_evidence.py) runs
the device side of the protocol (EK, AK under the EK, device key under an SRK, credential
activation, TPM2_Certify with the server nonce, TPM2_Quote over sha256:0,1,2,7, a CSR
signed in the TPM); the tests verify it and then change it one way at a time. Without a
resource manager swtpm holds 3 transient objects: every helper flushes what it loads.

Regenerate the recorded evidence under tests/data/attestation with
``.venv/bin/python -m tests.test_attestation_live tests/data/attestation``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss.constants import TPM2_ALG, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMS_PCR_SELECTION,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF_OBJECT,
)
from tpm2_pytss.utils import wrap

from enroll_server.attestation import (
    credential,
    ek,
    quote,
    tpm_structs,
    verdict,
    verify,
)
from tests.support.tpm_evidence import (
    AK_ATTRIBUTES,
    DEVICE_KEY_ATTRIBUTES,
    KEY_BASE,
    PCRS,
    Evidence,
    Tpm,
    ak_template_for,
    collect_evidence,
    ecc_template,
    provisioned_tpm,
    rsa_template,
)
from tests.test_attestation_ek import EkPki

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker


@pytest.fixture(scope="module")
def pki() -> EkPki:
    return EkPki("ecc")


@pytest.fixture(scope="module")
def tpm() -> Iterator[Tpm]:
    with provisioned_tpm() as device:
        yield device


@pytest.fixture(scope="module")
def evidence(tpm: Tpm, pki: EkPki) -> dict[str, Evidence]:
    return {kind: collect_evidence(tpm, kind, pki) for kind in ("ecc", "rsa")}


@pytest.fixture(scope="module")
def other_ak(tpm: Tpm) -> tuple[str, tuple[bytes, bytes]]:
    """A second genuine AK in the same TPM (restricted ECDSA under the ECC EK)."""
    return "ecc", tpm.create_under_ek("ecc", ak_template_for("ecc"))


def assert_refused(error: verdict.AttestationError, code: str, *hidden: bytes) -> None:
    """The stable code, 403, and no expected value (hex) in the public text."""
    assert error.code == code, error.detail
    assert error.status == 403
    for value in hidden:
        assert value.hex() not in error.public
        assert value.hex().upper() not in error.public


# -- the positive path -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ecc", "rsa"])
def test_genuine_tpm_evidence_is_accepted(evidence: dict[str, Evidence], pki: EkPki,
                                          kind: str) -> None:  # fmt: skip
    run = evidence[kind]
    certificate = ek.load_ek_certificate(run.ek_certificate)
    now = dt.datetime.now(dt.UTC)
    assert ek.verify_ek_certificate(certificate, [pki.root], [pki.ek_ca], now=now)[-1] == pki.root
    ek.check_ek_public(run.ek_public, certificate)
    assert tpm_structs.ek_identity(run.ek_public) == tpm_structs.key_identity(
        certificate.public_key())
    credential.check_activated_secret(run.secret, run.activated_secret)
    attest = verify.verify_certify(run.certify_info, run.certify_signature, run.ak_public,
                                   run.nonce, run.device_key_public)  # fmt: skip
    assert attest.type == TPM2_ST.ATTEST_CERTIFY
    csr = x509.load_der_x509_csr(run.csr)
    assert csr.is_signature_valid
    verify.check_csr_key(run.device_key_public, csr.public_key())
    result = quote.verify_quote(run.quote_info, run.quote_signature, run.ak_public, run.nonce,
                                run.pcr_policy)  # fmt: skip
    assert result.selection == (("sha256", (0, 1, 2, 7)),)
    certify_clock = tpm_structs.clock_info(attest)
    assert result.clock.reset_count == certify_clock.reset_count  # same TPM boot
    assert result.clock.clock >= certify_clock.clock > 0
    quote.check_reset_count(certify_clock.reset_count, result.clock)


def test_rsa_pss_ak_signatures_verify(tpm: Tpm, evidence: dict[str, Evidence]) -> None:
    run = evidence["ecc"]
    pss_ak = ("rsa", tpm.create_under_ek("rsa", rsa_template(AK_ATTRIBUTES, "rsapss-sha256")))
    info, signature = tpm.certify(pss_ak, run.device_key, run.nonce)
    verify.verify_certify(info, signature, pss_ak[1][1], run.nonce, run.device_key_public)


def test_credential_file_for_tpm2_tools_round_trips(evidence: dict[str, Evidence]) -> None:
    from tpm2_pytss.utils import tools_to_credential

    run = evidence["ecc"]
    blob = credential.to_tools_credential(run.id_object, run.encrypted_secret)
    assert blob[:8] == bytes.fromhex("badcc0de00000001")
    id_object, secret = tools_to_credential(blob)
    assert (id_object.marshal(), secret.marshal()) == (run.id_object, run.encrypted_secret)


# -- the negative corpus: each changed one way -------------------------------------------------


def test_wrong_activated_secret_is_refused(evidence: dict[str, Evidence]) -> None:
    run = evidence["ecc"]
    with pytest.raises(verdict.WrongSecret) as refused:
        credential.check_activated_secret(run.secret, os.urandom(32))
    assert_refused(refused.value, "credential.wrong_secret", run.secret)
    assert run.secret.hex() not in refused.value.detail


def test_challenge_for_another_ak_cannot_be_activated(
    tpm: Tpm, evidence: dict[str, Evidence], other_ak: tuple[str, tuple[bytes, bytes]]
) -> None:
    run = evidence["ecc"]
    other_name = tpm_structs.object_name(tpm_structs.parse_public(other_ak[1][1]))
    id_object, encrypted_secret = credential.make_credential_challenge(
        run.ek_public, other_name, run.secret)
    with pytest.raises(TSS2_Exception) as tpm_error:  # TPM_RC_INTEGRITY: name is in the HMAC
        tpm.activate("ecc", (run.ak_private, run.ak_public), id_object, encrypted_secret)
    assert tpm_error.value.rc & 0xBF == 0x9F  # TPM_RC_INTEGRITY (0x09F), any parameter
    with pytest.raises(verdict.AkNameMismatch) as refused:
        verify.check_ak_name(run.ak_public, other_name)
    assert_refused(refused.value, "ak.name_mismatch", other_name)


@pytest.mark.parametrize(("attributes", "scheme"), [
    (DEVICE_KEY_ATTRIBUTES, TPM2_ALG.ECDSA),  # unrestricted signing key, ECDSA-SHA256
    (KEY_BASE | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.DECRYPT, TPM2_ALG.NULL),  # sign+decrypt
], ids=["not-restricted", "decrypt"])  # fmt: skip
def test_ak_without_restricted_or_with_decrypt_is_refused(
    tpm: Tpm, evidence: dict[str, Evidence], attributes: int, scheme: int
) -> None:
    run = evidence["ecc"]
    weak_ak = ("srk", tpm.create_under_srk(ecc_template(attributes, scheme)))
    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
    scheme.details.any.hashAlg = TPM2_ALG.SHA256
    info, signature = tpm.certify(weak_ak, run.device_key, run.nonce, scheme)
    with pytest.raises(verdict.AkAttributes) as refused:
        verify.verify_certify(info, signature, weak_ak[1][1], run.nonce, run.device_key_public)
    assert_refused(refused.value, "ak.attributes")


def test_certify_signed_by_a_different_ak_is_refused(
    tpm: Tpm, evidence: dict[str, Evidence], other_ak: tuple[str, tuple[bytes, bytes]]
) -> None:
    run = evidence["ecc"]
    info, signature = tpm.certify(other_ak, run.device_key, run.nonce)
    verify.verify_certify(info, signature, other_ak[1][1], run.nonce, run.device_key_public)
    with pytest.raises(verdict.CertifyBadSignature) as refused:
        verify.verify_certify(info, signature, run.ak_public, run.nonce, run.device_key_public)
    assert_refused(refused.value, "certify.bad_signature")
    with pytest.raises(verdict.CertifyBadSignature):  # RSA signature, ECC AK
        verify.verify_certify(run.certify_info, evidence["rsa"].certify_signature,
                              run.ak_public, run.nonce, run.device_key_public)  # fmt: skip


def test_certify_with_another_nonce_is_refused(tpm: Tpm, evidence: dict[str, Evidence]) -> None:
    run = evidence["ecc"]
    info, signature = tpm.certify(run.ak, run.device_key, credential.new_nonce())
    with pytest.raises(verdict.CertifyNonceMismatch) as refused:
        verify.verify_certify(info, signature, run.ak_public, run.nonce, run.device_key_public)
    assert_refused(refused.value, "certify.nonce_mismatch", run.nonce)
    assert run.nonce.hex() in refused.value.detail


def _remarshal(attest_bytes: bytes, **changes: int) -> bytes:
    attest = TPMS_ATTEST.unmarshal(attest_bytes)[0]
    for name, value in changes.items():
        setattr(attest, name, value)
    return attest.marshal()


@pytest.mark.parametrize("kind", ["ecc", "rsa"])
def test_certify_info_with_wrong_magic_or_type_is_refused(evidence: dict[str, Evidence],
                                                          kind: str) -> None:  # fmt: skip
    run = evidence[kind]
    forged = _remarshal(run.certify_info, magic=0xFF544348)
    with pytest.raises(verdict.CertifyBadMagic) as refused:
        verify.verify_certify(forged, run.certify_signature, run.ak_public, run.nonce,
                              run.device_key_public)  # fmt: skip
    assert_refused(refused.value, "certify.bad_magic")
    retyped = bytearray(run.certify_info)
    retyped[4:6] = int(TPM2_ST.ATTEST_SESSION_AUDIT).to_bytes(2, "big")
    with pytest.raises(verdict.CertifyWrongType):
        verify.verify_certify(bytes(retyped), run.certify_signature, run.ak_public, run.nonce,
                              run.device_key_public)  # fmt: skip
    # a genuine, correctly signed quote is still not a certification
    with pytest.raises(verdict.CertifyWrongType) as refused:
        verify.verify_certify(run.quote_info, run.quote_signature, run.ak_public, run.nonce,
                              run.device_key_public)  # fmt: skip
    assert_refused(refused.value, "certify.wrong_type")
    with pytest.raises(verdict.QuoteWrongType):
        quote.verify_quote(run.certify_info, run.certify_signature, run.ak_public, run.nonce,
                           run.pcr_policy)  # fmt: skip


def test_certify_of_another_key_than_sent_is_refused(tpm: Tpm, evidence: dict[str, Evidence]
                                                     ) -> None:  # fmt: skip
    run = evidence["ecc"]
    with pytest.raises(verdict.CertifyNameMismatch) as refused:
        verify.verify_certify(run.certify_info, run.certify_signature, run.ak_public, run.nonce,
                              evidence["rsa"].device_key_public)  # fmt: skip
    assert_refused(refused.value, "certify.name_mismatch",
                   tpm_structs.object_name(tpm_structs.parse_public(run.device_key_public)))


def _import_software_key(tpm: Tpm) -> tuple[bytes, bytes]:
    """A P-256 key made in software and imported under the SRK (TPM2_Import, Part 3 13.3)."""
    software = ec.generate_private_key(ec.SECP256R1())
    pem = software.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())  # fmt: skip
    attributes = TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.SIGN_ENCRYPT
    sensitive = TPM2B_SENSITIVE.from_pem(pem)
    public = TPM2B_PUBLIC.from_pem(pem, objectAttributes=attributes)
    with tpm.srk() as srk:
        srk_public = tpm.esapi.read_public(srk)[0].publicArea
        _, duplicate, seed = wrap(srk_public, public, sensitive)
        private = tpm.esapi.import_(srk, b"", public, duplicate, seed,
                                    TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL))  # fmt: skip
    return private.marshal(), public.marshal()


@pytest.mark.parametrize("how", ["imported", "duplicable", "decrypt", "restricted"])
def test_certified_key_that_is_not_tpm_bound_is_refused(
    tpm: Tpm, evidence: dict[str, Evidence], how: str
) -> None:
    run = evidence["ecc"]
    if how == "imported":
        key = ("srk", _import_software_key(tpm))
    elif how == "duplicable":  # TPM generated, but may leave the TPM (TPM2_Duplicate)
        attributes = TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH | (
            TPMA_OBJECT.SIGN_ENCRYPT)  # fmt: skip
        key = ("srk", tpm.create_under_srk(ecc_template(attributes)))
    elif how == "decrypt":
        attributes = DEVICE_KEY_ATTRIBUTES | TPMA_OBJECT.DECRYPT
        key = ("srk", tpm.create_under_srk(ecc_template(attributes)))
    else:
        key = run.ak
    info, signature = tpm.certify(run.ak, key, run.nonce)
    with pytest.raises(verdict.KeyAttributes) as refused:
        verify.verify_certify(info, signature, run.ak_public, run.nonce, key[1][1])
    assert_refused(refused.value, "key.attributes")


def test_csr_with_another_key_than_certified_is_refused(evidence: dict[str, Evidence]) -> None:
    run = evidence["ecc"]
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(verdict.CsrKeyMismatch) as refused:
        verify.check_csr_key(run.device_key_public, other)
    assert_refused(refused.value, "csr.key_mismatch")
    with pytest.raises(verdict.CsrKeyMismatch):
        verify.check_csr_key(run.device_key_public,
                             x509.load_der_x509_csr(evidence["rsa"].csr).public_key())


EMPTY_BANK = TPML_PCR_SELECTION([TPMS_PCR_SELECTION(hash=TPM2_ALG.SHA256, sizeofSelect=3)])


@pytest.mark.parametrize("selection", [TPML_PCR_SELECTION(), EMPTY_BANK, "sha256:0,1",
                                       "sha256:0,1,2+sha1:7"],
                         ids=["no-bank", "empty-bank", "partial", "wrong-bank"])  # fmt: skip
def test_quote_over_no_or_some_policy_pcrs_is_refused(
    tpm: Tpm, evidence: dict[str, Evidence], selection: str | TPML_PCR_SELECTION
) -> None:
    run = evidence["ecc"]
    info, signature = tpm.quote(run.ak, selection, run.nonce)
    with pytest.raises(verdict.QuotePcrSelection) as refused:
        quote.verify_quote(info, signature, run.ak_public, run.nonce, run.pcr_policy)
    assert_refused(refused.value, "quote.pcr_selection")


def test_quote_beyond_policy_needs_the_extra_values(tpm: Tpm, evidence: dict[str, Evidence]
                                                    ) -> None:  # fmt: skip
    run = evidence["ecc"]
    info, signature = tpm.quote(run.ak, "sha256:0,1,2,7,16", run.nonce)
    with pytest.raises(verdict.QuotePcrSelection):
        quote.verify_quote(info, signature, run.ak_public, run.nonce, run.pcr_policy)
    reported = tpm.pcr_values({"sha256": [16]})
    quote.verify_quote(info, signature, run.ak_public, run.nonce, run.pcr_policy, reported)


def test_quote_with_pcrs_off_policy_is_refused(evidence: dict[str, Evidence]) -> None:
    # a TPM of its own, so the extended PCR does not leak into the other tests
    run = evidence["ecc"]
    with provisioned_tpm() as device:
        ak = ("ecc", device.create_under_ek("ecc", ak_template_for("ecc")))
        policy = quote.golden_pcr_policy(device.pcr_values(PCRS), PCRS)
        info, signature = device.quote(ak, "sha256:0,1,2,7", run.nonce)
        quote.verify_quote(info, signature, ak[1][1], run.nonce, policy)
        device.extend(7, b"an unexpected bootloader")
        info, signature = device.quote(ak, "sha256:0,1,2,7", run.nonce)
        reported = device.pcr_values(PCRS)
    with pytest.raises(verdict.QuotePcrMismatch) as refused:
        quote.verify_quote(info, signature, ak[1][1], run.nonce, policy)
    digest = bytes(TPMS_ATTEST.unmarshal(info)[0].attested.quote.pcrDigest)
    assert_refused(refused.value, "quote.pcr_mismatch", digest, policy["sha256"][7])
    with pytest.raises(verdict.QuotePcrMismatch) as refused:
        quote.verify_quote(info, signature, ak[1][1], run.nonce, policy, reported)
    assert "differing PCRs sha256:7" in refused.value.detail


def test_quote_with_another_nonce_or_signer_is_refused(
    tpm: Tpm, evidence: dict[str, Evidence], other_ak: tuple[str, tuple[bytes, bytes]]
) -> None:
    run = evidence["ecc"]
    with pytest.raises(verdict.QuoteNonceMismatch) as refused:
        quote.verify_quote(run.quote_info, run.quote_signature, run.ak_public,
                           credential.new_nonce(), run.pcr_policy)  # fmt: skip
    assert_refused(refused.value, "quote.nonce_mismatch", run.nonce)
    info, signature = tpm.quote(other_ak, "sha256:0,1,2,7", run.nonce)
    with pytest.raises(verdict.QuoteBadSignature):
        quote.verify_quote(info, signature, run.ak_public, run.nonce, run.pcr_policy)
    with pytest.raises(verdict.QuoteBadMagic):
        quote.verify_quote(_remarshal(run.quote_info, magic=0), run.quote_signature,
                           run.ak_public, run.nonce, run.pcr_policy)  # fmt: skip


def test_reset_count_going_backwards_is_refused(evidence: dict[str, Evidence]) -> None:
    run = evidence["rsa"]
    clock = tpm_structs.clock_info(tpm_structs.parse_attest(run.quote_info))
    with pytest.raises(verdict.QuoteResetCount):
        quote.check_reset_count(clock.reset_count + 1, clock)


def test_ek_public_of_another_tpm_key_does_not_match_certificate(
    evidence: dict[str, Evidence]
) -> None:
    certificate = ek.load_ek_certificate(evidence["rsa"].ek_certificate)
    with pytest.raises(verdict.EkPublicMismatch) as refused:
        ek.check_ek_public(evidence["ecc"].ek_public, certificate)
    assert_refused(refused.value, "ek.public_mismatch")


def test_ek_certificate_from_untrusted_or_expired_ca_is_refused(
    evidence: dict[str, Evidence], pki: EkPki
) -> None:
    run = evidence["ecc"]
    ek_key = tpm_structs.public_key(tpm_structs.parse_public(run.ek_public))
    now = dt.datetime.now(dt.UTC)
    untrusted = EkPki("rsa").issue_ek_certificate(ek_key)
    with pytest.raises(verdict.EkUntrusted) as refused:
        ek.verify_ek_certificate(untrusted, [pki.root], [pki.ek_ca], now=now)
    assert_refused(refused.value, "ek.untrusted")
    expired = pki.issue_ek_certificate(ek_key, not_before=now - dt.timedelta(days=800),
                                       not_after=now - dt.timedelta(days=1))  # fmt: skip
    with pytest.raises(verdict.EkExpired) as refused:
        ek.verify_ek_certificate(expired, [pki.root], [pki.ek_ca], now=now)
    assert_refused(refused.value, "ek.expired")


# -- recording ---------------------------------------------------------------------------------


def record(directory: Path) -> None:
    """Write one positive evidence set per kind (+ the test manufacturer CA) to ``directory``."""
    pki = EkPki("ecc")
    now = pki.not_before + dt.timedelta(days=1)
    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    (directory / "manufacturer-root.pem").write_bytes(pki.root.public_bytes(pem))
    (directory / "manufacturer-ek-ca.pem").write_bytes(pki.ek_ca.public_bytes(pem))
    with provisioned_tpm() as tpm:
        for kind in ("ecc", "rsa"):
            run = collect_evidence(tpm, kind, pki)
            target = directory / kind
            target.mkdir(exist_ok=True)
            values = asdict(run)
            for name in ("ak_private", "device_key_private", "kind", "pcr_policy", "nonce",
                         "secret", "activated_secret"):  # fmt: skip
                values.pop(name)
            for name, value in values.items():
                (target / f"{name}.bin").write_bytes(value)
            manifest = {
                "kind": kind, "now": now.isoformat(), "nonce": run.nonce.hex(),
                "secret": run.secret.hex(), "activated_secret": run.activated_secret.hex(),
                "pcr_policy": quote.pcr_policy_to_json(run.pcr_policy),
                "ek_identity": tpm_structs.ek_identity(run.ek_public),
                "ak_name": tpm_structs.object_name(
                    tpm_structs.parse_public(run.ak_public)).hex(),
                "recorded_with": "swtpm 0.7 + tpm2-pytss 3.0.0 ESAPI",
            }  # fmt: skip
            (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    record(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/attestation"))
