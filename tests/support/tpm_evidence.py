"""The device side of TPM attestation, straight ESAPI against a private swtpm: the helpers
of tests/test_attestation_live.py (and its recorder of tests/data/attestation).

``swtpm()`` starts one on free ports; ``Tpm`` issues the few TPM commands the tests need;
``collect_evidence`` runs the device side of the protocol (EK, AK under the EK, device key
under an SRK, credential activation, TPM2_Certify with the server nonce, TPM2_Quote over
sha256:0,1,2,7, a CSR signed in the TPM). Without a resource manager swtpm holds 3
transient objects: every helper flushes what it loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE, TPMA_OBJECT
from tpm2_pytss.cryptography import tpm_ecc_private_key, tpm_rsa_private_key
from tpm2_pytss.internal.templates import ek_ecc256, ek_rsa2048
from tpm2_pytss.types import (
    TPM2B_DATA,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMT_HA,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMU_HA,
)

from enroll_server.attestation import credential, quote, tpm_structs, verify
from tests.test_attestation_ek import EkPki, der

PCRS = {"sha256": [0, 1, 2, 7]}
KEY_BASE = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN | (
    TPMA_OBJECT.USERWITHAUTH)  # fmt: skip
AK_ATTRIBUTES = KEY_BASE | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT
DEVICE_KEY_ATTRIBUTES = KEY_BASE | TPMA_OBJECT.SIGN_ENCRYPT
SRK_ATTRIBUTES = KEY_BASE | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.NODA


# -- swtpm ---------------------------------------------------------------------------------


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as ctrl:
            try:
                ctrl.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for swtpm")


@contextlib.contextmanager
def swtpm() -> Iterator[str]:
    """A fresh swtpm on free ports (retried if another process takes them); yields the TCTI."""
    if shutil.which("swtpm") is None:
        raise RuntimeError("swtpm not installed (apt-get install swtpm)")
    state = tempfile.mkdtemp(prefix="attestation-swtpm-")
    process = None
    try:
        for _ in range(5):
            port = _free_port_pair()
            process = subprocess.Popen(
                ["swtpm", "socket", "--tpm2", "--server", f"type=tcp,port={port}",
                 "--ctrl", f"type=tcp,port={port + 1}", "--flags", "not-need-init,startup-clear",
                 "--tpmstate", f"dir={state}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
            deadline = time.monotonic() + 5
            while process.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", port), timeout=0.2
                ):
                    break
                time.sleep(0.02)
            if process.poll() is None:
                yield f"swtpm:port={port}"
                return
        raise RuntimeError("swtpm did not start")
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(timeout=10)
        shutil.rmtree(state, ignore_errors=True)


# -- the device side, straight ESAPI ---------------------------------------------------------


def ecc_template(attributes: int, scheme: int = TPM2_ALG.NULL, *, restricted_decrypt: bool = False
                 ) -> TPM2B_PUBLIC:  # fmt: skip
    symmetric = "aes128cfb" if restricted_decrypt else "null"
    scheme_text = {TPM2_ALG.NULL: "null", TPM2_ALG.ECDSA: "ecdsa-sha256"}[scheme]
    return TPM2B_PUBLIC.parse(f"ecc256:{scheme_text}:{symmetric}", objectAttributes=attributes)


def rsa_template(attributes: int, scheme: str = "rsassa-sha256") -> TPM2B_PUBLIC:
    return TPM2B_PUBLIC.parse(f"rsa2048:{scheme}:null", objectAttributes=attributes)


class Tpm:
    """The few TPM commands the tests need, each flushing what it loads."""

    def __init__(self, esapi: ESAPI) -> None:
        self.esapi = esapi

    @contextlib.contextmanager
    def transient(self, handle: ESYS_TR) -> Iterator[ESYS_TR]:
        try:
            yield handle
        finally:
            self.esapi.flush_context(handle)

    @contextlib.contextmanager
    def ek(self, kind: str) -> Iterator[tuple[ESYS_TR, TPM2B_PUBLIC]]:
        """TPM2_CreatePrimary(endorsement, TCG template L-1 / L-2): deterministic."""
        template = (ek_rsa2048 if kind == "rsa" else ek_ecc256).template
        handle, public, _, _, _ = self.esapi.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        with self.transient(handle):
            yield handle, public

    @contextlib.contextmanager
    def ek_session(self) -> Iterator[ESYS_TR]:
        """Policy session satisfying the EK policy: TPM2_PolicySecret(endorsement)."""
        session = self.esapi.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256)  # fmt: skip
        with self.transient(session):
            self.esapi.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
            yield session

    @contextlib.contextmanager
    def srk(self) -> Iterator[ESYS_TR]:
        template = ecc_template(SRK_ATTRIBUTES, restricted_decrypt=True)
        handle = self.esapi.create_primary(None, template, ESYS_TR.OWNER)[0]
        with self.transient(handle):
            yield handle

    def create_under_ek(self, kind: str, template: TPM2B_PUBLIC) -> tuple[bytes, bytes]:
        with self.ek(kind) as (ek_handle, _), self.ek_session() as session:
            private, public, *_ = self.esapi.create(ek_handle, None, template, session1=session)
        return private.marshal(), public.marshal()

    def create_under_srk(self, template: TPM2B_PUBLIC) -> tuple[bytes, bytes]:
        with self.srk() as srk:
            private, public, *_ = self.esapi.create(srk, None, template)
        return private.marshal(), public.marshal()

    @contextlib.contextmanager
    def load(self, parent: str, key: tuple[bytes, bytes]) -> Iterator[ESYS_TR]:
        """Load a key under the EK ("rsa"/"ecc", policy session) or the SRK ("srk")."""
        private = TPM2B_PRIVATE.unmarshal(key[0])[0]
        public = TPM2B_PUBLIC.unmarshal(key[1])[0]
        if parent == "srk":
            with self.srk() as srk:
                handle = self.esapi.load(srk, private, public)
        else:
            with self.ek(parent) as (ek_handle, _), self.ek_session() as session:
                handle = self.esapi.load(ek_handle, private, public, session1=session)
        with self.transient(handle):
            yield handle

    def activate(self, kind: str, ak: tuple[bytes, bytes], id_object: bytes,
                 encrypted_secret: bytes) -> bytes:  # fmt: skip
        """TPM2_ActivateCredential(activateHandle=AK, keyHandle=EK)."""
        with self.load(kind, ak) as ak_handle, self.ek(kind) as (ek_handle, _):
            with self.ek_session() as session:
                secret = self.esapi.activate_credential(
                    ak_handle, ek_handle, TPM2B_ID_OBJECT.unmarshal(id_object)[0],
                    TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)[0],
                    session1=ESYS_TR.PASSWORD, session2=session)  # fmt: skip
        return bytes(secret)

    def certify(self, signer: tuple[str, tuple[bytes, bytes]],
                key: tuple[str, tuple[bytes, bytes]], nonce: bytes,
                scheme: TPMT_SIG_SCHEME | None = None) -> tuple[bytes, bytes]:  # fmt: skip
        """TPM2_Certify: (marshalled TPMS_ATTEST, marshalled TPMT_SIGNATURE)."""
        scheme = scheme or TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
        with self.load(*key) as key_handle, self.load(*signer) as signer_handle:
            info, signature = self.esapi.certify(key_handle, signer_handle, TPM2B_DATA(nonce),
                                                 scheme)  # fmt: skip
        return bytes(info), signature.marshal()

    def quote(self, signer: tuple[str, tuple[bytes, bytes]],
              selection: str | TPML_PCR_SELECTION, nonce: bytes,
              ) -> tuple[bytes, bytes]:  # fmt: skip
        with self.load(*signer) as signer_handle:
            info, signature = self.esapi.quote(signer_handle, selection, TPM2B_DATA(nonce))
        return bytes(info), signature.marshal()

    def pcr_values(self, pcrs: dict[str, list[int]]) -> dict[str, dict[int, bytes]]:
        selection = "+".join(f"{bank}:{','.join(map(str, idx))}" for bank, idx in pcrs.items())
        _, selection_out, digests = self.esapi.pcr_read(selection)
        return quote.pcr_values_from_pcr_read(selection_out, digests)

    def extend(self, pcr: int, measurement: bytes) -> None:
        digest = TPMT_HA(hashAlg=TPM2_ALG.SHA256,
                         digest=TPMU_HA(sha256=hashlib.sha256(measurement).digest()))
        self.esapi.pcr_extend(getattr(ESYS_TR, f"PCR{pcr}"), TPML_DIGEST_VALUES([digest]))

    def csr(self, key: tuple[str, tuple[bytes, bytes]], kind: str) -> bytes:
        builder = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"device-{kind}")]))
        with self.load(*key) as handle:
            signer = (tpm_rsa_private_key if kind == "rsa" else tpm_ecc_private_key)(
                self.esapi, handle)
            request = builder.sign(signer, hashes.SHA256())  # PKCS #1 v1.5 / ECDSA
        return request.public_bytes(serialization.Encoding.DER)


# -- one run of the protocol -----------------------------------------------------------------


@dataclass
class Evidence:
    """Everything a device sends plus what the server issued, for one EK/AK kind."""

    kind: str
    ek_public: bytes
    ek_certificate: bytes
    ak_public: bytes
    ak_private: bytes = field(repr=False)
    device_key_public: bytes
    device_key_private: bytes = field(repr=False)
    secret: bytes
    id_object: bytes
    encrypted_secret: bytes
    activated_secret: bytes
    nonce: bytes
    certify_info: bytes
    certify_signature: bytes
    quote_info: bytes
    quote_signature: bytes
    pcr_policy: dict[str, dict[int, bytes]]
    csr: bytes

    @property
    def ak(self) -> tuple[str, tuple[bytes, bytes]]:
        return self.kind, (self.ak_private, self.ak_public)

    @property
    def device_key(self) -> tuple[str, tuple[bytes, bytes]]:
        return "srk", (self.device_key_private, self.device_key_public)


def ak_template_for(kind: str) -> TPM2B_PUBLIC:
    if kind == "rsa":
        return rsa_template(AK_ATTRIBUTES)
    return ecc_template(AK_ATTRIBUTES, TPM2_ALG.ECDSA)


def collect_evidence(tpm: Tpm, kind: str, pki: EkPki) -> Evidence:
    with tpm.ek(kind) as (_, ek_public):
        pass
    ek_key = tpm_structs.public_key(ek_public.publicArea)
    ek_certificate = der(pki.issue_ek_certificate(ek_key))
    ak_private, ak_public = tpm.create_under_ek(kind, ak_template_for(kind))
    template = rsa_template(DEVICE_KEY_ATTRIBUTES, "null") if kind == "rsa" else ecc_template(
        DEVICE_KEY_ATTRIBUTES)  # fmt: skip
    device_key = tpm.create_under_srk(template)
    # server: challenge for the AK name; device: activate; both: certify + quote with nonce
    ak_name = tpm_structs.object_name(verify.check_ak_public(ak_public))
    secret, nonce = credential.new_secret(), credential.new_nonce()
    id_object, encrypted_secret = credential.make_credential_challenge(
        ek_public.marshal(), ak_name, secret)
    activated = tpm.activate(kind, (ak_private, ak_public), id_object, encrypted_secret)
    ak = (kind, (ak_private, ak_public))
    certify_info, certify_signature = tpm.certify(ak, ("srk", device_key), nonce)
    pcr_policy = quote.golden_pcr_policy(tpm.pcr_values(PCRS), PCRS)
    quote_info, quote_signature = tpm.quote(ak, "sha256:0,1,2,7", nonce)
    return Evidence(
        kind, ek_public.marshal(), ek_certificate, ak_public, ak_private, device_key[1],
        device_key[0], secret, id_object, encrypted_secret, activated, nonce, certify_info,
        certify_signature, quote_info, quote_signature, pcr_policy,
        tpm.csr(("srk", device_key), kind))  # fmt: skip


@contextlib.contextmanager
def provisioned_tpm() -> Iterator[Tpm]:
    """A swtpm with "firmware measurements" in PCRs 0, 1, 2, 7 (so golden values are not 0)."""
    with swtpm() as tcti, ESAPI(tcti) as esapi:
        tpm = Tpm(esapi)
        for pcr in PCRS["sha256"]:
            tpm.extend(pcr, f"firmware stage {pcr}".encode())
        yield tpm
