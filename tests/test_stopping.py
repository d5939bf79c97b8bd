"""Stop signals set an event without the signal handler taking the event's lock."""

import os
import signal
import subprocess
import sys
import time

CHILD = """
import signal, sys, threading
from deputies.stopping import set_on_signals

event = threading.Event()
set_on_signals(event, (signal.SIGUSR1,))
print("ready", flush=True)
seen = 0
while seen < 3000:
    # The main thread spends its time in event.wait, holding the event's lock for stretches: a
    # handler calling event.set() there waits for that lock forever.
    if event.wait(0.00001):
        event.clear()
        seen += 1
signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the ones still coming while it exits
print("done", flush=True)
"""


def test_a_burst_of_signals_sets_the_event_every_time_and_never_hangs_the_main_thread():
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while child.poll() is None and time.monotonic() < deadline:
            os.kill(child.pid, signal.SIGUSR1)
        assert child.poll() == 0, "the child stopped seeing the signals (its main thread hung)"
        assert child.stdout.read().strip() == "done"
    finally:
        child.kill()
        child.wait()
