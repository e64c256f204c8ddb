"""The fleet against an existing deployment (`enroll-sim fleet --server URL`): only its
public APIs (EST, attestation, OCSP) and, with a credential, its operator API. Nothing
here reads the server's files or database."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from .bench_report import Progress
from .deployment import Deployment
from .fleet_devices import DeviceResult
from .fleet_notices import revoke_at_devices
from .fleet_options import FleetOptions, FleetSetupError
from .fleet_steps import choose_victims, device_jobs, finish_report, readmissions, run_devices
from .operator_api import OperatorApi, OperatorApiError, ocsp_status


def run_remote(options: FleetOptions, deployment: Deployment, workdir: Path,
               progress: Progress) -> dict[str, Any]:
    """The fleet against someone else's server: public and operator APIs only."""
    from .manufacturer import Manufacturer

    started = time.monotonic()
    rng = random.Random(options.seed)
    assert options.manufacturer is not None
    _reachable(deployment)
    Manufacturer.create(workdir / "unknown-vendor")  # the rogue devices' TPM maker
    jobs = device_jobs(options, rng, deployment, options.manufacturer,
                       workdir / "unknown-vendor", workdir, options.firmware)
    progress(f"{len(jobs)} devices against {deployment.url}, group {deployment.group!r}",
             True)
    results = run_devices(jobs, options.concurrency, progress)
    victims = (choose_victims(rng, results, options.revoke_fraction)
               if deployment.operator_token else [])
    revocations = revoke_at_devices(
        deployment, [(jobs[v.index], v.device_id) for v in victims], options.concurrency,
        workdir, progress)
    readmitted = readmissions(jobs, victims, options.concurrency)
    progress("checking OCSP and the operator API's view", False)
    ocsp = _ocsp_view(deployment, results)
    victim_ids = {v.device_id for v in victims}
    checks: dict[str, tuple[bool, str]] = {}
    healthy = [r for r in results if r.renewed and r.device_id not in victim_ids]
    checks["ocsp_agrees"] = (
        all(ocsp.get(r.device_id) == "good" for r in healthy)
        and all(ocsp.get(d) == "revoked" for d in victim_ids),
        "OCSP says good for every enrolled device and revoked for every revoked one: "
        + _disagreements(ocsp, healthy, victim_ids))
    invariants: dict[str, Any] = {"revoked": len(victims),
                                  "revoked_notified": sum(o.notified
                                                          for o in revocations.values()),
                                  "revoked_reenroll_refused": sum(
                                      c == "device.revoked" for c in readmitted.values())}
    if deployment.operator_token:
        checks.update(_api_view(deployment, results, victim_ids, invariants))
    return finish_report(options, results, revocations, readmitted, checks, invariants,
                         started, 0.0, ocsp)


def _reachable(deployment: Deployment) -> None:
    import httpx

    from device_sdk.est import tls_context

    try:
        response = httpx.get(deployment.url.rstrip("/") + "/.well-known/est/"
                             f"{deployment.group}/cacerts",
                             verify=tls_context(deployment.trust_anchor), timeout=30)
    except (httpx.HTTPError, OSError) as error:
        raise FleetSetupError(f"cannot reach {deployment.url}: {error} (check --server and "
                              "--server-ca)") from error
    if response.status_code != 200:
        raise FleetSetupError(f"{deployment.url} answered {response.status_code} "
                              f"{response.headers.get('X-Error-Code', '')} for group "
                              f"{deployment.group!r}'s CA certificates (check --group)")


def _ocsp_view(deployment: Deployment, results: list[DeviceResult]) -> dict[str, str]:
    """The OCSP status of each renewed device's current certificate (public responder)."""
    from cryptography import x509

    chain = x509.load_pem_x509_certificates(deployment.trust_anchor.read_bytes())
    return {result.device_id: ocsp_status(
        deployment.url, deployment.trust_anchor,
        x509.load_pem_x509_certificate(result.certificate_pem.encode()), chain)
        for result in results if result.certificate_pem}


def _disagreements(ocsp: dict[str, str], healthy: list[DeviceResult],
                   victims: set[str]) -> str:
    wrong = [f"{r.device_id[:16]}: {ocsp.get(r.device_id)}" for r in healthy
             if ocsp.get(r.device_id) != "good"]
    wrong += [f"{d[:16]}: {ocsp.get(d)}" for d in victims if ocsp.get(d) != "revoked"]
    return "; ".join(wrong[:5]) or "none"


def _api_view(deployment: Deployment, results: list[DeviceResult], victims: set[str],
              invariants: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    """GET /api/v1/devices/<id> of every enrolled device: the server's own view."""
    disagree, two_active = [], 0
    with OperatorApi(deployment.url, deployment.trust_anchor,
                     deployment.operator_token) as api:
        for result in (r for r in results if r.enrolled):
            expected = "revoked" if result.device_id in victims else "active"
            try:
                device = api.device(result.device_id)
            except OperatorApiError as error:
                disagree.append(f"{result.device_id[:16]}: {error}")
                continue
            active = sum(c["status"] == "active" for c in device["certificates"])
            two_active += active > 1
            if device["status"] != expected or active != (expected == "active"):
                disagree.append(f"{result.device_id[:16]}: {device['status']}, {active} "
                                "active certificates")
    invariants["devices_with_two_active_certs"] = two_active
    return {
        "server_agrees": (not disagree, "the operator API shows every enrolled device "
                                        "active with one active certificate and every "
                                        "revoked one revoked with none: "
                          + ("; ".join(disagree[:5]) or "none")),
        "one_active_certificate_per_device": (two_active == 0,
                                              f"{two_active} devices hold two"),
    }
