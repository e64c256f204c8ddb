"""pytest plugin of our own suite: private PostgreSQL / Mosquitto fixtures, and the names
our tests use for the shipped plugin's fixtures (tpm_enroll_testing).

Load with ``-p tests.support.fixtures`` or ``pytest_plugins = ["tests.support.fixtures"]``.
A missing server binary makes the fixture raise, so dependent tests error out
(they are never skipped).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from simulators.served import ServedInstance
from tests.support.inprocess import InProcessInstance
from tests.support.services import PrivateMosquitto, PrivatePostgres

_timings: list[str] = []


@pytest.fixture(scope="session")
def postgres() -> Iterator[PrivatePostgres]:
    """One private PostgreSQL cluster (or $ENROLL_TEST_POSTGRES_URL) per session."""
    with PrivatePostgres() as pg:
        if pg.external:
            _timings.append(f"postgres: external server {pg.port} (no start)")
        else:
            _timings.append(
                f"postgres: initdb {pg.initdb_seconds:.2f}s + start {pg.start_seconds:.2f}s"
            )
        yield pg


@pytest.fixture
def pg_url(postgres: PrivatePostgres) -> Iterator[str]:
    """URL of a fresh, empty database for this test; dropped afterwards."""
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture
def mosquitto() -> Iterator[PrivateMosquitto]:
    """A private Mosquitto broker for this test."""
    with PrivateMosquitto() as broker:
        _timings.append(f"mosquitto: start {broker.start_seconds:.3f}s")
        yield broker


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _timings:
        terminalreporter.section("private service start times")
        for line in _timings[:20]:
            terminalreporter.write_line(line)
        if len(_timings) > 20:
            terminalreporter.write_line(f"... and {len(_timings) - 20} more")


@pytest.fixture(scope="session")
def est_instance(enroll_server: ServedInstance) -> ServedInstance:
    """The plugin's served instance (PKCS#11 CA key in SoftHSM, SQLite), shared by the
    session: our suite runs on the fixture other projects get.

    Tests sharing it use their own device ids and tokens; tests that change the
    instance's configuration or break its HSM start their own ServedInstance.
    """
    return enroll_server


@pytest.fixture
def app(tmp_path) -> Iterator[InProcessInstance]:
    """A fresh instance served in process (file CA key, SQLite in tmp_path), driven
    through Flask's test client: app.http_client(), app.token(), app.services,
    app.clock (advance it to move the services' time)."""
    instance = InProcessInstance(tmp_path / "instance")
    try:
        yield instance
    finally:
        instance.close()


def db_count(instance: ServedInstance, table: str, where: str = "1=1") -> int:
    """Rows in an instance's SQLite table (read-only): for "nothing written" checks."""
    uri = f"file:{instance.dir / 'enroll.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=10) as connection:
        return connection.execute(f"SELECT COUNT(*) FROM {table} WHERE {where}").fetchone()[0]
