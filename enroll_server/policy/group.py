"""An enrollment group's rules as one frozen value, built from its database row.

Every issuing path asks this object, never the row: which credentials the group accepts,
its key policy, certificate lifetime, manual approval, the TPM manufacturers it trusts
(EK roots and their CRLs, and the vendors of the built-in store), its boot-state policy
(golden PCRs), the factory (bootstrap) CAs, and how long a superseded certificate stays
valid. Pure: no I/O (the vendor trust store is the server's own package data, parsed and
checked once per process by enroll_server.ek_vendors).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from .. import attestation as att
from .. import ek_vendors as vendor_store
from ..attestation.quote import PcrMap
from ..errors import Forbidden
from .csr import KeyPolicy

METHODS = ("token", "bootstrap", "tpm")
_METHOD_NAMES = {"token": "token", "bootstrap": "bootstrap", "tpm": "TPM attestation"}


@dataclass(frozen=True)
class GroupPolicy:
    id: int
    name: str
    methods: frozenset[str]  # of METHODS
    key_policy: KeyPolicy
    lifetime: dt.timedelta
    requires_approval: bool
    bootstrap_roots: tuple[x509.Certificate, ...]  # self-issued factory (IDevID) CAs
    bootstrap_intermediates: tuple[x509.Certificate, ...]
    ek_policy: str  # "manufacturer" (a genuine TPM of those) or "allowlist"
    ek_vendors: tuple[str, ...]  # vendors of the built-in trust store the group trusts
    # The operator's manufacturer roots and EK CAs, then the trusted vendors' anchors
    ek_trust_anchors: tuple[att.EkCertificate, ...]
    # The trusted vendors' EK issuing CAs: untrusted path-building helpers, never anchors
    ek_vendor_intermediates: tuple[att.EkCertificate, ...]
    ek_crls: tuple[x509.CertificateRevocationList, ...]
    pcr_policy: PcrMap | None  # golden PCR values a quote must match, or None
    supersede_grace: dt.timedelta  # a renewed certificate stays valid this long

    def require_method(self, method: str) -> None:
        """The group accepts this credential, or 403 auth.method_not_allowed."""
        if method in self.methods:
            return
        if method == "tpm":
            raise Forbidden("The enrollment group does not accept TPM attestation.",
                            code="auth.method_not_allowed")
        raise Forbidden(f"The enrollment group does not accept {_METHOD_NAMES[method]} "
                        "authentication.", code="auth.method_not_allowed")

    @property
    def allowlist_only(self) -> bool:
        return self.ek_policy == "allowlist"

    @classmethod
    def of(cls, row: Any) -> GroupPolicy:
        """From an enrollment_group row (store.models.EnrollmentGroup). Built once per
        distinct row content: EK CRLs can hold many thousands of entries."""
        return _policy(row.id, row.name, row.auth_methods, row.key_types, row.min_rsa_bits,
                       row.lifetime_days, bool(row.requires_approval), row.bootstrap_ca_pem,
                       row.ek_policy, row.ek_roots_pem, row.ek_vendors or "",
                       row.ek_crls_pem, row.pcr_policy, row.supersede_grace_seconds)


@functools.lru_cache(maxsize=64)
def _policy(group_id: int, name: str, auth_methods: str, key_types: str, min_rsa_bits: int,
            lifetime_days: int, requires_approval: bool, bootstrap_ca_pem: str,
            ek_policy: str, ek_roots_pem: str, ek_vendors: str, ek_crls_pem: str,
            pcr_policy: str, supersede_grace_seconds: int) -> GroupPolicy:
    bootstrap = _certificates(bootstrap_ca_pem)
    vendor_anchors, vendor_intermediates = vendor_store.trust_for(ek_vendors)
    return GroupPolicy(
        id=group_id, name=name,
        methods=frozenset(m for m in auth_methods.split(",") if m),
        key_policy=KeyPolicy(tuple(t for t in key_types.split(",") if t), min_rsa_bits),
        lifetime=dt.timedelta(days=lifetime_days), requires_approval=requires_approval,
        bootstrap_roots=tuple(c for c in bootstrap if c.issuer == c.subject),
        bootstrap_intermediates=tuple(c for c in bootstrap if c.issuer != c.subject),
        ek_policy=ek_policy,
        ek_vendors=tuple(sorted({v.strip() for v in ek_vendors.split(",") if v.strip()})),
        ek_trust_anchors=_ek_certificates(ek_roots_pem) + vendor_anchors,
        ek_vendor_intermediates=vendor_intermediates,
        ek_crls=_crls(ek_crls_pem),
        pcr_policy=att.pcr_policy_from_json(json.loads(pcr_policy)) if pcr_policy else None,
        supersede_grace=dt.timedelta(seconds=supersede_grace_seconds))


@functools.lru_cache(maxsize=16)
def _certificates(pem: str) -> tuple[x509.Certificate, ...]:
    return tuple(x509.load_pem_x509_certificates(pem.encode())) if pem.strip() else ()


@functools.lru_cache(maxsize=16)
def _ek_certificates(pem: str) -> tuple[att.EkCertificate, ...]:
    """Leniently read (attestation.ek_cert): manufacturer CAs with DER quirks load too."""
    return tuple(att.load_pem_certificates(pem)) if pem.strip() else ()


@functools.lru_cache(maxsize=16)
def _crls(pem: str) -> tuple[x509.CertificateRevocationList, ...]:
    return tuple(att.load_ek_crls(pem.encode())) if pem.strip() else ()
