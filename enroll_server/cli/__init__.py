"""`enroll-server`: create, serve and operate an enrollment service instance.

    root.py         the root group (--config) and the context every command gets
    common.py       output, errors, operator name, option parsing
    instance.py     init, serve
    groups.py       group create | list | set-grace       (+ tpm.py: allow-ek, set-pcrs,
    tokens.py       token create                             set-ek-crls; + vendors.py:
                                                             set-ek-vendors)
    vendors.py      ek-vendors list (the built-in TPM vendor trust store)
    devices.py      devices ..., certs list, audit       (+ tpm.py: evidence, unpin-ak)
    revocation.py   revoke, readmit, crl publish | show
    ca.py           ca list | rotate
    broker.py       broker-config, relay
    operator.py     operator rotate, delegated-keys migrate

Commands are added to their groups here, explicitly: no module registers itself by
being imported.
"""

from __future__ import annotations

import sys

import click

from ..config import ConfigError
from . import broker, ca, devices, groups, instance, operator, revocation, tokens, tpm, vendors
from .root import main

for command in (instance.init, instance.serve, groups.group, tokens.token, devices.certs,
                devices.devices, devices.audit, revocation.revoke, revocation.readmit,
                revocation.crl, ca.ca, broker.broker_config, broker.relay,
                vendors.ek_vendors_group, operator.operator_group, operator.delegated_keys):
    main.add_command(command)
for command in (tpm.group_allow_ek, tpm.group_set_pcrs, tpm.group_set_ek_crls,
                vendors.group_set_ek_vendors):
    groups.group.add_command(command)
for command in (tpm.devices_evidence, tpm.devices_unpin_ak):
    devices.devices.add_command(command)

__all__ = ["main", "run"]


def run() -> None:
    try:
        main(standalone_mode=True)
    except ConfigError as exc:
        click.echo(f"error: bad configuration: {exc}", err=True)
        sys.exit(2)
