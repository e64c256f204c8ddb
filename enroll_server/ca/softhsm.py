"""A new SoftHSM2 token under an instance directory, with no PIN on any command line.

``softhsm2-util --init-token`` takes the PINs as arguments, where every local user can
read them (``ps``, /proc/<pid>/cmdline), and reads them from a terminal only otherwise.
So the token is initialised through PKCS#11 itself, in a child process that gets the
PINs on its standard input: C_InitToken (PKCS#11 v2.40 5.5; python-pkcs11 0.10 has no
binding for it, so ctypes calls the module's exported function), then C_Login as the
security officer and C_InitPIN (5.6) for the user PIN. A child, because SoftHSM reads
SOFTHSM2_CONF (the token directory) only in C_Initialize, and the caller may already use
PKCS#11 with another configuration.

The SO PIN is random and forgotten unless the caller passes one: nothing needs it after
initialisation (a lost user PIN means a new token, as with any HSM whose SO PIN is gone).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
_CKR_OK = 0
_LABEL_BYTES = 32  # CK_TOKEN_INFO.label: blank padded, not NUL terminated


def init_softhsm_token(conf_path: Path, token_dir: Path, label: str, pin: str,
                       so_pin: str | None = None, module: Path = SOFTHSM_MODULE) -> None:
    """Write a SoftHSM2 config pointing at token_dir and initialise a token labelled
    ``label`` with user PIN ``pin`` in a free slot (so_pin: random and discarded if None)."""
    if not module.exists():
        raise RuntimeError(f"SoftHSM2 not found at {module}: install it "
                           "(apt-get install softhsm2)")
    if len(label.encode()) > _LABEL_BYTES:
        raise ValueError(f"a token label has at most {_LABEL_BYTES} bytes")
    token_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf_path.parent.mkdir(parents=True, exist_ok=True)
    conf_path.write_text(f"directories.tokendir = {token_dir}\n"
                         "objectstore.backend = file\nlog.level = ERROR\n")
    secrets_in = json.dumps({"module": str(module), "label": label, "pin": pin,
                             "so_pin": so_pin or secrets.token_hex(16)})
    result = subprocess.run([sys.executable, "-m", "enroll_server.ca.softhsm"],
                            input=secrets_in, env={**os.environ, "SOFTHSM2_CONF": str(conf_path)},
                            capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"could not initialise SoftHSM token {label!r} "
                           f"({result.stderr.strip() or result.returncode}); check {conf_path}")


def _initialise_free_slot(module: str, label: str, pin: str, so_pin: str) -> None:
    """In the child: C_InitToken on the first slot whose token is not initialised."""
    import pkcs11
    from pkcs11 import TokenFlag

    library = pkcs11.lib(module)
    free = [slot for slot in library.get_slots(token_present=True)
            if not slot.get_token().flags & TokenFlag.TOKEN_INITIALIZED]
    if not free:
        raise RuntimeError("no free slot (SoftHSM always offers one: check SOFTHSM2_CONF)")
    slot = free[0]
    init_token = ctypes.CDLL(module).C_InitToken  # the module python-pkcs11 initialised
    init_token.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    init_token.restype = ctypes.c_ulong
    so_pin_bytes = so_pin.encode()
    rv = init_token(slot.slot_id, so_pin_bytes, len(so_pin_bytes),
                    label.encode().ljust(_LABEL_BYTES))
    if rv != _CKR_OK:
        raise RuntimeError(f"C_InitToken failed: CKR 0x{rv:08x}")
    with slot.get_token().open(rw=True, so_pin=so_pin) as session:
        session.init_pin(pin)


if __name__ == "__main__":
    request = json.loads(sys.stdin.read())
    try:
        _initialise_free_slot(request["module"], request["label"], request["pin"],
                              request["so_pin"])
    except Exception as exc:  # noqa: BLE001 - reported to the parent, PINs never echoed
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
