"""Skills: the team's know-how as markdown the agent loads only when it needs it.

The system prompt lists each skill's one-line description; the body costs tokens only when the
model calls ``load_skill``. Skills come from three places, later ones winning on a name clash:
the repository's ``.deputies/skills/*.md``, the team's skills, and the session creator's personal
skills.

Repository skills are read as text from the worker's trusted checkout (never through a symlink,
never executed), or, when this host has no work tree for the session, from the sandbox.
"""

from __future__ import annotations

import logging
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.db.models import Q

from sandboxes.base import SandboxError
from sessions.agent.tools import ToolError, ToolResult, _spec, register_worker_tool
from sessions.agent_models import NAME_RE

log = logging.getLogger(__name__)

REPOSITORY_SKILLS = ".deputies/skills"
MAX_SKILL_BYTES = 64 * 1024
MAX_REPOSITORY_SKILLS = 50
DESCRIPTION_CHARS = 300


@dataclass(frozen=True)
class SkillDoc:
    name: str
    description: str
    body: str
    source: str  # "repository", "team" or "personal"
    revision: int | None = None


def parse_markdown(name: str, text: str) -> SkillDoc:
    """A repository skill: optional front matter with ``description:``, else its first line."""
    description = ""
    body = text
    match = re.match(r"\A---\s*\n(.*?)\n---\s*\n", text, re.S)
    if match:
        for line in match.group(1).splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip().lower() == "description":
                description = value.strip().strip("\"'")
        body = text[match.end() :]
    if not description:
        first = next((line.strip() for line in body.splitlines() if line.strip()), "")
        description = first.lstrip("#").strip()
    return SkillDoc(name, description[:DESCRIPTION_CHARS], body.strip(), "repository")


def repository_skills(checkout: Path | None, handle: Any) -> list[SkillDoc]:
    """``.deputies/skills/*.md`` of the session's repository; unreadable files are skipped."""
    found: dict[str, str] = {}
    folder = checkout / REPOSITORY_SKILLS if checkout is not None else None
    if folder is not None and _real_dir(checkout, folder):
        for path in sorted(folder.iterdir())[: MAX_REPOSITORY_SKILLS * 2]:
            if path.suffix != ".md" or len(found) >= MAX_REPOSITORY_SKILLS:
                continue
            try:
                info = path.lstat()
            except OSError:
                continue
            if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SKILL_BYTES:
                continue  # a symlink could point anywhere on the worker: never followed
            found[path.stem] = path.read_bytes().decode("utf-8", errors="replace")
    elif handle is not None and not _has_work_tree(checkout):  # a clone without files: ask the sandbox
        try:
            paths = [p for p in handle.list_files(REPOSITORY_SKILLS) if p.endswith(".md")]
        except SandboxError:
            paths = []
        for path in paths[:MAX_REPOSITORY_SKILLS]:
            stem = path.rsplit("/", 1)[-1][:-3]
            if "/" in path.removeprefix(REPOSITORY_SKILLS + "/"):
                continue  # only the folder itself, as in the checkout
            try:
                data = handle.read_file(path)
            except SandboxError:
                continue
            if len(data) <= MAX_SKILL_BYTES:
                found[stem] = data.decode("utf-8", errors="replace")
    docs = []
    for stem, text in found.items():
        name = stem.lower()
        if re.fullmatch(NAME_RE, name):
            docs.append(parse_markdown(name, text))
    return docs


def _has_work_tree(checkout: Path | None) -> bool:
    """Whether the checkout has its files (a follow-up on another host clones without them)."""
    try:
        return checkout is not None and any(entry.name != ".git" for entry in checkout.iterdir())
    except OSError:
        return False


def _real_dir(root: Path, folder: Path) -> bool:
    """``folder`` is a directory inside ``root`` reached without a symlink."""
    try:
        current = root
        for part in folder.relative_to(root).parts:
            current = current / part
            if current.is_symlink() or not current.is_dir():
                return False
    except (OSError, ValueError):
        return False
    return True


def collect(context: Any) -> dict[str, SkillDoc]:
    """Every skill this session's agent may load, by name."""
    from sessions.models import Skill

    session = context.session
    skills: dict[str, SkillDoc] = {}
    try:
        for doc in repository_skills(context.checkout, context.handle):
            skills[doc.name] = doc
    except OSError as exc:  # a broken checkout costs the repository's skills, not the run
        log.warning("session %s: repository skills unreadable: %s", session.pk, exc)
    if getattr(context.run, "team_skills", None) is False:  # the claim saw none (Run.claim_loaded)
        return dict(sorted(skills.items()))
    scope = Q(owner__isnull=True)
    if session.created_by_id:
        scope |= Q(owner_id=session.created_by_id)
    rows = Skill.objects.filter(scope, team_id=session.team_id).order_by("name")
    for row in sorted(rows, key=lambda r: r.owner_id is not None):  # personal last: it wins
        skills[row.name] = SkillDoc(row.name, row.description, row.body, row.scope, row.revision)
    return dict(sorted(skills.items()))


def prompt_section(skills: dict[str, SkillDoc]) -> str:
    lines = [f"- `{doc.name}`: {doc.description}" for doc in skills.values()]
    return (
        "Skills: instructions for tasks this team does often. When one fits the task, call "
        "`load_skill` with its name before you start and follow it.\n" + "\n".join(lines)
    )


def _load_skill(context: Any, args: dict[str, Any]) -> ToolResult:
    doc = context.skills.get(args["name"])
    if doc is None:
        known = ", ".join(context.skills) or "none"
        raise ToolError(f"load_skill: no skill named {args['name']!r}; skills: {known}")
    revision = f", revision {doc.revision}" if doc.revision else ""
    return ToolResult(ok=True, output=f"# Skill `{doc.name}` ({doc.source}{revision})\n\n{doc.body}")


register_worker_tool(
    _spec(
        "load_skill",
        "Load the full instructions of one of the skills listed in the system prompt.",
        {"name": {"type": "string", "minLength": 1, "description": "The skill's name."}},
        ["name"],
    ),
    _load_skill,
    offered=lambda context: bool(context.skills),
)
