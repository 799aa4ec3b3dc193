"""Which built template a caller's `templateID` means: a template name or a recipe alias."""

from __future__ import annotations

from coppice.errors import NotFound
from coppice.store.records import TemplateRecord
from coppice.store.store import Store


class UnknownTemplate(NotFound):
    def __init__(self, template_id: str, known: list[str]) -> None:
        names = ", ".join(sorted(known)) or "none; build one with `coppice template build python`"
        super().__init__(f"template {template_id!r} was not found; templates here: {names}")


class TemplateCatalog:
    def __init__(self, store: Store) -> None:
        self.store = store

    def resolve(self, template_id: str) -> TemplateRecord:
        built = {t.name: t for t in self.store.list_templates()}
        if template_id in built:
            return built[template_id]
        for record in built.values():
            if template_id in record.policy.aliases:
                return record
        known = [n for t in built.values() for n in (t.name, *t.policy.aliases)]
        raise UnknownTemplate(template_id, known)

    def all(self) -> list[TemplateRecord]:
        return self.store.list_templates()
