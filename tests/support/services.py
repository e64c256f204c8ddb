"""Private throw-away PostgreSQL servers for tests (Mosquitto: simulators.broker, which
the pytest plugin tpm_enroll_testing ships; re-exported here).

Each class is a context manager: it starts its own server in a fresh temp dir on
a free loopback port and on exit stops every process and removes every file it
made, also when the body raised.  A missing binary raises ``ServiceError``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit, urlunsplit

from simulators.broker import (  # noqa: F401 - re-exported for the tests
    PrivateMosquitto,
    ServiceError,
    port_open,
)
from simulators.broker import tail as _tail
from simulators.served import free_port

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
MOSQUITTO_BIN = "/usr/sbin/mosquitto"
POSTGRES_URL_ENV = "ENROLL_TEST_POSTGRES_URL"
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class _Service:
    """Context-manager plumbing: ``close()`` runs even when ``_open()`` fails half-way."""

    def _open(self) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self:
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def find_pg_bindir(pattern: str = PG_BIN_GLOB) -> Path:
    """Newest PostgreSQL bin dir that has initdb and pg_ctl."""
    dirs = [Path(d) for d in glob.glob(pattern) if os.access(f"{d}/pg_ctl", os.X_OK)]
    if not dirs:
        msg = f"PostgreSQL (initdb, pg_ctl) not found under {pattern}: apt-get install postgresql"
        raise ServiceError(msg)
    return max(dirs, key=lambda d: [int(x) for x in re.findall(r"\d+", d.parent.name)])


class PrivatePostgres(_Service):
    """A private PostgreSQL cluster, or the server named by $ENROLL_TEST_POSTGRES_URL.

    ``url`` is ``postgresql://USER@127.0.0.1:PORT/DBNAME``; ``create_database()``
    returns the URL of a new, empty database.  Start timings are in
    ``initdb_seconds`` / ``start_seconds`` (``0.0`` when using an external URL).
    """

    def __init__(
        self, user: str = "enroll", dbname: str = "enroll_test", bin_glob: str = PG_BIN_GLOB
    ) -> None:
        self.user, self.dbname, self.bin_glob = user, dbname, bin_glob
        self.external = bool(os.environ.get(POSTGRES_URL_ENV))
        self.url, self.port = "", 0
        self.base_dir: Path | None = None
        self.initdb_seconds = self.start_seconds = 0.0
        self._created: list[str] = []
        self._pid: int | None = None
        self._run_as: dict[str, object] = {}

    @property
    def data_dir(self) -> Path | None:
        return self.base_dir / "data" if self.base_dir else None

    def _pg(self, tool: str, *args: str, timeout: float = 60) -> None:
        assert self.base_dir is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        cmd = [str(self._bindir / tool), *args]
        res = subprocess.run(
            cmd, cwd=self.base_dir, env=env, capture_output=True, text=True, timeout=timeout,
            **self._run_as,  # type: ignore[arg-type]
        )  # fmt: skip
        if res.returncode != 0:
            raise ServiceError(
                f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}{res.stderr}"
                f"\n--- server log tail ---\n{_tail(self.base_dir / 'postgres.log')}"
            )

    def _open(self) -> None:
        if self.external:
            self.url = os.environ[POSTGRES_URL_ENV]
            self.port = urlsplit(self.url).port or 5432
            return
        self._bindir = find_pg_bindir(self.bin_glob)
        t0 = time.monotonic()
        if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                msg = "running as root but no 'postgres' user to run as: apt-get install postgresql"
                raise ServiceError(msg) from None
            self._run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            self.base_dir = Path(tempfile.mkdtemp(prefix="enroll-pg-", dir="/tmp"))
            os.chown(self.base_dir, pw.pw_uid, pw.pw_gid)
        else:
            self.base_dir = Path(tempfile.mkdtemp(prefix="enroll-pg-"))
        os.chmod(self.base_dir, 0o700)
        data, sock = self.base_dir / "data", self.base_dir / "sock"
        opts = ["-U", self.user, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"]
        self._pg("initdb", "-D", str(data), *opts, "--no-instructions")
        self.initdb_seconds = time.monotonic() - t0
        sock.mkdir()
        shutil.copymode(data, sock)
        os.chown(sock, data.stat().st_uid, data.stat().st_gid)
        self.port = free_port()
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# --- enroll private test cluster ---\n"
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{sock}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 100\n"
            )
        with open(data / "pg_hba.conf", "w") as hba:
            hba.write("local all all trust\nhost all all 127.0.0.1/32 trust\n")
            hba.write("host all all ::1/128 trust\n")
        t1 = time.monotonic()
        log = str(self.base_dir / "postgres.log")
        self._pg("pg_ctl", "start", "-D", str(data), "-l", log, "-w", "-t", "30")
        self._pid = int((data / "postmaster.pid").read_text().split()[0])
        self.url = self._url_for(self.dbname, f"postgresql://{self.user}@127.0.0.1:{self.port}/")
        self._execute(f'CREATE DATABASE "{self.dbname}"', admin_db="postgres")
        self.start_seconds = time.monotonic() - t1

    def _url_for(self, dbname: str, base: str | None = None) -> str:
        return urlunsplit(urlsplit(base or self.url)._replace(path=f"/{dbname}"))

    def _execute(self, sql: str, admin_db: str | None = None) -> None:
        import psycopg2  # imported lazily: only needed once a server exists

        url = self._url_for(admin_db) if admin_db else self.url
        conn = psycopg2.connect(url, connect_timeout=10)
        try:
            conn.autocommit = True
            conn.cursor().execute(sql)
        finally:
            conn.close()

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (unique name by default) and return its URL."""
        name = name or f"enroll_t_{uuid.uuid4().hex[:16]}"
        if not _DB_NAME.match(name):
            raise ValueError(f"invalid database name {name!r}")
        self._execute(f'CREATE DATABASE "{name}"')
        self._created.append(name)
        return self._url_for(name)

    def drop_database(self, name_or_url: str) -> None:
        name = urlsplit(name_or_url).path.lstrip("/") if "://" in name_or_url else name_or_url
        if not _DB_NAME.match(name):
            raise ValueError(f"invalid database name {name!r}")
        self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self._created:
            self._created.remove(name)

    def close(self) -> None:
        """Drop what we created on an external server; stop and delete a private cluster."""
        if self.external:
            while self._created:
                self.drop_database(self._created[-1])
            return
        if self.base_dir is None:
            return
        data, stopped = self.base_dir / "data", False
        try:
            if (data / "postmaster.pid").exists():
                self._pg("pg_ctl", "stop", "-D", str(data), "-m", "immediate", "-w", "-t", "30")
            stopped = True
        finally:
            if not stopped and self._pid is not None:
                with contextlib.suppress(ProcessLookupError):  # pg_ctl failed: kill anyway
                    os.kill(self._pid, signal.SIGKILL)
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir, self._pid = None, None
