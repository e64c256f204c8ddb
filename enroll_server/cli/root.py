"""The root of `enroll-server`: the command group, its options and the context every
command receives. Commands live one module per command group (cli/__init__.py adds
them)."""

from __future__ import annotations

import click

from ..config import load_settings

EPILOG = """\b
Examples:
  enroll-server init --dir ./instance
  enroll-server serve --config ./instance/config.toml
  enroll-server --config ./instance/config.toml token create --group default
  enroll-server --config ./instance/config.toml devices list --json
"""


class Context:
    def __init__(self, config: str | None) -> None:
        self.config = config
        self._services = None

    def settings(self):
        if not self.config:
            raise click.UsageError("no instance given: pass --config FILE or set "
                                   "ENROLL_CONFIG (created by `enroll-server init`)")
        return load_settings(self.config)

    def repository(self):
        from ..services import open_store

        if self._services is None:
            self._services = open_store(self.settings())[1]
        return self._services


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", envvar="ENROLL_CONFIG", type=click.Path(dir_okay=False),
              help="Instance config.toml (or ENROLL_CONFIG).")
@click.pass_context
def main(ctx: click.Context, config: str | None) -> None:
    """TPM-attested enrollment server: EST (RFC 7030) over TLS, CA key in PKCS#11."""
    ctx.obj = Context(config)
