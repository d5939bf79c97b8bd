"""Environment secrets: encrypted at rest, handed to sandboxes only when marked sandbox-visible,
and scrubbed from everything a sandbox says before it reaches events, artifacts or the model.

A sandbox-visible secret reaches only the process environment of the sandbox's commands: providers
write no values to disk, and a reconnected sandbox is given them again from these rows. An
unisolated sandbox gets none unless the operator accepted it (``sandbox_environment``).

Encryption is Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``) under keys derived from
``settings.SECRETS_KEYS``: the first key encrypts, every key decrypts, so rotating is "prepend the new
key, run ``deputies secrets reencrypt``, drop the old one".

Redaction is by value: every secret of the session's environment (visible or not) is replaced by
``[secret NAME]`` in exec output (also when a value is split across streamed chunks), in files the
agent reads and in the diff. A value shorter than ``MIN_SECRET_LENGTH`` would redact half the
output, so such values are refused when they are saved.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from django.conf import settings

from sandboxes.base import Cancel, Capabilities, ExecResult, OutputCallback, SandboxHandle

if TYPE_CHECKING:
    from cryptography.fernet import MultiFernet

MIN_SECRET_LENGTH = 6
MAX_SECRET_BYTES = 64 * 1024


class SecretError(Exception):
    """A secret cannot be decrypted; the message names the secret, never its value."""


@lru_cache(maxsize=4)
def _cipher(keys: tuple[str, ...]) -> MultiFernet:
    # Imported here: cryptography is ~6 MB that a process which never opens a secret (an idle worker,
    # every run without secrets) need not load.
    from cryptography.fernet import Fernet, MultiFernet

    if not keys:
        raise SecretError("DEPUTIES_SECRETS_KEY is empty: environment secrets cannot be used.")
    derived = [
        Fernet(base64.urlsafe_b64encode(hashlib.sha256(b"deputies-secrets:" + k.encode()).digest()))
        for k in keys
    ]
    return MultiFernet(derived)


def cipher() -> MultiFernet:
    return _cipher(tuple(settings.SECRETS_KEYS))


def encrypt(value: str) -> str:
    return cipher().encrypt(value.encode()).decode("ascii")


def decrypt(token: str, name: str = "a secret") -> str:
    from cryptography.fernet import InvalidToken

    try:
        return cipher().decrypt(token.encode("ascii")).decode()
    except InvalidToken:
        raise SecretError(
            f"Cannot decrypt {name}: it was written with a key that is not in DEPUTIES_SECRETS_KEY "
            "(every web and worker process must share the same keys)."
        ) from None


def reencrypt(token: str) -> str:
    """The same value under the current first key (for key rotation)."""
    from cryptography.fernet import InvalidToken

    try:
        return cipher().rotate(token.encode("ascii")).decode("ascii")
    except InvalidToken:
        raise SecretError("Cannot re-encrypt: a secret was written with an unknown key.") from None


@dataclass(frozen=True)
class Secret:
    name: str
    value: str
    sandbox_visible: bool


def sandbox_environment(
    environment, secrets: list[Secret], caps: Capabilities
) -> tuple[dict[str, str], list[str]]:
    """The variables a sandbox's commands get, and the names of the secrets withheld from them.

    Sandbox-visible secrets go only to a sandbox whose provider allows it (``caps.secrets_allowed``:
    isolated, or unisolated by the operator's explicit choice); an unisolated sandbox could read
    every other session's sandbox and processes, so there the run goes on without them.
    """
    variables = {
        # Bytecode caches go stale when an edit keeps size and mtime second; tests must see edits.
        "PYTHONDONTWRITEBYTECODE": "1",
        **{str(k): str(v) for k, v in (environment.env_vars if environment else {}).items()},
    }
    visible = [s for s in secrets if s.sandbox_visible]
    if not caps.secrets_allowed:
        return variables, sorted(s.name for s in visible)
    variables.update({s.name: s.value for s in visible})
    return variables, []


class Redactor:
    """Replaces known secret values with ``[secret NAME]``. Longest values first, so a secret that
    contains another is replaced whole."""

    def __init__(self, secrets: Iterable[Secret]) -> None:
        pairs = {s.value: s.name for s in secrets if len(s.value) >= MIN_SECRET_LENGTH}
        self.pairs = sorted(pairs.items(), key=lambda item: -len(item[0]))
        self.longest = max((len(v) for v, _ in self.pairs), default=0)

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def text(self, text: str) -> str:
        for value, name in self.pairs:
            if value in text:
                text = text.replace(value, f"[secret {name}]")
        return text

    def data(self, data: bytes) -> bytes:
        for value, name in self.pairs:
            raw = value.encode()
            if raw in data:
                data = data.replace(raw, f"[secret {name}]".encode())
        return data

    def held_back(self, text: str) -> int:
        """How many trailing characters of ``text`` could be the start of a secret still arriving."""
        for size in range(min(len(text), self.longest - 1), 0, -1):
            tail = text[-size:]
            if any(value.startswith(tail) for value, _ in self.pairs):
                return size
        return 0


class _StreamScrubber:
    """Redacts streamed chunks, holding back a tail that might be the first part of a secret."""

    def __init__(self, redactor: Redactor, sink: OutputCallback) -> None:
        self.redactor = redactor
        self.sink = sink
        self.pending: dict[str, str] = {}

    def write(self, stream: str, text: str) -> None:
        buffered = self.redactor.text(self.pending.pop(stream, "") + text)
        keep = self.redactor.held_back(buffered)
        if keep:
            self.pending[stream] = buffered[-keep:]
            buffered = buffered[:-keep]
        if buffered:
            self.sink(stream, buffered)

    def close(self) -> None:
        for stream, text in self.pending.items():
            self.sink(stream, text)
        self.pending.clear()


class RedactingHandle:
    """A sandbox handle whose output never carries a secret's value.

    Only what comes *out* of the sandbox is scrubbed (exec output, files read); what goes in is the
    agent's business. Archives are passed through untouched: the runner scrubs the diff it makes.
    """

    def __init__(self, handle: SandboxHandle, redactor: Redactor) -> None:
        self.inner = handle
        self.redactor = redactor

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def exec(
        self,
        argv: list[str],
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        cancel: Cancel | None = None,
    ) -> ExecResult:
        scrubber = _StreamScrubber(self.redactor, on_output) if on_output else None
        try:
            result = self.inner.exec(
                argv,
                cwd=cwd,
                env=env,
                timeout=timeout,
                on_output=scrubber.write if scrubber else None,
                cancel=cancel,
            )
        finally:
            if scrubber:
                scrubber.close()
        result.stdout = self.redactor.text(result.stdout)
        result.stderr = self.redactor.text(result.stderr)
        return result

    def read_file(self, path: str) -> bytes:
        return self.redactor.data(self.inner.read_file(path))
