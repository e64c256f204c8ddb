#!/bin/sh
# shellcheck source-path=SCRIPTDIR
# measure-firmware.sh: extend the SHA-256 of the firmware image into a PCR, once per boot.
#
# Reads /etc/enroll-device.conf (or $ENROLL_DEVICE_CONF): ENROLL_FIRMWARE_IMAGE,
# ENROLL_PCR (8..15), ENROLL_TCTI, ENROLL_RUNTIME_DIR. Runs before enrollment (the
# enroll-device-measure.service unit, and first-boot-enroll.sh calls it as well), so the
# TPM quote the server may ask for covers the image this boot runs.
#
# Once per boot: a marker in ENROLL_RUNTIME_DIR (a tmpfs under /run) records the kernel's
# boot id, the PCR, the digest and the PCR value before and after. It is written with
# state=extending before tpm2_pcrextend and state=done after, so an interrupted run is
# never repeated blindly: extending twice would give a value no golden policy matches.
#
# Exit status:
#   0  extended now; or already extended in this boot; or ENROLL_FIRMWARE_IMAGE is empty
#      (measurement disabled)
#   2  configuration or installation error (config unreadable, bad ENROLL_PCR, missing
#      tpm2_pcrextend / tpm2_pcrread / sha256sum, runtime dir not writable)
#   4  TPM error: tpm2_pcrread or tpm2_pcrextend failed (TPM not reachable with
#      ENROLL_TCTI); the PCR is unchanged, so running again is safe
#   5  cannot measure: the image is missing or unreadable, or an earlier run in this boot
#      was interrupted between marking and extending (whether the PCR was extended is
#      unknown: only a reboot gives a PCR value that can match the golden one)
set -u
PROG=measure-firmware
case $0 in */*) HOOKS_DIR=${0%/*} ;; *) HOOKS_DIR=. ;; esac
# shellcheck source=enroll-device-lib.sh
. "${ENROLL_HOOKS_DIR:-$HOOKS_DIR}/enroll-device-lib.sh"

load_config
if [ -z "$ENROLL_FIRMWARE_IMAGE" ]; then
    log notice "ENROLL_FIRMWARE_IMAGE is empty: firmware measurement disabled"
    exit "$EXIT_OK"
fi
validate_pcr
require_value ENROLL_TCTI "$ENROLL_TCTI"
require_program tpm2_pcrextend
require_program tpm2_pcrread
require_program sha256sum

TPM2TOOLS_TCTI=$ENROLL_TCTI
export TPM2TOOLS_TCTI
selection="sha256:$ENROLL_PCR"
marker="$ENROLL_RUNTIME_DIR/firmware-measured"
this_boot=$(boot_id) || exit "$EXIT_CONFIG"

if ! mkdir -p "$ENROLL_RUNTIME_DIR" 2>/dev/null || [ ! -w "$ENROLL_RUNTIME_DIR" ]; then
    die "$EXIT_CONFIG" "runtime dir $ENROLL_RUNTIME_DIR cannot be created or written"
fi

# One run at a time (flock from util-linux or busybox, where the image has it).
if command -v flock >/dev/null 2>&1; then
    exec 9>>"$ENROLL_RUNTIME_DIR/measure.lock"
    flock 9 || die "$EXIT_CONFIG" "cannot lock $ENROLL_RUNTIME_DIR/measure.lock"
fi

# marker_field NAME: a field of the marker (KEY=value lines; parsed, never sourced).
marker_field() {
    sed -n "s/^$1=//p" "$marker" 2>/dev/null | head -n 1
}

# write_marker STATE [KEY=value...]: replace the marker atomically (temp file + rename).
write_marker() {
    _state=$1
    shift
    {
        printf 'boot_id=%s\nstate=%s\nbank=sha256\npcr=%s\ndigest=%s\nimage=%s\n' \
            "$this_boot" "$_state" "$ENROLL_PCR" "$digest" "$ENROLL_FIRMWARE_IMAGE"
        printf 'pcr_before=%s\ntime=%s\n' "$before" "$(now_utc)"
        for _line in "$@"; do printf '%s\n' "$_line"; done
    } >"$marker.tmp.$$" || die "$EXIT_CONFIG" "cannot write $marker.tmp.$$"
    mv -f "$marker.tmp.$$" "$marker" || die "$EXIT_CONFIG" "cannot write $marker"
}

# pcr_value: the PCR's current value, lower-case hex.
pcr_value() {
    tpm2_pcrread "$selection" 2>"$ENROLL_RUNTIME_DIR/pcrread.err" |
        sed -n 's/^[[:space:]]*[0-9][0-9]*[[:space:]]*:[[:space:]]*0x\([0-9A-Fa-f]*\)[[:space:]]*$/\1/p' |
        tr 'A-F' 'a-f'
}

if [ -f "$marker" ]; then
    marked_boot=$(marker_field boot_id)
    if [ "$marked_boot" = "$this_boot" ]; then
        case $(marker_field state) in
            done)
                log info "already measured in this boot: $(marker_field image) sha256" \
                    "$(marker_field digest) into $(marker_field bank):$(marker_field pcr)" \
                    "(not extending again)"
                exit "$EXIT_OK"
                ;;
            *)
                die "$EXIT_MEASURE" "a measurement in this boot was interrupted" \
                    "($marker says state=$(marker_field state)): whether" \
                    "$selection was extended is unknown, so it is not extended again;" \
                    "reboot the device to measure afresh"
                ;;
        esac
    fi
    log info "marker $marker is from another boot ($marked_boot): measuring"
fi

if [ ! -f "$ENROLL_FIRMWARE_IMAGE" ] || [ ! -r "$ENROLL_FIRMWARE_IMAGE" ]; then
    die "$EXIT_MEASURE" "firmware image $ENROLL_FIRMWARE_IMAGE is missing or unreadable:" \
        "nothing extended (enrollment with a PCR policy will be refused)"
fi
digest=$(sha256sum <"$ENROLL_FIRMWARE_IMAGE" | cut -c1-64)
case $digest in
    *[!0-9a-f]* | '') die "$EXIT_MEASURE" "cannot hash $ENROLL_FIRMWARE_IMAGE" ;;
esac
[ "${#digest}" -eq 64 ] || die "$EXIT_MEASURE" "cannot hash $ENROLL_FIRMWARE_IMAGE"

before=$(pcr_value)
if [ "${#before}" -ne 64 ]; then
    die "$EXIT_TPM" "tpm2_pcrread $selection failed (TCTI $ENROLL_TCTI):" \
        "$(tr '\n' ' ' <"$ENROLL_RUNTIME_DIR/pcrread.err")"
fi
case $before in
    *[!0]*)
        log warning "$selection is $before before this boot's firmware measurement:" \
            "something else extends this PCR, so golden values may not be stable;" \
            "choose another ENROLL_PCR if that is not intended"
        ;;
esac

write_marker "extending"
if ! tpm2_pcrextend "$ENROLL_PCR:sha256=$digest" 2>"$ENROLL_RUNTIME_DIR/pcrextend.err"; then
    error=$(tr '\n' ' ' <"$ENROLL_RUNTIME_DIR/pcrextend.err")
    if [ "$(pcr_value)" = "$before" ]; then
        rm -f "$marker"  # nothing was extended: a later run may try again
        die "$EXIT_TPM" "tpm2_pcrextend $selection failed (TCTI $ENROLL_TCTI), PCR" \
            "unchanged: $error"
    fi
    die "$EXIT_TPM" "tpm2_pcrextend $selection reported failure and the PCR could not" \
        "be read back unchanged: $error"
fi
after=$(pcr_value)
write_marker "done" "pcr_after=$after"
rm -f "$ENROLL_RUNTIME_DIR/pcrread.err" "$ENROLL_RUNTIME_DIR/pcrextend.err"
log notice "extended $selection with sha256 $digest of $ENROLL_FIRMWARE_IMAGE;" \
    "$selection is now $after"
exit "$EXIT_OK"
