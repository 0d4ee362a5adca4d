#!/bin/sh
# Build a tiny real guest for qemu from Debian packages only:
#   OUTDIR/vmlinuz     the kernel of linux-image-cloud-amd64
#   OUTDIR/initrd.img  busybox-static plus the virtio, CD-ROM and power button
#                      modules; its init prints "CIRRUS GUEST UP" on the serial
#                      console, powers off on an ACPI power button press, reads
#                      the context CD (label CONTEXT): sources its context.sh,
#                      adds ETH0_IP (with ETH0_MASK) to eth0 and prints
#                      "CONTEXT KEY=value" for each variable, and
#                      "CONTEXT64 KEY=<base64 of the value>" (exact bytes, even
#                      with newlines), then "CONTEXT APPLIED eth0 <addresses>",
#                      "DISK vda <its first line>" for each virtio disk, then
#                      "CIRRUS GUEST READY" when it has said all that; with
#                      REPORT_READY=YES in its context it then pushes READY=YES
#                      through OneGate (/bin/onegate, deploy/guest/onegate.sh,
#                      as OpenNebula's context packages do) and prints
#                      "ONEGATE READY=YES sent" (or why not), and otherwise idles.
#   OUTDIR/disk.qcow2  a 1 MiB disk image whose first line is "CIRRUS TINY DISK",
#                      to register as an image: the guest prints that line when
#                      it finds the disk (made with qemu-img).
# Boot it with KERNEL_CMDLINE "console=ttyS0". Idempotent: does nothing when
# OUTDIR already holds all three files of this version. Run as root (it may
# apt-get install).
set -eu

OUT=${1:?usage: build-tiny-guest.sh OUTDIR}
HERE=$(cd "$(dirname "$0")" && pwd)
MARKER="CIRRUS GUEST UP"
# Each module follows the ones it depends on: the virtio network first, then
# what a context CD needs (IDE or virtio-scsi CD-ROM, ISO 9660), then the ACPI
# power button, so that a graceful shutdown works.
MODULES="virtio_ring virtio failover net_failover virtio_pci_legacy_dev virtio_pci_modern_dev
virtio_pci virtio_net virtio_blk scsi_common scsi_mod cdrom sr_mod isofs libata ata_piix
virtio_scsi button evdev"

# bump when the guest changes, so that caches of older builds are rebuilt
VERSION=6
DISK_MARKER="CIRRUS TINY DISK"
if [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ] && [ -s "$OUT/disk.qcow2" ] \
        && [ "$(cat "$OUT/version" 2>/dev/null)" = "$VERSION" ]; then
    exit 0
fi

missing=""
# Debian's plain busybox is dynamically linked: the initramfs needs the static one
dpkg -s busybox-static >/dev/null 2>&1 || missing="$missing busybox-static"
command -v cpio >/dev/null 2>&1 || missing="$missing cpio"
command -v qemu-img >/dev/null 2>&1 || missing="$missing qemu-utils"
if [ -n "$missing" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"

# linux-image-cloud-amd64 is a metapackage: fetch the image it depends on.
# A machine whose apt lists were never fetched (a new container) knows no package yet.
apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || apt-get update -qq
cd "$WORK"
image=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$image" ] || { echo "build-tiny-guest: no kernel image behind linux-image-cloud-amd64" >&2; exit 1; }
apt-get download "$image" 2>&1 | grep -v "unsandboxed as root" || true
dpkg-deb -x "$WORK"/linux-image-*.deb "$WORK/kernel"
kver=$(ls "$WORK/kernel/lib/modules")

root="$WORK/initramfs"
mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys" "$root/tmp" "$root/lib/modules"
cp /bin/busybox "$root/bin/busybox"
cp "$HERE/onegate.sh" "$root/bin/onegate"
chmod 755 "$root/bin/onegate"
for module in $MODULES; do
    file=$(find "$WORK/kernel/lib/modules/$kver" -name "$module.ko*" | head -n 1)
    [ -n "$file" ] || { echo "build-tiny-guest: module $module not in $image" >&2; exit 1; }
    case "$file" in
        *.xz) xz -dc "$file" > "$root/lib/modules/$module.ko" ;;
        *.zst) zstd -qdc "$file" > "$root/lib/modules/$module.ko" ;;
        *) cp "$file" "$root/lib/modules/$module.ko" ;;
    esac
done
echo $MODULES > "$root/lib/modules/order"

cat > "$root/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
for module in \$(cat /lib/modules/order); do
    insmod /lib/modules/\$module.ko || echo "cirrus-guest: insmod \$module failed"
done
# qemu user-mode networking: the host is 10.0.2.2
if [ -e /sys/class/net/eth0 ]; then
    ip link set lo up
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
fi
# listen to the power button before saying we are up, so no press is lost
for input in /sys/class/input/input*; do
    if [ "\$(cat \$input/name 2>/dev/null)" = "Power Button" ]; then
        event=\$(basename \$(ls -d \$input/event* | head -n 1))
        # one input event is 24 bytes: wait for the press, then power off
        (dd if=/dev/input/\$event of=/dev/null bs=24 count=1 2>/dev/null
         echo "cirrus-guest: power button pressed, powering off"
         poweroff -f) &
    fi
done
echo "$MARKER"
# the context CD: by its label, else the first CD-ROM holding a context.sh
ctx=/mnt/context
mkdir -p \$ctx
for try in 1 2 3 4 5 6 7 8 9 10; do
    for dev in \$(findfs LABEL=CONTEXT 2>/dev/null) /dev/sr0 /dev/sr1 /dev/hdc /dev/hda; do
        [ -b "\$dev" ] || continue
        mount -t iso9660 -o ro "\$dev" \$ctx 2>/dev/null || continue
        [ -f \$ctx/context.sh ] && break 2
        umount \$ctx
    done
    sleep 1
done
if [ -f \$ctx/context.sh ]; then
    # values are single-quoted by the driver: sourcing runs nothing of theirs
    . \$ctx/context.sh
    for key in \$(sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p' \$ctx/context.sh); do
        eval "value=\\\$\$key"
        echo "CONTEXT \$key=\$value"
        # the exact bytes, on one line whatever the value holds
        echo "CONTEXT64 \$key=\$(printf '%s' "\$value" | base64 -w 0)"
    done
    [ -f \$ctx/token.txt ] && echo "CONTEXT token.txt present"
    # ETH0_IP beside the user-mode address, which keeps the host (10.0.2.2) reachable
    if [ -n "\${ETH0_IP:-}" ] && [ -e /sys/class/net/eth0 ]; then
        prefix=\$(ipcalc -p "\$ETH0_IP" "\${ETH0_MASK:-255.255.255.0}" 2>/dev/null | sed 's/PREFIX=//')
        ip addr add "\$ETH0_IP/\${prefix:-24}" dev eth0 \
            || echo "cirrus-guest: could not add \$ETH0_IP to eth0"
    fi
    echo "CONTEXT APPLIED eth0" \$(ip -4 addr show dev eth0 2>/dev/null | sed -n 's/.*inet \([0-9./]*\).*/\1/p')
else
    echo "cirrus-guest: no context CD"
fi
echo "cirrus-guest: disks" \$(ls /sys/block)
for disk in /dev/vd?; do
    [ -b "\$disk" ] && echo "DISK \${disk#/dev/} \$(head -c 256 \$disk | tr -d '\\000' | head -n 1)"
done
echo "CIRRUS GUEST READY"
# OneGate: tell the platform we are ready (OneFlow's READY gate waits for it)
if [ "\${REPORT_READY:-NO}" = "YES" ]; then
    sent=""
    for try in 1 2 3 4 5 6 7 8 9 10; do
        if ONEGATE_CONTEXT=\$ctx /bin/onegate vm update --data READY=YES >/dev/null; then
            sent=yes; break
        fi
        sleep 1
    done
    if [ -n "\$sent" ]; then echo "ONEGATE READY=YES sent"; else echo "ONEGATE READY=YES failed"; fi
fi
while :; do sleep 3600; done
INIT
chmod 755 "$root/init"

# write to temporary names and rename, so a half-built guest is never used
cp "$WORK"/kernel/boot/vmlinuz-* "$OUT/vmlinuz.tmp.$$"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$OUT/initrd.img.tmp.$$"
printf '%s\n' "$DISK_MARKER" | dd of="$WORK/disk.raw" bs=1M count=1 conv=sync 2>/dev/null
qemu-img convert -f raw -O qcow2 "$WORK/disk.raw" "$OUT/disk.qcow2.tmp.$$"
mv "$OUT/vmlinuz.tmp.$$" "$OUT/vmlinuz"
mv "$OUT/initrd.img.tmp.$$" "$OUT/initrd.img"
mv "$OUT/disk.qcow2.tmp.$$" "$OUT/disk.qcow2"
echo "$VERSION" > "$OUT/version"
echo "tiny guest in $OUT (kernel $kver)"
