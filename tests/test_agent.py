"""The device agent end to end: a swtpm device (tpm2-abrmd on a private D-Bus) enrolled by
TPM attestation runs `enroll-device agent` against a served instance, a real Mosquitto
with the `broker-config` configuration and the relay (tests.support.fleet.RevocationRig).

The agent connects with its TPM-held key (tpm2-openssl provider, mTLS). In order, on one
device: a renewal-due notice renews the certificate (EST simplereenroll, same key); a
renewal the server refuses as expired becomes a fresh attested enrollment; a notice sent
while the agent was stopped (SIGTERM) arrives through the persistent session; forged,
replayed, expired, misaddressed and malformed notices are ignored; a broker restart is
survived; a revocation makes the agent exit 10 with status.json "revoked". A second
device is revoked while its agent is stopped: the broker refuses it, the CRL confirms,
exit 10. No timing assertions: only generous timeouts.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_sdk.agent import (
    EXIT_NOT_ENROLLED,
    EXIT_OK,
    EXIT_REVOKED,
    Agent,
    AgentConfig,
    Events,
)
from device_sdk.renewal import Renewed
from enroll_server.notify.notices import Notice, sign_notice
from simulators.manufacturer import Manufacturer
from simulators.served import ServedInstance
from tests.support.agent_device import AgentDevice, publish_as_relay, read_retained
from tests.support.attest_helpers import roots_file
from tests.support.fleet import RevocationRig, wait_for
from tests.support.forged_notices import genuinely_signed, jws_signed_by, rogue_chain

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker

GROUP = "tpm-agent"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def manufacturer(instance: ServedInstance,
                 tmp_path_factory: pytest.TempPathFactory) -> Manufacturer:
    maker = Manufacturer.create(tmp_path_factory.mktemp("agent-vendor"))
    roots = roots_file(tmp_path_factory.mktemp("agent-roots"), maker.ca_certificate_pems)
    instance.cli("group", "create", GROUP, "--auth", "tpm", "--ek-roots", str(roots))
    return maker


def new_device(tmp_path_factory: pytest.TempPathFactory, name: str, manufacturer: Manufacturer,
               instance: ServedInstance, rig: RevocationRig) -> AgentDevice:
    device = AgentDevice(tmp_path_factory.mktemp(name), manufacturer, instance, rig, GROUP)
    try:
        device.enroll()
    except BaseException:
        device.close()
        raise
    return device


@pytest.fixture(scope="module")
def device(instance: ServedInstance, rig: RevocationRig, manufacturer: Manufacturer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentDevice]:
    """Device A, its agent running (and connected) for the ordered tests below."""
    agent_device = new_device(tmp_path_factory, "agent-a", manufacturer, instance, rig)
    try:
        agent_device.start_agent()
        agent_device.wait_event(lambda ev: any(e["event"] == "connected" for e in ev),
                                what="first connection")
        yield agent_device
    finally:
        agent_device.close()


# -- helpers ------------------------------------------------------------------------------


def serial_decimal(device: AgentDevice) -> str:
    return str(int(device.status()["serial"], 16))


def write_db(instance: ServedInstance, sql: str, *params: object) -> None:
    with sqlite3.connect(instance.dir / "enroll.db", timeout=30) as connection:
        connection.execute(sql, params)


def sent_payloads(instance: ServedInstance, device_id: str) -> list[str]:
    uri = f"file:{instance.dir / 'enroll.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=30) as connection:
        rows = connection.execute(
            "SELECT payload FROM outbox_message WHERE device_id = ? AND retain = 1 AND "
            "sent_at IS NOT NULL ORDER BY id", (device_id,)).fetchall()
    return [row[0] for row in rows]


def rejections(device: AgentDevice) -> list[str]:
    return [e["code"] for e in device.named("notice_rejected") if not e.get("retained")]


def trigger_renewal(instance: ServedInstance, device: AgentDevice) -> None:
    """renew_at in the past: the relay's renewal duty sends a renewal-due notice."""
    write_db(instance, "UPDATE certificate SET renew_at = '2000-01-01 00:00:00' "
                       "WHERE serial = ? AND status = 'active'", serial_decimal(device))


def notice_for(device: AgentDevice, kind: str, sequence: int,
               issued_at: dt.datetime | None = None, lifetime: dt.timedelta | None = None,
               serial: str | None = None) -> Notice:
    issued_at = issued_at or dt.datetime.now(dt.UTC)
    return Notice(device_id=device.device_id, type=kind, serial=serial or serial_decimal(device),
                  sequence=sequence, issued_at=issued_at,
                  expires_at=issued_at + (lifetime or dt.timedelta(days=1)), group=GROUP,
                  reason="keyCompromise" if kind == "revocation" else None)


# -- device A, in order ----------------------------------------------------------------------


def test_agent_connects_with_its_tpm_key_and_says_online(
        instance: ServedInstance, rig: RevocationRig, device: AgentDevice) -> None:  # fmt: skip
    (connected,) = device.named("connected")
    assert connected["session_present"] in (False, True)
    started = device.named("started")[0]
    assert (started["device_id"], started["group"]) == (device.device_id, GROUP)
    status = json.loads(read_retained(instance, rig, device.topic.replace("notices", "status")))
    assert (status["state"], status["device_id"]) == ("online", device.device_id)
    assert device.status()["group"] == GROUP
    assert device.state_dir.joinpath("device.key.tss.pem").read_text().startswith(
        "-----BEGIN TSS2 PRIVATE KEY-----")


def test_renewal_due_notice_renews_the_certificate_and_the_agent_reconnects(
        instance: ServedInstance, device: AgentDevice) -> None:  # fmt: skip
    old_serial = device.status()["serial"]
    old_key = device.certificate().public_key()
    connections = len(device.named("connected"))
    trigger_renewal(instance, device)
    events = device.wait_event(lambda ev: any(e["event"] == "renewed" for e in ev),
                               timeout=90, what="renewal")
    (renewed,) = [e for e in events if e["event"] == "renewed"]
    assert renewed["old_serial"] == old_serial and renewed["via"] == "est"
    assert device.status()["serial"] == renewed["serial"] != old_serial
    assert device.certificate().public_key() == old_key  # same TPM key, new certificate
    accepted = [e for e in events if e["event"] == "notice_accepted"]
    assert accepted and accepted[-1]["type"] == "renewal_due"
    statuses = {c["serial"]: c["status"] for c in
                instance.cli_json("certs", "list", "--device", device.device_id)}
    assert statuses[old_serial.lower()] == "superseded"
    assert statuses[renewed["serial"].lower()] == "active"
    device.wait_event(lambda ev: len([e for e in ev if e["event"] == "connected"])
                      > connections, what="reconnection with the new certificate")
    assert device.alive()
    book = json.loads((device.state_dir / "notices.json").read_text())
    assert book["pending"] is None and book["last_sequence"] == accepted[-1]["sequence"]


def count(device: AgentDevice, name: str) -> int:
    return len(device.named(name))


def test_a_renewal_the_server_refuses_as_expired_becomes_a_fresh_attested_enrollment(
        instance: ServedInstance, device: AgentDevice) -> None:  # fmt: skip
    """The server's record says the certificate expired (cert.expired on simplereenroll):
    the agent proves its TPM again instead (AttestedEnrollment, same device key)."""
    old_serial, renewals = device.status()["serial"], count(device, "renewed")
    write_db(instance, "UPDATE certificate SET not_after = '2000-01-02 00:00:00', "
                       "renew_at = '2000-01-01 00:00:00' WHERE serial = ? AND "
                       "status = 'active'", serial_decimal(device))
    events = device.wait_event(lambda ev: len([e for e in ev if e["event"] == "renewed"])
                               > renewals, timeout=90, what="attested renewal")
    renewed = [e for e in events if e["event"] == "renewed"][-1]
    assert (renewed["via"], renewed["old_serial"]) == ("attest", old_serial)
    assert device.status()["serial"] == renewed["serial"]
    shown = instance.cli_json("devices", "show", device.device_id, "--evidence")
    assert len(shown["evidence"]) == 2  # enrollment + this re-attestation
    assert device.alive()


def test_a_notice_sent_while_the_agent_was_stopped_is_handled_when_it_returns(
        instance: ServedInstance, rig: RevocationRig, device: AgentDevice) -> None:  # fmt: skip
    assert device.stop_agent() == EXIT_OK  # SIGTERM: a clean shutdown
    assert device.events()[-1]["event"] == "stopped"
    status_topic = device.topic.replace("notices", "status")
    assert json.loads(read_retained(instance, rig, status_topic))["state"] == "stopped"
    sent_before = len(sent_payloads(instance, device.device_id))
    renewals = count(device, "renewed")
    trigger_renewal(instance, device)
    assert wait_for(lambda: len(sent_payloads(instance, device.device_id)) > sent_before, 30)
    device.start_agent()  # the broker kept its session: the queued notice comes
    events = device.wait_event(lambda ev: len([e for e in ev if e["event"] == "renewed"])
                               > renewals, timeout=90, what="renewal after the restart")
    restarted = events[max(i for i, e in enumerate(events) if e["event"] == "started"):]
    assert [e["session_present"] for e in restarted if e["event"] == "connected"][0] is True
    assert [e["type"] for e in restarted if e["event"] == "notice_accepted"] == [
        "renewal_due"]
    assert device.alive()


def test_forged_replayed_expired_misaddressed_and_malformed_notices_are_ignored(
        instance: ServedInstance, rig: RevocationRig, device: AgentDevice) -> None:  # fmt: skip
    if not sent_payloads(instance, device.device_id):  # run alone: make a genuine notice
        trigger_renewal(instance, device)
        device.wait_event(lambda ev: any(e["event"] == "renewed" for e in ev), timeout=90)
    replay = sent_payloads(instance, device.device_id)[-1]
    status_before = device.status()
    book_before = (device.state_dir / "notices.json").read_text()
    rogue_key, rogue = rogue_chain()
    bystander = rig.enroll("agent-bystander-1")  # a genuine device certificate
    bystander_key = serialization.load_pem_private_key(bystander.key_path.read_bytes(), None)
    bystander_chain = [x509.load_pem_x509_certificate(bystander.cert_path.read_bytes()),
                       x509.load_pem_x509_certificates(instance.trust_anchor.read_bytes())[0]]
    instance.cli("revoke", "--device", bystander.device_id)
    assert wait_for(lambda: bool(sent_payloads(instance, bystander.device_id)), 30)
    misaddressed = sent_payloads(instance, bystander.device_id)[-1]
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    forged = {  # every one a revocation of the current certificate, were it believed
        "rogue CA": sign_notice(notice_for(device, "revocation", 10**6), rogue_key, rogue),
        "device key": jws_signed_by(notice_for(device, "revocation", 10**6),
                                    bystander_key, bystander_chain),  # type: ignore[arg-type]
        "expired": genuinely_signed(instance, notice_for(device, "revocation", 10**6,
                                                         long_ago)),
        "replayed": replay,
        "misaddressed": misaddressed,
        "malformed": "this.is-not.a-notice",
    }
    before = len(rejections(device))
    for payload in forged.values():
        publish_as_relay(instance, rig, device.topic, payload)
    events = device.wait_event(lambda ev: len(rejections(device)) >= before + len(forged),
                               what="six rejections")
    codes = sorted(rejections(device)[before:])
    assert codes == sorted(["notice.untrusted_signer", "notice.untrusted_signer",
                            "notice.expired", "notice.replayed", "notice.wrong_device",
                            "notice.malformed"])
    assert not [e for e in events if e["event"] == "revoked"]
    assert device.alive()
    assert device.status() == status_before
    assert (device.state_dir / "notices.json").read_text() == book_before
    assert (device.state_dir / "device.crt.pem").exists()


def test_the_agent_reconnects_after_the_broker_restarts(
        rig: RevocationRig, device: AgentDevice) -> None:  # fmt: skip
    connections = len(device.named("connected"))
    rig.broker.stop()
    device.wait_event(lambda ev: any(e["event"] == "broker_unavailable" for e in ev
                                     if e["ts"] >= device.named("connected")[-1]["ts"]),
                      what="noticing the broker is gone")
    rig.broker.start()
    events = device.wait_event(lambda ev: len([e for e in ev if e["event"] == "connected"])
                               > connections, what="reconnection")
    assert events[-1]["event"] in ("connected", "broker_unavailable", "notice_rejected")
    assert device.alive()


def test_revocation_makes_the_agent_exit_10_with_status_revoked(
        instance: ServedInstance, rig: RevocationRig, device: AgentDevice) -> None:  # fmt: skip
    serial = device.status()["serial"]
    revoking = dt.datetime.now(dt.UTC)
    instance.cli("revoke", "--device", device.device_id, "--reason", "keyCompromise")
    assert device.process is not None
    assert device.process.wait(60) == EXIT_REVOKED, device.log_tail()
    seen = dt.datetime.fromisoformat(device.named("revoked")[0]["ts"])
    print(f"revoke command -> agent revoked: {(seen - revoking).total_seconds():.2f} s")
    status = device.status()
    assert (status["state"], status["serial"], status["reason"], status["revoked_by"]) == (
        "revoked", serial, "keyCompromise", "notice")
    assert dt.datetime.fromisoformat(status["revoked_at"]) <= dt.datetime.now(dt.UTC)
    assert not (device.state_dir / "device.crt.pem").exists()
    assert (device.state_dir / f"device.crt.pem.revoked-{serial}").exists()
    (revoked,) = device.named("revoked")
    assert revoked["source"] == "notice"
    assert device.named("status_published")
    retained = json.loads(read_retained(instance, rig,
                                        device.topic.replace("notices", "status")))
    assert (retained["state"], retained["serial"]) == ("revoked", serial)
    again = device.run_agent(timeout=60)  # a restarted agent stops at once
    assert again.returncode == EXIT_REVOKED, again.stderr


# -- device B: revoked while its agent was not running ---------------------------------------


def test_a_device_revoked_while_offline_learns_it_from_the_crl_and_exits_10(
        instance: ServedInstance, rig: RevocationRig, manufacturer: Manufacturer,
        tmp_path_factory: pytest.TempPathFactory) -> None:  # fmt: skip
    device = new_device(tmp_path_factory, "agent-b", manufacturer, instance, rig)
    try:
        once = device.run_agent("--once")  # nothing waiting: connect, subscribe, exit 0
        assert once.returncode == EXIT_OK, once.stdout + once.stderr
        assert '"event": "once_done"' in once.stdout
        device.start_agent()
        device.wait_event(lambda ev: any(e["event"] == "connected" for e in ev))
        assert device.stop_agent() == EXIT_OK  # SIGTERM: clean shutdown
        status_topic = device.topic.replace("notices", "status")
        assert json.loads(read_retained(instance, rig, status_topic))["state"] == "stopped"

        serial = device.status()["serial"]
        probe = rig.enroll("agent-crl-probe-1")  # a software-key device, for mosquitto_sub
        instance.cli("revoke", "--device", device.device_id, "--reason", "superseded")
        instance.cli("revoke", "--device", probe.device_id)
        # Once the broker refuses the probe, its CRL (built after both revocations) has
        # the TPM device too: the queued notice can no longer reach that device.
        assert wait_for(lambda: rig.connect_once(probe).returncode not in (0, 27), 30)
        device.start_agent()
        assert device.process is not None
        assert device.process.wait(90) == EXIT_REVOKED, device.log_tail()
        status = device.status()
        assert (status["state"], status["serial"], status["reason"]) == (
            "revoked", serial, "superseded")
        (revoked,) = device.named("revoked")
        assert (revoked["source"], status["revoked_by"]) == ("crl", "crl")
        assert device.named("broker_unavailable")  # the broker hung up on it
        assert [e["revoked"] for e in device.named("crl_checked")] == [True]
    finally:
        device.close()


# -- the command line ------------------------------------------------------------------------


def test_agent_help_documents_the_exit_codes_and_an_empty_state_dir_exits_5(
        tmp_path: Path, instance: ServedInstance) -> None:  # fmt: skip
    shown = subprocess.run([str(BIN / "enroll-device"), "agent", "--help"],
                           capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0
    for text in ("Examples:", "--once", "10  REVOKED", "device:/dev/tpmrm0"):
        assert text in shown.stdout
    empty = subprocess.run(
        [str(BIN / "enroll-device"), "agent", "--state-dir", str(tmp_path), "--tcti",
         "device:/dev/null", "--server", instance.url, "--server-ca",
         str(instance.trust_anchor), "--broker", "localhost:1", "--json"],
        capture_output=True, text=True, timeout=30)
    assert empty.returncode == EXIT_NOT_ENROLLED
    assert json.loads(empty.stdout.splitlines()[-1])["event"] == "not_enrolled"


# -- the renewal timer, without any process ---------------------------------------------------


class _StubRenewer:
    def __init__(self, certificate: x509.Certificate) -> None:
        self.certificate, self.calls = certificate, 0

    def renew(self, device_id: str) -> Renewed:
        self.calls += 1
        return Renewed(self.certificate, [], "est")


class _StubLink:
    reconnects = 0

    def reconnect_now(self) -> None:
        self.reconnects += 1


def _certificate(device_id: str, used: float, lifetime_days: int = 100) -> x509.Certificate:
    """A self-signed certificate with ``used`` of its lifetime gone."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=lifetime_days * used)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=lifetime_days))
            .sign(key, hashes.SHA256()))


@pytest.mark.parametrize(("used", "renews"), [(0.5, False), (0.7, True), (1.2, True)])
def test_the_timer_renews_past_two_thirds_of_the_lifetime_without_a_notice(
        tmp_path: Path, used: float, renews: bool) -> None:  # fmt: skip
    config = AgentConfig(state_dir=tmp_path, tcti="unused", server="https://unused",
                         server_ca=tmp_path / "ca.pem", broker_host="unused", broker_port=1,
                         renew_jitter=0)
    log = io.StringIO()
    agent = Agent(config, Events(True, log))
    agent.device_id, agent.certificate = "timer-1", _certificate("timer-1", used)
    renewer, link = _StubRenewer(_certificate("timer-1", 0)), _StubLink()
    agent.renewer, agent.link = renewer, link  # type: ignore[assignment]
    agent._timers()
    events = [json.loads(line) for line in log.getvalue().splitlines()]
    assert (renewer.calls, link.reconnects) == ((1, 1) if renews else (0, 0))
    if renews:
        why = "certificate expired" if used > 1 else "67% of the lifetime"
        assert [e["event"] for e in events] == ["renewal_scheduled", "renewed"]
        assert events[0]["why"] == why
        assert agent.certificate is renewer.certificate
        agent._timers()  # the new certificate is young: nothing more
        assert renewer.calls == 1
