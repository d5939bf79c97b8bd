"""Websocket fan-out: 100 subscribers on one session in a real daphne while another process emits.

Latency is measured from the start of the emit() call (a wall-clock timestamp in the event's payload)
to the moment a frame's bytes reach a subscriber's socket (the kernel's receive timestamp,
``SO_TIMESTAMPNS``), for every (event, subscriber) pair; it includes emit()'s own commit, so the
report also gives emit()'s duration and the latency counted from emit()'s return (rows committed and
NOTIFY sent: what delivery adds). The subscribers run on this machine, so when their processes get
the CPU to read a frame says more about the instrument than about the server (a browser elsewhere
costs the server nothing); ``read_by_subscriber_process`` gives the latency to that moment too.
``web_process`` gives daphne's CPU time per delivered frame, the figure that depends least on what
else the machine is doing. Two phases: ``paced`` (events at a steady rate, the latency figure) and
``burst`` (as fast as one emitter can write, the events/s figure). Subscribers are spread over a
few client processes, each one epoll loop, so that the clients' own work stays small. Before the
events, ``commit_floor_ms`` times a lone one-row commit at the paced rate, with and without its WAL
flush: the part of emit() (and so of the latency) that is the database's and the disk's. Prints JSON.

    .venv/bin/python bench/stream.py [--subscribers 100] [--backend postgres|redis|poll]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_DB, ROOT, percentiles, setup  # noqa: E402

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
REDIS_URL = os.environ.get("DEPUTIES_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


# --- subscribers (child processes) -----------------------------------------------------------------


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; the kernel's receive time per read
_TIMESPEC = struct.Struct("qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)


class Subscriber:
    """A deliberately small websocket client: it is the measuring instrument, so it must cost less
    per frame than the server being measured (the ``websockets`` library's parser costs ~60 us per
    frame in Python, as much as daphne). The handshake is checked like RFC 6455 says; server frames
    (unmasked) are parsed by hand; pings are answered. Each frame is stamped twice: with the time
    the kernel queued its bytes on this subscriber's socket (``SO_TIMESTAMPNS``, the moment the
    frame reached the subscriber, whenever this process gets the CPU to read it) and with the time
    this process read them; it is parsed as JSON only after the run."""

    def __init__(self, url: str, headers: dict[str, str], expect: int) -> None:
        from urllib.parse import urlsplit

        target = urlsplit(url)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {target.path}?{target.query} HTTP/1.1",
            f"Host: {target.netloc}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        self.sock = socket.create_connection((target.hostname, target.port))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed during the handshake: {buffer!r}")
            buffer += data
        head, _, self.buffer = buffer.partition(b"\r\n\r\n")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest())
        if not head.startswith(b"HTTP/1.1 101") or accept not in head:
            raise RuntimeError(head.decode(errors="replace"))
        self.sock.setblocking(False)
        self.expect = expect
        self.frames: list[tuple[float, float, bytes]] = []  # (kernel time, read time, payload)
        self.unstamped = 0  # reads without a kernel timestamp (then the read time stands in)
        self.closed = False

    def readable(self) -> None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(262144, _ANCILLARY)
        except BlockingIOError:
            return
        now = time.time()
        if not data:
            self.closed = True
            return
        stamp = now
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = _TIMESPEC.unpack_from(value)
                stamp = sec + nsec / 1e9
                break
        else:
            self.unstamped += 1
        self.parse(self.buffer + data if self.buffer else data, stamp, now)

    def parse(self, buffer: bytes, stamp: float, now: float) -> None:
        while len(buffer) >= 2:
            first, size = buffer[0], buffer[1] & 0x7F
            start = 2
            if size == 126:
                if len(buffer) < 4:
                    break
                size, start = struct.unpack_from("!H", buffer, 2)[0], 4
            elif size == 127:
                if len(buffer) < 10:
                    break
                size, start = struct.unpack_from("!Q", buffer, 2)[0], 10
            if len(buffer) < start + size:
                break
            payload, buffer = buffer[start : start + size], buffer[start + size :]
            opcode = first & 0x0F
            if opcode == 0x1:
                assert first & 0x80, "fragmented frames are not expected from the server"
                self.frames.append((stamp, now, payload))
            elif opcode == 0x9:  # ping: answer with a masked pong carrying the same payload
                mask = os.urandom(4)
                masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                self.sock.setblocking(True)
                self.sock.sendall(bytes((0x8A, 0x80 | len(payload))) + mask + masked)
                self.sock.setblocking(False)
            elif opcode == 0x8:
                self.closed = True
        self.buffer = buffer

    @property
    def done(self) -> bool:
        return len(self.frames) >= self.expect


def client_main(args: argparse.Namespace) -> None:
    """One epoll loop over this process's subscribers: a ready socket costs a recvmsg and a parse,
    nothing else (no event-loop callbacks, futures or protocol objects per read)."""
    import select

    headers = {"Cookie": args.cookie, "Origin": args.origin}
    clients = [Subscriber(args.url, headers, args.expect) for _ in range(args.clients)]
    by_fd = {c.sock.fileno(): c for c in clients}
    poller = select.epoll()
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    print("ready", flush=True)
    cpu_before = time.process_time()
    deadline = time.monotonic() + args.timeout
    waiting = len(clients)
    while waiting:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out with {waiting} subscribers short of {args.expect} frames")
        for fd, _ in poller.poll(1.0):
            client = by_fd[fd]
            was_done = client.done
            client.readable()
            if client.closed:
                raise ConnectionError(f"closed after {len(client.frames)} frames")
            if client.done and not was_done:
                waiting -= 1
    cpu = time.process_time() - cpu_before
    # Parse only now, so parsing never sits between a frame's arrival and its timestamp.
    samples = []
    for client in clients:
        seqs = []
        for stamped_at, read_at, data in client.frames:
            event = json.loads(data)["event"]
            seqs.append(event["seq"])
            payload = event["payload"]
            samples.append((payload["phase"], payload["t"], stamped_at, event["seq"], read_at))
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "frames out of order, repeated or missing"
        client.sock.close()
    unstamped = sum(c.unstamped for c in clients)
    print(json.dumps({"cpu_s": cpu, "samples": samples, "unstamped_reads": unstamped}), flush=True)


# --- emitter (child process) ---------------------------------------------------------------------------


def emitter_main(args: argparse.Namespace) -> None:
    setup()
    from django.db import connection

    from sessions.events import emit

    durations: list[float] = []
    returned: dict[int, float] = {}  # seq -> when emit() returned (the events are committed)

    def run(phase: str, count: int, interval: float) -> None:
        next_at = time.perf_counter()
        for i in range(count):
            started = time.perf_counter()
            event = emit(
                args.session, "progress", {"message": f"{phase} {i}", "phase": phase, "t": time.time()}
            )
            returned[event.seq] = time.time()
            if phase == "paced":
                durations.append((time.perf_counter() - started) * 1000)
            if interval:
                next_at += interval
                delay = next_at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)

    def commit_floor(synchronous: bool) -> list[float]:
        """The database's own share of an emit() at this pace: a one-row update committed alone,
        each time after the same pause (this machine's flush is several times slower after a
        pause than back to back), with the WAL flush of its commit and without it."""
        from sessions.models import Session

        sql = f"UPDATE {Session._meta.db_table} SET last_seq = last_seq WHERE id = %s"
        times = []
        with connection.cursor() as cursor:
            cursor.execute(f"SET synchronous_commit = {'on' if synchronous else 'off'}")
            for _ in range(args.floor):
                started = time.perf_counter()
                cursor.execute(sql, [args.session])
                times.append((time.perf_counter() - started) * 1000)
                time.sleep(args.interval)
            cursor.execute("RESET synchronous_commit")
        return times

    floor = {"durable": commit_floor(True), "without_flush": commit_floor(False)}
    run("warmup", args.warmup, args.interval)
    run("paced", args.paced, args.interval)
    connection.close()

    def burst(count: int) -> None:
        run("burst", count, 0)
        connection.close()

    # Several writers at once, as several runs' workers would be: one emitter waits for each
    # commit, which would measure the database rather than the delivery.
    shares = [
        args.burst // args.burst_emitters + (i < args.burst % args.burst_emitters)
        for i in range(args.burst_emitters)
    ]
    threads = [threading.Thread(target=burst, args=(n,)) for n in shares]
    started = time.time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report = {
        "burst_emit_s": time.time() - started,
        "paced_emit_ms": durations,
        "returned": returned,
        "floor": floor,
    }
    print(json.dumps(report), flush=True)


# --- coordinator -----------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process (Linux /proc), to express cost per frame independently
    of how busy the rest of the machine is."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="deputies-bench-stream-"))
    setup(data_dir)
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.test import Client

    from sessions.models import Membership, Repository, Session, Team

    team, _ = Team.objects.get_or_create(slug="bench", defaults={"name": "Bench"})
    repo, _ = Repository.objects.get_or_create(team=team, name="bench", defaults={"url": "/tmp/none"})
    user = get_user_model().objects.filter(username="bench-stream").first()
    if user is None:
        user = get_user_model().objects.create_user("bench-stream", "b@example.com", "pw")
    Membership.objects.get_or_create(team=team, user=user)
    session = Session.objects.create(team=team, repository=repo, base_branch="main", model="scripted/demo")
    browser = Client()
    browser.force_login(user)
    cookie = f"{settings.SESSION_COOKIE_NAME}={browser.cookies[settings.SESSION_COOKIE_NAME].value}"

    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPUTIES_")}
    env.update(
        DATABASE_URL=BENCH_DB,
        DEPUTIES_SECRET_KEY=settings.SECRET_KEY,
        DEPUTIES_DATA_DIR=str(data_dir),
        DEPUTIES_LOG_LEVEL="WARNING",
        DEPUTIES_STREAM_BACKEND=args.backend,
        DJANGO_SETTINGS_MODULE="deputies.settings",
    )
    if args.backend == "redis":
        env["DEPUTIES_REDIS_URL"] = REDIS_URL
    if args.no_direct_write:
        env["DEPUTIES_STREAM_DIRECT_WRITE"] = "false"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    web_log = open(data_dir / "web.log", "wb")  # noqa: SIM115
    web = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "deputies"), "web", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=web_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    clients: list[subprocess.Popen] = []
    try:
        import httpx

        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or web.poll() is not None:
                raise SystemExit("daphne did not start: " + (data_dir / "web.log").read_text()[-2000:])
            time.sleep(0.05)

        expect = args.warmup + args.paced + args.burst
        procs = max(1, min(args.client_procs, args.subscribers))
        per_proc = [args.subscribers // procs] * procs
        for i in range(args.subscribers % procs):
            per_proc[i] += 1
        url = f"ws://127.0.0.1:{port}/ws/sessions/{session.pk}/?after={session.last_seq}"
        for n in per_proc:
            clients.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--role", "client", "--clients", str(n), "--url", url]
                    + ["--cookie", cookie, "--origin", base, "--expect", str(expect), "--timeout", "300"],
                    stdout=subprocess.PIPE,
                    cwd=ROOT,
                    text=True,
                )
            )
        for client in clients:
            line = client.stdout.readline()
            if line.strip() != "ready":
                raise SystemExit(f"a client process did not connect: {line!r}")

        web_pid = web.pid  # the console script is the daphne process itself
        load_before = round(os.getloadavg()[0], 2)
        cpu_before = cpu_seconds(web_pid)
        emitter_env = {**env, "DEPUTIES_BENCH_DATABASE_URL": BENCH_DB}
        emitter = subprocess.run(
            [sys.executable, __file__, "--role", "emitter", "--session", str(session.pk)]
            + ["--warmup", str(args.warmup), "--paced", str(args.paced), "--burst", str(args.burst)]
            + ["--interval", str(1 / args.rate), "--burst-emitters", str(args.burst_emitters)]
            + ["--floor", str(args.floor)],
            env=emitter_env,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if emitter.returncode:
            raise SystemExit(f"the emitter failed:\n{emitter.stderr[-3000:]}")
        emitted = json.loads(emitter.stdout.strip().splitlines()[-1])
        samples, client_cpu, unstamped = [], 0.0, 0
        for client in clients:
            out, _ = client.communicate(timeout=300)
            if client.returncode:
                raise SystemExit(f"a client process failed with status {client.returncode}")
            report = json.loads(out.strip().splitlines()[-1])
            samples += report["samples"]
            client_cpu += report["cpu_s"]
            unstamped += report["unstamped_reads"]
        cpu_after = cpu_seconds(web_pid)
        web_user, web_sys = cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(timeout=15)
        web_log.close()
    shutil.rmtree(data_dir, ignore_errors=True)  # kept (with web.log) when the run failed

    # "received": when the frame's bytes reached the subscriber's socket (the kernel's stamp);
    # "read": when the subscriber's process got round to reading them (adds the instrument's own
    # scheduling: its processes share this machine's cores with daphne, Postgres and the emitter).
    paced = [(received - sent) * 1000 for phase, sent, received, *_ in samples if phase == "paced"]
    paced_read = [(read - sent) * 1000 for phase, sent, _, _, read in samples if phase == "paced"]
    returned = {int(seq): t for seq, t in emitted["returned"].items()}
    committed = [
        (received - returned[seq]) * 1000 for phase, _, received, seq, _ in samples if phase == "paced"
    ]
    # Where the time goes, per paced event: emit() itself (statement + commit, its notification
    # included), then the first subscriber's frame (notification delivery, decode, first socket
    # write), then the spread until the last subscriber's frame (the fan-out).
    by_seq: dict[int, list[float]] = {}
    by_seq_read: dict[int, list[float]] = {}
    for phase, _, received, seq, read in samples:
        if phase == "paced":
            by_seq.setdefault(int(seq), []).append(received)
            by_seq_read.setdefault(int(seq), []).append(read)
    first = [(min(times) - returned[seq]) * 1000 for seq, times in by_seq.items()]
    spread = [(max(times) - min(times)) * 1000 for times in by_seq.values()]
    spread_read = [(max(times) - min(times)) * 1000 for times in by_seq_read.values()]
    burst = [(sent, received) for phase, sent, received, *_ in samples if phase == "burst"]
    burst_start = min(s for s, _ in burst)
    burst_end = max(r for _, r in burst)
    result = {
        "transport": args.backend,
        "subscribers": args.subscribers,
        "client_processes": len(per_proc),
        "direct_write": not args.no_direct_write,
        "paced": {
            "events": args.paced,
            "rate_per_s": args.rate,
            "latency_ms": percentiles(paced),
            "max_ms": round(max(paced), 3),
            "emit_call_ms": percentiles(emitted["paced_emit_ms"]),
            # A lone one-row commit at the same pace, before the events: what emit() cannot beat.
            "commit_floor_ms": {k: percentiles(v) for k, v in emitted["floor"].items()},
            "latency_after_emit_returned_ms": percentiles(committed),
            "first_subscriber_after_emit_returned_ms": percentiles(first),
            "first_to_last_subscriber_ms": percentiles(spread),
            "read_by_subscriber_process": {
                "latency_ms": percentiles(paced_read),
                "first_to_last_subscriber_ms": percentiles(spread_read),
            },
        },
        "burst": {
            "events": args.burst,
            "emitters": args.burst_emitters,
            "emit_events_per_s": round(args.burst / emitted["burst_emit_s"], 1),
            "delivered_events_per_s_per_subscriber": round(args.burst / (burst_end - burst_start), 1),
            "delivered_frames_per_s": round(len(burst) / (burst_end - burst_start), 1),
            "latency_ms": percentiles([(r - s) * 1000 for s, r in burst]),
        },
        "web_process": {
            "user_cpu_s": round(web_user, 3),
            "system_cpu_s": round(web_sys, 3),
            "cpu_us_per_frame": round((web_user + web_sys) / len(samples) * 1e6, 1),
        },
        "client_processes_cpu_us_per_frame": round(client_cpu / len(samples) * 1e6, 1),
        "client_reads_without_kernel_timestamp": unstamped,
        "cpus": os.cpu_count(),
        "load_average_1m_before_after": [load_before, round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result, indent=2))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--role", choices=("main", "client", "emitter"), default="main")
    p.add_argument("--subscribers", type=int, default=100)
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--backend", choices=("postgres", "redis", "poll"), default="postgres")
    p.add_argument(
        "--no-direct-write", action="store_true", help="send every frame through channels and daphne"
    )
    p.add_argument("--rate", type=float, default=50.0, help="events/s in the paced phase")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--paced", type=int, default=300)
    p.add_argument("--burst", type=int, default=2000)
    p.add_argument("--burst-emitters", type=int, default=4, help="threads emitting in the burst phase")
    p.add_argument("--floor", type=int, default=100, help="lone commits timed, with and without flush")
    # child roles
    p.add_argument("--clients", type=int)
    p.add_argument("--url")
    p.add_argument("--cookie")
    p.add_argument("--origin")
    p.add_argument("--expect", type=int)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--session", type=int)
    p.add_argument("--interval", type=float, default=0.02)
    return p.parse_args()


if __name__ == "__main__":
    arguments = parse()
    if arguments.role == "client":
        client_main(arguments)
    elif arguments.role == "emitter":
        emitter_main(arguments)
    else:
        main(arguments)
