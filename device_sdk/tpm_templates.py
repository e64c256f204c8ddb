"""Object templates of the device's TPM keys (device_sdk.tpm): SRK, AK, device key.

All ECC P-256 with nameAlg SHA-256, created under the owner hierarchy:

- SRK: restricted decrypt storage primary with AES-128-CFB, the TCG Provisioning Guidance
  template (the one tpm2-openssl and ``tpm2_createprimary -G ecc`` use).
- AK: restricted ECDSA-SHA256 signing key.
- device key: unrestricted signing key with scheme NULL.
"""

from __future__ import annotations

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
