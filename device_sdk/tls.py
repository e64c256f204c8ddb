"""TLS client authentication with the device key inside the TPM (tpm2-openssl provider).

The key file is a "TSS2 PRIVATE KEY" PEM: the device key's blob wrapped by the TPM's SRK,
useless without this TPM. Only the tpm2-openssl provider (OpenSSL 3) loads and signs
with it, so Python's ``ssl`` (which links the system libssl/libcrypto) needs that
provider. ``enable_tpm_provider`` does in-process what OPENSSL_CONF_TEXT does as a
config file (FIELD-NOTES, "TLS with a TPM key"), so it works whatever OPENSSL_CONF said
when the interpreter started, without a re-exec. Both need TPM2OPENSSL_TCTI, the TCTI of
a resource manager: "device:/dev/tpmrm0" on a device, tpm2-abrmd in tests (straight to
swtpm it fails for lack of object slots).

Caveats, measured with tpm2-openssl 1.1.1 / OpenSSL 3.0 (Debian 12):
- process wide: afterwards every OpenSSL operation of the system libcrypto in this
  process prefers the TPM's implementation (digests, random numbers, ECDSA), including
  the ones tss2-esys makes. ``cryptography`` is unaffected (its own static OpenSSL).
  Keep it to the agent process and use TLS from one thread at a time.
- TLS 1.3 only: a TLS 1.2 handshake with the TPM key fails ("no shared cipher" at the
  server), so ``tpm_client_context`` sets the minimum version to TLS 1.3.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import ssl
import threading
from pathlib import Path

TPM_PROVIDER = "tpm2"
DEFAULT_PROPERTIES = b"?provider=tpm2"
_lock = threading.Lock()
_enabled_tcti: str | None = None
OPENSSL_CONF_TEXT = """\
openssl_conf = openssl_init
[openssl_init]
providers = provider_sect
alg_section = evp_properties
[provider_sect]
default = default_sect
tpm2 = tpm2_sect
[default_sect]
activate = 1
[tpm2_sect]
activate = 1
[evp_properties]
default_properties = ?provider=tpm2
"""


class TpmTlsError(RuntimeError):
    """The tpm2-openssl provider could not be loaded (package tpm2-openssl missing?)."""


def _libcrypto() -> ctypes.CDLL:
    """The libcrypto that Python's ssl module uses (already mapped into this process)."""
    import _ssl  # noqa: F401 - make sure the system libssl/libcrypto are loaded

    path = None
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                name = line.rsplit(None, 1)[-1]
                if "/libcrypto.so" in name:
                    path = name
                    break
    except OSError:
        pass
    path = path or ctypes.util.find_library("crypto")
    if path is None:
        raise TpmTlsError("libcrypto not found")
    return ctypes.CDLL(path)


def enable_tpm_provider(tcti: str) -> None:
    """Load OpenSSL's default and tpm2 providers and prefer tpm2 (idempotent per TCTI)."""
    global _enabled_tcti
    with _lock:
        if _enabled_tcti == tcti:
            return
        if _enabled_tcti is not None:
            raise TpmTlsError(f"the tpm2 provider is already bound to {_enabled_tcti!r}")
        if ssl.OPENSSL_VERSION_INFO < (3, 0):
            raise TpmTlsError(f"{ssl.OPENSSL_VERSION}: the tpm2 provider needs OpenSSL 3")
        # The provider reads its TCTI from the environment when it is initialised.
        os.environ["TPM2OPENSSL_TCTI"] = tcti
        lib = _libcrypto()
        lib.OSSL_PROVIDER_load.restype = ctypes.c_void_p
        lib.OSSL_PROVIDER_load.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.EVP_set_default_properties.restype = ctypes.c_int
        lib.EVP_set_default_properties.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        # Loading any provider explicitly disables the implicit fallback to "default".
        if not lib.OSSL_PROVIDER_load(None, b"default"):
            raise TpmTlsError("OpenSSL could not load its default provider")
        if not lib.OSSL_PROVIDER_load(None, TPM_PROVIDER.encode()):
            raise TpmTlsError("OpenSSL could not load the tpm2 provider (apt-get install "
                              f"tpm2-openssl) or reach the TPM at {tcti!r}")
        if lib.EVP_set_default_properties(None, DEFAULT_PROPERTIES) != 1:
            raise TpmTlsError("EVP_set_default_properties failed")
        _enabled_tcti = tcti


def tpm_client_context(trust_anchor: Path, certificate: Path, tss2_key: Path,
                       tcti: str) -> ssl.SSLContext:
    """A TLS 1.3 client context that authenticates with the TPM-resident key."""
    enable_tpm_provider(tcti)
    context = ssl.create_default_context(cafile=str(trust_anchor))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(str(certificate), str(tss2_key))
    except ssl.SSLError as error:
        raise TpmTlsError(f"cannot use {tss2_key} with {certificate} through the tpm2 "
                          f"provider: {error}") from error
    return context
