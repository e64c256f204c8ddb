# shellcheck shell=sh
# shellcheck source-path=SCRIPTDIR
# Shared by the enrollment firmware hooks (sourced, not run): configuration loading,
# validation and logging. POSIX sh (dash, busybox ash), no bashisms.

# Exit codes shared by the hooks (see README.md); used by the scripts that source this.
# shellcheck disable=SC2034
EXIT_OK=0
EXIT_CONFIG=2
EXIT_REFUSED=3
EXIT_TPM=4
EXIT_MEASURE=5
EXIT_REVOKED=6
EXIT_TEMPFAIL=75

# log LEVEL MESSAGE...: one line on stderr. Under systemd (JOURNAL_STREAM set, stderr
# is the journal) with the syslog priority prefix journald understands (sd-daemon(3)).
log() {
    _level=$1
    shift
    case $_level in
        err) _prio=3 ;;
        warning) _prio=4 ;;
        notice) _prio=5 ;;
        *) _prio=6 ;;
    esac
    if [ -n "${JOURNAL_STREAM:-}" ]; then
        printf '<%s>%s: %s\n' "$_prio" "${PROG:-enroll-device-hook}" "$*" >&2
    else
        printf '%s: %s\n' "${PROG:-enroll-device-hook}" "$*" >&2
    fi
}

die() {
    _code=$1
    shift
    log err "$*"
    exit "$_code"
}

# load_config: source ENROLL_DEVICE_CONF (default /etc/enroll-device.conf) and apply
# defaults for what it leaves out.
load_config() {
    ENROLL_DEVICE_CONF=${ENROLL_DEVICE_CONF:-/etc/enroll-device.conf}
    [ -r "$ENROLL_DEVICE_CONF" ] ||
        die "$EXIT_CONFIG" "configuration $ENROLL_DEVICE_CONF is missing or unreadable"
    # shellcheck source=enroll-device.conf
    . "$ENROLL_DEVICE_CONF" ||
        die "$EXIT_CONFIG" "configuration $ENROLL_DEVICE_CONF has a shell error"
    ENROLL_GROUP=${ENROLL_GROUP:-}
    ENROLL_TCTI=${ENROLL_TCTI:-device:/dev/tpmrm0}
    ENROLL_STATE_DIR=${ENROLL_STATE_DIR:-/var/lib/enroll-device}
    ENROLL_STATUS_FILE=${ENROLL_STATUS_FILE:-$ENROLL_STATE_DIR/first-boot.status}
    ENROLL_RUNTIME_DIR=${ENROLL_RUNTIME_DIR:-/run/enroll-device}
    ENROLL_DEVICE_BIN=${ENROLL_DEVICE_BIN:-enroll-device}
    ENROLL_BROKER=${ENROLL_BROKER:-}
    ENROLL_BROKER_CA=${ENROLL_BROKER_CA:-}
    ENROLL_FIRMWARE_IMAGE=${ENROLL_FIRMWARE_IMAGE:-}
    ENROLL_PCR=${ENROLL_PCR:-13}
    ENROLL_RETRY_ATTEMPTS=${ENROLL_RETRY_ATTEMPTS:-8}
    ENROLL_RETRY_INITIAL_MS=${ENROLL_RETRY_INITIAL_MS:-5000}
    ENROLL_RETRY_MAX_MS=${ENROLL_RETRY_MAX_MS:-300000}
    ENROLL_PROBE_TIMEOUT=${ENROLL_PROBE_TIMEOUT:-15}
    ENROLL_HTTP_TIMEOUT=${ENROLL_HTTP_TIMEOUT:-60}
    ENROLL_TIME_FLOOR=${ENROLL_TIME_FLOOR:-0}
}

# require_uint NAME VALUE [MIN]: a non-negative decimal integer (>= MIN), else exit 2.
require_uint() {
    case $2 in
        '' | *[!0-9]*) die "$EXIT_CONFIG" "$1=$2 in $ENROLL_DEVICE_CONF: not a whole number" ;;
    esac
    if [ "${#2}" -gt 12 ] || [ "$2" -lt "${3:-0}" ]; then
        die "$EXIT_CONFIG" "$1=$2 in $ENROLL_DEVICE_CONF: out of range"
    fi
}

# require_value NAME VALUE: non-empty, else exit 2.
require_value() {
    [ -n "$2" ] || die "$EXIT_CONFIG" "$1 is not set in $ENROLL_DEVICE_CONF"
}

# require_program NAME: on PATH (or an executable path), else exit 2.
require_program() {
    command -v "$1" >/dev/null 2>&1 ||
        die "$EXIT_CONFIG" "$1 not found (PATH=$PATH): the device image lacks it"
}

# validate_pcr: ENROLL_PCR in 8..15 (see enroll-device.conf for why).
validate_pcr() {
    require_uint ENROLL_PCR "$ENROLL_PCR"
    if [ "$ENROLL_PCR" -lt 8 ] || [ "$ENROLL_PCR" -gt 15 ]; then
        die "$EXIT_CONFIG" "ENROLL_PCR=$ENROLL_PCR: only PCRs 8..15 are accepted" \
            "(0..7 are the platform firmware's, 16 and 23 are resettable, 17..22 DRTM)"
    fi
}

# boot_id: the kernel's id of this boot (changes at every boot). Without it "once per
# boot" cannot be told apart from "another boot": exit 2 rather than guess.
boot_id() {
    _boot=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)
    [ -n "$_boot" ] || die "$EXIT_CONFIG" "/proc/sys/kernel/random/boot_id is unreadable"
    printf '%s\n' "$_boot"
}

now_utc() {
    date -u +%Y-%m-%dT%H:%M:%SZ
}
