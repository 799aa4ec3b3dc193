"""A Dockerfile (E2B's `e2b.Dockerfile` convention) as a template spec.

E2B's own SDK turns a Dockerfile into its build API's steps (`Template().from_dockerfile`,
`Template.to_json`, both public), so a Dockerfile built here means what it means on E2B:
USER root and WORKDIR / while it runs, then `user` in /home/user unless it says otherwise,
CMD/ENTRYPOINT as the start command. What the SDK would only warn about and skip (an
instruction it does not carry out) fails the build here instead, naming the line.
"""

from __future__ import annotations

import json
from pathlib import Path

from e2b import Template
from e2b_dockerfile_utils import DockerfileSyntaxError, parse_dockerfile_ast

from coppice.config import Limits
from coppice.errors import TemplateBuildError
from coppice.images.build_files import ContextDir
from coppice.images.spec import TemplateSpec, spec_from_e2b

CARRIED_OUT = {"FROM", "RUN", "COPY", "ADD", "ENV", "WORKDIR", "USER", "ARG", "CMD", "ENTRYPOINT"}
#: metadata a sandbox has no use for, which E2B accepts and drops as well
DROPPED = {"EXPOSE", "VOLUME", "LABEL", "MAINTAINER"}


def spec_from_dockerfile(
    name: str,
    dockerfile: Path,
    context: Path | None = None,
    *,
    limits: Limits | None = None,
    substrate: str = "jail",
) -> tuple[TemplateSpec, ContextDir]:
    """The spec and where its COPY sources are (`context`, by default the Dockerfile's
    directory)."""
    context = (context or dockerfile.parent).resolve()
    try:
        text = dockerfile.read_text()
    except OSError as exc:
        raise TemplateBuildError(f"cannot read {dockerfile}: {exc.strerror}") from exc
    try:
        ast = parse_dockerfile_ast(text)
    except DockerfileSyntaxError as exc:
        raise TemplateBuildError(f"{dockerfile}: {exc}", step="base") from exc
    for instruction in ast.instructions:
        if instruction.name not in CARRIED_OUT | DROPPED:
            raise TemplateBuildError(
                f"{dockerfile} line {instruction.start_line}: {instruction.name} is not "
                f"supported; Coppice builds {', '.join(sorted(CARRIED_OUT))}",
                step="base",
            )
    try:
        template = Template(file_context_path=str(context)).from_dockerfile(text)
        body = json.loads(Template.to_json(template))
    except DockerfileSyntaxError as exc:
        raise TemplateBuildError(f"{dockerfile}: {exc}", step="base") from exc
    except ValueError as exc:
        # The SDK hashes every COPY source up front; a missing one fails here.
        raise TemplateBuildError(
            f"{dockerfile}: {exc} (COPY sources are relative to the context {context})",
            step="base",
        ) from exc
    return spec_from_e2b(name, body, limits=limits, substrate=substrate), ContextDir(context)
