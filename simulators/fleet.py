"""`enroll-sim fleet`: N swtpm devices through their lifecycle, concurrently.

Two targets:
- **a private instance** (default; simulators.fleet_local): the fleet starts a served
  instance (SoftHSM CA key, SQLite), a simulated manufacturer, a TPM group with a PCR
  policy, `broker-config` + Mosquitto + `enroll-server relay` and a gateway on the fleet
  revocation topic, optionally with chaos (broker, server and relay restarts), and checks
  the database invariants at the end;
- **an existing deployment** (``--server URL --server-ca PEM --group G``): only its
  public and operator APIs are used, never its files or database. The devices' EK
  certificates come from a persistent simulated manufacturer (``--manufacturer M``, made
  once by `enroll-sim manufacturer init`) whose root the operator added to the group.
  With an operator credential a share of the fleet is revoked through the operator API;
  with a broker, each revoked device runs `enroll-device agent` and must receive and
  verify its notice (simulators.fleet_notices). OCSP and the operator API's device view
  must agree.

Each device, in one of C worker processes (simulators.fleet_devices): swtpm start ->
factory provisioning -> firmware measured -> first-boot attested enrollment -> attested
renewal. Scenario devices: ``rogue`` (EK from an unknown manufacturer: ek.untrusted),
``tampered`` (firmware off the PCR policy: quote.pcr_mismatch), ``flaky`` (the network
drops one connection mid-enrollment: it must still enroll).

The report: JSON, a human table, and JUnit XML (simulators.fleet_junit); ``passed`` is
true when every device phase and every fleet check passed. ``--rate`` switches to the
load mode (simulators.fleet_load). ``--seed`` fixes roles, the revoked share, chaos order.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from .bench_report import Progress, no_progress
from .fleet_load import run_load
from .fleet_local import run_local
from .fleet_options import FleetOptions, FleetSetupError, validate
from .fleet_remote import run_remote
from .fleet_report import render
from .fleet_rig import (
    BAD_FIRMWARE,
    CHAOS_KINDS,
    FIRMWARE_PCR,
    GOOD_FIRMWARE,
    GROUP,
    Rig,
)

__all__ = ["BAD_FIRMWARE", "CHAOS_KINDS", "FIRMWARE_PCR", "GOOD_FIRMWARE", "GROUP",
           "FleetOptions", "FleetSetupError", "Rig", "render", "run_fleet"]


def run_fleet(options: FleetOptions, progress: Progress = no_progress) -> dict[str, Any]:
    validate(options)
    if options.rate is not None:
        return run_load(options, progress)
    workdir = Path(tempfile.mkdtemp(prefix="enroll-fleet-"))
    try:
        if options.deployment is None:
            report = run_local(options, workdir, progress)
        else:
            report = run_remote(options, options.deployment, workdir, progress)
        report["workdir"] = str(workdir)
        return report
    finally:
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)


