"""Tiny readers for DEPUTIES_* settings that fail loudly, naming the variable.

Every reader also accepts ``NAME_FILE`` (a path whose contents are the value) so container
secrets can be mounted as files instead of passed in the environment.
"""

from __future__ import annotations

import json
import os
import re

from django.core.exceptions import ImproperlyConfigured


def _raw(name: str) -> str | None:
    file_path = os.environ.get(f"{name}_FILE")
    if file_path:
        try:
            with open(file_path, encoding="utf-8") as fh:
                return fh.read().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={file_path!r} cannot be read: {exc.strerror}") from exc
    return os.environ.get(name)


def envstr(name: str, default: str = "") -> str:
    value = _raw(name)
    return default if value is None or value == "" else value


def envbool(name: str, default: bool = False) -> bool:
    value = _raw(name)
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (use true/false, 1/0, yes/no, on/off)")


def envint(name: str, default: int, minimum: int | None = None) -> int:
    value = _raw(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={value!r} must be at least {minimum}")
    return number


def envfloat(name: str, default: float, minimum: float | None = None) -> float:
    value = _raw(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not a number") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={value!r} must be at least {minimum}")
    return number


def envchoice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = envstr(name, default)
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} must be one of: {', '.join(choices)}")
    return value


RATE_RE = re.compile(r"^([1-9][0-9]*)/(s|sec|second|m|min|minute|h|hour|d|day)$")


def envrate(name: str, default: str) -> str | None:
    """A rate like ``600/min`` (DRF's format); ``0``, ``none`` or ``off`` is None, no limit."""
    value = envstr(name, default).strip().lower()
    if value in ("0", "none", "off"):
        return None
    if not RATE_RE.match(value):
        raise ImproperlyConfigured(f"{name}={value!r} must look like 600/min (N/s, N/min, N/h, N/day) or 0")
    return value


def envjson(name: str, default: object) -> object:
    value = _raw(name)
    if value is None or value == "":
        return default
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ImproperlyConfigured(f"{name} is not valid JSON: {exc.msg} at position {exc.pos}") from None


def envnetworks(name: str, default: str = "") -> tuple:
    """Comma-separated IP ranges (``10.0.0.0/8,::1``) for the allow lists of deputies/netguard.py."""
    from deputies.netguard import parse_networks

    try:
        return parse_networks(envstr(name, default), name)
    except ValueError as exc:
        raise ImproperlyConfigured(str(exc)) from None


def envpaths(name: str, default: str = "") -> tuple:
    """Comma-separated absolute paths, each resolved (symlinks, ``..``) as the checks compare them."""
    from pathlib import Path

    paths = []
    for item in (part.strip() for part in envstr(name, default).split(",")):
        if not item:
            continue
        path = Path(item).expanduser()
        if not path.is_absolute():
            raise ImproperlyConfigured(f"{name}: {item!r} is not an absolute path")
        paths.append(path.resolve())
    return tuple(paths)
