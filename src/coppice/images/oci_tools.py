"""Running skopeo and umoci: found on PATH or reported missing, always reaped, and never
letting a registry password reach a log line or an error message."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from coppice.errors import PrerequisiteMissing
from coppice.progress import Progress

OCI_TOOLS = ("skopeo", "umoci")
#: how many of a tool's last output lines an error quotes
TAIL_LINES = 20
#: how long a tool asked to stop gets before it is killed
STOP_GRACE_S = 5.0
REDACTED = "<password>"
#: the step a base's output and errors belong to, as the builder names it for every base
BASE_STEP = "base"


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: bytes
    #: stderr (or, streamed, both streams), with any secret already removed
    lines: tuple[str, ...]
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def tail(self, n: int = 5) -> str:
        return " | ".join(line for line in self.lines[-n:] if line) or "(no output)"


def require_oci_tools() -> None:
    for tool in OCI_TOOLS:
        if shutil.which(tool) is None:
            raise PrerequisiteMissing(
                f"{tool} is not installed (OCI image bases need skopeo and umoci); "
                "run scripts/setup"
            )


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, REDACTED) if secret else text


def capture(argv: Sequence[str], *, secret: str | None = None, timeout_s: float) -> Finished:
    """Run to the end (or the timeout, when it is killed) and keep stdout as bytes: exactly
    what skopeo printed, for tools whose output is data."""
    try:
        # No stdin: a tool that would prompt (skopeo, for a password) fails instead of hanging.
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if e.stderr else ""
        return Finished(-1, b"", _lines(err, secret), timed_out=True)
    return Finished(
        done.returncode, done.stdout, _lines(done.stderr.decode("utf-8", "replace"), secret)
    )


def stream(argv: Sequence[str], progress: Progress, *, secret: str | None = None) -> Finished:
    """Run to the end, each output line going to the build's log, as the base's, as it
    comes. Interrupted, the tool is stopped and reaped before this returns."""
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    tail: list[str] = []
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = redact(raw.strip(), secret)
            if line:
                progress.log(line, step=BASE_STEP)
            tail = [*tail[-(TAIL_LINES - 1) :], line]
        returncode = proc.wait()
    finally:
        _reap(proc)
    return Finished(returncode, b"", tuple(tail))


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _lines(text: str, secret: str | None) -> tuple[str, ...]:
    lines = [redact(line.strip(), secret) for line in text.splitlines()]
    return tuple(line for line in lines if line)[-TAIL_LINES:]
