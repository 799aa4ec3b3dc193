"""The in-sandbox agent: an envd-compatible daemon (port 49983) and a code interpreter
(port 49999) that run inside every sandbox, on the template's own python3.

It imports nothing from the host side of Coppice (`coppice.*`): templates ship this package
alone, with the dependencies locked in requirements.lock next to it.
"""
