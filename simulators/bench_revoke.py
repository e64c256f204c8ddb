"""`enroll-sim bench revoke`: revocation reaching connected devices, CRL and OCSP rates.

Set-up (not timed): a served instance (SoftHSM CA key, SQLite), `broker-config`, a
Mosquitto with that configuration, `enroll-server relay`; M devices enrolled over EST
(token, software keys) and M MQTT agents connected over mTLS with their certificates,
each subscribed QoS 1 to its notice topic and verifying every notice it gets
(device_sdk.notices: chain to the CA, audience, sequence, expiry).

Timed: a burst of N revocations through the operator API (16 concurrent callers); for
each, the time from the revoke call to the verified notice at its device. Then the CRL
build for 100,000 entries (in process) and OCSP responses per second, both through
HTTPS from several client processes and in process (parse + lookup + cache).

The agents here are lightweight paho clients with software keys, so that 200 of them fit
on this machine beside the server; the TPM-backed agent (device_sdk.agent) verifies
notices with the same function.
"""

from __future__ import annotations

import base64
import concurrent.futures
import datetime as dt
import http.client
import json
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from device_sdk.est import decode_certs_only
from device_sdk.notices import NoticeRejected, verify_notice
from simulators.bench import create_tokens
from simulators.bench_report import Progress, machine_info, no_progress, percentile
from simulators.bench_revocation import bench_crl, bench_ocsp
from simulators.bench_rig import ClientPool, Shared
from simulators.broker import NoticeLoop
from simulators.operator_api import OperatorApi, OperatorApiError
from simulators.served import ServedInstance, unthrottled

TARGET_P99_MS = 500.0
TARGET_CRL_SECONDS = 2.0
TARGET_OCSP_PER_SECOND = 5000.0


@dataclass
class Agent:
    device_id: str
    cert: Path
    key: Path
    client: mqtt.Client | None = None
    subscribed: threading.Event = field(default_factory=threading.Event)
    verified_at: float | None = None
    rejected: list[str] = field(default_factory=list)


def _enroll(instance: ServedInstance, tokens: list[str], directory: Path,
            progress: Progress) -> list[Agent]:
    context = ssl.create_default_context(cafile=str(instance.trust_anchor))

    def one(index: int) -> Agent:
        device_id = f"bench-rv-{index:05d}"
        key = ec.generate_private_key(ec.SECP256R1())
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, device_id)])).sign(key, hashes.SHA256())
        with httpx.Client(verify=context, timeout=60) as client:
            response = client.post(
                instance.url + "/.well-known/est/simpleenroll",
                content=base64.encodebytes(csr.public_bytes(serialization.Encoding.DER)),
                headers={"Content-Type": "application/pkcs10",
                         "Authorization": f"Bearer {tokens[index]}"})
        if response.status_code != 200:
            raise RuntimeError(f"enrollment failed: {response.status_code} {response.text}")
        certificate = decode_certs_only(response.content)[0]
        cert_path, key_path = directory / f"{device_id}.pem", directory / f"{device_id}.key"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return Agent(device_id, cert_path, key_path)

    agents: list[Agent] = []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for agent in pool.map(one, range(len(tokens))):
            agents.append(agent)
            progress(f"enrolled {len(agents)}/{len(tokens)} devices", False)
    return agents


def _connect(agent: Agent, port: int, trust_anchor: Path,
             anchors: list[x509.Certificate]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=agent.device_id,
                         clean_session=False, protocol=mqtt.MQTTv311)
    context = ssl.create_default_context(cafile=str(trust_anchor))
    context.load_cert_chain(agent.cert, agent.key)
    client.tls_set_context(context)
    topic = f"fleet/default/devices/{agent.device_id}/notices"

    def on_connect(c, userdata, flags, reason, properties):  # noqa: ANN001
        c.subscribe(topic, qos=1)

    def on_subscribe(c, userdata, mid, reasons, properties):  # noqa: ANN001
        agent.subscribed.set()

    def on_message(c, userdata, message):  # noqa: ANN001
        try:
            verify_notice(message.payload.decode(), anchors, agent.device_id, None,
                          dt.datetime.now(dt.UTC))
        except NoticeRejected as error:
            agent.rejected.append(error.code)
            return
        if agent.verified_at is None:
            agent.verified_at = time.monotonic()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, \
        on_message
    client.connect_async("localhost", port, keepalive=60)
    client.loop_start()
    agent.client = client


def _ocsp_client(host: str, port: int, trust_anchor: str, request_der: bytes,
                 seconds: float, shared: Shared) -> None:
    """One keep-alive HTTPS connection posting the same OCSP request (http.client: the
    client's own overhead stays small next to the server's)."""
    context = ssl.create_default_context(cafile=trust_anchor)
    connection = http.client.HTTPSConnection(host, port, context=context, timeout=30)
    headers = {"Content-Type": "application/ocsp-request"}
    count = errors = 0
    shared.ready()
    deadline = shared.wait_start() + seconds
    while time.monotonic() < deadline:
        connection.request("POST", "/ocsp", body=request_der, headers=headers)
        response = connection.getresponse()
        body = response.read()
        if response.status == 200 and body:
            count += 1
        else:
            errors += 1
    connection.close()
    shared.finished((count, errors))


def _ocsp_over_https(instance: ServedInstance, agents: list[Agent], seconds: float,
                     clients: int) -> dict[str, Any]:
    issuer = x509.load_pem_x509_certificates(instance.trust_anchor.read_bytes())[0]
    leaf = x509.load_pem_x509_certificate(agents[-1].cert.read_bytes())
    request_der = ocsp.OCSPRequestBuilder().add_certificate(
        leaf, issuer, hashes.SHA1()).build().public_bytes(serialization.Encoding.DER)  # noqa: S303
    pool = ClientPool()
    try:
        for _ in range(clients):
            pool.spawn(_ocsp_client, "localhost", instance.port, str(instance.trust_anchor),
                       request_der, seconds)
        pool.wait_ready(timeout=120)
        started = pool.go()
        totals = pool.collect(0, "OCSP", timeout=seconds + 120)
        elapsed = time.monotonic() - started
    finally:
        pool.close()
    answered = sum(count for count, _ in totals)
    return {"clients": clients, "seconds": round(elapsed, 2), "responses": answered,
            "errors": sum(errors for _, errors in totals),
            "per_second": round(answered / elapsed, 1)}


def run_revoke_bench(devices: int = 200, revocations: int = 100, crl_entries: int = 100_000,
                     ocsp_seconds: float = 5.0, ocsp_clients: int = 4,
                     progress: Progress = no_progress) -> dict[str, Any]:
    if not 1 <= revocations <= devices:
        raise ValueError("revocations must be between 1 and the number of devices")
    workdir = Path(tempfile.mkdtemp(prefix="enroll-bench-revoke-"))
    instance = ServedInstance(env=unthrottled())
    loop: NoticeLoop | None = None
    agents: list[Agent] = []
    try:
        instance.start()
        progress("server up; enrolling devices", False)
        from enroll_server.config import load_settings

        settings = load_settings(instance.config, environ=instance.env)
        agents = _enroll(instance, create_tokens(settings, devices), workdir, progress)
        loop = NoticeLoop(instance, workdir).start()
        anchors = x509.load_pem_x509_certificates(instance.trust_anchor.read_bytes())
        for agent in agents:
            _connect(agent, loop.port, instance.trust_anchor, anchors)
        deadline = time.monotonic() + 120
        while sum(a.subscribed.is_set() for a in agents) < len(agents):
            if time.monotonic() > deadline:
                raise RuntimeError("agents did not all subscribe within 120 s")
            progress(f"agents subscribed {sum(a.subscribed.is_set() for a in agents)}"
                     f"/{len(agents)}", False)
            time.sleep(0.2)
        latency = _burst(instance, agents[:revocations], progress)
        progress("CRL build (100k) and OCSP throughput", False)
        crl = bench_crl(crl_entries)
        ocsp_http = _ocsp_over_https(instance, agents, ocsp_seconds, ocsp_clients)
        ocsp_inproc = bench_ocsp(seconds=2.0)
        bystanders_hit = sum(a.verified_at is not None for a in agents[revocations:])
        return _report(devices, revocations, latency, bystanders_hit, crl, ocsp_http,
                       ocsp_inproc)
    finally:
        for agent in agents:
            if agent.client is not None:
                agent.client.loop_stop()
                agent.client.disconnect()
        if loop is not None:
            loop.close()
        instance.cleanup()


def _burst(instance: ServedInstance, victims: list[Agent],
           progress: Progress) -> dict[str, Any]:
    credential = instance.operator_token
    started: dict[str, float] = {}

    def revoke(agent: Agent) -> int:
        with OperatorApi(instance.url, instance.trust_anchor, credential) as api:
            started[agent.device_id] = time.monotonic()
            try:
                api.revoke(agent.device_id)
            except OperatorApiError as error:
                return error.status
            return 200

    burst_started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(revoke, victims))
    api_seconds = time.monotonic() - burst_started
    deadline = time.monotonic() + 60
    while any(a.verified_at is None for a in victims) and time.monotonic() < deadline:
        progress(f"notices verified {sum(a.verified_at is not None for a in victims)}"
                 f"/{len(victims)}", False)
        time.sleep(0.05)
    latencies = sorted((a.verified_at - started[a.device_id]) * 1000 for a in victims
                       if a.verified_at is not None)
    return {"api_ok": statuses.count(200), "api_seconds": round(api_seconds, 3),
            "verified": len(latencies), "missing": len(victims) - len(latencies),
            "rejected": sum(len(a.rejected) for a in victims),
            "p50_ms": round(percentile(latencies, 0.5), 1),
            "p99_ms": round(percentile(latencies, 0.99), 1),
            "max_ms": round(latencies[-1], 1) if latencies else None}


def _report(devices: int, revocations: int, latency: dict[str, Any], bystanders_hit: int,
            crl: dict[str, Any], ocsp_http: dict[str, Any],
            ocsp_inproc: dict[str, Any]) -> dict[str, Any]:
    return {
        "benchmark": "revoke", "machine": machine_info(),
        "agents": devices, "revocations": revocations, "latency": latency,
        "bystanders_notified": bystanders_hit, "crl": crl, "ocsp_https": ocsp_http,
        "ocsp_in_process": ocsp_inproc,
        "targets": {
            "notice_p99_ms": {"target": TARGET_P99_MS, "measured": latency["p99_ms"],
                              "met": latency["missing"] == 0
                              and latency["p99_ms"] < TARGET_P99_MS},
            "crl_100k_seconds": {"target": TARGET_CRL_SECONDS,
                                 "measured": crl["build_seconds"],
                                 "met": crl["build_seconds"] < TARGET_CRL_SECONDS},
            "ocsp_per_second_https": {"target": TARGET_OCSP_PER_SECOND,
                                      "measured": ocsp_http["per_second"],
                                      "met": ocsp_http["per_second"] >= TARGET_OCSP_PER_SECOND},
        },
    }


def render(report: dict[str, Any]) -> str:
    latency, targets = report["latency"], report["targets"]
    lines = [
        f"revocation burst: {report['revocations']} revocations, {report['agents']} agents "
        f"connected",
        f"  API calls ok        {latency['api_ok']}/{report['revocations']} in "
        f"{latency['api_seconds']} s",
        f"  notices verified    {latency['verified']} (missing {latency['missing']}, "
        f"rejected {latency['rejected']}, bystanders notified {report['bystanders_notified']})",
        f"  revoke -> verified  p50 {latency['p50_ms']} ms  p99 {latency['p99_ms']} ms  "
        f"max {latency['max_ms']} ms",
        f"CRL {report['crl']['entries']} entries  build {report['crl']['build_seconds']} s  "
        f"size {report['crl']['size_bytes']} bytes",
        f"OCSP over HTTPS      {report['ocsp_https']['per_second']}/s "
        f"({report['ocsp_https']['clients']} client processes)",
        f"OCSP in process      {json.dumps(report['ocsp_in_process'])}",
        "",
        "target                     measured     target      result",
    ]
    for name, target in targets.items():
        lines.append(f"{name:26} {target['measured']!s:12} {target['target']!s:11} "
                     f"{'PASS' if target['met'] else 'MISS'}")
    return "\n".join(lines)
