#!/bin/sh
# shellcheck source-path=SCRIPTDIR
# enroll-device-agent.sh: run `enroll-device agent` with /etc/enroll-device.conf (or
# $ENROLL_DEVICE_CONF): renewal before expiry and signed notices over MQTT. Extra
# arguments are passed on (e.g. --json). enroll-device-agent.service runs it.
#
# Exit status: enroll-device agent's own (it replaces this shell), notably
#   0   stopped (SIGTERM)          3  refused renewal and fresh enrollment
#   4   TPM error                  5  not enrolled (no certificate in the state dir)
#   10  REVOKED: do not restart (the unit has RestartPreventExitStatus=10)
# and 2 for a configuration error found here.
set -u
PROG=enroll-device-agent
case $0 in */*) HOOKS_DIR=${0%/*} ;; *) HOOKS_DIR=. ;; esac
# shellcheck source=enroll-device-lib.sh
. "${ENROLL_HOOKS_DIR:-$HOOKS_DIR}/enroll-device-lib.sh"

load_config
require_value ENROLL_SERVER "${ENROLL_SERVER:-}"
require_value ENROLL_SERVER_CA "${ENROLL_SERVER_CA:-}"
require_value ENROLL_TCTI "$ENROLL_TCTI"
require_value ENROLL_STATE_DIR "$ENROLL_STATE_DIR"
require_value ENROLL_BROKER "$ENROLL_BROKER"
require_program "$ENROLL_DEVICE_BIN"

[ -z "$ENROLL_BROKER_CA" ] || set -- --broker-ca "$ENROLL_BROKER_CA" "$@"
[ -z "$ENROLL_GROUP" ] || set -- --group "$ENROLL_GROUP" "$@"
exec "$ENROLL_DEVICE_BIN" agent --state-dir "$ENROLL_STATE_DIR" --tcti "$ENROLL_TCTI" \
    --server "${ENROLL_SERVER%/}" --server-ca "$ENROLL_SERVER_CA" --broker "$ENROLL_BROKER" \
    --timeout "$ENROLL_HTTP_TIMEOUT" "$@"
