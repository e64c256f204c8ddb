"""`enroll-sim bench est` end to end: a real instance, real clients, a JSON report.

No timing assertions: the machine is shared and noisy. What is pinned is the shape of
the report, that every enrollment succeeded and was recorded, that each client kept one
keep-alive connection, and that the run leaves no process or file behind.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker

BIN = Path(sys.executable).parent / "enroll-sim"


def enroll_sim(*args: str, env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if entry.name.isdigit() and text in cmdline:
            found.append(cmdline)
    return found


def test_bench_est_json_reports_all_fields_and_no_errors(tmp_path):
    result = enroll_sim("bench", "est", "--requests", "60", "--clients", "4", "--json",
                        env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)

    https, bare, settings = report["https"], report["bare"], report["settings"]
    assert settings["requests"] == 60 and settings["clients"] == 4
    assert https["requests"] == https["enrollments"] == 60
    assert https["errors"] == 0 and https["errors_by_code"] == {}
    assert https["warmup_errors"] == {}
    assert https["enrollments_per_second"] > 0
    latency = https["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert https["server_cpu_ms_per_enrollment"] > 0
    assert https["client_cpu_ms_per_enrollment"] > 0
    # Every enrollment (warm-up included) left exactly one certificate row.
    assert https["certificates_recorded"] == 60 + settings["warmup"]
    # One keep-alive TLS connection per client for the whole run.
    assert https["connections"] == 4
    assert bare["issuances"] > 0 and bare["issuances_per_second"] > 0
    assert bare["signer"] == "Pkcs11PrivateKey"
    assert report["ratio"] > 0
    assert set(report["targets"]) >= {"ratio_min", "p99_ms_max", "ratio_met", "p99_met"}
    assert report["machine"]["cpus"] >= 1

    # Nothing left behind: the instance, its server and the client processes are gone.
    assert list(tmp_path.iterdir()) == []
    assert processes_mentioning(str(tmp_path)) == []


def test_help_shows_examples():
    top = enroll_sim("--help")
    assert top.returncode == 0
    assert "Examples:" in top.stdout and "enroll-sim bench est" in top.stdout

    est = enroll_sim("bench", "est", "--help")
    assert est.returncode == 0
    assert "Examples:" in est.stdout
    assert "enroll-sim bench est --clients 1" in est.stdout
    for option in ("--requests", "--clients", "--workers", "--threads", "--json"):
        assert option in est.stdout


def test_bench_attest_json_reports_all_fields_and_no_errors(tmp_path):
    result = enroll_sim("bench", "attest", "--devices", "3", "--concurrency", "2", "--json",
                        env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)

    settings, enrollments = report["settings"], report["enrollments"]
    assert report["benchmark"] == "attest.enroll"
    assert settings["devices"] == 3 and settings["concurrency"] == 2
    assert settings["processes"] == 2 and settings["warmup"] >= 2
    assert enrollments["attempted"] == enrollments["succeeded"] == 3
    assert enrollments["failed"] == 0 and enrollments["errors_by_code"] == {}
    assert enrollments["warmup_errors"] == {}
    # Every enrollment (warm-up included) left a TPM certificate and its evidence.
    assert enrollments["certificates_recorded"] == 3 + settings["warmup"]
    assert enrollments["evidence_recorded"] == 3 + settings["warmup"]
    device = report["device_ms"]
    assert 0 < device["min"] <= device["p50"] <= device["p99"] <= device["max"]
    breakdown = report["device_breakdown"]
    assert breakdown["tpm_ms"] > 0 and breakdown["http_ms"] > 0
    assert {"activate_credential", "certify", "sign"} <= set(breakdown["tpm_calls"])
    assert set(breakdown["http_requests"]) == {"attest/challenge", "attest/enroll"}
    assert report["server"]["cpu_ms_per_enrollment"] > 0
    assert report["server"]["enrollments_per_second_per_core"] > 0
    assert report["provisioning"]["tpms"] == 3 + settings["warmup"]
    assert set(report["targets"]) >= {"server_cpu_ms_max", "device_p50_ms_max",
                                      "server_cpu_met", "device_p50_met"}

    # Nothing left behind: no instance, server, swtpm or client process, no temp file.
    assert list(tmp_path.iterdir()) == []
    assert processes_mentioning(str(tmp_path)) == []


def test_bench_attest_help_shows_examples():
    attest = enroll_sim("bench", "attest", "--help")
    assert attest.returncode == 0
    assert "Examples:" in attest.stdout
    assert "enroll-sim bench attest --concurrency 1" in attest.stdout
    for option in ("--devices", "--concurrency", "--warmup", "--json"):
        assert option in attest.stdout


def test_demo_enrolls_tpm_devices_and_refuses_an_unknown_manufacturer(tmp_path):
    result = subprocess.run([sys.executable, "-m", "simulators.demo"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=240,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "issued serial" in out  # the EST part still runs first
    assert out.count("boots and enrolls with TPM attestation") == 3
    assert "device 4 refused: 403 ek.untrusted" in out
    # the fleet story: firmware hooks, agents, renewal, revocation online and offline
    assert out.count("first boot enrolled in") == 4
    assert "first boot REFUSED: quote.pcr_mismatch" in out
    assert "agent renewed over EST with its TPM key" in out
    assert "stopped with exit 10" in out and "`openssl ocsp` says revoked" in out
    assert "(source crl) and exited 10" in out
    # Every swtpm and the server are stopped; only the kept demo instance remains.
    assert processes_mentioning(str(tmp_path)) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-instance"]
