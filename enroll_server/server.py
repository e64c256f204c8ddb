"""The production server: gunicorn, multi-process, TLS 1.2+, with our own worker class
(worker.py: an event loop owns the sockets, threads run the application).

Each worker builds its own application (no preload), so every worker process has its
own PKCS#11 session and database connection (SoftHSM is not fork- or thread-safe:
FIELD-NOTES). The TLS context asks for a client certificate (CERT_OPTIONAL) trusted by
the issuing CAs or a bootstrap CA; the application re-checks expiry, revocation and group
policy itself, so the handshake skips the time check (X509_V_FLAG_NO_CHECK_TIME) and an
expired device certificate earns a clear EST error instead of a TLS alert.

SIGHUP (gunicorn): the master re-reads the configuration and the client trust bundle
(e.g. after `enroll-server ca rotate`), starts new workers, which load the active CA
from the database, and stops the old ones gracefully.
"""

from __future__ import annotations

import logging
import os
import ssl
import subprocess
import sys
from pathlib import Path

from gunicorn.app.base import BaseApplication

from .config import Settings, load_settings
from .worker import ConnectionLimits

X509_V_FLAG_NO_CHECK_TIME = 0x200000  # OpenSSL x509_vfy.h
log = logging.getLogger(__name__)


def client_trust_bundle(settings: Settings) -> str:
    """PEM of every CA whose certificates may authenticate a client over TLS: the active
    issuing CA, retired ones while any certificate they issued is unexpired (devices
    re-enroll with those), the root, and the groups' bootstrap CAs."""
    import datetime as dt

    from .authorities import client_trust_certificates, pem
    from .store.db import migrate, open_database
    from .store.repository import Repository

    database = open_database(settings.database.url, settings.instance_dir)
    with database.connection_context():
        migrate(database)  # once, in the master, before workers start
        repository = Repository(database)
        parts = [pem(c) for c in client_trust_certificates(
            settings, repository, dt.datetime.now(dt.UTC))]
        if not parts:  # an instance without a recorded CA (yet): the configured one
            parts.append(settings.ca.certificate.read_text())
        if settings.ca.root_certificate.exists():
            parts.append(settings.ca.root_certificate.read_text())
        parts.extend(repository.bootstrap_ca_bundles())
    database.close()
    return "\n".join(parts)


def make_ssl_context(settings: Settings, trust_bundle: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = (ssl.TLSVersion.TLSv1_3 if settings.tls.min_version == "1.3"
                               else ssl.TLSVersion.TLSv1_2)
    context.load_cert_chain(settings.tls.cert, settings.tls.key)
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_verify_locations(cadata=trust_bundle)
    context.verify_flags |= X509_V_FLAG_NO_CHECK_TIME
    return context


class EnrollServer(BaseApplication):
    def __init__(self, config_path: Path, settings: Settings) -> None:
        self.config_path = config_path
        self.settings = settings
        self.trust_bundle = client_trust_bundle(settings)
        self._loaded = False
        super().__init__()

    def load_config(self) -> None:
        """At start and on every SIGHUP (gunicorn re-runs it in the master)."""
        if self._loaded:
            self._reload_trust()
        self._loaded = True
        server = self.settings.server
        trust_bundle = self.trust_bundle
        settings = self.settings
        self.cfg.set("bind", [f"{server.bind}:{server.port}"])
        self.cfg.set("workers", server.workers)
        self.cfg.set("threads", server.threads)
        self.cfg.set("worker_class", "enroll_server.worker.EventLoopWorker")
        self.cfg.set("keepalive", max(1, round(server.keepalive_seconds))
                     if server.keepalive_seconds else 0)
        self.connection_limits = connection_limits(settings)
        self.cfg.set("timeout", 60)
        self.cfg.set("graceful_timeout", 10)
        self.cfg.set("certfile", str(settings.tls.cert))
        self.cfg.set("keyfile", str(settings.tls.key))
        self.cfg.set("proc_name", "enroll-server")
        if "control_socket_disable" in self.cfg.settings:  # gunicorn >= 24
            self.cfg.set("control_socket_disable", True)
        contexts: dict[int, ssl.SSLContext] = {}

        def ssl_context(conf: object, factory: object) -> ssl.SSLContext:
            # gunicorn asks for every connection: build it once per worker process
            # (loading keys and the trust bundle costs ~2.6 ms, and one context keeps
            # TLS session resumption working).
            pid = os.getpid()
            if pid not in contexts:
                contexts[pid] = make_ssl_context(settings, trust_bundle)
            return contexts[pid]

        self.cfg.set("ssl_context", ssl_context)

    def _reload_trust(self) -> None:
        """Re-read settings and the client trust bundle; on any failure keep the old ones
        (gunicorn would exit the master on an exception here)."""
        try:
            settings = load_settings(self.config_path)
            trust_bundle = client_trust_bundle(settings)
        except Exception:  # noqa: BLE001 - a reload must never take the server down
            log.exception("reload: keeping the previous settings and client trust bundle")
            return
        self.settings, self.trust_bundle = settings, trust_bundle
        log.info("reload: client trust bundle re-read")

    def load(self):
        from .app import create_app

        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(process)d %(levelname)s %(name)s "
                                   "%(message)s")
        return create_app(load_settings(self.config_path))


def connection_limits(settings: Settings) -> ConnectionLimits:
    server = settings.server
    return ConnectionLimits(
        read_timeout=server.read_timeout_seconds, write_timeout=server.write_timeout_seconds,
        keepalive=server.keepalive_seconds,
        max_connections=server.max_connections_per_worker,
        max_body=server.max_body_bytes)


def serve(config_path: Path, port: int | None = None, workers: int | None = None,
          with_relay: bool = False) -> None:
    if port is not None:
        os.environ["ENROLL_SERVER__PORT"] = str(port)
    if workers is not None:
        os.environ["ENROLL_SERVER__WORKERS"] = str(workers)
    settings = load_settings(config_path)
    os.umask(0o077)  # every file the server and its workers create: the service user's
    _check_secrets_at_rest(settings)
    relay = _start_relay(config_path) if with_relay else None
    try:
        EnrollServer(config_path, settings).run()
    finally:
        if relay is not None and relay.poll() is None:
            relay.terminate()
            relay.wait(15)


def _check_secrets_at_rest(settings: Settings) -> None:
    from .secrets_at_rest import findings, tighten_instance_files

    for change in tighten_instance_files(settings):
        print(f"enroll-server: tightened {change}", file=sys.stderr)
    for finding in findings(settings):
        print(f"enroll-server: warning: {finding}", file=sys.stderr)




def _start_relay(config_path: Path) -> subprocess.Popen:
    """`enroll-server relay` beside the server, as its own process (its own PKCS#11 login,
    its own MQTT connection); stopped when the server stops, or dies."""
    return subprocess.Popen([sys.executable, "-c",
                             "from enroll_server.relay_child import main; main()",
                             str(os.getpid()), "--config", str(config_path), "relay"])
