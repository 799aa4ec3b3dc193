"""Template builds in the background: a queue, worker threads, and what each build leaves in
the store (its status, its log, its failure).

Builds of one template run one at a time, in the order they were started; builds of
different templates run side by side up to `parallelism` (a build keeps CPUs busy, so the
default is one at a time overall). The ASGI side only ever enqueues. A failed build changes
nothing that serves: the builder replaces the template's record only on success.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coppice.errors import CoppiceError, TemplateBuildError
from coppice.gateway.build_log import BuildLog
from coppice.images.build_files import BuildFiles, UploadedFiles
from coppice.images.spec import TemplateSpec
from coppice.progress import Progress
from coppice.store.records import BuildFailure, BuildLogEntry, TemplateRecord
from coppice.store.store import Store

log = logging.getLogger("coppice.builds")

#: builds a template: what the production gateway runs is `TemplateBuilder.build_spec`
BuildFunction = Callable[[TemplateSpec, BuildFiles, Progress], TemplateRecord]
#: how many of the last log lines a failure carries (E2B's reason.logEntries)
FAILURE_TAIL = 20
RESTARTED = "the gateway restarted during the build; build again"
STOPPED = "the gateway stopped before the build started; build again"


def build_files_dir(state_dir: Path, template: str) -> Path:
    """Where the uploaded archives of a template's COPY steps are kept."""
    return state_dir / "build-files" / template


@dataclass(frozen=True)
class QueuedBuild:
    build_id: str
    spec: TemplateSpec


class BuildService:
    def __init__(
        self,
        store: Store,
        state_dir: Path,
        build: BuildFunction,
        on_built: Callable[[TemplateRecord], object] = lambda _: None,
        parallelism: int = 1,
    ) -> None:
        self.store = store
        self.state_dir = state_dir
        self.build = build
        #: told of every template a build replaced (the pool keeper swaps its entries)
        self.on_built = on_built
        self.parallelism = max(1, parallelism)
        self._cond = threading.Condition()
        self._queue: list[QueuedBuild] = []
        self._active: set[str] = set()  # templates with a build running
        self._stopping = False
        self._workers: list[threading.Thread] = []

    # -- control --------------------------------------------------------------------------------

    def start(self) -> None:
        """Builds a previous process left running ended with it: say so, then serve."""
        for build_id in self.store.interrupt_builds(RESTARTED):
            log.warning("build %s was interrupted by a restart", build_id)
        for i in range(self.parallelism):
            worker = threading.Thread(target=self._work, name=f"template-build-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self, wait_s: float = 5.0) -> None:
        """Give up on queued builds and wait a little for running ones. A build still running
        after that is left to its (daemon) thread; the next start marks it interrupted."""
        with self._cond:
            self._stopping = True
            queued, self._queue = self._queue, []
            self._cond.notify_all()
        for job in queued:
            self.store.fail_build(job.build_id, BuildFailure(STOPPED))
        for worker in self._workers:
            worker.join(timeout=wait_s)

    def submit(self, build_id: str, spec: TemplateSpec) -> None:
        with self._cond:
            self._queue.append(QueuedBuild(build_id, spec))
            self._cond.notify_all()

    def busy(self, template: str) -> bool:
        """A build of `template` is queued or running."""
        with self._cond:
            return template in self._active or any(j.spec.name == template for j in self._queue)

    # -- the workers ----------------------------------------------------------------------------

    def _next(self) -> QueuedBuild | None:
        for i, job in enumerate(self._queue):
            if job.spec.name not in self._active:
                return self._queue.pop(i)
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                job = self._next()
                while job is None and not self._stopping:
                    self._cond.wait()
                    job = self._next()
                if job is None:
                    return
                self._active.add(job.spec.name)
            try:
                self.run(job)
            except Exception:
                log.exception("build %s failed unexpectedly", job.build_id)
            finally:
                with self._cond:
                    self._active.discard(job.spec.name)
                    self._cond.notify_all()

    def run(self, job: QueuedBuild) -> None:
        """One build, start to end, on the calling thread."""
        if not self.store.begin_build(job.build_id):
            return  # given up on while it waited
        progress = BuildLog(self.store, job.build_id)
        files = UploadedFiles(build_files_dir(self.state_dir, job.spec.name))
        failed: tuple[str, str | None, tuple[str, ...]] | None = None
        try:
            record = self.build(job.spec, files, progress)
        except TemplateBuildError as exc:
            failed = (str(exc), exc.step, exc.log_tail)
        except CoppiceError as exc:
            failed = (str(exc), progress.step, ())
        except Exception as exc:
            log.exception("build %s of %s crashed", job.build_id, job.spec.name)
            failed = (f"internal error in the builder: {exc!r}", None, ())
        progress.close()
        if failed is not None:
            self._fail(job, progress, *failed)
            return
        if not self.store.finish_build(job.build_id, record.recipe_hash):
            return
        try:
            self.on_built(record)
        except Exception:
            # The template is built and serving; only the swap of its pool is late.
            log.exception("replacing the pool of %s after its build", record.name)

    def _fail(
        self,
        job: QueuedBuild,
        progress: BuildLog,
        message: str,
        step: str | None,
        log_tail: tuple[str, ...],
    ) -> None:
        if log_tail:
            now = time.time()
            tail = tuple(
                BuildLogEntry(now, "error", line, step) for line in log_tail[-FAILURE_TAIL:]
            )
        else:
            newest = self.store.build_logs(job.build_id, limit=FAILURE_TAIL, newest_first=True)
            tail = tuple(reversed(newest))
        failure = BuildFailure(failure_message(job.spec, message, step, tail), step, tail)
        progress.log(f"build failed: {message}", "error", step)
        self.store.fail_build(job.build_id, failure)


def step_label(spec: TemplateSpec, step: str | None) -> str | None:
    """What E2B's step number names in the spec: "1" is the first of its steps."""
    if step is None or not step.isdigit():
        return step
    index = int(step) - 1
    if 0 <= index < len(spec.steps):
        return spec.steps[index].label().splitlines()[0][:120]
    return None


def failure_message(
    spec: TemplateSpec, message: str, step: str | None, tail: tuple[BuildLogEntry, ...]
) -> str:
    """What the SDK raises as its BuildException: the failing step, why, and the last lines
    the step printed (unless the reason already quotes them)."""
    where = ""
    if step is not None:
        label = step_label(spec, step)
        where = f" at step {step}" + (f" ({label})" if label and label != step else "")
    lines = [e.message for e in tail if e.message not in message]
    text = f"build of template {spec.name} failed{where}: {message}"
    if lines:
        text += "\nlast log lines:\n" + "\n".join(lines)
    return text
