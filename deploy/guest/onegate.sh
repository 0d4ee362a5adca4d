#!/bin/sh
# onegate.sh: OneGate from inside a guest, with POSIX sh and busybox wget only.
#
#   onegate.sh vm show [VMID]
#   onegate.sh vm update [VMID] --data KEY=VALUE [--data KEY=VALUE...]
#   onegate.sh vm update [VMID] --erase KEY
#   onegate.sh service show [--extended]
#   onegate.sh service scale --role ROLE --cardinality N
#
# It reads the context CD as OpenNebula's context packages do: ONEGATE_ENDPOINT
# and VMID from context.sh, the token from token.txt, in $ONEGATE_CONTEXT
# (default /mnt/context); ONEGATE_ENDPOINT, VMID and ONEGATE_TOKEN in the
# environment win. Answers (JSON) go to stdout; on an error the gate's status
# line goes to stderr and the exit code is 1 (2 for bad usage).
#
# busybox wget sends only GET and POST: a PUT goes as a POST with the header
# "X-HTTP-Method-Override: PUT", which the gate honours (and only for PUT).
set -u

die() { echo "onegate: $*" >&2; exit 2; }
usage() { sed -n '3,8p' "$0" >&2; exit 2; }

CONTEXT_DIR=${ONEGATE_CONTEXT:-/mnt/context}
endpoint=${ONEGATE_ENDPOINT:-}
vmid=${VMID:-}
token=${ONEGATE_TOKEN:-}
if [ -f "$CONTEXT_DIR/context.sh" ]; then
    # in subshells, so the context's other variables stay out of our way
    [ -n "$endpoint" ] || endpoint=$(. "$CONTEXT_DIR/context.sh"; printf '%s' "${ONEGATE_ENDPOINT:-}")
    [ -n "$vmid" ] || vmid=$(. "$CONTEXT_DIR/context.sh"; printf '%s' "${VMID:-}")
fi
[ -n "$token" ] || token=$(cat "$CONTEXT_DIR/token.txt" 2>/dev/null)
[ -n "$endpoint" ] || die "no ONEGATE_ENDPOINT (context.sh in $CONTEXT_DIR, or the environment)"
[ -n "$vmid" ] || die "no VMID (context.sh in $CONTEXT_DIR, or the environment)"
[ -n "$token" ] || die "no token ($CONTEXT_DIR/token.txt, or ONEGATE_TOKEN): is TOKEN = YES in CONTEXT?"
endpoint=${endpoint%/}

# request METHOD PATH [BODY]
request() {
    case $1 in
        GET) wget -q -O - --header "X-ONEGATE-TOKEN: $token" --header "X-ONEGATE-VMID: $vmid" \
                 "$endpoint$2" ;;
        POST) wget -q -O - --header "X-ONEGATE-TOKEN: $token" --header "X-ONEGATE-VMID: $vmid" \
                 --post-data "$3" "$endpoint$2" ;;
        *) wget -q -O - --header "X-ONEGATE-TOKEN: $token" --header "X-ONEGATE-VMID: $vmid" \
                 --header "X-HTTP-Method-Override: $1" --post-data "$3" "$endpoint$2" ;;
    esac
}

# KEY=VALUE -> KEY = "VALUE", with \ and " escaped as OpenNebula's syntax wants
attribute() {
    key=${1%%=*}
    [ "$key" != "$1" ] && [ -n "$key" ] || die "--data $1: expected KEY=VALUE"
    value=$(printf '%s' "${1#*=}" | sed 's/\\/\\\\/g; s/"/\\"/g')
    printf '%s = "%s"\n' "$key" "$value"
}

whole_number() { case $1 in ''|*[!0-9]*) return 1 ;; esac; }

[ $# -ge 2 ] || usage
noun=$1 verb=$2
shift 2
case "$noun $verb" in
    "vm show")
        if [ $# -ge 1 ]; then
            whole_number "$1" || die "vm show $1: not a VM id"
            request GET "/vms/$1"
        else
            request GET /vm
        fi ;;
    "vm update")
        path=/vm
        if [ $# -ge 1 ] && whole_number "$1"; then path=/vms/$1; shift; fi
        body="" erase=""
        while [ $# -gt 0 ]; do
            case $1 in
                --data) [ $# -ge 2 ] || usage; body="$body$(attribute "$2")
"; shift 2 ;;
                --erase) [ $# -ge 2 ] || usage; erase="$erase$2
"; shift 2 ;;
                *) usage ;;
            esac
        done
        if [ -n "$erase" ] && [ -n "$body" ]; then die "give --data or --erase, not both"; fi
        if [ -n "$erase" ]; then
            request PUT "$path?type=2" "$erase"
        elif [ -n "$body" ]; then
            request PUT "$path" "$body"
        else
            usage
        fi ;;
    "service show")
        if [ "${1:-}" = "--extended" ]; then request GET "/service?extended"; else request GET /service; fi ;;
    "service scale")
        role="" cardinality=""
        while [ $# -gt 0 ]; do
            case $1 in
                --role) [ $# -ge 2 ] || usage; role=$2; shift 2 ;;
                --cardinality) [ $# -ge 2 ] || usage; cardinality=$2; shift 2 ;;
                *) usage ;;
            esac
        done
        [ -n "$role" ] || die "service scale: --role is missing"
        whole_number "$cardinality" || die "service scale: --cardinality must be a whole number"
        request PUT "/service/role/$role" "{\"cardinality\": $cardinality}" ;;
    *) usage ;;
esac
