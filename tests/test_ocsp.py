"""OCSP (RFC 6960) with enroll_server.ca.ocsp, driven by real `openssl ocsp` requests and
checked by openssl's own response verification; plus one CRL + OCSP run on SoftHSM."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from enroll_server.ca.crl import RevokedEntry, build_crl
from enroll_server.ca.hierarchy import make_root_ca
from enroll_server.ca.keys import Pkcs11PrivateKey, generate_pkcs11_ec_key
from enroll_server.ca.ocsp import (
    OcspRequestError,
    OcspResponder,
    issue_ocsp_responder_certificate,
    malformed_request_response,
    parse_ocsp_request,
    unauthorized_response,
)
from enroll_server.ca.profiles import CertProfile, revocation_urls
from enroll_server.ca.signer import Signer
from enroll_server.ca.softhsm import init_softhsm_token
from enroll_server.errors import SignerUnavailable, StoreUnavailable

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
GOOD = ocsp.OCSPCertStatus.GOOD
REVOKED = ocsp.OCSPCertStatus.REVOKED
UNKNOWN = ocsp.OCSPCertStatus.UNKNOWN


def _pem(path: Path, certificate: x509.Certificate) -> Path:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


def _openssl(*args: str | Path) -> tuple[int, str]:
    result = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                            check=False)
    return result.returncode, result.stdout + result.stderr


@dataclass
class StatusBook:
    """The status lookup the database would provide: issued serials, some revoked."""

    issued: set[int] = field(default_factory=set)
    revoked: dict[int, tuple[dt.datetime, x509.ReasonFlags | None]] = field(default_factory=dict)
    calls: int = 0

    def lookup(self, serial: int) -> tuple[ocsp.OCSPCertStatus, dt.datetime | None,
                                           x509.ReasonFlags | None]:
        self.calls += 1
        if serial in self.revoked:
            return (REVOKED, *self.revoked[serial])
        return (GOOD, None, None) if serial in self.issued else (UNKNOWN, None, None)


class Pki:
    """An EC P-256 CA with a delegated OCSP responder, device certificates as PEM files."""

    def __init__(self, directory: Path, organization: str, ca_key: object = None) -> None:
        self.directory = directory
        self.ca_key = ca_key or ec.generate_private_key(ec.SECP256R1())
        self.ca = make_root_ca(self.ca_key, organization)  # type: ignore[arg-type]
        self.ca_pem = _pem(directory / f"{organization}-ca.pem", self.ca)
        self.responder_key = ec.generate_private_key(ec.SECP256R1())
        self.responder = issue_ocsp_responder_certificate(
            self.ca_key, self.ca, self.responder_key.public_key(), dt.timedelta(days=2),
            dt.datetime.now(dt.UTC))
        self.responder_pem = _pem(directory / f"{organization}-responder.pem", self.responder)
        self.book = StatusBook()

    def issue(self, device_id: str) -> tuple[x509.Certificate, Path]:
        profile = CertProfile(device_id=device_id, group="sensors",
                              lifetime=dt.timedelta(days=30), backdate=dt.timedelta(minutes=5),
                              **revocation_urls("https://enroll.example"))
        certificate = Signer(self.ca, self.ca_key).issue(  # type: ignore[arg-type]
            ec.generate_private_key(ec.SECP256R1()).public_key(), profile)
        self.book.issued.add(certificate.serial_number)
        return certificate, _pem(self.directory / f"{device_id}.pem", certificate)

    def ocsp_responder(self, **options: object) -> OcspResponder:
        return OcspResponder(self.ca, self.responder, self.responder_key, self.book.lookup,
                             **options)  # type: ignore[arg-type]

    def openssl_request(self, certificate_pem: Path, *options: str) -> bytes:
        """What `openssl ocsp` sends for certificate_pem (SHA-1 CertID and a nonce unless
        options say otherwise)."""
        request_path = self.directory / f"{uuid.uuid4().hex}.req"
        code, output = _openssl("ocsp", *options, "-issuer", self.ca_pem, "-cert",
                                certificate_pem, "-reqout", request_path)
        assert code == 0, output
        return request_path.read_bytes()

    def openssl_check(self, response_der: bytes, certificate_pem: Path, *trust: str | Path
                      ) -> str:
        """openssl's reading of a response: the status line(s) and signature check."""
        response_path = self.directory / f"{uuid.uuid4().hex}.resp"
        response_path.write_bytes(response_der)
        _code, output = _openssl("ocsp", "-respin", response_path, "-issuer", self.ca_pem,
                                 "-cert", certificate_pem, "-no_nonce", "-resp_text",
                                 *(trust or ("-CAfile", self.ca_pem)))
        return output


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path, "OCSP Test")


def test_responder_certificate_is_a_delegated_ocsp_signer(pki: Pki) -> None:
    code, output = _openssl("verify", "-CAfile", pki.ca_pem, "-purpose", "ocsphelper",
                            pki.responder_pem)
    assert code == 0, output

    extensions = pki.responder.extensions
    assert extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING])
    assert not extensions.get_extension_for_class(x509.OCSPNoCheck).critical
    usage = extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.crl_sign
    assert not extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier \
        == pki.ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    lifetime = pki.responder.not_valid_after_utc - pki.responder.not_valid_before_utc
    assert lifetime <= dt.timedelta(days=2, minutes=5)


def test_parser_accepts_openssl_requests_and_names_their_cert_ids(pki: Pki) -> None:
    device, device_pem = pki.issue("dev-parse")
    _other, other_pem = pki.issue("dev-parse-2")
    probe = ocsp.OCSPRequestBuilder().add_certificate(device, pki.ca, hashes.SHA256()).build()

    (sha1_id,) = parse_ocsp_request(pki.openssl_request(device_pem))
    (sha256_id,) = parse_ocsp_request(pki.openssl_request(device_pem, "-sha256"))
    code, output = _openssl("ocsp", "-issuer", pki.ca_pem, "-cert", device_pem, "-cert",
                            other_pem, "-reqout", pki.directory / "two.req")
    assert code == 0, output
    two = parse_ocsp_request((pki.directory / "two.req").read_bytes())

    assert sha1_id.serial == device.serial_number
    assert sha1_id.hash_algorithm.name == "sha1" and len(sha1_id.issuer_key_hash) == 20
    assert (sha256_id.serial, sha256_id.issuer_name_hash, sha256_id.issuer_key_hash) == \
        (device.serial_number, probe.issuer_name_hash, probe.issuer_key_hash)
    assert [cert_id.serial for cert_id in two] == [device.serial_number, _other.serial_number]
    assert two[0] == sha1_id._replace(hash_algorithm=two[0].hash_algorithm)


@pytest.mark.parametrize("junk", [b"", b"not asn.1", b"\x30\x03\x02\x01\x00",
                                  b"\x30\x80" + b"\x00" * 4], ids=["empty", "text", "int", "ber"])
def test_junk_is_a_typed_error_and_answered_malformed_request(pki: Pki, junk: bytes) -> None:
    with pytest.raises(OcspRequestError) as raised:
        parse_ocsp_request(junk)
    assert raised.value.code == "ocsp.malformed"
    assert isinstance(raised.value, ValueError)

    response = ocsp.load_der_ocsp_response(pki.ocsp_responder().respond(junk))

    assert response.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_openssl_reports_good_revoked_with_reason_and_unknown(pki: Pki) -> None:
    good, good_pem = pki.issue("dev-good")
    revoked, revoked_pem = pki.issue("dev-revoked")
    never_issued, never_issued_pem = pki.issue("dev-forgotten")
    pki.book.issued.discard(never_issued.serial_number)  # not in our records
    revoked_at = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
    pki.book.revoked[revoked.serial_number] = (revoked_at, x509.ReasonFlags.key_compromise)
    responder = pki.ocsp_responder()

    answers = {name: pki.openssl_check(responder.respond(pki.openssl_request(pem)), pem)
               for name, pem in [("good", good_pem), ("revoked", revoked_pem),
                                 ("unknown", never_issued_pem)]}

    for answer in answers.values():
        assert "Response verify OK" in answer
        assert "Responder Id: " + pki.responder.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier).value.digest.hex().upper() in answer  # byKey
        assert "Next Update: " in answer
    assert f"{good_pem}: good" in answers["good"]
    assert f"{revoked_pem}: revoked" in answers["revoked"]
    assert "Reason: keyCompromise" in answers["revoked"]
    assert "Revocation Time: Mar  1 12:00:00 2025 GMT" in answers["revoked"]
    assert f"{never_issued_pem}: unknown" in answers["unknown"]


def test_request_about_another_issuer_is_answered_unknown(pki: Pki, tmp_path: Path) -> None:
    foreign = Pki(tmp_path, "Someone Else")
    foreign_device, foreign_pem = foreign.issue("dev-foreign")
    pki.book.issued.add(foreign_device.serial_number)  # same serial must not matter
    responder = pki.ocsp_responder()
    request = foreign.openssl_request(foreign_pem)
    calls = pki.book.calls

    response = responder.respond(request)

    # Our responder is not the foreign CA's: trust it explicitly (-VAfile) to read it.
    answer = foreign.openssl_check(response, foreign_pem, "-VAfile", pki.responder_pem)
    assert "Response verify OK" in answer
    assert f"{foreign_pem}: unknown" in answer
    assert pki.book.calls == calls  # the foreign serial never reached our records


def test_nonce_is_echoed_and_every_nonce_request_is_signed_fresh(pki: Pki) -> None:
    _device, device_pem = pki.issue("dev-nonce")
    responder = pki.ocsp_responder()
    request = pki.openssl_request(device_pem)  # openssl adds a 16-octet nonce by default
    (request_path := pki.directory / "nonce.req").write_bytes(request)

    first = responder.respond(request)
    second = responder.respond(request)

    request_nonce = ocsp.load_der_ocsp_request(request).extensions.get_extension_for_class(
        x509.OCSPNonce).value.nonce
    for response in (first, second):
        response_nonce = ocsp.load_der_ocsp_response(response).extensions \
            .get_extension_for_class(x509.OCSPNonce).value.nonce
        assert response_nonce == request_nonce
    assert responder.signed_responses == 2 and responder.cache_hits == 0
    (response_path := pki.directory / "nonce.resp").write_bytes(first)
    code, output = _openssl("ocsp", "-reqin", request_path, "-respin", response_path,
                            "-CAfile", pki.ca_pem)  # checks the nonce against the request
    assert code == 0, output
    assert "Response verify OK" in output
    assert "Nonce Verify error" not in output and "no nonce" not in output


def test_nonce_longer_than_32_octets_is_malformed(pki: Pki) -> None:
    device, _pem_path = pki.issue("dev-long-nonce")
    request = (ocsp.OCSPRequestBuilder().add_certificate(device, pki.ca, hashes.SHA1())
               .add_extension(x509.OCSPNonce(b"n" * 33), critical=False).build()
               .public_bytes(serialization.Encoding.DER))

    with pytest.raises(OcspRequestError) as raised:
        parse_ocsp_request(request)
    response = ocsp.load_der_ocsp_response(pki.ocsp_responder().respond(request))

    assert raised.value.code == "ocsp.bad_nonce"
    assert response.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_request_for_two_certificates_is_malformed(pki: Pki) -> None:
    _first, first_pem = pki.issue("dev-one")
    _second, second_pem = pki.issue("dev-two")
    code, output = _openssl("ocsp", "-issuer", pki.ca_pem, "-cert", first_pem, "-cert",
                            second_pem, "-reqout", pki.directory / "two.req")
    assert code == 0, output
    responder = pki.ocsp_responder()

    response = ocsp.load_der_ocsp_response(
        responder.respond((pki.directory / "two.req").read_bytes()))

    assert response.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    assert responder.signed_responses == 0


def test_unsuccessful_response_builders_carry_only_their_status() -> None:
    for der, status in [(malformed_request_response(), ocsp.OCSPResponseStatus.MALFORMED_REQUEST),
                        (unauthorized_response(), ocsp.OCSPResponseStatus.UNAUTHORIZED)]:
        assert ocsp.load_der_ocsp_response(der).response_status is status


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


def test_repeated_requests_are_served_from_cache_until_the_refresh_point(pki: Pki) -> None:
    _device, device_pem = pki.issue("dev-cached")
    clock = Clock()
    responder = pki.ocsp_responder(validity=dt.timedelta(hours=1), refresh_fraction=0.5,
                                   clock=clock)
    request = pki.openssl_request(device_pem, "-no_nonce")

    first = responder.respond(request)
    clock.now += dt.timedelta(minutes=29)
    cached = responder.respond(request)
    clock.now += dt.timedelta(minutes=2)
    refreshed = responder.respond(request)

    assert cached == first
    assert refreshed != first
    assert responder.signed_responses == 2 and responder.cache_hits == 1
    single = ocsp.load_der_ocsp_response(refreshed)
    assert single.this_update_utc == clock.now.replace(microsecond=0)
    assert single.next_update_utc - single.this_update_utc == dt.timedelta(hours=1)


def test_revocation_is_never_answered_with_a_cached_good(pki: Pki) -> None:
    device, device_pem = pki.issue("dev-to-revoke")
    responder = pki.ocsp_responder()
    request = pki.openssl_request(device_pem, "-no_nonce")
    assert f"{device_pem}: good" in pki.openssl_check(responder.respond(request), device_pem)
    assert responder.respond(request) and responder.cache_hits == 1

    pki.book.revoked[device.serial_number] = (dt.datetime.now(dt.UTC),
                                              x509.ReasonFlags.superseded)
    responder.invalidate(device.serial_number)
    after = responder.respond(request)
    again = responder.respond(request)

    for answer in (after, again):
        text = pki.openssl_check(answer, device_pem)
        assert f"{device_pem}: revoked" in text and "Reason: superseded" in text
    assert again == after  # the revoked answer is cached in turn


def test_invalidate_forgets_every_cached_response_for_the_serial(pki: Pki) -> None:
    device, device_pem = pki.issue("dev-invalidate")
    _other, other_pem = pki.issue("dev-bystander")
    responder = pki.ocsp_responder()
    requests = [pki.openssl_request(device_pem, "-no_nonce"),
                pki.openssl_request(device_pem, "-no_nonce", "-sha256")]
    bystander = pki.openssl_request(other_pem, "-no_nonce")
    for request in [*requests, bystander]:
        responder.respond(request)
    assert responder.signed_responses == 3

    responder.invalidate(device.serial_number)
    for request in [*requests, bystander]:
        responder.respond(request)

    assert responder.signed_responses == 5  # both CertID forms re-signed, bystander cached
    assert responder.cache_hits == 1


class OutageKey(ec.EllipticCurvePrivateKey):
    """A software key that fails like an unplugged HSM while `down` is set."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key
        self.down = False

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if self.down:
            raise SignerUnavailable(retry_after=2, detail="C_Sign: DeviceRemoved")
        return self._key.sign(data, signature_algorithm)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    curve = property(lambda self: self._key.curve)
    key_size = property(lambda self: self._key.key_size)

    def exchange(self, *args: object) -> bytes:
        raise NotImplementedError

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise NotImplementedError

    def private_bytes(self, *args: object) -> bytes:
        raise NotImplementedError

    def __copy__(self) -> OutageKey:
        return self

    def __deepcopy__(self, memo: dict) -> OutageKey:
        return self


def test_signer_outage_serves_cached_answers_until_next_update_then_try_later(pki: Pki) -> None:
    _device, device_pem = pki.issue("dev-outage")
    key = OutageKey(pki.responder_key)
    clock = Clock()
    responder = OcspResponder(pki.ca, pki.responder, key, pki.book.lookup, clock=clock,
                              validity=dt.timedelta(hours=1), refresh_fraction=0.5)
    plain = pki.openssl_request(device_pem, "-no_nonce")
    with_nonce = pki.openssl_request(device_pem)
    signed = responder.respond(plain)

    key.down = True
    clock.now += dt.timedelta(minutes=45)  # past the refresh point, before nextUpdate
    during = responder.respond(plain)
    nonce_during = ocsp.load_der_ocsp_response(responder.respond(with_nonce))
    clock.now += dt.timedelta(minutes=20)  # past nextUpdate
    expired = ocsp.load_der_ocsp_response(responder.respond(plain))

    assert during == signed
    assert nonce_during.response_status is ocsp.OCSPResponseStatus.TRY_LATER
    assert expired.response_status is ocsp.OCSPResponseStatus.TRY_LATER
    assert responder.last_error is not None and "DeviceRemoved" in responder.last_error
    key.down = False
    assert "good" in pki.openssl_check(responder.respond(plain), device_pem)


def test_status_store_outage_is_answered_try_later(pki: Pki) -> None:
    _device, device_pem = pki.issue("dev-store-down")

    def store_down(serial: int) -> tuple[ocsp.OCSPCertStatus, None, None]:
        raise StoreUnavailable(detail="database is locked")

    responder = OcspResponder(pki.ca, pki.responder, pki.responder_key, store_down)
    response = ocsp.load_der_ocsp_response(
        responder.respond(pki.openssl_request(device_pem, "-no_nonce")))

    assert response.response_status is ocsp.OCSPResponseStatus.TRY_LATER
    assert responder.signed_responses == 0
    assert "database is locked" in (responder.last_error or "")


def test_expired_responder_certificate_answers_try_later_not_a_dead_signature(
        pki: Pki) -> None:
    _device, device_pem = pki.issue("dev-late")
    clock = Clock()
    responder = pki.ocsp_responder(clock=clock)
    request = pki.openssl_request(device_pem, "-no_nonce")
    assert "good" in pki.openssl_check(responder.respond(request), device_pem)

    clock.now = pki.responder.not_valid_after_utc + dt.timedelta(seconds=1)
    response = ocsp.load_der_ocsp_response(responder.respond(request))

    assert response.response_status is ocsp.OCSPResponseStatus.TRY_LATER
    assert "ocsp.responder_expired" in (responder.last_error or "")


def test_responder_refuses_a_certificate_that_is_not_an_ocsp_signer(pki: Pki) -> None:
    device, _pem_path = pki.issue("dev-not-a-responder")
    device_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError, match="does not belong"):
        OcspResponder(pki.ca, device, device_key, pki.book.lookup)
    other = Pki(pki.directory, "Other CA")
    with pytest.raises(ValueError, match="not a delegated responder"):
        OcspResponder(pki.ca, other.responder, other.responder_key, pki.book.lookup)


@pytest.mark.integration
def test_crl_and_ocsp_response_signed_by_a_softhsm_key_verify_in_openssl(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing SoftHSM is a failure, never a skip (`make test` installs it)."""
    assert SOFTHSM_MODULE.exists() and shutil.which("softhsm2-util"), \
        "SoftHSM2 is not installed (apt-get install softhsm2)"
    conf = tmp_path / "softhsm2.conf"
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    label, pin = f"revocation-{uuid.uuid4().hex[:8]}", "user-pin-2718"
    init_softhsm_token(conf, tmp_path / "tokens", label, pin, "so-pin-3141")
    generate_pkcs11_ec_key(SOFTHSM_MODULE, label, "issuing-ca", pin)
    hsm_key = Pkcs11PrivateKey(SOFTHSM_MODULE, label, "issuing-ca", pin)
    pki = Pki(tmp_path, "HSM CA", ca_key=hsm_key)
    good, good_pem = pki.issue("dev-hsm-good")
    revoked, revoked_pem = pki.issue("dev-hsm-revoked")
    now = dt.datetime.now(dt.UTC)
    pki.book.revoked[revoked.serial_number] = (now, x509.ReasonFlags.key_compromise)

    crl_der = build_crl(hsm_key, pki.ca, [RevokedEntry(revoked.serial_number, now,
                                                       x509.ReasonFlags.key_compromise)],
                        1, now, now + dt.timedelta(hours=6))
    crl = x509.load_der_x509_crl(crl_der)
    (crl_pem := tmp_path / "hsm.crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    # The CA itself as responder: the OCSP response is signed inside the token too.
    responder = OcspResponder(pki.ca, pki.ca, hsm_key, pki.book.lookup)
    answers = {pem: pki.openssl_check(responder.respond(pki.openssl_request(pem)), pem)
               for pem in (good_pem, revoked_pem)}

    assert crl.is_signature_valid(hsm_key.public_key())
    code, output = _openssl("verify", "-crl_check", "-CAfile", pki.ca_pem, "-CRLfile", crl_pem,
                            revoked_pem)
    assert code != 0 and "certificate revoked" in output
    code, output = _openssl("verify", "-crl_check", "-CAfile", pki.ca_pem, "-CRLfile", crl_pem,
                            good_pem)
    assert code == 0, output
    assert "Response verify OK" in answers[good_pem] and f"{good_pem}: good" in answers[good_pem]
    assert "Response verify OK" in answers[revoked_pem]
    assert f"{revoked_pem}: revoked" in answers[revoked_pem]
    assert responder.signed_responses == 2 and hsm_key.connect_attempts == 1
