"""What the template build API does, as plain synchronous calls on the store, the build
queue and the pool controller. The ASGI layer runs these in worker threads; nothing here
knows HTTP.

A template's id is its name. Asking for a build allocates it (waiting); the SDK then
uploads each COPY step's files and starts the build with its steps. A build that succeeds
replaces the template's version and takes its tags; one that fails leaves the serving
version as it was.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coppice.config import Settings
from coppice.errors import Conflict, Forbidden, InvalidRequest, NotFound, TemplateNotFound
from coppice.gateway.build_wire import BuildLogsQuery, BuildRequest, StatusQuery
from coppice.gateway.catalog import DEFAULT_TAG, TemplateCatalog, UnknownTag, UnknownTemplate
from coppice.gateway.keeper import PoolKeeper
from coppice.gateway.template_builds import BuildService, build_files_dir
from coppice.gateway.upload_urls import UploadSigner
from coppice.images.build_files import UploadedFiles, check_files_hash
from coppice.images.builder import TemplateBuilder
from coppice.images.oci_ref import LOCAL_TRANSPORTS
from coppice.images.spec import FromImage, spec_from_e2b
from coppice.lifecycle import HANDED_OUT_STATES
from coppice.pool.controller import PoolController
from coppice.store.records import (
    BuildLogEntry,
    TemplateBuildRecord,
    TemplateRecord,
    TemplateTagRecord,
)


class BuildNotFound(NotFound):
    def __init__(self, template: str, build_id: str) -> None:
        super().__init__(f"template {template} has no build {build_id}")


class TemplateService:
    def __init__(
        self,
        settings: Settings,
        controller: PoolController,
        keeper: PoolKeeper,
        catalog: TemplateCatalog,
        builds: BuildService,
        signer: UploadSigner | None = None,
    ) -> None:
        self.settings = settings
        self.controller = controller
        self.store = controller.store
        self.keeper = keeper
        self.catalog = catalog
        self.builds = builds
        self.signer = signer or UploadSigner()

    # -- lookups --------------------------------------------------------------------------------

    def _record(self, name: str) -> TemplateRecord | None:
        try:
            return self.store.get_template(name)
        except TemplateNotFound:
            return None

    def _known(self, template_id: str) -> str:
        """The name of a template that is built (by any of its names) or was asked for."""
        if self._record(template_id) is not None or self.store.list_builds(template_id):
            return template_id
        return self.catalog.resolve(template_id).name

    def build_record(self, template_id: str, build_id: str) -> TemplateBuildRecord:
        build = self.store.get_build(build_id)
        if build is None or build.template != template_id:
            raise BuildNotFound(template_id, build_id)
        return build

    # -- a build, start to end ------------------------------------------------------------------

    def request_build(self, req: BuildRequest) -> tuple[TemplateBuildRecord, tuple[str, ...]]:
        """A new build of `req.name`, waiting for its steps; returns it and the template's
        aliases."""
        existing = self._record(req.name)
        if existing is None:
            for other in self.catalog.all():
                if req.name in other.policy.aliases:
                    raise InvalidRequest(
                        f"{req.name!r} is another name of template {other.name}; "
                        f"build {other.name} by that name, or choose another name"
                    )
        build = self.store.add_build(req.name, req.limits(self.settings.limits), req.tags)
        return build, existing.policy.aliases if existing is not None else ()

    def upload_link(self, template_id: str, files_hash: str, base_url: str) -> dict[str, Any]:
        """`TemplateBuildFileUpload`: whether the files are here, and where to `PUT` them."""
        name = self._known(template_id)
        present = self.uploads(name).is_present(check_files_hash(files_hash))
        return {"present": present, "url": self.signer.url(base_url, name, files_hash)}

    def uploads(self, template_id: str) -> UploadedFiles:
        return UploadedFiles(build_files_dir(self.settings.state_dir, template_id))

    def upload_target(
        self, template_id: str, files_hash: str, expires: str | None, signature: str | None
    ) -> Path:
        """Where a signed upload is written; raises Forbidden if the URL is not one of ours."""
        self.signer.check(template_id, files_hash, expires, signature)
        return self.uploads(template_id).archive_path(files_hash)

    def start_build(self, template_id: str, build_id: str, body: Mapping[str, Any]) -> None:
        build = self.build_record(template_id, build_id)
        spec = spec_from_e2b(template_id, body, limits=build.limits)
        if isinstance(spec.base, FromImage) and spec.base.ref.partition(":")[0] in LOCAL_TRANSPORTS:
            # A path on this host is the operator's to name (`coppice template build`), not
            # an API caller's: it would read any file of the host as an image.
            raise Forbidden(
                f"fromImage {spec.base.ref!r} names a path on the Coppice host; the build API "
                "takes registry images and well-known names, the CLI takes local images"
            )
        spec = dataclasses.replace(spec, pool_target=self.settings.built_template_pool_target)
        existing = self._record(template_id)
        if existing is not None:
            # A rebuild keeps what the template's other names and pool policy were.
            spec = dataclasses.replace(
                spec,
                aliases=existing.policy.aliases,
                cold_start=existing.policy.cold_start,
                pool_target=existing.policy.pool_target,
            )
        self.store.trigger_build(build_id)
        self.builds.submit(build_id, spec)

    def status(
        self, template_id: str, build_id: str, query: StatusQuery
    ) -> tuple[TemplateBuildRecord, list[BuildLogEntry]]:
        build = self.build_record(template_id, build_id)
        entries = self.store.build_logs(
            build_id, levels=query.levels, offset=query.offset, limit=query.limit
        )
        return build, entries

    def logs(self, template_id: str, build_id: str, query: BuildLogsQuery) -> list[BuildLogEntry]:
        self.build_record(template_id, build_id)
        at = None if query.cursor_ms is None else query.cursor_ms / 1000
        return self.store.build_logs(
            build_id,
            levels=query.levels,
            limit=query.limit,
            since=at if query.forward else None,
            until=None if query.forward else at,
            newest_first=not query.forward,
        )

    # -- templates ------------------------------------------------------------------------------

    def detail(
        self, template_id: str
    ) -> tuple[TemplateRecord | None, list[TemplateBuildRecord], TemplateBuildRecord | None]:
        """The template, its builds (newest first) and the one serving; no record and no
        serving build while none has succeeded."""
        try:
            record = self.catalog.resolve(template_id)
        except UnknownTemplate:
            builds = self.store.list_builds(template_id)
            if not builds:
                raise
            return None, builds, None
        builds, current = self.catalog.history(record)
        return record, builds, current

    def delete(self, template_id: str) -> None:
        """Remove a template, its builds, tags and uploaded files. Refused while it is in
        use, kept warm by configuration, or being built."""
        name = template_id
        record = self._record(name)
        if record is None and not self.store.list_builds(name):
            resolved = self.catalog.resolve(name)  # an alias: say whose, else a 404
            raise InvalidRequest(
                f"{name!r} is another name of template {resolved.name}; delete it by its name"
            )
        if name in self.keeper.configured:
            raise Conflict(
                f"template {name} is kept warm by pool_targets; remove it from there (and "
                "restart the gateway) before deleting it"
            )
        if self.builds.busy(name):
            raise Conflict(f"template {name} is being built; delete it when the build is over")
        in_use = [e for e in self.store.list_entries(name) if e.state in HANDED_OUT_STATES]
        if in_use:
            raise Conflict(f"template {name} has {len(in_use)} sandbox(es) in use; kill them first")
        # A snapshot's sandboxes start on its template's image: it must outlive them.
        kept = [s.id for s in self.store.list_snapshots() if s.template == name]
        if kept:
            raise Conflict(
                f"template {name} has {len(kept)} snapshot(s) ({', '.join(kept[:5])}); "
                "delete them first (Sandbox.delete_snapshot)"
            )
        if record is not None:
            self.controller.drain(name)
            TemplateBuilder(self.settings, self.store).remove(name)
            # What the driver keeps per template (a VM's golden snapshot) goes too.
            self.controller.substrate(record.substrate).forget_template(name)
        else:
            self.store.delete_template(name)  # asked for, never built: only its builds
        shutil.rmtree(build_files_dir(self.settings.state_dir, name), ignore_errors=True)

    # -- tags -----------------------------------------------------------------------------------

    def assign_tags(
        self, name: str, source_tag: str | None, tags: tuple[str, ...]
    ) -> TemplateBuildRecord:
        """Point `tags` at the build `name:source_tag` names (`name` alone: the serving one)."""
        record = self.catalog.resolve(name)
        build = self._tagged_build(record, source_tag)
        self.store.record_build(build)
        self.store.tag_build(record.name, build.id, tags)
        return build

    def _tagged_build(self, record: TemplateRecord, tag: str | None) -> TemplateBuildRecord:
        if tag is not None:
            row = self.store.get_tag(record.name, tag)
            if row is not None:
                found = self.store.get_build(row.build_id)
                if found is not None:
                    return found
            elif tag != DEFAULT_TAG:
                raise UnknownTag(
                    record.name, tag, [t.tag for t in self.store.list_tags(record.name)]
                )
        return self.catalog.current_build(record)

    def remove_tags(self, name: str, tags: tuple[str, ...]) -> None:
        template = self._known(name)
        missing = self.store.untag(template, tags)
        if missing:
            known = [t.tag for t in self.store.list_tags(template)]
            raise UnknownTag(template, ", ".join(missing), known)

    def tags(self, template_id: str) -> list[TemplateTagRecord]:
        return self.store.list_tags(self._known(template_id))
