"""Secrets at rest (issue 9, item 8; SECURITY-CHECKLIST 36), on served instances: file
modes, no plain secret kept, delegated signing keys in the HSM token (or encrypted),
no PIN on a child's command line, the operator credential kept as a hash and rotatable,
and the upgrade path for instances made before.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_sdk.notices import verify_notice
from simulators.served import BIN, ServedInstance
from tests.support.fleet import RevocationRig, SoftDevice, wait_for
from tests.support.stalls import tls_context

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def token_objects(instance: ServedInstance, kind: str = "privkey") -> str:
    """pkcs11-tool's listing of the instance token's objects (the PIN via environment)."""
    result = subprocess.run(
        ["pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", "enroll-ca", "--login",
         "--pin", "env:TOKEN_PIN", "--list-objects", "--type", kind], capture_output=True,
        text=True, timeout=60, env={**os.environ, "TOKEN_PIN": (
            instance.dir / "secrets/hsm.pin").read_text().strip(),
            "SOFTHSM2_CONF": str(instance.dir / "softhsm/softhsm2.conf")})
    assert result.returncode == 0, result.stderr
    return result.stdout


def token_public_key(instance: ServedInstance, label: str, workdir: Path) -> object:
    out = workdir / f"{label}.pub.der"
    subprocess.run(["pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", "enroll-ca",
                    "--read-object", "--type", "pubkey", "--label", label, "-o", str(out)],
                   check=True, capture_output=True, timeout=60, env={
                       **os.environ, "SOFTHSM2_CONF": str(instance.dir / "softhsm/softhsm2.conf")})
    return serialization.load_der_public_key(out.read_bytes())


def certificate_key(instance: ServedInstance, name: str) -> object:
    return x509.load_pem_x509_certificate(
        (instance.dir / f"ca/{name}.pem").read_bytes()).public_key()


def ocsp_verifies(instance: ServedInstance, device: SoftDevice, workdir: Path) -> str:
    issuer = workdir / "issuing-ca.pem"
    issuer.write_text(instance.trust_anchor.read_text().split("-----END CERTIFICATE-----")[0]
                      + "-----END CERTIFICATE-----\n")
    result = subprocess.run(["openssl", "ocsp", "-issuer", str(issuer), "-cert",
                             str(device.cert_path), "-url", instance.url + "/ocsp", "-CAfile",
                             str(instance.trust_anchor)], capture_output=True, text=True,
                            timeout=60)
    assert "Response verify OK" in result.stderr + result.stdout, result.stderr
    return result.stdout.split(f"{device.cert_path}: ", 1)[1].split()[0]


def outbox(instance: ServedInstance, device_id: str) -> list[tuple[str, str | None]]:
    import sqlite3

    uri = f"file:{instance.dir / 'enroll.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=10) as connection:
        return connection.execute("SELECT payload, sent_at FROM outbox_message WHERE "
                                  "device_id = ? ORDER BY id", (device_id,)).fetchall()


# -- the PKCS#11 instance with its broker and relay (tests/support/fleet.py) ----------


def test_instance_files_are_readable_by_the_service_user_only(
        instance: ServedInstance, rig: RevocationRig) -> None:  # fmt: skip
    rig.enroll("sar-files-1")  # something written: the WAL and the writer lock exist
    assert mode(instance.dir) == 0o700
    for suffix in ("", "-wal", "-shm", "-writer.lock"):
        assert mode(instance.dir / f"enroll.db{suffix}") == 0o600, suffix
    secret_files = [*instance.dir.glob("secrets/*"), *instance.dir.rglob("*.key"),
                    *instance.dir.glob("softhsm/tokens/**/*")]
    assert instance.dir / "mqtt/relays/main.key" in secret_files  # the relay's key
    assert {p.name: oct(mode(p)) for p in secret_files if mode(p) & 0o077} == {}


def test_no_secret_is_kept_in_plain_where_a_hash_or_nothing_would_do(
        instance: ServedInstance) -> None:
    secrets_dir = instance.dir / "secrets"
    assert sorted(p.name for p in secrets_dir.iterdir()) == ["hsm.pin", "root-ca.pass"]
    config = (instance.dir / "config.toml").read_text()
    assert instance.operator_credential and instance.operator_credential not in config
    assert tomllib.loads(config)["operator"]["credential_sha256"] == hashlib.sha256(
        instance.operator_credential.encode()).hexdigest()
    assert sorted(p.name for p in instance.dir.glob("ca/*.key")) == ["root-ca.key"]
    assert b"ENCRYPTED" in (instance.dir / "ca/root-ca.key").read_bytes()


def test_ocsp_and_notice_keys_live_in_the_token_and_sign_from_there(
        instance: ServedInstance, rig: RevocationRig, tmp_path: Path) -> None:  # fmt: skip
    listing = token_objects(instance)
    for label in ("issuing-ca", "ocsp-responder", "notice-signer"):
        block = listing.split(f"label:      {label}\n", 1)[1].split("Private Key Object")[0]
        assert "never extractable" in block and "sensitive" in block, listing
    for name in ("ocsp-responder", "notice-signer"):
        assert token_public_key(instance, name, tmp_path) == certificate_key(instance, name)
    device = rig.enroll("sar-ocsp-1")
    assert ocsp_verifies(instance, device, tmp_path) == "good"


def test_notices_wait_for_the_token_and_reach_the_device_signed(
        instance: ServedInstance, rig: RevocationRig, tmp_path: Path) -> None:  # fmt: skip
    """A revocation commits while the token refuses the PIN (checklist 21); its notices
    are held back, unsigned and unpublished, until the relay can sign them."""
    device = rig.enroll("sar-held-1")
    rig.stop_relay()
    subscriber = rig.subscribe(device, wait=120)
    wrong_pin = tmp_path / "wrong.pin"
    wrong_pin.write_text("0000\n")
    instance.cli("revoke", "--device", device.device_id, "--reason", "keyCompromise",
                 env_extra={"ENROLL_CA__PKCS11__PIN_FILE": str(wrong_pin)})
    held = outbox(instance, device.device_id)
    assert len(held) == 2 and all(payload.startswith("unsigned-notice:") and sent is None
                                  for payload, sent in held)
    rig.start_relay()  # the right PIN: it signs, then publishes
    assert wait_for(lambda: all(sent for _, sent in outbox(instance, device.device_id)), 120)
    received, _ = subscriber.communicate(timeout=150)
    anchors = x509.load_pem_x509_certificates(instance.trust_anchor.read_bytes())
    notice = verify_notice(received.strip(), anchors, device.device_id, None,
                           dt.datetime.now(dt.UTC))
    assert notice.type == "revocation" and notice.reason == "keyCompromise"


def test_the_relay_dies_with_the_server(instance: ServedInstance, rig: RevocationRig,
                                       tmp_path: Path) -> None:
    """`serve --with-relay`: SIGKILL the server, and its relay goes too (it used to stay)."""
    env = {**os.environ, **instance.env}
    instance.stop()
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen([str(BIN / "enroll-server"), "serve", "--config",
                                   str(instance.config), "--with-relay"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for(lambda: ": publishing to" in (tmp_path / "serve.log").read_text()
                        and relay_of(server.pid) is not None, 120)  # the relay is at work
        relay = relay_of(server.pid)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(30)
        assert wait_for(lambda: not running(relay), 120), "the relay outlived its server"
        assert "relay stopped after" in (tmp_path / "serve.log").read_text()  # gracefully
    finally:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 30
        while any(running(p) for p in _group(server.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        instance.start()


def relay_of(server_pid: int) -> int | None:
    for pid in _children(server_pid):
        if b"relay_child" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    return None


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def _group(pgid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    found.append(int(entry.name))
            except ProcessLookupError:
                pass
    return found


def running(pid: int | None) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a reaper)."""
    try:
        return pid is not None and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] \
            != "Z"
    except (OSError, IndexError):
        return False


# -- init, the operator credential and the upgrade path ---------------------------------


def test_init_puts_no_pin_on_any_child_process_command_line(tmp_path: Path) -> None:
    """Every child `init` starts is recorded by a Python audit hook (PEP 578) before it
    runs; none carries a PIN (softhsm2-util used to get both on its command line)."""
    record = tmp_path / "children.jsonl"
    hook = f"""
import json, sys
def hook(event, args):
    if event in ("subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn"):
        with open({str(record)!r}, "a") as out:
            out.write(json.dumps([str(a) for a in args[1]]) + "\\n")
sys.addaudithook(hook)
from enroll_server.cli import run
run()
"""
    result = subprocess.run([sys.executable, "-c", hook, "init", "--dir",
                             str(tmp_path / "inst")], capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    children = [json.loads(line) for line in record.read_text().splitlines()]
    assert any("enroll_server.ca.softhsm" in argv for argv in children), children
    pin = (tmp_path / "inst/secrets/hsm.pin").read_text().strip()
    for argv in children:
        assert not any(pin in arg for arg in argv), argv
        assert not any("pin" in arg.lower() for arg in argv), argv
    assert not (tmp_path / "inst/secrets/hsm-so.pin").exists()


@pytest.fixture
def file_instance(tmp_path: Path):
    served = ServedInstance(ca_key="file", directory=tmp_path / "instance")
    try:
        yield served
    finally:
        served.stop()


def api_status(instance: ServedInstance, credential: str) -> int:
    with httpx.Client(verify=tls_context(instance.trust_anchor), timeout=60) as client:
        return client.get(instance.url + "/api/v1/devices/nobody",
                          headers={"Authorization": f"Bearer {credential}"}).status_code


def test_operator_credential_rotates_and_only_its_hash_is_kept(
        file_instance: ServedInstance) -> None:
    instance = file_instance
    old = instance.operator_credential
    plain = instance.dir / "secrets/operator.token"  # as an older version left it
    plain.write_text(old + "\n")
    instance.start()
    assert "operator.token keeps the operator credential in plain" in instance.log_text()
    assert (api_status(instance, old), api_status(instance, "op_wrong")) == (404, 401)
    rotated = json.loads(instance.cli("operator", "rotate", "--json").stdout)
    new = rotated["operator_credential"]
    assert rotated["plain_file_removed"] == str(plain) and not plain.exists()
    assert new != old and new not in (instance.dir / "config.toml").read_text()
    instance.stop()
    instance.start()  # the server reads the new hash
    assert (api_status(instance, new), api_status(instance, old)) == (404, 401)
    audit = instance.cli_json("audit", "--limit", "5")
    assert any(event["action"] == "operator.rotate" for event in audit)


def test_file_backed_delegated_keys_are_encrypted_and_plain_ones_migrate_in_place(
        file_instance: ServedInstance) -> None:
    instance = file_instance
    passphrase = instance.dir / "secrets/delegated-keys.pass"
    assert mode(passphrase) == 0o600
    for name in ("ocsp-responder", "notice-signer"):
        assert (instance.dir / f"ca/{name}.key").read_bytes().startswith(
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    legacy = ec.generate_private_key(ec.SECP256R1())  # the layout before: a plain file
    (instance.dir / "ca/notice-signer.key").write_bytes(legacy.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (instance.dir / "enroll.db").chmod(0o644)  # as SQLite created it under umask 022
    instance.dir.chmod(0o755)
    instance.start()  # still loads, with a warning, and gets a certificate for it
    log = instance.log_text()
    assert "notice-signer.key is an unencrypted delegated signing key" in log
    assert f"tightened {instance.dir / 'enroll.db'}: 644 -> 600" in log
    assert mode(instance.dir / "enroll.db") == 0o600
    assert f"{instance.dir} is open to other users: chmod 700" in log  # named, not changed
    assert certificate_key(instance, "notice-signer") == legacy.public_key()
    migrated = json.loads(instance.cli("delegated-keys", "migrate", "--json").stdout)
    assert [row["key"] for row in migrated] == ["notice-signer"]
    reloaded = serialization.load_pem_private_key(
        (instance.dir / "ca/notice-signer.key").read_bytes(),
        passphrase.read_text().strip().encode())
    assert reloaded.public_key() == legacy.public_key()  # the same key, now encrypted
    assert json.loads(instance.cli("delegated-keys", "migrate", "--json").stdout) == []


def test_plain_delegated_keys_of_a_pkcs11_instance_move_into_the_token(
        tmp_path: Path) -> None:
    instance = ServedInstance(directory=tmp_path / "instance")
    rig = RevocationRig(instance, tmp_path / "rig")  # broker-config: devices to ask about
    try:
        legacy = ec.generate_private_key(ec.SECP256R1())
        (instance.dir / "ca/ocsp-responder.key").write_bytes(legacy.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        instance.start()
        assert "ocsp-responder.key is an unencrypted" in instance.log_text()
        device = rig.enroll("sar-legacy-1")
        assert certificate_key(instance, "ocsp-responder") == legacy.public_key()
        assert ocsp_verifies(instance, device, tmp_path) == "good"
        migrated = json.loads(instance.cli("delegated-keys", "migrate", "--json").stdout)
        assert [row["key"] for row in migrated] == ["ocsp-responder"]
        assert not (instance.dir / "ca/ocsp-responder.key").exists()
        instance.stop()
        instance.start()
        in_token = token_public_key(instance, "ocsp-responder", tmp_path)
        assert certificate_key(instance, "ocsp-responder") == in_token != legacy.public_key()
        assert ocsp_verifies(instance, device, tmp_path) == "good"
    finally:
        rig.close()
        instance.cleanup()
