"""The template's zygote: one clean process per template version that has imported the agent
(and, beside it, one that has imported the Python kernel) and forks each new sandbox's
processes from that image, so a warm entry shares those pages instead of importing them
again. Runs inside the template's jail user namespace, never as host root."""
