"""Renewal retires the old certificate; a compromised key takes all its certificates
with it (issue 9.2). In process, with the services' clock moved past the grace period;
OCSP answers come from the real responder, CRLs from the real publisher."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.x509 import ocsp

from tests.support.est_helpers import (
    csr_body,
    ec_key,
    enroll,
    http_client,
    issued_certificate,
    post_est,
    write_identity,
)
from tests.test_issuance_races import crl_serials, ocsp_status, statuses

GRACE = dt.timedelta(hours=1)  # the default group's supersede_grace_seconds


def renew(app, tmp_path, certificate, key, new_key):
    cert_path, key_path = write_identity(tmp_path, f"c{certificate.serial_number}",
                                         certificate, key)
    with http_client(app, cert_path, key_path) as client:
        return post_est(app, csr_body(new_key, _cn(certificate)), operation="simplereenroll",
                        client=client)


def _cn(certificate: x509.Certificate) -> str:
    return certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value


def crl_entry(app, serial: int) -> x509.RevokedCertificate | None:
    crl_serials(app)  # publishes a CRL now
    latest = app.repository.latest_crl(app.services.signer.name)
    return x509.load_der_x509_crl(latest.der).get_revoked_certificate_by_serial_number(serial)


def test_a_renewed_certificate_is_revoked_as_superseded_after_the_grace(app, tmp_path):
    key = ec_key()
    old = enroll(app, key, "sup-dev-1")
    new = issued_certificate(renew(app, tmp_path, old, key, ec_key()))
    assert statuses(app, "sup-dev-1") == {old.serial_number: "superseded",
                                          new.serial_number: "active"}
    # Within the grace: the old certificate is still good (a lost answer can be fetched
    # again with it), and the CRL does not list it.
    assert ocsp_status(app, old.serial_number) is ocsp.OCSPCertStatus.GOOD
    assert crl_entry(app, old.serial_number) is None
    app.clock.advance(seconds=GRACE.total_seconds() + 1)
    # After it: revoked (superseded) in OCSP and in every CRL built from now on, before
    # anything recorded it ...
    assert ocsp_status(app, old.serial_number) is ocsp.OCSPCertStatus.REVOKED
    entry = crl_entry(app, old.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is (
        x509.ReasonFlags.superseded)
    refused = renew(app, tmp_path, old, key, ec_key())
    assert (refused.status_code, refused.headers["X-Error-Code"]) == (403, "cert.revoked")
    # ... and the relay's duty records it, at the time the grace ended.
    assert app.repository.revoke_superseded(app.clock()) == [app.services.signer.name]
    (row,) = [c for c in app.repository.certificates("sup-dev-1")
              if int(c.serial) == old.serial_number]
    assert (row.status, row.revocation_reason) == ("revoked", "superseded")
    assert row.revoked_at == row.revoke_after
    assert ocsp_status(app, new.serial_number) is ocsp.OCSPCertStatus.GOOD


def test_a_group_with_zero_grace_revokes_the_old_certificate_in_the_renewal(app, tmp_path):
    app.repository.change_group("default", supersede_grace_seconds=0)
    key = ec_key()
    old = enroll(app, key, "sup-dev-2")
    new = issued_certificate(renew(app, tmp_path, old, key, ec_key()))
    assert statuses(app, "sup-dev-2") == {old.serial_number: "revoked",
                                          new.serial_number: "active"}
    assert ocsp_status(app, old.serial_number) is ocsp.OCSPCertStatus.REVOKED
    assert crl_entry(app, old.serial_number) is not None
    # The idempotent retry is gone with the grace: the old certificate is revoked.
    again = renew(app, tmp_path, old, key, ec_key())
    assert again.headers["X-Error-Code"] == "cert.revoked"


def test_key_compromise_revokes_every_certificate_with_that_key(app, tmp_path):
    key = ec_key()
    first = enroll(app, key, "sup-dev-3")
    second = issued_certificate(renew(app, tmp_path, first, key, key))  # same key again
    third_key = ec_key()
    third = issued_certificate(renew(app, tmp_path, second, key, third_key))
    other = enroll(app, ec_key(), "sup-dev-4")
    app.services.revocation.revoke(actor="operator:test", reason="keyCompromise",
                                   serial=format(first.serial_number, "x"))
    found = statuses(app, "sup-dev-3")
    assert found[first.serial_number] == found[second.serial_number] == "revoked"
    assert found[third.serial_number] == "active"  # another key
    on_crl = crl_serials(app)
    for certificate in (first, second):
        assert ocsp_status(app, certificate.serial_number) is ocsp.OCSPCertStatus.REVOKED
        assert certificate.serial_number in on_crl
    for certificate in (third, other):
        assert ocsp_status(app, certificate.serial_number) is ocsp.OCSPCertStatus.GOOD
        assert certificate.serial_number not in on_crl
    assert app.repository.device("sup-dev-3").status == "active"  # a certificate scope


def test_another_reason_revokes_only_the_named_certificate(app, tmp_path):
    key = ec_key()
    first = enroll(app, key, "sup-dev-5")
    second = issued_certificate(renew(app, tmp_path, first, key, key))
    app.services.revocation.revoke(actor="operator:test", reason="affiliationChanged",
                                   serial=format(first.serial_number, "x"))
    assert statuses(app, "sup-dev-5") == {first.serial_number: "revoked",
                                          second.serial_number: "active"}


def test_the_relay_duty_records_it_and_publishes_the_crl(app, tmp_path):
    from enroll_server.notify.duties import Duties
    from enroll_server.services import notice_issuer

    key = ec_key()
    old = enroll(app, key, "sup-dev-6")
    renew(app, tmp_path, old, key, ec_key())
    assert old.serial_number not in crl_serials(app)  # a CRL from within the grace
    app.clock.advance(seconds=GRACE.total_seconds() + 1)
    duties = Duties(app.repository, app.services.authorities,
                    lambda signer: notice_issuer(app.settings, signer),
                    app.settings.revocation, None, app.clock)
    duties()  # one round of the relay's periodic duties
    assert statuses(app, "sup-dev-6")[old.serial_number] == "revoked"
    latest = app.repository.latest_crl(app.services.signer.name)
    listed = x509.load_der_x509_crl(latest.der).get_revoked_certificate_by_serial_number(
        old.serial_number)
    assert listed is not None
