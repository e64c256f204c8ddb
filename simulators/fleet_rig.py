"""The processes around a simulated fleet: server, broker, relay (restartable for chaos),
the site gateway that reads the fleet revocation topic, and the firmware constants."""

from __future__ import annotations

import datetime as dt
import os
import signal
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509

from device_sdk.notices import NoticeRejected, verify_notice
from simulators.served import BIN, ServedInstance, free_port, unthrottled

CHAOS_KINDS = ("broker", "server", "relay")
GROUP = "fleet"
GOOD_FIRMWARE = b"fleet firmware image v1.0 (good)"
BAD_FIRMWARE = b"fleet firmware image v1.0 (tampered)"
FIRMWARE_PCR = 13  # firmware-hooks/enroll-device.conf: the PCR the image is measured into


def measure_firmware(tcti_tpm: object, image: bytes) -> None:
    """What firmware-hooks/measure-firmware.sh does: extend H(image) into the PCR."""
    import hashlib

    from tpm2_pytss import ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

    digest = TPMT_HA(hashAlg=TPM2_ALG.SHA256,
                     digest=TPMU_HA(sha256=hashlib.sha256(image).digest()))
    tcti_tpm.esapi.pcr_extend(getattr(ESYS_TR, f"PCR{FIRMWARE_PCR}"),  # type: ignore[attr-defined]
                              TPML_DIGEST_VALUES([digest]))


class Gateway:
    """Reads fleet/<group>/revocations like a site gateway and verifies each notice."""

    def __init__(self, port: int, trust_anchor: Path, cert: Path, key: Path,
                 anchors: list[x509.Certificate]) -> None:
        self.notices: dict[str, float] = {}
        self.rejected: list[str] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fleet-gateway",
                                  clean_session=False, protocol=mqtt.MQTTv311)
        context = ssl.create_default_context(cafile=str(trust_anchor))
        context.load_cert_chain(cert, key)
        self.client.tls_set_context(context)
        self.anchors = anchors
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(
            f"fleet/{GROUP}/revocations", qos=1)
        self.client.on_subscribe = lambda c, u, m, r, p: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect_async("localhost", port, keepalive=30)
        self.client.reconnect_delay_set(0.2, 2)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        import base64
        import json

        token = message.payload.decode(errors="replace")
        try:
            claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
            notice = verify_notice(token, self.anchors, str(claims.get("aud")), None,
                                   dt.datetime.now(dt.UTC))
        except (NoticeRejected, ValueError, IndexError) as error:
            self.rejected.append(getattr(error, "code", "notice.malformed"))
            return
        self.notices.setdefault(notice.device_id, time.monotonic())

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Rig:
    """Server, broker and relay processes of a fleet run, restartable for chaos."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.instance = ServedInstance(env=unthrottled())
        self.broker_port = free_port()
        self.service_port = free_port()  # the relays' listener
        self.broker: subprocess.Popen[bytes] | None = None
        self.relay: subprocess.Popen[bytes] | None = None
        self.restarts = {kind: 0 for kind in CHAOS_KINDS}

    def start(self, roots: Path, manufacturer_dir: Path) -> None:
        self.instance.start()
        self.instance.cli("group", "create", GROUP, "--auth", "tpm", "--ek-roots", str(roots),
                          "--key-types", "ec-p256")
        self.instance.cli("group", "set-pcrs", GROUP, "--pcrread",
                          str(self._reference_pcrs(manufacturer_dir)))
        # --user root: the broker may stay root in a simulation whose private 0700 workdir
        # the mosquitto account could not enter.
        self.instance.cli("broker-config", "--dir", str(self.workdir / "broker"), "--port",
                          str(self.broker_port), "--service-port", str(self.service_port),
                          "--gateway", "fleet-gateway", "--user", "root")
        self.start_broker()
        self.start_relay()

    def _reference_pcrs(self, manufacturer_dir: Path) -> Path:
        """Golden values from a reference device that measured the good firmware."""
        from device_sdk.tpm import TpmDevice
        from simulators.manufacturer import Manufacturer
        from simulators.swtpm import SwtpmInstance

        path = self.workdir / "reference-pcrs.yaml"
        with SwtpmInstance(self.workdir / "reference-tpm") as swtpm:
            Manufacturer.load(manufacturer_dir).provision(swtpm.tcti)
            with TpmDevice(swtpm.tcti) as tpm:
                measure_firmware(tpm, GOOD_FIRMWARE)
            path.write_text(subprocess.run(
                ["tpm2_pcrread", f"sha256:{FIRMWARE_PCR}"], capture_output=True, text=True,
                check=True, env={**os.environ, "TPM2TOOLS_TCTI": swtpm.tcti}).stdout)
        return path

    def start_broker(self) -> None:
        self.broker = subprocess.Popen(
            ["mosquitto", "-c", str(self.workdir / "broker" / "mosquitto.conf")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)

    def start_relay(self) -> None:
        log = open(self.workdir / "relay.log", "ab")  # noqa: SIM115 - owned by the process
        self.relay = subprocess.Popen(
            [str(BIN / "enroll-server"), "--config", str(self.instance.config), "relay"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.instance.env},
            start_new_session=True)
        log.close()

    def chaos(self, kind: str) -> None:
        if kind == "broker":
            _stop(self.broker)
            time.sleep(0.5)
            self.start_broker()
        elif kind == "server":
            self.instance.stop()
            time.sleep(0.5)
            self.instance.start()
        elif kind == "relay":
            if self.relay is not None:
                self.relay.kill()  # SIGKILL: leases are left behind, by design
                self.relay.wait(10)
            self.start_relay()
        self.restarts[kind] += 1

    def wait_settled(self, timeout: float = 60.0) -> None:
        """After chaos: the server answers and the relay has emptied the outbox."""
        import sqlite3

        deadline = time.monotonic() + timeout
        uri = f"file:{self.instance.dir / 'enroll.db'}?mode=ro"
        while time.monotonic() < deadline:
            with sqlite3.connect(uri, uri=True, timeout=30) as db:
                if not db.execute("SELECT COUNT(*) FROM outbox_message WHERE sent_at IS "
                                  "NULL").fetchone()[0]:
                    return
            time.sleep(0.2)

    def close(self) -> None:
        _stop(self.relay)
        _stop(self.broker)
        self.instance.cleanup()


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def gateway_credentials(rig: Rig) -> tuple[Path, Path]:
    """A certificate for CN fleet-gateway, enrolled over EST like any client."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from device_sdk.est import EstClient

    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "fleet-gateway")])).sign(key, hashes.SHA256())
    token = rig.instance.token("default")
    with EstClient(rig.instance.url, rig.instance.trust_anchor) as client:
        certificate = client.simpleenroll(csr, token=token)
    cert_path, key_path = rig.workdir / "gateway.pem", rig.workdir / "gateway.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


