"""Starting user processes as the OOM killer's candidates.

The agent keeps the oom_score_adj the sandbox's init chain has: -1000 (the OOM killer never
picks it) where the host could set that, else 0. Every user process (commands, PTYs,
kernels, the template's start command, sudo children) starts through a wrapper that raises
its own oom_score_adj to USER_OOM_SCORE_ADJ and then execs the command, so the value is in
place before the command runs and everything it forks inherits it. When the sandbox runs
out of memory a user process dies, and the agent reports its exit.

Raising is always allowed; lowering is allowed down to the oom_score_adj_min a process
inherited (see the jail's LAUNCHER), so a user process may lower itself back to the agent's
value: that can stall or upset only its own sandbox.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

#: what user processes get. The kernel ranks a process by its size plus adj/1000 of the
#: memory limit, so at 1000 a user process outranks the agent, sshd and init even where the
#: host could leave those only at 0 (unless the agent alone filled the limit); among user
#: processes the largest dies first.
USER_OOM_SCORE_ADJ = 1000
# util-linux's choom; an image without it gets the same from its /bin/sh.
CHOOM = "/usr/bin/choom"
SH = "/bin/sh"
_SH_SCRIPT = 'echo "$0" > /proc/self/oom_score_adj; exec "$@"'


def oom_candidate_argv(argv: Sequence[str], *, have_choom: bool | None = None) -> list[str]:
    """`argv` behind the wrapper that makes it an OOM candidate. The wrapper execs `argv`
    by the PATH of the environment it is given, as Popen would."""
    if have_choom is None:
        have_choom = os.access(CHOOM, os.X_OK)
    if have_choom:
        return [CHOOM, "-n", str(USER_OOM_SCORE_ADJ), "--", *argv]
    return [SH, "-c", _SH_SCRIPT, str(USER_OOM_SCORE_ADJ), *argv]
