"""Strict unmarshalling, names, keys, PCR helpers and error codes (pure, no TPM)."""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC

from enroll_server.attestation import credential, quote, tpm_structs, verdict, verify
from enroll_server.errors import EnrollError

DATA = Path(__file__).parent / "data" / "attestation"
TOOLS = DATA / "tpm2-tools"


def tools_file(name: str) -> bytes:
    return (TOOLS / name).read_bytes()


def test_public_area_parses_as_tpm2b_or_bare_tpmt_with_the_tpm_name() -> None:
    ak_public = tools_file("ak.pub")  # tpm2_createak -u: TPM2B_PUBLIC
    public = tpm_structs.parse_public(ak_public)
    assert tpm_structs.parse_public(ak_public[2:]).marshal() == public.marshal()
    assert tpm_structs.object_name(public) == tools_file("ak.name")  # tpm2_createak -n
    assert tpm_structs.marshal_public(public) == ak_public


@pytest.mark.parametrize(("name", "parse"), [
    ("ak.pub", tpm_structs.parse_public),
    ("ek.pub", tpm_structs.parse_public),
    ("certify_info.bin", tpm_structs.parse_attest),
    ("quote_info.bin", tpm_structs.parse_attest),
    ("certify_signature.bin", tpm_structs.parse_signature),
])  # fmt: skip
def test_truncated_or_extended_structures_are_malformed(name: str, parse) -> None:  # type: ignore[no-untyped-def]
    data = tools_file(name)
    parse(data)
    for cut in range(len(data)):
        with pytest.raises(verdict.MalformedEvidence) as refused:
            parse(data[:cut])
        assert refused.value.status == 400 and refused.value.code == "evidence.malformed"
    with pytest.raises(verdict.MalformedEvidence, match="trailing"):
        parse(data + b"\x00")


def test_tpm2b_size_not_matching_its_content_is_malformed() -> None:
    """libtss2 does not check a TPM2B_PUBLIC size against the TPMT_PUBLIC it wraps."""
    ek_public = tools_file("ek.pub")
    inflated = (len(ek_public)).to_bytes(2, "big") + ek_public[2:] + b"\x00\x00"
    inflated = (len(inflated) - 2).to_bytes(2, "big") + inflated[2:]
    assert TPM2B_PUBLIC.unmarshal(inflated)[1] == len(ek_public)  # the library stops early
    with pytest.raises(verdict.MalformedEvidence):
        tpm_structs.parse_public(inflated)


def test_tpm2b_size_smaller_than_its_content_is_malformed() -> None:
    ek_public = tools_file("ek.pub")
    deflated = (len(ek_public) - 12).to_bytes(2, "big") + ek_public[2:]
    assert TPM2B_PUBLIC.unmarshal(deflated)[1] == len(ek_public)  # size field ignored
    with pytest.raises(verdict.MalformedEvidence, match="non-canonical"):
        tpm_structs.parse_public(deflated)


@pytest.mark.parametrize("change", ["restricted", "sign", "fixedTPM", "fixedParent",
                                    "sensitiveDataOrigin", "userWithAuth", "+decrypt"])
def test_ak_public_missing_one_attribute_is_refused(change: str) -> None:
    ak = tpm_structs.parse_public(tools_file("ak.pub"))  # restricted ECDSA-SHA256 AK
    verify.check_ak_public(tpm_structs.marshal_public(ak))
    bit = {"restricted": TPMA_OBJECT.RESTRICTED, "sign": TPMA_OBJECT.SIGN_ENCRYPT,
           "fixedTPM": TPMA_OBJECT.FIXEDTPM, "fixedParent": TPMA_OBJECT.FIXEDPARENT,
           "sensitiveDataOrigin": TPMA_OBJECT.SENSITIVEDATAORIGIN,
           "userWithAuth": TPMA_OBJECT.USERWITHAUTH, "+decrypt": TPMA_OBJECT.DECRYPT}[change]
    ak.objectAttributes ^= bit
    with pytest.raises(verdict.AkAttributes) as refused:
        verify.check_ak_public(tpm_structs.marshal_public(ak))
    assert refused.value.code == "ak.attributes" and refused.value.status == 403


def test_ak_with_unusable_scheme_is_refused() -> None:
    ak = tpm_structs.parse_public(tools_file("ak.pub"))
    ak.parameters.eccDetail.scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA1
    with pytest.raises(verdict.AkAttributes, match="not usable"):
        verify.check_ak_public(tpm_structs.marshal_public(ak))


def test_malformed_public_message_names_the_field_only() -> None:
    with pytest.raises(verdict.MalformedEvidence) as refused:
        tpm_structs.parse_public(b"\x00\x05abc", "device_key_public")
    assert "device_key_public" in refused.value.public
    assert refused.value.field == "device_key_public"


@pytest.mark.parametrize("name", ["certify_info.bin", "certify_signature.bin", "ak.pub",
                                  "device_key.pub"])  # fmt: skip
def test_mutated_certify_evidence_only_ever_raises_attestation_errors(name: str) -> None:
    """Bit flips anywhere: always a typed refusal, never another exception, never accepted.

    The AK public is bound by its Name (the credential challenge), so the server's
    sequence check_ak_name -> verify_certify is what is fuzzed: a flip in an AK attribute
    the signature does not depend on changes the Name.
    """
    files = {n: tools_file(n) for n in ("certify_info.bin", "certify_signature.bin", "ak.pub",
                                        "device_key.pub", "ak.name")}  # fmt: skip
    generator = random.Random(name)
    codes = set()
    for _ in range(300):
        mutated = bytearray(files[name])
        for bit in generator.sample(range(8 * len(mutated)), generator.randint(1, 3)):
            mutated[bit // 8] ^= 1 << (bit % 8)  # distinct bits: never the original again
        evidence = {**files, name: bytes(mutated)}
        with pytest.raises(verdict.AttestationError) as refused:
            verify.check_ak_name(evidence["ak.pub"], files["ak.name"])
            verify.verify_certify(evidence["certify_info.bin"], evidence["certify_signature.bin"],
                                  evidence["ak.pub"], bytes.fromhex("00ff55aa"),
                                  evidence["device_key.pub"])  # fmt: skip
        codes.add(refused.value.code)
    assert codes - {"evidence.malformed"}, codes  # not everything is "malformed"


def test_weak_or_off_curve_keys_are_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    template = TPM2B_PUBLIC.parse("rsa1024:rsassa-sha256:null",
                                  objectAttributes=TPMA_OBJECT.SIGN_ENCRYPT)
    template.publicArea.unique.rsa = weak.public_numbers().n.to_bytes(128, "big")
    with pytest.raises(verdict.MalformedEvidence):
        tpm_structs.public_key(template.publicArea)
    device_key = tpm_structs.parse_public(tools_file("device_key.pub"))
    device_key.unique.ecc.y = bytes(32)
    with pytest.raises(verdict.MalformedEvidence) as refused:
        tpm_structs.public_key(device_key)
    assert "not a valid public key" in refused.value.public
    sha1_named = tpm_structs.parse_public(tools_file("device_key.pub"))
    sha1_named.nameAlg = TPM2_ALG.SHA1
    with pytest.raises(verdict.MalformedEvidence, match="nameAlg"):
        tpm_structs.parse_public(tpm_structs.marshal_public(sha1_named))


def test_name_format_is_checked() -> None:
    name = tools_file("ak.name")
    assert tpm_structs.check_name_format(name) == name
    for bad in (name[:-1], b"\x00\x04" + bytes(20), b"", name + b"\x00"):
        with pytest.raises(verdict.MalformedEvidence):
            tpm_structs.check_name_format(bad)


def test_pcr_digest_matches_tpm2_quote_known_answer() -> None:
    """tpm2_quote printed calcDigest 38723a2e... for sha256:0,1,2,7 all zero (swtpm)."""
    zeros = {"sha256": dict.fromkeys((0, 1, 2, 7), bytes(32))}
    digest = quote.pcr_digest((("sha256", (0, 1, 2, 7)),), zeros, hashes.SHA256())
    assert digest.hex() == "38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca"


def test_golden_policy_from_tpm2_pcrread_round_trips_through_json() -> None:
    reference = quote.parse_tpm2_pcrread((TOOLS / "pcrread.yaml").read_text())
    policy = quote.golden_pcr_policy(reference, {"sha256": [7, 0, 1, 2]})
    assert list(policy["sha256"]) == [0, 1, 2, 7]
    document = quote.pcr_policy_to_json(policy)
    assert document["sha256"]["0"] == reference["sha256"][0].hex()
    assert quote.pcr_policy_from_json(document) == policy
    for bad in ({"sha256": [16]}, {}):
        with pytest.raises(ValueError):
            quote.golden_pcr_policy(reference, bad)
    with pytest.raises(ValueError):
        quote.pcr_policy_from_json({"sha256": {"0": "00"}})  # wrong digest size
    with pytest.raises(ValueError):
        quote.parse_tpm2_pcrread("sha256:\n  0 : zz\n")


def test_challenge_state_checks() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    later = now + dt.timedelta(minutes=5)
    credential.check_challenge(later, False, now)
    for expires_at, consumed, error in ((None, False, verdict.ChallengeUnknown),
                                        (later, True, verdict.ChallengeReused),
                                        (now - dt.timedelta(seconds=1), True,
                                         verdict.ChallengeReused),
                                        (now, False, verdict.ChallengeExpired)):  # fmt: skip
        with pytest.raises(error):
            credential.check_challenge(expires_at, consumed, now, challenge_id="c1")


def test_make_credential_refuses_bad_inputs() -> None:
    ek_public, ak_name = tools_file("ek.pub"), tools_file("ak.name")
    id_object, encrypted_secret = credential.make_credential_challenge(ek_public, ak_name,
                                                                       bytes(32))
    assert int.from_bytes(id_object[:2], "big") == len(id_object) - 2  # TPM2B_ID_OBJECT
    assert int.from_bytes(encrypted_secret[:2], "big") == len(encrypted_secret) - 2
    with pytest.raises(ValueError):
        credential.make_credential_challenge(ek_public, ak_name, bytes(8))
    with pytest.raises(verdict.MalformedEvidence):
        credential.make_credential_challenge(ek_public, ak_name[:-1], bytes(32))
    signing_key = tools_file("ak.pub")  # a restricted signing key is not an EK
    with pytest.raises(verdict.EkAttributes):
        credential.make_credential_challenge(signing_key, ak_name, bytes(32))
    unrestricted = tpm_structs.parse_public(ek_public)
    unrestricted.objectAttributes &= ~TPMA_OBJECT.RESTRICTED  # software could open it
    with pytest.raises(verdict.EkAttributes):
        credential.make_credential_challenge(tpm_structs.marshal_public(unrestricted), ak_name,
                                             bytes(32))  # fmt: skip


def test_error_codes_are_stable_unique_and_map_to_403_or_400() -> None:
    classes = [c for c in vars(verdict).values()
               if isinstance(c, type) and issubclass(c, verdict.AttestationError)]  # fmt: skip
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes))
    assert all(issubclass(c, EnrollError) for c in classes)
    assert {c.code for c in classes if c.status == 400} == {"evidence.malformed"}
    assert {"ek.untrusted", "ek.expired", "ek.public_mismatch", "ek.not_allowlisted",
            "ak.attributes", "ak.name_mismatch", "challenge.unknown", "challenge.expired",
            "challenge.reused", "credential.wrong_secret", "certify.bad_magic",
            "certify.wrong_type", "certify.bad_signature", "certify.nonce_mismatch",
            "certify.name_mismatch", "key.attributes", "csr.key_mismatch", "quote.bad_magic",
            "quote.wrong_type", "quote.bad_signature", "quote.nonce_mismatch",
            "quote.pcr_selection", "quote.pcr_mismatch"} <= set(codes)  # fmt: skip
    error = verdict.CertifyNonceMismatch(detail="extraData 00, issued nonce 11")
    assert error.finding == verdict.Finding("certify.nonce_mismatch", error.detail)
    assert "11" not in error.public


def test_ek_identity_is_sha256_of_spki() -> None:
    ek_public = tools_file("ek.pub")
    key = tpm_structs.public_key(tpm_structs.parse_public(ek_public))
    expected = hashlib.sha256(tpm_structs.spki_der(key)).hexdigest()
    assert tpm_structs.ek_identity(ek_public) == expected
