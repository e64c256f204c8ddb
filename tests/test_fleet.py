"""The fleet simulator with chaos, at a small N: every invariant of a fleet run holds.

Broker restarts, server restarts and relay kills (SIGKILL) happen while devices enroll
and while revocation notices go out; scenario devices (an unknown TPM manufacturer,
firmware off the PCR policy, a network drop mid-enrollment) end in their expected state.
"""

from __future__ import annotations

import subprocess

import pytest

from simulators.fleet import FleetOptions, render, run_fleet

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker


def _processes_under(directory: str) -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-f", directory], capture_output=True, text=True)
    return out.stdout.splitlines()


def test_a_fleet_survives_broker_server_and_relay_chaos() -> None:
    report = run_fleet(FleetOptions(devices=20, concurrency=4, revoke_fraction=0.2,
                                    chaos=("broker", "server", "relay"), chaos_interval=1.0,
                                    rogue=1, tampered=1, flaky=1, seed=7))
    invariants = report["invariants"]
    assert report["passed"], render(report)
    assert report["succeeded"] == 21  # 20 good + the flaky one
    assert report["failures"] == {"rogue: ek.untrusted": 1, "tampered: quote.pcr_mismatch": 1}
    assert report["network_drops"] >= 1  # the flaky device really lost a connection
    assert all(report["chaos_events"][kind] >= 1 for kind in ("broker", "server", "relay"))
    assert invariants["revoked"] == invariants["revoked_notified"] == 4
    assert invariants["revoked_reenroll_refused"] == 4  # device.revoked, under chaos
    assert invariants["devices_with_two_active_certs"] == 0
    assert invariants["keys_with_two_active_certs"] == 0
    assert invariants["outbox_unsent"] == 0
    assert invariants["forged_notices"] >= 1 and invariants["forged_accepted"] == 0
    assert report["gateway_rejected"] >= invariants["forged_notices"]
    assert _processes_under(report["workdir"]) == []  # swtpm, mosquitto, relay: all gone
