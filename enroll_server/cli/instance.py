"""`enroll-server init` and `enroll-server serve`: create an instance, serve it."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(epilog="""\b
Examples:
  enroll-server init --dir ./instance
  enroll-server init --dir ./instance --ca-key file --hostname est.example.net
""")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False,
              path_type=Path), help="New instance directory (must not exist or be empty).")
@click.option("--ca-key", type=click.Choice(["pkcs11", "file"]), default="pkcs11",
              show_default=True, help="Where the issuing CA key lives.")
@click.option("--hostname", "hostnames", multiple=True,
              help="Names for the TLS certificate (repeatable; default localhost, 127.0.0.1).")
@click.option("--port", default=8443, show_default=True, help="EST listener port.")
@click.option("--pkcs11-module", type=click.Path(exists=True, path_type=Path),
              help="PKCS#11 module of an existing token (default: new SoftHSM token).")
@click.option("--token-label", default="enroll-ca", show_default=True)
@click.option("--pin-file", type=click.Path(exists=True, path_type=Path),
              help="File holding the user PIN of the existing token.")
def init(directory: Path, ca_key: str, hostnames: tuple[str, ...], port: int,
         pkcs11_module: Path | None, token_label: str, pin_file: Path | None) -> None:
    """Create a complete instance: CA hierarchy, HSM key, TLS cert, database."""
    from ..instance import InitOptions, InstanceExists, init_instance

    options = InitOptions(directory=directory, ca_key=ca_key,
                          hostnames=hostnames or ("localhost", "127.0.0.1"), port=port,
                          pkcs11_module=pkcs11_module, token_label=token_label,
                          pin_file=pin_file)
    try:
        result = init_instance(options)
    except InstanceExists as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Instance created in {result['directory']}")
    click.echo(f"  config:        {result['config']}")
    click.echo(f"  trust anchor:  {result['trust_anchor']}  (give this to devices)")
    click.echo(f"  operator credential (shown once; only its hash is kept): "
               f"{result['operator_credential']}")
    click.echo("    for the operator API (Authorization: Bearer ...); store it now, or get "
               "a new one with `enroll-server operator rotate`")
    click.echo("Next: enroll-server serve --config " + result["config"])


@click.command(epilog="""\b
Examples:
  enroll-server serve --config ./instance/config.toml
  ENROLL_SERVER__WORKERS=4 enroll-server serve --config ./instance/config.toml --port 9443
""")
@click.option("--config", "config_path", envvar="ENROLL_CONFIG", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--port", type=int, help="Override server.port.")
@click.option("--workers", type=int, help="Override server.workers.")
@click.option("--with-relay", is_flag=True,
              help="Also run the notice relay (`enroll-server relay`) beside the server.")
def serve(config_path: Path, port: int | None, workers: int | None, with_relay: bool) -> None:
    """Serve EST over TLS with a multi-process production server (gunicorn)."""
    from ..server import serve as run_server

    run_server(config_path, port=port, workers=workers, with_relay=with_relay)
