"""`enroll-sim fleet`: N swtpm devices through their lifecycle, concurrently, with chaos.

Set-up: a served instance (SoftHSM CA key, SQLite), a simulated TPM manufacturer, a TPM
group trusting it, `broker-config` + Mosquitto + `enroll-server relay`, and a gateway
(an MQTT client with its own certificate, allowed to read `fleet/<group>/revocations`).

Each device, in one of C worker processes: swtpm start -> factory provisioning (EK
certificates in NV) -> first-boot attested enrollment (device SDK) -> renewal (a fresh
attested re-enrollment under the pinned AK) -> swtpm stop. Then a fraction F of the
fleet is revoked through the operator API; the gateway must receive a verified notice
for each (device_sdk.notices, audience = that device).

Devices whose TPM key should serve TLS to the broker need a resource manager and the
tpm2 provider per process (device_sdk.tls): the full `enroll-device agent` runs for the
devices of `--agents K` (default 0 here; the test suite runs it), the others stay
ESAPI-only so that 1,000 of them fit on two cores.

Chaos (`--chaos broker,server,relay`): while devices enroll, a chaos thread restarts the
broker, restarts the server and kills the relay (a fresh one starts), each a few times.
Devices retry (the SDK backs off on connection errors and 503). At the end the run checks
the invariants: every device enrolled with exactly one active certificate (no key holds
two), every revoked device's notice delivered, the outbox empty.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import random
import shutil
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509

from simulators.bench_report import Progress, machine_info, no_progress, percentile
from simulators.fleet_devices import EXPECTED, DeviceResult, device_worker, revoked_worker
from simulators.fleet_rig import (  # noqa: F401 - re-exported for the demo and the CLI
    BAD_FIRMWARE,
    CHAOS_KINDS,
    FIRMWARE_PCR,
    GOOD_FIRMWARE,
    GROUP,
    Gateway,
    Rig,
    gateway_credentials,
)


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


def run_fleet(options: FleetOptions, progress: Progress = no_progress) -> dict[str, Any]:
    from simulators.manufacturer import Manufacturer

    if unknown := set(options.chaos) - set(CHAOS_KINDS):
        raise ValueError(f"unknown chaos kind(s): {', '.join(sorted(unknown))}")
    rng = random.Random(options.seed)
    workdir = Path(tempfile.mkdtemp(prefix="enroll-fleet-"))
    wall_started = time.monotonic()
    rig = Rig(workdir)
    gateway: Gateway | None = None
    chaos_stop = threading.Event()
    try:
        manufacturer = Manufacturer.create(workdir / "vendor")
        Manufacturer.create(workdir / "unknown-vendor")  # the rogue devices' TPM maker
        roots = workdir / "ek-roots.pem"
        roots.write_text("".join(manufacturer.ca_certificate_pems))
        rig.start(roots, workdir / "vendor")
        anchors = x509.load_pem_x509_certificates(rig.instance.trust_anchor.read_bytes())
        gateway = Gateway(rig.broker_port, rig.instance.trust_anchor,
                          *gateway_credentials(rig), anchors)
        gateway.subscribed.wait(30)
        setup_seconds = time.monotonic() - wall_started
        progress("set-up done; devices enrolling", False)
        chaos_thread = _start_chaos(rig, options, rng, chaos_stop)
        results = _run_devices(rig, workdir, options, progress, rng)
        enrolled = [r for r in results if r.enrolled]
        victims = rng.sample(enrolled, round(len(enrolled) * options.revoke_fraction))
        revoke_started = time.monotonic()
        healthy = [r for r in enrolled if r not in victims]
        forged = _forge(rig, healthy[: max(1, len(healthy) // 10)] if healthy else [])
        revoke_latency = _revoke(rig, gateway, victims, progress)
        _finish_chaos(rig, options, chaos_stop, chaos_thread)
        readmission = _try_revoked(rig, workdir, options, victims)
        invariants = _invariants(rig, results, victims, gateway)
        invariants["forged_notices"] = forged
        invariants["forged_accepted"] = sum(
            r.device_id in gateway.notices for r in healthy)
        invariants["revoked_reenroll_refused"] = readmission.get("device.revoked", 0)
        invariants["revoked_reenroll_outcomes"] = readmission
        report = _report(options, results, victims, revoke_latency, invariants, rig,
                         setup_seconds, time.monotonic() - wall_started,
                         time.monotonic() - revoke_started, gateway)
        report["workdir"] = str(workdir)
        return report
    finally:
        chaos_stop.set()
        if gateway is not None:
            gateway.close()
        rig.close()
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _start_chaos(rig: Rig, options: FleetOptions, rng: random.Random,
                 stop: threading.Event) -> threading.Thread | None:
    """Cycle through the requested kinds, one event every ~chaos_interval seconds (with
    jitter), from the first enrollment until the revocation notices are in."""
    if not options.chaos:
        return None

    def loop() -> None:
        kinds = list(options.chaos)
        rng.shuffle(kinds)
        turn = 0
        while not stop.wait(options.chaos_interval * (0.5 + rng.random())):
            rig.chaos(kinds[turn % len(kinds)])
            turn += 1

    thread = threading.Thread(target=loop, name="chaos", daemon=True)
    thread.start()
    return thread


def _finish_chaos(rig: Rig, options: FleetOptions, stop: threading.Event,
                  thread: threading.Thread | None) -> None:
    """Stop the chaos; a kind that never came up (a short run) happens once now, and the
    invariants are checked after everything is back."""
    stop.set()
    if thread is not None:
        thread.join(60)
    for kind in options.chaos:
        if rig.restarts[kind] == 0:
            rig.chaos(kind)
    rig.wait_settled()


def _roles(options: FleetOptions, rng: random.Random) -> list[str]:
    roles = (["good"] * options.devices + ["rogue"] * options.rogue
             + ["tampered"] * options.tampered + ["flaky"] * options.flaky)
    rng.shuffle(roles)
    return roles


def _run_devices(rig: Rig, workdir: Path, options: FleetOptions, progress: Progress,
                 rng: random.Random) -> list[DeviceResult]:
    roles = _roles(options, rng)
    results: list[DeviceResult] = []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(options.concurrency,
                                                mp_context=context) as pool:
        futures = [pool.submit(device_worker, index, role, rig.instance.url,
                               str(rig.instance.trust_anchor),
                               str(workdir / ("unknown-vendor" if role == "rogue"
                                              else "vendor")),
                               str(workdir / "tpms")) for index, role in enumerate(roles)]
        for future in concurrent.futures.as_completed(futures):
            results.append(future.result())
            unexpected = sum(1 for r in results if r.error != EXPECTED[r.role])
            progress(f"devices {len(results)}/{len(roles)} (unexpected outcomes "
                     f"{unexpected})", len(results) == len(roles))
    return sorted(results, key=lambda r: r.index)


def _try_revoked(rig: Rig, workdir: Path, options: FleetOptions,
                 victims: list[DeviceResult]) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(options.concurrency,
                                                mp_context=context) as pool:
        for code in pool.map(revoked_worker, [v.index for v in victims],
                             [rig.instance.url] * len(victims),
                             [str(rig.instance.trust_anchor)] * len(victims),
                             [str(workdir / "tpms")] * len(victims)):
            outcomes[code] = outcomes.get(code, 0) + 1
    return outcomes


def _forge(rig: Rig, targets: list[DeviceResult]) -> int:
    """Forged revocations of healthy devices, signed by a CA nobody trusts, published on
    the fleet topic with the relay's own broker account (the worst case: a leaked
    publisher credential). The gateway must reject every one (SECURITY-CHECKLIST 25)."""
    import datetime as dt

    import paho.mqtt.client as mqtt
    from cryptography.hazmat.primitives.asymmetric import ec

    from enroll_server.ca.hierarchy import make_root_ca
    from enroll_server.notify.notices import (
        Notice,
        issue_notice_signing_certificate,
        sign_notice,
    )

    now = dt.datetime.now(dt.UTC)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca = make_root_ca(rogue_key, "Rogue")
    signer = ec.generate_private_key(ec.SECP256R1())
    cert = issue_notice_signing_certificate(rogue_key, rogue_ca, signer.public_key(),
                                            dt.timedelta(days=1), now)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fleet-forger",
                         protocol=mqtt.MQTTv311)
    context = ssl.create_default_context(cafile=str(rig.instance.trust_anchor))
    context.load_cert_chain(rig.instance.dir / "mqtt/publisher.pem",
                            rig.instance.dir / "mqtt/publisher.key")
    client.tls_set_context(context)
    client.connect("localhost", rig.broker_port)
    client.loop_start()
    try:
        for number, target in enumerate(targets, start=1):
            notice = Notice(device_id=target.device_id, type="revocation", serial="1",
                            sequence=10**6 + number, issued_at=now,
                            expires_at=now + dt.timedelta(days=1), group=GROUP,
                            reason="keyCompromise")
            client.publish(f"fleet/{GROUP}/revocations",
                           sign_notice(notice, signer, [cert, rogue_ca]),
                           qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    return len(targets)


def _revoke(rig: Rig, gateway: Gateway, victims: list[DeviceResult],
            progress: Progress) -> list[float]:
    credential = rig.instance.operator_credential
    context = ssl.create_default_context(cafile=str(rig.instance.trust_anchor))
    started: dict[str, float] = {}
    with httpx.Client(verify=context, timeout=60) as client:
        for victim in victims:
            started[victim.device_id] = time.monotonic()
            for _attempt in range(20):
                try:
                    response = client.post(
                        rig.instance.url + "/api/v1/revocations",
                        json={"device_id": victim.device_id, "reason": "keyCompromise"},
                        headers={"Authorization": f"Bearer {credential}"})
                except httpx.TransportError:
                    time.sleep(0.5)
                    continue
                if response.status_code == 200:
                    break
                time.sleep(0.5)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(
            v.device_id not in gateway.notices for v in victims):
        progress(f"revocation notices {sum(v.device_id in gateway.notices for v in victims)}"
                 f"/{len(victims)}", False)
        time.sleep(0.1)
    return sorted((gateway.notices[v.device_id] - started[v.device_id]) * 1000
                  for v in victims if v.device_id in gateway.notices)


def _invariants(rig: Rig, results: list[DeviceResult], victims: list[DeviceResult],
                gateway: Gateway) -> dict[str, Any]:
    import sqlite3

    uri = f"file:{rig.instance.dir / 'enroll.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=30) as db:
        devices = dict(db.execute("SELECT device_id, status FROM device WHERE group_id = "
                                  "(SELECT id FROM enrollment_group WHERE name = ?)",
                                  (GROUP,)).fetchall())
        multi_active = db.execute(
            "SELECT COUNT(*) FROM (SELECT device_id FROM certificate WHERE status = 'active' "
            "GROUP BY device_id HAVING COUNT(*) > 1)").fetchone()[0]
        key_twice = db.execute(
            "SELECT COUNT(*) FROM (SELECT public_key_sha256 FROM certificate WHERE "
            "status = 'active' GROUP BY public_key_sha256 HAVING COUNT(*) > 1)").fetchone()[0]
        unsent = db.execute("SELECT COUNT(*) FROM outbox_message WHERE sent_at IS NULL"
                            ).fetchone()[0]
    victim_ids = {v.device_id for v in victims}
    enrolled_ok = all(devices.get(r.device_id) == ("revoked" if r.device_id in victim_ids
                                                   else "active")
                      for r in results if r.enrolled)
    should_enroll = [r for r in results if EXPECTED[r.role] is None]
    refused = [r for r in results if EXPECTED[r.role] is not None]
    return {"all_enrolled": all(r.enrolled and r.renewed for r in should_enroll),
            "refused_as_expected": all(not r.enrolled and r.error == EXPECTED[r.role]
                                       for r in refused),
            "refused_devices_unknown_to_server": len(devices) == len(
                [r for r in results if r.enrolled]),
            "server_agrees": enrolled_ok, "devices_with_two_active_certs": multi_active,
            "keys_with_two_active_certs": key_twice,
            "revoked_notified": sum(v in gateway.notices for v in victim_ids),
            "revoked": len(victim_ids), "outbox_unsent": unsent}


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": round(percentile(ordered, 0.5), 1), "p99": round(percentile(ordered, 0.99), 1),
            "max": round(ordered[-1], 1) if ordered else float("nan")}


def _report(options: FleetOptions, results: list[DeviceResult], victims: list[DeviceResult],
            revoke_latency: list[float], invariants: dict[str, Any], rig: Rig,
            setup_seconds: float, wall_seconds: float, revoke_seconds: float,
            gateway: Gateway) -> dict[str, Any]:
    failures: dict[str, int] = {}
    for result in results:
        if result.error:
            key = f"{result.role}: {result.error}"
            failures[key] = failures.get(key, 0) + 1
    ok = [r for r in results if r.enrolled]
    passed = (invariants["all_enrolled"] and invariants["server_agrees"]
              and invariants["refused_as_expected"]
              and invariants["refused_devices_unknown_to_server"]
              and invariants["devices_with_two_active_certs"] == 0
              and invariants["keys_with_two_active_certs"] == 0
              and invariants["revoked_notified"] == invariants["revoked"]
              and invariants["revoked_reenroll_refused"] == invariants["revoked"]
              and invariants["forged_accepted"] == 0
              and invariants["outbox_unsent"] == 0)
    return {
        "benchmark": "fleet", "machine": machine_info(),
        "options": {"devices": options.devices, "concurrency": options.concurrency,
                    "revoke_fraction": options.revoke_fraction, "chaos": list(options.chaos),
                    "rogue": options.rogue, "tampered": options.tampered,
                    "flaky": options.flaky},
        "succeeded": len(ok), "failed": len(results) - len(ok), "failures": failures,
        "provision_ms": _ms([r.provision_ms for r in ok]),
        "enroll_ms": _ms([r.enroll_ms for r in ok]),
        "renew_ms": _ms([r.renew_ms for r in ok if r.renewed]),
        "revocation_notice_ms": _ms(revoke_latency),
        "swtpm_peak_kib": max((r.swtpm_peak_kib for r in ok), default=0),
        "chaos_events": rig.restarts, "gateway_rejected": len(gateway.rejected),
        "network_drops": sum(r.network_drops for r in results),
        "setup_seconds": round(setup_seconds, 1), "wall_seconds": round(wall_seconds, 1),
        "revocation_seconds": round(revoke_seconds, 1),
        "invariants": invariants, "passed": passed,
    }


def render(report: dict[str, Any]) -> str:
    inv = report["invariants"]
    rows = [
        ("devices enrolled + renewed", f"{report['succeeded']}/"
         f"{report['options']['devices'] + report['options']['flaky']}"),
        ("refusals by role: code", ", ".join(f"{k} x{v}" for k, v in report["failures"].items())
         or "none"),
        ("scenario devices as expected", "yes" if inv["refused_as_expected"] else "NO"),
        ("connections dropped mid-enrollment", str(report["network_drops"])),
        ("provisioning (ms) p50/p99", "{p50} / {p99}".format(**report["provision_ms"])),
        ("first-boot enrollment (ms) p50/p99", "{p50} / {p99}".format(**report["enroll_ms"])),
        ("renewal (ms) p50/p99", "{p50} / {p99}".format(**report["renew_ms"])),
        ("revocation -> notice (ms) p50/p99",
         "{p50} / {p99}".format(**report["revocation_notice_ms"])),
        ("revoked devices notified", f"{inv['revoked_notified']}/{inv['revoked']}"),
        ("forged notices rejected by the gateway",
         f"{inv['forged_notices'] - inv['forged_accepted']}/{inv['forged_notices']}"),
        ("revoked devices refused on re-enrollment",
         f"{inv['revoked_reenroll_refused']}/{inv['revoked']}"),
        ("peak swtpm memory per device", f"{report['swtpm_peak_kib']} KiB"),
        ("chaos events", ", ".join(f"{k} x{v}" for k, v in report["chaos_events"].items()
                                   if v) or "none"),
        ("two active certs (devices / keys)",
         f"{inv['devices_with_two_active_certs']} / {inv['keys_with_two_active_certs']}"),
        ("outbox left unsent", str(inv["outbox_unsent"])),
        ("wall time (set-up)", f"{report['wall_seconds']} s ({report['setup_seconds']} s)"),
        ("result", "PASS" if report["passed"] else "FAIL"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:{width}}  {value}" for name, value in rows)
