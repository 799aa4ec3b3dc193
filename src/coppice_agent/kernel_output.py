"""Jupyter iopub messages → the objects `/execute` streams to the E2B code-interpreter SDK
(`e2b_code_interpreter/models.py`: `_parse_output` and `Result`)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

Event = dict[str, Any]

# MIME types the SDK's `Result` has a named field for; anything else goes into `extra`.
_RESULT_FIELDS: Mapping[str, str] = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    # E2B's own types, added by the code-interpreter image's IPython start-up
    # (recipe_files/code-interpreter/ipython): a DataFrame's columns, a figure's chart.
    "e2b/data": "data",
    "e2b/chart": "chart",
}

_BASE64_TYPES = frozenset({"image/png", "image/jpeg", "application/pdf"})

#: Added by the kernel (see kernels.py) next to text/plain when a cell's value is exactly a
#: `str`: the string itself. Ours alone, so never passed on.
STR_RESULT_MIME = "application/x-coppice-str"


def result_event(bundle: Mapping[str, Any], *, is_main_result: bool) -> Event:
    event: Event = {"type": "result"}
    extra: dict[str, Any] = {}
    for mime, value in bundle.items():
        if mime == STR_RESULT_MIME:
            continue
        field = _RESULT_FIELDS.get(mime)
        if field is None:
            extra[mime] = value
        elif mime in _BASE64_TYPES and isinstance(value, str):
            # Older IPython (Debian's) wraps base64 with newlines; clients want it plain.
            event[field] = "".join(value.split())
        else:
            event[field] = value
    plain = bundle.get(STR_RESULT_MIME)
    if is_main_result and isinstance(plain, str):
        # What E2B's server gives for a string value: `'a'` comes back as `a`.
        event["text"] = plain
    if extra:
        event["extra"] = extra
    event["is_main_result"] = is_main_result
    return event


def output_event(msg_type: str, content: Mapping[str, Any]) -> Event | None:
    """The wire event for one iopub message of the running cell, or None if it has none."""
    if msg_type == "stream":
        stream = "stderr" if content.get("name") == "stderr" else "stdout"
        return {"type": stream, "text": content.get("text", ""), "timestamp": time.time_ns()}
    if msg_type == "execute_result":
        return result_event(content.get("data", {}), is_main_result=True)
    if msg_type == "display_data":
        return result_event(content.get("data", {}), is_main_result=False)
    if msg_type == "error":
        return error_event(
            str(content.get("ename", "")),
            str(content.get("evalue", "")),
            "\n".join(content.get("traceback", [])),
        )
    if msg_type == "execute_input":
        return {"type": "number_of_executions", "execution_count": content.get("execution_count")}
    return None


def error_event(name: str, value: str, traceback: str) -> Event:
    return {"type": "error", "name": name, "value": value, "traceback": traceback}


END_OF_EXECUTION: Event = {"type": "end_of_execution"}


def encode(event: Event) -> bytes:
    # ensure_ascii: the SDK splits the body into lines with httpx, and a raw U+2028 or U+0085
    # inside a string could be taken for a line break there; escaped, every line is one object.
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"
