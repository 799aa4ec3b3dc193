#!/bin/sh
# PID 1 of a Coppice VM (no systemd): mount the kernel filesystems, configure the network
# and hostname from the kernel command line, start sshd and the in-sandbox agent, then reap
# orphans forever. The root is an overlay whose writable layer is the VM's own disk (see the
# initramfs's /init), so whatever is written here stays inside this VM.
#
# Command line: coppice.ip=A.B.C.D/PREFIX coppice.gw=A.B.C.D coppice.hostname=NAME
#               coppice.entry=ENTRY_ID (all optional)
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
umask 022

log() {
    echo "coppice vm-init: $*"
}

mounted() {
    grep -q "^[^ ]* $1 " /proc/mounts
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
# The initramfs normally hands its devtmpfs over already.
mounted /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
# /tmp stays on the root, so files written there count against the disk, as on E2B, not
# against the guest's RAM.

ip_cidr=
gateway=
name=sandbox
entry=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        coppice.ip=*) ip_cidr="${arg#*=}" ;;
        coppice.gw=*) gateway="${arg#*=}" ;;
        coppice.hostname=*) name="${arg#*=}" ;;
        coppice.entry=*) entry="${arg#*=}" ;;
    esac
done
address="${ip_cidr%/*}"

ip link set lo up
if [ -n "$ip_cidr" ]; then
    ip link set eth0 up || log "no eth0"
    ip addr add "$ip_cidr" dev eth0 || log "cannot set address $ip_cidr"
    if [ -n "$gateway" ]; then
        ip route add default via "$gateway" || log "cannot route via $gateway"
    fi
fi

# The resolver the gateway runs on the bridge (it enforces the sandbox's domain rules).
if [ -n "$gateway" ]; then
    printf 'nameserver %s\n' "$gateway" >/etc/resolv.conf
fi
echo "$name" >/proc/sys/kernel/hostname
echo "$name" >/etc/hostname
if [ -n "$address" ]; then
    printf '127.0.0.1 localhost\n%s %s\n' "$address" "$name" >/etc/hosts
else
    printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$name" >/etc/hosts
fi

# The template ships no host key, so that no two VMs share one unless restored from the
# same snapshot (the host replaces it then).
mkdir -p /run/sshd
if [ ! -s /etc/ssh/ssh_host_ed25519_key ]; then
    ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
fi
# The OOM killer spares what runs the sandbox: -1000 here is inherited by sshd and the
# agent; the agent starts user processes, and sshd its sessions, as its candidates.
echo -1000 >/proc/self/oom_score_adj
/usr/sbin/sshd -E /var/log/sshd.log || log "sshd did not start (see /var/log/sshd.log)"

export COPPICE_ENTRY_ID="$entry" COPPICE_IP="$address" COPPICE_HOSTNAME="$name"
export HOME=/root
cd /root || cd /
# A shell starts background commands with SIGINT and SIGQUIT ignored, and every process
# the agent runs for a user would inherit that; restore the defaults a jail's agent has.
env --default-signal=INT,QUIT python3 -I -S /usr/lib/coppice/agent.py \
    </dev/null >>/var/log/coppice-agent.log 2>&1 &

# Orphans are re-parented to PID 1. `wait` reaps every child that exits while it blocks,
# whether the shell started it or not, and so does waiting for `sleep` once the agent has
# gone, so zombies never pile up.
while :; do
    wait
    sleep 1
done
