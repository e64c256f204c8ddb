"""The outbox relay: outbox rows -> MQTT (paho), QoS 1, marked sent after the PUBACK.

Claims, leases and backoff are the repository's (store/outbox.py): several relays may
run against one database and never take the same row; one topic's notices go out in
order. A relay that dies mid-publish leaves leased rows; they become claimable again
when the lease ends, and are published again: at-least-once delivery. Devices drop
duplicates by sequence number, so a notice takes effect exactly once.

While the broker is down, publishing fails, rows are released with exponential backoff,
and nothing is lost: they stay in the database until a PUBACK comes.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt

from ..config import MqttSettings
from ..store.outbox import LEASE, Claimed
from ..store.repository import Repository

log = logging.getLogger(__name__)

__all__ = ["LEASE", "Claimed", "MqttPublisher", "OutboxRelay", "claim", "mark_sent", "release"]


def claim(repository: Repository, owner: str, now: dt.datetime, limit: int) -> list[Claimed]:
    """Lease up to ``limit`` due rows to ``owner`` and return them (oldest first)."""
    return repository.claim_outbox(owner, now, limit)


def mark_sent(repository: Repository, owner: str, ids: list[int], now: dt.datetime) -> None:
    repository.mark_sent(owner, ids, now)


def release(repository: Repository, owner: str, failed: list[Claimed], error: str,
            now: dt.datetime) -> None:
    """Back off: the rows become due again after 1, 2, 4 ... 60 s."""
    repository.release(owner, failed, error, now)


class MqttPublisher:
    """A paho client over mTLS that publishes with QoS 1 and waits for the PUBACKs."""

    def __init__(self, settings: MqttSettings, client_id: str, timeout: float = 10.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self.client_id = client_id
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv311, clean_session=True)
        context = ssl.create_default_context(cafile=str(settings.ca_file))
        context.load_cert_chain(str(settings.client_cert), str(settings.client_key))
        self.client.tls_set_context(context)
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self._started = False

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if reason.is_failure:
            log.warning("relay: the broker refused %s: %s", self.client_id, reason)
            return
        log.info("relay: connected to the broker %s:%d as %s", self.settings.host,
                 self.settings.port, self.client_id)
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason, properties) -> None:
        self.connected.clear()
        if reason.is_failure:  # not our own disconnect(): the network, or a takeover
            log.warning("relay: lost the broker connection of %s (%s); reconnecting",
                        self.client_id, reason)

    def start(self) -> None:
        """Connect in the background; paho reconnects with backoff (1 ... 10 s)."""
        if not self._started:
            self.client.connect_async(self.settings.host, self.settings.port, keepalive=30)
            self.client.reconnect_delay_set(min_delay=1, max_delay=10)
            self.client.loop_start()
            self._started = True

    def connect(self) -> None:
        self.start()
        if not self.connected.wait(self.timeout):
            raise ConnectionError(f"MQTT broker {self.settings.host}:{self.settings.port} "
                                  "not reachable")

    def publish(self, rows: list[Claimed]) -> tuple[list[int], list[Claimed], str]:
        """(acknowledged ids, failed rows, error) for one batch."""
        infos = []
        for row in rows:
            infos.append((row, self.client.publish(row.topic, row.payload, qos=1,
                                                   retain=row.retain)))
        sent, failed, error = [], [], ""
        for row, info in infos:
            try:
                info.wait_for_publish(self.timeout)
            except (RuntimeError, ValueError) as exc:  # not queued: disconnected
                error = str(exc)
            if info.is_published():
                sent.append(row.id)
            else:
                failed.append(row)
                error = error or "no PUBACK"
        return sent, failed, error

    def close(self) -> None:
        if self._started:
            self.client.disconnect()
            self.client.loop_stop()


class OutboxRelay:
    """Publishes the outbox until ``stop`` is set; ``duties`` run between batches."""

    def __init__(self, repository: Repository, publisher: MqttPublisher,
                 clock: Callable[[], dt.datetime], *, batch: int = 200,
                 idle_seconds: float = 0.05, owner: str | None = None,
                 on_revocation_sent: Callable[[str], None] | None = None) -> None:
        self.repository = repository
        self.publisher = publisher
        self.clock = clock
        self.batch = batch
        self.idle_seconds = idle_seconds
        self.owner = owner or f"{socket.gethostname()[:40]}:{os.getpid()}"
        self.published = 0
        self.on_revocation_sent = on_revocation_sent

    def run_once(self) -> int:
        """Claim one batch and publish it; returns how many the broker acknowledged."""
        rows = claim(self.repository, self.owner, self.clock(), self.batch)
        if not rows:
            return 0
        try:
            self.publisher.connect()
            sent, failed, error = self.publisher.publish(rows)
        except (ConnectionError, OSError) as exc:
            sent, failed, error = [], rows, f"{type(exc).__name__}: {exc}"
        mark_sent(self.repository, self.owner, sent, self.clock())
        if self.on_revocation_sent is not None:
            done = set(sent)
            for row in rows:
                if row.id in done and row.kind == "revocation" and row.retain and row.device_id:
                    self.on_revocation_sent(row.device_id)  # its own topic, not the fleet's
        if failed:
            log.warning("relay: %d notice(s) not acknowledged, retrying later: %s",
                        len(failed), error)
            release(self.repository, self.owner, failed, error, self.clock())
        self.published += len(sent)
        return len(sent)

    def run(self, stop: threading.Event, duties: Callable[[], None] | None = None) -> None:
        while not stop.is_set():
            try:
                count = self.run_once()
                if duties is not None:
                    duties()
            except Exception:  # a bad moment of the database must not kill the relay
                log.exception("relay iteration failed; retrying")
                count = 0
                stop.wait(1.0)
            if count == 0:
                stop.wait(self.idle_seconds)
        self.publisher.close()
