"""A test TPM manufacturer: EK CA hierarchy plus fast "factory provisioning" of a swtpm.

Real vendors (Infineon, STMicro, Nuvoton) sign EK certificates with an intermediate
"EK issuing CA" under an offline root, and store the DER certificate in TPM NV at the
indices of the TCG EK Credential Profile for TPM Family 2.0 ("the profile" below).
``Manufacturer`` does the same for swtpm in under 0.1 s per TPM (swtpm_setup: ~0.6 s):

    maker = Manufacturer.create(directory)           # or Manufacturer.load(directory)
    with SwtpmInstance() as tpm:
        provisioned = maker.provision(tpm.tcti)      # EKs persisted, certs in NV
        trust_anchors = maker.ca_certificates        # (EK issuing CA, root)

By default the EKs are the TCG default low-range templates (L-1 RSA-2048, L-2 ECC NIST
P-256, the ones ``tpm2_createek -G rsa|ecc`` uses), persisted at 0x81010001 / 0x81010002,
with certificates at NV 0x01c00002 / 0x01c0000a where ``tpm2_getekcertificate`` looks.
``provision(slots=...)`` takes any of the high-range templates too (H-1 RSA-2048, H-2
P-256, H-3 P-384, H-6 RSA-3072; the profile's certificate index, handle 0x810100xx with
the index's low byte), and ``ek_chain=True`` writes the EK issuing CA certificate into
the EK certificate chain index 0x01c00100 (EK Credential Profile 2.2.1.5.2), for TPMs
whose verifier knows only the vendor root.

``simulators.swtpm_localca`` runs swtpm's own tooling instead (swtpm_setup with a
private swtpm_localca CA), so tests can trust its EK certs too.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from tpm2_pytss import (
    ESAPI,
    TPM2B_NV_PUBLIC,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMS_NV_PUBLIC,
)
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_HC, TPMA_NV
from tpm2_pytss.internal.templates import (
    ek_ecc256,
    ek_high_ecc256,
    ek_high_ecc384,
    ek_high_rsa2048,
    ek_high_rsa3072,
    ek_rsa2048,
)

# TCG OIDs (TCG EK Credential Profile 2.0, section 5 "ASN.1 definitions").
TCG_AT_TPM_MANUFACTURER = x509.ObjectIdentifier("2.23.133.2.1")
TCG_AT_TPM_MODEL = x509.ObjectIdentifier("2.23.133.2.2")
TCG_AT_TPM_VERSION = x509.ObjectIdentifier("2.23.133.2.3")
TCG_AT_TPM_SPECIFICATION = x509.ObjectIdentifier("2.23.133.2.16")
TCG_KP_EK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.1")
SUBJECT_DIRECTORY_ATTRIBUTES = x509.ObjectIdentifier("2.5.29.9")

# EK certificate NV index attributes, as real TPMs and swtpm_setup define them (the
# profile, "EK Credential NV Indices"): written by the platform, readable by owner and by
# the index's (empty) auth, never DA-locked; WRITEDEFINE + NV_WriteLock = read-only for good.
EK_CERT_NV_ATTRIBUTES = (
    TPMA_NV.PPWRITE | TPMA_NV.WRITEDEFINE | TPMA_NV.PPREAD | TPMA_NV.OWNERREAD
    | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA | TPMA_NV.PLATFORMCREATE
)  # fmt: skip

# TPM_PT_* fixed properties (TPM 2.0 Part 2, 6.13) not all named by tpm2-pytss.
_PT_FAMILY, _PT_LEVEL, _PT_REVISION, _PT_MANUFACTURER = 0x100, 0x101, 0x102, 0x105
_PT_VENDOR_STRINGS = (0x106, 0x107, 0x108, 0x109)
_PT_FIRMWARE_VERSION_1 = 0x10B
_PT_NV_BUFFER_MAX = 0x12C
NOT_AFTER_UNDEFINED = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)  # RFC 5280 4.1.2.5

KeyAlgorithm = Literal["ec-p384", "rsa-3072"]
CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class ProvisioningError(RuntimeError):
    """The TPM cannot be provisioned as asked (e.g. it already holds an EK or EK cert)."""


@dataclass(frozen=True)
class EkSlot:
    """Where one TCG default EK lives: template, persistent handle, certificate NV index."""

    name: str  # device_sdk.tpm_templates.EK_PROFILES name: "rsa", "ecc", "high-ecc384"...
    template_name: str  # TCG EK Credential Profile 2.0, Annex B: "L-1", "L-2", "H-3"...
    template: TPM2B_PUBLIC = field(repr=False)
    persistent_handle: int
    nv_index: int


EK_RSA = EkSlot("rsa", "L-1", ek_rsa2048.template, 0x81010001, int(ek_rsa2048.cert_index))
EK_ECC = EkSlot("ecc", "L-2", ek_ecc256.template, 0x81010002, int(ek_ecc256.cert_index))
EK_SLOTS = (EK_RSA, EK_ECC)  # what provision() does by default
HIGH_RANGE_SLOTS = tuple(
    EkSlot(name, tcg, template.template, 0x81010000 | (int(template.cert_index) & 0xFF),
           int(template.cert_index))
    for name, tcg, template in (("high-rsa2048", "H-1", ek_high_rsa2048),
                                ("high-ecc256", "H-2", ek_high_ecc256),
                                ("high-ecc384", "H-3", ek_high_ecc384),
                                ("high-rsa3072", "H-6", ek_high_rsa3072))
)  # fmt: skip
ALL_SLOTS = {slot.name: slot for slot in (*EK_SLOTS, *HIGH_RANGE_SLOTS)}
EK_CHAIN_INDEX = 0x01C00100  # the first EK certificate chain index (2.2.1.5.2)


@dataclass(frozen=True)
class TpmIdentity:
    """What an EK certificate says about its TPM: SAN directoryName and TPMSpecification."""

    manufacturer: str  # "id:" + TPM_PT_MANUFACTURER in hex, e.g. "id:49424D00" (IBM)
    model: str  # TPM_PT_VENDOR_STRING_1..4
    version: str  # "id:" + TPM_PT_FIRMWARE_VERSION_1 in hex
    spec_family: str = "2.0"
    spec_level: int = 0
    spec_revision: int = 164


@dataclass(frozen=True)
class ProvisionedEk:
    slot: EkSlot
    public_area: bytes  # marshalled TPM2B_PUBLIC, as tpm2_createek -u writes it
    certificate: x509.Certificate

    @property
    def persistent_handle(self) -> int:
        return self.slot.persistent_handle

    @property
    def nv_index(self) -> int:
        return self.slot.nv_index

    @property
    def certificate_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class ProvisionedTpm:
    """What the factory did to one TPM; ``timings`` are seconds per step."""

    identity: TpmIdentity
    eks: tuple[ProvisionedEk, ...]
    timings: dict[str, float]

    def ek(self, name: str) -> ProvisionedEk:
        return next(ek for ek in self.eks if ek.slot.name == name)

    @property
    def rsa_ek(self) -> ProvisionedEk:
        return self.ek("rsa")

    @property
    def ecc_ek(self) -> ProvisionedEk:
        return self.ek("ecc")


# -- small DER encoder for the one extension cryptography has no class for ------------


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _der_uint(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _tpm_specification_attributes(identity: TpmIdentity) -> bytes:
    """DER of SubjectDirectoryAttributes holding TPMSpecification (family, level, revision)."""
    tpm_specification = _der(
        0x30,
        _der(0x0C, identity.spec_family.encode())
        + _der_uint(identity.spec_level)
        + _der_uint(identity.spec_revision),
    )
    oid = _der(0x06, bytes.fromhex("6781050210"))  # 2.23.133.2.16
    attribute = _der(0x30, oid + _der(0x31, tpm_specification))
    return _der(0x30, attribute)


# -- the CA --------------------------------------------------------------------------


def _new_key(algorithm: KeyAlgorithm) -> CaKey:
    if algorithm == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def _signature_hash(key: CaKey) -> hashes.HashAlgorithm:
    return hashes.SHA384() if isinstance(key, ec.EllipticCurvePrivateKey) else hashes.SHA256()


def _ca_certificate(
    subject: x509.Name, key: CaKey, issuer: x509.Certificate | None, issuer_key: CaKey,
    path_length: int, years: int,
) -> x509.Certificate:  # fmt: skip
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = (
        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        if issuer is None
        else x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    )
    usage = dict.fromkeys(
        ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
         "key_agreement", "encipher_only", "decipher_only"), False,
    )  # fmt: skip
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365 * years))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(key_cert_sign=True, crl_sign=True, **usage), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
    )
    return builder.sign(issuer_key, _signature_hash(issuer_key))


class Manufacturer:
    """A TPM vendor's EK PKI: a root CA and the intermediate that signs EK certificates.

    The private keys are plain PEM files: this is test material, never a real CA.
    """

    ROOT_CERT, ROOT_KEY = "root-ca.pem", "root-ca.key.pem"
    EK_CA_CERT, EK_CA_KEY = "ek-ca.pem", "ek-ca.key.pem"

    def __init__(
        self, root_certificate: x509.Certificate, ek_ca_certificate: x509.Certificate,
        ek_ca_key: CaKey, root_key: CaKey | None = None,
    ) -> None:  # fmt: skip
        ek_ca_certificate.verify_directly_issued_by(root_certificate)
        self.root_certificate = root_certificate
        self.ek_ca_certificate = ek_ca_certificate
        self._ek_ca_key = ek_ca_key
        self._root_key = root_key

    @classmethod
    def create(
        cls, directory: str | os.PathLike[str] | None = None,
        name: str = "Simulated TPM Vendor", key_algorithm: KeyAlgorithm = "ec-p384",
    ) -> Manufacturer:  # fmt: skip
        """New root + EK issuing CA; written to ``directory`` (refusing to overwrite) if given."""
        root_key, ek_ca_key = _new_key(key_algorithm), _new_key(key_algorithm)
        root_name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} TPM Root CA"),
        ])  # fmt: skip
        ek_ca_name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "TPM EK Issuing CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} EK CA 001"),
        ])  # fmt: skip
        root = _ca_certificate(root_name, root_key, None, root_key, path_length=1, years=30)
        ek_ca = _ca_certificate(ek_ca_name, ek_ca_key, root, root_key, path_length=0, years=20)
        manufacturer = cls(root, ek_ca, ek_ca_key, root_key)
        if directory is not None:
            manufacturer.save(directory)
        return manufacturer

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Manufacturer:
        """The manufacturer saved in ``directory`` (so a fleet shares one vendor)."""
        base = Path(directory)

        def key(file: str) -> CaKey | None:
            if not (base / file).exists():
                return None
            loaded = serialization.load_pem_private_key((base / file).read_bytes(), None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
                raise ValueError(f"{base / file}: unsupported CA key type {type(loaded)}")
            return loaded

        ek_ca_key = key(cls.EK_CA_KEY)
        if ek_ca_key is None:
            raise FileNotFoundError(base / cls.EK_CA_KEY)
        return cls(
            x509.load_pem_x509_certificate((base / cls.ROOT_CERT).read_bytes()),
            x509.load_pem_x509_certificate((base / cls.EK_CA_CERT).read_bytes()),
            ek_ca_key, key(cls.ROOT_KEY),
        )  # fmt: skip

    @classmethod
    def load_or_create(
        cls, directory: str | os.PathLike[str], name: str = "Simulated TPM Vendor"
    ) -> Manufacturer:
        if (Path(directory) / cls.EK_CA_KEY).exists():
            return cls.load(directory)
        return cls.create(directory, name)

    def save(self, directory: str | os.PathLike[str]) -> None:
        base = Path(directory)
        base.mkdir(parents=True, exist_ok=True)
        pem = serialization.Encoding.PEM
        files = {
            self.ROOT_CERT: self.root_certificate.public_bytes(pem),
            self.EK_CA_CERT: self.ek_ca_certificate.public_bytes(pem),
        }
        keys = {self.EK_CA_KEY: self._ek_ca_key, self.ROOT_KEY: self._root_key}
        for file, private_key in keys.items():
            if private_key is not None:
                files[file] = private_key.private_bytes(
                    pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
        for file, content in files.items():
            mode = 0o600 if file.endswith(".key.pem") else 0o644
            fd = os.open(base / file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as out:
                out.write(content)

    @property
    def ca_certificates(self) -> tuple[x509.Certificate, x509.Certificate]:
        """(EK issuing CA, root): what a verifier trusts for this vendor's TPMs."""
        return (self.ek_ca_certificate, self.root_certificate)

    @property
    def ca_certificate_pems(self) -> tuple[str, str]:
        return tuple(  # type: ignore[return-value]
            cert.public_bytes(serialization.Encoding.PEM).decode() for cert in self.ca_certificates
        )

    def issue_ek_certificate(
        self, ek_public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, identity: TpmIdentity,
        not_before: dt.datetime | None = None,
    ) -> x509.Certificate:  # fmt: skip
        """An X.509 v3 EK certificate following the profile (pure: no TPM involved).

        Empty subject, so the SAN is critical (RFC 5280 4.2.1.6): a directoryName with TPM
        manufacturer, model and version, one RDN each as vendors and swtpm_cert encode it;
        basicConstraints CA:false (critical); keyUsage (critical) keyEncipherment for an RSA
        EK, keyAgreement for an ECC EK (it decrypts credentials via ECDH, never encrypts
        keys); EKU tcg-kp-EKCertificate; TPMSpecification in subjectDirectoryAttributes;
        AKI of the EK CA; notAfter 99991231235959Z (no well-defined expiry, RFC 5280 4.1.2.5).
        """
        is_rsa = isinstance(ek_public_key, rsa.RSAPublicKey)
        usage = dict.fromkeys(
            ("digital_signature", "content_commitment", "data_encipherment", "key_cert_sign",
             "crl_sign", "encipher_only", "decipher_only"), False,
        )  # fmt: skip
        san = x509.DirectoryName(x509.Name([
            x509.RelativeDistinguishedName([x509.NameAttribute(oid, value)])
            for oid, value in ((TCG_AT_TPM_MANUFACTURER, identity.manufacturer),
                               (TCG_AT_TPM_MODEL, identity.model),
                               (TCG_AT_TPM_VERSION, identity.version))
        ]))  # fmt: skip
        ek_ca_ski = self.ek_ca_certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        not_before = not_before or dt.datetime.now(dt.UTC).replace(microsecond=0)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.ek_ca_certificate.subject)
            .public_key(ek_public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(NOT_AFTER_UNDEFINED)
            .add_extension(x509.SubjectAlternativeName([san]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.UnrecognizedExtension(
                    SUBJECT_DIRECTORY_ATTRIBUTES, _tpm_specification_attributes(identity)
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ek_ca_ski),
                critical=False,
            )
            .add_extension(
                x509.KeyUsage(key_encipherment=is_rsa, key_agreement=not is_rsa, **usage),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([TCG_KP_EK_CERTIFICATE]), critical=False)
        )
        return builder.sign(self._ek_ca_key, _signature_hash(self._ek_ca_key))

    def provision(
        self, tcti: str, *, identity: TpmIdentity | None = None, lock_nv: bool = True,
        slots: tuple[EkSlot, ...] = EK_SLOTS, ek_chain: bool = False,
    ) -> ProvisionedTpm:
        """Factory-provision one TPM: its EKs (``slots``) persisted, certificates in NV.

        Issues (all through ESAPI, platform hierarchy with its empty auth as on swtpm):
        TPM2_CreatePrimary (endorsement) + TPM2_EvictControl + TPM2_FlushContext per EK,
        then TPM2_NV_DefineSpace + TPM2_NV_Write (+ TPM2_NV_WriteLock when ``lock_nv``,
        as on a real TPM) per certificate.  Refuses a TPM that already has an EK handle or
        EK certificate index in use.  ``identity`` defaults to what the TPM reports.
        """
        timings: dict[str, float] = {}
        started = time.perf_counter()
        with ESAPI(tcti) as esapi:
            _refuse_if_provisioned(esapi, slots)
            identity = identity or read_tpm_identity(esapi)
            nv_buffer_max = _fixed_property(esapi, _PT_NV_BUFFER_MAX) or 512
            timings["connect"] = time.perf_counter() - started
            public_areas: dict[str, TPM2B_PUBLIC] = {}
            for slot in slots:
                step = time.perf_counter()
                public_areas[slot.name] = _create_persistent_ek(esapi, slot)
                timings[f"create_ek_{slot.name}"] = time.perf_counter() - step
            step = time.perf_counter()
            certificates = {
                slot.name: self.issue_ek_certificate(
                    serialization.load_der_public_key(public_areas[slot.name].publicArea.to_der()),
                    identity,
                )
                for slot in slots
            }
            timings["sign_certificates"] = time.perf_counter() - step
            step = time.perf_counter()
            for slot in slots:
                der = certificates[slot.name].public_bytes(serialization.Encoding.DER)
                _write_ek_certificate(esapi, slot.nv_index, der, nv_buffer_max, lock_nv)
            if ek_chain:
                der = self.ek_ca_certificate.public_bytes(serialization.Encoding.DER)
                _write_ek_certificate(esapi, EK_CHAIN_INDEX, der, nv_buffer_max, lock_nv)
            timings["nv_write"] = time.perf_counter() - step
        timings["total"] = time.perf_counter() - started
        eks = tuple(
            ProvisionedEk(slot, public_areas[slot.name].marshal(), certificates[slot.name])
            for slot in slots
        )
        return ProvisionedTpm(identity, eks, timings)


# -- TPM commands ----------------------------------------------------------------------


def _fixed_property(esapi: ESAPI, prop: int) -> int | None:
    """TPM2_GetCapability(TPM_PROPERTIES, prop, 1) -> value, or None if not reported."""
    _, data = esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, prop, 1)
    for entry in data.data.tpmProperties:
        if entry.property == prop:
            return int(entry.value)
    return None


def read_tpm_identity(esapi: ESAPI) -> TpmIdentity:
    """The TPM's own manufacturer/model/firmware properties (TPM2_GetCapability)."""
    _, data = esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, _PT_FAMILY, 16)
    props = {int(entry.property): int(entry.value) for entry in data.data.tpmProperties}
    vendor = b"".join(props.get(p, 0).to_bytes(4, "big") for p in _PT_VENDOR_STRINGS)
    family = props.get(_PT_FAMILY, 0x322E3000).to_bytes(4, "big").rstrip(b"\0").decode()
    return TpmIdentity(
        manufacturer=f"id:{props.get(_PT_MANUFACTURER, 0):08X}",
        model=vendor.replace(b"\0", b"").decode(errors="replace").strip() or "unknown",
        version=f"id:{props.get(_PT_FIRMWARE_VERSION_1, 0):08X}",
        spec_family=family,
        spec_level=props.get(_PT_LEVEL, 0),
        spec_revision=props.get(_PT_REVISION, 0),
    )


def _handles_in_use(esapi: ESAPI, first: int) -> set[int]:
    """TPM2_GetCapability(HANDLES) for one handle range (persistent or NV)."""
    in_use: set[int] = set()
    more, property_ = True, first
    while more:
        more, data = esapi.get_capability(TPM2_CAP.HANDLES, property_, 64)
        handles = [int(h) for h in data.data.handles]
        if not handles:
            break
        in_use.update(h for h in handles if h >> 24 == first >> 24)
        property_ = handles[-1] + 1
    return in_use


def _refuse_if_provisioned(esapi: ESAPI, slots: tuple[EkSlot, ...] = EK_SLOTS) -> None:
    persistent = _handles_in_use(esapi, int(TPM2_HC.PERSISTENT_FIRST))
    nv = _handles_in_use(esapi, int(TPM2_HC.NV_INDEX_FIRST))
    taken = [f"0x{s.persistent_handle:08x}" for s in slots if s.persistent_handle in persistent]
    taken += [f"0x{s.nv_index:08x}" for s in slots if s.nv_index in nv]
    if taken:
        raise ProvisioningError(f"TPM already provisioned: {', '.join(taken)} in use")


def _create_persistent_ek(esapi: ESAPI, slot: EkSlot) -> TPM2B_PUBLIC:
    """TPM2_CreatePrimary(endorsement, template) + TPM2_EvictControl + TPM2_FlushContext.

    swtpm without a resource manager holds 3 transient objects: flush right away.
    """
    handle, public, _, _, _ = esapi.create_primary(
        TPM2B_SENSITIVE_CREATE(), slot.template, ESYS_TR.ENDORSEMENT
    )
    try:
        persistent = esapi.evict_control(ESYS_TR.OWNER, handle, slot.persistent_handle)
        esapi.tr_close(persistent)
    finally:
        esapi.flush_context(handle)
    return public


def _write_ek_certificate(esapi: ESAPI, nv_index: int, der: bytes, chunk: int, lock: bool) -> None:
    """TPM2_NV_DefineSpace (platform) + TPM2_NV_Write in NV_BUFFER_MAX chunks (+ WriteLock)."""
    public = TPM2B_NV_PUBLIC(
        nvPublic=TPMS_NV_PUBLIC(
            nvIndex=nv_index, nameAlg=TPM2_ALG.SHA256, attributes=EK_CERT_NV_ATTRIBUTES,
            dataSize=len(der),
        )
    )  # fmt: skip
    handle = esapi.nv_define_space(b"", public, auth_handle=ESYS_TR.PLATFORM)
    try:
        for offset in range(0, len(der), chunk):
            esapi.nv_write(handle, der[offset : offset + chunk], offset, ESYS_TR.PLATFORM)
        if lock:
            esapi.nv_write_lock(handle, ESYS_TR.PLATFORM)
    finally:
        esapi.tr_close(handle)
