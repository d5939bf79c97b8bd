"""Stopping a process on SIGTERM / SIGINT without touching a lock in the signal handler."""

from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def set_on_signals(event: threading.Event, signums=STOP_SIGNALS) -> None:
    """Set ``event`` when one of ``signums`` arrives; call on the main thread.

    Not from the signal handler: Python runs a handler on the main thread between two bytecodes,
    also while that thread holds the event's own lock (inside ``event.wait()``), and
    ``event.set()`` there waits for that lock forever (``./dev up`` hung on Ctrl-C that way, once
    in a while). The C-level handler writes the signal's number to a pipe
    (``signal.set_wakeup_fd``); a daemon thread reads it and sets the event.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    wanted = {int(signum) for signum in signums}

    def watch() -> None:
        while True:
            if wanted.intersection(os.read(read_fd, 64)):
                event.set()

    threading.Thread(target=watch, name="stop-signals", daemon=True).start()
    for signum in signums:
        signal.signal(signum, _ignore)  # a Python handler, so the wakeup byte is written


def _ignore(signum, frame) -> None:  # noqa: ARG001
    pass
