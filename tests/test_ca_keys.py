"""CA keys against a real SoftHSM2 token (no mocks).

SoftHSM reads SOFTHSM2_CONF only in C_Initialize, and python-pkcs11 initialises a module
once per process, so all tests share one SoftHSM config whose token directory is a
session temp dir; each test initialises its own token (distinct label) in it. A token
created after C_Initialize is invisible until the module is re-initialised, which
enroll_server.ca.keys does by itself when a token is not found.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import stat
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, ObjectClass

from enroll_server.ca.keys import (
    KeyNotExtractable,
    Pkcs11PrivateKey,
    generate_pkcs11_ec_key,
    load_file_private_key,
    login_count,
    write_file_private_key,
)
from enroll_server.ca.softhsm import init_softhsm_token
from enroll_server.errors import SignerUnavailable

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
PIN = "user-pin-4711"
SO_PIN = "so-pin-0815"


def test_softhsm_is_installed():
    """A missing SoftHSM is a failure, never a skip: `make test` installs it."""
    assert MODULE.exists() and shutil.which("softhsm2-util"), \
        "SoftHSM2 is not installed (apt-get install softhsm2; `make test` does this)"


@dataclass
class HsmToken:
    label: str
    directory: Path  # SoftHSM's per-token directory inside tokendir


@pytest.fixture(scope="session")
def softhsm_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("softhsm")
    return base / "softhsm2.conf", base / "tokens"


@pytest.fixture
def token(softhsm_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> HsmToken:
    conf, token_dir = softhsm_dirs
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    before = set(token_dir.iterdir()) if token_dir.exists() else set()
    label = f"t-{uuid.uuid4().hex[:12]}"
    init_softhsm_token(conf, token_dir, label, PIN, SO_PIN)
    (directory,) = set(token_dir.iterdir()) - before
    return HsmToken(label, directory)


def _self_signed(key: ec.EllipticCurvePrivateKey, public: ec.EllipticCurvePublicKey,
                 algorithm: hashes.HashAlgorithm) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "HSM test CA")])
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, algorithm))


def _verify(public: ec.EllipticCurvePublicKey, signature: bytes, message: bytes) -> None:
    public.verify(signature, message, ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize(("curve", "algorithm"), [(ec.SECP256R1(), hashes.SHA256()),
                                                  (ec.SECP384R1(), hashes.SHA384())],
                         ids=["P-256", "P-384"])
def test_certificate_signed_in_hsm_verifies_with_generated_public_key(
        token: HsmToken, curve: ec.EllipticCurve, algorithm: hashes.HashAlgorithm) -> None:
    public = generate_pkcs11_ec_key(MODULE, token.label, "ca", PIN, curve)
    key = Pkcs11PrivateKey(MODULE, token.label, "ca", PIN)

    certificate = _self_signed(key, public, algorithm)

    certificate.verify_directly_issued_by(certificate)
    assert certificate.public_key() == public == key.public_key()
    assert certificate.signature_hash_algorithm.name == algorithm.name
    assert (key.curve.name, key.key_size) == (curve.name, curve.key_size)


def test_crl_and_ocsp_response_signed_in_hsm_verify(token: HsmToken) -> None:
    public = generate_pkcs11_ec_key(MODULE, token.label, "ca", PIN)
    key = Pkcs11PrivateKey(MODULE, token.label, "ca", PIN)
    ca = _self_signed(key, public, hashes.SHA256())
    now = dt.datetime.now(dt.UTC)

    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
           .last_update(now).next_update(now + dt.timedelta(hours=1)).sign(key, hashes.SHA256()))
    response = ocsp.OCSPResponseBuilder().add_response(
        cert=ca, issuer=ca, algorithm=hashes.SHA256(), cert_status=ocsp.OCSPCertStatus.GOOD,
        this_update=now, next_update=None, revocation_time=None, revocation_reason=None,
    ).responder_id(ocsp.OCSPResponderEncoding.HASH, ca).sign(key, hashes.SHA256())

    assert crl.is_signature_valid(public)
    _verify(public, response.signature, response.tbs_response_bytes)


def test_generated_key_is_token_resident_sensitive_and_not_extractable(token: HsmToken) -> None:
    generate_pkcs11_ec_key(MODULE, token.label, "ca", PIN)
    library = pkcs11.lib(os.path.realpath(MODULE))
    with library.get_token(token_label=token.label).open(user_pin=PIN) as session:
        private = session.get_key(ObjectClass.PRIVATE_KEY, label="ca")
        assert private[Attribute.TOKEN] is True
        assert private[Attribute.SENSITIVE] is True
        assert private[Attribute.EXTRACTABLE] is False
        assert private[Attribute.DERIVE] is False
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            private[Attribute.VALUE]

    key = Pkcs11PrivateKey(MODULE, token.label, "ca", PIN)
    with pytest.raises(KeyNotExtractable):
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    with pytest.raises(KeyNotExtractable):
        key.private_numbers()


def test_generate_refuses_an_existing_label(token: HsmToken) -> None:
    first = generate_pkcs11_ec_key(MODULE, token.label, "ca", PIN)
    with pytest.raises(ValueError, match="already holds"):
        generate_pkcs11_ec_key(MODULE, token.label, "ca", PIN)
    assert Pkcs11PrivateKey(MODULE, token.label, "ca", PIN).public_key() == first


def test_eight_threads_signing_concurrently_all_verify(token: HsmToken) -> None:
    public = generate_pkcs11_ec_key(MODULE, token.label, "ca", PIN)
    key = Pkcs11PrivateKey(MODULE, token.label, "ca", PIN)
    results: list[tuple[bytes, bytes]] = []
    errors: list[BaseException] = []

    def worker(number: int) -> None:
        try:
            for index in range(50):
                message = f"{number}/{index}".encode()
                results.append((message, key.sign(message, ec.ECDSA(hashes.SHA256()))))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(results) == 400
    for message, signature in results:
        _verify(public, signature, message)
    assert key.connect_attempts == 1  # one session, kept open


def test_wrong_pin_is_signer_unavailable_without_leaking_the_pin(token: HsmToken) -> None:
    generate_pkcs11_ec_key(MODULE, token.label, "ca", PIN)
    wrong_pin = "wrong-pin-93817"
    key = Pkcs11PrivateKey(MODULE, token.label, "ca", wrong_pin)

    with pytest.raises(SignerUnavailable) as raised:
        key.sign(b"tbs", ec.ECDSA(hashes.SHA256()))

    error = raised.value
    assert error.code == "ca.signer_unavailable"
    assert error.retry_after >= 1
    assert "PinIncorrect" in error.detail
    for text in (str(error), error.detail, error.public, repr(key)):
        assert wrong_pin not in text and PIN not in text
    # The correct PIN still works: the failed login left nothing behind.
    assert Pkcs11PrivateKey(MODULE, token.label, "ca", PIN).health()


def test_missing_key_or_module_is_signer_unavailable(token: HsmToken, tmp_path: Path) -> None:
    generate_pkcs11_ec_key(MODULE, token.label, "ca", PIN)
    with pytest.raises(SignerUnavailable, match="NoSuchKey"):
        Pkcs11PrivateKey(MODULE, token.label, "other", PIN).public_key()
    with pytest.raises(SignerUnavailable, match="NoSuchToken"):
        Pkcs11PrivateKey(MODULE, "no-such-token", "ca", PIN).sign(b"x", ec.ECDSA(hashes.SHA256()))
    missing_module = Pkcs11PrivateKey(tmp_path / "missing.so", token.label, "ca", PIN)
    with pytest.raises(SignerUnavailable, match="loading"):
        missing_module.sign(b"x", ec.ECDSA(hashes.SHA256()))
    assert not missing_module.health()


def test_token_removed_and_restored_recovers_after_backoff(token: HsmToken,
                                                           tmp_path: Path) -> None:
    # What SoftHSM 2.6.1 does when a token's directory disappears under a live session:
    # C_Sign on the old handle fails with CKR_OBJECT_HANDLE_INVALID, C_FindObjects finds
    # nothing and C_GetTokenInfo answers CKR_GENERAL_ERROR. Moving the directory back is
    # not noticed until C_Finalize + C_Initialize (re-initialising the slot with
    # softhsm2-util instead just erases the key: the token label stays, the key is gone).
    public = generate_pkcs11_ec_key(MODULE, token.label, "ca", PIN)
    key = Pkcs11PrivateKey(MODULE, token.label, "ca", PIN, reconnect_backoff=0.1)
    _verify(public, key.sign(b"before", ec.ECDSA(hashes.SHA256())), b"before")
    assert key.health()

    shutil.move(token.directory, tmp_path / "unplugged")
    with pytest.raises(SignerUnavailable, match="ObjectHandleInvalid") as raised:
        key.sign(b"during", ec.ECDSA(hashes.SHA256()))
    assert raised.value.retry_after >= 1
    attempts = key.connect_attempts

    started = time.monotonic()  # inside the 0.1 s window: refused without a library call
    with pytest.raises(SignerUnavailable, match="backoff") as raised:
        key.sign(b"during", ec.ECDSA(hashes.SHA256()))
    assert time.monotonic() - started < 0.05
    assert raised.value.retry_after >= 1
    assert key.connect_attempts == attempts

    time.sleep(0.15)  # after the window: a reconnect is tried, and the token is still gone
    with pytest.raises(SignerUnavailable, match="NoSuchToken"):
        key.sign(b"during", ec.ECDSA(hashes.SHA256()))
    assert key.connect_attempts == attempts + 1
    assert not key.health()

    shutil.move(tmp_path / "unplugged", token.directory)
    time.sleep(0.15)
    _verify(public, key.sign(b"after", ec.ECDSA(hashes.SHA256())), b"after")
    assert key.health() and key.last_error is None


def test_backoff_window_touches_no_library(token: HsmToken, tmp_path: Path) -> None:
    generate_pkcs11_ec_key(MODULE, token.label, "ca", PIN)
    key = Pkcs11PrivateKey(MODULE, token.label, "ca", PIN, reconnect_backoff=30)
    key.sign(b"before", ec.ECDSA(hashes.SHA256()))
    shutil.move(token.directory, tmp_path / "unplugged")
    with pytest.raises(SignerUnavailable):
        key.sign(b"during", ec.ECDSA(hashes.SHA256()))
    shutil.move(tmp_path / "unplugged", token.directory)  # a library call would now succeed
    attempts, first_error = key.connect_attempts, key.last_error

    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(SignerUnavailable) as raised:
            key.sign(b"during", ec.ECDSA(hashes.SHA256()))
        assert time.monotonic() - started < 0.05
        assert 1 <= raised.value.retry_after <= 30
    assert not key.health()
    assert key.connect_attempts == attempts
    assert key.last_error == first_error  # the cause is kept, not buried under "backoff"


def test_key_replaced_under_the_same_label_is_refused(token: HsmToken) -> None:
    public = generate_pkcs11_ec_key(MODULE, token.label, "ca", PIN)
    key = Pkcs11PrivateKey(MODULE, token.label, "ca", PIN, reconnect_backoff=0.1)
    _verify(public, key.sign(b"before", ec.ECDSA(hashes.SHA256())), b"before")

    # Another process re-initialises the token (erasing it) and a new "ca" key appears.
    subprocess.run(["softhsm2-util", "--init-token", "--token", token.label, "--label",
                    token.label, "--pin", PIN, "--so-pin", SO_PIN], check=True,
                   capture_output=True)
    with pytest.raises(SignerUnavailable, match="ObjectHandleInvalid"):
        key.sign(b"erased", ec.ECDSA(hashes.SHA256()))
    replacement = generate_pkcs11_ec_key(MODULE, token.label, "ca", PIN)
    time.sleep(0.15)

    with pytest.raises(SignerUnavailable, match="different key"):
        key.sign(b"after", ec.ECDSA(hashes.SHA256()))
    assert key.public_key() == public != replacement


def test_two_keys_of_one_token_share_one_login_and_recover_together(token: HsmToken,
                                                                   tmp_path: Path) -> None:
    """CA generations (issuing-ca, issuing-ca-2) live in one token and one process signs
    with both: one C_Login for the token, a key generated meanwhile needs none, a
    failure of one key's session reconnects both, and neither falls back to the other."""
    first_public = generate_pkcs11_ec_key(MODULE, token.label, "issuing-ca", PIN)
    first = Pkcs11PrivateKey(MODULE, token.label, "issuing-ca", PIN, reconnect_backoff=0.1)
    _verify(first_public, first.sign(b"one", ec.ECDSA(hashes.SHA256())), b"one")
    logins = login_count()

    # A rotation: the new key is generated while the first one is logged in.
    second_public = generate_pkcs11_ec_key(MODULE, token.label, "issuing-ca-2", PIN)
    second = Pkcs11PrivateKey(MODULE, token.label, "issuing-ca-2", PIN, reconnect_backoff=0.1)
    for _ in range(3):
        _verify(second_public, second.sign(b"two", ec.ECDSA(hashes.SHA256())), b"two")
        _verify(first_public, first.sign(b"one", ec.ECDSA(hashes.SHA256())), b"one")
    assert second_public != first_public
    assert login_count() == logins  # no second C_Login (it would fail: already logged in)
    assert first.health() and second.health()

    # Another key object for the same label, and one with a wrong PIN: the wrong PIN is
    # refused although the token is logged in, and the others are untouched by it.
    assert Pkcs11PrivateKey(MODULE, token.label, "issuing-ca", PIN).public_key() == first_public
    with pytest.raises(SignerUnavailable, match="PinIncorrect"):
        Pkcs11PrivateKey(MODULE, token.label, "issuing-ca-2", "wrong-pin").sign(
            b"x", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(SignerUnavailable, match="NoSuchKey"):
        Pkcs11PrivateKey(MODULE, token.label, "issuing-ca-9", PIN).public_key()
    _verify(first_public, first.sign(b"one", ec.ECDSA(hashes.SHA256())), b"one")
    assert login_count() == logins

    # The token goes away under the shared session: whichever key notices first drops it,
    # both fail (no fallback to the other key) and both recover through one new login.
    shutil.move(token.directory, tmp_path / "unplugged")
    with pytest.raises(SignerUnavailable):
        first.sign(b"during", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(SignerUnavailable):
        second.sign(b"during", ec.ECDSA(hashes.SHA256()))
    shutil.move(tmp_path / "unplugged", token.directory)
    time.sleep(0.15)
    _verify(second_public, second.sign(b"after", ec.ECDSA(hashes.SHA256())), b"after")
    _verify(first_public, first.sign(b"after", ec.ECDSA(hashes.SHA256())), b"after")
    assert login_count() == logins + 1
    assert first.public_key() == first_public and second.public_key() == second_public


def _wait(pid: int, timeout: float = 20.0) -> int:
    """The child's exit code; kills it and fails if it hangs (a deadlocked lock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("forked child hung")


def _fork_and_sign(key: Pkcs11PrivateKey, public: ec.EllipticCurvePublicKey) -> int:
    attempts = key.connect_attempts
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            _verify(public, key.sign(b"child", ec.ECDSA(hashes.SHA256())), b"child")
            code = 0 if key.connect_attempts == attempts + 1 else 2  # its own session
        finally:
            os._exit(code)
    return _wait(pid)


def test_forked_child_opens_its_own_session_and_parent_keeps_its_own(token: HsmToken) -> None:
    public = generate_pkcs11_ec_key(MODULE, token.label, "ca", PIN)
    key = Pkcs11PrivateKey(MODULE, token.label, "ca", PIN)
    _verify(public, key.sign(b"parent", ec.ECDSA(hashes.SHA256())), b"parent")

    assert _fork_and_sign(key, public) == 0

    _verify(public, key.sign(b"parent again", ec.ECDSA(hashes.SHA256())), b"parent again")
    assert key.connect_attempts == 1  # the child's C_Finalize did not touch our session


def test_fork_while_another_thread_signs_does_not_deadlock(token: HsmToken) -> None:
    public = generate_pkcs11_ec_key(MODULE, token.label, "ca", PIN)
    key = Pkcs11PrivateKey(MODULE, token.label, "ca", PIN)
    key.sign(b"connect first", ec.ECDSA(hashes.SHA256()))
    stop = threading.Event()

    def sign_until_stopped() -> None:
        while not stop.is_set():
            key.sign(b"busy", ec.ECDSA(hashes.SHA256()))

    signer = threading.Thread(target=sign_until_stopped)
    signer.start()
    try:
        exit_codes = [_fork_and_sign(key, public) for _ in range(10)]
    finally:
        stop.set()
        signer.join()
    assert exit_codes == [0] * 10


def test_file_key_round_trip_is_0600_encrypted_and_never_clobbered(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ca.key"

    write_file_private_key(path, key, b"passphrase")

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()
    assert load_file_private_key(path, b"passphrase").public_key() == key.public_key()
    with pytest.raises(ValueError):
        load_file_private_key(path, b"wrong")
    with pytest.raises(FileExistsError):
        write_file_private_key(path, ec.generate_private_key(ec.SECP256R1()), None)
    assert load_file_private_key(path, b"passphrase").public_key() == key.public_key()
    assert [entry.name for entry in tmp_path.iterdir()] == ["ca.key"]  # no temp left


def test_init_softhsm_token_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="apt-get install softhsm2"):
        init_softhsm_token(tmp_path / "c.conf", tmp_path / "tokens", "t", PIN, SO_PIN,
                           module=tmp_path / "libsofthsm2.so")
