#!/bin/sh
# sshd's ForceCommand: every SSH session (a command, a login shell, scp, sftp) starts here,
# makes itself a candidate for the OOM killer as every process the agent starts for a user
# is (coppice_agent/oom.py), and runs what was asked. sshd itself keeps the oom_score_adj
# the sandbox's init gave it, so a session that fills the sandbox's memory dies, not sshd.
echo 1000 >/proc/self/oom_score_adj
shell=${SHELL:-/bin/sh}
if [ -n "${SSH_ORIGINAL_COMMAND+set}" ]; then
    exec "$shell" -c "$SSH_ORIGINAL_COMMAND"
fi
exec "$shell" -l
