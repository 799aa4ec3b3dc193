#!/bin/busybox sh
# /init of a Coppice VM's initramfs: load the drivers Debian builds as modules, then hand
# over to the guest's own init on a root made of the template disk, read-only, under a
# tmpfs. Every VM of a template, and every clone restored from its RAM snapshot, shares
# that disk, so no guest may ever write to it: all writes land in guest RAM.
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
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        coppice.disk_mb=*) disk_mb="${arg#coppice.disk_mb=}" ;;
    esac
done
case "$disk_mb" in
    '' | *[!0-9]*) fail "coppice.disk_mb=$disk_mb is not a number of MiB" ;;
esac

# virtio-blk probes asynchronously; under TCG the disk can take a while to appear.
tries=0
while [ ! -b /dev/vda ]; do
    tries=$((tries + 1))
    [ "$tries" -gt 1000 ] && fail "no root disk /dev/vda after 10 s"
    sleep 0.01
done

mount -t ext4 -o ro /dev/vda /lower || fail "cannot mount /dev/vda read-only"
mount -t tmpfs -o "size=${disk_mb}m,mode=0755" tmpfs /rw || fail "cannot mount the tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot ||
    fail "cannot mount the overlay root"

umount /proc /sys
mount --move /dev /newroot/dev || fail "cannot move /dev to the new root"
exec switch_root /newroot /usr/lib/coppice/vm-init
