"""peewee models. One database proxy, bound at start to SQLite (default) or PostgreSQL.

Times are stored as naive UTC datetimes. Certificate serials are stored as decimal text
(they exceed 64-bit integers) with a unique index: RFC 5280 4.1.2.2 requires uniqueness
per issuer and SECURITY-CHECKLIST item 17 requires the database to enforce it.
"""

from __future__ import annotations

import datetime as dt

import peewee as pw

database_proxy = pw.DatabaseProxy()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def naive_utc(value: dt.datetime) -> dt.datetime:
    """How times are stored: naive UTC."""
    return value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value


class BaseModel(pw.Model):
    class Meta:
        database = database_proxy
        legacy_table_names = False


class SchemaVersion(BaseModel):
    version = pw.IntegerField()
    applied_at = pw.DateTimeField(default=utcnow)


class EnrollmentGroup(BaseModel):
    name = pw.CharField(max_length=64, unique=True)
    # Authorisation methods the group accepts for simpleenroll: "token", "bootstrap", "tpm".
    auth_methods = pw.CharField(max_length=64, default="token")
    lifetime_days = pw.IntegerField(default=365)
    # Comma-separated key types from ca.profiles.KEY_TYPES ("ec-p256,ec-p384,rsa").
    key_types = pw.CharField(max_length=128, default="ec-p256,ec-p384")
    min_rsa_bits = pw.IntegerField(default=2048)
    requires_approval = pw.BooleanField(default=False)
    # PEM bundle of bootstrap (factory / IDevID) CA certificates trusted for enrollment.
    bootstrap_ca_pem = pw.TextField(default="")
    created_at = pw.DateTimeField(default=utcnow)
    # TPM attestation (schema 2): trusted EK manufacturer roots and intermediates (PEM),
    # "manufacturer" (any genuine TPM of those) or "allowlist" (only listed EKs), and
    # the boot-state policy as JSON {"sha256": {"0": "<hex>", ...}} ("" = none).
    ek_roots_pem = pw.TextField(default="")
    ek_policy = pw.CharField(max_length=16, default="manufacturer")
    pcr_policy = pw.TextField(default="")
    # Schema 3: the manufacturers' CRLs (PEM), checked against every EK chain.
    ek_crls_pem = pw.TextField(default="")
    # Schema 4: how long a certificate replaced by a renewal stays valid before it is
    # revoked (reason superseded); 0 revokes it in the renewal's own transaction.
    supersede_grace_seconds = pw.IntegerField(default=3600)
    # Schema 5: TPM vendors of the built-in trust store the group trusts, comma separated
    # ("infineon,stmicro"; enroll_server.ek_vendors), besides the PEMs of ek_roots_pem.
    ek_vendors = pw.TextField(default="")


class Device(BaseModel):
    device_id = pw.CharField(max_length=64, unique=True)
    group = pw.ForeignKeyField(EnrollmentGroup, backref="devices", on_delete="RESTRICT")
    # "pending" (awaiting approval), "active", "revoked".
    status = pw.CharField(max_length=16, default="active")
    # How the identity was first proven, and the pin that keeps it: e.g. the SHA-256 of the
    # bootstrap certificate's public key, or of the TPM EK public key.
    enrolled_by = pw.CharField(max_length=16)
    identity_pin = pw.CharField(max_length=128, default="")
    created_at = pw.DateTimeField(default=utcnow)
    updated_at = pw.DateTimeField(default=utcnow)
    # TPM devices (schema 2): the AK name pinned at first attested enrollment, and the
    # last TPM resetCount seen in a quote (it must never go backwards).
    ak_name = pw.CharField(max_length=140, default="")
    last_reset_count = pw.BigIntegerField(null=True)
    # Revocation and notices (schema 3): why and when the device was revoked, and the last
    # notice sequence number used for it (notices carry strictly increasing sequences).
    revoked_at = pw.DateTimeField(null=True)
    revocation_reason = pw.CharField(max_length=32, null=True)
    notice_sequence = pw.BigIntegerField(default=0)


class Certificate(BaseModel):
    serial = pw.CharField(max_length=64, unique=True)
    device = pw.ForeignKeyField(Device, backref="certificates", on_delete="RESTRICT")
    fingerprint_sha256 = pw.CharField(max_length=64, unique=True)
    public_key_sha256 = pw.CharField(max_length=64, index=True)
    subject = pw.CharField(max_length=256)
    not_before = pw.DateTimeField()
    not_after = pw.DateTimeField(index=True)
    der = pw.BlobField()
    # "active", "superseded" (replaced by a re-enrollment), "revoked".
    status = pw.CharField(max_length=16, default="active", index=True)
    revoked_at = pw.DateTimeField(null=True)
    revocation_reason = pw.CharField(max_length=32, null=True)
    issued_via = pw.CharField(max_length=16)
    created_at = pw.DateTimeField(default=utcnow)
    # Renewal (schema 3): when a renewal-due notice is to go out (a point of the lifetime
    # plus jitter), and when it went out.
    renew_at = pw.DateTimeField(null=True, index=True)
    renewal_noticed_at = pw.DateTimeField(null=True)
    # CA generations (schema 3): the name of the issuing CA that signed it (IssuingCa.name).
    issuer = pw.CharField(max_length=64, default="issuing-ca")
    # Schema 4: a superseded certificate counts as revoked (superseded) from this time on;
    # the relay records the revocation (store/revocations.py, revoke_superseded).
    revoke_after = pw.DateTimeField(null=True, index=True)


class EnrollmentToken(BaseModel):
    # SHA-256 of the bearer secret: the secret itself is shown once and never stored.
    token_sha256 = pw.CharField(max_length=64, unique=True)
    group = pw.ForeignKeyField(EnrollmentGroup, backref="tokens", on_delete="CASCADE")
    device_id = pw.CharField(max_length=64, null=True)
    created_by = pw.CharField(max_length=64)
    created_at = pw.DateTimeField(default=utcnow)
    expires_at = pw.DateTimeField()
    used_at = pw.DateTimeField(null=True)
    used_by_device = pw.CharField(max_length=64, null=True)


class PendingRequest(BaseModel):
    """A simpleenroll held for manual approval (RFC 7030 4.2.3)."""

    group = pw.ForeignKeyField(EnrollmentGroup, on_delete="CASCADE")
    device_id = pw.CharField(max_length=64)
    public_key_sha256 = pw.CharField(max_length=64, unique=True)
    credential = pw.CharField(max_length=128)  # token hash or bootstrap key pin
    status = pw.CharField(max_length=16, default="pending")  # pending/approved/rejected
    decided_by = pw.CharField(max_length=64, null=True)
    created_at = pw.DateTimeField(default=utcnow)


class AuditEvent(BaseModel):
    at = pw.DateTimeField(default=utcnow, index=True)
    actor = pw.CharField(max_length=128)  # "device:<id>", "operator:<name>", "anonymous"
    action = pw.CharField(max_length=64)  # "est.simpleenroll", "group.create", ...
    outcome = pw.CharField(max_length=16)  # "success", "refused", "pending", "error"
    code = pw.CharField(max_length=64, default="")
    device_id = pw.CharField(max_length=64, null=True, index=True)
    group_name = pw.CharField(max_length=64, null=True)
    remote_addr = pw.CharField(max_length=64, null=True)
    detail = pw.TextField(default="")


class EkAllowlistEntry(BaseModel):
    group = pw.ForeignKeyField(EnrollmentGroup, backref="ek_allowlist", on_delete="CASCADE")
    ek_sha256 = pw.CharField(max_length=64)
    note = pw.CharField(max_length=256, default="")
    created_at = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("group", "ek_sha256"), True),)


class AttestationChallenge(BaseModel):
    """A MakeCredential challenge and nonce: single use, short TTL."""

    challenge_id = pw.CharField(max_length=64, unique=True)
    group = pw.ForeignKeyField(EnrollmentGroup, on_delete="CASCADE")
    device_id = pw.CharField(max_length=64, index=True)  # hex SHA-256 of the EK public key
    ek_public = pw.BlobField()
    ek_certificate = pw.BlobField(null=True)
    ak_public = pw.BlobField()
    ak_name = pw.CharField(max_length=140)
    secret_sha256 = pw.CharField(max_length=64)  # the credential secret itself is not kept
    nonce = pw.BlobField()
    expires_at = pw.DateTimeField()
    used_at = pw.DateTimeField(null=True)
    created_at = pw.DateTimeField(default=utcnow)


class AttestationEvidence(BaseModel):
    """The evidence that justified an attested certificate, kept for operators."""

    certificate = pw.ForeignKeyField(Certificate, backref="evidence", on_delete="CASCADE")
    ek_certificate = pw.BlobField(null=True)
    ek_public = pw.BlobField()
    ak_public = pw.BlobField()
    certify_info = pw.BlobField()
    certify_signature = pw.BlobField()
    device_key_public = pw.BlobField()
    quote_info = pw.BlobField(null=True)
    quote_signature = pw.BlobField(null=True)
    nonce = pw.BlobField()
    created_at = pw.DateTimeField(default=utcnow)


class OutboxMessage(BaseModel):
    """A notice to publish over MQTT, written in the transaction that decided it.

    The relay claims rows (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: a lease), publishes
    them with QoS 1, and sets ``sent_at`` after the broker's PUBACK.
    """

    topic = pw.CharField(max_length=256)
    payload = pw.TextField()
    retain = pw.BooleanField(default=False)
    kind = pw.CharField(max_length=32)  # "revocation", "renewal_due", "ca_rotation"
    device_id = pw.CharField(max_length=64, null=True, index=True)
    created_at = pw.DateTimeField(default=utcnow)
    available_at = pw.DateTimeField(default=utcnow, index=True)  # retry backoff
    attempts = pw.IntegerField(default=0)
    last_error = pw.CharField(max_length=256, default="")
    lease_owner = pw.CharField(max_length=64, null=True)
    lease_until = pw.DateTimeField(null=True)
    sent_at = pw.DateTimeField(null=True, index=True)


class PublishedCrl(BaseModel):
    """Every CRL each issuing CA issued; the newest per issuer is served. A failed build
    adds no row, so the last good CRL keeps being served (RFC 5280 5.2.3: numbers
    strictly increase, per issuer)."""

    issuer = pw.CharField(max_length=64, default="issuing-ca")  # IssuingCa.name
    crl_number = pw.BigIntegerField()
    der = pw.BlobField()
    this_update = pw.DateTimeField()
    next_update = pw.DateTimeField()
    entries = pw.IntegerField()
    created_at = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("issuer", "crl_number"), True),)


class IssuingCa(BaseModel):
    """The issuing CA generations (schema 3). One is "active" and signs device
    certificates; "retired" ones only sign their CRLs and OCSP responder certificates
    until their certificate expires. Every process reads this table, so all replicas
    and workers agree on which CA is active (config files could disagree)."""

    name = pw.CharField(max_length=64, unique=True)  # PKCS#11 key label or key file stem
    certificate_pem = pw.TextField()
    key_backend = pw.CharField(max_length=16)  # "pkcs11" or "file" (ca.backend)
    # pkcs11: the key label in the configured token; file: the key file (instance-relative)
    key_label = pw.CharField(max_length=256)
    key_passphrase_file = pw.CharField(max_length=256, null=True)  # file keys: its path
    status = pw.CharField(max_length=16, default="active", index=True)  # or "retired"
    not_after = pw.DateTimeField()
    created_at = pw.DateTimeField(default=utcnow)
    retired_at = pw.DateTimeField(null=True)


ALL_MODELS = [SchemaVersion, EnrollmentGroup, Device, Certificate, EnrollmentToken,
              PendingRequest, AuditEvent, EkAllowlistEntry, AttestationChallenge,
              AttestationEvidence, OutboxMessage, PublishedCrl, IssuingCa]
