"""The agent's tools against a real local sandbox, with and without bubblewrap."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sandboxes.base import SandboxSpec
from sandboxes.providers.local import LocalProvider
from sessions.agent.tools import TOOL_SPECS, ToolError, ToolResult, execute_tool

TOOL_NAMES = {
    "bash",
    "read_file",
    "write_file",
    "edit_file",
    "list_files",
    "grep",
    "todo_write",
    "report_progress",
    "finish",
}


@pytest.fixture(params=["auto", "none"], ids=["auto-isolation", "no-isolation"])
def handle(request, settings, tmp_path):
    """Every tool test runs twice: isolated when the host has bubblewrap, and on the bare host."""
    settings.SANDBOX_ROOT = tmp_path / "sandboxes"
    settings.SANDBOX_ISOLATION = request.param
    provider = LocalProvider()
    handle = provider.create(SandboxSpec(session_id=1))
    handle.write_file("README.md", b"# Sample\nhello world\n")
    handle.write_file("src/app.py", b"def greet():\n    return 'hello'\n\n\nprint(greet())\n")
    handle.write_file("src/util.py", b"X = 1\nY = 2\nX = 1\n")
    handle.write_file(".git/config", b"hello from git\n")
    yield handle
    provider.destroy(handle.id)


@pytest.fixture
def outside(tmp_path, handle) -> Path:
    """A directory next to the sandbox with a file in it, and a symlink to it from the workspace."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "target.txt").write_text("hello outside\n")
    os.symlink(directory, handle.host_workspace / "out")
    os.symlink("/etc", handle.host_workspace / "etc-link")
    return directory


def run(handle, name, arguments, **kwargs) -> ToolResult:
    return execute_tool(handle, name, arguments, **kwargs)


# --- specs ------------------------------------------------------------------------------------


def test_it_describes_every_tool_with_a_strict_schema():
    assert {spec["name"] for spec in TOOL_SPECS} == TOOL_NAMES
    for spec in TOOL_SPECS:
        params = spec["parameters"]
        assert spec["description"]
        assert params["type"] == "object"
        assert params["additionalProperties"] is False
        assert set(params["required"]) <= set(params["properties"])
        for prop in params["properties"].values():
            assert "type" in prop
    json.dumps(TOOL_SPECS)


# --- bash -------------------------------------------------------------------------------------


def test_it_runs_bash_in_the_workspace_with_the_exit_code(handle):
    chunks = []
    result = run(
        handle,
        "bash",
        {"command": "pwd; echo shell=${BASH_VERSION:+bash}; ls src"},
        on_output=lambda stream, text: chunks.append(text),
    )
    assert result.ok
    assert result.output == f"{handle.workspace}\nshell=bash\napp.py\nutil.py\n[exit code 0]"
    assert "shell=bash" in "".join(chunks)


def test_it_reports_a_failing_command_with_its_output(handle):
    result = run(handle, "bash", '{"command": "echo out; echo err >&2; exit 3"}')
    assert not result.ok
    assert result.output == "out\nerr\n[exit code 3]"
    assert result.extra["exit_code"] == 3


def test_it_times_out_bash_and_says_so(handle):
    result = run(handle, "bash", {"command": "echo before; sleep 100", "timeout": 0.3})
    assert not result.ok
    assert result.output.startswith("before\n")
    assert "[timed out after 0.3 s" in result.output
    assert result.output.endswith("[exit code 124]")


def test_it_caps_the_bash_timeout_at_the_server_limit(handle, settings):
    settings.SANDBOX_EXEC_TIMEOUT = 1
    result = run(handle, "bash", {"command": "sleep 100", "timeout": 1000})
    assert result.extra["timed_out"] is True
    assert result.extra["duration"] < 10
    assert "[timed out after 1 s" in result.output


# --- files ------------------------------------------------------------------------------------


def test_it_reads_a_file_with_line_numbers(handle):
    result = run(handle, "read_file", {"path": "README.md"})
    assert result.ok
    assert result.output == "1\t# Sample\n2\thello world"


def test_it_reads_part_of_a_file(handle):
    result = run(handle, "read_file", {"path": "src/app.py", "offset": 2, "limit": 2})
    assert result.output == "2\t    return 'hello'\n3\t\n(lines 2-3 of 5)"


def test_it_refuses_an_offset_past_the_end(handle):
    with pytest.raises(ToolError, match="offset 9 is past the end of README.md \\(2 lines\\)"):
        run(handle, "read_file", {"path": "README.md", "offset": 9})


def test_it_reports_a_missing_file_to_the_model(handle):
    with pytest.raises(ToolError, match="read_file: no such file: nope.txt"):
        run(handle, "read_file", {"path": "nope.txt"})


def test_it_does_not_dump_binary_files(handle):
    handle.write_file("blob.bin", b"\x00\x01\x02" * 10)
    assert run(handle, "read_file", {"path": "blob.bin"}).output == "(blob.bin is a binary file of 30 bytes)"


def test_it_writes_a_file_and_its_directories(handle):
    result = run(handle, "write_file", {"path": "new/dir/notes.txt", "content": "ünïcode\n"})
    assert result.ok
    assert (handle.host_workspace / "new/dir/notes.txt").read_text() == "ünïcode\n"
    assert result.output == "wrote 10 bytes to new/dir/notes.txt"


def test_it_edits_one_exact_occurrence(handle):
    result = run(
        handle, "edit_file", {"path": "src/app.py", "old_string": "'hello'", "new_string": "'hi there'"}
    )
    assert result.ok
    assert result.output == "edited src/app.py at line 2"
    assert (handle.host_workspace / "src/app.py").read_text().splitlines()[1] == "    return 'hi there'"


def test_it_refuses_an_edit_whose_text_is_missing(handle):
    with pytest.raises(ToolError, match="old_string was not found in src/app.py"):
        run(handle, "edit_file", {"path": "src/app.py", "old_string": "goodbye", "new_string": "x"})


def test_it_refuses_an_edit_whose_text_is_not_unique(handle):
    before = (handle.host_workspace / "src/util.py").read_bytes()
    with pytest.raises(ToolError, match="appears 2 times in src/util.py"):
        run(handle, "edit_file", {"path": "src/util.py", "old_string": "X = 1", "new_string": "X = 3"})
    assert (handle.host_workspace / "src/util.py").read_bytes() == before


def test_it_refuses_an_empty_old_string(handle):
    with pytest.raises(ToolError, match="edit_file: 'old_string' must not be empty"):
        run(handle, "edit_file", {"path": "src/util.py", "old_string": "", "new_string": "x"})


def test_it_lists_files_without_git(handle):
    result = run(handle, "list_files", {})
    assert result.output == "README.md\nsrc/app.py\nsrc/util.py"
    assert run(handle, "list_files", {"path": "src"}).output == "src/app.py\nsrc/util.py"
    assert run(handle, "list_files", "").ok  # some models send no arguments at all


def test_it_greps_with_line_numbers_and_skips_git(handle):
    result = run(handle, "grep", {"pattern": "hello"})
    assert result.ok
    lines = sorted(result.output.splitlines())
    assert lines == ["./README.md:2:hello world", "./src/app.py:2:    return 'hello'"]
    assert run(handle, "grep", {"pattern": "greet", "path": "src"}).output.count("src/app.py") == 2


def test_it_says_when_grep_finds_nothing(handle):
    result = run(handle, "grep", {"pattern": "no such text anywhere"})
    assert result.ok
    assert result.output == "no matches for 'no such text anywhere' in ."


def test_it_reports_a_bad_grep_pattern(handle):
    with pytest.raises(ToolError, match="grep: .*"):
        run(handle, "grep", {"pattern": "[unclosed"})


def test_it_greps_patterns_that_look_like_options(handle):
    handle.write_file("flags.txt", b"use -v here\n")
    assert run(handle, "grep", {"pattern": "-v", "path": "flags.txt"}).output == "1:use -v here"


# --- plan, progress, finish -------------------------------------------------------------------


def test_it_records_the_todo_list(handle):
    todos = [
        {"content": "read the code", "status": "completed"},
        {"content": "fix the bug", "status": "in_progress"},
        {"content": "run the tests", "status": "pending"},
    ]
    result = run(handle, "todo_write", json.dumps({"todos": todos}))
    assert result.todos == todos
    assert result.output == "[x] read the code\n[~] fix the bug\n[ ] run the tests"


@pytest.mark.parametrize(
    ("todos", "message"),
    [
        ([{"content": "x", "status": "done"}], "'todos\\[0\\].status' must be one of 'pending', "),
        ([{"content": "x"}], "'todos\\[0\\].status' is required"),
        ([{"content": "", "status": "pending"}], "'todos\\[0\\].content' must not be empty"),
        ([{"content": "x", "status": "pending", "owner": "me"}], "unknown argument 'todos\\[0\\].owner'"),
        (["write tests"], "'todos\\[0\\]' must be an object, not str"),
        ("write tests", "'todos' must be an array, not str"),
    ],
)
def test_it_validates_the_todo_list(handle, todos, message):
    with pytest.raises(ToolError, match=f"todo_write: {message}"):
        run(handle, "todo_write", {"todos": todos})


def test_it_reports_progress_and_finishes(handle):
    progress = run(handle, "report_progress", {"message": "tests pass"})
    assert (progress.ok, progress.progress, progress.finished) == (True, "tests pass", False)
    done = run(handle, "finish", '{"summary": "fixed the bug"}')
    assert (done.ok, done.finished, done.summary) == (True, True, "fixed the bug")


# --- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "arguments", "message"),
    [
        ("read_file", '{"path": "README.md"', "read_file: arguments are not valid JSON"),
        ("read_file", '["README.md"]', "read_file: arguments must be a JSON object, not list"),
        ("read_file", {}, "read_file: 'path' is required"),
        ("write_file", {"path": "a.txt"}, "write_file: 'content' is required"),
        ("read_file", {"path": 3}, "read_file: 'path' must be a string, not int"),
        ("read_file", {"path": "a", "offset": "2"}, "read_file: 'offset' must be an integer, not str"),
        ("read_file", {"path": "a", "offset": True}, "read_file: 'offset' must be an integer, not bool"),
        ("read_file", {"path": "a", "offset": 0}, "read_file: 'offset' must be at least 1"),
        ("bash", {"command": "true", "timeout": 0}, "bash: 'timeout' must be greater than 0"),
        (
            "bash",
            {"command": "true", "cwd": "src"},
            "bash: unknown argument 'cwd' \\(expected: command, timeout\\)",
        ),
        ("finish", {}, "finish: 'summary' is required"),
        ("delete_everything", {}, "unknown tool 'delete_everything'; available tools: bash, "),
    ],
)
def test_it_rejects_bad_arguments_with_a_message_the_model_can_act_on(handle, name, arguments, message):
    with pytest.raises(ToolError, match=message):
        run(handle, name, arguments)


# --- the workspace boundary -------------------------------------------------------------------

ESCAPES = ["../../outside/target.txt", "/etc/passwd", "out/target.txt", "etc-link/passwd"]


@pytest.mark.parametrize("path", ESCAPES)
@pytest.mark.parametrize(
    ("name", "arguments"),
    [
        ("read_file", {}),
        ("write_file", {"content": "owned\n"}),
        ("edit_file", {"old_string": "hello", "new_string": "owned"}),
        ("list_files", {}),
        ("grep", {"pattern": "hello"}),
    ],
)
def test_it_keeps_every_path_taking_tool_inside_the_workspace(handle, outside, name, arguments, path):
    passwd = Path("/etc/passwd").read_bytes()
    with pytest.raises(ToolError, match=f"{name}: .* is outside the workspace"):
        run(handle, name, {"path": path, **arguments})
    assert sorted(p.name for p in outside.iterdir()) == ["target.txt"]
    assert (outside / "target.txt").read_text() == "hello outside\n"
    assert Path("/etc/passwd").read_bytes() == passwd


def test_it_writes_nothing_through_a_symlinked_directory(handle, outside):
    for path in ("out/new.txt", "out/deep/new.txt", "etc-link/owned"):
        with pytest.raises(ToolError, match="is outside the workspace"):
            run(handle, "write_file", {"path": path, "content": "owned"})
    assert sorted(p.name for p in outside.iterdir()) == ["target.txt"]
    assert not Path("/etc/owned").exists()
