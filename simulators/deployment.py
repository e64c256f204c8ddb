"""What a fleet run talks to: an enrollment server (its URL and trust anchor), the
enrollment group, and optionally the operator credential and the MQTT broker.

Either a deployment someone else runs (`enroll-sim fleet --server URL ...`: only its
public and operator APIs are used) or the private one a local run starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Deployment:
    url: str
    trust_anchor: Path
    group: str
    operator_token: str | None = field(default=None, repr=False)
    broker: tuple[str, int] | None = None  # where devices connect with their TPM keys
    broker_ca: Path | None = None  # the broker's trust anchor [default: the server's CA]

    @property
    def broker_address(self) -> str | None:
        return f"{self.broker[0]}:{self.broker[1]}" if self.broker else None


def parse_broker(value: str) -> tuple[str, int]:
    """"mqtts://host:port", "ssl://host:port" or "host:port" -> (host, port)."""
    text = value if "://" in value else f"mqtts://{value}"
    parts = urlsplit(text)
    if parts.scheme not in ("mqtts", "ssl", "tls") or not parts.hostname:
        raise ValueError("expected mqtts://HOST:PORT or HOST:PORT (the broker speaks TLS)")
    try:
        port = parts.port or 8883
    except ValueError:
        raise ValueError("the port must be a number between 1 and 65535") from None
    return parts.hostname, port
