"""Tests for the private test services in tests/support/services.py.

Run with ``-p tests.support.fixtures`` (provides postgres / pg_url / mosquitto).
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from pathlib import Path

import psycopg2
import pytest

from tests.support.services import (
    POSTGRES_URL_ENV,
    PrivateMosquitto,
    PrivatePostgres,
    ServiceError,
    free_port,
    port_open,
)

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker


def pgrep(pattern: str) -> list[str]:
    res = subprocess.run(["pgrep", "-a", "-f", pattern], capture_output=True, text=True)
    return res.stdout.splitlines()


def wait_until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    assert not port_open(port)


# --- PostgreSQL -------------------------------------------------------------


def test_pg_url_round_trip(pg_url: str) -> None:
    assert re.fullmatch(r"postgresql://\w+@127\.0\.0\.1:\d+/\w+", pg_url)
    with psycopg2.connect(pg_url) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE device (id serial PRIMARY KEY, serial text NOT NULL)")
        cur.execute("INSERT INTO device (serial) VALUES (%s), (%s)", ("tpm-1", "tpm-2"))
        cur.execute("SELECT serial FROM device ORDER BY id")
        assert [r[0] for r in cur.fetchall()] == ["tpm-1", "tpm-2"]
        cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        assert cur.fetchone() == (True,)
    conn.close()


def test_default_database_is_usable(postgres: PrivatePostgres) -> None:
    conn = psycopg2.connect(postgres.url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_database()")
            assert cur.fetchone()[0] == postgres.url.rsplit("/", 1)[1]
    finally:
        conn.close()


def test_create_database_gives_isolated_databases(postgres: PrivatePostgres) -> None:
    url_a, url_b = postgres.create_database(), postgres.create_database()
    assert url_a != url_b
    try:
        with psycopg2.connect(url_a) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE only_in_a (x int)")
            cur.execute("INSERT INTO only_in_a VALUES (1)")
        conn.close()
        with psycopg2.connect(url_b) as conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass('only_in_a')")
            assert cur.fetchone() == (None,)
        conn.close()
    finally:
        postgres.drop_database(url_a)
        postgres.drop_database(url_b)


def test_private_postgres_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(POSTGRES_URL_ENV, raising=False)
    with PrivatePostgres() as pg:
        data_dir, base_dir = pg.data_dir, pg.base_dir
        assert data_dir is not None and base_dir is not None
        assert pgrep(str(data_dir)), "postmaster should be running on the private data dir"
        assert port_open(pg.port)
        pg.create_database("explicit_name")
    assert not pgrep(str(data_dir))
    assert not base_dir.exists()
    assert not port_open(pg.port)


def test_private_postgres_cleans_up_when_body_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(POSTGRES_URL_ENV, raising=False)
    base_dir: Path | None = None
    with pytest.raises(RuntimeError, match="boom"), PrivatePostgres() as pg:
        base_dir = pg.base_dir
        raise RuntimeError("boom")
    assert base_dir is not None and not base_dir.exists()
    assert not pgrep(str(base_dir))


def test_external_url_is_honoured(postgres: PrivatePostgres, monkeypatch) -> None:
    monkeypatch.setenv(POSTGRES_URL_ENV, postgres.url)
    with PrivatePostgres() as ext:
        assert ext.external and ext.url == postgres.url and ext.base_dir is None
        url = ext.create_database()
        name = url.rsplit("/", 1)[1]
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
        conn.close()
    conn = psycopg2.connect(postgres.url)  # the database made on the external server is dropped
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,))
            assert cur.fetchone() == (0,)
    finally:
        conn.close()


def test_missing_postgres_binaries_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(POSTGRES_URL_ENV, raising=False)
    with pytest.raises(ServiceError, match="apt-get install postgresql"):
        with PrivatePostgres(bin_glob="/nonexistent/*/bin"):
            pass


# --- Mosquitto ----------------------------------------------------------------


def _sub(port: int, topic: str, client_id: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [
        "mosquitto_sub",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-t",
        topic,
        "-C",
        "1",
        "-W",
        "10",
        "-i",
        client_id,
        *extra,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pub(port: int, topic: str, message: str, *extra: str) -> None:
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-m", message, *extra],
        check=True,
        timeout=10,
    )


def test_mosquitto_pub_sub(mosquitto: PrivateMosquitto) -> None:
    client_id = f"sub-{uuid.uuid4().hex[:8]}"
    sub = _sub(mosquitto.port, "enroll/test", client_id)
    try:
        assert wait_until(lambda: f"Received SUBSCRIBE from {client_id}" in mosquitto.log_text())
        _pub(mosquitto.port, "enroll/test", "hello-device")
        out, err = sub.communicate(timeout=10)
    finally:
        sub.kill()
        sub.wait()
    assert sub.returncode == 0, err
    assert out.strip() == "hello-device"


def test_mosquitto_restart_keeps_port_and_persistence(mosquitto: PrivateMosquitto) -> None:
    port, first_pid = mosquitto.port, mosquitto.pid
    _pub(port, "enroll/retained", "kept", "-r", "-q", "1")
    mosquitto.stop()
    assert not pgrep(str(mosquitto.conf_path))
    assert not port_open(port)
    mosquitto.start()
    assert mosquitto.port == port and mosquitto.pid != first_pid
    sub = _sub(port, "enroll/retained", "sub-retained")
    out, err = sub.communicate(timeout=15)
    assert sub.returncode == 0, err
    assert out.strip() == "kept"
    mosquitto.reload()
    assert wait_until(lambda: "Reloading config" in mosquitto.log_text())
    assert port_open(port)


def test_mosquitto_leaves_nothing_behind() -> None:
    with PrivateMosquitto("max_keepalive 120\n") as broker:
        conf, temp_dir = broker.conf_path, broker.dir
        assert pgrep(str(conf))
    assert not pgrep(str(conf))
    assert not temp_dir.exists()
    assert not port_open(broker.port)


def test_mosquitto_full_config_text_with_placeholders() -> None:
    config = "listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest file {dir}/mosquitto.log\n"
    with PrivateMosquitto(config_text=config) as broker:
        _pub(broker.port, "x", "y")
        assert f"{broker.dir}" in broker.conf_path.read_text()
        assert "persistence" not in broker.conf_path.read_text()
        assert "mosquitto version" in broker.log_text()


def test_mosquitto_start_failure_reports_log_tail() -> None:
    with pytest.raises(ServiceError, match="no_such_option"):
        with PrivateMosquitto("no_such_option 1\n"):
            pass


def test_missing_mosquitto_binary_raises() -> None:
    with pytest.raises(ServiceError, match="apt-get install mosquitto"):
        PrivateMosquitto(binary="/nonexistent/mosquitto")
