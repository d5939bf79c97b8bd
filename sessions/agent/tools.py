"""The agent's tools, executed by the worker through a sandbox handle.

The model only ever sees ``TOOL_SPECS``; ``execute_tool`` validates its arguments against those same
specs (by hand, the schemas are small) so that every mistake comes back as a ``ToolError`` the model
can read and correct, never as a crash of the run.
"""

from __future__ import annotations

import json
import posixpath
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from sandboxes.base import LIST_FILES_LIMIT, PathEscape, SandboxError

TODO_STATUSES = ("pending", "in_progress", "completed")


class ToolError(Exception):
    """Bad arguments or a refused operation; reported to the model as a tool error, never fatal."""


@dataclass
class ToolResult:
    ok: bool
    output: str  # full text; the loop truncates it for the model and keeps the rest as an artifact
    finished: bool = False  # the `finish` tool was called
    summary: str | None = None  # finish{summary}
    todos: list[dict[str, str]] | None = None  # todo_write{todos}
    progress: str | None = None  # report_progress{message}
    extra: dict[str, Any] = field(default_factory=dict)


def _spec(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "description": description,
        "parameters": {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": False,
        },
    }


_PATH = {"type": "string", "description": "A path relative to the workspace root (or absolute under it)."}

# OpenAI-style function specs: [{"name", "description", "parameters": <JSON schema>}]
TOOL_SPECS: list[dict[str, Any]] = [
    _spec(
        "bash",
        "Run a shell command in the workspace (bash -lc, or sh -c when bash is missing). Returns stdout, "
        "stderr and the exit code. Each call starts in the workspace root with a fresh shell: `cd` and "
        "exported variables do not carry over, and background processes are stopped when the command "
        "returns. There is no interactive input.",
        {
            "command": {"type": "string", "description": "The command line to run."},
            "timeout": {
                "type": "number",
                "exclusiveMinimum": 0,
                "description": "Seconds before the command and its children are killed; capped by the "
                "server's limit, which is also the default.",
            },
        },
        ["command"],
    ),
    _spec(
        "read_file",
        "Read a text file. Lines come back numbered (`<number>\\t<line>`); the numbers are not part of the "
        "file. Use offset and limit to read part of a long file.",
        {
            "path": _PATH,
            "offset": {"type": "integer", "minimum": 1, "description": "First line to read (1-based)."},
            "limit": {"type": "integer", "minimum": 1, "description": "How many lines to read at most."},
        },
        ["path"],
    ),
    _spec(
        "write_file",
        "Create or overwrite a file with the given content. Parent directories are created.",
        {"path": _PATH, "content": {"type": "string", "description": "The complete new file content."}},
        ["path", "content"],
    ),
    _spec(
        "edit_file",
        "Replace one exact occurrence of old_string with new_string in a file. old_string must match the "
        "file exactly (whitespace included, no line numbers) and appear exactly once; add surrounding "
        "lines to make it unique.",
        {
            "path": _PATH,
            "old_string": {"type": "string", "minLength": 1, "description": "The exact text to replace."},
            "new_string": {"type": "string", "description": "The replacement text."},
        },
        ["path", "old_string", "new_string"],
    ),
    _spec(
        "list_files",
        f"List files under a directory recursively (relative to the workspace root; .git is skipped; at "
        f"most {LIST_FILES_LIMIT} entries).",
        {"path": {**_PATH, "description": "Directory to list; the workspace root by default."}},
        [],
    ),
    _spec(
        "grep",
        "Search file contents recursively with a regular expression (grep basic regex syntax; binary files "
        "and .git are skipped). Returns `path:line:text` for each match.",
        {
            "pattern": {"type": "string", "minLength": 1, "description": "The regular expression."},
            "path": {**_PATH, "description": "File or directory to search; the workspace root by default."},
        },
        ["pattern"],
    ),
    _spec(
        "todo_write",
        "Replace your visible plan with this list of todos. Keep it current: mark an item in_progress "
        "when you start it and completed when it is done.",
        {
            "todos": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "content": {"type": "string", "minLength": 1, "description": "What to do."},
                        "status": {"type": "string", "enum": list(TODO_STATUSES)},
                    },
                    "required": ["content", "status"],
                    "additionalProperties": False,
                },
            }
        },
        ["todos"],
    ),
    _spec(
        "report_progress",
        "Tell the person who asked for this work what you are doing, in one or two sentences.",
        {"message": {"type": "string", "minLength": 1, "description": "A short progress note."}},
        ["message"],
    ),
    _spec(
        "finish",
        "End the task. Call it once the work is done (or cannot be done), with a summary of what changed "
        "and anything the reviewer should check.",
        {"summary": {"type": "string", "minLength": 1, "description": "What you did and what to check."}},
        ["summary"],
    ),
]

_SPECS_BY_NAME = {spec["name"]: spec for spec in TOOL_SPECS}


# --- argument validation ------------------------------------------------------------------------

_JSON_TYPES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "array": "an array",
    "object": "an object",
}


def _type_ok(value: Any, expected: str) -> bool:
    if expected == "string":
        return isinstance(value, str)
    if expected == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected == "boolean":
        return isinstance(value, bool)
    if expected == "array":
        return isinstance(value, list)
    if expected == "object":
        return isinstance(value, dict)
    return True


def _validate(tool: str, where: str, value: Any, schema: dict[str, Any]) -> None:
    """The subset of JSON Schema that TOOL_SPECS uses; messages name the tool and the argument.

    ``where`` is the argument's path (``todos[0].status``), empty for the arguments object itself.
    """
    label = f"'{where}'" if where else "arguments"
    expected = schema.get("type")
    if expected and not _type_ok(value, expected):
        raise ToolError(f"{tool}: {label} must be {_JSON_TYPES[expected]}, not {type(value).__name__}")
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(repr(v) for v in schema["enum"])
        raise ToolError(f"{tool}: {label} must be one of {allowed}, not {value!r}")
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        raise ToolError(f"{tool}: {label} must not be empty")
    if "minimum" in schema and value < schema["minimum"]:
        raise ToolError(f"{tool}: {label} must be at least {schema['minimum']}")
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        raise ToolError(f"{tool}: {label} must be greater than {schema['exclusiveMinimum']}")
    if expected == "object":
        properties = schema.get("properties", {})
        prefix = f"{where}." if where else ""
        for name in schema.get("required", []):
            if name not in value:
                raise ToolError(f"{tool}: '{prefix}{name}' is required")
        if schema.get("additionalProperties") is False:
            unknown = sorted(set(value) - set(properties))
            if unknown:
                names = ", ".join(f"'{prefix}{n}'" for n in unknown)
                known = ", ".join(properties) or "none"
                raise ToolError(f"{tool}: unknown argument {names} (expected: {known})")
        for name, item in value.items():
            if name in properties:
                _validate(tool, f"{prefix}{name}", item, properties[name])
    if expected == "array" and "items" in schema:
        for index, item in enumerate(value):
            _validate(tool, f"{where}[{index}]", item, schema["items"])


def parse_arguments(name: str, arguments: dict[str, Any] | str | None) -> dict[str, Any]:
    """Arguments as the model sent them (a JSON string, usually) -> a validated dict."""
    spec = _SPECS_BY_NAME.get(name)
    if spec is None:
        raise ToolError(f"unknown tool {name!r}; available tools: {', '.join(_SPECS_BY_NAME)}")
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as exc:
            raise ToolError(f"{name}: arguments are not valid JSON ({exc}); send a JSON object") from None
    if not isinstance(arguments, dict):
        raise ToolError(f"{name}: arguments must be a JSON object, not {type(arguments).__name__}")
    _validate(name, "", arguments, spec["parameters"])
    return arguments


# --- execution ----------------------------------------------------------------------------------


def execute_tool(handle, name: str, arguments: dict[str, Any] | str, on_output=None) -> ToolResult:
    """Run one tool call. Raises ToolError for anything the model should correct and retry.

    A ``SandboxError`` from ``exec`` (the sandbox itself is broken) is not caught: that ends the run.
    """
    args = parse_arguments(name, arguments)
    try:
        return _TOOLS[name](handle, args, on_output)
    except PathEscape as exc:
        path = args.get("path", "")
        raise ToolError(
            f"{name}: {path!r} is outside the workspace; use a path relative to the workspace root "
            f"({handle.workspace}) [{exc}]"
        ) from None


def _bash(handle, args: dict[str, Any], on_output) -> ToolResult:
    limit = float(settings.SANDBOX_EXEC_TIMEOUT)
    timeout = min(float(args.get("timeout", limit)), limit)
    shell = ["bash", "-lc"] if _has_bash(handle) else ["sh", "-c"]
    result = handle.exec([*shell, args["command"]], timeout=timeout, on_output=on_output)
    text = result.output
    if text and not text.endswith("\n"):
        text += "\n"
    if result.timed_out:
        text += f"[timed out after {timeout:g} s: the command and its child processes were killed]\n"
    if result.cancelled:
        text += "[cancelled: the run was cancelled, so the command and its child processes were killed]\n"
    text += f"[exit code {result.exit_code}]"
    return ToolResult(
        ok=result.exit_code == 0 and not result.timed_out and not result.cancelled,
        output=text,
        extra={
            "exit_code": result.exit_code,
            "timed_out": result.timed_out,
            "cancelled": result.cancelled,
            "duration": result.duration,
        },
    )


# sandbox id -> whether bash exists there; bounded so a long-lived worker does not grow forever
_bash_cache: OrderedDict[str, bool] = OrderedDict()


def _has_bash(handle) -> bool:
    key = str(handle.id)
    if key not in _bash_cache:
        probe = handle.exec(["sh", "-c", "command -v bash"], timeout=30)
        if probe.cancelled:  # says nothing about the sandbox; the command will not run either
            return False
        _bash_cache[key] = probe.exit_code == 0
        while len(_bash_cache) > 1024:
            _bash_cache.popitem(last=False)
    return _bash_cache[key]


def _read(handle, tool: str, path: str) -> bytes:
    try:
        return handle.read_file(path)
    except PathEscape:
        raise
    except SandboxError as exc:
        raise ToolError(f"{tool}: {exc}") from None


def _read_file(handle, args: dict[str, Any], on_output) -> ToolResult:
    path = args["path"]
    data = _read(handle, "read_file", path)
    if b"\x00" in data[:8192]:
        return ToolResult(ok=True, output=f"({path} is a binary file of {len(data)} bytes)")
    lines = data.decode("utf-8", errors="replace").split("\n")
    if lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start another
    if not lines:
        return ToolResult(ok=True, output=f"({path} is empty)")
    offset = args.get("offset", 1)
    if offset > len(lines):
        raise ToolError(f"read_file: offset {offset} is past the end of {path} ({len(lines)} lines)")
    end = len(lines) if "limit" not in args else min(len(lines), offset - 1 + args["limit"])
    width = len(str(end))
    numbered = [f"{n:>{width}}\t{lines[n - 1]}" for n in range(offset, end + 1)]
    output = "\n".join(numbered)
    if offset > 1 or end < len(lines):
        output += f"\n(lines {offset}-{end} of {len(lines)})"
    return ToolResult(ok=True, output=output)


def _write(handle, tool: str, path: str, data: bytes) -> None:
    try:
        handle.write_file(path, data)
    except PathEscape:
        raise
    except SandboxError as exc:
        raise ToolError(f"{tool}: {exc}") from None


def _write_file(handle, args: dict[str, Any], on_output) -> ToolResult:
    data = args["content"].encode("utf-8")
    _write(handle, "write_file", args["path"], data)
    return ToolResult(ok=True, output=f"wrote {len(data)} bytes to {args['path']}")


def _edit_file(handle, args: dict[str, Any], on_output) -> ToolResult:
    path, old, new = args["path"], args["old_string"], args["new_string"]
    try:
        text = _read(handle, "edit_file", path).decode("utf-8")
    except UnicodeDecodeError:
        raise ToolError(f"edit_file: {path} is not UTF-8 text; use bash to change it") from None
    count = text.count(old)
    if count == 0:
        raise ToolError(
            f"edit_file: old_string was not found in {path}; read the file again and copy the text "
            "exactly (without line numbers)"
        )
    if count > 1:
        raise ToolError(
            f"edit_file: old_string appears {count} times in {path}; include more surrounding lines "
            "so that it matches exactly once"
        )
    if old == new:
        raise ToolError("edit_file: old_string and new_string are identical; nothing to change")
    _write(handle, "edit_file", path, text.replace(old, new, 1).encode("utf-8"))
    line = text[: text.index(old)].count("\n") + 1
    return ToolResult(ok=True, output=f"edited {path} at line {line}")


def _list_files(handle, args: dict[str, Any], on_output) -> ToolResult:
    path = args.get("path", ".")
    try:
        files = handle.list_files(path)
    except PathEscape:
        raise
    except SandboxError as exc:
        raise ToolError(f"list_files: {exc}") from None
    if not files:
        return ToolResult(ok=True, output=f"(no files under {path})")
    output = "\n".join(files)
    if len(files) >= LIST_FILES_LIMIT:
        output += f"\n(listing stopped at {LIST_FILES_LIMIT} entries; list a subdirectory to see more)"
    return ToolResult(ok=True, output=output)


def _grep(handle, args: dict[str, Any], on_output) -> ToolResult:
    path = args.get("path", ".")
    _check_in_sandbox(handle, "grep", path)
    argv = ["grep", "-rn", "-I", "--exclude-dir=.git", "-e", args["pattern"], "--", path]
    result = handle.exec(argv, timeout=float(settings.SANDBOX_EXEC_TIMEOUT))
    if result.cancelled:
        raise ToolError("grep: cancelled: the run was cancelled")
    if result.timed_out:
        raise ToolError(f"grep: timed out searching {path}; search a smaller directory")
    if result.exit_code == 1 and not result.stderr.strip():
        return ToolResult(ok=True, output=f"no matches for {args['pattern']!r} in {path}")
    if result.exit_code != 0 and not result.stdout:
        raise ToolError(f"grep: {result.stderr.strip() or f'exit code {result.exit_code}'}")
    output = result.stdout.rstrip("\n")
    if result.exit_code != 0:  # matches, plus some files grep could not read
        output += f"\n[grep: {result.stderr.strip()}]"
    return ToolResult(ok=True, output=output)


def _check_in_sandbox(handle, tool: str, path: str) -> None:
    """grep reads files inside the sandbox, so ask the sandbox where ``path`` really leads.

    ``realpath -m`` follows symlinks the way grep will; without it (a minimal image) the lexical
    check still refuses ``..`` and absolute paths outside the workspace.
    """
    workspace = handle.workspace.rstrip("/") or "/"
    lexical = posixpath.normpath(posixpath.join(workspace, path))
    candidates = [(workspace, lexical)]
    probe = handle.exec(["realpath", "-m", "--", ".", path], timeout=30)
    lines = probe.stdout.splitlines()
    if probe.exit_code == 0 and len(lines) == 2:
        candidates.append((lines[0], lines[1]))
    for root, target in candidates:
        if target != root and not target.startswith(root.rstrip("/") + "/"):
            raise ToolError(f"{tool}: {path!r} is outside the workspace ({handle.workspace})")


_TOOLS = {
    "bash": _bash,
    "read_file": _read_file,
    "write_file": _write_file,
    "edit_file": _edit_file,
    "list_files": _list_files,
    "grep": _grep,
    "todo_write": lambda handle, args, on_output: _todo_write(args),
    "report_progress": lambda handle, args, on_output: ToolResult(
        ok=True, output="progress reported", progress=args["message"]
    ),
    "finish": lambda handle, args, on_output: ToolResult(
        ok=True, output="finished", finished=True, summary=args["summary"]
    ),
}

_TODO_MARKS = {"pending": "[ ]", "in_progress": "[~]", "completed": "[x]"}


def _todo_write(args: dict[str, Any]) -> ToolResult:
    todos = [{"content": t["content"], "status": t["status"]} for t in args["todos"]]
    lines = [f"{_TODO_MARKS[t['status']]} {t['content']}" for t in todos]
    return ToolResult(ok=True, output="\n".join(lines) or "(todo list cleared)", todos=todos)
