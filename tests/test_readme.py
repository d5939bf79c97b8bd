"""The README's own words, run as a new user would: `./dev up` in one shell, the "try it" command in
a second shell with a clean environment. It fails when the README and the CLI drift apart."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

from tests.live import ROOT, free_port, wait_for

README = (ROOT / "README.md").read_text()


def commands() -> list[str]:
    """The README's indented command lines (code blocks), in order, comments dropped."""
    return [m.group(1).split("  #")[0].strip() for m in re.finditer(r"^    (\S.*)$", README, re.MULTILINE)]


def test_it_keeps_exactly_two_set_up_commands():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    assert [c for c in commands() if c in setup and c.startswith("./dev")] == ["./dev up", "./dev test"]


def test_it_runs_the_readme_try_it_command_from_a_second_shell_while_dev_up_runs(tmp_path):
    try_it = next(c for c in commands() if c.startswith(".venv/bin/deputies run "))
    # A checkout of our own in tmp: the same ./dev and .venv, a data directory nobody else uses.
    for name in ("dev", ".venv"):
        (tmp_path / name).symlink_to(ROOT / name)
    clean = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    port = free_port()
    first_shell = {**clean, "DEPUTIES_DATA_DIR": str(tmp_path / "var"), "DEPUTIES_PORT": str(port)}
    log = tmp_path / "up.log"
    with open(log, "w") as out:
        up = subprocess.Popen(
            shlex.split("./dev up"), cwd=tmp_path, env=first_shell, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for(lambda: "log in at" in log.read_text(), timeout=90, what="./dev up to print the login line")
        assert up.poll() is None, log.read_text()
        second_shell = {**clean, "DEPUTIES_DATA_DIR": str(tmp_path / "var")}
        result = subprocess.run(
            try_it, shell=True, cwd=tmp_path, env=second_shell, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SCRIPTED DEMO MODEL" in result.stdout  # it says which model it uses
        assert " completed" in result.stdout.splitlines()[-1]
        assert "Traceback" not in result.stderr
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
            raise AssertionError(f"./dev up did not stop within 30 s of Ctrl-C:\n{log.read_text()}") from None
    assert "Traceback" not in log.read_text()
    assert os.path.isdir(tmp_path / "var" / "sample-repo" / ".git")


def test_it_answers_help_for_every_command_the_readme_shows():
    shown = {c.split()[1] for c in commands() if c.startswith("deputies ")}
    assert {"up", "web", "worker", "run", "fake-llm", "token", "secrets"} <= shown
    deputies = str(Path(ROOT / ".venv" / "bin" / "deputies"))
    for name in sorted(shown):
        result = subprocess.run([deputies, name, "--help"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "usage:" in result.stdout, (name, result.stderr)
