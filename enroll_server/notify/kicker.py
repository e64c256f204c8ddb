"""Disconnect revoked devices that are still connected to the broker.

Mosquitto checks its CRL when a client connects, not afterwards: a device revoked while
connected would stay connected. MQTT has a standard way to end a session: a new
connection with the same client id takes it over (MQTT 3.1.1 section 3.1.4: "the Server
MUST disconnect the existing Client"). A device's client id is its device id (the fleet
listener forces it to the certificate CN), so a few seconds after a device's revocation
notice went out (time for an honest agent to read it), the relay connects under that
client id with a clean session, then leaves. The broker's CRL already refuses the
device's reconnection; the clean session also drops whatever the broker still queued
for it.

The relay connects to the service listener (notify/broker.py), which only pinned relay
identities can reach and which keeps the client id it is given; Mosquitto's client ids
are one namespace across listeners, so the takeover ends the device's session on the
fleet listener (checked with 2.0.11: "Client <id> already connected, closing old
connection"). Devices cannot do the same to each other: on the fleet listener their
client id is always their own CN.
"""

from __future__ import annotations

import heapq
import logging
import ssl
import threading
import time

import paho.mqtt.client as mqtt

from ..config import MqttSettings

log = logging.getLogger(__name__)


class Kicker:
    def __init__(self, settings: MqttSettings, grace_seconds: float = 3.0,
                 timeout: float = 10.0) -> None:
        self.settings = settings
        self.grace = grace_seconds
        self.timeout = timeout
        self._due: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self.kicked = 0

    def schedule(self, device_id: str) -> None:
        with self._lock:
            heapq.heappush(self._due, (time.monotonic() + self.grace, device_id))

    def run_due(self) -> None:
        """Kick every device whose grace time is over (called from the relay loop)."""
        while True:
            with self._lock:
                if not self._due or self._due[0][0] > time.monotonic():
                    return
                _, device_id = heapq.heappop(self._due)
            try:
                self.kick(device_id)
                self.kicked += 1
            except (OSError, ConnectionError) as error:
                log.warning("could not end the broker session of revoked device %s: %s",
                            device_id, error)

    def kick(self, device_id: str) -> None:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id,
                             clean_session=True, protocol=mqtt.MQTTv311)
        context = ssl.create_default_context(cafile=str(self.settings.ca_file))
        context.load_cert_chain(str(self.settings.client_cert), str(self.settings.client_key))
        client.tls_set_context(context)
        connected = threading.Event()
        client.on_connect = lambda c, u, f, reason, p: connected.set()
        client.connect(self.settings.host, self.settings.port, keepalive=10)
        client.loop_start()
        try:
            if not connected.wait(self.timeout):
                raise ConnectionError("no CONNACK")
        finally:
            client.disconnect()
            client.loop_stop()
        log.info("ended the broker session of revoked device %s", device_id)
