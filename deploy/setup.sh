#!/usr/bin/env bash
# Make a Debian 12 machine ready to run and test Cirrus. Idempotent: it does
# only what is missing, so `make run` and `make test` call it every time.
# No systemd (containers and CI have none): daemons are started directly.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "setup: $*"; }

# Run a noisy command silently; show its output only if it fails.
quietly() {
    local log rc=0
    log=$(mktemp)
    "$@" >"$log" 2>&1 || rc=$?
    [ $rc -eq 0 ] || { cat "$log" >&2; say "failed ($rc): $*" >&2; }
    rm -f "$log"
    return $rc
}

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null; then
    SUDO=(sudo)
else
    say "run me as root (or install sudo): I install Debian packages and start daemons" >&2
    exit 1
fi
as_root() { "${SUDO[@]}" "$@"; }

# True when something accepts TCP connections on 127.0.0.1:$1.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() {  # port, what, seconds
    local i
    for ((i = 0; i < $3 * 5; i++)); do
        listening "$1" && return 0
        sleep 0.2
    done
    say "$2 did not start listening on 127.0.0.1:$1 within $3 s" >&2
    exit 1
}

# -- Debian packages ---------------------------------------------------------------
PACKAGES=(python3-venv python3-dev build-essential pkg-config libvirt-dev libpq-dev
          libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils busybox-static
          cpio genisoimage rabbitmq-server postgresql docker-compose)
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    quietly as_root apt-get update
    quietly as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        "${missing[@]}"
fi

# -- PostgreSQL ----------------------------------------------------------------------
pg_version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)
if [ -z "$pg_version" ]; then
    pg_version=$(ls /usr/lib/postgresql | sort -V | tail -n1)
    say "creating PostgreSQL $pg_version cluster main"
    as_root pg_createcluster "$pg_version" main >/dev/null
fi
if ! listening 5432; then
    say "starting PostgreSQL $pg_version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start
    wait_for_port 5432 PostgreSQL 30
fi
if ! psql -h 127.0.0.1 -U postgres -w -tAc 'SELECT 1' postgres >/dev/null 2>&1; then
    hba=/etc/postgresql/$pg_version/main/pg_hba.conf
    trust='host all postgres 127.0.0.1/32 trust  # added by cirrus deploy/setup.sh'
    if ! as_root grep -qxF "$trust" "$hba"; then
        say "PostgreSQL refused user postgres on 127.0.0.1: trusting it there in $hba (dev machine only)"
        as_root sed -i "1i $trust" "$hba"  # first line: pg_hba takes the first match
    fi
    as_root pg_ctlcluster --skip-systemctl-redirect "$pg_version" main reload
    sleep 1
    psql -h 127.0.0.1 -U postgres -w -tAc 'SELECT 1' postgres >/dev/null \
        || { say "still cannot connect to PostgreSQL as postgres on 127.0.0.1" >&2; exit 1; }
fi

# -- RabbitMQ ------------------------------------------------------------------------
if ! listening 5672; then
    say "starting RabbitMQ"
    as_root rabbitmq-server -detached
    as_root timeout 120 rabbitmqctl -q await_startup
    wait_for_port 5672 RabbitMQ 30
fi

# -- libvirt (libvirtd and virtlogd, for qemu:///system guests) -------------------------
if [ -f deploy/libvirt-up.sh ]; then
    as_root bash deploy/libvirt-up.sh
fi

# -- the virtualenv ----------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    python3 -m venv .venv
fi
# pip install reaches the network and takes a while: redo it only when the
# packaging changed since the last successful install.
stamp=.venv/.cirrus-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing Cirrus into .venv (pip install -e .[test])"
    quietly .venv/bin/pip install --disable-pip-version-check -e '.[test]'
    echo "$want" > "$stamp"
fi

# -- generated gRPC stubs -------------------------------------------------------------
.venv/bin/python -m cirrus.protogen
say "ready"
