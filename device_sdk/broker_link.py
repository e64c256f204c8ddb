"""The agent's MQTT connection: paho over mTLS with the TPM key, driven by the caller.

No paho thread: the caller calls ``poll()`` from its loop, so every TLS operation (and
with it every use of the process-wide tpm2 provider) happens on the caller's thread.

- client id = device id, clean_session false (a persistent session: QoS 1 notices
  published while the device is offline are queued for it), manual PUBACKs (``ack``
  after the notice is handled and persisted), a retained "offline" will on the status
  topic and a retained "online" status after each connection;
- subscribes QoS 1 to the notice topic unless the broker kept the session;
- a failed or lost connection is retried after exponential backoff with full jitter
  (0.2..1 of min(max_backoff, 2^n) s); ``on_refused`` is called when the broker answered
  but would not have this device (TLS refused, hung up before CONNACK, CONNACK refused):
  Mosquitto refuses a revoked certificate that way, without a telling TLS 1.3 alert.
"""

from __future__ import annotations

import random
import ssl
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

Emit = Callable[..., None]
SUCCESS = mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS


class BrokerLink:
    def __init__(self, host: str, port: int, client_id: str, notice_topic: str,
                 status_topic: str, emit: Emit, *, keepalive: int = 60, timeout: float = 60.0,
                 max_backoff: float = 60.0, rng: random.Random | None = None) -> None:
        self.host, self.port, self.client_id = host, port, client_id
        self.notice_topic, self.status_topic = notice_topic, status_topic
        self.emit, self.keepalive, self.timeout = emit, keepalive, timeout
        self.max_backoff = max_backoff
        self.rng = rng or random.SystemRandom()
        self.on_refused: Callable[[], None] = lambda: None
        self.client: mqtt.Client | None = None
        self.connected = self.subscribed = self.session_present = False
        self.subscribe_refused = False
        self.inbox: list[mqtt.MQTTMessage] = []
        self.next_attempt = 0.0
        self.failures = 0
        self.last_activity = 0.0
        self._errors: list[str] = []  # paho's error log lines of the current connection

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def due(self) -> bool:
        return self.client is None and time.monotonic() >= self.next_attempt

    def connect(self, context: ssl.SSLContext, will: str, online: str) -> bool:
        """One attempt (TLS handshake with the TPM key, CONNACK); True when connected."""
        started = time.monotonic()
        self.connected = self.subscribed = False
        self._errors = []
        tls_up = False
        try:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 protocol=mqtt.MQTTv311, clean_session=False,
                                 manual_ack=True)
            client.tls_set_context(context)
            client.connect_timeout = self.timeout
            client.will_set(self.status_topic, will, qos=1, retain=True)
            client.on_connect = self._on_connect
            client.on_message = lambda _c, _u, message: self.inbox.append(message)
            client.on_subscribe = self._on_subscribe
            client.on_log = self._on_log
            self.client = client
            client.connect(self.host, self.port, self.keepalive)
            tls_up = True
            deadline = time.monotonic() + self.timeout
            while not self.connected and self.client is not None:
                result = client.loop(timeout=0.2)
                if result != SUCCESS:
                    raise ConnectionError(mqtt.error_string(result))
                if time.monotonic() > deadline:
                    raise TimeoutError("no CONNACK")
        except (OSError, ValueError) as error:  # ssl.SSLError, ConnectionError: OSErrors
            self.lost(f"{type(error).__name__}: {error}",
                      refused=tls_up or isinstance(error, ssl.SSLError))
            return False
        if self.client is None:  # CONNACK refused (on_connect)
            return False
        self.failures = 0
        self.last_activity = time.monotonic()
        self.emit("connected", broker=self.address, session_present=self.session_present,
                  connect_seconds=round(time.monotonic() - started, 3))
        client.publish(self.status_topic, online, qos=1, retain=True)
        return True

    def poll(self, timeout: float = 0.2) -> None:
        """Network I/O and keepalive for up to ``timeout`` s (or sleep while offline)."""
        if self.client is None:
            time.sleep(min(timeout, max(0.0, self.next_attempt - time.monotonic())))
            return
        result = self.client.loop(timeout=timeout)
        if result != SUCCESS and self.client is not None:
            self.lost(f"loop: {mqtt.error_string(result)}")

    def ack(self, message: mqtt.MQTTMessage) -> None:
        if self.client is not None and message.qos > 0:
            self.client.ack(message.mid, message.qos)

    def publish_status(self, payload: str, seconds: float = 5.0) -> bool:
        """Publish (retained, QoS 1) and wait for the PUBACK; False if not connected."""
        if self.client is None or not self.connected:
            return False
        info = self.client.publish(self.status_topic, payload, qos=1, retain=True)
        deadline = time.monotonic() + seconds
        while not info.is_published() and time.monotonic() < deadline and self.client:
            if self.client.loop(timeout=0.1) != SUCCESS:
                break
        return info.is_published()

    def close(self, status: str | None = None) -> None:
        """Clean disconnect (no will), after publishing ``status`` if given."""
        if self.client is None:
            return
        if status is not None:
            self.publish_status(status, 2.0)
        client, self.client = self.client, None
        self.connected = self.subscribed = False
        client.on_disconnect = None
        client.disconnect()
        client.loop(timeout=0.1)

    def reconnect_now(self) -> None:
        self.close()
        self.failures, self.next_attempt = 0, 0.0

    def lost(self, error: str, refused: bool = False) -> None:
        """Drop the connection; schedule the next attempt (backoff with full jitter)."""
        if self._errors:  # what paho logged, e.g. "failed to receive on socket: EOF ..."
            error = f"{error} ({'; '.join(self._errors)})"
            self._errors = []
        client, self.client = self.client, None
        self.connected = self.subscribed = False
        if client is not None:
            client.on_disconnect = None
            try:
                client.disconnect()
            except Exception:  # noqa: BLE001, S110 - the socket is gone anyway
                pass
        self.failures += 1
        ceiling = min(self.max_backoff, 2.0 ** min(self.failures - 1, 16))
        delay = self.rng.uniform(0.2 * ceiling, ceiling)
        self.next_attempt = time.monotonic() + delay
        self.emit("broker_unavailable", "warning", error=error, retry_in=round(delay, 2),
                  attempt=self.failures, refused=refused)
        if refused:
            self.on_refused()

    # -- paho callbacks (called from inside client.loop) -------------------------------

    def _on_connect(self, client: mqtt.Client, _userdata: object, flags: Any, reason: Any,
                    _properties: object) -> None:
        if reason.is_failure:
            self.lost(f"CONNACK refused: {reason}", refused=True)
            return
        self.connected = True
        self.session_present = bool(flags.session_present)
        client.on_disconnect = self._on_disconnect
        if self.session_present:
            self.subscribed = True  # the broker kept the subscription with the session
        else:
            client.subscribe(self.notice_topic, qos=1)

    def _on_subscribe(self, _client: mqtt.Client, _userdata: object, _mid: int,
                      reasons: list[Any], _properties: object) -> None:
        if any(reason.is_failure for reason in reasons):
            self.subscribe_refused = True
            self.emit("subscribe_refused", "error", topic=self.notice_topic,
                      hint="the broker ACL or the --group is wrong")
            return
        self.subscribed = True
        self.last_activity = time.monotonic()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: object, _flags: object,
                       reason: Any, _properties: object) -> None:
        if self.client is not None:
            self.lost(f"disconnected: {reason}")

    def _on_log(self, _client: mqtt.Client, _userdata: object, level: int, text: str) -> None:
        if level in (mqtt.MQTT_LOG_ERR, mqtt.MQTT_LOG_WARNING):
            self._errors = [*self._errors[-4:], text]
