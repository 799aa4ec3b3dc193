"""Starts the template's kernel zygote (coppice_agent.zygote.kernels) on the template's own
python3 with its site-packages, as a kernel runs. Only the zygote's own modules (standard
library alone) come from the agent's directory; it leaves sys.path before the kernel's
imports, so those come from the template as `python3 -m ipykernel_launcher`'s would.
argv[1]: the descriptor of its socket to the agent zygote."""

import sys

sys.path[0] = "/usr/lib/coppice/site"

from coppice_agent.zygote.kernels import main  # noqa: E402 - after the path is set

del sys.path[0]
main(int(sys.argv[1]))
