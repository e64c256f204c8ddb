"""The pytest plugin shipped with the package (tpm_enroll_testing), used as another
project uses it: a separate pytest run, with plugin autoloading off, naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker


PROJECT_TEST = '''
from cryptography import x509

from device_sdk.tpm import TpmDevice


def test_a_provisioned_device_holds_the_manufacturers_ek_certificate(
        enroll_device, enroll_manufacturer):
    with enroll_device.environ(), TpmDevice(enroll_device.tcti) as tpm:
        der = tpm.read_ek_certificate("ecc")
    certificate = x509.load_der_x509_certificate(der)
    certificate.verify_directly_issued_by(enroll_manufacturer.maker.ek_ca_certificate)
    assert enroll_manufacturer.roots.read_text().count("BEGIN CERTIFICATE") == 2
'''


def run_pytest(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(project), "--basetemp", str(project / "tmp"),
                           *args, str(project / "test_device.py")], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_plugin_is_opt_in_by_name_and_leaves_nothing_running(tmp_path: Path) -> None:
    project = tmp_path / "other-project"
    project.mkdir()
    (project / "test_device.py").write_text(PROJECT_TEST)

    without = run_pytest(project)
    assert without.returncode != 0
    assert "fixture 'enroll_device' not found" in without.stdout

    named = run_pytest(project, "-p", "tpm_enroll_testing")
    assert named.returncode == 0, named.stdout[-3000:] + named.stderr[-2000:]
    assert "1 passed" in named.stdout
    # swtpm, dbus-daemon and tpm2-abrmd of the device fixture are gone.
    leftover = subprocess.run(["pgrep", "-a", "-f", str(project)], capture_output=True,
                              text=True).stdout
    assert leftover == ""
