"""Starts the in-sandbox agent (package `coppice_agent`) on the template's own python3.

The interpreter runs with -I -S: no site-packages, no environment, no script directory. Only
the agent's private directory goes on sys.path, so the agent sees exactly its locked
dependencies, and code run in the sandbox never sees them.
"""

import sys

sys.path.insert(0, "/usr/lib/coppice/site")

from coppice_agent.server import main

main()
