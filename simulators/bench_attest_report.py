"""The report of `enroll-sim bench attest` (simulators.bench_attest): the numbers of one
run gathered into a JSON-ready dict, checked against the targets, and its text form."""

from __future__ import annotations

import os
import statistics
from collections import Counter, defaultdict
from typing import Any

from .bench_report import machine_info, percentile

TARGET_SERVER_CPU_MS = 3.0  # server CPU per attested enrollment
TARGET_DEVICE_P50_MS = 300.0  # device wall time per enrollment, on swtpm


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


def _breakdown(ok: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean milliseconds per successful enrollment: TPM, HTTP, the rest; per call."""
    if not ok:
        return {}
    count = len(ok)

    def per_call(key: str) -> dict[str, dict[str, float]]:
        calls: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for record in ok:
            for name, (number, seconds) in record[key].items():
                calls[name][0] += number
                calls[name][1] += seconds
        ordered = sorted(calls.items(), key=lambda item: -item[1][1])
        return {name: {"calls": round(number / count, 2), "ms": _ms(seconds / count)}
                for name, (number, seconds) in ordered}

    wall = statistics.fmean(r["wall"] for r in ok)
    tpm = statistics.fmean(r["tpm"] for r in ok)
    http = statistics.fmean(r["http"] for r in ok)
    return {"wall_ms": _ms(wall), "tpm_ms": _ms(tpm), "http_ms": _ms(http),
            "other_ms": _ms(wall - tpm - http), "tpm_calls": per_call("tpm_calls"),
            "http_requests": per_call("http_calls")}


def attest_report(settings: dict[str, Any], group: str, provisioning: dict[str, Any],
                  reports: list[dict[str, Any]],
                  records: list[dict[str, Any]], elapsed: float, server_cpu: float,
                  swtpm_cpu: float, recorded: dict[str, int],
                  kept_dir: str | None) -> dict[str, Any]:
    """The report of one run (JSON-ready; see docs/performance.md)."""
    ok = [r for r in records if r["error"] is None]
    errors = Counter(r["error"] for r in records if r["error"] is not None)
    warm_errors: Counter[str] = Counter()
    for report in reports:
        warm_errors.update(report["warmup_errors"])
    walls = sorted(r["wall"] for r in ok)
    per_ok = max(len(ok), 1)
    cpu_ms = 1000 * server_cpu / per_ok
    p50_ms = 1000 * percentile(walls, 0.5) if walls else None
    return {
        "benchmark": "attest.enroll",
        "machine": machine_info(),
        "settings": {**settings,
                     "group": group, "ca_backend": "pkcs11 (SoftHSM)",
                     "database": "sqlite (WAL)", "server": "gunicorn gthread over TLS",
                     "client": "device_sdk AttestedEnrollment (attempts=1), one device at "
                               "a time per client process, a new TLS connection each",
                     "tpm": "swtpm, ECC P-256 EK with a manufacturer certificate in NV"},
        "provisioning": provisioning,
        "enrollments": {
            "attempted": len(records), "succeeded": len(ok), "failed": sum(errors.values()),
            "errors_by_code": dict(errors.most_common()),
            "warmup_errors": dict(warm_errors),
            "seconds": round(elapsed, 3),
            "enrollments_per_second": round(len(ok) / elapsed, 2) if elapsed > 0 else None,
            "certificates_recorded": recorded["certificates"],
            "evidence_recorded": recorded["evidence"],
        },
        "device_ms": {
            "p50": round(p50_ms, 2) if p50_ms is not None else None,
            "p99": _ms(percentile(walls, 0.99)) if walls else None,
            "min": _ms(walls[0]) if walls else None,
            "max": _ms(walls[-1]) if walls else None,
            "mean": _ms(statistics.fmean(walls)) if walls else None,
        },
        "device_breakdown": _breakdown(ok),
        "server": {
            "cpu_ms_per_enrollment": round(cpu_ms, 3),
            "cpu_utilisation": round(server_cpu / elapsed / (os.cpu_count() or 1), 3)
            if elapsed > 0 else None,
            "enrollments_per_second_per_core": round(1000 / cpu_ms, 1) if cpu_ms > 0 else None,
        },
        "client_cpu_ms_per_enrollment": round(
            1000 * sum(r["cpu_seconds"] for r in reports) / per_ok, 3),
        "swtpm_cpu_ms_per_enrollment": round(1000 * swtpm_cpu / per_ok, 3),
        "targets": {"server_cpu_ms_max": TARGET_SERVER_CPU_MS,
                    "device_p50_ms_max": TARGET_DEVICE_P50_MS,
                    "server_cpu_met": cpu_ms < TARGET_SERVER_CPU_MS,
                    "device_p50_met": p50_ms is not None and p50_ms < TARGET_DEVICE_P50_MS},
        "kept_instance_dir": kept_dir,
    }


def format_attest_report(report: dict[str, Any]) -> str:
    machine, settings, enrollments = report["machine"], report["settings"], report["enrollments"]
    device, server, targets = report["device_ms"], report["server"], report["targets"]
    provisioning, breakdown = report["provisioning"], report["device_breakdown"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} ms"

    def mark(met: bool) -> str:
        return "PASS" if met else "MISS"

    rows = [
        ("device enrollment p50", ms(device["p50"]),
         f"< {targets['device_p50_ms_max']:g} ms   {mark(targets['device_p50_met'])}"),
        ("device enrollment p99", ms(device["p99"]), ""),
        ("device enrollment min / max", f"{ms(device['min'])} / {ms(device['max'])}", ""),
        ("succeeded / failed", f"{enrollments['succeeded']} / {enrollments['failed']}",
         ", ".join(f"{k}: {v}" for k, v in enrollments["errors_by_code"].items())),
        ("enrollments/s (wall clock)", f"{enrollments['enrollments_per_second'] or 0:.1f}",
         f"{enrollments['seconds']:.2f} s"),
        ("server CPU per enrollment", f"{server['cpu_ms_per_enrollment']:.2f} ms",
         f"< {targets['server_cpu_ms_max']:g} ms     {mark(targets['server_cpu_met'])}"),
        ("server capacity", f"{server['enrollments_per_second_per_core'] or 0:.0f}/s",
         f"per core (1 / CPU per enrollment); {100 * (server['cpu_utilisation'] or 0):.0f}"
         "% of all CPUs used"),
        ("client CPU per enrollment", f"{report['client_cpu_ms_per_enrollment']:.2f} ms",
         "SDK process"),
        ("swtpm CPU per enrollment", f"{report['swtpm_cpu_ms_per_enrollment']:.2f} ms", ""),
    ]
    lines = [
        "TPM-attested enrollment benchmark",
        f"  machine  {machine['cpus']} CPUs ({machine['cpu_model']}), Python "
        f"{machine['python']}, {machine['openssl']}; load average "
        f"{machine['load_average_1min']} at start",
        f"  server   gunicorn gthread {settings['workers']} workers x {settings['threads']} "
        f"threads over TLS, CA key {settings['ca_backend']}, {settings['database']}",
        f"  devices  {enrollments['attempted']} measured after {settings['warmup']} warm-up; "
        f"{settings['processes']} concurrent client process"
        f"{'es' if settings['processes'] != 1 else ''}, one device at a time each, "
        "a new TLS connection per device",
        f"  factory  {provisioning['tpms']} swtpm started and provisioned in "
        f"{provisioning['seconds']:.2f} s (not in the numbers below): start p50 "
        f"{provisioning['swtpm_start_ms']['p50']:.0f} ms, provision p50 "
        f"{provisioning['provision_ms']['p50']:.0f} ms / max "
        f"{provisioning['provision_ms']['max']:.0f} ms",
        "",
        f"  {'metric':<30}{'value':>19}   target",
    ]
    lines += [f"  {name:<30}{value:>19}   {note}".rstrip() for name, value, note in rows]
    if breakdown:
        wall = breakdown["wall_ms"] or 1.0

        def share(value: float) -> str:
            return f"{value:7.1f} ms {100 * value / wall:4.0f}%"

        def calls(items: dict[str, dict[str, float]], top: int) -> str:
            return ", ".join(f"{name} {c['ms']:.1f}" + (f" ({c['calls']:g}x)" if c["calls"] != 1
                                                         else "")
                             for name, c in list(items.items())[:top])

        lines += [
            "",
            f"  where a device's time goes (mean of {enrollments['succeeded']}, "
            f"{breakdown['wall_ms']:.1f} ms)",
            f"    TPM (ESAPI calls)   {share(breakdown['tpm_ms'])}   "
            f"{calls(breakdown['tpm_calls'], 6)}",
            f"    HTTPS requests      {share(breakdown['http_ms'])}   "
            f"{calls(breakdown['http_requests'], 4)} (first one incl. TLS connect)",
            f"    SDK Python, other   {share(breakdown['other_ms'])}   CSR, JSON, base64, "
            "certificate parsing, TLS context",
        ]
    if enrollments["warmup_errors"]:
        lines.append(f"  warm-up errors: {enrollments['warmup_errors']}")
    if enrollments["certificates_recorded"] != enrollments["succeeded"] + settings["warmup"] \
            - sum(enrollments["warmup_errors"].values()):
        lines.append(f"  note: {enrollments['certificates_recorded']} TPM certificates "
                     "recorded in the database (warm-up included)")
    if report.get("kept_instance_dir"):
        lines.append(f"  instance kept in {report['kept_instance_dir']}")
    return "\n".join(lines)
