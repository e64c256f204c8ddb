"""Revocation everywhere, against a real server, Mosquitto, relay and OpenSSL tools.

Revoke one device of several: its signed notice arrives over MQTT and verifies; `openssl
ocsp` says revoked; the CRL lists it and `openssl verify -crl_check` fails; Mosquitto
refuses its next connection; its reenroll is refused; the other devices are untouched.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from device_sdk.notices import verify_notice
from simulators.served import ServedInstance
from tests.support.est_helpers import csr_der, est_body, make_csr
from tests.support.fixtures import db_count
from tests.support.fleet import RevocationRig, SoftDevice, wait_for

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker


def ca_certificates(instance: ServedInstance) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(instance.trust_anchor.read_bytes())


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)


def ocsp_status(instance: ServedInstance, device: SoftDevice, workdir: Path) -> str:
    issuer = workdir / "issuing-ca.pem"
    issuer.write_text(instance.trust_anchor.read_text().split("-----END CERTIFICATE-----")[0]
                      + "-----END CERTIFICATE-----\n")
    result = openssl("ocsp", "-issuer", str(issuer), "-cert", str(device.cert_path),
                     "-url", instance.url + "/ocsp", "-CAfile", str(instance.trust_anchor))
    assert "Response verify OK" in result.stderr + result.stdout, result.stderr
    return result.stdout.split(f"{device.cert_path}: ", 1)[1].split()[0]


def crl_check(instance: ServedInstance, device: SoftDevice, workdir: Path) -> bool:
    crl = workdir / "crl.der"
    crl.write_bytes(httpx.get(instance.url + "/crl/issuing-ca.crl",
                              verify=tls(instance)).content)
    crl_pem = workdir / "crl.pem"
    assert openssl("crl", "-inform", "DER", "-in", str(crl), "-out",
                   str(crl_pem)).returncode == 0
    return openssl("verify", "-crl_check", "-CAfile", str(instance.trust_anchor),
                   "-CRLfile", str(crl_pem), str(device.cert_path)).returncode == 0


def tls(instance: ServedInstance, device: SoftDevice | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(instance.trust_anchor))
    if device is not None:
        context.load_cert_chain(device.cert_path, device.key_path)
    return context


def reenroll(instance: ServedInstance, device: SoftDevice) -> httpx.Response:
    key = load_pem_private_key(device.key_path.read_bytes(), None)
    return httpx.post(instance.url + "/.well-known/est/simplereenroll",
                      content=est_body(csr_der(make_csr(key, device.device_id))),
                      headers={"Content-Type": "application/pkcs10"},
                      verify=tls(instance, device), timeout=30)


def test_revoking_one_device_reaches_every_party_and_spares_the_others(
        instance: ServedInstance, rig: RevocationRig, tmp_path: Path) -> None:  # fmt: skip
    victim, bystander = rig.enroll("rev-victim-1"), rig.enroll("rev-bystander-1")
    assert ocsp_status(instance, victim, tmp_path) == "good"
    assert crl_check(instance, victim, tmp_path)
    assert rig.connect_once(victim).returncode in (0, 27)  # accepted (27: -W timeout)
    listener = rig.subscribe(victim)
    wait_for(lambda: "rev-victim-1" in rig.broker.log_text(), 5)

    revoked = instance.cli_json("revoke", "--device", victim.device_id, "--reason",
                                "keyCompromise")
    assert revoked["devices"] == [victim.device_id]
    assert revoked["serials"] == [format(victim.serial, "x")]

    token = listener.communicate(timeout=30)[0].strip()
    notice = verify_notice(token, ca_certificates(instance)[1:], victim.device_id, None,
                           dt.datetime.now(dt.UTC))
    assert (notice.type, notice.serial, notice.reason) == (
        "revocation", str(victim.serial), "keyCompromise")
    assert ocsp_status(instance, victim, tmp_path) == "revoked"
    assert ocsp_status(instance, bystander, tmp_path) == "good"
    assert not crl_check(instance, victim, tmp_path)
    assert crl_check(instance, bystander, tmp_path)
    assert wait_for(lambda: rig.connect_once(victim).returncode not in (0, 27))
    assert rig.connect_once(bystander).returncode in (0, 27)
    refused = reenroll(instance, victim)
    assert (refused.status_code, refused.headers["X-Error-Code"]) == (403, "device.revoked")
    assert reenroll(instance, bystander).status_code == 200


def test_a_notice_published_while_the_broker_is_down_arrives_after_it_returns(
        instance: ServedInstance, rig: RevocationRig) -> None:  # fmt: skip
    device = rig.enroll("rev-offline-1")
    rig.broker.stop()
    instance.cli("revoke", "--device", device.device_id, "--reason", "superseded")
    rig.broker.start()
    # the device was offline too: the retained notice waits for it on its topic
    listener = rig.subscribe(device, wait=30)
    token = listener.communicate(timeout=40)[0].strip()
    notice = verify_notice(token, ca_certificates(instance)[1:], device.device_id, None,
                           dt.datetime.now(dt.UTC))
    assert notice.reason == "superseded"


def test_a_device_cannot_read_another_devices_notices(instance: ServedInstance,
                                                      rig: RevocationRig) -> None:
    snoop, target = rig.enroll("rev-snoop-1"), rig.enroll("rev-target-1")
    instance.cli("revoke", "--device", target.device_id)
    assert wait_for(lambda: db_count(instance, "outbox_message", f"topic = '{target.topic}' "
                                     "AND sent_at IS NOT NULL") == 1)  # retained now
    listener = rig.subscribe(snoop, topic=target.topic, wait=3, session=False)
    output, _ = listener.communicate(timeout=20)
    assert output.strip() == ""


def test_the_operator_api_revokes_with_curl_and_refuses_a_wrong_credential(
        instance: ServedInstance, rig: RevocationRig) -> None:  # fmt: skip
    device = rig.enroll("rev-api-1")
    url = instance.url + "/api/v1/revocations"
    body = json.dumps({"device_id": device.device_id, "reason": "affiliationChanged"})
    curl = ["curl", "-sS", "--cacert", str(instance.trust_anchor), "-H",
            "Content-Type: application/json", "-w", "\n%{http_code}", "-d", body, url]
    before = db_count(instance, "certificate", "status = 'revoked'")
    wrong = subprocess.run([*curl, "-H", "Authorization: Bearer op_wrong"],
                           capture_output=True, text=True, timeout=30).stdout
    assert wrong.endswith("\n401") and "operator.unauthorized" in wrong
    assert db_count(instance, "certificate", "status = 'revoked'") == before
    credential = instance.operator_credential
    done = subprocess.run([*curl, "-H", f"Authorization: Bearer {credential}"],
                          capture_output=True, text=True, timeout=30).stdout
    answer, status = done.rsplit("\n", 1)
    assert status == "200", answer
    assert json.loads(answer)["serials"] == [format(device.serial, "x")]
    shown = instance.cli_json("devices", "show", device.device_id)
    assert shown["status"] == "revoked"


def test_ocsp_for_a_serial_this_ca_never_issued_is_unknown(instance: ServedInstance,
                                                          tmp_path: Path) -> None:
    issuer = tmp_path / "issuing-ca.pem"
    issuer.write_text(instance.trust_anchor.read_text().split("-----END CERTIFICATE-----")[0]
                      + "-----END CERTIFICATE-----\n")
    result = openssl("ocsp", "-issuer", str(issuer), "-serial", "0x1234567890abcdef",
                     "-url", instance.url + "/ocsp", "-CAfile", str(instance.trust_anchor))
    assert "Response verify OK" in result.stderr + result.stdout
    assert "0x1234567890abcdef: unknown" in result.stdout


def test_a_revocation_survives_dead_relay_and_server_and_a_failed_crl_build(
        instance: ServedInstance, rig: RevocationRig, tmp_path: Path) -> None:  # fmt: skip
    """SECURITY-CHECKLIST 21/22: once `revoke` returned, nothing can lose it."""
    device = rig.enroll("rev-crash-1")
    rig.relay.kill()  # SIGKILL: no clean shutdown
    rig.relay.wait(10)
    crl_before = instance.cli_json("crl", "show")["crl_number"]
    bad_pin = tmp_path / "wrong.pin"
    bad_pin.write_text("0000\n")
    result = instance.cli("revoke", "--device", device.device_id, "--reason", "keyCompromise",
                          env_extra={"ENROLL_CA__PKCS11__PIN_FILE": str(bad_pin)})
    assert "could not be rebuilt" in result.stderr
    assert instance.cli_json("crl", "show")["crl_number"] == crl_before  # last good stays
    assert crl_check(instance, rig.enroll("rev-crash-2"), tmp_path)  # and is still served
    instance.stop()
    instance.start()  # the server restarts: the revocation is in the database
    assert ocsp_status(instance, device, tmp_path) == "revoked"
    assert db_count(instance, "outbox_message",
                    f"device_id = '{device.device_id}' AND sent_at IS NULL") == 2
    rig.start_relay()  # a fresh relay publishes what the dead one left, and rebuilds the CRL
    assert wait_for(lambda: db_count(instance, "outbox_message",
                                     f"device_id = '{device.device_id}' AND "
                                     "sent_at IS NULL") == 0, 30)
    assert wait_for(lambda: instance.cli_json("crl", "show")["crl_number"] > crl_before, 30)
    assert not crl_check(instance, device, tmp_path)


def test_metrics_report_revocations_refusals_and_the_crl(instance: ServedInstance,
                                                         rig: RevocationRig) -> None:
    text = httpx.get(instance.url + "/metrics", verify=tls(instance)).text
    assert 'enroll_devices{status="revoked"}' in text
    assert "enroll_outbox_pending" in text and "enroll_crl_next_update_seconds" in text
    crl_left = next(float(line.split()[1]) for line in text.splitlines()
                    if line.startswith("enroll_crl_next_update_seconds "))
    assert 0 < crl_left <= 24 * 3600
    assert 'enroll_refusals_5m{action="api.admin.revoke",code="operator.unauthorized"}' in text


def test_a_revoked_device_that_stays_connected_is_disconnected_after_its_notice(
        instance: ServedInstance, rig: RevocationRig) -> None:  # fmt: skip
    """Mosquitto checks its CRL only at connect: the relay ends the revoked device's
    session (takeover by client id) once its notice went out (SECURITY-CHECKLIST 26)."""
    import paho.mqtt.client as mqtt

    device = rig.enroll("rev-connected-1")
    events: list[str] = []
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device.device_id,
                         clean_session=False, protocol=mqtt.MQTTv311)
    client.tls_set_context(tls(instance, device))
    client.on_connect = lambda c, u, f, r, p: (events.append(f"connect:{r}"),
                                               c.subscribe(device.topic, qos=1))
    client.on_subscribe = lambda c, u, m, r, p: subscribed.set()
    client.on_message = lambda c, u, message: events.append("notice")
    client.on_disconnect = lambda c, u, f, r, p: events.append(f"disconnect:{r}")
    client.reconnect_delay_set(1, 2)
    client.connect("localhost", rig.broker.port, keepalive=30)
    client.loop_start()
    try:
        assert subscribed.wait(15)
        instance.cli("revoke", "--device", device.device_id, "--reason", "keyCompromise")
        assert wait_for(lambda: any(e.startswith("disconnect") for e in events), 30), events
        assert events.index("notice") < next(
            i for i, e in enumerate(events) if e.startswith("disconnect"))  # notice first
        time.sleep(3)  # paho keeps trying to reconnect: the broker's CRL refuses it
        assert [e for e in events if e.startswith("connect")] == ["connect:Success"]
    finally:
        client.loop_stop()
        client.disconnect()
