"""Settings: defaults -> TOML -> ENROLL_* env, validated, immutable, errors name the key."""

import dataclasses
from pathlib import Path

import pytest

from enroll_server.config import ConfigError, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_file_values_and_relative_paths_resolve_against_the_instance(tmp_path):
    settings = load_settings(write(tmp_path, '[server]\nport = 9443\n[tls]\ncert = "t/c.pem"\n'),
                             environ={})
    assert settings.server.port == 9443
    assert settings.tls.cert == tmp_path / "t/c.pem"
    assert settings.ca.pkcs11.pin_file == tmp_path / "secrets/hsm.pin"


def test_environment_overrides_the_file_with_type_conversion(tmp_path):
    settings = load_settings(write(tmp_path, "[server]\nport = 9443\n"), environ={
        "ENROLL_SERVER__PORT": "9555", "ENROLL_SERVER__TRUSTED_PROXIES": "10.0.0.1, ::1",
        "ENROLL_SERVER__RATE_LIMIT_PER_SECOND": "2.5", "UNRELATED": "x"})
    assert settings.server.port == 9555
    assert settings.server.trusted_proxies == ("10.0.0.1", "::1")
    assert settings.server.rate_limit_per_second == 2.5


def test_settings_are_immutable(tmp_path):
    settings = load_settings(write(tmp_path, ""), environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.server.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(("text", "environ", "key"), [
    ("[server]\nprot = 1\n", {}, "server.prot"),
    ("[server]\nport = 'x'\n", {}, "server.port"),
    ("[server]\nport = 70000\n", {}, "server.port"),
    ("[ca]\nbackend = 'tpm'\n", {}, "ca.backend"),
    ("", {"ENROLL_SERVER__WORKERS": "many"}, "server.workers"),
    ("", {"ENROLL_SERVER__TRUSTED_PROXIES": "not-an-ip"}, "server.trusted_proxies"),
    ("[database]\nurl = 'mysql://x'\n", {}, "database.url"),
    ("[tls]\nmin_version = '1.0'\n", {}, "tls.min_version"),
    ("[server]\nport = true\n", {}, "server.port"),
])
def test_bad_setting_fails_naming_the_key(tmp_path, text, environ, key):
    with pytest.raises(ConfigError) as excinfo:
        load_settings(write(tmp_path, text), environ=environ)
    assert key in str(excinfo.value)


def test_invalid_toml_and_missing_file_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[server\n"), environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml", environ={})


@pytest.mark.integration
def test_serve_with_bad_setting_exits_with_a_message_naming_the_key(tmp_path):
    import subprocess
    import sys

    config = write(tmp_path, "[server]\nworkers = 0\n")
    result = subprocess.run([str(Path(sys.executable).parent / "enroll-server"), "serve",
                             "--config", str(config)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "server.workers" in result.stderr
    assert "Traceback" not in result.stderr
