"""The per-EK quota of open attestation challenges (issue 9.6), in process, with the
recorded ECC evidence (tests/data/attestation): everything a stranger needs to ask for
challenges in a device's name is public (EK certificate, EK and AK public areas), so the
quota may be filled by anyone, but it must never lock the device out for longer than the
challenge TTL. Only unused, unexpired challenges count."""

from __future__ import annotations

import base64
import datetime as dt
import json

from tests.test_attestation_recorded import DATA, load_set

GROUP = "fleet"
CHALLENGE = f"/.well-known/est/{GROUP}/attest/challenge"
ENROLL = f"/.well-known/est/{GROUP}/attest/enroll"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def public_ek_material() -> tuple[dict[str, str], dict[str, bytes], dt.datetime]:
    files, manifest = load_set("ecc")
    request = {"ek_public": b64(files["ek_public"]), "ak_public": b64(files["ak_public"]),
               "ek_certificate": b64(files["ek_certificate"])}
    return request, files, dt.datetime.fromisoformat(str(manifest["now"]))


def fleet(app) -> None:
    roots = (DATA / "manufacturer-root.pem").read_text() + (
        DATA / "manufacturer-ek-ca.pem").read_text()
    app.create_group(GROUP, auth_methods="tpm", ek_roots_pem=roots)


def test_a_stranger_with_public_ek_material_locks_the_ek_out_for_at_most_the_ttl(app):
    request, _files, now = public_ek_material()
    app.clock.set(now)
    fleet(app)
    client = app.http_client()
    settings = app.settings.attestation
    for _ in range(settings.max_open_challenges):  # the stranger fills the quota
        assert client.post(CHALLENGE, json=request).status_code == 200
    refused = client.post(CHALLENGE, json=request)
    assert (refused.status_code, refused.headers["X-Error-Code"]) == (429, "challenge.too_many")
    assert refused.headers["Retry-After"] == str(settings.challenge_ttl_seconds)
    app.clock.advance(seconds=settings.challenge_ttl_seconds - 1)
    assert client.post(CHALLENGE, json=request).status_code == 429  # all still open
    app.clock.advance(seconds=2)  # past the TTL of every one of them
    answer = client.post(CHALLENGE, json=request)
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.content)["device_id"]


def test_used_challenges_do_not_count(app):
    request, files, now = public_ek_material()
    app.clock.set(now)
    fleet(app)
    client = app.http_client()
    challenges = [client.post(CHALLENGE, json=request).json()["challenge_id"]
                  for _ in range(app.settings.attestation.max_open_challenges)]
    assert client.post(CHALLENGE, json=request).status_code == 429
    burnt = client.post(ENROLL, json={  # a wrong answer still uses the challenge up
        "challenge_id": challenges[0], "activated_secret": b64(b"\0" * 32),
        "device_key_public": b64(files["device_key_public"]),
        "certify_info": b64(files["certify_info"]),
        "certify_signature": b64(files["certify_signature"]), "csr": b64(files["csr"])})
    assert burnt.headers["X-Error-Code"] == "credential.wrong_secret"
    assert client.post(CHALLENGE, json=request).status_code == 200
