"""The TPM manufacturer trust store shipped with the server (package data, read-only).

One PEM bundle per vendor (``<vendor>.pem`` beside this file). Every certificate is
preceded by one provenance line::

    # vendor=stmicro | role=anchor | subject=... | sha256=<DER SHA-256> | not_after=...
    #   | published=<where the vendor publishes it> | copied-from=<public copy>

``role=anchor`` certificates are trust anchors of the groups that trust the vendor
(``group create --ek-vendors stmicro``); ``role=intermediate`` ones are untrusted helpers
that must still chain to an anchor (vendor EK issuing CAs that devices do not send).
Loading checks every line against its certificate (fingerprint, subject), so a damaged
store fails at start, never silently. docs/tpm-vendors.md says how to add a vendor.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources

from enroll_server.attestation.ek_cert import (
    EkCertificate,
    iter_pem_blocks,
    load_pem_certificates,
)

VENDOR_NAME = re.compile(r"[a-z][a-z0-9-]{1,31}")
_FIELDS = ("vendor", "role", "subject", "sha256", "not_after", "published", "copied-from")


class VendorStoreError(ValueError):
    """A vendor bundle whose provenance does not match its certificates."""


@dataclass(frozen=True)
class VendorCertificate:
    vendor: str
    role: str  # "anchor" or "intermediate"
    published: str
    copied_from: str
    certificate: EkCertificate

    @property
    def sha256(self) -> str:
        return self.certificate.fingerprint_sha256.hex()


def parse_provenance(line: str) -> dict[str, str]:
    fields = {}
    for part in line.split(" | "):
        key, sep, value = part.partition("=")
        if not sep:
            raise VendorStoreError(f"provenance field without '=': {part!r}")
        fields[key.strip()] = value.strip()
    missing = [name for name in _FIELDS if name not in fields]
    if missing:
        raise VendorStoreError(f"provenance line lacks {', '.join(missing)}: {line!r}")
    return fields


def parse_vendor_bundle(vendor: str, text: str) -> list[VendorCertificate]:
    """Pure: the certificates of one vendor bundle, each checked against its line."""
    entries = []
    for comments, block in iter_pem_blocks(text):
        lines = [c for c in comments if c.startswith("vendor=")]
        if len(lines) != 1:
            raise VendorStoreError(f"{vendor}: a certificate without one provenance line")
        fields = parse_provenance(lines[0])
        certificate = load_pem_certificates(block)[0]
        if fields["vendor"] != vendor or fields["role"] not in ("anchor", "intermediate"):
            raise VendorStoreError(f"{vendor}: bad vendor/role in {lines[0]!r}")
        if fields["sha256"].lower() != certificate.fingerprint_sha256.hex():
            raise VendorStoreError(f"{vendor}: fingerprint of {fields['subject']} differs")
        if fields["subject"] != certificate.subject_text:
            raise VendorStoreError(f"{vendor}: subject {fields['subject']!r} differs")
        entries.append(VendorCertificate(vendor, fields["role"], fields["published"],
                                         fields["copied-from"], certificate))
    if not entries:
        raise VendorStoreError(f"{vendor}: no certificates")
    return entries


@functools.cache
def store() -> tuple[VendorCertificate, ...]:
    """Every shipped certificate, vendor by vendor (read once per process)."""
    entries: list[VendorCertificate] = []
    for item in sorted(resources.files(__name__).iterdir(), key=lambda p: p.name):
        if item.name.endswith(".pem"):
            entries += parse_vendor_bundle(item.name[:-4], item.read_text())
    return tuple(entries)


def vendor_names() -> list[str]:
    return sorted({entry.vendor for entry in store()})


def parse_vendor_list(text: str) -> list[str]:
    """"infineon, stmicro" -> ["infineon", "stmicro"]; ValueError names unknown vendors."""
    names = sorted({name.strip().lower() for name in text.split(",") if name.strip()})
    unknown = [name for name in names if name not in vendor_names()]
    if unknown:
        raise ValueError(f"unknown TPM vendor(s) {', '.join(unknown)}; known: "
                         f"{', '.join(vendor_names())}")
    return names


@functools.lru_cache(maxsize=64)
def trust_for(vendors: str) -> tuple[tuple[EkCertificate, ...], tuple[EkCertificate, ...]]:
    """(anchors, intermediates) of the comma-separated vendor names a group stores."""
    wanted = {name.strip() for name in vendors.split(",") if name.strip()}
    chosen = [entry for entry in store() if entry.vendor in wanted]
    return (tuple(e.certificate for e in chosen if e.role == "anchor"),
            tuple(e.certificate for e in chosen if e.role == "intermediate"))
