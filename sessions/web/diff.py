"""Unified diffs (``git diff --binary`` output) split into files with line classes for the viewer."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from django.utils.safestring import SafeString, mark_safe
from pygments import lex
from pygments.lexer import Lexer
from pygments.lexers import get_lexer_for_filename
from pygments.token import STANDARD_TYPES
from pygments.util import ClassNotFound

logger = logging.getLogger(__name__)

MAX_DIFF_BYTES = 2_000_000  # beyond this the viewer shows the start and points at the download
MAX_FILE_LINES = 3000


@dataclass
class DiffLine:
    kind: str  # "add", "del", "ctx", "hunk", "meta"
    text: str
    old: int | None = None
    new: int | None = None
    html: SafeString | None = None  # the text with syntax-highlighting spans, when the file type is known


@dataclass
class DiffFile:
    path: str
    old_path: str = ""
    change: str = "modified"  # added, deleted, renamed, modified, binary
    additions: int = 0
    deletions: int = 0
    lines: list[DiffLine] = field(default_factory=list)
    truncated: bool = False

    @property
    def anchor(self) -> str:
        return "file-" + "".join(c if c.isalnum() else "-" for c in self.path)[:80]


@dataclass
class Diff:
    files: list[DiffFile]
    truncated: bool = False

    @property
    def additions(self) -> int:
        return sum(f.additions for f in self.files)

    @property
    def deletions(self) -> int:
        return sum(f.deletions for f in self.files)


def _path_of(header: str) -> tuple[str, str]:
    """``diff --git a/x b/y`` -> (x, y); names with spaces keep working when a and b match."""
    rest = header[len("diff --git ") :]
    if rest.startswith("a/") and " b/" in rest:
        half = len(rest) // 2
        if rest[half] == " " and rest[2:half] == rest[half + 3 :]:
            return rest[2:half], rest[half + 3 :]
        old, _, new = rest.partition(" b/")
        return old[2:], new
    return rest, rest


def parse_diff(text: str, truncated: bool = False) -> Diff:
    files: list[DiffFile] = []
    current: DiffFile | None = None
    old_no = new_no = 0
    in_hunk = False
    for raw in text.splitlines():
        if raw.startswith("diff --git "):
            old, new = _path_of(raw)
            current = DiffFile(path=new, old_path=old if old != new else "")
            if current.old_path:
                current.change = "renamed"
            files.append(current)
            in_hunk = False
            continue
        if current is None:
            continue
        if len(current.lines) >= MAX_FILE_LINES:
            current.truncated = True
            continue
        if raw.startswith("@@"):
            in_hunk = True
            old_no, new_no = _hunk_start(raw)
            current.lines.append(DiffLine("hunk", raw))
        elif not in_hunk:
            if raw.startswith("new file mode"):
                current.change = "added"
            elif raw.startswith("deleted file mode"):
                current.change = "deleted"
            elif raw.startswith(("GIT binary patch", "Binary files")):
                current.change = "binary"
            elif raw.startswith("rename from "):
                current.old_path, current.change = raw[len("rename from ") :], "renamed"
            if not raw.startswith(("--- ", "+++ ", "index ")):
                current.lines.append(DiffLine("meta", raw))
        elif raw.startswith("+"):
            current.additions += 1
            current.lines.append(DiffLine("add", raw[1:], new=new_no))
            new_no += 1
        elif raw.startswith("-"):
            current.deletions += 1
            current.lines.append(DiffLine("del", raw[1:], old=old_no))
            old_no += 1
        elif raw.startswith("\\"):
            current.lines.append(DiffLine("meta", raw))
        else:
            current.lines.append(DiffLine("ctx", raw[1:], old=old_no, new=new_no))
            old_no += 1
            new_no += 1
    for f in files:
        highlight(f)
    return Diff(files=files, truncated=truncated)


def _lexer_for(path: str) -> Lexer | None:
    try:
        return get_lexer_for_filename(path.rsplit("/", 1)[-1], stripnl=False, ensurenl=False)
    except ClassNotFound:
        return None


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def highlight(f: DiffFile) -> None:
    """Syntax-highlight a file's code lines with Pygments (classes as Pygments' HtmlFormatter names
    them; static/deputies/app.css colours them). Each line is lexed alone: a hunk is a fragment of
    the file anyway, and a line never borrows state from a line that is not shown."""
    lexer = _lexer_for(f.path) if f.change != "binary" else None
    if lexer is None:
        return
    for line in f.lines:
        if line.kind not in ("add", "del", "ctx") or not line.text:
            continue
        parts = []
        for token, value in lex(line.text, lexer):
            while token not in STANDARD_TYPES:
                token = token.parent
            css = STANDARD_TYPES[token]
            parts.append(f'<span class="{css}">{_escape(value)}</span>' if css else _escape(value))
        line.html = mark_safe("".join(parts))  # every value is escaped above


def _hunk_start(header: str) -> tuple[int, int]:
    """``@@ -12,5 +12,6 @@`` -> (12, 12)."""
    try:
        old, new = header.split("@@")[1].split()[:2]
        return int(old[1:].split(",")[0]), int(new[1:].split(",")[0])
    except (IndexError, ValueError):
        return 0, 0


def read_diff(artifact) -> Diff:
    """Parse a stored diff artifact; a missing file (or a store that does not answer) is an empty diff
    flagged as truncated, so the page still renders and offers the download."""
    from sessions.storage import storage_errors

    try:
        with artifact.file.open("rb") as handle:
            data = handle.read(MAX_DIFF_BYTES + 1)
    except (OSError, *storage_errors()):
        logger.warning("diff artifact %s could not be read", artifact.pk, exc_info=True)
        return Diff(files=[], truncated=True)
    truncated = len(data) > MAX_DIFF_BYTES
    return parse_diff(data[:MAX_DIFF_BYTES].decode("utf-8", errors="replace"), truncated=truncated)
