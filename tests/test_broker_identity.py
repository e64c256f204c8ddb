"""Broker identity against a real Mosquitto running `enroll-server broker-config`'s files:
a device's client id is its certificate CN, relays have identities of their own.

An enrolled device that connects with another device's client id (the session takeover
of MQTT 3.1.1 3.1.4) gets its own session instead: the victim stays connected and keeps
receiving, the attacker reads nothing of the victim's. The service listener, where client
ids are kept (the relay's kicker needs that), accepts no device and no unpinned relay.
Two relays with their own identities both publish.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from enroll_server.notify.identities import ensure_relay_identity
from simulators.served import ServedInstance
from tests.support.fixtures import db_count
from tests.support.fleet import RevocationRig, SoftDevice, wait_for

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker



class Session:
    """A paho MQTT 3.1.1 client that records what happens to it."""

    def __init__(self, rig: RevocationRig, client_id: str, cert: Path, key: Path,
                 port: int, clean: bool = False) -> None:
        self.events: list[str] = []
        self.messages: list[tuple[str, bytes]] = []
        self.subscribed = threading.Event()
        self.granted: list[int] = []
        self.connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=clean, protocol=mqtt.MQTTv311)
        context = ssl.create_default_context(cafile=str(rig.instance.trust_anchor))
        context.load_cert_chain(cert, key)
        self.client.tls_set_context(context)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda c, u, f, r, p: self.events.append(f"disconnect:{r}")
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.connect("localhost", port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        self.events.append(f"connect:{reason}")
        if not reason.is_failure:
            self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reasons, properties) -> None:
        self.granted = [reason.value for reason in reasons]
        self.subscribed.set()

    def subscribe(self, topic: str) -> list[int]:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(15), self.events
        return self.granted

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(scope="module")
def relays_rig(instance: ServedInstance, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[RevocationRig]:  # fmt: skip
    """broker-config with two relay identities, a and b; the broker runs, no relay yet."""
    rig = RevocationRig(instance, tmp_path_factory.mktemp("relays"), "a", "b")
    try:
        rig.broker.start()
        yield rig
    finally:
        rig.close()


def device_session(rig: RevocationRig, device: SoftDevice, client_id: str | None = None,
                   port: int | None = None) -> Session:
    return Session(rig, client_id or device.device_id, device.cert_path, device.key_path,
                   port or rig.broker.port)


def publish_as_relay(rig: RevocationRig, topic: str, payload: str) -> None:
    cert, key = rig.relay_identity
    result = subprocess.run(["mosquitto_pub", "-h", "localhost", "-p", str(rig.service_port),
                             "--cafile", str(rig.instance.trust_anchor), "--cert", str(cert),
                             "--key", str(key), "-i", "test-relay-publisher", "-t", topic,
                             "-q", "1", "-m", payload], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr


def test_a_device_using_another_devices_client_id_gets_its_own_session(
        relays_rig: RevocationRig) -> None:  # fmt: skip
    rig = relays_rig
    victim, attacker = rig.enroll("idt-victim-1"), rig.enroll("idt-attacker-1")
    victim_session = device_session(rig, victim)
    attack = None
    try:
        assert victim_session.connected.wait(15), victim_session.events
        assert victim_session.subscribe(victim.topic) == [1]
        # The attacker connects with the victim's client id and a persistent session,
        # and tries to subscribe to the victim's notices.
        attack = device_session(rig, attacker, client_id=victim.device_id)
        assert attack.connected.wait(15), attack.events  # accepted: as itself
        # Mosquitto 2.0.11 grants the subscription and applies the ACL to each delivery.
        attack.subscribe(victim.topic)
        assert attack.subscribe(attacker.topic) == [1]
        publish_as_relay(rig, victim.topic, "for the victim only")
        publish_as_relay(rig, attacker.topic, "for the attacker")
        assert wait_for(lambda: len(victim_session.messages) == 1
                        and len(attack.messages) == 1, 15)
        assert victim_session.messages == [(victim.topic, b"for the victim only")]
        assert attack.messages == [(attacker.topic, b"for the attacker")]
        # The victim was never disconnected, and its session is still the live one.
        assert victim_session.events == ["connect:Success"]
        publish_as_relay(rig, victim.topic, "still here")
        assert wait_for(lambda: len(victim_session.messages) == 2, 15)
        assert victim_session.events == ["connect:Success"]
    finally:
        victim_session.close()
        if attack is not None:
            attack.close()


def test_no_device_is_accepted_on_the_service_listener(relays_rig: RevocationRig) -> None:
    """There client ids are not rewritten; only pinned relay identities get in."""
    rig = relays_rig
    victim, attacker = rig.enroll("idt-victim-2"), rig.enroll("idt-attacker-2")
    victim_session = device_session(rig, victim)
    try:
        assert victim_session.connected.wait(15)
        assert victim_session.subscribe(victim.topic) == [1]
        result = subprocess.run(
            ["mosquitto_sub", "-h", "localhost", "-p", str(rig.service_port), "--cafile",
             str(rig.instance.trust_anchor), "--cert", str(attacker.cert_path), "--key",
             str(attacker.key_path), "-i", victim.device_id, "-t", victim.topic, "-W", "3"],
            capture_output=True, text=True, timeout=30)
        assert result.returncode not in (0, 27), result  # refused in the TLS handshake
        # A relay identity of the right shape that the broker does not pin: refused too.
        stranger = ensure_relay_identity(rig.workdir / "stranger", "a")
        result = subprocess.run(
            ["mosquitto_sub", "-h", "localhost", "-p", str(rig.service_port), "--cafile",
             str(rig.instance.trust_anchor), "--cert", str(stranger.certificate_path),
             "--key", str(stranger.key_path), "-i", victim.device_id, "-t", "x", "-W", "3"],
            capture_output=True, text=True, timeout=30)
        assert result.returncode not in (0, 27), result
        publish_as_relay(rig, victim.topic, "ping")
        assert wait_for(lambda: victim_session.messages == [(victim.topic, b"ping")], 15)
        assert victim_session.events == ["connect:Success"]
    finally:
        victim_session.close()


def _sent(instance: ServedInstance, device: SoftDevice) -> bool:
    return db_count(instance, "outbox_message", f"device_id = '{device.device_id}' AND "
                    "sent_at IS NULL") == 0


def test_two_relays_with_their_own_identities_both_publish(
        instance: ServedInstance, relays_rig: RevocationRig) -> None:  # fmt: skip
    """Both relays connect at start and stay connected side by side (with one identity
    between them, each connection would end the other's: "lost the broker connection").
    Then each one alone must deliver a revocation notice."""
    rig = relays_rig
    logs = {name: rig.workdir / f"relay-{name}.log" for name in ("a", "b")}
    relays = {name: rig.spawn_relay(logs[name], "--identity", name) for name in logs}

    def connections(name: str) -> int:
        return logs[name].read_text().count("connected to the broker")

    def revoke_and_receive(device: SoftDevice) -> None:
        listener = rig.subscribe(device, wait=120)  # the retained notice, whenever it comes
        instance.cli("revoke", "--device", device.device_id)
        token = listener.communicate(timeout=150)[0].strip()
        assert token.count(".") == 2, (token, {n: p.read_text() for n, p in logs.items()})
        assert wait_for(lambda: _sent(instance, device), 30)

    def terminate(name: str) -> None:
        os.killpg(relays[name].pid, signal.SIGTERM)  # clean: it finishes its iteration
        relays[name].wait(30)

    try:
        assert wait_for(lambda: connections("a") and connections("b"), 120), logs
        revoke_and_receive(rig.enroll("idt-relayed-1"))  # either may publish it
        for name in ("a", "b"):
            text = logs[name].read_text()
            assert "lost the broker connection" not in text, text
            assert connections(name) == 1, text
            assert f"localhost:{rig.service_port} as svc.relay.{name}" in text, text
            assert "not acknowledged" not in text, text
        terminate("a")
        revoke_and_receive(rig.enroll("idt-relayed-2"))  # b, alone
        relays["a"] = rig.spawn_relay(logs["a"], "--identity", "a")
        assert wait_for(lambda: connections("a") == 2, 120)
        terminate("b")
        revoke_and_receive(rig.enroll("idt-relayed-3"))  # a, alone
    finally:
        for process in relays.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(15)


def test_a_relay_without_an_identity_says_what_to_run(instance: ServedInstance,
                                                      relays_rig: RevocationRig) -> None:
    result = instance.cli("relay", "--identity", "nobody", check=False)
    assert result.returncode == 1
    assert "broker-config --dir DIR --relay nobody" in result.stderr
    assert "Traceback" not in result.stderr
    bad = instance.cli("relay", "--identity", "../../etc", check=False)
    assert bad.returncode == 1 and "bad relay name" in bad.stderr
