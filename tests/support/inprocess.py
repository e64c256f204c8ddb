"""The application in process: ``create_app(settings, services)`` over a file CA key and
a temporary SQLite database, driven through Flask's test client. Milliseconds per
request instead of a gunicorn subprocess, TLS and SoftHSM: for refusals and edge cases.
What only a real server shows (TLS handshakes, client certificates read from the socket,
curl and openssl, HSM faults) stays in the served tests (``integration`` marker).

A client certificate reaches the application the way a TLS-terminating proxy hands it
over (http/tls.py, reverse-proxy mode): the test client's peer address, 127.0.0.1, is
the instance's one trusted proxy.

``InProcessInstance`` offers what tests/support/est_helpers.py uses of a served instance
(``dir``, ``url``, ``token``, ``http_client``), so one refusal contract serves both.
"""

from __future__ import annotations

import atexit
import datetime as dt
import shutil
import tempfile
import threading
import urllib.parse
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Flask
from flask.testing import FlaskClient

from enroll_server.app import create_app
from enroll_server.config import Settings, load_settings
from enroll_server.instance import InitOptions, init_instance
from enroll_server.services import Services, build_services

PROXY_HEADER = "X-SSL-Client-Cert"
_template_lock = threading.Lock()
_template: Path | None = None


def _template_instance() -> Path:
    """One `enroll-server init --ca-key file` per test session; each instance copies it."""
    global _template
    with _template_lock:
        if _template is None:
            base = Path(tempfile.mkdtemp(prefix="enroll-inproc-"))
            atexit.register(shutil.rmtree, base, ignore_errors=True)
            init_instance(InitOptions(directory=base / "instance", ca_key="file"))
            _template = base / "instance"
        return _template


class Clock:
    """The services' clock: real time plus whatever a test advanced it by."""

    def __init__(self) -> None:
        self.offset = dt.timedelta(0)

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset

    def advance(self, **delta: float) -> None:
        self.offset += dt.timedelta(**delta)

    def set(self, moment: dt.datetime) -> None:
        """From now on the clock reads ``moment`` (and runs on from there)."""
        self.offset = moment - dt.datetime.now(dt.UTC)


class Answer:
    """A test-client response with the attributes the helpers read (as httpx names them)."""

    def __init__(self, response: Any) -> None:
        self.status_code = response.status_code
        self.headers = response.headers
        self.content = response.get_data()
        self.text = response.get_data(as_text=True)

    def json(self) -> Any:
        import json

        return json.loads(self.content)


class TestClient:
    """httpx.Client's post/get/close over Flask's test client, optionally presenting a
    client certificate (through the trusted-proxy header)."""

    def __init__(self, client: FlaskClient, certificate: x509.Certificate | None) -> None:
        self.client = client
        self.headers = {}
        if certificate is not None:
            pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
            self.headers[PROXY_HEADER] = urllib.parse.quote(pem)

    def _path(self, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def post(self, url: str, content: Any = None, headers: dict[str, str] | None = None,
             json: Any = None) -> Answer:
        if not isinstance(content, (bytes, str, type(None))):
            content = b"".join(content)  # a chunked body: the test client sends it whole
        return Answer(self.client.post(self._path(url), data=content, json=json,
                                       headers={**self.headers, **(headers or {})}))

    def get(self, url: str, headers: dict[str, str] | None = None) -> Answer:
        return Answer(self.client.get(self._path(url),
                                      headers={**self.headers, **(headers or {})}))

    def close(self) -> None:
        pass

    def __enter__(self) -> TestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessInstance:
    """A fresh instance (copied from the session's template) served in process."""

    url = "https://localhost"

    def __init__(self, directory: Path, **overrides: str) -> None:
        shutil.copytree(_template_instance(), directory)
        self.dir = directory
        environ = {"ENROLL_SERVER__TRUSTED_PROXIES": "127.0.0.1",
                   "ENROLL_SERVER__RATE_LIMIT_PER_SECOND": "1000000",
                   "ENROLL_SERVER__RATE_LIMIT_BURST": "1000000",
                   "ENROLL_SERVER__CLIENT_CERT_HEADER": PROXY_HEADER,
                   "ENROLL_SERVER__PUBLIC_URL": self.url,
                   **{f"ENROLL_{key.upper()}": value for key, value in overrides.items()}}
        self.settings: Settings = load_settings(directory / "config.toml", environ=environ)
        self.clock = Clock()
        self.services: Services = build_services(self.settings, clock=self.clock)
        self.app: Flask = create_app(self.settings, self.services)
        self.repository = self.services.repository

    def close(self) -> None:
        self.services.close()

    # -- what a served instance offers ------------------------------------------------
    def token(self, group: str = "default", device_id: str | None = None,
              ttl: dt.timedelta = dt.timedelta(hours=1)) -> str:
        secret, _row = self.repository.create_token(self.repository.group(group), ttl,
                                                    "operator:test", device_id)
        return secret

    def http_client(self, certificate: x509.Certificate | None = None) -> TestClient:
        return TestClient(self.app.test_client(), certificate)

    def create_group(self, name: str, **fields: Any) -> None:
        self.repository.create_group(name, **fields)
