"""Signed notices: enroll_server.notify.notices signs, device_sdk.notices verifies.

Real EC CAs generated here, one notice-signing key inside SoftHSM, and joserfc as an
independent verifier and as the forger's tool (SECURITY-CHECKLIST 25).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from joserfc import jws
from joserfc.jwk import ECKey

import device_sdk.notices as sdk
from device_sdk.notices import NoticeRejected, verify_notice
from enroll_server.ca.hierarchy import make_issuing_ca, make_root_ca
from enroll_server.ca.keys import (
    KeyNotExtractable,
    Pkcs11PrivateKey,
    generate_pkcs11_ec_key,
)
from enroll_server.ca.profiles import CertProfile
from enroll_server.ca.signer import Signer
from enroll_server.ca.softhsm import init_softhsm_token
from enroll_server.notify import notices
from enroll_server.notify.notices import (
    NOTICE_SIGNING_EKU,
    Notice,
    fleet_revocation_topic,
    issue_notice_signing_certificate,
    sign_notice,
    topic_for,
)

DEVICE = hashlib.sha256(b"device A").hexdigest()
OTHER_DEVICE = hashlib.sha256(b"device B").hexdigest()
MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
PIN = "user-pin-4711"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


@dataclass
class Pki:
    now: dt.datetime
    root: x509.Certificate
    issuing_key: ec.EllipticCurvePrivateKey
    issuing: x509.Certificate
    notice_key: ec.EllipticCurvePrivateKey
    notice_cert: x509.Certificate

    @property
    def chain(self) -> list[x509.Certificate]:
        return [self.notice_cert, self.issuing]

    def x5c(self, *certificates: x509.Certificate) -> list[str]:
        return [base64.b64encode(der(c)).decode() for c in certificates or self.chain]


@pytest.fixture(scope="module")
def pki() -> Pki:
    """root (P-256) -> issuing CA (P-256) -> notice signer, as hierarchy.py builds them."""
    now = dt.datetime.now(dt.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = make_root_ca(root_key, "Notice Test")
    issuing_key = ec.generate_private_key(ec.SECP256R1())
    issuing = make_issuing_ca(issuing_key.public_key(), root, root_key, "Notice Test")
    notice_key = ec.generate_private_key(ec.SECP256R1())
    notice_cert = issue_notice_signing_certificate(issuing_key, issuing, notice_key.public_key(),
                                                   dt.timedelta(days=30), now)
    return Pki(now, root, issuing_key, issuing, notice_key, notice_cert)


def make_notice(pki: Pki, **changes: object) -> Notice:
    fields: dict = dict(device_id=DEVICE, type="renewal_due", serial="123456789012345678901",
                        sequence=7, issued_at=pki.now - dt.timedelta(minutes=1),
                        expires_at=pki.now + dt.timedelta(days=1), group="sensors",
                        extra={"renew_after": 1_700_000_000})
    fields.update(changes)
    return Notice(**fields)  # type: ignore[arg-type]


def verify(pki: Pki, token: str, device_id: str = DEVICE, last_sequence: int | None = 6,
           now: dt.datetime | None = None, anchors: list | None = None) -> sdk.VerifiedNotice:
    return verify_notice(token, anchors or [pki.root], device_id, last_sequence, now or pki.now)


def rejected(pki: Pki, token: str, **kwargs: object) -> str:
    with pytest.raises(NoticeRejected) as excinfo:
        verify(pki, token, **kwargs)  # type: ignore[arg-type]
    return excinfo.value.code


def forge(header: dict, claims: dict, key: ec.EllipticCurvePrivateKey) -> str:
    """Sign anything with joserfc itself: how an attacker holding some EC key would."""
    registry = jws.JWSRegistry(algorithms=[header["alg"]], strict_check_header=False)
    registry.max_header_length = 16384
    return jws.serialize_compact(header, json.dumps(claims).encode(), ECKey.import_key(key),
                                 registry=registry)


def header_for(pki: Pki, *certificates: x509.Certificate, alg: str = "ES256") -> dict:
    return {"alg": alg, "typ": notices.NOTICE_TYP, "x5c": pki.x5c(*certificates)}


# -- the good path ------------------------------------------------------------------------

def test_signed_notice_verifies_with_every_field(pki: Pki) -> None:
    notice = make_notice(pki, type="revocation", reason="keyCompromise")
    verified = verify(pki, sign_notice(notice, pki.notice_key, pki.chain))
    assert (verified.device_id, verified.type, verified.serial, verified.sequence,
            verified.group, verified.reason, dict(verified.extra)) == (
        DEVICE, "revocation", notice.serial, 7, "sensors", "keyCompromise",
        {"renew_after": 1_700_000_000})
    assert verified.issued_at == notice.issued_at.replace(microsecond=0)
    assert verified.expires_at == notice.expires_at.replace(microsecond=0)
    assert verified.signer == pki.notice_cert


def test_issuing_ca_alone_as_trust_anchor_verifies(pki: Pki) -> None:
    token = sign_notice(make_notice(pki), pki.notice_key, pki.chain)
    assert verify(pki, token, anchors=[pki.issuing]).sequence == 7


def test_first_notice_is_accepted_without_a_last_sequence(pki: Pki) -> None:
    token = sign_notice(make_notice(pki, sequence=0), pki.notice_key, pki.chain)
    assert verify(pki, token, last_sequence=None).sequence == 0


def test_unlisted_header_parameter_is_ignored_and_typ_is_a_media_type(pki: Pki) -> None:
    """RFC 7515 4: unknown parameters outside "crit" are ignored; 4.1.9: typ rules."""
    header = {**header_for(pki), "typ": "Application/TPM-Enroll-Notice+JWT", "x-hint": 1}
    assert verify(pki, forge(header, make_notice(pki).to_claims(), pki.notice_key)).sequence == 7


def test_p384_notice_key_signs_es384(pki: Pki) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    certificate = issue_notice_signing_certificate(pki.issuing_key, pki.issuing,
                                                   key.public_key(), dt.timedelta(days=1), pki.now)
    token = sign_notice(make_notice(pki), key, [certificate, pki.issuing])
    assert jws.extract_compact(token.encode(), registry=sdk._registry(["ES384"])
                               ).protected["alg"] == "ES384"
    assert verify(pki, token).signer == certificate


def test_compact_jws_verifies_with_joserfc_alone(pki: Pki) -> None:
    notice = make_notice(pki, type="ca_rotation")
    token = sign_notice(notice, pki.notice_key, pki.chain)
    registry = jws.JWSRegistry(algorithms=["ES256"])
    registry.max_header_length = 8192  # joserfc's default 512 bytes cannot hold x5c
    verified = jws.deserialize_compact(token, ECKey.import_key(pki.notice_key.public_key()),
                                       registry=registry)
    assert verified.protected["typ"] == "tpm-enroll-notice+jwt"
    assert [base64.b64decode(c) for c in verified.protected["x5c"]] == [
        der(pki.notice_cert), der(pki.issuing)]
    assert json.loads(verified.payload) == notice.to_claims()
    other = ECKey.import_key(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(jws.BadSignatureError):
        jws.deserialize_compact(token, other, registry=registry)


@pytest.mark.integration
def test_notice_signed_by_key_in_softhsm_verifies(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  pki: Pki) -> None:
    """A missing SoftHSM fails here (init_softhsm_token raises), never skips."""
    assert MODULE.exists(), "SoftHSM2 is not installed (apt-get install softhsm2)"
    conf = tmp_path / "softhsm2.conf"
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    label = f"n-{uuid.uuid4().hex[:12]}"
    init_softhsm_token(conf, tmp_path / "tokens", label, PIN, "so-pin-0815")
    public = generate_pkcs11_ec_key(MODULE, label, "notice", PIN)
    key = Pkcs11PrivateKey(MODULE, label, "notice", PIN)
    certificate = issue_notice_signing_certificate(pki.issuing_key, pki.issuing, public,
                                                   dt.timedelta(days=1), pki.now)
    token = sign_notice(make_notice(pki), key, [certificate, pki.issuing])
    assert verify(pki, token).signer == certificate
    # Why sign_notice does the JWS signing step itself: joserfc exports the private key.
    with pytest.raises(KeyNotExtractable):
        jws.serialize_compact({"alg": "ES256"}, b"{}", ECKey.import_key(key))


# -- forgeries ----------------------------------------------------------------------------

def test_notice_signed_by_a_look_alike_ca_is_untrusted(pki: Pki) -> None:
    """Same names and extensions as the real issuing CA, but not signed by the root."""
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(pki.issuing.subject)
               .issuer_name(pki.issuing.issuer).public_key(rogue_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(pki.issuing.not_valid_before_utc)
               .not_valid_after(pki.issuing.not_valid_after_utc))
    for extension in pki.issuing.extensions:
        if not isinstance(extension.value, x509.SubjectKeyIdentifier):
            builder = builder.add_extension(extension.value, critical=extension.critical)
    rogue_ca = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(
        rogue_key.public_key()), critical=False).sign(rogue_key, hashes.SHA256())
    signer_key = ec.generate_private_key(ec.SECP256R1())
    certificate = issue_notice_signing_certificate(rogue_key, rogue_ca, signer_key.public_key(),
                                                   dt.timedelta(days=1), pki.now)
    token = sign_notice(make_notice(pki), signer_key, [certificate, rogue_ca])
    assert rejected(pki, token) == "notice.untrusted_signer"


def test_device_certificate_from_the_same_ca_cannot_sign_notices(pki: Pki) -> None:
    device_key = ec.generate_private_key(ec.SECP256R1())
    profile = CertProfile(device_id=OTHER_DEVICE, group="sensors",
                          lifetime=dt.timedelta(days=30), backdate=dt.timedelta(minutes=5),
                          crl_url="https://ca.test/crl", ocsp_url="https://ca.test/ocsp",
                          ca_issuers_url="https://ca.test/ca.der")
    device_cert = Signer(pki.issuing, pki.issuing_key).issue(device_key.public_key(), profile)
    assert device_cert.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    with pytest.raises(ValueError, match="notice-signing extended key usage"):
        sign_notice(make_notice(pki), device_key, [device_cert, pki.issuing])
    token = forge(header_for(pki, device_cert, pki.issuing), make_notice(pki).to_claims(),
                  device_key)
    assert rejected(pki, token) == "notice.untrusted_signer"


def test_genuine_x5c_with_an_attackers_signature_is_bad_signature(pki: Pki) -> None:
    attacker = ec.generate_private_key(ec.SECP256R1())
    token = forge(header_for(pki), make_notice(pki).to_claims(), attacker)
    assert rejected(pki, token) == "notice.bad_signature"


def test_expired_notice_signing_certificate_is_untrusted(pki: Pki) -> None:
    token = sign_notice(make_notice(pki, expires_at=pki.now + dt.timedelta(days=90)),
                        pki.notice_key, pki.chain)
    assert rejected(pki, token, now=pki.now + dt.timedelta(days=31)) == "notice.untrusted_signer"


def test_missing_intermediate_or_x5c_is_untrusted(pki: Pki) -> None:
    claims = make_notice(pki).to_claims()
    without_issuer = forge(header_for(pki, pki.notice_cert), claims, pki.notice_key)
    assert rejected(pki, without_issuer) == "notice.untrusted_signer"
    no_x5c = forge({"alg": "ES256", "typ": notices.NOTICE_TYP}, claims, pki.notice_key)
    assert rejected(pki, no_x5c) == "notice.untrusted_signer"


@pytest.mark.parametrize("part", ["payload", "header"])
def test_tampered_notice_is_bad_signature(pki: Pki, part: str) -> None:
    header, payload, signature = sign_notice(make_notice(pki), pki.notice_key,
                                             pki.chain).split(".")
    if part == "payload":
        claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
        claims["type"] = "revocation"
        payload = b64url(json.dumps(claims).encode())
    else:
        fields = json.loads(base64.urlsafe_b64decode(header + "=="))
        fields["typ"] = fields["typ"].upper()  # still a notice: typ is case-insensitive
        header = b64url(json.dumps(fields).encode())
    assert rejected(pki, f"{header}.{payload}.{signature}") == "notice.bad_signature"


# -- algorithms ---------------------------------------------------------------------------

@pytest.mark.parametrize("alg", ["none", "None", "HS256", "RS256", "PS256", "ES512", "EdDSA"])
def test_algorithm_outside_es256_es384_is_refused(pki: Pki, alg: str) -> None:
    header = b64url(json.dumps(header_for(pki, alg=alg)).encode())
    payload = b64url(json.dumps(make_notice(pki).to_claims()).encode())
    # The classic confusion: HMAC keyed with the signer's public key (RFC 8725 2.1).
    secret = pki.notice_cert.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    mac = b64url(hmac.new(secret, f"{header}.{payload}".encode(), "sha256").digest())
    signature = "" if alg.lower() == "none" else mac
    assert rejected(pki, f"{header}.{payload}.{signature}") == "notice.bad_alg"


def test_es384_header_over_a_p256_signer_is_bad_alg(pki: Pki) -> None:
    header = b64url(json.dumps(header_for(pki, alg="ES384")).encode())
    _, payload, signature = sign_notice(make_notice(pki), pki.notice_key, pki.chain).split(".")
    assert rejected(pki, f"{header}.{payload}.{signature}") == "notice.bad_alg"


# -- addressing, time, replay, type -------------------------------------------------------

def test_notice_for_another_device_is_wrong_device(pki: Pki) -> None:
    """Also what a device sees of other devices' revocations on the fleet topic."""
    token = sign_notice(make_notice(pki, device_id=OTHER_DEVICE, type="revocation",
                                    reason="superseded"), pki.notice_key, pki.chain)
    assert rejected(pki, token) == "notice.wrong_device"
    assert verify(pki, token, device_id=OTHER_DEVICE).type == "revocation"


def test_notice_is_expired_at_and_after_exp(pki: Pki) -> None:
    notice = make_notice(pki)
    token = sign_notice(notice, pki.notice_key, pki.chain)
    exp = notice.expires_at.replace(microsecond=0)
    assert rejected(pki, token, now=exp) == "notice.expired"
    assert verify(pki, token, now=exp - dt.timedelta(seconds=1)).sequence == 7


@pytest.mark.parametrize("last_sequence", [7, 8, 1000])
def test_same_or_older_sequence_is_replayed(pki: Pki, last_sequence: int) -> None:
    token = sign_notice(make_notice(pki, sequence=7), pki.notice_key, pki.chain)
    assert rejected(pki, token, last_sequence=last_sequence) == "notice.replayed"


def test_unknown_type_signed_by_the_real_signer_is_refused(pki: Pki) -> None:
    with pytest.raises(ValueError, match="unknown notice type"):
        make_notice(pki, type="reboot")
    claims = {**make_notice(pki).to_claims(), "type": "reboot"}
    token = forge(header_for(pki), claims, pki.notice_key)
    assert rejected(pki, token) == "notice.unknown_type"


def test_checks_run_in_the_documented_order(pki: Pki) -> None:
    """Misaddressed beats expired beats replayed; an untrusted signer beats all three."""
    notice = make_notice(pki, device_id=OTHER_DEVICE, sequence=1)
    late = notice.expires_at + dt.timedelta(days=1)
    token = sign_notice(notice, pki.notice_key, pki.chain)
    assert rejected(pki, token, now=late) == "notice.wrong_device"
    assert rejected(pki, token, now=late, device_id=OTHER_DEVICE) == "notice.expired"
    assert rejected(pki, token, now=late, anchors=[make_root_ca(
        ec.generate_private_key(ec.SECP256R1()), "Elsewhere")]) == "notice.untrusted_signer"


# -- junk ---------------------------------------------------------------------------------

def _token(header: object, payload: bytes) -> str:
    return f"{b64url(json.dumps(header).encode())}.{b64url(payload)}.AAAA"


JUNK = [
    "", "   ", "abc", "a.b", "a.b.c", "a.b.c.d", "..", "\x00.\x00.\x00", "é.é.é",
    "A" * 20000,
    _token("ES256", b"{}"),
    _token({"alg": "ES256", "typ": "tpm-enroll-notice+jwt"}, b"[]"),
    _token({"alg": "ES256", "typ": "tpm-enroll-notice+jwt"}, b"not json"),
    _token({"alg": "ES256", "typ": "tpm-enroll-notice+jwt"}, b'{"aud": "x"}'),
    _token({"alg": "ES256", "typ": "tpm-enroll-notice+jwt"}, b'{"exp": NaN}'),
    _token({"alg": "ES256", "typ": "JWT"}, b"{}"),
    _token({"alg": "ES256"}, b"{}"),
    _token({"alg": 256, "typ": "tpm-enroll-notice+jwt"}, b"{}"),
]


@pytest.mark.parametrize("token", JUNK)
def test_junk_is_malformed(pki: Pki, token: str) -> None:
    assert rejected(pki, token) == "notice.malformed"


def test_bad_claims_and_headers_of_a_real_notice_are_malformed(pki: Pki) -> None:
    claims = make_notice(pki).to_claims()
    bad_claims = [{**claims, "seq": -1}, {**claims, "seq": True}, {**claims, "serial": "0x1"},
                  {**claims, "exp": claims["iat"]}, {**claims, "aud": [DEVICE]},
                  {**claims, "extra": []}, {k: v for k, v in claims.items() if k != "group"}]
    for bad in bad_claims:
        assert rejected(pki, forge(header_for(pki), bad, pki.notice_key)) == "notice.malformed"
    with_crit = {**header_for(pki), "crit": ["kid"], "kid": "k1"}  # no extension understood
    assert rejected(pki, forge(with_crit, claims, pki.notice_key)) == "notice.malformed"
    header, _, signature = sign_notice(make_notice(pki), pki.notice_key, pki.chain).split(".")
    duplicate = b'{"aud": "x", "aud": "' + DEVICE.encode() + b'"}'
    assert rejected(pki, f"{header}.{b64url(duplicate)}.{signature}") == "notice.malformed"
    bad_x5c = forge({**header_for(pki), "x5c": ["bm90IGEgY2VydA=="]}, claims, pki.notice_key)
    assert rejected(pki, bad_x5c) == "notice.malformed"


# -- server side: notices, topics, certificate -------------------------------------------

def test_topics_for_device_and_fleet(pki: Pki) -> None:
    assert topic_for("sensors", DEVICE) == f"fleet/sensors/devices/{DEVICE}/notices"
    assert fleet_revocation_topic("sensors") == "fleet/sensors/revocations"


@pytest.mark.parametrize("unsafe", ["a/b", "a+", "#", "a\x00b", "", "a b"])
def test_topic_unsafe_device_id_or_group_is_refused(pki: Pki, unsafe: str) -> None:
    with pytest.raises(ValueError, match="topic safe"):
        topic_for("sensors", unsafe)
    with pytest.raises(ValueError, match="topic safe"):
        topic_for(unsafe, DEVICE)
    with pytest.raises(ValueError, match="topic safe"):
        fleet_revocation_topic(unsafe)
    with pytest.raises(ValueError, match="topic safe"):
        make_notice(pki, device_id=unsafe)


@pytest.mark.parametrize("changes", [
    {"serial": "0"}, {"serial": "12a"}, {"sequence": -1}, {"sequence": 2**53},
    {"sequence": True}, {"issued_at": dt.datetime(2026, 1, 1)},
    {"expires_at": dt.datetime(2000, 1, 1, tzinfo=dt.UTC)},
    {"type": "revocation", "reason": "because"}, {"extra": {"when": dt.datetime.now()}},
    {"extra": {1: "x"}},
])
def test_invalid_notice_fields_are_refused(pki: Pki, changes: dict) -> None:
    with pytest.raises((ValueError, TypeError)):
        make_notice(pki, **changes)


def test_notice_signing_certificate_profile(pki: Pki) -> None:
    certificate = issue_notice_signing_certificate(
        pki.issuing_key, pki.issuing, pki.notice_key.public_key(),
        dt.timedelta(days=365 * 50), pki.now)
    extensions = certificate.extensions
    key_usage = extensions.get_extension_for_class(x509.KeyUsage)
    eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert key_usage.critical and key_usage.value.digital_signature
    assert not (key_usage.value.key_cert_sign or key_usage.value.crl_sign)
    assert eku.critical and list(eku.value) == [NOTICE_SIGNING_EKU]
    assert extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    issuer_ski = pki.issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert extensions.get_extension_for_class(
        x509.AuthorityKeyIdentifier).value.key_identifier == issuer_ski.value.digest
    assert extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value == \
        x509.SubjectKeyIdentifier.from_public_key(pki.notice_key.public_key())
    assert certificate.not_valid_after_utc == pki.issuing.not_valid_after_utc  # clipped
    assert certificate.issuer == pki.issuing.subject
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        "Notice signer"
    certificate.verify_directly_issued_by(pki.issuing)


def test_sign_notice_refuses_a_chain_that_is_not_the_keys(pki: Pki) -> None:
    stranger = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError, match="not the notice-signing key"):
        sign_notice(make_notice(pki), stranger, pki.chain)
    with pytest.raises(ValueError, match="empty"):
        sign_notice(make_notice(pki), pki.notice_key, [])


def test_server_and_device_share_the_constants() -> None:
    assert sdk.NOTICE_SIGNING_EKU == notices.NOTICE_SIGNING_EKU
    assert sdk.NOTICE_TYP == notices.NOTICE_TYP
    assert sdk.NOTICE_TYPES == frozenset(notices.NOTICE_TYPES)


def test_device_sdk_notices_does_not_import_the_server() -> None:
    code = ("import sys, device_sdk.notices; "
            "sys.exit(any(m.split('.')[0] == 'enroll_server' for m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent,
                            check=False)
    assert result.returncode == 0
