"""Recorded evidence (tests/data/attestation) verifies with no TPM at all.

The ``ecc`` and ``rsa`` sets were made by swtpm through tpm2-pytss ESAPI
(tests/test_attestation_live.py), the ``tpm2-tools`` set by the tpm2-tools 5.4 binaries
(tests/test_attestation_tools.py). ``now`` is fixed inside the EK chain's validity.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509
from tpm2_pytss.utils import tools_to_credential

from enroll_server.attestation import (
    credential,
    ek,
    quote,
    tpm_structs,
    verdict,
    verify,
)
from tests.test_attestation_tools import check_tools_files

DATA = Path(__file__).parent / "data" / "attestation"


def load_set(kind: str) -> tuple[dict[str, bytes], dict[str, object]]:
    files = {path.stem: path.read_bytes() for path in (DATA / kind).glob("*.bin")}
    return files, json.loads((DATA / kind / "manifest.json").read_text())


def manufacturer() -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    roots = x509.load_pem_x509_certificates((DATA / "manufacturer-root.pem").read_bytes())
    return roots, x509.load_pem_x509_certificates((DATA / "manufacturer-ek-ca.pem").read_bytes())


@pytest.mark.parametrize("kind", ["ecc", "rsa"])
def test_recorded_evidence_verifies_without_a_tpm(kind: str) -> None:
    files, manifest = load_set(kind)
    now = dt.datetime.fromisoformat(str(manifest["now"]))
    roots, intermediates = manufacturer()
    certificate = ek.load_ek_certificate(files["ek_certificate"])
    assert ek.verify_ek_certificate(certificate, roots, intermediates, now=now)[-1] == roots[0]
    ek.check_ek_public(files["ek_public"], certificate)
    assert tpm_structs.ek_identity(files["ek_public"]) == manifest["ek_identity"]
    ak = verify.check_ak_public(files["ak_public"])
    assert tpm_structs.object_name(ak).hex() == manifest["ak_name"]
    verify.check_ak_name(files["ak_public"], bytes.fromhex(str(manifest["ak_name"])))
    credential.check_activated_secret(bytes.fromhex(str(manifest["secret"])),
                                      bytes.fromhex(str(manifest["activated_secret"])))
    nonce = bytes.fromhex(str(manifest["nonce"]))
    verify.verify_certify(files["certify_info"], files["certify_signature"], files["ak_public"],
                          nonce, files["device_key_public"])  # fmt: skip
    verify.check_csr_key(files["device_key_public"],
                         x509.load_der_x509_csr(files["csr"]).public_key())
    policy = quote.pcr_policy_from_json(manifest["pcr_policy"])  # type: ignore[arg-type]
    result = quote.verify_quote(files["quote_info"], files["quote_signature"],
                                files["ak_public"], nonce, policy)  # fmt: skip
    assert result.selection == (("sha256", (0, 1, 2, 7)),)
    # the challenge blobs convert to the tpm2-tools credential file and back
    id_object, secret = tools_to_credential(
        credential.to_tools_credential(files["id_object"], files["encrypted_secret"]))
    assert (id_object.marshal(), secret.marshal()) == (files["id_object"],
                                                       files["encrypted_secret"])


@pytest.mark.parametrize("kind", ["ecc", "rsa"])
def test_recorded_ek_chain_is_refused_outside_its_validity(kind: str) -> None:
    files, manifest = load_set(kind)
    roots, intermediates = manufacturer()
    certificate = ek.load_ek_certificate(files["ek_certificate"])
    for now in (roots[0].not_valid_after_utc + dt.timedelta(seconds=1),
                certificate.not_valid_before_utc - dt.timedelta(seconds=1)):  # fmt: skip
        with pytest.raises(verdict.EkExpired):
            ek.verify_ek_certificate(certificate, roots, intermediates, now=now)


def test_recorded_evidence_of_one_kind_does_not_verify_as_the_other() -> None:
    ecc, ecc_manifest = load_set("ecc")
    rsa, _ = load_set("rsa")
    nonce = bytes.fromhex(str(ecc_manifest["nonce"]))
    with pytest.raises(verdict.CertifyBadSignature):
        verify.verify_certify(ecc["certify_info"], ecc["certify_signature"], rsa["ak_public"],
                              nonce, ecc["device_key_public"])  # fmt: skip
    with pytest.raises(verdict.EkPublicMismatch):
        ek.check_ek_public(ecc["ek_public"], ek.load_ek_certificate(rsa["ek_certificate"]))


def test_recorded_tpm2_tools_files_verify() -> None:
    """Files exactly as tpm2-tools 5.4 wrote them (createek/createak -u, certify -o/-s, ...)."""
    manifest = json.loads((DATA / "tpm2-tools" / "manifest.json").read_text())
    check_tools_files(DATA / "tpm2-tools", manifest)
    blob = (DATA / "tpm2-tools" / "credential.bin").read_bytes()
    assert blob[:8] == bytes.fromhex("badcc0de00000001")  # tpm2_activatecredential -i
