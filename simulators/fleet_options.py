"""The options of a fleet run (`enroll-sim fleet`) and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .deployment import Deployment
from .fleet_rig import CHAOS_KINDS


class FleetSetupError(RuntimeError):
    """The run could not start (bad options, no manufacturer, server unreachable)."""


@dataclass(frozen=True)
class FleetOptions:
    devices: int = 20
    concurrency: int = 4
    revoke_fraction: float = 0.1
    chaos: tuple[str, ...] = ()
    chaos_interval: float = 4.0
    seed: int | None = None
    # Scenario devices, beside the N good ones: an EK from an unknown manufacturer, a
    # firmware image off the group's PCR policy, a network drop mid-enrollment.
    rogue: int = 0
    tampered: int = 0
    flaky: int = 0
    keep: bool = False  # keep the work directory (logs, TPM states) for inspection
    # An existing deployment (None: start a private one) and what its devices need.
    deployment: Deployment | None = None
    manufacturer: Path | None = None  # a saved simulated manufacturer (its root trusted)
    firmware: bytes | None = field(default=None, repr=False)  # measured at first boot
    # Load mode: enrollments started at `rate` per second for `duration` seconds.
    rate: float | None = None
    duration: float = 30.0
    ramp: float = 0.0


def validate(options: FleetOptions) -> None:
    """FleetSetupError naming the option, before anything starts."""
    if unknown := set(options.chaos) - set(CHAOS_KINDS):
        raise FleetSetupError(f"unknown chaos kind(s): {', '.join(sorted(unknown))}")
    remote = options.deployment is not None
    if remote and options.chaos:
        raise FleetSetupError("--chaos restarts the fleet's own server, broker and relay; "
                              "it cannot be used with --server")
    if remote and options.manufacturer is None:
        raise FleetSetupError(
            "--server needs --manufacturer DIR: create one with `enroll-sim manufacturer "
            "init --dir DIR`, then have the operator trust DIR/root.pem in the group "
            "(enroll-server group create G --auth tpm --ek-roots DIR/root.pem)")
    if remote and options.tampered and options.firmware is None:
        raise FleetSetupError("--tampered needs --firmware IMAGE against a --server: the "
                              "group's PCR policy must expect that image's measurement")
    if options.manufacturer is not None and not (options.manufacturer / "ek-ca.key.pem"
                                                 ).exists():
        raise FleetSetupError(f"{options.manufacturer} holds no simulated manufacturer: "
                              "run `enroll-sim manufacturer init --dir` first")
    if options.rate is not None and (options.rate <= 0 or options.duration <= 0):
        raise FleetSetupError("--rate and --duration must be positive")
