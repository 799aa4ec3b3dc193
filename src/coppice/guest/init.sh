#!/bin/sh
# PID 1 of every jail (bwrap --as-pid-1): start sshd and the in-sandbox agent, reap the
# orphans re-parented to PID 1, pass stop signals on, and end the jail when the agent ends.
# Identity comes from /etc/coppice-instance, written by the host when the entry is warmed.
#
# The kernel delivers to PID 1 only the signals it has a handler for, so a TERM, INT or HUP
# would otherwise be dropped: each is trapped and sent on to sshd and the agent.
set -eu
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
. /etc/coppice-instance
export COPPICE_ENTRY_ID COPPICE_IP COPPICE_HOSTNAME
mkdir -p /run/sshd
# sshd, the agent and this init keep the oom_score_adj the host's launcher gave them (see
# jail.py); the agent starts user processes, and sshd its sessions, as the OOM killer's
# candidates.
/usr/sbin/sshd -D -e 2>>/var/log/sshd.log &
sshd=$!
# A shell starts background commands with SIGINT and SIGQUIT ignored, and every process the
# agent runs for a user (a PTY's ^C, a kernel's interrupt) would inherit that.
env --default-signal=INT,QUIT python3 -I -S /usr/lib/coppice/agent.py &
agent=$!

forward() {
    kill -s "$1" "$agent" "$sshd" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP

# `wait` reaps every child that exits while it blocks, orphans included; a trapped signal
# ends it early, so wait again until the agent itself has exited.
status=0
while kill -0 "$agent" 2>/dev/null; do
    wait "$agent" && status=0 || status=$?
done
exit "$status"
