#!/bin/sh
# Runs inside every jail as its first program (bwrap's reaper is PID 1, this is PID 2):
# start sshd and the in-sandbox agent, then become the agent. Identity comes from
# /etc/coppice-instance, written by the host when the entry is warmed.
set -eu
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
. /etc/coppice-instance
export COPPICE_ENTRY_ID COPPICE_IP COPPICE_HOSTNAME
mkdir -p /run/sshd
/usr/sbin/sshd -D -e 2>>/var/log/sshd.log &
exec python3 -I -S /usr/lib/coppice/agent.py
