"""iopub message → wire event mapping, read back with the SDK's own line parser."""

from __future__ import annotations

from typing import Any

from e2b_code_interpreter.models import Execution, parse_output

from coppice_agent.kernel_output import (
    END_OF_EXECUTION,
    STR_RESULT_MIME,
    encode,
    output_event,
    result_event,
)


def parse(*messages: tuple[str, dict[str, Any]]) -> Any:
    execution = Execution()
    body = b""
    for msg_type, content in messages:
        event = output_event(msg_type, content)
        if event is not None:
            body += encode(event)
    body += encode(END_OF_EXECUTION)
    for line in body.decode().split("\n")[:-1]:
        parse_output(execution, line)
    return execution


def test_sdk_reads_every_kind_of_output() -> None:
    execution = parse(
        ("execute_input", {"code": "...", "execution_count": 7}),
        ("stream", {"name": "stdout", "text": "out\n"}),
        ("stream", {"name": "stderr", "text": "err\n"}),
        ("display_data", {"data": {"image/png": "iVBORw0KGgo=", "text/plain": "<img>"}}),
        ("clear_output", {"wait": False}),
        ("execute_result", {"data": {"text/plain": "42", "text/html": "<b>42</b>"}}),
        ("error", {"ename": "E", "evalue": "v", "traceback": ["a", "b"]}),
    )
    assert execution.execution_count == 7
    assert execution.logs.stdout == ["out\n"]
    assert execution.logs.stderr == ["err\n"]
    shown, main = execution.results
    assert shown.png == "iVBORw0KGgo="
    assert shown.is_main_result is False
    assert main.is_main_result is True
    assert main.html == "<b>42</b>"
    assert execution.text == "42"
    assert (execution.error.name, execution.error.value) == ("E", "v")
    assert execution.error.traceback == "a\nb"


def test_unknown_mime_types_go_to_extra() -> None:
    event = output_event(
        "display_data",
        {"data": {"application/vnd.custom+json": {"k": 1}, "application/json": {"a": [1]}}},
    )
    assert event == {
        "type": "result",
        "json": {"a": [1]},
        "extra": {"application/vnd.custom+json": {"k": 1}},
        "is_main_result": False,
    }


def test_each_event_is_exactly_one_line() -> None:
    line = encode({"type": "stdout", "text": "a\nb\r\u2028\u0085c", "timestamp": 1})
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert line.decode().splitlines() == [line.decode()[:-1]]


def test_wrapped_base64_images_come_out_plain() -> None:
    event = result_event({"image/png": "iVBORw0KGgo\nAAAA\n"}, is_main_result=False)
    assert event["png"] == "iVBORw0KGgoAAAA"


def test_a_str_main_result_is_the_string_and_the_marker_never_leaks() -> None:
    bundle = {"text/plain": "'a\\nb'", STR_RESULT_MIME: "a\nb"}
    execution = parse(("execute_result", {"data": bundle}))
    assert execution.text == "a\nb"
    assert execution.results[0].extra is None
    shown = result_event(bundle, is_main_result=False)
    assert shown == {"type": "result", "text": "'a\\nb'", "is_main_result": False}
