#!/bin/busybox sh
# /init of a Coppice VM's initramfs: load the drivers Debian builds as modules, then hand
# over to the guest's own init on a root made of the template disk, read-only, under the
# VM's own writable disk. Every VM of a template, and every clone restored from its RAM
# snapshot, shares the template disk, so no guest may ever write to it: all writes land on
# the writable disk (coppice.rw_serial names it), or in a tmpfs of coppice.disk_mb when the
# VM has none (a plain boot of the image).
/bin/busybox --install -s /bin
export PATH=/bin

fail() {
    echo "coppice initramfs: $*"
    # init exiting panics the kernel; with panic=-1 and -no-reboot QEMU exits, which the
    # host notices, instead of a VM hanging here unseen.
    exit 1
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

while read -r module; do
    insmod "/lib/modules/$module" || fail "cannot load $module"
done </modules.order

disk_mb=1024
root_serial=
rw_serial=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        coppice.disk_mb=*) disk_mb="${arg#coppice.disk_mb=}" ;;
        coppice.root_serial=*) root_serial="${arg#*=}" ;;
        coppice.rw_serial=*) rw_serial="${arg#*=}" ;;
    esac
done
case "$disk_mb" in
    '' | *[!0-9]*) fail "coppice.disk_mb=$disk_mb is not a number of MiB" ;;
esac

# The disk whose virtio serial is $1, or /dev/vda when no serial is asked for.
disk_named() {
    if [ -z "$1" ]; then
        [ -b /dev/vda ] && echo /dev/vda
        return
    fi
    for serial in /sys/block/vd*/serial; do
        if [ -r "$serial" ] && [ "$(cat "$serial")" = "$1" ]; then
            dev="${serial%/serial}"
            echo "/dev/${dev##*/}"
            return
        fi
    done
}

# virtio-blk probes asynchronously; under TCG the disks can take a while to appear.
tries=0
while :; do
    root=$(disk_named "$root_serial")
    rw=
    [ -n "$rw_serial" ] && rw=$(disk_named "$rw_serial")
    [ -b "$root" ] && { [ -z "$rw_serial" ] || [ -b "$rw" ]; } && break
    tries=$((tries + 1))
    [ "$tries" -gt 1000 ] && fail "no root disk ${root_serial:-/dev/vda} or writable disk $rw_serial after 10 s"
    sleep 0.01
done

mount -t ext4 -o ro "$root" /lower || fail "cannot mount $root read-only"
if [ -n "$rw" ]; then
    # discard: what the guest deletes is given back to the host's disk.
    mount -t ext4 -o noatime,discard "$rw" /rw || fail "cannot mount the writable disk $rw"
else
    mount -t tmpfs -o "size=${disk_mb}m,mode=0755" tmpfs /rw || fail "cannot mount the tmpfs"
fi
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot ||
    fail "cannot mount the overlay root"

umount /proc /sys
mount --move /dev /newroot/dev || fail "cannot move /dev to the new root"
exec switch_root /newroot /usr/lib/coppice/vm-init
