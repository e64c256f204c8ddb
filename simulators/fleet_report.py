"""What a fleet run found, per device and phase, and its forms: the JSON-ready report,
the human table (``render``), and the input of the JUnit XML (simulators.fleet_junit).

Each device gets one record per phase that applies to it: ``provision``, ``first_boot``,
``renewal`` (devices meant to enroll), ``revocation`` and ``readmission`` (the revoked
share). An outcome is "passed", "failed" (the server or the device did the wrong thing:
a refusal code where a certificate was due, no verified notice, ...), "error" (the
simulator itself could not do the step: swtpm, a crash) or "skipped" (an earlier phase
of this device failed). A scenario device (rogue, tampered) passes its first boot when
it is refused with exactly the code it must get.
"""

from __future__ import annotations

import re
from typing import Any

from .bench_report import percentile
from .fleet_devices import EXPECTED, DeviceResult
from .fleet_notices import RevocationOutcome

PHASES = ("provision", "first_boot", "renewal", "revocation", "readmission")
_CODE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")  # a stable refusal code


def _outcome(outcome: str, ms: float | None = None, code: str | None = None,
             message: str = "") -> dict[str, Any]:
    record: dict[str, Any] = {"outcome": outcome}
    if ms is not None:
        record["ms"] = round(ms, 1)
    if code is not None:
        record["code"] = code
    if message:
        record["message"] = message
    return record


def _bad(error: str, what: str) -> dict[str, Any]:
    """A failure when the error is a refusal code, an error when the simulator broke."""
    if _CODE.match(error):
        return _outcome("failed", code=error, message=f"{what}: refused with {error}")
    return _outcome("error", code=error.split(":")[0], message=f"{what}: {error}")


def device_phases(result: DeviceResult, revocation: RevocationOutcome | None,
                  readmission: str | None, ocsp: str | None = None) -> dict[str, Any]:
    """The phases of one device (see the module docstring)."""
    expected = EXPECTED[result.role]
    phases: dict[str, Any] = {}
    if result.phase == "provision" and result.error:
        phases["provision"] = _bad(result.error, "provisioning")
        phases["first_boot"] = _outcome("skipped", message="provisioning failed")
    else:
        phases["provision"] = _outcome("passed", result.provision_ms)
        if expected is None:
            phases["first_boot"] = (_outcome("passed", result.enroll_ms) if result.enrolled
                                    else _bad(result.error or "?", "first boot"))
        elif result.enrolled:
            phases["first_boot"] = _outcome("failed", code="unexpectedly.enrolled", message=(
                f"a {result.role} device must be refused with {expected}, but the server "
                "issued it a certificate"))
        elif result.error == expected:
            phases["first_boot"] = _outcome("passed", code=expected,
                                            message=f"refused as expected: {expected}")
        else:
            phases["first_boot"] = _bad(result.error or "?", f"first boot (expected "
                                                             f"refusal {expected})")
    if expected is None:
        if not result.enrolled:
            phases["renewal"] = _outcome("skipped", message="not enrolled")
        elif result.renewed and result.phase is None:
            phases["renewal"] = _outcome("passed", result.renew_ms)
        else:
            phases["renewal"] = _bad(result.error or "?", "renewal")
    if revocation is not None:
        phases["revocation"] = _revocation_phase(revocation, ocsp)
        phases["readmission"] = (
            _outcome("passed", code="device.revoked", message="refused as expected")
            if readmission == "device.revoked" else _outcome(
                "failed", code=readmission or "?",
                message=f"a revoked device booting again must be refused with "
                        f"device.revoked, got {readmission}"))
    return phases


def _revocation_phase(revocation: RevocationOutcome, ocsp: str | None) -> dict[str, Any]:
    if not revocation.revoked_by_api:
        return _outcome("failed", code=revocation.api_error or "not.revoked",
                        message=f"operator API did not revoke it: {revocation.api_error}; "
                                f"{revocation.detail}")
    if ocsp is not None and ocsp != "revoked":
        return _outcome("failed", code="ocsp.not_revoked",
                        message=f"OCSP says {ocsp} after the revocation")
    if revocation.checked_at and not revocation.notified:
        return _outcome("failed", code="notice.not_received", message=(
            f"no verified revocation notice at the {revocation.checked_at} (learnt it "
            f"from: {revocation.source}, agent exit {revocation.agent_exit}); "
            f"{revocation.detail}"))
    return _outcome("passed", revocation.latency_ms, message=(
        f"notice verified at the {revocation.checked_at}" if revocation.notified else
        "revoked through the operator API (no broker given: notice not checked)"))


def device_records(results: list[DeviceResult], revocations: dict[str, RevocationOutcome],
                   readmissions: dict[str, str],
                   ocsp: dict[str, str] | None = None) -> list[dict[str, Any]]:
    records = []
    for result in results:
        revocation = revocations.get(result.device_id) if result.device_id else None
        records.append({
            "name": result.name, "index": result.index, "role": result.role,
            "device_id": result.device_id or None, "expected": EXPECTED[result.role],
            "phases": device_phases(result, revocation, readmissions.get(result.device_id),
                                    (ocsp or {}).get(result.device_id))})
    return records


def failed_phases(records: list[dict[str, Any]]) -> int:
    return sum(phase["outcome"] in ("failed", "error")
               for record in records for phase in record["phases"].values())


def ms_summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": round(percentile(ordered, 0.5), 1),
            "p99": round(percentile(ordered, 0.99), 1),
            "max": round(ordered[-1], 1) if ordered else float("nan")}


def failure_counts(results: list[DeviceResult]) -> dict[str, int]:
    failures: dict[str, int] = {}
    for result in results:
        if result.error:
            key = f"{result.role}: {result.error}"
            failures[key] = failures.get(key, 0) + 1
    return failures


def _pair(summary: dict[str, float]) -> str:
    return "{p50} / {p99}".format(**summary)


def render(report: dict[str, Any]) -> str:
    """The human table of a fleet run (either mode)."""
    inv, options = report["invariants"], report["options"]
    rows = [
        ("target", report.get("server", "a private instance")),
        ("devices enrolled + renewed", f"{report['succeeded']}/"
         f"{options['devices'] + options['flaky']}"),
        ("refusals by role: code", ", ".join(f"{k} x{v}" for k, v in
                                             report["failures"].items()) or "none"),
        ("connections dropped mid-enrollment", str(report["network_drops"])),
        ("provisioning (ms) p50/p99", _pair(report["provision_ms"])),
        ("first-boot enrollment (ms) p50/p99", _pair(report["enroll_ms"])),
        ("renewal (ms) p50/p99", _pair(report["renew_ms"])),
        ("revocation -> notice (ms) p50/p99", _pair(report["revocation_notice_ms"])),
    ]
    labels = {"revoked_notified": "revoked devices notified",
              "revoked_reenroll_refused": "revoked devices refused on re-enrollment"}
    for key, label in labels.items():
        if key in inv:
            rows.append((label, f"{inv[key]}/{inv['revoked']}"))
    if "forged_notices" in inv:
        rows.append(("forged notices rejected by the gateway",
                     f"{inv['forged_notices'] - inv['forged_accepted']}/"
                     f"{inv['forged_notices']}"))
    if "devices_with_two_active_certs" in inv:
        rows.append(("two active certs (devices / keys)",
                     f"{inv['devices_with_two_active_certs']} / "
                     f"{inv.get('keys_with_two_active_certs', '-')}"))
    if "outbox_unsent" in inv:
        rows.append(("outbox left unsent", str(inv["outbox_unsent"])))
    if report.get("chaos_events"):
        rows.append(("chaos events", ", ".join(f"{k} x{v}" for k, v in
                                              report["chaos_events"].items() if v) or "none"))
    rows += [
        ("peak swtpm memory per device", f"{report['swtpm_peak_kib']} KiB"),
        ("test cases failed (JUnit)", f"{report['failed_cases']}"),
        ("wall time (set-up)", f"{report['wall_seconds']} s ({report['setup_seconds']} s)"),
        ("result", "PASS" if report["passed"] else "FAIL"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:{width}}  {value}" for name, value in rows]
    bad = [(record, phase, outcome) for record in report["devices"]
           for phase, outcome in record["phases"].items()
           if outcome["outcome"] in ("failed", "error")]
    for record, phase, outcome in bad[:10]:
        lines.append(f"  {record['name']} {phase}: {outcome.get('message', '')[:160]} "
                     f"(device {record['device_id'] or '-'})")
    if len(bad) > 10:
        lines.append(f"  ... and {len(bad) - 10} more (see --json or --junit)")
    for check, (held, detail) in report.get("checks", {}).items():
        if not held:
            lines.append(f"  check {check} FAILED: {detail[:200]}")
    return "\n".join(lines)
