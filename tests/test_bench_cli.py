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
