"""Starts the template's zygote (coppice_agent.zygote) on the template's own python3, with
the same isolated interpreter and private sys.path as the agent (guest/agent.py): its forks
become agents. argv[1]: the descriptor of its socket to the host."""

import sys

sys.path.insert(0, "/usr/lib/coppice/site")

from coppice_agent.zygote.main import main

main()
