"""The E2B-compatible gateway: control plane (REST), in-sandbox routing, background keeper."""
