"""CA private keys: a PKCS#11 (HSM) key that plugs into cryptography, and PEM file keys.

Checked with python-pkcs11 0.10.1 + SoftHSM 2.6.1 (pinned in tests/test_ca_keys.py):
``pkcs11.lib(path)`` dlopens and C_Initializes a module once per process; SoftHSM reads
SOFTHSM2_CONF and scans its tokens only in C_Initialize; it does not detect fork(); and
the pair is not thread safe. After any C_Finalize + C_Initialize, old session and object
handles are invalid and may be reused for other objects: they are forgotten, never used.

Login state belongs to the application and the token, not to a session (PKCS#11 v2.40
5.6): a second C_Login on the same token fails with CKR_USER_ALREADY_LOGGED_IN and any
C_Logout logs every session out. So every key of one token (e.g. the CA generations
issuing-ca, issuing-ca-2 ...) shares one logged-in session per process (_TokenSession).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pkcs11
from asn1crypto.core import OctetString
from asn1crypto.keys import ECDomainParameters
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import MultipleObjectsReturned, NoSuchKey, PKCS11Error
from pkcs11.util.ec import encode_named_curve_parameters

from ..errors import SignerUnavailable

_SIGN_HASHES = frozenset({"sha256", "sha384", "sha512"})
_SELF_TEST_DIGEST = hashlib.sha256(b"enroll_server.ca.keys self-test").digest()
_T = TypeVar("_T")

# One lock for every PKCS#11 call made by this process. Taken around fork() too, so a
# child never inherits it held (or the module mid-call) from another thread.
_PKCS11_LOCK = threading.Lock()
os.register_at_fork(before=_PKCS11_LOCK.acquire, after_in_parent=_PKCS11_LOCK.release,
                    after_in_child=_PKCS11_LOCK.release)


class KeyNotExtractable(TypeError):
    """The HSM key is CKA_SENSITIVE and not CKA_EXTRACTABLE: it only signs."""


@dataclass
class _Module:
    """A loaded PKCS#11 module; generation changes at every C_Initialize."""

    handle: Any  # pkcs11._pkcs11.lib
    pid: int
    generation: int = 0


_modules: dict[str, _Module] = {}


@dataclass(eq=False)
class _TokenSession:
    """The one logged-in session of a token in this process, shared by all its keys.

    Valid while the module's generation and pid are those it was opened under. A PKCS#11
    failure of any key drops it (_drop_token_session); every key then reconnects through
    a fresh one. Keys compare it by identity to learn that their object handles died.
    """

    session: Any  # pkcs11.Session, logged in as CKU_USER
    pin_sha256: bytes  # the PIN it was logged in with: a key with another PIN is refused
    generation: int
    pid: int


_token_sessions: dict[tuple[str, str], _TokenSession] = {}
_logins = 0  # C_Login calls made by this process (tests, metrics)


def login_count() -> int:
    """How many times this process logged in to a token (C_Login)."""
    return _logins


def _pin_sha256(pin: str) -> bytes:
    return hashlib.sha256(pin.encode()).digest()


def _live_token_session(module: _Module, key: tuple[str, str]) -> _TokenSession | None:
    shared = _token_sessions.get(key)
    if shared is not None and shared.pid == os.getpid() \
            and shared.generation == module.generation:
        return shared
    _token_sessions.pop(key, None)  # stale handles are forgotten, never closed
    return None


def _token_session(module_path: str, token_label: str, pin: str) -> _TokenSession:
    """The token's shared logged-in session, opened (C_OpenSession + C_Login) if there is
    none; the caller holds _PKCS11_LOCK."""
    global _logins
    module = _module(module_path)
    key = (module_path, token_label)
    shared = _live_token_session(module, key)
    if shared is not None:
        if not hmac.compare_digest(shared.pin_sha256, _pin_sha256(pin)):
            raise _KeyUnusable("PinIncorrect: the token is logged in with another PIN "
                               "in this process")
        return shared
    token = _find_token(module, token_label)
    _logins += 1
    try:
        session = token.open(user_pin=pin)
    except PKCS11Error:
        # python-pkcs11 leaves the session open when C_Login fails; C_Finalize is the
        # only way to close it, and real HSMs have few sessions to leak.
        _reinitialize(module)
        raise
    shared = _TokenSession(session, _pin_sha256(pin), module.generation, os.getpid())
    _token_sessions[key] = shared
    return shared


def _drop_token_session(module_path: str, token_label: str,
                        shared: _TokenSession | None) -> None:
    """Close the shared session (C_Logout + C_CloseSession) if it is still the live one;
    every key of the token reconnects at its next use. Caller holds _PKCS11_LOCK."""
    key = (module_path, token_label)
    if shared is None or _token_sessions.get(key) is not shared:
        return
    del _token_sessions[key]
    module = _modules.get(module_path)
    if module is not None and module.pid == os.getpid() \
            and module.generation == shared.generation:
        try:
            shared.session.close()
        except PKCS11Error:
            pass


def _module(path: str) -> _Module:
    """The loaded module, C_Initialized in this process (caller holds the lock)."""
    module = _modules.get(path)
    if module is None:
        module = _modules[path] = _Module(pkcs11.lib(path), os.getpid())
    elif module.pid != os.getpid():
        # A forked child: SoftHSM would even let it use the parent's handles, but
        # PKCS#11 v2.40 6.6.1 leaves that undefined and asks for its own C_Initialize.
        _reinitialize(module)
    return module


def _reinitialize(module: _Module) -> None:
    """C_Finalize + C_Initialize (PKCS#11 v2.40 5.4): invalidates every handle."""
    module.generation += 1
    try:
        module.handle.finalize()
    except PKCS11Error:
        pass  # e.g. CKR_CRYPTOKI_NOT_INITIALIZED from a module that does detect fork()
    module.handle.initialize()
    module.pid = os.getpid()


def _find_token(module: _Module, label: str) -> Any:
    """C_GetSlotList/C_GetTokenInfo, re-initialising once if the token is not seen."""
    try:
        return module.handle.get_token(token_label=label)
    except PKCS11Error:
        # SoftHSM: a token created or restored by another process is invisible, and one
        # whose directory vanished answers CKR_GENERAL_ERROR, until C_Initialize.
        _reinitialize(module)
        return module.handle.get_token(token_label=label)


def _curve_from_params(ec_params: bytes) -> ec.EllipticCurve:
    """CKA_EC_PARAMS (PKCS#11 v2.40 Current Mechanisms 2.3.3): a namedCurve OID."""
    oid = ECDomainParameters.load(ec_params).chosen.dotted
    return ec.get_curve_for_oid(x509.ObjectIdentifier(oid))()


def _public_key_from_point(ec_point: bytes, curve: ec.EllipticCurve) -> ec.EllipticCurvePublicKey:
    """CKA_EC_POINT is DER OCTET STRING-wrapped (SoftHSM, v2.40 2.3.3); accept raw too."""
    raw_length = 1 + 2 * ((curve.key_size + 7) // 8)
    point = ec_point if len(ec_point) == raw_length else OctetString.load(ec_point).native
    return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)


def _digest(data: bytes, algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
    """Hash in Python: SoftHSM has CKM_ECDSA but no CKM_ECDSA_SHA256."""
    if not isinstance(algorithm, ec.ECDSA) or algorithm.deterministic_signing:
        raise UnsupportedAlgorithm("the HSM CA key signs randomized ECDSA only")
    hash_algorithm = algorithm.algorithm
    if isinstance(hash_algorithm, Prehashed):
        if len(data) != hash_algorithm.digest_size:
            raise ValueError("prehashed data does not match the digest size")
        return bytes(data)
    if hash_algorithm.name not in _SIGN_HASHES:
        raise UnsupportedAlgorithm(f"{hash_algorithm.name} is not allowed for the CA key")
    hasher = hashes.Hash(hash_algorithm)
    hasher.update(data)
    return hasher.finalize()


def _raw_to_der(raw: bytes) -> bytes:
    """CKM_ECDSA returns r || s (v2.40 Current Mechanisms 2.3.1); X.509 wants DER."""
    half = len(raw) // 2
    if not raw or len(raw) % 2:
        raise ValueError("malformed CKM_ECDSA signature")
    return encode_dss_signature(int.from_bytes(raw[:half]), int.from_bytes(raw[half:]))


def generate_pkcs11_ec_key(module: Path, token_label: str, key_label: str, pin: str,
                           curve: ec.EllipticCurve = ec.SECP256R1()
                           ) -> ec.EllipticCurvePublicKey:
    """Generate a token-resident, sensitive, non-extractable EC key pair (C_GenerateKeyPair
    with CKM_EC_KEY_PAIR_GEN, PKCS#11 v2.40 Current Mechanisms 2.3.5); both halves carry
    key_label. Raises ValueError if any object already has that label."""
    public = ensure_pkcs11_ec_key(module, token_label, key_label, pin, curve)
    if public is None:
        raise ValueError(f"token {token_label!r} already holds an object labelled "
                         f"{key_label!r}")
    return public


def ensure_pkcs11_ec_key(module: Path, token_label: str, key_label: str, pin: str,
                         curve: ec.EllipticCurve = ec.SECP256R1()
                         ) -> ec.EllipticCurvePublicKey | None:
    """Like generate_pkcs11_ec_key, but a label already in use is no error: returns the
    new public key, or None when the token already holds objects labelled key_label.
    Not atomic across processes (PKCS#11 has no unique labels): callers serialise."""
    module_path = os.path.realpath(module)
    with _PKCS11_LOCK:
        loaded = _module(module_path)
        shared = _live_token_session(loaded, (module_path, token_label))
        if shared is not None:
            # Another key of this token is logged in here: a second C_Login would fail
            # and closing a logged-in session would log that key out. A new R/W session
            # is already in the user state (v2.40 5.6); closing it does no C_Logout.
            if not hmac.compare_digest(shared.pin_sha256, _pin_sha256(pin)):
                raise ValueError("the token is logged in with another PIN in this process")
            opened = shared.session.token.open(rw=True)
        else:
            opened = _find_token(loaded, token_label).open(rw=True, user_pin=pin)
        with opened as session:
            if list(session.get_objects({Attribute.LABEL: key_label})):
                return None
            key_id = os.urandom(16)  # CKA_ID pairs the halves (v2.40 4.4)
            public, _private = session.generate_keypair(
                KeyType.EC, id=key_id, label=key_label, store=True,
                mechanism=Mechanism.EC_KEY_PAIR_GEN,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                public_template={Attribute.EC_PARAMS: encode_named_curve_parameters(curve.name),
                                 Attribute.PRIVATE: False},
                private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                  Attribute.PRIVATE: True, Attribute.DERIVE: False})
            return _public_key_from_point(public[Attribute.EC_POINT], curve)


class Pkcs11PrivateKey(ec.EllipticCurvePrivateKey):
    """An EC CA key inside a PKCS#11 token, signing for cryptography's builders.

    The key uses its token's shared logged-in session (one per token per process, see
    the module doc), opened lazily and kept open; any number of key objects, for the
    same or different labels, may use one token. A PKCS#11 failure drops the shared
    session (every key of the token reconnects) and raises SignerUnavailable; a key's
    next attempt to reconnect waits reconnect_backoff seconds. A problem of this key
    alone (no such label, a different key under it, another PIN) drops only this key's
    handles. There is never a software fallback.
    """

    def __init__(self, module: Path, token_label: str, key_label: str, pin: str,
                 reconnect_backoff: float = 2.0) -> None:
        self._module_path = os.path.realpath(module)
        self._token_label = token_label
        self._key_label = key_label
        self._pin = pin
        self._backoff = reconnect_backoff
        self._shared: _TokenSession | None = None
        self._private: Any = None
        self._public: ec.EllipticCurvePublicKey | None = None
        self._retry_at = 0.0
        self.connect_attempts = 0  # times the module was asked for a session (metrics)
        self.last_error: str | None = None  # for the audit log and health reports

    def sibling(self, key_label: str, *, create: bool = False,
                public_key: ec.EllipticCurvePublicKey | None = None) -> Pkcs11PrivateKey:
        """Another key of the same token, with the same PIN and backoff (e.g. the OCSP
        responder's beside the CA's); with create, generated first if the token holds no
        key under key_label (raises SignerUnavailable if the token cannot be reached).
        public_key, if known (from its certificate), is pinned without a connection."""
        if create:
            try:
                ensure_pkcs11_ec_key(Path(self._module_path), self._token_label, key_label,
                                     self._pin)
            except PKCS11Error as exc:
                raise SignerUnavailable(retry_after=max(1, math.ceil(self._backoff)),
                                        detail=f"creating key {key_label!r} on token "
                                               f"{self._token_label!r}: "
                                               f"{type(exc).__name__} {exc}") from exc
        sibling = Pkcs11PrivateKey(Path(self._module_path), self._token_label, key_label,
                                   self._pin, self._backoff)
        sibling._public = public_key  # checked against the token's at the first connect
        return sibling

    @property
    def key_label(self) -> str:
        return self._key_label

    def __repr__(self) -> str:
        return (f"Pkcs11PrivateKey(module={self._module_path!r}, "
                f"token={self._token_label!r}, key={self._key_label!r})")

    # -- session handling (caller holds _PKCS11_LOCK) --------------------------------

    def _session_is_live(self) -> bool:
        shared = self._shared
        if shared is None or _token_sessions.get(
                (self._module_path, self._token_label)) is not shared:
            return False
        module = _modules.get(self._module_path)
        return (module is not None and module.pid == os.getpid()
                and module.generation == shared.generation)

    def _drop_session(self, shared: bool = True) -> None:
        """Forget this key's handles; with shared, also close the token's session."""
        if shared:
            _drop_token_session(self._module_path, self._token_label, self._shared)
        self._shared = self._private = None  # stale handles are forgotten, not closed

    def _connect(self) -> Any:
        """The token's session (C_OpenSession + C_Login if there is none yet), then
        C_FindObjects for this key and a sign/verify self-test."""
        self.connect_attempts += 1
        self._shared = _token_session(self._module_path, self._token_label, self._pin)
        session = self._shared.session
        try:
            private = session.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC,
                                      label=self._key_label)
            public_object = session.get_key(ObjectClass.PUBLIC_KEY, KeyType.EC,
                                            label=self._key_label)
        except (NoSuchKey, MultipleObjectsReturned) as exc:
            raise _KeyUnusable(f"{type(exc).__name__} {exc}") from exc
        try:
            curve = _curve_from_params(private[Attribute.EC_PARAMS])
            public = _public_key_from_point(public_object[Attribute.EC_POINT], curve)
            raw = private.sign(_SELF_TEST_DIGEST, mechanism=Mechanism.ECDSA)
            public.verify(_raw_to_der(raw), _SELF_TEST_DIGEST,
                          ec.ECDSA(Prehashed(hashes.SHA256())))
        except (InvalidSignature, ValueError, LookupError, AttributeError,
                UnsupportedAlgorithm) as exc:
            raise _KeyUnusable(f"unusable key pair: {type(exc).__name__} {exc}") from exc
        if self._public is not None and public != self._public:
            raise _KeyUnusable("the token now holds a different key under this label")
        self._private, self._public = private, public
        return private

    def _unavailable(self, detail: str) -> SignerUnavailable:
        retry_after = max(1, math.ceil(self._retry_at - time.monotonic()))
        return SignerUnavailable(retry_after=retry_after, detail=detail)

    def _private_key(self) -> Any:
        """The live private key object, (re)connecting if allowed; else SignerUnavailable."""
        if self._session_is_live() and self._private is not None:
            return self._private
        if time.monotonic() < self._retry_at:
            raise self._unavailable(f"PKCS#11 reconnect backoff; last error: {self.last_error}")
        self._drop_session(shared=False)  # the token's session may serve other keys
        return self._call(self._connect, "connect")

    def _call(self, operation: Callable[[], _T], what: str) -> _T:
        """Run one PKCS#11 operation; on failure drop the session and start the backoff."""
        try:
            result = operation()
        except (PKCS11Error, _KeyUnusable) as exc:
            # A token or session failure concerns every key of the token; a problem of
            # this key's objects or PIN only this key.
            self._drop_session(shared=not isinstance(exc, _KeyUnusable))
            self._retry_at = time.monotonic() + self._backoff
            # PKCS11Error texts name CKR codes and labels; the PIN is never in them.
            self.last_error = (f"{what} on token {self._token_label!r} key "
                               f"{self._key_label!r}: {type(exc).__name__} {exc}")
            raise self._unavailable(self.last_error) from exc
        self.last_error = None
        return result

    # -- cryptography's EllipticCurvePrivateKey --------------------------------------

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """ECDSA: hash here, C_Sign with CKM_ECDSA in the token, DER-encode r and s."""
        digest = _digest(data, signature_algorithm)
        with _PKCS11_LOCK:
            private = self._private_key()
            raw = self._call(lambda: private.sign(digest, mechanism=Mechanism.ECDSA), "C_Sign")
        return _raw_to_der(raw)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """Cached after the first connection; it also pins the key across reconnects."""
        if self._public is None:
            with _PKCS11_LOCK:
                self._private_key()
        assert self._public is not None
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self.public_key().curve

    @property
    def key_size(self) -> int:
        return self.public_key().curve.key_size

    def health(self) -> bool:
        """Reconnect if allowed and sign a test digest; False (see last_error) if unusable."""
        try:
            self.sign(_SELF_TEST_DIGEST, ec.ECDSA(Prehashed(hashes.SHA256())))
        except SignerUnavailable:
            return False
        return True

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise KeyNotExtractable("the HSM CA key is sign-only (CKA_DERIVE false)")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise KeyNotExtractable("the HSM CA key is not extractable (CKA_EXTRACTABLE false)")

    def private_bytes(self, encoding: serialization.Encoding,
                      format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption) -> bytes:
        raise KeyNotExtractable("the HSM CA key is not extractable (CKA_EXTRACTABLE false)")

    def __copy__(self) -> Pkcs11PrivateKey:
        return self  # a reference to one token object, like cryptography's own keys

    def __deepcopy__(self, memo: dict) -> Pkcs11PrivateKey:
        return self


class _KeyUnusable(Exception):
    """The labelled objects are no usable pair, or not the key this object used before."""


FileCAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def load_file_private_key(path: Path, passphrase: bytes | None) -> FileCAKey:
    """A PEM private key (PKCS#8 or traditional, encrypted if passphrase is given)."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), passphrase)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{path}: CA keys must be EC or RSA, not {type(key).__name__}")
    return key


def write_file_private_key(path: Path, key: FileCAKey, passphrase: bytes | None, *,
                           overwrite: bool = False) -> None:
    """Write key as PKCS#8 PEM, mode 0600, atomically: readers never see a partial file.

    Encrypted with BestAvailableEncryption when a passphrase is given. An existing file
    is only replaced with overwrite=True (a CA key is not something to lose by accident).
    """
    path = Path(path)
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase is not None
        else serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            encryption)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as handle:  # mkstemp creates it 0600
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # fails with FileExistsError, never clobbers
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    directory = os.open(path.parent, os.O_RDONLY)  # make the new name durable too
    os.fsync(directory)
    os.close(directory)
