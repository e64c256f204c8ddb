"""The device agent: listens for signed notices over MQTT and keeps the certificate alive.

One thread, one loop: the broker connection (device_sdk.broker_link, paho driven from
here), the notices it received, the renewal timer and signals. Nothing runs concurrently,
so the process-wide tpm2-openssl provider (device_sdk.tls) and the TPM have one user.

- Broker: mTLS (TLS 1.3) with the device certificate and its TPM-resident key, client id
  = device id, persistent session, QoS 1 on fleet/<group>/devices/<device id>/notices:
  notices published while the device was offline arrive when it returns. A notice is
  acknowledged (PUBACK) only after it has been handled and persisted.
- Every notice is verified (device_sdk.notices: signer chained to the CA in chain.pem,
  audience = this device, not expired, sequence above the last one accepted, kept in
  notices.json) or ignored with a log line naming the rejection code.
- renewal_due / ca_rotation for the current certificate, or 2/3 of its lifetime gone:
  renew after a random jitter (device_sdk.renewal), store atomically, reconnect with the
  new certificate. An accepted renewal notice is persisted as pending until done.
- Revocation of the current certificate, learnt from a notice, from the CA's CRL when
  the broker refuses the device (no notice can reach it then), or from the EST server
  refusing a renewal as revoked: the certificate is moved aside, status.json says
  "revoked" (reason, serial, time, source), a retained status message goes out if still
  connected, and the agent exits 10 (EXIT_REVOKED).
- Broker down: reconnect with backoff. SIGTERM / SIGINT: status "stopped", exit 0.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.x509.oid import NameOID

from .broker_link import BrokerLink
from .est import EstError
from .notices import NoticeRejected, verify_notice
from .renewal import RenewalDeferred, Renewer, RevokedByServer, crl_revocation
from .state import DeviceState, NoticeBook
from .tls import TpmTlsError, tpm_client_context
from .tpm import TpmError

EXIT_OK = 0  # SIGTERM / SIGINT, or --once done
EXIT_REFUSED = 3  # the server refused renewal and a fresh attested enrollment
EXIT_TPM = 4  # the TPM (or the tpm2 provider) failed
EXIT_NOT_ENROLLED = 5  # no usable enrollment in the state dir
EXIT_UNREACHABLE = 6  # --once: the broker could not be reached (or refused the topic)
EXIT_REVOKED = 10  # this device's certificate is revoked: firmware must act


@dataclass
class AgentConfig:
    state_dir: Path
    tcti: str
    server: str
    server_ca: Path
    broker_host: str
    broker_port: int
    group: str | None = None  # default: the group stored at enrollment, else "default"
    broker_ca: Path | None = None  # default: the state dir's chain.pem
    topic_prefix: str = "fleet"
    once: bool = False
    renew_jitter: float = 300.0  # seconds; 0 renews at once
    renew_fraction: float = 2 / 3  # renew unprompted past this share of the lifetime
    max_backoff: float = 60.0
    keepalive: int = 60
    timeout: float = 60.0  # per network exchange (real TPMs are slow)
    quiet_seconds: float = 3.0  # --once: no message for this long = nothing is waiting


class Events:
    """Log lines: "<time> <LEVEL> <event>: k=v ..." on stderr, or JSON lines on stdout."""

    def __init__(self, as_json: bool, stream: TextIO | None = None) -> None:
        self.as_json = as_json
        self.stream = stream or (sys.stdout if as_json else sys.stderr)

    def __call__(self, event: str, level: str = "info", **fields: Any) -> None:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        if self.as_json:
            line = json.dumps({"ts": now, "level": level, "event": event, **fields},
                              default=str)
        else:
            line = f"{now} {level.upper()} {event}: " + " ".join(
                f"{key}={value}" for key, value in fields.items())
        print(line, file=self.stream, flush=True)


class Revoked(Exception):
    pass


def _hex(serial: int | str) -> str:
    return f"{int(serial):X}"


class Agent:
    def __init__(self, config: AgentConfig, events: Events,
                 rng: random.Random | None = None) -> None:
        self.config, self.emit = config, events
        self.state = DeviceState(config.state_dir)
        self.rng = rng or random.SystemRandom()
        self.stopping = False
        self.certificate: x509.Certificate | None = None
        self.renew_at: float | None = None  # monotonic time of the next renewal attempt
        self.renew_failures = 0
        self.crl_next, self.crl_interval = 0.0, 30.0

    def request_stop(self, *_: object) -> None:
        self.stopping = True

    # -- lifecycle -------------------------------------------------------------------

    def run(self) -> int:
        status = self.state.status()
        if status is not None and status.revoked:
            self.emit("revoked", "error", serial=status.serial, reason=status.reason,
                      source="state", note="status.json already says revoked")
            return EXIT_REVOKED
        self.certificate = self.state.certificate()
        if self.certificate is None or not self.state.chain() or not self.state.key_path.exists():
            self.emit("not_enrolled", "error", state_dir=str(self.config.state_dir),
                      hint="run `enroll-device enroll` first")
            return EXIT_NOT_ENROLLED
        names = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.device_id = str(names[0].value)
        group = self.config.group or (status.group if status else None) or "default"
        topic = f"{self.config.topic_prefix}/{group}/devices/{self.device_id}/"
        self.link = BrokerLink(self.config.broker_host, self.config.broker_port,
                               self.device_id, topic + "notices", topic + "status", self.emit,
                               keepalive=self.config.keepalive, timeout=self.config.timeout,
                               max_backoff=self.config.max_backoff, rng=self.rng)
        self.link.on_refused = self._check_crl
        self.renewer = Renewer(self.state, self.config.tcti, self.config.server,
                               self.config.server_ca, group, self.config.timeout)
        self.emit("started", device_id=self.device_id, group=group,
                  serial=_hex(self.certificate.serial_number), topic=topic + "notices",
                  renew_after=self._timer_due(self.certificate).isoformat())
        if self.state.notice_book().pending:
            self._schedule_renewal("a notice accepted before a restart")
        try:
            return self._loop()
        except Revoked:
            return EXIT_REVOKED
        except EstError as error:
            self.emit("refused", "error", status=error.status, code=error.code,
                      message=error.message)
            return EXIT_REFUSED
        except (TpmError, TpmTlsError) as error:
            self.emit("tpm_error", "error", message=str(error))
            return EXIT_TPM
        finally:
            self.link.close(self._status("stopped") if self.stopping else None)
            if self.stopping:
                self.emit("stopped", why="SIGTERM/SIGINT")

    def _loop(self) -> int:
        while not self.stopping:
            if self.link.due():
                self._connect()
                if self.config.once and (self.link.client is None
                                         or self.link.subscribe_refused):
                    return EXIT_UNREACHABLE
            self.link.poll(0.2)
            while self.link.inbox:
                message = self.link.inbox.pop(0)
                self.link.last_activity = time.monotonic()
                self._handle(message)
                self.link.ack(message)
            self._timers()
            if self.config.once and self._once_done():
                self.emit("once_done")
                return EXIT_OK
        return EXIT_OK

    def _once_done(self) -> bool:
        quiet = time.monotonic() - self.link.last_activity >= self.config.quiet_seconds
        return self.link.subscribed and quiet and self.renew_at is None

    def _status(self, state: str) -> str:
        serial = _hex(self.certificate.serial_number) if self.certificate else None
        return json.dumps({"state": state, "device_id": self.device_id, "serial": serial,
                           "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})

    def _connect(self) -> None:
        context = tpm_client_context(self.config.broker_ca or self.state.chain_path,
                                     self.state.certificate_path, self.state.key_path,
                                     self.config.tcti)
        if self.link.connect(context, will=self._status("offline"),
                             online=self._status("online")):
            self.crl_next, self.crl_interval = 0.0, 30.0

    # -- notices -----------------------------------------------------------------------

    def _handle(self, message: mqtt.MQTTMessage) -> None:
        book = self.state.notice_book()
        try:
            notice = verify_notice(message.payload, self.state.chain(), self.device_id,
                                   book.last_sequence, dt.datetime.now(dt.UTC))
        except NoticeRejected as rejected:
            self.emit("notice_rejected", "warning", code=rejected.code,
                      message=rejected.message[:200], topic=message.topic,
                      retained=bool(message.retain))
            return
        self.emit("notice_accepted", type=notice.type, sequence=notice.sequence,
                  serial=_hex(notice.serial), reason=notice.reason)
        current = self.certificate.serial_number if self.certificate else None
        if int(notice.serial) != current:
            self.emit("notice_ignored", type=notice.type, sequence=notice.sequence,
                      why=f"for serial {_hex(notice.serial)}, not the current certificate")
            self.state.save_notice_book(NoticeBook(notice.sequence, book.pending))
        elif notice.type == "revocation":
            self._revoked(int(notice.serial), notice.reason, "notice", notice.sequence)
        else:  # renewal_due, ca_rotation: remember it, renew after the jitter
            pending = {"type": notice.type, "serial": notice.serial,
                       "sequence": notice.sequence}
            self.state.save_notice_book(NoticeBook(notice.sequence, pending))
            self._schedule_renewal(notice.type, _server_slot(notice.extra))

    def _revoked(self, serial: int, reason: str | None, source: str,
                 sequence: int | None = None) -> None:
        status = self.state.mark_revoked(serial, reason, source)
        if sequence is not None:
            self.state.save_notice_book(NoticeBook(sequence, None))
        self.emit("revoked", "error", serial=status.serial, reason=reason, source=source,
                  status=str(self.state.status_path))
        payload = json.dumps({"state": "revoked", "device_id": self.device_id,
                              "serial": status.serial, "reason": reason, "source": source,
                              "at": status.revoked_at})
        published = self.link.publish_status(payload)
        self.emit("status_published" if published else "status_not_published",
                  state="revoked")
        self.link.close()
        self.certificate = None
        raise Revoked()

    def _check_crl(self) -> None:
        """The broker refuses us, so no revocation notice can come: ask the CA's CRL (its
        signature decides, not the unauthenticated TLS failure). At once the first time,
        then every 30 s doubling to 1 h while it says "not revoked" (a fleet facing a
        broken broker must not hammer the CRL endpoint)."""
        if time.monotonic() < self.crl_next or self.certificate is None:
            return
        self.crl_next = time.monotonic() + self.rng.uniform(0.5, 1.0) * self.crl_interval
        self.crl_interval = min(3600.0, self.crl_interval * 2)
        try:
            reason = crl_revocation(self.certificate, self.state.chain(),
                                    self.config.server_ca, self.config.timeout)
        except Exception as error:  # noqa: BLE001 - no verdict: keep retrying
            self.emit("crl_check_failed", "warning", error=f"{type(error).__name__}: {error}")
            return
        self.emit("crl_checked", serial=_hex(self.certificate.serial_number),
                  revoked=reason is not None)
        if reason is not None:
            self._revoked(self.certificate.serial_number, reason, "crl")

    # -- renewal -----------------------------------------------------------------------

    def _timer_due(self, certificate: x509.Certificate) -> dt.datetime:
        start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        return start + (end - start) * self.config.renew_fraction

    def _schedule_renewal(self, why: str, delay: float | None = None) -> None:
        if delay is None:
            delay = self.rng.uniform(0, self.config.renew_jitter)
        at = time.monotonic() + delay
        if self.renew_at is None or at < self.renew_at:
            self.renew_at = at
            self.emit("renewal_scheduled", why=why, in_seconds=round(delay, 2))

    def _timers(self) -> None:
        if self.certificate is None:
            return
        if self.renew_at is None:
            now = dt.datetime.now(dt.UTC)
            if now >= self.certificate.not_valid_after_utc:
                self._schedule_renewal("certificate expired", 0.0)
            elif now >= self._timer_due(self.certificate):
                self._schedule_renewal(f"{self.config.renew_fraction:.0%} of the lifetime")
        if self.renew_at is not None and time.monotonic() >= self.renew_at:
            self.renew_at = None
            self._renew(self.certificate)

    def _renew(self, old: x509.Certificate) -> None:
        started = time.monotonic()
        try:
            renewed = self.renewer.renew(self.device_id)
        except RevokedByServer as refusal:
            self._revoked(old.serial_number, None, f"est:{refusal.code}")
            return
        except RenewalDeferred as error:
            self.renew_failures += 1
            delay = self.rng.uniform(0.5, 1.0) * min(self.config.max_backoff * 5,
                                                     2.0 ** min(self.renew_failures, 16))
            self.emit("renewal_deferred", "warning", error=str(error)[:300],
                      retry_in=round(delay, 2))
            self._schedule_renewal("retry", delay)
            return
        self.renew_failures = 0
        self.certificate = renewed.certificate
        self.state.save_notice_book(NoticeBook(self.state.notice_book().last_sequence, None))
        self.emit("renewed", via=renewed.via, old_serial=_hex(old.serial_number),
                  serial=_hex(renewed.certificate.serial_number),
                  not_after=renewed.certificate.not_valid_after_utc.isoformat(),
                  seconds=round(time.monotonic() - started, 3))
        self.link.reconnect_now()  # the broker authenticated the old certificate


def run_agent(config: AgentConfig, as_json: bool) -> int:
    """Run until stopped; returns the exit status (see the EXIT_* constants)."""
    agent = Agent(config, Events(as_json))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, agent.request_stop)
    return agent.run()


MAX_SERVER_DELAY = 7 * 24 * 3600.0  # seconds: a renew_after further out is not believed


def _server_slot(extra: object) -> float | None:
    """Seconds until the notice's ``renew_after`` (the server spreads a CA rotation over a
    window so the fleet does not come back at once); None: use our own jitter."""
    value = extra.get("renew_after") if hasattr(extra, "get") else None
    if not isinstance(value, str):
        return None
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return min(max((when - dt.datetime.now(dt.UTC)).total_seconds(), 0.0), MAX_SERVER_DELAY)
