"""What the control plane does with snapshots: take one of a caller's sandbox, list and
delete the caller's, and say which snapshot a `templateID` means. Plain synchronous calls
(the ASGI layer runs them in worker threads); nothing here knows HTTP."""

from __future__ import annotations

from dataclasses import dataclass

from coppice.errors import Conflict, InvalidRequest, NotFound, SnapshotNotFound
from coppice.gateway.auth import Principal
from coppice.gateway.catalog import TemplateCatalog, split_ref
from coppice.gateway.snapshot_wire import (
    SNAPSHOT_TAG,
    SnapshotQuery,
    SnapshotRequest,
    encode_snapshot_token,
)
from coppice.lifecycle import State
from coppice.pool.snapshots import SnapshotController
from coppice.store.records import HandedOut, SnapshotRecord
from coppice.store.store import Store

#: how every snapshot id starts, so a reference to a deleted one is told apart from a template
SNAPSHOT_ID_PREFIX = "snap-"


def find_snapshot(store: Store, tenant: str, ref: str) -> SnapshotRecord | None:
    """The tenant's ready snapshot `ref` names: its id or name, either bare, with the
    tenant's namespace (`tenant/name`) or with the `:default` tag. None: no such snapshot."""
    name, tag = split_ref(ref)
    if tag is not None and tag != SNAPSHOT_TAG:
        return None
    namespace, slash, bare = name.rpartition("/")
    if slash and namespace != tenant:
        return None
    found = store.get_snapshot(bare) or store.named_snapshot(tenant, bare)
    if found is None or found.tenant != tenant or found.purpose != "snapshot":
        return None
    return found if found.state == "ready" else None


def names_a_snapshot(ref: str) -> bool:
    """`ref` is shaped as a snapshot's id (so an unknown one is a snapshot not found)."""
    return split_ref(ref)[0].rpartition("/")[2].startswith(SNAPSHOT_ID_PREFIX)


@dataclass(frozen=True)
class SnapshotPage:
    items: list[SnapshotRecord]
    next_token: str | None


class SnapshotService:
    def __init__(
        self, store: Store, snapshots: SnapshotController, catalog: TemplateCatalog
    ) -> None:
        self.store = store
        self.snapshots = snapshots
        self.catalog = catalog

    def take(self, who: Principal, handed: HandedOut, req: SnapshotRequest) -> SnapshotRecord:
        """Snapshot the caller's running sandbox (`handed`, which the caller was shown)."""
        if handed.entry.state is not State.IN_USE:
            raise Conflict(
                f"sandbox {handed.sandbox.id} is {handed.entry.state.value.replace('_', ' ')}; "
                "a snapshot is taken of a running sandbox (connect() to a paused one first)"
            )
        if req.name is not None:
            self._refuse_template_name(req.name)
        return self.snapshots.take(handed.sandbox.id, who.tenant, req.name, req.memory)

    def _refuse_template_name(self, name: str) -> None:
        try:
            template = self.catalog.resolve(name)
        except NotFound:
            return
        raise InvalidRequest(
            f"{name!r} names template {template.name}; a snapshot needs a name of its own"
        )

    def page(self, who: Principal, query: SnapshotQuery) -> SnapshotPage:
        """The caller's ready snapshots, newest first, filtered and paged."""
        ordered = [
            s
            for s in reversed(self.store.list_snapshots(who.tenant))
            if s.purpose == "snapshot" and s.state == "ready"
        ]
        if query.sandbox_id is not None:
            ordered = [s for s in ordered if s.source_id == query.sandbox_id]
        if query.name is not None:
            named = find_snapshot(self.store, who.tenant, query.name)
            ordered = [s for s in ordered if named is not None and s.id == named.id]
        if query.after is not None:
            after = query.after
            ordered = [s for s in ordered if (s.created_at, s.id) < after]
        items = ordered[: query.limit]
        token = None
        if len(ordered) > query.limit:
            token = encode_snapshot_token(items[-1].created_at, items[-1].id)
        return SnapshotPage(items, token)

    def delete(self, who: Principal, ref: str) -> bool:
        """Delete the caller's snapshot `ref` names; False if it names none (then it may
        be a template)."""
        found = find_snapshot(self.store, who.tenant, ref)
        if found is None:
            if names_a_snapshot(ref):
                raise SnapshotNotFound(ref)
            return False
        self.snapshots.delete(found)
        return True
