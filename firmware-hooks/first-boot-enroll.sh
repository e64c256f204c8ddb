#!/bin/sh
# shellcheck source-path=SCRIPTDIR
# first-boot-enroll.sh: enroll this device (TPM-attested EST) once, at first boot.
#
# Reads /etc/enroll-device.conf (or $ENROLL_DEVICE_CONF). Idempotent: a device that is
# enrolled stays as it is (its certificate is renewed by the agent, not here).
#
#   1. local state: a revoked device (status.json state "revoked") is not re-enrolled;
#   2. the firmware measurement (measure-firmware.sh; a no-op when it ran in this boot),
#      so a PCR quote the server asks for covers this boot's firmware; no enrollment
#      when it fails (fail closed);
#   3. up to ENROLL_RETRY_ATTEMPTS attempts, with exponential backoff and jitter between
#      them, each: is the clock sane (now >= ENROLL_TIME_FLOOR: TLS and certificate
#      validity need it)? is the server reachable (curl --cacert of
#      /.well-known/est/cacerts; skipped when the state dir already holds an enrollment,
#      whose check needs only the TPM)? then `enroll-device enroll`, whose result is
#      sorted into done, permanent refusal (stop at once) and transient failure (retry).
#
# After every run ENROLL_STATUS_FILE says what happened, for support: KEY=value lines
# (result, exit_code, time, attempts, server, group; on a refusal http_status,
# error_code and message; when enrolled device_id and serial). Not meant to be sourced.
#
# Exit status:
#   0   enrolled now, or already enrolled (nothing changed)
#   2   configuration or installation error (config, server CA missing or not PEM,
#       enroll-device, curl or tpm2-tools missing; enroll-device rejected its
#       arguments). Not retried.
#   3   REFUSED by the server (an HTTP 4xx refusal such as quote.pcr_mismatch,
#       ek.untrusted, group unknown; or the server's device id is not this TPM's):
#       permanent, not retried; the status file names the server's error code
#   4   TPM error in every attempt (enroll-device exit 4)
#   5   the firmware measurement failed (see measure-firmware.sh): not enrolled
#   6   this device's certificate was revoked: not re-enrolled automatically
#   75  transient failure, retry limit reached: clock before the floor, server not
#       reachable, server busy or failing (5xx), enrollment pending an operator's
#       approval (202), enroll-device's own retries exhausted. Run again later
#       (systemd does: Restart=on-failure)
set -u
PROG=first-boot-enroll
case $0 in */*) HOOKS_DIR=${0%/*} ;; *) HOOKS_DIR=. ;; esac
HOOKS_DIR=${ENROLL_HOOKS_DIR:-$HOOKS_DIR}
# shellcheck source=enroll-device-lib.sh
. "$HOOKS_DIR/enroll-device-lib.sh"

load_config
require_value ENROLL_SERVER "${ENROLL_SERVER:-}"
require_value ENROLL_SERVER_CA "${ENROLL_SERVER_CA:-}"
require_value ENROLL_TCTI "$ENROLL_TCTI"
require_value ENROLL_STATE_DIR "$ENROLL_STATE_DIR"
require_uint ENROLL_RETRY_ATTEMPTS "$ENROLL_RETRY_ATTEMPTS" 1
require_uint ENROLL_RETRY_INITIAL_MS "$ENROLL_RETRY_INITIAL_MS"
require_uint ENROLL_RETRY_MAX_MS "$ENROLL_RETRY_MAX_MS"
require_uint ENROLL_PROBE_TIMEOUT "$ENROLL_PROBE_TIMEOUT" 1
require_uint ENROLL_HTTP_TIMEOUT "$ENROLL_HTTP_TIMEOUT" 1
require_uint ENROLL_TIME_FLOOR "$ENROLL_TIME_FLOOR"
require_program curl
require_program od
require_program "$ENROLL_DEVICE_BIN"
if [ ! -f "$ENROLL_SERVER_CA" ] || [ ! -r "$ENROLL_SERVER_CA" ]; then
    die "$EXIT_CONFIG" "server CA $ENROLL_SERVER_CA (ENROLL_SERVER_CA) is missing or unreadable"
fi
server=${ENROLL_SERVER%/}
case $server in
    https://?*) ;;
    *) die "$EXIT_CONFIG" "ENROLL_SERVER=$ENROLL_SERVER: an https:// URL is required" ;;
esac

work=$(mktemp -d "${TMPDIR:-/tmp}/first-boot-enroll.XXXXXX") ||
    die "$EXIT_CONFIG" "cannot create a temporary directory"
trap 'rm -rf "$work"' EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

attempt=0

# one_line TEXT: newlines and carriage returns to spaces, at most 500 characters.
one_line() {
    printf '%s' "$1" | tr '\r\n' '  ' | cut -c1-500
}

# write_status RESULT EXIT_CODE [KEY=value...]: replace the status file atomically.
write_status() {
    _failed=
    _dir=$(dirname "$ENROLL_STATUS_FILE")
    (umask 077 && mkdir -p "$_dir") 2>/dev/null  # the state dir: 0700, as enroll-device
    {
        printf 'result=%s\nexit_code=%s\ntime=%s\nattempts=%s\n' "$1" "$2" "$(now_utc)" \
            "$attempt"
        printf 'server=%s\ngroup=%s\nstate_dir=%s\n' "$server" "$ENROLL_GROUP" \
            "$ENROLL_STATE_DIR"
        shift 2
        for _line in "$@"; do printf '%s\n' "$(one_line "$_line")"; done
    } >"$ENROLL_STATUS_FILE.tmp.$$" || _failed=yes
    if [ -n "${_failed:-}" ] || ! mv -f "$ENROLL_STATUS_FILE.tmp.$$" "$ENROLL_STATUS_FILE"; then
        log warning "cannot write the status file $ENROLL_STATUS_FILE"
    fi
}

finish() {  # finish RESULT EXIT_CODE [KEY=value...]
    write_status "$@"
    exit "$2"
}

# json_field NAME FILE: a string field of enroll-device's one-line JSON answer.
json_field() {
    sed -n "s/.*\"$1\": *\"\([^\"]*\)\".*/\1/p" "$2" | head -n 1
}

# enrolled_locally: the state dir holds a complete enrollment (the enroll-device check
# that follows also compares the certificate with the TPM's key: this one only decides
# whether the network is needed).
enrolled_locally() {
    [ -s "$ENROLL_STATE_DIR/device.crt.pem" ] && [ -s "$ENROLL_STATE_DIR/chain.pem" ] &&
        [ -s "$ENROLL_STATE_DIR/device.key.tss.pem" ] && [ -s "$ENROLL_STATE_DIR/status.json" ]
}

# backoff ATTEMPT: sleep min(MAX, INITIAL * 2^(ATTEMPT-1)) ms, half of it fixed and half
# uniformly random ("equal jitter": never zero, never in step across a fleet).
backoff() {
    _delay=$ENROLL_RETRY_INITIAL_MS
    _i=1
    while [ "$_i" -lt "$1" ] && [ "$_delay" -lt "$ENROLL_RETRY_MAX_MS" ]; do
        _delay=$((_delay * 2))
        _i=$((_i + 1))
    done
    [ "$_delay" -le "$ENROLL_RETRY_MAX_MS" ] || _delay=$ENROLL_RETRY_MAX_MS
    _random=$(od -An -N4 -tu4 /dev/urandom | tr -d ' \n')
    _ms=$((_delay / 2 + ${_random:-0} % (_delay / 2 + 1)))
    log info "attempt $1 of $ENROLL_RETRY_ATTEMPTS failed; next in ${_ms} ms"
    sleep "$((_ms / 1000)).$(printf '%03d' $((_ms % 1000)))"
}

# -- 1. local state ----------------------------------------------------------------------
if grep -q '"state": *"revoked"' "$ENROLL_STATE_DIR/status.json" 2>/dev/null; then
    reason=$(sed -n 's/.*"reason": *"\([^"]*\)".*/\1/p' "$ENROLL_STATE_DIR/status.json")
    log err "this device's certificate was REVOKED (reason: ${reason:-unspecified})." \
        "Not enrolling again automatically: re-provisioning needs an operator" \
        "(who then removes $ENROLL_STATE_DIR). Details in $ENROLL_STATUS_FILE"
    finish revoked "$EXIT_REVOKED" "reason=${reason:-unspecified}" \
        "hint=revoked devices are re-provisioned by an operator"
fi

# -- 2. firmware measurement (once per boot; the systemd unit normally did it) -------------
if [ -n "$ENROLL_FIRMWARE_IMAGE" ]; then
    "$HOOKS_DIR/measure-firmware.sh"
    measured=$?
    if [ "$measured" -ne 0 ]; then
        if [ "$measured" -eq "$EXIT_CONFIG" ]; then
            finish config-error "$EXIT_CONFIG" "hint=see measure-firmware in the journal"
        fi
        log err "the firmware measurement failed (measure-firmware.sh exit $measured):" \
            "not enrolling with an unmeasured boot"
        finish measure-failed "$EXIT_MEASURE" "measure_exit=$measured"
    fi
fi

# -- 3. attempts ----------------------------------------------------------------------------
failure=transient
detail=
while [ "$attempt" -lt "$ENROLL_RETRY_ATTEMPTS" ]; do
    [ "$attempt" -eq 0 ] || backoff "$attempt"
    attempt=$((attempt + 1))

    now=$(date +%s)
    if [ "$now" -lt "$ENROLL_TIME_FLOOR" ]; then
        failure=transient
        detail="clock not set: $(date -u +%Y-%m-%dT%H:%M:%SZ) is before the floor"
        detail="$detail $ENROLL_TIME_FLOOR (ENROLL_TIME_FLOOR); TLS needs the right time"
        log warning "attempt $attempt: $detail"
        continue
    fi

    if ! enrolled_locally; then
        curl -fsS --max-time "$ENROLL_PROBE_TIMEOUT" --cacert "$ENROLL_SERVER_CA" \
            -o /dev/null "$server/.well-known/est/cacerts" 2>"$work/probe.err"
        probe=$?
        if [ "$probe" -eq 77 ]; then  # curl: "problem reading the SSL CA cert"
            log err "the server CA file $ENROLL_SERVER_CA cannot be used:" \
                "$(one_line "$(cat "$work/probe.err")")"
            finish config-error "$EXIT_CONFIG" "message=ENROLL_SERVER_CA is not a usable CA file"
        fi
        if [ "$probe" -ne 0 ]; then
            failure=transient
            detail="server not reachable: $(one_line "$(cat "$work/probe.err")")"
            log warning "attempt $attempt: $detail"
            continue
        fi
    fi

    set -- enroll --server "$server" --server-ca "$ENROLL_SERVER_CA" --tcti "$ENROLL_TCTI" \
        --state-dir "$ENROLL_STATE_DIR" --timeout "$ENROLL_HTTP_TIMEOUT" --json
    [ -z "$ENROLL_GROUP" ] || set -- "$@" --group "$ENROLL_GROUP"
    "$ENROLL_DEVICE_BIN" "$@" >"$work/out" 2>"$work/err"
    rc=$?
    while IFS= read -r line; do log info "enroll-device: $line"; done <"$work/err"

    case $rc in
        0)
            outcome=$(json_field outcome "$work/out")
            device_id=$(json_field device_id "$work/out")
            serial=$(json_field serial "$work/out")
            log notice "${outcome:-enrolled}: device $device_id, certificate serial $serial"
            finish "${outcome:-enrolled}" "$EXIT_OK" "device_id=$device_id" "serial=$serial" \
                "not_after=$(json_field not_after "$work/out")"
            ;;
        3)
            # enroll-device prints "error: EST <http status> <code>: <message>".
            line=$(grep -m 1 '^error: EST ' "$work/err")
            status=$(printf '%s' "$line" | sed -n 's/^error: EST \([0-9]*\) .*/\1/p')
            code=$(printf '%s' "$line" | sed -n 's/^error: EST [0-9]* \([^:]*\):.*/\1/p')
            message=$(printf '%s' "$line" | sed -n 's/^error: EST [0-9]* [^:]*: *//p')
            case "$status:$code" in
                0:* | 202:* | 408:* | 429:* | 5??:* | 200:client.bad_response | :)
                    failure=transient
                    detail="enroll-device: $(one_line "${line:-exit 3 without an error line}")"
                    ;;
                *)
                    log err "REFUSED by the enrollment server: $code (HTTP $status):" \
                        "$message. Not retrying: this device needs an operator. Details" \
                        "for support in $ENROLL_STATUS_FILE"
                    finish refused "$EXIT_REFUSED" "http_status=$status" "error_code=$code" \
                        "message=$message" \
                        "hint=the server's audit log has the full reason for this error code"
                    ;;
            esac
            ;;
        4)
            failure=tpm
            detail="TPM error: $(one_line "$(grep -m 1 '^error' "$work/err")")"
            ;;
        2)
            finish config-error "$EXIT_CONFIG" \
                "message=enroll-device rejected its arguments: $(one_line "$(cat "$work/err")")"
            ;;
        *)
            failure=transient
            detail="enroll-device exit $rc: $(one_line "$(tail -n 1 "$work/err")")"
            ;;
    esac
    log warning "attempt $attempt: $detail"
done

if [ "$failure" = tpm ]; then
    log err "giving up after $attempt attempts: $detail"
    finish tpm-error "$EXIT_TPM" "message=$detail"
fi
log err "giving up for now after $attempt attempts: $detail"
finish transient "$EXIT_TEMPFAIL" "message=$detail" \
    "hint=transient: the device retries (systemd restarts enroll-device-first-boot.service)"
