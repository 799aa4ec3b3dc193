"""Coppice: self-hosted sandboxes for untrusted code, served from warm pools."""

__version__ = "0.1.0"
