"""The `serve --with-relay` child: a relay that dies with the server that started it
(server._start_relay). Its own module so that the server never imports the CLI."""

from __future__ import annotations

import os
import sys

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def main() -> None:
    """The relay child's entry point: it dies with the server, then runs `enroll-server
    relay`. PR_SET_PDEATHSIG (prctl(2)) has the kernel send it SIGTERM (a graceful stop)
    when the server process dies, even by SIGKILL; if the server died before that call,
    the parent is no longer the server and the relay stops at once."""
    import ctypes
    import signal

    server_pid = int(sys.argv.pop(1))
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != server_pid:
        sys.exit(0)
    from .cli import run

    run()
