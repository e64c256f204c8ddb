"""TPM2_Quote verification against an enrollment group's golden PCR values.

TPM2_Quote (TPM 2.0 Part 3 18.4) signs a TPMS_QUOTE_INFO (Part 2 10.12.1): the PCR
selection and pcrDigest = H_sign(PCR[sel_0] || PCR[sel_1] || ...), the selected PCR
values concatenated bank by bank in selection order, ascending index within a bank, and
hashed with the signing scheme's hash. The server knows the golden values, so it
computes the expected digest itself: the device sends only the quote and signature.

A policy is ``{"sha256": {0: b"...", 1: b"...", 2: b"...", 7: b"..."}}``. The quote must
select every PCR of the policy; PCRs it selects beyond the policy are allowed only when
the device also sends their values (they are then bound by the signed digest).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from tpm2_pytss.constants import TPM2_ST
from tpm2_pytss.types import TPML_DIGEST, TPML_PCR_SELECTION, TPMS_ATTEST

from enroll_server.attestation import verdict
from enroll_server.attestation.tpm_structs import (
    PCR_BANK_ALGS,
    PCR_BANK_HASHES,
    ClockInfo,
    clock_info,
)
from enroll_server.attestation.verify import (
    SIGNATURE_HASHES,
    AttestKind,
    check_ak_public,
    signing_scheme,
    verify_attest,
)

PcrValues = Mapping[str, Mapping[int, bytes]]
PcrMap = dict[str, dict[int, bytes]]
PcrSelection = tuple[tuple[str, tuple[int, ...]], ...]
MAX_PCR = 23  # PC Client platforms have 24 PCRs (TCG PC Client PTP, PCR allocation)

QUOTE = AttestKind("quote_info", TPM2_ST.ATTEST_QUOTE, verdict.QuoteBadMagic,
                   verdict.QuoteWrongType, verdict.QuoteBadSignature,
                   verdict.QuoteNonceMismatch)  # fmt: skip
_BANK_NAMES = {alg: name for name, alg in PCR_BANK_ALGS.items()}


@dataclass(frozen=True)
class QuoteResult:
    """What a verified quote says: selection, digest, and the TPM clock for later checks."""

    attest: TPMS_ATTEST
    selection: PcrSelection
    pcr_digest: bytes
    clock: ClockInfo


def normalize_pcr_values(values: PcrValues, field: str = "pcr_policy") -> PcrMap:
    """Banks by lower-case name, PCR indices 0..23, values of the bank's digest size."""
    normalized: PcrMap = {}
    for bank, pcrs in values.items():
        name = str(bank).lower()
        if name not in PCR_BANK_HASHES:
            raise ValueError(f"{field}: unsupported PCR bank {bank!r}")
        size = PCR_BANK_HASHES[name].digest_size
        normalized[name] = {}
        for index, value in pcrs.items():
            if not 0 <= int(index) <= MAX_PCR or not isinstance(value, bytes) or len(value) != size:
                raise ValueError(f"{field}: {name} PCR {index} must be a {size}-byte value")
            normalized[name][int(index)] = value
    return normalized


def _selection(pcr_select: TPML_PCR_SELECTION) -> PcrSelection:
    """A TPML_PCR_SELECTION (Part 2 10.9.7) as ((bank, (pcr, ...)), ...), in its order.

    ValueError for an unsupported or repeated bank; banks with no PCR selected are dropped.
    """
    banks: list[tuple[str, tuple[int, ...]]] = []
    for position in range(pcr_select.count):
        entry = pcr_select.pcrSelections[position]
        bank = _BANK_NAMES.get(int(entry.hash))
        if bank is None or any(name == bank for name, _ in banks):
            raise ValueError(f"PCR bank {entry.hash} unsupported or repeated")
        bitmap = bytes(entry.pcrSelect)[: entry.sizeofSelect]
        pcrs = tuple(i for i in range(8 * len(bitmap)) if bitmap[i // 8] >> (i % 8) & 1)
        if pcrs:
            banks.append((bank, pcrs))
    return tuple(banks)


def quoted_selection(attest: TPMS_ATTEST) -> PcrSelection:
    """The PCR selection a TPMS_QUOTE_INFO reports, as ((bank, (pcr, ...)), ...)."""
    try:
        return _selection(attest.attested.quote.pcrSelect)
    except ValueError as exc:
        raise verdict.QuotePcrSelection(detail=f"quote selection: {exc}") from exc


def pcr_digest(
    selection: PcrSelection, values: PcrValues, algorithm: hashes.HashAlgorithm
) -> bytes:
    """H(PCR values concatenated in selection order): Part 3 18.4, PCRComputeCurrentDigest."""
    digest = hashes.Hash(algorithm)
    for bank, pcrs in selection:
        for index in pcrs:
            digest.update(values[bank][index])
    return digest.finalize()


def _format(selection: PcrSelection | Mapping[str, Iterable[int]]) -> str:
    items = selection.items() if isinstance(selection, Mapping) else selection
    return "+".join(f"{bank}:{','.join(map(str, sorted(pcrs)))}" for bank, pcrs in items) or "none"


def verify_quote(
    quote_info: bytes, signature: bytes, ak_public: bytes, nonce: bytes,
    pcr_policy: PcrValues | None, pcr_values: PcrValues | None = None,
) -> QuoteResult:  # fmt: skip
    """A TPM2_Quote over the policy's PCRs whose digest matches the golden values.

    ``quote_info`` is the marshalled TPMS_ATTEST (``tpm2_quote -m``), ``signature`` the
    AK's TPMT_SIGNATURE (``tpm2_quote -s``). With ``pcr_policy`` None only the signature
    and nonce are checked. ``pcr_values`` (optional, from the device) supply PCRs the
    quote selects beyond the policy, and name the differing PCRs in the audit detail.
    """
    attest = verify_attest(QUOTE, quote_info, signature, ak_public, nonce)
    selection = quoted_selection(attest)
    quoted_digest = bytes(attest.attested.quote.pcrDigest)
    result = QuoteResult(attest, selection, quoted_digest, clock_info(attest))
    if pcr_policy is None:
        return result
    policy = normalize_pcr_values(pcr_policy)
    if not any(policy.values()):
        raise ValueError("pcr_policy selects no PCR (a configuration error)")
    reported = normalize_pcr_values(pcr_values or {}, "pcr_values")
    selected = {bank: set(pcrs) for bank, pcrs in selection}
    missing = {bank: set(pcrs) - selected.get(bank, set()) for bank, pcrs in policy.items()}
    if not selection or any(missing.values()):
        raise verdict.QuotePcrSelection(detail=f"quote selects {_format(selection)}, policy "
                                               f"requires {_format(policy)}")  # fmt: skip
    expected_values: PcrMap = {}
    for bank, pcrs in selection:
        expected_values[bank] = {}
        for index in pcrs:
            value = policy.get(bank, {}).get(index, reported.get(bank, {}).get(index))
            if value is None:
                raise verdict.QuotePcrSelection(detail=f"quote selects {bank}:{index} outside "
                                                       "the policy and no value was sent")
            expected_values[bank][index] = value
    algorithm = SIGNATURE_HASHES[signing_scheme(check_ak_public(ak_public))[1]]
    expected_digest = pcr_digest(selection, expected_values, algorithm)
    if not hmac.compare_digest(expected_digest, quoted_digest):
        differing = _differing_pcrs(selection, policy, reported, quoted_digest, algorithm)
        raise verdict.QuotePcrMismatch(detail=f"pcrDigest {quoted_digest.hex()}, policy "
                                              f"{_format(policy)} gives {expected_digest.hex()}"
                                              f"{differing}")  # fmt: skip
    return result


def _differing_pcrs(
    selection: PcrSelection, policy: PcrValues, reported: PcrValues, quoted_digest: bytes,
    algorithm: hashes.HashAlgorithm,
) -> str:  # fmt: skip
    """Audit hint: which policy PCRs differ, if the device's reported values are genuine."""
    try:
        if pcr_digest(selection, reported, algorithm) != quoted_digest:
            return "; reported PCR values do not match the quote either"
    except KeyError:
        return ""
    off = [f"{bank}:{i}" for bank, pcrs in selection for i in pcrs
           if i in policy.get(bank, {}) and policy[bank][i] != reported[bank][i]]  # fmt: skip
    return f"; differing PCRs {','.join(off)}"


def check_reset_count(previous_reset_count: int | None, clock: ClockInfo) -> None:
    """resetCount never goes backwards for one TPM (Part 1 36.6; TPM2_Clear resets it)."""
    if previous_reset_count is not None and clock.reset_count < previous_reset_count:
        raise verdict.QuoteResetCount(detail=f"resetCount {clock.reset_count} < previously "
                                             f"seen {previous_reset_count}")  # fmt: skip


# -- golden values: from a reference device, for ``group set-pcrs`` ----------------------


def pcr_values_from_pcr_read(pcr_selection: TPML_PCR_SELECTION, digests: TPML_DIGEST) -> PcrMap:
    """Values from ESAPI ``pcr_read`` (TPM2_PCR_Read, Part 3 22.4) as a policy mapping.

    TPM2_PCR_Read returns at most 8 digests per call, in the order of the selection it
    reports back; merge several calls with ``dict`` updates per bank.
    """
    selection = _selection(pcr_selection)
    flat = [bytes(digests.digests[i]) for i in range(digests.count)]
    values: PcrMap = {}
    position = 0
    for bank, pcrs in selection:
        for index in pcrs:
            if position >= len(flat):
                raise ValueError("fewer digests than selected PCRs")
            values.setdefault(bank, {})[index] = flat[position]
            position += 1
    return values


_BANK_LINE = re.compile(r"^\s*(sha1|sha256|sha384|sha512)\s*:\s*$")
_VALUE_LINE = re.compile(r"^\s*(\d{1,2})\s*:\s*0x([0-9A-Fa-f]+)\s*$")


def parse_tpm2_pcrread(text: str) -> PcrMap:
    """The YAML-like stdout of ``tpm2_pcrread sha256:0,1,2,7`` (tpm2-tools 5.4)."""
    values: PcrMap = {}
    bank: str | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if match := _BANK_LINE.match(line):
            bank = match.group(1)
            values.setdefault(bank, {})
        elif (match := _VALUE_LINE.match(line)) and bank is not None:
            values[bank][int(match.group(1))] = bytes.fromhex(match.group(2))
        else:
            raise ValueError(f"unexpected tpm2_pcrread line: {line.strip()[:60]!r}")
    return normalize_pcr_values(values, "tpm2_pcrread")


def golden_pcr_policy(reference: PcrValues, pcrs: Mapping[str, Iterable[int]]) -> PcrMap:
    """The policy for ``pcrs`` (e.g. {"sha256": [0, 1, 2, 7]}) from a reference device."""
    values = normalize_pcr_values(reference, "reference")
    policy: PcrMap = {}
    for bank, indices in pcrs.items():
        name = bank.lower()
        for index in sorted(set(indices)):
            if index not in values.get(name, {}):
                raise ValueError(f"reference values lack {name}:{index}")
            policy.setdefault(name, {})[index] = values[name][index]
    if not policy:
        raise ValueError("a PCR policy needs at least one PCR")
    return policy


def pcr_policy_to_json(policy: PcrValues) -> dict[str, dict[str, str]]:
    """{"sha256": {"0": "<hex>", ...}} for settings files and the group table."""
    return {bank: {str(i): value.hex() for i, value in sorted(pcrs.items())}
            for bank, pcrs in normalize_pcr_values(policy).items()}  # fmt: skip


def pcr_policy_from_json(document: Mapping[str, Mapping[str, str]]) -> PcrMap:
    """Inverse of ``pcr_policy_to_json``; ValueError on anything malformed."""
    return normalize_pcr_values({bank: {int(i): bytes.fromhex(v) for i, v in pcrs.items()}
                                 for bank, pcrs in document.items()})  # fmt: skip
