"""Which built template a caller's `templateID` means: a template name, a recipe alias, or
`name:tag`, E2B's name for one build of a template.

Coppice serves one version of each template, its latest successful build. A tag that names
that build (or a build that made the very same image) means the template; a tag naming an
older build is refused, saying which build serves and by which tags.
"""

from __future__ import annotations

from coppice.config import Limits
from coppice.errors import NotFound, NotSupportedYet
from coppice.gateway.wire import build_id
from coppice.store.records import TemplateBuildRecord, TemplateRecord
from coppice.store.store import Store

#: the tag a build gets when it is asked for without one, and what `name` alone means
DEFAULT_TAG = "default"


class UnknownTemplate(NotFound):
    def __init__(self, template_id: str, known: list[str], detail: str = "") -> None:
        names = ", ".join(sorted(known)) or "none; build one with `coppice template build python`"
        why = f"; {detail}" if detail else ""
        super().__init__(f"template {template_id!r} was not found{why}; templates here: {names}")


class UnknownTag(NotFound):
    def __init__(self, template: str, tag: str, known: list[str]) -> None:
        tags = ", ".join(sorted(known)) or "none"
        super().__init__(f"template {template} has no tag {tag!r}; its tags: {tags}")


def split_ref(ref: str) -> tuple[str, str | None]:
    """`name:tag` into its parts; a bare name has no tag."""
    name, sep, tag = ref.partition(":")
    return name, (tag if sep else None)


class TemplateCatalog:
    def __init__(self, store: Store, default_limits: Limits | None = None) -> None:
        self.store = store
        #: what templates built without limits of their own run with (Settings.limits)
        self.default_limits = default_limits or Limits()

    def resolve(self, template_id: str) -> TemplateRecord:
        name, tag = split_ref(template_id)
        record = self._named(name)
        if tag is not None:
            self._check_tag(record, tag)
        return record

    def _named(self, name: str) -> TemplateRecord:
        built = {t.name: t for t in self.store.list_templates()}
        if name in built:
            return built[name]
        for record in built.values():
            if name in record.policy.aliases:
                return record
        known = [n for t in built.values() for n in (t.name, *t.policy.aliases)]
        raise UnknownTemplate(name, known, self._why_unbuilt(name))

    def _why_unbuilt(self, name: str) -> str:
        builds = self.store.list_builds(name)
        if not builds:
            return ""
        latest = builds[0]
        if latest.status == "error":
            return f"its latest build {latest.id} failed, and no build of it has succeeded"
        return f"its first build {latest.id} is {latest.status}; wait for it to finish"

    def _check_tag(self, record: TemplateRecord, tag: str) -> None:
        row = self.store.get_tag(record.name, tag)
        if row is None:
            if tag == DEFAULT_TAG:
                return  # never tagged: `name:default` is `name`
            raise UnknownTag(record.name, tag, [t.tag for t in self.store.list_tags(record.name)])
        build = self.store.get_build(row.build_id)
        if build is not None and build.recipe_hash == record.recipe_hash:
            return
        current = self.current_build(record)
        serving = [t.tag for t in self.store.list_tags(record.name) if t.build_id == current.id]
        by = f" (tags {', '.join(serving)})" if serving else ""
        raise NotSupportedYet(
            f"creating from {record.name}:{tag}, an older build ({row.build_id})",
            f"Coppice serves the latest build of each template: {current.id}{by}; "
            f"use {record.name!r}" + "".join(f" or '{record.name}:{t}'" for t in serving),
        )

    def current_build(self, record: TemplateRecord) -> TemplateBuildRecord:
        """The build that made the serving version: the newest ready build of it through the
        API, or (built some other way: the CLI, a recipe) the version itself, as a build."""
        for build in self.store.list_builds(record.name):
            if build.status == "ready" and build.recipe_hash == record.recipe_hash:
                return build
        return TemplateBuildRecord(
            id=build_id(record),
            template=record.name,
            status="ready",
            limits=record.policy.limits or self.default_limits,
            tags=(),
            created_at=record.built_at - record.build_seconds,
            updated_at=record.built_at,
            started_at=record.built_at - record.build_seconds,
            finished_at=record.built_at,
            recipe_hash=record.recipe_hash,
        )

    def history(
        self, record: TemplateRecord
    ) -> tuple[list[TemplateBuildRecord], TemplateBuildRecord]:
        """Every build of the template, newest first, and the serving one (among them)."""
        builds = self.store.list_builds(record.name)
        current = self.current_build(record)
        if all(b.id != current.id for b in builds):
            builds.append(current)
            builds.sort(key=lambda b: b.created_at, reverse=True)
        return builds, current

    def all(self) -> list[TemplateRecord]:
        return self.store.list_templates()
