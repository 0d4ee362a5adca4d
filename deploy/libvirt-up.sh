#!/bin/sh
# Start virtlogd and libvirtd as plain daemons if they are not running, then
# wait until qemu:///system answers. Idempotent; needs no systemd, so it works
# in containers and CI. Run as root.
set -eu

URI=qemu:///system
WAIT_SECONDS=${LIBVIRT_UP_TIMEOUT:-30}

answers() {
    virsh -c "$URI" list >/dev/null 2>&1
}

for tool in virsh virtlogd libvirtd; do
    command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin"
    command -v "$tool" >/dev/null 2>&1 || {
        echo "libvirt-up: $tool not found; install libvirt-daemon-system and qemu-system-x86" >&2
        exit 1
    }
done

# libvirtd probes qemu with KVM when /dev/kvm exists; if only root can open it, the
# probe result never matches later checks and libvirtd re-probes on every define
# (seconds each, serialised). Debian's udev rule makes it root:kvm 0660; restore that.
if [ -c /dev/kvm ] && getent group kvm >/dev/null 2>&1; then
    chgrp kvm /dev/kvm && chmod 660 /dev/kvm || true
fi

# qemu's serial and console logs go through virtlogd, so it must be up first
if answers; then
    exit 0
fi
pgrep -x virtlogd >/dev/null 2>&1 || virtlogd -d
pgrep -x libvirtd >/dev/null 2>&1 || libvirtd -d

waited=0
until answers; do
    if [ "$waited" -ge "$WAIT_SECONDS" ]; then
        echo "libvirt-up: $URI did not answer within ${WAIT_SECONDS}s:" >&2
        virsh -c "$URI" list >&2 || true
        exit 1
    fi
    sleep 1
    waited=$((waited + 1))
done
