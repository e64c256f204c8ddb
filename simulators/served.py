"""A real service instance: `enroll-server init` + `enroll-server serve` as subprocesses
(gunicorn over TLS on a free loopback port), driven as an operator would. Used by the
demo, the benchmarks and the test suite."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .processes import stop_group


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BIN = Path(sys.executable).parent


def unthrottled(**settings: str) -> dict[str, str]:
    """Environment for a benchmark or simulator instance: the per-address rate limit
    lifted (every client is 127.0.0.1), plus any ENROLL_SERVER__* overrides given."""
    env = {"ENROLL_SERVER__RATE_LIMIT_PER_SECOND": "1000000",
           "ENROLL_SERVER__RATE_LIMIT_BURST": "1000000"}
    env.update({f"ENROLL_SERVER__{name.upper()}": value for name, value in settings.items()})
    return env


class ServerProcessError(RuntimeError):
    """The server could not be initialised or started; the message holds its log."""


def enroll_server(*args: str, env: dict[str, str] | None = None,
                  check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(BIN / "enroll-server"), *args], capture_output=True,
                            text=True, env={**os.environ, **(env or {})}, timeout=120)
    if check and result.returncode != 0:
        raise ServerProcessError(f"enroll-server {' '.join(args)} failed "
                             f"({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


class ServedInstance:
    """An initialised instance, served while inside `with`."""

    def __init__(self, ca_key: str = "pkcs11", env: dict[str, str] | None = None,
                 directory: Path | None = None) -> None:
        self._tmp = None if directory else tempfile.mkdtemp(prefix="enroll-inst-")
        self.dir = directory or Path(self._tmp) / "instance"
        self.port = free_port()
        self.env = {"ENROLL_SERVER__PORT": str(self.port),
                    "ENROLL_SERVER__PUBLIC_URL": f"https://localhost:{self.port}",
                    "ENROLL_SERVER__WORKERS": "2", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = (Path(self._tmp) if self._tmp else self.dir.parent) / "server.log"
        # `init` shows the operator API credential once (only its hash is kept); None for
        # an instance initialised before (`enroll-server operator rotate` makes a new one).
        self.operator_credential: str | None = None
        if not (self.dir / "config.toml").exists():
            output = enroll_server("init", "--dir", str(self.dir), "--ca-key", ca_key,
                                   "--port", str(self.port)).stdout
            found = re.search(r"\bop_[A-Za-z0-9_-]{20,}", output)
            self.operator_credential = found.group(0) if found else None

    @property
    def config(self) -> Path:
        return self.dir / "config.toml"

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def trust_anchor(self) -> Path:
        return self.dir / "ca" / "ca-chain.pem"

    @property
    def operator_token(self) -> str:
        """The operator credential `enroll-server init` showed (a Bearer token)."""
        if self.operator_credential is None:
            raise ServerProcessError("no operator credential known for this instance: "
                                     "run `enroll-server operator rotate`")
        return self.operator_credential

    def cli(self, *args: str, check: bool = True,
            env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return enroll_server("--config", str(self.config), *args,
                             env={**self.env, **(env_extra or {})}, check=check)

    def cli_json(self, *args: str):
        return json.loads(self.cli(*args, "--json").stdout)

    def token(self, group: str = "default", *extra: str) -> str:
        return self.cli_json("token", "create", "--group", group, *extra)["token"]

    def start(self, timeout: float = 120.0) -> None:
        """Serve; returns once /healthz answers (``timeout``: a bound for a busy machine)."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(
            [str(BIN / "enroll-server"), "serve", "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
            start_new_session=True)
        log.close()
        context = ssl.create_default_context(cafile=str(self.trust_anchor))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerProcessError("server exited:\n" + self.log_text())
            try:
                if httpx.get(self.url + "/healthz", verify=context, timeout=2).status_code \
                        == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise ServerProcessError("server did not become healthy:\n" + self.log_text())

    def stop(self) -> None:
        stop_group(self.process, 15)
        self.process = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> ServedInstance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cleanup(self) -> None:
        self.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
