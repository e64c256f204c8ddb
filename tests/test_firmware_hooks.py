"""firmware-hooks/, run for real: the shell hooks a device image ships, each device in a
temporary root (its own /etc/enroll-device.conf, /var/lib/enroll-device and
/run/enroll-device, the hooks installed under usr/libexec/enroll-device), with a
provisioned swtpm as its TPM and the session's served instance as the server. No systemd
is needed to run the scripts; the unit files are checked with `systemd-analyze verify`
(and `security --offline`) inside a temporary root, plus a parse for the properties the
boot order depends on. Missing programs fail the tests: nothing here is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_sdk.state import DeviceState
from simulators.manufacturer import Manufacturer
from simulators.served import ServedInstance, free_port
from simulators.swtpm import SwtpmInstance
from tests.support.attest_helpers import roots_file
from tests.support.firmware_device import HOOKS, PCR, PLAIN_GROUP, SCRIPTS, Device
from tests.support.tcp_relay import Forwarder

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker

UNITS = ("enroll-device-measure.service", "enroll-device-first-boot.service",
         "enroll-device-agent.service")
PCR_GROUP = "fw-hooks-pcr"
# first-boot-enroll.sh exit codes (README.md)
OK, CONFIG, REFUSED, TPM, MEASURE, REVOKED, TEMPFAIL = 0, 2, 3, 4, 5, 6, 75
TOOLS = ("sh", "curl", "od", "sha256sum", "flock", "tpm2_pcrextend", "tpm2_pcrread", "swtpm")


def require(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    assert not missing, f"not installed: {missing} (make system-deps)"


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manufacturer(tmp_path_factory: pytest.TempPathFactory) -> Manufacturer:
    return Manufacturer.create(tmp_path_factory.mktemp("fw-vendor"))


@pytest.fixture(scope="module")
def server(est_instance: ServedInstance, manufacturer: Manufacturer,
           tmp_path_factory: pytest.TempPathFactory) -> ServedInstance:
    roots = roots_file(tmp_path_factory.mktemp("fw-roots"), manufacturer.ca_certificate_pems)
    for group in (PLAIN_GROUP, PCR_GROUP):
        est_instance.cli("group", "create", group, "--auth", "tpm", "--ek-roots", str(roots))
    return est_instance


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("firmware")
    good = bytes(range(256)) * 4096  # 1 MiB "firmware"
    tampered = bytearray(good)
    tampered[123_456] ^= 0x01  # one bit
    (directory / "good.bin").write_bytes(good)
    (directory / "tampered.bin").write_bytes(bytes(tampered))
    return {"good": directory / "good.bin", "tampered": directory / "tampered.bin"}


@pytest.fixture
def make_device(tmp_path: Path, manufacturer: Manufacturer,
                server: ServedInstance) -> Iterator:
    """make_device(name) -> a Device with a fresh, factory-provisioned swtpm."""
    require(*TOOLS)
    with contextlib.ExitStack() as stack:
        def make(name: str) -> Device:
            tpm = stack.enter_context(SwtpmInstance(tmp_path / name / "tpm-state"))
            manufacturer.provision(tpm.tcti)
            return Device(tmp_path / name / "root", tpm.tcti, server)
        yield make


@pytest.fixture
def offline_device(tmp_path: Path) -> Device:
    """A device root whose TPM and server are never reached (local decisions only)."""
    require(*TOOLS)
    return Device(tmp_path / "root", "swtpm:host=127.0.0.1,port=1", None)


# -- (a) good firmware: measure, enroll, and again: nothing changes ---------------------


def test_good_firmware_is_measured_once_and_enrolls_once(make_device, images,
                                                         server: ServedInstance) -> None:
    device = make_device("good")
    device.configure(ENROLL_FIRMWARE_IMAGE=str(images["good"]))
    digest = sha256(images["good"].read_bytes())
    assert device.pcr() == bytes(32)

    measured = device.measure()
    assert measured.returncode == OK, measured.stderr
    extended = sha256(bytes(32) + digest)
    assert device.pcr() == extended
    assert f"extended sha256:{PCR} with sha256 {digest.hex()}" in measured.stderr
    marker = device.marker()
    assert marker["state"] == "done" and marker["digest"] == digest.hex()
    assert marker["pcr_after"] == extended.hex()
    assert marker["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()

    again = device.measure()  # the same boot (same runtime dir): not extended twice
    assert again.returncode == OK, again.stderr
    assert "already measured in this boot" in again.stderr
    assert device.pcr() == extended and device.marker() == marker

    enrolled = device.enroll()
    assert enrolled.returncode == OK, enrolled.stderr
    status = device.status()
    assert (status["result"], status["exit_code"], status["attempts"]) == ("enrolled", "0", "1")
    certificate = device.certificate()
    assert certificate is not None
    assert status["serial"] == f"{certificate.serial_number:X}"
    assert device.pcr() == extended  # first-boot-enroll.sh's own measure was a no-op
    certificate_bytes = (device.state / "device.crt.pem").read_bytes()
    status_json = (device.state / "status.json").read_bytes()

    for _ in range(2):  # both hooks again, as after a restart of the units
        assert device.measure().returncode == OK
        rerun = device.enroll()
        assert rerun.returncode == OK, rerun.stderr
        assert device.status()["result"] == "already-enrolled"
        assert device.status()["serial"] == status["serial"]
    assert device.pcr() == extended
    assert (device.state / "device.crt.pem").read_bytes() == certificate_bytes
    assert (device.state / "status.json").read_bytes() == status_json
    shown = server.cli_json("devices", "show", status["device_id"])
    assert len(shown["certificates"]) == 1


def test_an_interrupted_measurement_is_never_repeated_in_the_same_boot(make_device,
                                                                        images) -> None:
    device = make_device("interrupted")
    device.configure(ENROLL_FIRMWARE_IMAGE=str(images["good"]))
    assert device.measure().returncode == OK
    extended = device.pcr()
    marker = device.runtime / "firmware-measured"
    marker.write_text(marker.read_text().replace("state=done", "state=extending"))
    interrupted = device.measure()
    assert interrupted.returncode == MEASURE
    assert "interrupted" in interrupted.stderr and "reboot" in interrupted.stderr
    assert device.pcr() == extended
    # first-boot-enroll.sh fails closed: no enrollment with an unknown measurement
    refused = device.enroll()
    assert refused.returncode == MEASURE, refused.stderr
    assert device.status()["result"] == "measure-failed"
    assert not (device.state / "device.crt.pem").exists()
    # a marker from another boot (a runtime dir that survived a reboot) is measured over
    marker.write_text(re.sub(r"(?m)^boot_id=.*$", "boot_id=an-earlier-boot",
                             marker.read_text()))
    remeasured = device.measure()
    assert remeasured.returncode == OK, remeasured.stderr
    assert "from another boot" in remeasured.stderr
    assert "before this boot's firmware measurement" in remeasured.stderr  # PCR not zero
    assert device.pcr() == sha256(extended + sha256(images["good"].read_bytes()))


def test_a_missing_image_measures_nothing_and_blocks_enrollment(make_device) -> None:
    device = make_device("no-image")
    device.configure(ENROLL_FIRMWARE_IMAGE=str(device.root / "lib/firmware/missing.bin"))
    measured = device.measure()
    assert measured.returncode == MEASURE and "missing or unreadable" in measured.stderr
    assert device.pcr() == bytes(32)
    assert not (device.runtime / "firmware-measured").exists()
    assert device.enroll().returncode == MEASURE
    assert not (device.state / "device.crt.pem").exists()


# -- (b) a PCR policy from a reference device: tampered firmware is refused ---------------


def test_pcr_policy_refuses_tampered_firmware_and_admits_good_firmware(
        make_device, images, server: ServedInstance, tmp_path: Path) -> None:  # fmt: skip
    reference = make_device("reference")
    reference.configure(ENROLL_FIRMWARE_IMAGE=str(images["good"]), ENROLL_GROUP=PCR_GROUP)
    assert reference.measure().returncode == OK
    pcrread = subprocess.run(["tpm2_pcrread", f"sha256:{PCR}"], capture_output=True,
                             text=True, check=True,
                             env={**os.environ, "TPM2TOOLS_TCTI": reference.tcti}).stdout
    (tmp_path / "golden.yaml").write_text(pcrread)
    server.cli("group", "set-pcrs", PCR_GROUP, "--pcrread", str(tmp_path / "golden.yaml"),
               "--pcrs", f"sha256:{PCR}")

    tampered = make_device("tampered")
    tampered.configure(ENROLL_FIRMWARE_IMAGE=str(images["tampered"]), ENROLL_GROUP=PCR_GROUP)
    assert tampered.measure().returncode == OK
    refused = tampered.enroll()
    assert refused.returncode == REFUSED, refused.stderr
    assert "REFUSED by the enrollment server: quote.pcr_mismatch" in refused.stderr
    status = tampered.status()
    assert (status["result"], status["exit_code"], status["error_code"]) == (
        "refused", "3", "quote.pcr_mismatch")
    assert status["http_status"].startswith("4") and status["attempts"] == "1"
    assert not (tampered.state / "device.crt.pem").exists()
    assert tampered.certificate() is None
    assert pcrread.split(":")[-1].strip() not in refused.stderr + status["message"]

    good = make_device("good-device")
    good.configure(ENROLL_FIRMWARE_IMAGE=str(images["good"]), ENROLL_GROUP=PCR_GROUP)
    assert good.measure().returncode == OK
    enrolled = good.enroll()
    assert enrolled.returncode == OK, enrolled.stderr
    assert good.status()["result"] == "enrolled" and good.certificate() is not None
    assert good.pcr() == reference.pcr() != tampered.pcr()


# -- (c) server not reachable at first: transient failures and retries -------------------


def test_unreachable_server_is_a_transient_failure_retried_with_backoff(
        make_device, server: ServedInstance) -> None:  # fmt: skip
    device = make_device("offline-first")
    port = free_port()  # nothing listens here (yet)
    device.configure(ENROLL_SERVER=f"https://localhost:{port}")

    exhausted = device.enroll()
    assert exhausted.returncode == TEMPFAIL, exhausted.stderr
    assert len(re.findall(r"attempt \d: server not reachable", exhausted.stderr)) == 3
    assert len(re.findall(r"attempt \d of 3 failed; next in \d+ ms", exhausted.stderr)) == 2
    assert "enroll-device:" not in exhausted.stderr  # never got as far as enrolling
    status = device.status()
    assert (status["result"], status["exit_code"], status["attempts"]) == ("transient", "75",
                                                                           "3")
    assert "server not reachable" in status["message"]
    assert not (device.state / "device.crt.pem").exists()

    # the network comes up while the hook is backing off: the same run enrolls
    device.configure(ENROLL_RETRY_ATTEMPTS="1000", ENROLL_RETRY_INITIAL_MS="20",
                     ENROLL_RETRY_MAX_MS="100")
    process = subprocess.Popen([str(device.libexec / "first-boot-enroll.sh")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=device.env())
    forwarder = None
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "attempt 1: server not reachable" in line:
                break
        forwarder = Forwarder(port, server.port)
        _, rest = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if forwarder is not None:
            forwarder.close()
    assert process.returncode == OK, rest
    status = device.status()
    assert status["result"] == "enrolled" and int(status["attempts"]) >= 2
    assert device.certificate() is not None


def test_clock_before_the_floor_waits_and_is_transient(offline_device: Device) -> None:
    offline_device.configure(ENROLL_TIME_FLOOR=str(int(time.time()) + 10 * 365 * 86400))
    result = offline_device.enroll()
    assert result.returncode == TEMPFAIL, result.stderr
    assert len(re.findall(r"attempt \d: clock not set", result.stderr)) == 3
    status = offline_device.status()
    assert status["result"] == "transient" and "ENROLL_TIME_FLOOR" in status["message"]


# -- local decisions: revoked devices, configuration errors ---------------------------------


def test_a_revoked_device_is_not_enrolled_again(offline_device: Device) -> None:
    offline_device.state.mkdir(parents=True)  # as the agent leaves it after a revocation
    DeviceState(offline_device.state).mark_revoked(0x1234, "keyCompromise", "notice")
    result = offline_device.enroll()
    assert result.returncode == REVOKED, result.stderr
    assert "REVOKED (reason: keyCompromise)" in result.stderr
    status = offline_device.status()
    assert (status["result"], status["reason"]) == ("revoked", "keyCompromise")


@pytest.mark.parametrize(("script", "setting", "value", "message"), [
    ("measure-firmware.sh", "ENROLL_PCR", "16", "only PCRs 8..15"),
    ("measure-firmware.sh", "ENROLL_PCR", "7", "only PCRs 8..15"),
    ("measure-firmware.sh", "ENROLL_PCR", "x", "not a whole number"),
    ("first-boot-enroll.sh", "ENROLL_SERVER", "http://localhost:1", "https:// URL"),
    ("first-boot-enroll.sh", "ENROLL_SERVER_CA", "/nonexistent/ca.pem", "missing"),
    ("first-boot-enroll.sh", "ENROLL_DEVICE_BIN", "/nonexistent/enroll-device", "not found"),
    ("first-boot-enroll.sh", "ENROLL_RETRY_ATTEMPTS", "0", "out of range"),
    ("enroll-device-agent.sh", "ENROLL_BROKER", "", "ENROLL_BROKER is not set"),
])
def test_configuration_errors_exit_2(offline_device: Device, images, script: str,
                                     setting: str, value: str, message: str) -> None:
    offline_device.configure(ENROLL_FIRMWARE_IMAGE=str(images["good"]), **{setting: value})
    result = offline_device.run(script)
    assert result.returncode == CONFIG, result.stderr
    assert message in result.stderr


def test_a_server_ca_that_is_not_a_certificate_exits_2(tmp_path: Path,
                                                        server: ServedInstance) -> None:
    """curl finds it out (exit 77) before enroll-device would (a traceback, exit 1)."""
    require(*TOOLS)
    device = Device(tmp_path / "root", "swtpm:host=127.0.0.1,port=1", server)
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    device.configure(ENROLL_SERVER_CA=str(tmp_path / "garbage.pem"))
    result = device.enroll()
    assert result.returncode == CONFIG, result.stderr
    assert "cannot be used" in result.stderr and device.status()["result"] == "config-error"


def test_missing_configuration_file_exits_2(offline_device: Device) -> None:
    offline_device.conf.unlink()
    for script in ("measure-firmware.sh", "first-boot-enroll.sh", "enroll-device-agent.sh"):
        result = offline_device.run(script)
        assert result.returncode == CONFIG and "is missing or unreadable" in result.stderr


def test_agent_hook_runs_enroll_device_agent_with_the_configuration(
        offline_device: Device) -> None:  # fmt: skip
    """The agent itself is not needed: a stand-in records its arguments and exits 10."""
    stand_in = offline_device.root / "fake-enroll-device"
    stand_in.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$0.args"\nexit 10\n')
    stand_in.chmod(0o755)
    offline_device.configure(ENROLL_DEVICE_BIN=str(stand_in), ENROLL_GROUP="lab",
                             ENROLL_BROKER="mqtt.example.net:8883")
    result = offline_device.run("enroll-device-agent.sh", "--json")
    assert result.returncode == 10  # exec: the agent's exit code is the service's
    args = Path(f"{stand_in}.args").read_text().splitlines()
    settings = offline_device.settings
    assert args == ["agent", "--state-dir", settings["ENROLL_STATE_DIR"], "--tcti",
                    settings["ENROLL_TCTI"], "--server", settings["ENROLL_SERVER"],
                    "--server-ca", settings["ENROLL_SERVER_CA"], "--broker",
                    "mqtt.example.net:8883", "--timeout", "60", "--group", "lab", "--json"]


# -- (d) the systemd units and the scripts, statically --------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A strict reader of systemd.syntax(7) for our files: sections, repeated keys."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        assert not line.endswith("\\"), f"{path.name}:{number}: no continuation lines here"
        if match := re.fullmatch(r"\[([A-Za-z]+)\]", stripped):
            current = sections.setdefault(match[1], {})
            continue
        match = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*)=(.*)", stripped)
        assert match and current is not None, f"{path.name}:{number}: {line!r}"
        current.setdefault(match[1], []).append(match[2])
    return sections


def words(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> list[str]:
    return [w for value in unit.get(section, {}).get(key, []) for w in value.split()]


def installed_root(tmp_path: Path) -> Path:
    """A root with the hooks and units installed, and the host's systemd units (so that
    sysinit.target and friends resolve under --root)."""
    root = tmp_path / "image"
    libexec = root / "usr/libexec/enroll-device"
    libexec.mkdir(parents=True)
    for script in SCRIPTS:
        shutil.copy2(HOOKS / script, libexec / script)
    system = root / "usr/lib/systemd/system"
    shutil.copytree("/usr/lib/systemd/system", system, symlinks=True)
    for unit in UNITS:
        shutil.copy2(HOOKS / "systemd" / unit, system / unit)
    (root / "etc").mkdir()
    shutil.copy2(HOOKS / "enroll-device.conf", root / "etc/enroll-device.conf")
    return root


def test_units_pass_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    require("systemd-analyze")
    root = installed_root(tmp_path)
    paths = [str(root / "usr/lib/systemd/system" / unit) for unit in UNITS]
    verify = subprocess.run(["systemd-analyze", "verify", f"--root={root}", *paths],
                            capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values, so any output at all is a failure
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")

    for unit, ceiling in zip(UNITS, (1.0, 2.0, 2.0), strict=True):
        security = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", f"--root={root}",
             "--no-pager", str(root / "usr/lib/systemd/system" / unit)],
            capture_output=True, text=True, timeout=60)
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
        assert match, security.stdout + security.stderr
        assert float(match[1]) <= ceiling, f"{unit}: {security.stdout}"

    # negative control: the same check sees a broken unit
    broken = root / "usr/lib/systemd/system/enroll-device-agent.service"
    broken.write_text(broken.read_text().replace("Restart=on-failure", "Restart=on-failur")
                      .replace("UMask=", "UMsk="))
    (root / "usr/libexec/enroll-device/first-boot-enroll.sh").chmod(0o644)
    verify = subprocess.run(["systemd-analyze", "verify", f"--root={root}", *paths],
                            capture_output=True, text=True, timeout=60)
    output = verify.stdout + verify.stderr
    assert "on-failur" in output and "UMsk" in output and "not executable" in output


def test_units_encode_the_boot_order_and_the_exit_codes() -> None:
    measure, first_boot, agent = (parse_unit(HOOKS / "systemd" / unit) for unit in UNITS)
    conf = (HOOKS / "enroll-device.conf").read_text()
    state_dir = re.search(r"(?m)^ENROLL_STATE_DIR=(.*)$", conf)[1]
    runtime_dir = re.search(r"(?m)^ENROLL_RUNTIME_DIR=(.*)$", conf)[1]
    assert re.search(r"(?m)^ENROLL_PCR=13$", conf)

    for unit in (measure, first_boot):
        assert words(unit, "Service", "Type") == ["oneshot"]
        assert words(unit, "Service", "RemainAfterExit") == ["yes"]
        assert words(unit, "Service", "RuntimeDirectoryPreserve") == ["yes"]
        assert f"/run/{words(unit, 'Service', 'RuntimeDirectory')[0]}" == runtime_dir
    assert "enroll-device-first-boot.service" in words(measure, "Unit", "Before")
    assert words(measure, "Service", "ExecStart") == [
        "/usr/libexec/enroll-device/measure-firmware.sh"]

    assert {"network-online.target", "time-sync.target", "enroll-device-measure.service"
            } <= set(words(first_boot, "Unit", "After"))
    assert "network-online.target" in words(first_boot, "Unit", "Wants")
    assert words(first_boot, "Unit", "Requires") == ["enroll-device-measure.service"]
    assert words(first_boot, "Unit", "ConditionPathExists") == [
        f"!{state_dir}/device.crt.pem"]
    assert f"/var/lib/{words(first_boot, 'Service', 'StateDirectory')[0]}" == state_dir
    assert words(first_boot, "Service", "Restart") == ["on-failure"]
    assert set(words(first_boot, "Service", "RestartPreventExitStatus")) == {
        str(CONFIG), str(REFUSED), str(REVOKED)}
    assert words(first_boot, "Unit", "OnSuccess") == ["enroll-device-agent.service"]

    assert "enroll-device-first-boot.service" in words(agent, "Unit", "After")
    assert words(agent, "Unit", "ConditionPathExists") == [f"{state_dir}/device.crt.pem"]
    assert words(agent, "Service", "Restart") == ["on-failure"]
    assert "10" in words(agent, "Service", "RestartPreventExitStatus")
    assert words(agent, "Service", "ExecStart") == [
        "/usr/libexec/enroll-device/enroll-device-agent.sh"]

    for unit in (measure, first_boot, agent):  # hardening that keeps the TPM reachable
        assert unit["Service"]["DeviceAllow"] == ["/dev/tpmrm0 rw"]
        assert words(unit, "Service", "DevicePolicy") == ["closed"]
        assert "PrivateDevices" not in unit["Service"]
        assert words(unit, "Service", "NoNewPrivileges") == ["yes"]
        assert words(unit, "Service", "ProtectSystem") == ["strict"]
        assert words(unit, "Service", "User") == ["enroll-device"]
        assert "tss" in words(unit, "Service", "SupplementaryGroups")
    sysusers = (HOOKS / "sysusers.d/enroll-device.conf").read_text()
    assert re.search(r"(?m)^m enroll-device tss$", sysusers)


def test_scripts_pass_shellcheck_as_posix_sh() -> None:
    require("shellcheck")
    result = subprocess.run(["shellcheck", "--shell=sh", "--external-sources",
                             *(script for script in SCRIPTS)], cwd=HOOKS,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for script in SCRIPTS[1:]:
        assert os.access(HOOKS / script, os.X_OK), f"{script} is not executable"
        assert (HOOKS / script).read_text().startswith("#!/bin/sh\n")
