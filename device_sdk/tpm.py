"""The device's TPM 2.0 through ESAPI (tpm2-pytss): EK, AK, device key and their evidence.

Every TPM command is issued by one ``_tpm2_*`` method decorated with ``_tpm_command``,
which names the command and its TPM 2.0 Library Part 3 section and turns any TSS error
into ``TpmError(code, message)``. The key templates are in device_sdk.tpm_templates.
Handles (TCG Registry of Reserved TPM 2.0 Handles):

- 0x81000001 SRK: ECC P-256 storage primary with the TCG Provisioning Guidance template
  (the one tpm2-openssl and ``tpm2_createprimary -G ecc`` use), created if absent.
- EKs of every TCG EK Credential Profile template (tpm_templates.EK_PROFILES: L-1, L-2,
  H-1, H-2, H-3, H-6) at the handle a factory persisted them (0x81010001 / 0x81010002
  for the low range); if absent, CreatePrimary with the template (as ``tpm2_createek``),
  flushed after each use. The EK certificate chain NV indices 0x01C00100..0x01C001FF are
  read too (``ek_certificate_chain``).
- 0x81008001 AK: restricted ECDSA-SHA256 P-256 signing key under the SRK.
- 0x81008002 device key: unrestricted P-256 signing key under the SRK (scheme NULL).
- NV 0x01808002 (owner range): the device key's "TSS2 PRIVATE KEY" DER, i.e. its
  TPM-wrapped private blob under the SRK, kept from TPM2_Create because a persistent key
  cannot be exported again; ``write_tss2_private_key`` works on every later run.

Byte formats (checked against tpm2-tools 5.4 in tests/test_device_tpm.py): public keys
are marshalled TPM2B_PUBLIC (``tpm2_createek|createak|create -u``); a name is the
TPM2B_NAME buffer without its size (``tpm2_createak -n``); certify and quote info are the
marshalled TPMS_ATTEST *without* the TPM2B_ATTEST size (``tpm2_certify -o``,
``tpm2_quote -m``); signatures are marshalled TPMT_SIGNATURE (``-s``, format "tss").

swtpm without a resource manager holds 3 transient objects: every method flushes what it
loads before it returns, so no transient handle outlives a call.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

import tpm2_pytss as tss
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from tpm2_pytss import ESAPI, ESYS_TR, TPM2_ALG, TPM2B_PUBLIC, TSS2_Exception
from tpm2_pytss.cryptography import tpm_ecc_private_key
from tpm2_pytss.internal.templates import ek_template
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from .state import atomic_write
from .tpm_templates import (  # the attributes: re-exported, as before the split
    AK_ATTRIBUTES,  # noqa: F401
    DEVICE_KEY_ATTRIBUTES,  # noqa: F401
    EK_CHAIN_FIRST_INDEX,
    EK_CHAIN_LAST_INDEX,
    EK_PROFILE_ORDER,  # noqa: F401
    EK_PROFILES,
    SRK_ATTRIBUTES,  # noqa: F401
    ak_template,
    device_key_template,
    ek_profile,
    srk_template,
)

EkKind = str  # a tpm_templates.EK_PROFILES name: "ecc", "rsa", "high-ecc384", ...
SRK_HANDLE = 0x81000001
AK_HANDLE = 0x81008001
DEVICE_KEY_HANDLE = 0x81008002
DEVICE_KEY_BLOB_NV_INDEX = 0x01808002
# kind -> (create_ek_template name, persistent handle, EK certificate NV index)
EK_SLOTS: dict[str, tuple[str, int, int]] = {
    name: (p.template_name, p.persistent_handle, p.cert_index) for name, p in EK_PROFILES.items()
}
_PT_NV_BUFFER_MAX = 0x12C  # TPM_PT_NV_BUFFER_MAX (Part 2, 6.13)
_PCR_BANKS, _PCRS = frozenset({"sha1", "sha256", "sha384", "sha512", "sm3_256"}), set(range(24))

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


@dataclass
class TpmError(Exception):
    """A TPM command failed; ``code`` is the TSS2_RC (the TPM_RC in its low bits: 0x902)."""

    code: int
    message: str

    def __str__(self) -> str:
        return f"TPM_RC 0x{self.code:x}: {self.message}"


class TpmStateError(TpmError):
    """The TPM answered, but holds something this SDK refuses to use (code 0)."""


def _tpm_command(command: str, section: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Mark a method that issues ``command`` (TPM 2.0 Part 3 ``section``); map TSS errors.

    The wrapped method's docstring becomes "<command> (TPM 2.0 Part 3, <section>). <doc>".
    """

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return function(*args, **kwargs)
            except TSS2_Exception as error:
                raise TpmError(int(error.rc), f"{command} (Part 3, {section}): {error}") from error

        call.__doc__ = f"{command} (TPM 2.0 Part 3, {section}). {function.__doc__ or ''}".strip()
        return call

    return decorate


def _der_length(data: bytes) -> int:
    """Length of the DER TLV at the start of ``data`` (NV areas may be zero-padded)."""
    if len(data) < 2 or data[0] != 0x30 or data[1] == 0x80:
        return len(data)
    if data[1] < 0x80:
        return 2 + data[1]
    size = data[1] & 0x7F
    return min(len(data), 2 + size + int.from_bytes(data[2 : 2 + size], "big"))


class TpmDevice:
    """One TPM over one ESAPI connection: ``with TpmDevice(tcti) as tpm: ...``.

    ``tcti``: "device:/dev/tpmrm0", "swtpm:port=2321", "tabrmd:bus_type=session". swtpm
    serves one connection at a time: close the device before tpm2-tools or openssl use it.
    """

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        self._esapi: ESAPI | None = None
        # Per session: persistent handles known to exist (their ESYS_TR) and keys already
        # checked against their template. Real TPMs take 10-100 ms per command; a first
        # boot asked GetCapability/ReadPublic ~28 times only to re-learn these.
        self._persistent: dict[int, ESYS_TR] = {}
        self._checked_keys: dict[int, TPM2B_PUBLIC] = {}
        self._nv_chunk: int | None = None

    def __enter__(self) -> TpmDevice:
        self._esapi = self._tpm2_connect()
        return self

    def __exit__(self, *exc: object) -> None:
        esapi, self._esapi = self._esapi, None
        self._persistent.clear()
        self._checked_keys.clear()
        if esapi is not None:
            esapi.close()

    @property
    def esapi(self) -> ESAPI:
        if self._esapi is None:
            raise RuntimeError("TpmDevice is not open: use it as a context manager")
        return self._esapi

    # -- public operations -------------------------------------------------------

    def read_ek_certificate(self, kind: EkKind = "ecc") -> bytes | None:
        """The DER EK certificate from its NV index (EK Credential Profile 2.0), or None."""
        data = self._nv_read_all(ek_profile(kind).cert_index)
        return None if data is None else data[: _der_length(data)]

    def ek_certificate_chain(self) -> list[bytes]:
        """DER certificates in the EK certificate chain indices (EK Credential Profile
        2.2.1.5.2: 0x01C00100..0x01C001FF), in index order; each index may hold several
        concatenated certificates and NV padding. Empty when the TPM has none."""
        _, data = self._tpm2_get_capability(tss.TPM2_CAP.HANDLES, EK_CHAIN_FIRST_INDEX, 256)
        chain: list[bytes] = []
        for index in sorted(int(h) for h in data.data.handles
                            if EK_CHAIN_FIRST_INDEX <= int(h) <= EK_CHAIN_LAST_INDEX):
            blob = self._nv_read_all(index) or b""
            while blob[:1] == b"\x30" and len(chain) < 16:
                length = _der_length(blob)
                chain.append(blob[:length])
                blob = blob[length:]
        return chain

    def endorsement_key(self, kind: EkKind = "ecc") -> tuple[int | None, bytes]:
        """(persistent handle, or None when re-created from the template; TPM2B_PUBLIC)."""
        with self._endorsement_key(kind) as (_, public, persistent):
            return persistent, public.marshal()

    def attestation_key(self) -> tuple[int, bytes, bytes]:
        """(0x81008001, TPM2B_PUBLIC, name) of the AK: created once, then reused."""
        handle, public = self._persistent_key(AK_HANDLE, ak_template())
        return AK_HANDLE, public.marshal(), bytes(self._tpm2_read_public(handle)[1])

    def device_key(self) -> tuple[int, bytes]:
        """(0x81008002, TPM2B_PUBLIC) of the device key: created once, then reused."""
        _, public = self._persistent_key(DEVICE_KEY_HANDLE, device_key_template())
        return DEVICE_KEY_HANDLE, public.marshal()

    def rotate_device_key(self) -> tuple[int, bytes]:
        """Replace the device key (and its NV blob) with a fresh key at the same handle."""
        private, public = self._tpm2_create(self._srk(), device_key_template())
        if self._present(DEVICE_KEY_HANDLE):  # after TPM2_Create: a failure keeps the old key
            self._tpm2_evict_control(self._persistent_tr(DEVICE_KEY_HANDLE), DEVICE_KEY_HANDLE)
            self._persistent.pop(DEVICE_KEY_HANDLE)
            self._checked_keys.pop(DEVICE_KEY_HANDLE, None)
        self._persist(DEVICE_KEY_HANDLE, private, public)
        return DEVICE_KEY_HANDLE, public.marshal()

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes,
                            ek_kind: EkKind = "ecc") -> bytes:
        """Recover the secret of MakeCredential(EK, AK name) (Part 1, 24).

        In: marshalled TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET; out: the TPM2B_DIGEST
        buffer. The EK's authPolicy is PolicySecret(TPM_RH_ENDORSEMENT) (EK Credential
        Profile 2.0, B.3.3) for a low-range EK, hence a policy session for it; a high-range
        EK has userWithAuth, so its empty password does. The AK uses its empty password.
        """
        id_object = _unmarshal_exact(tss.TPM2B_ID_OBJECT, credential_blob)
        secret = _unmarshal_exact(tss.TPM2B_ENCRYPTED_SECRET, encrypted_secret)
        ak, _ = self._persistent_key(AK_HANDLE, ak_template())
        with self._endorsement_key(ek_kind) as (ek, public, _):
            if public.publicArea.objectAttributes & tss.TPMA_OBJECT.USERWITHAUTH:
                return bytes(self._tpm2_activate_credential(ak, ek, id_object, secret,
                                                            ESYS_TR.PASSWORD))
            with self._policy_session() as session:
                self._tpm2_policy_secret(session, ESYS_TR.ENDORSEMENT)
                return bytes(self._tpm2_activate_credential(ak, ek, id_object, secret,
                                                            session))

    def certify(self, nonce: bytes) -> tuple[bytes, bytes]:
        """(TPMS_ATTEST, TPMT_SIGNATURE): the AK certifies the device key, nonce in extraData."""
        ak, _ = self._persistent_key(AK_HANDLE, ak_template())
        key, _ = self._persistent_key(DEVICE_KEY_HANDLE, device_key_template())
        attest, signature = self._tpm2_certify(key, ak, nonce)
        return bytes(attest), signature.marshal()

    def quote(self, nonce: bytes, pcrs: dict[str, list[int]]) -> tuple[bytes, bytes]:
        """(TPMS_ATTEST, TPMT_SIGNATURE): an AK quote of e.g. {"sha256": [0, 1, 2, 7]}."""
        if not pcrs or any(bank not in _PCR_BANKS or not indices or not set(indices) <= _PCRS
                           for bank, indices in pcrs.items()):  # fmt: skip
            raise ValueError(f"bad PCR selection {pcrs!r}")
        selection = tss.TPML_PCR_SELECTION.parse("+".join(
            f"{bank}:{','.join(str(i) for i in sorted(set(indices)))}"
            for bank, indices in pcrs.items()))  # fmt: skip
        ak, _ = self._persistent_key(AK_HANDLE, ak_template())
        attest, signature = self._tpm2_quote(ak, selection, nonce)
        return bytes(attest), signature.marshal()

    def csr(self, common_name: str) -> x509.CertificateSigningRequest:
        """A PKCS#10 request for the device key, subject CN=common_name, signed in the TPM."""
        key, _ = self._persistent_key(DEVICE_KEY_HANDLE, device_key_template())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
        return self._tpm2_sign_csr(key, builder)

    def tss2_private_key_pem(self) -> bytes:
        """The device key as "TSS2 PRIVATE KEY" PEM (parent 0x81000001) for tpm2-openssl."""
        _, public = self._persistent_key(DEVICE_KEY_HANDLE, device_key_template())
        der = self._nv_read_all(DEVICE_KEY_BLOB_NV_INDEX)
        tss_key = TSSPrivKey.from_der(der[: _der_length(der)]) if der else None
        if tss_key is None or tss_key.public.marshal() != public.marshal():
            raise TpmStateError(0, "no wrapped blob of the device key in NV 0x01808002 (key "
                                   "made by another tool?): rotate_device_key() makes one")
        return tss_key.to_pem()

    def write_tss2_private_key(self, path: str | os.PathLike[str]) -> None:
        """Write tss2_private_key_pem() to ``path`` atomically, mode 0600."""
        atomic_write(Path(path), self.tss2_private_key_pem(), 0o600)

    def transient_handles(self) -> list[int]:
        """Transient objects loaded now (TPMs hold a handful): empty between calls."""
        first = int(tss.TPM2_HC.TRANSIENT_FIRST)
        _, data = self._tpm2_get_capability(tss.TPM2_CAP.HANDLES, first, 64)
        return [int(h) for h in data.data.handles if int(h) >> 24 == first >> 24]

    # -- composed helpers ------------------------------------------------------------

    def _present(self, handle: int) -> bool:
        if handle in self._persistent:  # seen (or made) persistent in this session
            return True
        _, data = self._tpm2_get_capability(tss.TPM2_CAP.HANDLES, handle, 1)
        return any(int(h) == handle for h in data.data.handles)

    def _persistent_tr(self, handle: int) -> ESYS_TR:
        if handle not in self._persistent:
            self._persistent[handle] = self._tpm2_tr_from_tpm_public(handle)
        return self._persistent[handle]

    @contextlib.contextmanager
    def _transient(self, handle: ESYS_TR) -> Iterator[ESYS_TR]:
        try:
            yield handle
        finally:
            self._tpm2_flush_context(handle)

    def _srk(self) -> ESYS_TR:
        if not self._present(SRK_HANDLE):
            handle, _ = self._tpm2_create_primary(ESYS_TR.OWNER, srk_template())
            with self._transient(handle):
                self._tpm2_evict_control(handle, SRK_HANDLE)
        return self._persistent_tr(SRK_HANDLE)

    def _persistent_key(self, handle: int, template: TPM2B_PUBLIC) -> tuple[ESYS_TR, TPM2B_PUBLIC]:
        """The key at ``handle`` if it matches ``template``; else created under the SRK."""
        if handle in self._checked_keys:
            return self._persistent[handle], self._checked_keys[handle]
        if not self._present(handle):
            private, public = self._tpm2_create(self._srk(), template)
            tr = self._persist(handle, private, public)
            self._checked_keys[handle] = public
            return tr, public
        tr = self._persistent_tr(handle)
        public = self._tpm2_read_public(tr)[0]

        def shape(area: tss.TPMT_PUBLIC) -> tuple[int, ...]:
            ecc = area.parameters.eccDetail
            return (area.type, area.nameAlg, area.objectAttributes, ecc.curveID, ecc.scheme.scheme)

        if shape(public.publicArea) != shape(template.publicArea):
            raise TpmStateError(0, f"persistent handle 0x{handle:08x} holds a different key")
        self._checked_keys[handle] = public
        return tr, public

    def _persist(self, handle: int, private: tss.TPM2B_PRIVATE, public: TPM2B_PUBLIC) -> ESYS_TR:
        """Load under the SRK, make persistent at ``handle``, flush; device key: NV blob too."""
        srk = self._srk()
        with self._transient(self._tpm2_load(srk, private, public)) as loaded:
            self._tpm2_evict_control(loaded, handle)
        if handle == DEVICE_KEY_HANDLE:
            blob = TSSPrivKey(private, public, empty_auth=True, parent=SRK_HANDLE).to_der()
            self._nv_store(DEVICE_KEY_BLOB_NV_INDEX, blob)
        return self._persistent_tr(handle)

    @contextlib.contextmanager
    def _endorsement_key(self, kind: EkKind,
                         ) -> Iterator[tuple[ESYS_TR, TPM2B_PUBLIC, int | None]]:  # fmt: skip
        """(ESYS_TR, public, persistent handle or None); a re-created EK is flushed on exit."""
        profile = ek_profile(kind)
        name, persistent = profile.template_name, profile.persistent_handle
        if self._present(persistent):
            tr = self._persistent_tr(persistent)
            yield tr, self._tpm2_read_public(tr)[0], persistent
            return
        # EK Credential Profile 2.0, 2.2.1.5: EK template / nonce NV indices, when present,
        # change the default template (create_ek_template reads them, as tpm2_createek does).
        try:
            _, template = create_ek_template(name, self._nv_read_or_raise)
        except ValueError:  # a high-range profile without its certificate: plain template
            template = TPM2B_PUBLIC(publicArea=ek_template.lookup(name).template.publicArea)
        handle, public = self._tpm2_create_primary(ESYS_TR.ENDORSEMENT, template)
        with self._transient(handle):
            yield handle, public, None

    @contextlib.contextmanager
    def _policy_session(self) -> Iterator[ESYS_TR]:
        with self._transient(self._tpm2_start_auth_session(tss.TPM2_SE.POLICY)) as session:
            yield session

    def _nv_read_or_raise(self, index: int) -> bytes:
        data = self._nv_read_all(index)
        if data is None:
            raise NoSuchIndex(index)
        return data

    def _nv_read_all(self, index: int) -> bytes | None:
        if not self._present(index):
            return None
        tr = self._tpm2_tr_from_tpm_public(index)
        try:
            nv_public = self._tpm2_nv_read_public(tr).nvPublic
            auth = tr if nv_public.attributes & tss.TPMA_NV.AUTHREAD else ESYS_TR.OWNER
            chunk, size = self._nv_buffer_max(), int(nv_public.dataSize)
            return b"".join(self._tpm2_nv_read(tr, min(chunk, size - offset), offset, auth)
                            for offset in range(0, size, chunk))  # fmt: skip
        finally:
            self.esapi.tr_close(tr)  # ESAPI bookkeeping only, no TPM command

    def _nv_store(self, index: int, data: bytes) -> None:
        """Replace NV ``index``: owner-written, readable with its empty auth (not secret)."""
        if self._present(index):
            self._tpm2_nv_undefine_space(self._tpm2_tr_from_tpm_public(index))
        attributes = (tss.TPMA_NV.OWNERWRITE | tss.TPMA_NV.OWNERREAD | tss.TPMA_NV.AUTHREAD
                      | tss.TPMA_NV.NO_DA)  # fmt: skip
        tr = self._tpm2_nv_define_space(tss.TPM2B_NV_PUBLIC(nvPublic=tss.TPMS_NV_PUBLIC(
            nvIndex=index, nameAlg=TPM2_ALG.SHA256, attributes=attributes, dataSize=len(data))))
        try:
            chunk = self._nv_buffer_max()
            for offset in range(0, len(data), chunk):
                self._tpm2_nv_write(tr, data[offset : offset + chunk], offset)
        finally:
            self.esapi.tr_close(tr)

    def _nv_buffer_max(self) -> int:
        if self._nv_chunk is None:
            props = tss.TPM2_CAP.TPM_PROPERTIES
            _, data = self._tpm2_get_capability(props, _PT_NV_BUFFER_MAX, 1)
            values = [int(p.value) for p in data.data.tpmProperties
                      if p.property == _PT_NV_BUFFER_MAX]  # fmt: skip
            self._nv_chunk = values[0] if values else 512
        return self._nv_chunk

    # -- one method per TPM command ------------------------------------------------------

    @_tpm_command("Esys_Initialize (TCTI connect)", "none")
    def _tpm2_connect(self) -> ESAPI:
        """Open TCTI + ESAPI; TPM2_Startup (9.3) is done by firmware (or swtpm's flags)."""
        return ESAPI(self.tcti)

    @_tpm_command("TPM2_GetCapability", "30.2")
    def _tpm2_get_capability(self, capability: tss.TPM2_CAP, prop: int,
                             count: int) -> tuple[bool, tss.TPMS_CAPABILITY_DATA]:
        return self.esapi.get_capability(capability, prop, count)

    @_tpm_command("TPM2_ReadPublic / TPM2_NV_ReadPublic", "12.4 / 31.6")
    def _tpm2_tr_from_tpm_public(self, handle: int) -> ESYS_TR:
        """Esys_TR_FromTPMPublic: an ESYS_TR for a persistent object or an NV index."""
        return self.esapi.tr_from_tpmpublic(handle)

    @_tpm_command("TPM2_ReadPublic", "12.4")
    def _tpm2_read_public(self, handle: ESYS_TR) -> tuple[TPM2B_PUBLIC, tss.TPM2B_NAME, object]:
        return self.esapi.read_public(handle)

    @_tpm_command("TPM2_CreatePrimary", "24.1")
    def _tpm2_create_primary(self, hierarchy: ESYS_TR,
                             template: TPM2B_PUBLIC) -> tuple[ESYS_TR, TPM2B_PUBLIC]:
        """TPM2_CreatePrimary(primaryHandle, inPublic): a transient object the caller flushes."""
        handle, public, _, _, _ = self.esapi.create_primary(
            tss.TPM2B_SENSITIVE_CREATE(), template, hierarchy)
        return handle, public

    @_tpm_command("TPM2_Create", "12.1")
    def _tpm2_create(self, parent: ESYS_TR,
                     template: TPM2B_PUBLIC) -> tuple[tss.TPM2B_PRIVATE, TPM2B_PUBLIC]:
        """TPM2_Create(parentHandle, inPublic) -> (outPrivate wrapped by the parent, outPublic)."""
        private, public, _, _, _ = self.esapi.create(parent, tss.TPM2B_SENSITIVE_CREATE(), template)
        return private, public

    @_tpm_command("TPM2_Load", "12.2")
    def _tpm2_load(self, parent: ESYS_TR, private: tss.TPM2B_PRIVATE,
                   public: TPM2B_PUBLIC) -> ESYS_TR:
        """TPM2_Load(parentHandle, inPrivate, inPublic): a transient object the caller flushes."""
        return self.esapi.load(parent, private, public)

    @_tpm_command("TPM2_EvictControl", "28.5")
    def _tpm2_evict_control(self, handle: ESYS_TR, persistent: int) -> None:
        """TPM2_EvictControl(TPM_RH_OWNER): persist a transient object, or evict a persistent."""
        self.esapi.evict_control(ESYS_TR.OWNER, handle, persistent)

    @_tpm_command("TPM2_FlushContext", "28.4")
    def _tpm2_flush_context(self, handle: ESYS_TR) -> None:
        self.esapi.flush_context(handle)

    @_tpm_command("TPM2_StartAuthSession", "11.1")
    def _tpm2_start_auth_session(self, session_type: tss.TPM2_SE) -> ESYS_TR:
        """TPM2_StartAuthSession: unbound, unsalted, no parameter encryption, SHA-256."""
        return self.esapi.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, session_type, tss.TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256)  # fmt: skip

    @_tpm_command("TPM2_PolicySecret", "23.4")
    def _tpm2_policy_secret(self, session: ESYS_TR, auth_handle: ESYS_TR) -> None:
        """TPM2_PolicySecret(authHandle, policySession) with the hierarchy's (empty) auth."""
        self.esapi.policy_secret(auth_handle, session, b"", b"", b"", 0)

    @_tpm_command("TPM2_ActivateCredential", "12.5")
    def _tpm2_activate_credential(self, ak: ESYS_TR, ek: ESYS_TR, id_object: tss.TPM2B_ID_OBJECT,
                                  secret: tss.TPM2B_ENCRYPTED_SECRET,
                                  ek_session: ESYS_TR) -> tss.TPM2B_DIGEST:  # fmt: skip
        """TPM2_ActivateCredential(activateHandle=AK, keyHandle=EK) -> certInfo."""
        return self.esapi.activate_credential(ak, ek, id_object, secret,
                                              session1=ESYS_TR.PASSWORD, session2=ek_session)

    @_tpm_command("TPM2_Certify", "18.2")
    def _tpm2_certify(self, key: ESYS_TR, signer: ESYS_TR,
                      nonce: bytes) -> tuple[tss.TPM2B_ATTEST, tss.TPMT_SIGNATURE]:
        """TPM2_Certify(objectHandle, signHandle, qualifyingData, inScheme NULL = the AK's)."""
        scheme = tss.TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
        return self.esapi.certify(key, signer, tss.TPM2B_DATA(nonce), scheme)

    @_tpm_command("TPM2_Quote", "18.4")
    def _tpm2_quote(self, signer: ESYS_TR, selection: tss.TPML_PCR_SELECTION,
                    nonce: bytes) -> tuple[tss.TPM2B_ATTEST, tss.TPMT_SIGNATURE]:
        return self.esapi.quote(signer, selection, tss.TPM2B_DATA(nonce))

    @_tpm_command("TPM2_Sign", "20.2")
    def _tpm2_sign_csr(self, key: ESYS_TR, builder: x509.CertificateSigningRequestBuilder,
                       ) -> x509.CertificateSigningRequest:  # fmt: skip
        """TPM2_Sign of the CSR's SHA-256 digest (ECDSA) through tpm_ecc_private_key."""
        return builder.sign(tpm_ecc_private_key(self.esapi, key), hashes.SHA256())

    @_tpm_command("TPM2_NV_ReadPublic", "31.6")
    def _tpm2_nv_read_public(self, index: ESYS_TR) -> tss.TPM2B_NV_PUBLIC:
        return self.esapi.nv_read_public(index)[0]

    @_tpm_command("TPM2_NV_Read", "31.13")
    def _tpm2_nv_read(self, index: ESYS_TR, size: int, offset: int, auth: ESYS_TR) -> bytes:
        """TPM2_NV_Read(authHandle, nvIndex, size <= TPM_PT_NV_BUFFER_MAX, offset)."""
        return bytes(self.esapi.nv_read(index, size, offset, auth_handle=auth))

    @_tpm_command("TPM2_NV_DefineSpace", "31.3")
    def _tpm2_nv_define_space(self, public: tss.TPM2B_NV_PUBLIC) -> ESYS_TR:
        return self.esapi.nv_define_space(b"", public, ESYS_TR.OWNER)

    @_tpm_command("TPM2_NV_UndefineSpace", "31.4")
    def _tpm2_nv_undefine_space(self, index: ESYS_TR) -> None:
        self.esapi.nv_undefine_space(index, ESYS_TR.OWNER)

    @_tpm_command("TPM2_NV_Write", "31.7")
    def _tpm2_nv_write(self, index: ESYS_TR, data: bytes, offset: int) -> None:
        """TPM2_NV_Write(TPM_RH_OWNER, nvIndex, data <= TPM_PT_NV_BUFFER_MAX, offset)."""
        self.esapi.nv_write(index, data, offset, ESYS_TR.OWNER)


def _unmarshal_exact(cls: type[T], data: bytes) -> T:
    """Unmarshal a TPM2B and refuse trailing bytes (a truncated or concatenated field)."""
    value, used = cls.unmarshal(data)  # type: ignore[attr-defined]
    if used != len(data):
        raise ValueError(f"{cls.__name__}: {len(data) - used} trailing bytes")
    return value
