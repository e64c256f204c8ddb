"""The operator CLI as a user meets it: init, help, groups, tokens, tables and --json."""

import json
import stat

import pytest

from simulators.served import BIN, enroll_server

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker


def test_init_creates_a_complete_instance_and_refuses_to_overwrite_it(tmp_path):
    directory = tmp_path / "inst"
    result = enroll_server("init", "--dir", str(directory), "--ca-key", "file")
    assert "enroll-server serve --config" in result.stdout
    for name in ("config.toml", "enroll.db", "ca/root-ca.pem", "ca/root-ca.key",
                 "ca/issuing-ca.pem", "ca/ca-chain.pem", "tls/server.pem"):
        assert (directory / name).exists(), name
    assert stat.S_IMODE((directory / "secrets/root-ca.pass").stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in (directory / "ca/root-ca.key").read_bytes()
    before = (directory / "ca/issuing-ca.pem").read_bytes()
    again = enroll_server("init", "--dir", str(directory), check=False)
    assert again.returncode != 0
    assert "refusing to overwrite" in again.stderr
    assert (directory / "ca/issuing-ca.pem").read_bytes() == before


def test_pkcs11_init_keeps_no_issuing_key_on_disk(tmp_path):
    directory = tmp_path / "inst"
    enroll_server("init", "--dir", str(directory))
    assert not (directory / "ca/issuing-ca.key").exists()
    assert (directory / "softhsm/tokens").is_dir()
    assert 'backend = "pkcs11"' in (directory / "config.toml").read_text()


def test_groups_tokens_and_tables(tmp_path):
    directory = tmp_path / "inst"
    enroll_server("init", "--dir", str(directory), "--ca-key", "file")
    config = ["--config", str(directory / "config.toml")]
    enroll_server(*config, "group", "create", "lab", "--lifetime-days", "30",
                  "--key-types", "ec-p256", "--approval", "--supersede-grace", "0s")
    groups = json.loads(enroll_server(*config, "group", "list", "--json").stdout)
    lab = next(g for g in groups if g["name"] == "lab")
    assert lab["lifetime_days"] == 30 and lab["approval"] is True
    assert lab["supersede_grace_seconds"] == 0
    assert next(g for g in groups if g["name"] == "default")["supersede_grace_seconds"] == 3600
    enroll_server(*config, "group", "set-grace", "lab", "15m")
    groups = json.loads(enroll_server(*config, "group", "list", "--json").stdout)
    assert next(g for g in groups if g["name"] == "lab")["supersede_grace_seconds"] == 900
    table = enroll_server(*config, "group", "list").stdout
    assert table.splitlines()[0].split()[:2] == ["NAME", "AUTH"]
    duplicate = enroll_server(*config, "group", "create", "lab", check=False)
    assert duplicate.returncode != 0 and "group.exists" in duplicate.stderr
    bad = enroll_server(*config, "group", "create", "Bad/Name", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    token = json.loads(enroll_server(*config, "token", "create", "--group", "lab",
                                     "--ttl", "2h", "--json").stdout)
    assert token["token"].startswith("et_") and token["group"] == "lab"
    assert token["token"] not in (directory / "enroll.db").read_bytes().decode("latin-1")
    missing = enroll_server(*config, "token", "create", "--group", "nope", check=False)
    assert missing.returncode != 0 and "group.not_found" in missing.stderr
    audit = json.loads(enroll_server(*config, "audit", "--json").stdout)
    assert {"group.create", "token.create", "instance.init"} <= {e["action"] for e in audit}
    assert enroll_server(*config, "devices", "list").stdout.strip() == "(none)"


def test_every_command_explains_itself_with_examples():
    for args in (["--help"], ["init", "--help"], ["serve", "--help"],
                 ["group", "--help"], ["token", "--help"], ["devices", "--help"]):
        result = enroll_server(*args)
        assert "Examples" in result.stdout or "Example" in result.stdout, args


def test_commands_without_an_instance_say_what_to_do():
    import subprocess

    result = subprocess.run([str(BIN / "enroll-server"), "devices", "list"],
                            capture_output=True, text=True, env={"PATH": "/usr/bin"})
    assert result.returncode != 0
    assert "--config" in result.stderr and "Traceback" not in result.stderr
