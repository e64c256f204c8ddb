"""Object templates of the device's TPM keys (device_sdk.tpm): SRK, AK, device key, and
the TCG EK profiles (template, certificate NV index, persistent handle) it can use.

All ECC P-256 with nameAlg SHA-256, created under the owner hierarchy:

- SRK: restricted decrypt storage primary with AES-128-CFB, the TCG Provisioning Guidance
  template (the one tpm2-openssl and ``tpm2_createprimary -G ecc`` use).
- AK: restricted ECDSA-SHA256 signing key.
- device key: unrestricted signing key with scheme NULL.
"""

from __future__ import annotations

from dataclasses import dataclass

import tpm2_pytss as tss
from tpm2_pytss import TPM2_ALG, TPM2B_PUBLIC, TPMA_OBJECT

_KEY = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH)  # fmt: skip
SRK_ATTRIBUTES = _KEY | TPMA_OBJECT.NODA | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT
AK_ATTRIBUTES = _KEY | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT
DEVICE_KEY_ATTRIBUTES = _KEY | TPMA_OBJECT.SIGN_ENCRYPT


def _ecc_template(attributes: TPMA_OBJECT, scheme: TPM2_ALG = TPM2_ALG.NULL,
                  aes128_cfb: bool = False) -> TPM2B_PUBLIC:
    """A fresh ECC P-256 SHA-256 template (tpm2-pytss' own templates are shared mutables)."""
    symmetric = tss.TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL)
    if aes128_cfb:
        symmetric = tss.TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.AES,
                                            keyBits=tss.TPMU_SYM_KEY_BITS(aes=128),
                                            mode=tss.TPMU_SYM_MODE(aes=TPM2_ALG.CFB))
    ecc_scheme = tss.TPMT_ECC_SCHEME(scheme=scheme)
    if scheme == TPM2_ALG.ECDSA:
        ecc_scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
    return TPM2B_PUBLIC(publicArea=tss.TPMT_PUBLIC(
        type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256, objectAttributes=attributes,
        parameters=tss.TPMU_PUBLIC_PARMS(eccDetail=tss.TPMS_ECC_PARMS(
            symmetric=symmetric, scheme=ecc_scheme, curveID=tss.TPM2_ECC.NIST_P256,
            kdf=tss.TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL))),
    ))  # fmt: skip


def srk_template() -> TPM2B_PUBLIC:
    return _ecc_template(SRK_ATTRIBUTES, aes128_cfb=True)


def ak_template() -> TPM2B_PUBLIC:
    return _ecc_template(AK_ATTRIBUTES, TPM2_ALG.ECDSA)


def device_key_template() -> TPM2B_PUBLIC:
    """Scheme NULL: each TPM2_Sign names its scheme, so TLS and CSR signing both work."""
    return _ecc_template(DEVICE_KEY_ATTRIBUTES)


# -- endorsement keys (TCG EK Credential Profile for TPM Family 2.0, 2.2.1.4/2.2.1.5, B) ----
@dataclass(frozen=True)
class EkProfile:
    """One TCG EK template: where its certificate lives and how the EK is authorised.

    Low range (L-1, L-2): authPolicy PolicySecret(TPM_RH_ENDORSEMENT), userWithAuth clear,
    so using the EK needs that policy session; their template / nonce NV indices, when
    present, change the template (tpm2_pytss.utils.create_ek_template reads them).
    High range (H-n): userWithAuth set (and an OR policy for admin), so the EK's empty
    password authorises ActivateCredential. ``persistent_handle`` is where a factory (or
    ``simulators.manufacturer``) persists it; otherwise the SDK re-creates it from the
    template with TPM2_CreatePrimary, which yields the same key every time.
    """

    name: str  # the SDK's name for it ("ecc", "high-ecc384", ...)
    tcg_name: str  # EK Credential Profile template name ("L-2", "H-3")
    template_name: str  # tpm2_pytss.utils.create_ek_template name
    cert_index: int  # NV index of the EK certificate
    persistent_handle: int


EK_PROFILES: dict[str, EkProfile] = {p.name: p for p in (
    EkProfile("ecc", "L-2", "EK-ECC256", 0x01C0000A, 0x81010002),
    EkProfile("rsa", "L-1", "EK-RSA2048", 0x01C00002, 0x81010001),
    EkProfile("high-ecc256", "H-2", "EK-HIGH-ECC256", 0x01C00014, 0x81010014),
    EkProfile("high-ecc384", "H-3", "EK-HIGH-ECC384", 0x01C00016, 0x81010016),
    EkProfile("high-rsa2048", "H-1", "EK-HIGH-RSA2048", 0x01C00012, 0x81010012),
    EkProfile("high-rsa3072", "H-6", "EK-HIGH-RSA3072", 0x01C0001C, 0x8101001C),
)}  # fmt: skip
# The order the SDK looks for an EK certificate in NV (ECC first: faster on real TPMs).
EK_PROFILE_ORDER = tuple(EK_PROFILES)
# EK Credential Profile 2.2.1.5.2: NV indices holding the EK certificate chain (the CA
# certificates between an EK certificate and the vendor root), DER, one or more per index.
EK_CHAIN_FIRST_INDEX, EK_CHAIN_LAST_INDEX = 0x01C00100, 0x01C001FF


def ek_profile(name: str) -> EkProfile:
    try:
        return EK_PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown EK profile {name!r}; known: {', '.join(EK_PROFILES)}") from None
