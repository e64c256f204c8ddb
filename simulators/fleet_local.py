"""The fleet against a private instance it starts itself, with chaos: the server, the
broker and the relay restart (the relay by SIGKILL) while devices enroll and while the
revocation notices go out. A gateway (an MQTT client with its own certificate, allowed
to read `fleet/<group>/revocations`) must receive a verified notice for each revoked
device and reject forged ones; the database must hold no device or key with two active
certificates and an empty outbox at the end.
"""

from __future__ import annotations

import datetime as dt
import random
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from cryptography import x509

from .bench_report import Progress
from .deployment import Deployment
from .fleet_devices import EXPECTED, DeviceResult
from .fleet_notices import RevocationOutcome
from .fleet_options import FleetOptions
from .fleet_rig import GATEWAY, GOOD_FIRMWARE, GROUP, Gateway, Rig, gateway_credentials
from .fleet_steps import choose_victims, device_jobs, finish_report, readmissions, run_devices
from .operator_api import OperatorApi, OperatorApiError

NOTICE_TIMEOUT = 300.0  # a bound for a loaded machine, not an expectation


def run_local(options: FleetOptions, workdir: Path, progress: Progress) -> dict[str, Any]:
    from .manufacturer import Manufacturer

    rng = random.Random(options.seed)
    started = time.monotonic()
    rig = Rig(workdir)
    gateway: Gateway | None = None
    chaos_stop = threading.Event()
    chaos_thread: threading.Thread | None = None
    try:
        vendor = options.manufacturer or workdir / "vendor"
        manufacturer = Manufacturer.load_or_create(vendor)
        Manufacturer.create(workdir / "unknown-vendor")  # the rogue devices' TPM maker
        roots = workdir / "ek-roots.pem"
        roots.write_text("".join(manufacturer.ca_certificate_pems))
        rig.start(roots, vendor)
        anchors = x509.load_pem_x509_certificates(rig.instance.trust_anchor.read_bytes())
        gateway = Gateway(rig.broker_port, rig.instance.trust_anchor,
                          *gateway_credentials(rig), anchors)
        if not gateway.subscribed.wait(120):
            raise RuntimeError("the fleet gateway could not subscribe to the broker")
        setup_seconds = time.monotonic() - started
        progress("set-up done; devices enrolling", False)
        deployment = Deployment(rig.instance.url, rig.instance.trust_anchor, GROUP)
        jobs = device_jobs(options, rng, deployment, vendor, workdir / "unknown-vendor",
                           workdir, GOOD_FIRMWARE)
        chaos_thread = _start_chaos(rig, options, rng, chaos_stop)
        results = run_devices(jobs, options.concurrency, progress)
        victims = choose_victims(rng, results, options.revoke_fraction)
        victim_ids = {v.device_id for v in victims}
        healthy = [r for r in results if r.enrolled and r.device_id not in victim_ids]
        revocations = _revoke(rig, gateway, victims, progress)
        _finish_chaos(rig, options, chaos_stop, chaos_thread)
        # Forged notices once the broker stays up: each must arrive, and be rejected.
        forged = _forge(rig, healthy[: max(1, len(healthy) // 10)] if healthy else [])
        _wait_for(lambda: len(gateway.rejected) >= forged, NOTICE_TIMEOUT)
        readmitted = readmissions(jobs, victims, options.concurrency)
        invariants = _invariants(rig, results, victims, gateway)
        invariants["forged_notices"] = forged
        invariants["forged_accepted"] = sum(r.device_id in gateway.notices for r in healthy)
        codes = list(readmitted.values())
        invariants["revoked_reenroll_refused"] = codes.count("device.revoked")
        invariants["revoked_reenroll_outcomes"] = {c: codes.count(c) for c in set(codes)}
        report = finish_report(options, results, revocations, readmitted,
                               _checks(invariants), invariants, started, setup_seconds)
        report["chaos_events"] = rig.restarts
        report["gateway_rejected"] = len(gateway.rejected)
        return report
    finally:
        chaos_stop.set()
        if chaos_thread is not None:  # or it may restart a process after rig.close()
            chaos_thread.join(60)
        if gateway is not None:
            gateway.close()
        rig.close()


def _wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


def _checks(inv: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    return {
        "server_agrees": (inv["server_agrees"], "the database shows every enrolled device "
                          "active, every revoked one revoked"),
        "refused_devices_unknown_to_server": (inv["refused_devices_unknown_to_server"],
                                              "a refused device left no device row"),
        "one_active_certificate_per_device": (inv["devices_with_two_active_certs"] == 0,
                                              f"{inv['devices_with_two_active_certs']} "
                                              "devices hold two"),
        "one_active_certificate_per_key": (inv["keys_with_two_active_certs"] == 0,
                                           f"{inv['keys_with_two_active_certs']} keys "
                                           "hold two"),
        "forged_notices_rejected": (inv["forged_accepted"] == 0,
                                    f"{inv['forged_accepted']} of {inv['forged_notices']} "
                                    "forged revocations accepted by the gateway"),
        "outbox_empty": (inv["outbox_unsent"] == 0, f"{inv['outbox_unsent']} unsent"),
    }


def _start_chaos(rig: Rig, options: FleetOptions, rng: random.Random,
                 stop: threading.Event) -> threading.Thread | None:
    """Cycle through the requested kinds, one event every ~chaos_interval seconds (with
    jitter), from the first enrollment until the revocation notices are in."""
    if not options.chaos:
        return None
    rng_local = random.Random(rng.random())  # its own stream: the seed stays reproducible

    def loop() -> None:
        kinds = list(options.chaos)
        rng_local.shuffle(kinds)
        turn = 0
        while not stop.wait(options.chaos_interval * (0.5 + rng_local.random())):
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
        thread.join(120)
    for kind in options.chaos:
        if rig.restarts[kind] == 0:
            rig.chaos(kind)
    rig.wait_settled()


def _forge(rig: Rig, targets: list[DeviceResult]) -> int:
    """Forged revocations of healthy devices, signed by a CA nobody trusts, published on
    the fleet topic with the relay's own broker identity (the worst case: a leaked
    relay key). The gateway must reject every one (SECURITY-CHECKLIST 25)."""
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
    assert rig.loop is not None
    context.load_cert_chain(*rig.loop.relay_identity)
    client.tls_set_context(context)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, reason, p: (
        connected.set() if not reason.is_failure else None)
    client.reconnect_delay_set(0.2, 2)  # a broker restart may be under way
    client.connect_async("localhost", rig.loop.service_port)
    client.loop_start()
    try:
        if not connected.wait(60):
            raise RuntimeError("the forger could not reach the broker's service listener")
        for number, target in enumerate(targets, start=1):
            notice = Notice(device_id=target.device_id, type="revocation", serial="1",
                            sequence=10**6 + number, issued_at=now,
                            expires_at=now + dt.timedelta(days=1), group=GROUP,
                            reason="keyCompromise")
            client.publish(f"fleet/{GROUP}/revocations",
                           sign_notice(notice, signer, [cert, rogue_ca]),
                           qos=1).wait_for_publish(60)
    finally:
        client.disconnect()
        client.loop_stop()
    return len(targets)


def _revoke(rig: Rig, gateway: Gateway, victims: list[DeviceResult],
            progress: Progress) -> dict[str, RevocationOutcome]:
    """Revoke through the operator API (retrying while chaos restarts the server), then
    wait for each notice at the gateway: until all are in, or NOTICE_TIMEOUT."""
    credential = rig.instance.operator_token
    outcomes: dict[str, RevocationOutcome] = {}
    called: dict[str, float] = {}
    with OperatorApi(rig.instance.url, rig.instance.trust_anchor, credential) as api:
        for victim in victims:
            outcome = RevocationOutcome(victim.device_id, checked_at="gateway")
            called[victim.device_id] = time.monotonic()
            try:
                api.revoke(victim.device_id)
                outcome.revoked_by_api = True
            except OperatorApiError as error:
                outcome.api_error = error.code or str(error)
            outcomes[victim.device_id] = outcome
    deadline = time.monotonic() + NOTICE_TIMEOUT
    while time.monotonic() < deadline and any(d not in gateway.notices for d in outcomes):
        progress(f"revocation notices {sum(d in gateway.notices for d in outcomes)}"
                 f"/{len(outcomes)}", False)
        time.sleep(0.1)
    for device_id, outcome in outcomes.items():
        if device_id in gateway.notices:
            outcome.notified, outcome.source = True, "notice"
            outcome.latency_ms = round((gateway.notices[device_id] - called[device_id])
                                       * 1000, 1)
        else:
            outcome.detail = f"the {GATEWAY} never saw a verified notice"
    return outcomes


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
