"""`enroll-server ca rotate` against a real served instance (SoftHSM CA keys, one token),
Mosquitto, the relay and the OpenSSL command line tools.

Six devices enroll from the first CA (issuing-ca); the operator rotates; the server
reloads on SIGHUP. Then: new certificates come from issuing-ca-2 and point at its CRL;
an old device re-enrolls over mTLS with its old-CA certificate and gets a new-CA one; a
revocation of an old-CA certificate appears in the old CA's CRL (signed by the old CA)
and in `openssl ocsp` (the old CA's own responder); Mosquitto takes both CAs' CRLs;
every active device got exactly one signed ca_rotation notice with its own renew_after
in the window; clients that trust only the root keep working; the EST server's and the
broker's TLS certificates come from the new CA, so clients that trust only the new
issuing CA (or only the root) connect to both, and a relay started afterwards publishes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509 import ocsp

from device_sdk.est import decode_certs_only
from device_sdk.notices import verify_notice
from simulators.served import ServedInstance
from tests.support.est_helpers import csr_der, db_rows, ec_key, est_body, make_csr
from tests.support.fleet import RevocationRig, SoftDevice, wait_for

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker

SPREAD = dt.timedelta(hours=1)


@dataclass
class Rotated:
    instance: ServedInstance
    rig: RevocationRig
    workdir: Path
    old: list[SoftDevice]  # enrolled from issuing-ca before the rotation
    gone: SoftDevice  # revoked before the rotation: no notice for it
    old_ca: x509.Certificate
    new_ca: x509.Certificate
    root: x509.Certificate
    rotation: dict
    rotated_at: dt.datetime
    before_reload: httpx.Response  # an enrollment between rotate and SIGHUP
    pending_token: str  # its token, refused then, usable after the reload

    def write(self, name: str, *certificates: x509.Certificate) -> Path:
        path = self.workdir / name
        path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                                  for c in certificates))
        return path


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)


def pem_file(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def context(instance: ServedInstance, device: SoftDevice | None = None,
            cafile: Path | None = None) -> ssl.SSLContext:
    tls = ssl.create_default_context(cafile=str(cafile or instance.trust_anchor))
    if device is not None:
        tls.load_cert_chain(device.cert_path, device.key_path)
    return tls


def enroll_with(instance: ServedInstance, token: str, device_id: str) -> httpx.Response:
    return httpx.post(instance.url + "/.well-known/est/simpleenroll",
                      content=est_body(csr_der(make_csr(ec_key(), device_id))),
                      headers={"Content-Type": "application/pkcs10",
                               "Authorization": f"Bearer {token}"},
                      verify=context(instance), timeout=30)


def reenroll(instance: ServedInstance, device: SoftDevice,
             cafile: Path | None = None) -> httpx.Response:
    key = load_pem_private_key(device.key_path.read_bytes(), None)
    return httpx.post(instance.url + "/.well-known/est/simplereenroll",
                      content=est_body(csr_der(make_csr(key, device.device_id))),
                      headers={"Content-Type": "application/pkcs10"},
                      verify=context(instance, device, cafile), timeout=30)


def cacerts(instance: ServedInstance, cafile: Path | None = None) -> list[x509.Certificate]:
    response = httpx.get(instance.url + "/.well-known/est/cacerts",
                         verify=context(instance, cafile=cafile), timeout=10)
    assert response.status_code == 200, response.text
    return decode_certs_only(response.content)


def fetch_crl(instance: ServedInstance, name: str) -> x509.CertificateRevocationList:
    response = httpx.get(f"{instance.url}/crl/{name}.crl", verify=context(instance))
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/pkix-crl"
    return x509.load_der_x509_crl(response.content)


def crl_pem(crls: list[x509.CertificateRevocationList], path: Path) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls))
    return path


def crl_verifies(cafile: Path, crl_file: Path, certificate: Path) -> bool:
    result = openssl("verify", "-crl_check", "-CAfile", str(cafile), "-CRLfile",
                     str(crl_file), str(certificate))
    return result.returncode == 0


def ocsp_answer(world: Rotated, issuer: x509.Certificate, device: SoftDevice,
                by_serial: bool = False) -> tuple[str, ocsp.OCSPResponse]:
    """`openssl ocsp` status of device's certificate, and the response it verified
    (trusting only the root). by_serial: ask about the serial under issuer."""
    issuer_file = world.write(f"issuer-{issuer.serial_number}.pem", issuer)
    respout = world.workdir / f"{device.device_id}.ocsp.der"
    subject = f"0x{device.serial:x}" if by_serial else str(device.cert_path)
    result = openssl("ocsp", "-issuer", str(issuer_file),
                     *(("-serial",) if by_serial else ("-cert",)), subject,
                     "-url", world.instance.url + "/ocsp",
                     "-CAfile", str(world.write("root-only.pem", world.root)),
                     "-respout", str(respout))
    assert "Response verify OK" in result.stderr + result.stdout, result.stderr
    status = result.stdout.split(f"{subject}: ", 1)[1].split()[0]
    return status, ocsp.load_der_ocsp_response(respout.read_bytes())


def certificate_of(device: SoftDevice) -> x509.Certificate:
    return x509.load_pem_x509_certificate(device.cert_path.read_bytes())


def renewed(device: SoftDevice, response: httpx.Response, workdir: Path) -> SoftDevice:
    """The device after a re-enrollment: the new certificate, the same key."""
    assert response.status_code == 200, response.text
    certificate = decode_certs_only(response.content)[0]
    path = workdir / f"{device.device_id}.renewed.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return SoftDevice(device.device_id, device.group, path, device.key_path,
                      certificate.serial_number)


def issuing_cas(instance: ServedInstance, cafile: Path | None = None) -> set[x509.Certificate]:
    """What /cacerts returns (a certs-only SET: DER order, not chain order), as a set."""
    return set(cacerts(instance, cafile))


def reloaded(instance: ServedInstance, new_ca: x509.Certificate) -> bool:
    """Every worker serves the new CA (new connections, so several workers answer)."""
    return all(new_ca in issuing_cas(instance) for _ in range(8))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rotated]:
    workdir = tmp_path_factory.mktemp("rotation")
    instance = ServedInstance()
    rig = None
    try:
        instance.start()
        rig = RevocationRig(instance, workdir).start()
        old = [rig.enroll(f"rot-old-{number}") for number in range(6)]
        gone = rig.enroll("rot-gone-1")
        instance.cli("revoke", "--device", gone.device_id)
        old_ca, root = pem_file(instance.trust_anchor)
        pending_token = instance.token()
        rotated_at = dt.datetime.now(dt.UTC)
        rotation = instance.cli_json("ca", "rotate", "--spread", "1h")
        new_ca = x509.load_pem_x509_certificate(Path(rotation["certificate"]).read_bytes())
        # The server has not reloaded: it must not sign with the retired CA.
        before_reload = enroll_with(instance, pending_token, "rot-early-1")
        os.kill(instance.process.pid, signal.SIGHUP)
        assert wait_for(lambda: reloaded(instance, new_ca), 30), instance.log_text()[-3000:]
        yield Rotated(instance, rig, workdir, old, gone, old_ca, new_ca, root, rotation,
                      rotated_at, before_reload, pending_token)
    finally:
        if rig is not None:
            rig.close()
        instance.cleanup()


def test_rotation_records_a_new_active_ca_from_the_same_root(world: Rotated) -> None:
    rotation = world.rotation
    assert (rotation["active"], rotation["retired"]) == ("issuing-ca-2", ["issuing-ca"])
    assert rotation["notices"] == 6 and rotation["crl_number"] == 1
    new_ca, old_ca, root = world.new_ca, world.old_ca, world.root
    new_ca.verify_directly_issued_by(root)
    assert new_ca.subject != old_ca.subject and new_ca.public_key() != old_ca.public_key()
    assert new_ca.subject.rfc4514_string() == "CN=Enroll Fleet Issuing CA 2,O=Enroll Fleet"
    assert pem_file(world.instance.trust_anchor) == [new_ca, root]  # rewritten for clients
    listed = {row["name"]: row for row in world.instance.cli_json("ca", "list")}
    assert listed["issuing-ca"]["status"] == "retired" and listed["issuing-ca"]["live"]
    assert listed["issuing-ca-2"]["status"] == "active"
    assert listed["issuing-ca-2"]["key"].endswith("/issuing-ca-2")  # same token, new label
    # Between `ca rotate` and the reload the server refused to issue from the old CA
    # (503, retry), and the refused request did not use up its token.
    assert world.before_reload.status_code == 503
    assert world.before_reload.headers["X-Error-Code"] == "ca.rotated"
    assert int(world.before_reload.headers["Retry-After"]) >= 1


def test_new_enrollments_come_from_the_new_ca_and_point_at_its_crl(world: Rotated) -> None:
    instance = world.instance
    response = enroll_with(instance, world.pending_token, "rot-early-1")
    assert response.status_code == 200, response.text
    fresh = world.rig.enroll("rot-new-1")
    for certificate in (decode_certs_only(response.content)[0], certificate_of(fresh)):
        certificate.verify_directly_issued_by(world.new_ca)
        points = certificate.extensions.get_extension_for_class(
            x509.CRLDistributionPoints).value
        assert points[0].full_name[0].value == f"{instance.url}/crl/issuing-ca-2.crl"
        access = certificate.extensions.get_extension_for_class(
            x509.AuthorityInformationAccess).value
        issuers = [a.access_location.value for a in access
                   if a.access_method == x509.AuthorityInformationAccessOID.CA_ISSUERS]
        assert issuers == [f"{instance.url}/ca/issuing-ca-2.der"]
        served = httpx.get(issuers[0], verify=context(instance))
        assert x509.load_der_x509_certificate(served.content) == world.new_ca
    assert db_rows(instance, "SELECT issuer FROM certificate WHERE serial = ?",
                   (str(fresh.serial),)) == [("issuing-ca-2",)]
    assert db_rows(instance, "SELECT DISTINCT issuer FROM certificate WHERE device_id IN "
                   "(SELECT id FROM device WHERE device_id LIKE 'rot-old-%')") == [
        ("issuing-ca",)]
    old_served = httpx.get(f"{instance.url}/ca/issuing-ca.der", verify=context(instance))
    assert x509.load_der_x509_certificate(old_served.content) == world.old_ca
    assert httpx.get(f"{instance.url}/crl/issuing-ca-9.crl",
                     verify=context(instance)).status_code == 404


def test_an_old_device_reenrolls_over_mtls_with_its_old_ca_certificate(world: Rotated) -> None:
    device = world.old[0]
    certificate_of(device).verify_directly_issued_by(world.old_ca)
    again = renewed(device, reenroll(world.instance, device), world.workdir)
    certificate = certificate_of(again)
    certificate.verify_directly_issued_by(world.new_ca)
    assert certificate.subject == certificate_of(device).subject
    assert db_rows(world.instance, "SELECT status, issuer FROM certificate WHERE serial = ?",
                   (str(device.serial),)) == [("superseded", "issuing-ca")]
    # and renews again with its new-CA certificate
    assert reenroll(world.instance, again).status_code == 200


def test_an_old_ca_revocation_is_in_the_old_crl_and_old_ocsp_new_certs_stay_good(
        world: Rotated) -> None:  # fmt: skip
    instance, victim, bystander = world.instance, world.old[1], world.old[2]
    new_device = world.rig.enroll("rot-new-2")
    # One process signs with both CA keys of the token (one shared login).
    published = instance.cli("crl", "publish").stdout
    assert " of issuing-ca." in published and " of issuing-ca-2." in published
    revoked = instance.cli_json("revoke", "--serial", format(victim.serial, "x"),
                                "--reason", "keyCompromise")
    assert revoked["crl_numbers"] == {"issuing-ca": revoked["crl_number"]}  # the old CA's

    number = lambda crl: crl.extensions.get_extension_for_class(  # noqa: E731
        x509.CRLNumber).value.crl_number
    assert wait_for(lambda: number(fetch_crl(instance, "issuing-ca")) >= revoked[
        "crl_number"], 5)  # the server re-reads the database at most once a second
    old_crl, new_crl = fetch_crl(instance, "issuing-ca"), fetch_crl(instance, "issuing-ca-2")
    assert old_crl.issuer == world.old_ca.subject and new_crl.issuer == world.new_ca.subject
    assert old_crl.is_signature_valid(world.old_ca.public_key())  # signed by the old CA
    assert not old_crl.is_signature_valid(world.new_ca.public_key())
    assert new_crl.is_signature_valid(world.new_ca.public_key())
    assert old_crl.get_revoked_certificate_by_serial_number(victim.serial) is not None
    assert new_crl.get_revoked_certificate_by_serial_number(victim.serial) is None

    old_chain = world.write("old-chain.pem", world.old_ca, world.root)
    new_chain = world.write("new-chain.pem", world.new_ca, world.root)
    old_crl_file = crl_pem([old_crl], world.workdir / "old.crl.pem")
    new_crl_file = crl_pem([new_crl], world.workdir / "new.crl.pem")
    assert not crl_verifies(old_chain, old_crl_file, victim.cert_path)
    assert crl_verifies(old_chain, old_crl_file, bystander.cert_path)
    assert crl_verifies(new_chain, new_crl_file, new_device.cert_path)
    # Both CAs' CRLs in one file, as the broker gets them: each certificate is checked
    # against its own issuer's CRL.
    both = crl_pem([old_crl, new_crl], world.workdir / "both.crl.pem")
    all_cas = world.write("all-cas.pem", world.old_ca, world.new_ca, world.root)
    assert not crl_verifies(all_cas, both, victim.cert_path)
    assert crl_verifies(all_cas, both, bystander.cert_path)
    assert crl_verifies(all_cas, both, new_device.cert_path)

    status, response = ocsp_answer(world, world.old_ca, victim)
    assert status == "revoked"
    assert response.revocation_reason == x509.ReasonFlags.key_compromise
    assert response.certificates[0].issuer == world.old_ca.subject  # the old CA's responder
    status, response = ocsp_answer(world, world.old_ca, bystander)
    assert status == "good" and response.certificates[0].issuer == world.old_ca.subject
    status, response = ocsp_answer(world, world.new_ca, new_device)
    assert status == "good" and response.certificates[0].issuer == world.new_ca.subject
    # A serial of the old CA asked about under the new one is not "good" there.
    status, response = ocsp_answer(world, world.new_ca, bystander, by_serial=True)
    assert status == "unknown" and response.certificates[0].issuer == world.new_ca.subject


def test_the_broker_takes_both_cas_crls_and_both_cas_devices(world: Rotated) -> None:
    rig, victim = world.rig, world.old[3]
    crl_file = rig.broker_dir / "crl.pem"
    assert wait_for(lambda: crl_file.read_text().count("BEGIN X509 CRL") == 2, 30), \
        rig.relay_log.read_text()[-2000:]
    assert pem_file(rig.broker_dir / "ca-chain.pem") == [world.old_ca, world.new_ca,
                                                         world.root]
    new_device = rig.enroll("rot-new-3")
    assert rig.connect_once(new_device).returncode in (0, 27)  # 27: -W timeout, connected
    assert rig.connect_once(victim).returncode in (0, 27)
    world.instance.cli("revoke", "--device", victim.device_id)
    assert wait_for(lambda: rig.connect_once(victim).returncode not in (0, 27), 30)
    assert rig.connect_once(world.old[4]).returncode in (0, 27)
    assert rig.connect_once(new_device).returncode in (0, 27)


def _rotation_notices(world: Rotated) -> list[tuple[str, str]]:
    return db_rows(world.instance, "SELECT device_id, payload FROM outbox_message WHERE "
                   "kind = 'ca_rotation' ORDER BY id")


def test_every_active_device_got_one_signed_notice_with_its_own_renew_after(
        world: Rotated) -> None:  # fmt: skip
    rows = _rotation_notices(world)
    old = {device.device_id: device for device in world.old}
    assert sorted(device_id for device_id, _ in rows) == sorted(old)  # once each, not "gone"
    now = dt.datetime.now(dt.UTC)
    times = []
    for device_id, token in rows:
        # verified with the root alone: the x5c chain runs through the new CA
        notice = verify_notice(token, [world.root], device_id, None, now)
        assert (notice.type, notice.serial) == ("ca_rotation", str(old[device_id].serial))
        assert notice.signer.issuer == world.new_ca.subject
        assert notice.extra["ca"] == "issuing-ca-2"
        times.append(dt.datetime.fromisoformat(notice.extra["renew_after"]))
    assert len(set(times)) == len(times)  # every device its own moment
    window_end = world.rotated_at + SPREAD + dt.timedelta(minutes=1)
    assert all(world.rotated_at <= t <= window_end for t in times)
    assert max(times) - min(times) >= SPREAD / 2  # spread over the window, not clumped
    # and the relay delivers it: a device that comes online finds it on its topic
    device = world.old[5]
    listener = world.rig.subscribe(device, wait=30)
    token = listener.communicate(timeout=40)[0].strip()
    notice = verify_notice(token, pem_file(world.instance.trust_anchor), device.device_id,
                           None, dt.datetime.now(dt.UTC))
    assert notice.type == "ca_rotation"


def test_clients_that_trust_only_the_root_keep_working(world: Rotated) -> None:
    root_only = world.write("root-only.pem", world.root)
    # RFC 7030 4.1.3: the current issuing CA and the root, not the retired CA
    assert issuing_cas(world.instance, root_only) == {world.new_ca, world.root}
    curl = subprocess.run(["curl", "-sS", "--cacert", str(root_only),
                           world.instance.url + "/.well-known/est/cacerts"],
                          capture_output=True, text=True, timeout=30)
    assert curl.returncode == 0, curl.stderr
    assert set(decode_certs_only(curl.stdout.encode())) == {world.new_ca, world.root}
    device = world.old[4]
    again = renewed(device, reenroll(world.instance, device, root_only), world.workdir)
    certificate_of(again).verify_directly_issued_by(world.new_ca)


def test_after_a_restart_old_devices_still_reenroll_and_the_new_ca_issues(
        world: Rotated) -> None:  # fmt: skip
    instance = world.instance
    instance.stop()
    instance.start()
    assert issuing_cas(instance) == {world.new_ca, world.root}
    device = world.old[5]
    again = renewed(device, reenroll(instance, device), world.workdir)
    certificate_of(again).verify_directly_issued_by(world.new_ca)
    metrics = httpx.get(instance.url + "/metrics", verify=context(instance)).text
    assert 'enroll_ca_crl_next_update_seconds{ca="issuing-ca"}' in metrics
    assert 'enroll_ca_crl_next_update_seconds{ca="issuing-ca-2"}' in metrics


def test_a_file_backed_instance_rotates_to_file_keys_twice(tmp_path: Path) -> None:
    instance = ServedInstance(ca_key="file", directory=tmp_path / "instance")
    first = instance.cli_json("ca", "rotate", "--spread", "10m")
    second = instance.cli_json("ca", "rotate", "--spread", "10m")
    assert (first["active"], second["active"], second["retired"]) == (
        "issuing-ca-2", "issuing-ca-3", ["issuing-ca-2"])
    listed = instance.cli_json("ca", "list")
    assert [(r["name"], r["status"], r["key"]) for r in listed] == [
        ("issuing-ca", "retired", "ca/issuing-ca.key"),
        ("issuing-ca-2", "retired", "ca/issuing-ca-2.key"),
        ("issuing-ca-3", "active", "ca/issuing-ca-3.key")]
    for name in ("issuing-ca-2", "issuing-ca-3"):
        assert (instance.dir / f"ca/{name}.key").read_text().startswith(
            "-----BEGIN ENCRYPTED PRIVATE KEY-----")
        assert oct((instance.dir / f"secrets/{name}.pass").stat().st_mode & 0o777) == "0o600"
    shown = json.loads(instance.cli("crl", "show", "--ca", "issuing-ca-2", "--json").stdout)
    assert shown["crl_number"] == 1
    # Without the root key nothing changes.
    (instance.dir / "ca/root-ca.key").rename(tmp_path / "offline-root.key")
    refused = instance.cli("ca", "rotate", check=False)
    assert refused.returncode != 0 and "ca.root_key_missing" in refused.stderr
    assert len(instance.cli_json("ca", "list")) == 3
    moved = instance.cli_json("ca", "rotate", "--root-key", str(tmp_path / "offline-root.key"))
    assert moved["active"] == "issuing-ca-4"


def peer_certificate(host: str, port: int, tls: ssl.SSLContext) -> x509.Certificate:
    import socket

    with socket.create_connection((host, port), timeout=10) as raw, \
            tls.wrap_socket(raw, server_hostname=host) as connection:
        return x509.load_der_x509_certificate(connection.getpeercert(binary_form=True))


def only(cafile: Path, device: SoftDevice | None = None) -> ssl.SSLContext:
    """A client that trusts exactly cafile, an intermediate allowed as anchor."""
    tls = ssl.create_default_context(cafile=str(cafile))
    tls.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if device is not None:
        tls.load_cert_chain(device.cert_path, device.key_path)
    return tls


def mqtt_connects(port: int, tls: ssl.SSLContext, client_id: str) -> bool:
    import threading

    import paho.mqtt.client as mqtt

    done, result = threading.Event(), []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv311)
    client.tls_set_context(tls)
    client.on_connect = lambda c, u, f, reason, p: (result.append(reason), done.set())
    try:
        client.connect("localhost", port, keepalive=10)
    except (OSError, ssl.SSLError):
        return False
    client.loop_start()
    try:
        return done.wait(15) and not result[0].is_failure
    finally:
        client.disconnect()
        client.loop_stop()


def test_the_server_and_broker_tls_certificates_move_to_the_new_ca(world: Rotated) -> None:
    instance, rig = world.instance, world.rig
    tls = {item["listener"]: item for item in world.rotation["tls"]}
    assert tls["server"]["reissued"] and tls["broker"]["reissued"], tls
    assert tls["broker"]["next_step"] == "Mosquitto re-read it (SIGHUP)"
    new_ca_only = world.write("new-ca-only.pem", world.new_ca)
    root_only = world.write("root-only.pem", world.root)
    port = int(instance.url.rsplit(":", 1)[1])
    # The EST server (reloaded by the fixture's SIGHUP): same key, new issuer.
    served = peer_certificate("localhost", port, only(new_ca_only))
    served.verify_directly_issued_by(world.new_ca)
    assert served.public_key() == load_pem_private_key(
        (instance.dir / "tls/server.key").read_bytes(), None).public_key()
    pinned = httpx.get(instance.url + "/.well-known/est/cacerts", verify=only(new_ca_only),
                       timeout=10)  # an EST client that pins the new CA
    assert set(decode_certs_only(pinned.content)) == {world.new_ca, world.root}
    # The broker: both listeners, for clients pinning the new CA or trusting the root.
    assert wait_for(lambda: (rig.broker_dir / "crl.pem").read_text().count(
        "BEGIN X509 CRL") == 2, 30)  # the relay gave the broker the new CA and its CRL
    device = world.rig.enroll("rot-tls-1")
    relay_cert, relay_key = rig.relay_identity
    relay = SoftDevice("relay", "", relay_cert, relay_key, 0)
    for cafile in (new_ca_only, root_only):
        for listener, client in ((rig.broker.port, device), (rig.service_port, relay)):
            presented = peer_certificate("localhost", listener, only(cafile, client))
            presented.verify_directly_issued_by(world.new_ca)
            assert mqtt_connects(listener, only(cafile, client), f"rot-tls-{listener}")
    # A relay started now trusts ca/ca-chain.pem (new CA + root) and still publishes.
    rig.stop_relay()
    rig.start_relay()
    victim = world.rig.enroll("rot-tls-2")
    listener = rig.subscribe(victim, wait=30)
    instance.cli("revoke", "--device", victim.device_id)
    token = listener.communicate(timeout=40)[0].strip()
    notice = verify_notice(token, [world.root], victim.device_id, None,
                           dt.datetime.now(dt.UTC))
    assert notice.type == "revocation"


def test_rotation_and_reissue_tls_keep_keys_and_names_and_leave_foreign_certificates(
        tmp_path: Path) -> None:  # fmt: skip
    """File-backed instance, nothing served: the files themselves."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    instance = ServedInstance(ca_key="file", directory=tmp_path / "instance")
    broker_dir = tmp_path / "broker"
    instance.cli("broker-config", "--dir", str(broker_dir), "--port", "18883",
                 "--service-port", "18884", "--user", "root")  # pytest's tmp is 0700
    server_pem, broker_pem = instance.dir / "tls/server.pem", broker_dir / "broker.pem"
    before = {path: pem_file(path)[0] for path in (server_pem, broker_pem)}
    server_pem.chmod(0o640)
    rotation = instance.cli_json("ca", "rotate", "--spread", "10m")
    new_ca = x509.load_pem_x509_certificate(Path(rotation["certificate"]).read_bytes())
    assert [(t["listener"], t["reissued"]) for t in rotation["tls"]] == [
        ("server", True), ("broker", True)]
    assert rotation["tls"][1]["next_step"].startswith("Mosquitto is not running here")
    for path, key_path in ((server_pem, instance.dir / "tls/server.key"),
                           (broker_pem, broker_dir / "broker.key")):
        leaf, chain = pem_file(path)
        leaf.verify_directly_issued_by(new_ca)
        assert chain == new_ca
        assert leaf.public_key() == load_pem_private_key(key_path.read_bytes(),
                                                         None).public_key()
        old = before[path]
        assert leaf.subject == old.subject
        san = x509.SubjectAlternativeName
        assert leaf.extensions.get_extension_for_class(san).value == \
            old.extensions.get_extension_for_class(san).value
    assert oct(server_pem.stat().st_mode & 0o777) == "0o640"  # mode kept
    # A certificate this instance did not issue (say, a public one) is left alone.
    key = load_pem_private_key((instance.dir / "tls/server.key").read_bytes(), None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "est.example.net")])
    foreign = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(1)
               .not_valid_before(dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
               .not_valid_after(dt.datetime(2034, 1, 1, tzinfo=dt.UTC))
               .sign(key, hashes.SHA256()))  # type: ignore[arg-type]
    server_pem.write_bytes(foreign.public_bytes(serialization.Encoding.PEM))
    again = instance.cli_json("ca", "reissue-tls", "--broker-dir", str(broker_dir), "--json")
    assert [(t["listener"], t["reissued"]) for t in again] == [("server", False),
                                                               ("broker", True)]
    assert "left as it is" in again[0]["next_step"]
    assert pem_file(server_pem) == [foreign]
    actions = [row["action"] for row in instance.cli_json("audit", "--json")]
    assert "ca.reissue_tls" in actions
