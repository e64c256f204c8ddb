"""Settings: embedded defaults -> one TOML file per instance -> ENROLL_* environment.

The result is a frozen tree of dataclasses. Every value is type-checked and validated
at start; an unknown key or a bad value raises ConfigError naming the dotted key, so a
typo never silently falls back to a default (a weakness noted in ../STYLE.md).

Environment overrides use double underscores for nesting:
``ENROLL_SERVER__PORT=9443`` sets ``server.port``; lists are comma separated.
Relative paths are resolved against the directory holding the config file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "ENROLL_"


class ConfigError(ValueError):
    """A setting is missing, unknown or invalid; the message names the key."""


@dataclass(frozen=True)
class ServerSettings:
    public_url: str = "https://localhost:8443"
    bind: str = "127.0.0.1"
    port: int = 8443
    workers: int = 2
    threads: int = 8
    max_body_bytes: int = 16384
    # Reverse-proxy mode: a forwarded client certificate header is believed only from these
    # peer addresses (exact IPs or CIDR networks). Empty: the header is always ignored.
    trusted_proxies: tuple[str, ...] = ()
    client_cert_header: str = "X-SSL-Client-Cert"
    rate_limit_per_second: float = 50.0
    rate_limit_burst: int = 100
    retry_after_seconds: int = 30
    manual_approval_retry_seconds: int = 60
    # Slow or stalled clients (worker.py): a connection must complete its TLS handshake
    # and its request within read_timeout_seconds of connecting (on a kept-alive
    # connection: of the request's first byte), a response must make progress every
    # write_timeout_seconds, an idle kept-alive connection closes after keepalive_seconds.
    read_timeout_seconds: float = 15.0
    write_timeout_seconds: float = 30.0
    keepalive_seconds: float = 30.0
    # Open connections per worker process; above it the worker stops accepting until
    # some close (the others and the listen backlog take the rest).
    max_connections_per_worker: int = 4096


@dataclass(frozen=True)
class TLSSettings:
    cert: Path = Path("tls/server.pem")
    key: Path = Path("tls/server.key")
    min_version: str = "1.2"


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = "sqlite:///enroll.db"


@dataclass(frozen=True)
class Pkcs11Settings:
    module: Path = Path("/usr/lib/softhsm/libsofthsm2.so")
    token_label: str = "enroll-ca"
    key_label: str = "issuing-ca"
    pin_file: Path = Path("secrets/hsm.pin")
    # SoftHSM only: its configuration file (token directory). Exported as SOFTHSM2_CONF.
    softhsm_conf: Path | None = None
    reconnect_backoff_seconds: float = 2.0


@dataclass(frozen=True)
class CASettings:
    """The first issuing CA and where CA keys live. Later CA generations (`enroll-server
    ca rotate`) are recorded in the database (authorities.py): same token, module and
    PIN, their own key label (or key file)."""

    backend: str = "pkcs11"
    certificate: Path = Path("ca/issuing-ca.pem")
    root_certificate: Path = Path("ca/root-ca.pem")
    key_file: Path = Path("ca/issuing-ca.key")
    key_passphrase_file: Path | None = None
    pkcs11: Pkcs11Settings = field(default_factory=Pkcs11Settings)


@dataclass(frozen=True)
class IssuanceSettings:
    backdate_seconds: int = 300
    token_ttl_seconds: int = 86400


@dataclass(frozen=True)
class AttestationSettings:
    # Lifetime of a credential challenge and its nonce (single use either way). Real TPMs
    # take up to a few seconds per command; the device does ~4 commands in between.
    challenge_ttl_seconds: int = 120
    # Open (unused, unexpired) challenges one EK may hold; more is refused (429).
    max_open_challenges: int = 8


@dataclass(frozen=True)
class RevocationSettings:
    # CRL (RFC 5280 5.1.2.5): nextUpdate = thisUpdate + validity; rebuilt on every
    # revocation and whenever the newest CRL is older than refresh.
    crl_validity_hours: int = 24
    crl_refresh_hours: int = 6
    # OCSP (RFC 6960 4.2.2.1): nextUpdate of good/revoked answers; cached until then.
    ocsp_validity_minutes: int = 10
    # Delegated OCSP responder certificate (RFC 6960 4.2.2.2), re-issued before it ends.
    responder_lifetime_days: int = 30


@dataclass(frozen=True)
class MqttSettings:
    """The broker the outbox relay publishes notices to (mTLS, QoS 1): its service
    listener, with this relay's identity (written by `enroll-server broker-config`)."""

    host: str = "127.0.0.1"
    port: int = 8884
    ca_file: Path = Path("ca/ca-chain.pem")
    client_cert: Path = Path("mqtt/relays/main.pem")
    client_key: Path = Path("mqtt/relays/main.key")
    topic_prefix: str = "fleet"
    # The broker's crlfile, kept current by the relay; SIGHUP makes Mosquitto re-read it.
    broker_crl_file: Path = Path("mqtt/crl.pem")
    broker_pid_file: Path | None = None
    # A revoked device still connected is disconnected (session takeover by client id)
    # this long after its revocation notice went out; negative: never.
    kick_revoked_after_seconds: float = 3.0


@dataclass(frozen=True)
class NoticeSettings:
    ttl_days: int = 30  # a notice's "exp" claim
    # Renewal-due notices at this fraction of a certificate's lifetime, plus jitter of up
    # to jitter_fraction of the lifetime, so a fleet does not come back all at once.
    renewal_fraction: float = 0.667
    renewal_jitter_fraction: float = 0.05


@dataclass(frozen=True)
class OperatorSettings:
    # SHA-256 (hex) of the operator API bearer credential created by `enroll-server init`.
    credential_sha256: str = ""


@dataclass(frozen=True)
class Settings:
    instance_dir: Path = Path(".")
    server: ServerSettings = field(default_factory=ServerSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    ca: CASettings = field(default_factory=CASettings)
    issuance: IssuanceSettings = field(default_factory=IssuanceSettings)
    attestation: AttestationSettings = field(default_factory=AttestationSettings)
    revocation: RevocationSettings = field(default_factory=RevocationSettings)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    notices: NoticeSettings = field(default_factory=NoticeSettings)
    operator: OperatorSettings = field(default_factory=OperatorSettings)

    def resolve(self, path: Path) -> Path:
        """An instance-relative path made absolute."""
        return path if path.is_absolute() else self.instance_dir / path


def load_settings(
    path: str | os.PathLike[str] | None, environ: typing.Mapping[str, str] | None = None
) -> Settings:
    """Load and validate settings; raises ConfigError naming the offending key."""
    environ = os.environ if environ is None else environ
    raw: dict[str, typing.Any] = {}
    instance_dir = Path.cwd()
    if path is not None:
        config_path = Path(path)
        try:
            raw = tomllib.loads(config_path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {config_path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_path} is not valid TOML: {exc}") from None
        instance_dir = config_path.resolve().parent
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "ENROLL_CONFIG":
            continue
        keys = name[len(ENV_PREFIX):].lower().split("__")
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: {'.'.join(keys)} is not a table")
        node[keys[-1]] = _EnvString(value)
    raw.setdefault("instance_dir", str(instance_dir))
    settings = _build(Settings, raw, "")
    _validate(settings)
    return _resolve_paths(settings, settings.instance_dir)


class _EnvString(str):
    """A value from the environment: converted to the field's type, not type-checked."""


def _build(cls: type, raw: typing.Any, prefix: str) -> typing.Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown setting")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            values[f.name] = _convert(hints[f.name], raw[f.name], prefix + f.name)
    return cls(**values)


def _convert(hint: typing.Any, value: typing.Any, key: str) -> typing.Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value in ("", None):
            return None
        return _convert(args[0], value, key)
    from_env = isinstance(value, _EnvString)
    try:
        if origin is tuple:
            items = [v.strip() for v in value.split(",") if v.strip()] if from_env else value
            if not isinstance(items, list):
                raise TypeError
            return tuple(_convert(typing.get_args(hint)[0], v, key) for v in items)
        if hint is bool:
            if from_env:
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError
                return value.lower() in ("1", "true", "yes")
            if not isinstance(value, bool):
                raise TypeError
            return value
        if hint is int:
            if isinstance(value, bool) or not (from_env or isinstance(value, int)):
                raise TypeError
            return int(value)
        if hint is float:
            if isinstance(value, bool) or not (from_env or isinstance(value, int | float)):
                raise TypeError
            return float(value)
        if hint is Path:
            if not isinstance(value, str) or not value:
                raise TypeError
            return Path(value)
        if hint is str:
            if not isinstance(value, str):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        name = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"{key}: expected {name}, got {value!r}") from None
    raise ConfigError(f"{key}: unsupported setting type {hint}")  # pragma: no cover


def _validate(s: Settings) -> None:
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {why}")

    need(1 <= s.server.port <= 65535, "server.port", "must be between 1 and 65535")
    need(s.server.workers >= 1, "server.workers", "must be at least 1")
    need(s.server.threads >= 1, "server.threads", "must be at least 1")
    need(1024 <= s.server.max_body_bytes <= 1 << 20, "server.max_body_bytes",
         "must be between 1024 and 1048576")
    need(s.server.public_url.startswith(("https://", "http://")), "server.public_url",
         "must be an http(s) URL")
    need(s.server.rate_limit_per_second > 0, "server.rate_limit_per_second", "must be > 0")
    need(s.server.rate_limit_burst >= 1, "server.rate_limit_burst", "must be at least 1")
    for key in ("read_timeout_seconds", "write_timeout_seconds"):
        need(0.1 <= getattr(s.server, key) <= 3600, f"server.{key}",
             "must be between 0.1 and 3600")
    need(0 <= s.server.keepalive_seconds <= 3600, "server.keepalive_seconds",
         "must be between 0 (no keep-alive) and 3600")
    need(16 <= s.server.max_connections_per_worker <= 1 << 20,
         "server.max_connections_per_worker", "must be between 16 and 1048576")
    for proxy in s.server.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(f"server.trusted_proxies: {proxy!r} is not an IP address "
                              "or network") from None
    need(s.tls.min_version in ("1.2", "1.3"), "tls.min_version", "must be '1.2' or '1.3'")
    need(s.ca.backend in ("pkcs11", "file"), "ca.backend", "must be 'pkcs11' or 'file'")
    need(s.database.url.startswith(("sqlite://", "postgres://", "postgresql://")),
         "database.url", "must be a sqlite:// or postgresql:// URL")
    need(0 <= s.issuance.backdate_seconds <= 3600, "issuance.backdate_seconds",
         "must be between 0 and 3600")
    need(s.issuance.token_ttl_seconds >= 60, "issuance.token_ttl_seconds", "must be >= 60")
    need(5 <= s.attestation.challenge_ttl_seconds <= 3600,
         "attestation.challenge_ttl_seconds", "must be between 5 and 3600")
    need(s.attestation.max_open_challenges >= 1, "attestation.max_open_challenges",
         "must be at least 1")
    need(1 <= s.revocation.crl_validity_hours <= 24 * 30, "revocation.crl_validity_hours",
         "must be between 1 and 720")
    need(1 <= s.revocation.crl_refresh_hours < s.revocation.crl_validity_hours,
         "revocation.crl_refresh_hours", "must be >= 1 and below crl_validity_hours")
    need(1 <= s.revocation.ocsp_validity_minutes <= 7 * 24 * 60,
         "revocation.ocsp_validity_minutes", "must be between 1 and 10080")
    need(2 <= s.revocation.responder_lifetime_days <= 365,
         "revocation.responder_lifetime_days", "must be between 2 and 365")
    need(1 <= s.mqtt.port <= 65535, "mqtt.port", "must be between 1 and 65535")
    need(0.1 <= s.notices.renewal_fraction < 1, "notices.renewal_fraction",
         "must be in [0.1, 1)")
    need(0 <= s.notices.renewal_jitter_fraction <= 0.2
         and s.notices.renewal_fraction + s.notices.renewal_jitter_fraction < 1,
         "notices.renewal_jitter_fraction", "must be in [0, 0.2] and end before expiry")
    need(s.notices.ttl_days >= 1, "notices.ttl_days", "must be at least 1")


def _resolve_paths(obj: typing.Any, base: Path) -> typing.Any:
    if not dataclasses.is_dataclass(obj):
        return obj
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == "instance_dir":
            continue
        if isinstance(value, Path) and not value.is_absolute():
            changes[f.name] = base / value
        elif dataclasses.is_dataclass(value):
            changes[f.name] = _resolve_paths(value, base)
    return dataclasses.replace(obj, **changes)
