"""python -m sensor_app first-boot|serve --server URL --server-ca PEM --group G --tcti T
--state-dir D [--broker HOST:PORT]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .device import SensorConfig, first_boot, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sensor_app")
    parser.add_argument("command", choices=("first-boot", "serve"))
    parser.add_argument("--server", required=True)
    parser.add_argument("--server-ca", required=True, type=Path)
    parser.add_argument("--group", required=True)
    parser.add_argument("--tcti", required=True)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--broker", help="HOST:PORT of the MQTT broker (serve)")
    args = parser.parse_args(argv)
    config = SensorConfig(args.server, args.server_ca, args.group, args.tcti, args.state_dir)
    if args.command == "first-boot":
        print(f"enrolled as {first_boot(config)}", flush=True)
        return 0
    if not args.broker:
        parser.error("serve needs --broker HOST:PORT")
    host, _, port = args.broker.rpartition(":")
    return serve(config, (host, int(port)))


if __name__ == "__main__":
    sys.exit(main())
