"""The fleet simulator: against its own instance with chaos, against a separately served
instance through its public and operator APIs (JUnit XML read by a JUnit parser), the
load mode with its plot, and the pieces they stand on (the network drop, the schedule,
the JUnit shape). No timed assertions: waits are for events, bounded generously.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from junitparser import Error, Failure, JUnitXml, Skipped

from simulators.fleet import FleetOptions, render, run_fleet
from simulators.fleet_junit import junit_tree
from simulators.fleet_load import schedule
from simulators.netfault import DroppingProxy
from simulators.served import ServedInstance

SIM = Path(sys.executable).parent / "enroll-sim"

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker


def _processes_under(directory: str) -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-f", directory], capture_output=True, text=True)
    return out.stdout.splitlines()


def enroll_sim(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SIM), *args], capture_output=True, text=True, timeout=timeout)


def cases(path: Path) -> dict[tuple[str, str], object]:
    """(suite, case name) -> junitparser TestCase, from the XML file a CI system reads."""
    xml = JUnitXml.fromfile(str(path))
    return {(suite.name, case.name): case for suite in xml for case in suite}


def test_a_fleet_survives_broker_server_and_relay_chaos() -> None:
    report = run_fleet(FleetOptions(devices=20, concurrency=4, revoke_fraction=0.2,
                                    chaos=("broker", "server", "relay"), chaos_interval=1.0,
                                    rogue=1, tampered=1, flaky=1, seed=7))
    invariants = report["invariants"]
    assert report["passed"], render(report)
    assert report["failed_cases"] == 0
    assert report["succeeded"] == 21  # 20 good + the flaky one
    assert report["failures"] == {"rogue: ek.untrusted": 1, "tampered: quote.pcr_mismatch": 1}
    assert report["network_drops"] == 1  # the flaky device really lost one connection
    assert all(report["chaos_events"][kind] >= 1 for kind in ("broker", "server", "relay"))
    assert invariants["revoked"] == invariants["revoked_notified"] == 4
    assert invariants["revoked_reenroll_refused"] == 4  # device.revoked, under chaos
    assert invariants["devices_with_two_active_certs"] == 0
    assert invariants["keys_with_two_active_certs"] == 0
    assert invariants["outbox_unsent"] == 0
    assert invariants["forged_notices"] >= 1 and invariants["forged_accepted"] == 0
    assert report["gateway_rejected"] >= invariants["forged_notices"]
    assert _processes_under(report["workdir"]) == []  # swtpm, mosquitto, relay: all gone


# -- against a deployment the fleet did not start --------------------------------------------

@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A persistent simulated manufacturer, made by its CLI as a user makes it."""
    directory = tmp_path_factory.mktemp("ci") / "tpm-vendor"
    result = enroll_sim("manufacturer", "init", "--dir", str(directory))
    assert result.returncode == 0, result.stderr
    assert "--ek-roots" in result.stdout and (directory / "root.pem").exists()
    again = enroll_sim("manufacturer", "init", "--dir", str(directory))
    assert again.returncode != 0 and "already holds a manufacturer" in again.stderr
    return directory


@pytest.fixture(scope="module")
def ci_files(instance: ServedInstance, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a CI job holds: the server's trust anchor and the operator credential, copied
    out of the instance (the fleet never learns where the instance lives)."""
    directory = tmp_path_factory.mktemp("ci-secrets")
    shutil.copy(instance.trust_anchor, directory / "ca-chain.pem")
    (directory / "operator.token").write_text(instance.operator_token)
    return directory


def test_a_fleet_against_a_separately_served_instance_passes_and_writes_junit(
        instance: ServedInstance, rig, vendor: Path, ci_files: Path, tmp_path: Path) -> None:
    instance.cli("group", "create", "staging", "--auth", "tpm", "--ek-roots",
                 str(vendor / "root.pem"))
    junit = tmp_path / "reports" / "fleet.xml"
    result = enroll_sim(
        "fleet", "--server", instance.url, "--server-ca", str(ci_files / "ca-chain.pem"),
        "--group", "staging", "--manufacturer", str(vendor), "--devices", "3", "--rogue", "1",
        "--flaky", "1", "--revoke-fraction", "0.25", "--seed", "11", "--concurrency", "2",
        "--operator-token-file", str(ci_files / "operator.token"),
        "--broker", f"mqtts://{rig.address}", "--broker-ca", str(ci_files / "ca-chain.pem"),
        "--junit", str(junit), "--json")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["passed"] and report["server"] == instance.url
    assert report["invariants"]["revoked"] == report["invariants"]["revoked_notified"] == 1
    assert report["invariants"]["revoked_reenroll_refused"] == 1
    assert report["invariants"]["devices_with_two_active_certs"] == 0
    assert {name for name, (held, _) in report["checks"].items() if held} == {
        "ocsp_agrees", "server_agrees", "one_active_certificate_per_device"}

    found = cases(junit)
    suites = {suite for suite, _ in found}
    assert suites == {"fleet.provision", "fleet.first_boot", "fleet.renewal",
                      "fleet.revocation", "fleet.readmission", "fleet.invariants"}
    assert sum(suite == "fleet.first_boot" for suite, _ in found) == 5  # a case per device
    assert sum(suite == "fleet.renewal" for suite, _ in found) == 4  # the rogue: none due
    assert sum(suite == "fleet.revocation" for suite, _ in found) == 1
    assert all(case.is_passed for case in found.values())
    xml = JUnitXml.fromfile(str(junit))
    assert (xml.tests, xml.failures, xml.errors) == (len(found), 0, 0)
    # The revoked device learnt it from a verified notice, at the device (its agent).
    revoked = next(r for r in report["devices"] if "revocation" in r["phases"])
    assert revoked["phases"]["revocation"]["message"] == "notice verified at the device"
    assert instance.cli_json("devices", "show", revoked["device_id"])["status"] == "revoked"
    rogue = next(r for r in report["devices"] if r["role"] == "rogue")
    assert rogue["phases"]["first_boot"] == {"outcome": "passed", "code": "ek.untrusted",
                                             "message": "refused as expected: ek.untrusted"}
    assert report["network_drops"] == 1
    assert _processes_under(report["workdir"]) == []


def test_a_fleet_the_group_does_not_trust_fails_with_codes_and_device_ids_in_junit(
        instance: ServedInstance, vendor: Path, ci_files: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-vendor"
    assert enroll_sim("manufacturer", "init", "--dir", str(other)).returncode == 0
    instance.cli("group", "create", "staging-other", "--auth", "tpm", "--ek-roots",
                 str(other / "root.pem"))
    junit = tmp_path / "fleet.xml"
    result = enroll_sim(
        "fleet", "--server", instance.url, "--server-ca", str(ci_files / "ca-chain.pem"),
        "--group", "staging-other", "--manufacturer", str(vendor), "--devices", "2",
        "--seed", "3", "--concurrency", "2", "--junit", str(junit))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "FAIL" in result.stdout and "ek.untrusted" in result.stdout
    found = cases(junit)
    first_boots = [case for (suite, _), case in found.items() if suite == "fleet.first_boot"]
    assert len(first_boots) == 2
    for case in first_boots:
        (failure,) = case.result
        assert isinstance(failure, Failure) and failure.type == "ek.untrusted"
        device_id = case.system_out.split("device_id=")[1].split()[0]
        assert len(device_id) == 64 and device_id in failure.message
    renewals = [case for (suite, _), case in found.items() if suite == "fleet.renewal"]
    assert renewals and all(isinstance(case.result[0], Skipped) for case in renewals)
    # Nothing was written for the refused devices.
    for case in first_boots:
        device_id = case.system_out.split("device_id=")[1].split()[0]
        shown = instance.cli("devices", "show", device_id, check=False)
        assert shown.returncode != 0


def test_a_fleet_that_cannot_start_exits_2_and_says_why_in_junit(tmp_path: Path,
                                                                vendor: Path) -> None:
    anchor = tmp_path / "ca.pem"
    anchor.write_text((vendor / "root.pem").read_text())
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    junit = tmp_path / "fleet.xml"
    result = enroll_sim("fleet", "--server", f"https://localhost:{port}", "--server-ca",
                        str(anchor), "--group", "g", "--manufacturer", str(vendor),
                        "--junit", str(junit))
    assert result.returncode == 2 and "cannot reach" in result.stderr
    (case,) = cases(junit).values()
    assert isinstance(case.result[0], Error) and "cannot reach" in case.result[0].message
    missing = enroll_sim("fleet", "--server", f"https://localhost:{port}", "--server-ca",
                         str(anchor), "--group", "g")
    assert missing.returncode == 2 and "enroll-sim manufacturer init" in missing.stderr
    chaos = enroll_sim("fleet", "--server", f"https://localhost:{port}", "--server-ca",
                       str(anchor), "--group", "g", "--manufacturer", str(vendor),
                       "--chaos", "server")
    assert chaos.returncode == 2 and "cannot be used with --server" in chaos.stderr


# -- load mode ---------------------------------------------------------------------------------

def test_load_mode_reports_latency_over_time_and_draws_it(tmp_path: Path) -> None:
    plot, junit = tmp_path / "load.png", tmp_path / "load.xml"
    result = enroll_sim("fleet", "--rate", "2", "--duration", "4", "--ramp", "1",
                        "--concurrency", "2", "--plot", str(plot), "--junit", str(junit),
                        "--json", "--keep")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    scheduled = len(schedule(2, 4, 1))
    assert report["enrollments"] == {"scheduled": scheduled, "succeeded": scheduled,
                                     "failed": 0, "errors_by_code": {}}
    assert sum(w["started"] for w in report["windows"]) == scheduled
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(plot)).shape[0] > 300  # a real picture
    load_cases = cases(junit)
    assert sum(suite == "load.enroll" for suite, _ in load_cases) == scheduled
    assert all(case.is_passed for case in load_cases.values())


def test_the_load_schedule_ramps_then_holds_the_rate() -> None:
    flat = schedule(4, 10)
    assert len(flat) == 40 and flat[:3] == [0.0, 0.25, 0.5] and flat[-1] < 10
    ramped = schedule(4, 10, ramp=4)
    assert len(ramped) == 32  # 4/s * 4 s / 2 during the ramp, then 4/s for 6 s
    gaps = [b - a for a, b in zip(ramped, ramped[1:], strict=False)]
    assert gaps[0] > gaps[5] > gaps[-1] - 1e-9  # sparse first, then every 0.25 s
    assert ramped == sorted(ramped) and all(0 <= t < 10 for t in ramped)


# -- the pieces ----------------------------------------------------------------------------------

def test_junit_failures_carry_the_code_and_the_device_id() -> None:
    report = {"server": "https://est", "group": "g", "seed": 1, "checks": {
        "ocsp_agrees": [False, "OCSP says good for a revoked device"]},
        "devices": [{"name": "device-0000", "role": "good", "device_id": "ab" * 32,
                     "phases": {"provision": {"outcome": "passed", "ms": 12.0},
                                "first_boot": {"outcome": "failed", "code": "quote.pcr_mismatch",
                                               "message": "first boot: refused"},
                                "renewal": {"outcome": "skipped", "message": "not enrolled"}}},
                    {"name": "device-0001", "role": "good", "device_id": None,
                     "phases": {"provision": {"outcome": "error", "code": "SwtpmError",
                                              "message": "swtpm did not start"}}}]}
    root = junit_tree(report).getroot()
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("errors"),
            root.get("skipped")) == ("5", "2", "1", "1")
    for suite in root.iter("testsuite"):
        assert {"name", "tests", "failures", "errors", "skipped", "time"} <= set(suite.attrib)
        for case in suite.iter("testcase"):
            assert {"classname", "name", "time"} <= set(case.attrib)
            float(case.get("time"))
    failure = root.find("testsuite[@name='fleet.first_boot']/testcase/failure")
    assert failure.get("type") == "quote.pcr_mismatch"
    assert "ab" * 32 in failure.get("message")
    error = root.find("testsuite[@name='fleet.provision']/testcase[@name='device-0001']/error")
    assert error is not None and "swtpm did not start" in error.get("message")
    invariant = root.find("testsuite[@name='fleet.invariants']/testcase[@name='ocsp_agrees']")
    assert invariant.find("failure").get("type") == "ocsp_agrees"


def test_the_dropping_proxy_cuts_exactly_one_connection_at_a_fixed_byte() -> None:
    """Whatever the timing: a connection that forwards nothing (the server was down) does
    not use up the cut; the one crossing byte N is cut there; later ones pass."""
    received: list[bytes] = []
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                chunks = []
                while data := connection.recv(65536):
                    chunks.append(data)
                received.append(b"".join(chunks))

    threading.Thread(target=serve, daemon=True).start()
    proxy = DroppingProxy("127.0.0.1", server.getsockname()[1], cut_after=1000)
    try:
        for size in (0, 600, 600, 600):
            with socket.create_connection(("127.0.0.1", proxy.port)) as client:
                if size:
                    try:
                        client.sendall(b"x" * size)
                    except OSError:
                        pass
                client.shutdown(socket.SHUT_WR)
                client.recv(1)
        for _ in range(600):  # the server thread records each connection as it closes
            if len(received) >= 4:
                break
            threading.Event().wait(0.05)
    finally:
        proxy.close()
        server.close()
    assert proxy.dropped == 1
    assert sorted(len(r) for r in received) == [0, 400, 600, 600]


def test_fleet_help_names_the_ci_options() -> None:
    result = enroll_sim("fleet", "--help")
    for option in ("--server", "--server-ca", "--group", "--manufacturer", "--junit",
                   "--operator-token-file", "--broker", "--rate", "--duration", "--plot",
                   "--seed"):
        assert option in result.stdout
    assert "Exit status" in result.stdout and os.path.basename(str(SIM)) == "enroll-sim"
