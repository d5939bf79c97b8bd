"""The docker provider against a real engine: the shared contract, plus what only containers promise.

Every test runs once per engine: Docker Engine at ``DOCKER_HOST`` and Podman's Docker-compatible API
at ``DEPUTIES_TEST_PODMAN_HOST``, each with the offline test image (busybox and a static bash),
provided by ``scripts/docker-engine.sh`` and ``scripts/podman-engine.sh``. Without an engine its tests
skip, saying how to start it; with ``CI=true`` a missing Docker engine (or a Podman host that is set
but does not answer) fails them instead, because CI must not silently test less.
"""

from __future__ import annotations

import os
import socket
import tarfile
import time
from dataclasses import dataclass

import docker
import docker.errors
import pytest

from sandboxes.base import PathEscape, SandboxError, SandboxSpec, get_provider
from sandboxes.providers.docker import (
    DEPLOYMENT_LABEL,
    MANAGED_LABEL,
    SESSION_LABEL,
    DockerProvider,
    engine_client,
)
from tests.sandbox_contract import SandboxContract, make_tar, shell

IMAGE = os.environ.get("DEPUTIES_TEST_DOCKER_IMAGE", "deputies/sandbox-test:busybox")
# Per test process, so parallel runs never touch each other's sandboxes and leftovers are easy to find.
DEPLOYMENT = f"test-{os.getpid()}"


@dataclass(frozen=True)
class Engine:
    name: str  # "docker" or "podman"
    host: str  # "" when not configured
    start: str  # the command that starts one

    @property
    def podman(self) -> bool:
        """Whether Podman answers here (DOCKER_HOST may point at Podman too); asked once."""
        if self.host not in _is_podman:
            version = self.client(timeout=10).version()
            names = [str(c.get("Name", "")) for c in version.get("Components") or []]
            _is_podman[self.host] = any("podman" in n.lower() for n in names)
        return _is_podman[self.host]

    def client(self, timeout: int = 30) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.host, timeout=timeout)


_is_podman: dict[str, bool] = {}

ENGINES = {
    "docker": Engine(
        "docker",
        os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock",
        'engine_env=$(scripts/docker-engine.sh) && eval "$engine_env"',
    ),
    "podman": Engine(
        "podman",
        os.environ.get("DEPUTIES_TEST_PODMAN_HOST", ""),
        'engine_env=$(scripts/podman-engine.sh) && eval "$engine_env"',
    ),
}

_engine_problems: dict[str, str] = {}


def engine_problem(engine: Engine) -> str:
    """Why the tests cannot run on ``engine`` ("" when they can); asks it once per process."""
    if engine.name not in _engine_problems:
        problem = ""
        if not engine.host:
            problem = f"DEPUTIES_TEST_PODMAN_HOST is not set, so the {engine.name} tests do not run"
        else:
            try:
                client = engine.client(timeout=10)
                client.ping()
                client.images.get(IMAGE)
            except docker.errors.ImageNotFound:
                problem = f"the test image {IMAGE} is not on the {engine.name} engine at {engine.host}"
            except Exception as exc:
                problem = f"no {engine.name} engine answers at {engine.host} ({type(exc).__name__})"
        _engine_problems[engine.name] = problem
    return _engine_problems[engine.name]


def require_engine(engine: Engine | None = None) -> None:
    engine = engine or ENGINES["docker"]
    problem = engine_problem(engine)
    if not problem:
        return
    message = f"{problem}; start one with: {engine.start}"
    # CI starts Docker; Podman is required only where its host is set.
    if os.environ.get("CI") == "true" and (engine.name == "docker" or engine.host):
        pytest.fail(f"CI=true requires the {engine.name} tests to run, but {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module", params=list(ENGINES))
def engine(request) -> Engine:
    return ENGINES[request.param]


@pytest.fixture
def docker_settings(settings, engine):
    settings.DOCKER_IMAGE = IMAGE
    settings.DOCKER_DEPLOYMENT = DEPLOYMENT
    settings.DOCKER_HOST = engine.host
    return settings


@pytest.fixture
def docker_provider(docker_settings, engine) -> DockerProvider:
    require_engine(engine)
    return DockerProvider()


@pytest.fixture(scope="module", autouse=True)
def remove_leftovers():
    """Whatever a failed test left behind goes, found by this process's deployment label."""
    yield
    label = f"{DEPLOYMENT_LABEL}={DEPLOYMENT}"
    for engine in ENGINES.values():
        if engine_problem(engine):
            continue
        client = engine.client()
        for container in client.containers.list(all=True, filters={"label": label}):
            container.remove(force=True)
        for volume in client.volumes.list(filters={"label": label}):
            volume.remove(force=True)


def gateway_of(handle) -> str:
    """The bridge's gateway as the container sees it: the host, from inside a bridge sandbox."""
    for line in handle.exec(["cat", "/proc/net/route"]).stdout.splitlines()[1:]:
        fields = line.split()
        if fields[1] == "00000000":
            return socket.inet_ntoa(int(fields[2], 16).to_bytes(4, "little"))
    raise AssertionError("the sandbox has no default route")


def tcp_connect(handle, host: str, port: int):
    return handle.exec(["bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"], timeout=10)


class TestDocker(SandboxContract):
    @pytest.fixture
    def provider(self, docker_provider):
        return docker_provider

    def test_it_has_network_when_the_policy_is_bridge(self, provider, isolated):
        # Inside a container 127.0.0.1 is the container's own loopback, so the contract's listener
        # on the host's loopback is out of reach by design; the host answers on the bridge gateway.
        handle = provider.create(SandboxSpec(session_id=9, network="bridge"))
        try:
            gateway = gateway_of(handle)
            with socket.socket() as listener:
                try:
                    listener.bind((gateway, 0))
                except OSError:
                    pytest.skip(f"the engine's bridge gateway {gateway} is not an address of this host")
                listener.listen()
                port = listener.getsockname()[1]
                result = tcp_connect(handle, gateway, port)
                assert result.exit_code == 0, result.stderr
                again = provider.connect(handle.id)  # connect() keeps the policy
                result = tcp_connect(again, gateway, port)
                assert result.exit_code == 0, result.stderr
        finally:
            provider.destroy(handle.id)


# --- what only the docker provider promises ------------------------------------------------------


def test_it_is_chosen_by_name(docker_settings):
    docker_settings.SANDBOX_PROVIDER = "docker"
    provider = get_provider()
    assert isinstance(provider, DockerProvider)
    caps = provider.capabilities()
    assert (caps.isolated, caps.network_policy, caps.resource_limits) == (True, True, True)


def test_it_shapes_the_container_as_asked(docker_provider, engine):
    spec = SandboxSpec(
        session_id=31, cpu_limit=0.5, memory_mb=256, pids_limit=64, labels={"deputies.session": "31"}
    )
    handle = docker_provider.create(spec)
    try:
        info = engine_client().api.inspect_container(handle.id)
        host = info["HostConfig"]
        assert host["NanoCpus"] == 500_000_000
        assert host["Memory"] == 256 * 1024 * 1024
        assert host["PidsLimit"] == 64
        assert host["ReadonlyRootfs"] is True
        if engine.podman:  # Podman shows "ALL" expanded into the capabilities it would have given
            assert {"CHOWN", "DAC_OVERRIDE", "KILL", "NET_BIND_SERVICE", "SETUID"} <= set(host["CapDrop"])
        else:
            assert host["CapDrop"] == ["ALL"]
        assert not host["CapAdd"]
        assert host["SecurityOpt"] == ["no-new-privileges"]
        assert host["NetworkMode"] == "none"
        assert host["Privileged"] is False
        assert info["Config"]["User"] == "1000:1000"
        labels = info["Config"]["Labels"]
        assert (labels[SESSION_LABEL], labels[DEPLOYMENT_LABEL], labels[MANAGED_LABEL]) == (
            "31",
            DEPLOYMENT,
            "true",
        )
        (mount,) = [m for m in info["Mounts"] if m["Destination"] == "/workspace"]
        assert mount["Type"] == "volume" and mount["Name"] == f"{handle.id}-workspace"
        volume = engine_client().api.inspect_volume(mount["Name"])
        assert volume["Labels"][SESSION_LABEL] == "31"
        # only the workspace, not even the init container, is left besides the sandbox itself
        names = [
            c.name
            for c in engine_client().containers.list(all=True, filters={"label": f"{SESSION_LABEL}=31"})
        ]
        assert names == [handle.id]
    finally:
        docker_provider.destroy(handle.id)


def test_it_runs_commands_as_an_unprivileged_user(docker_provider):
    handle = docker_provider.create(SandboxSpec(session_id=1))
    try:
        assert handle.exec(["id", "-u"]).stdout == "1000\n"
        status = handle.exec(["cat", "/proc/self/status"]).stdout
        for line in ("CapEff:\t0000000000000000", "CapBnd:\t0000000000000000", "NoNewPrivs:\t1"):
            assert line in status
        assert handle.exec(["mount", "-t", "tmpfs", "none", "/mnt"]).exit_code != 0
        # the workspace belongs to the sandbox user, files the worker uploads too
        handle.put_archive(".", make_tar([("up.txt", b"from the worker\n", None, tarfile.REGTYPE)]))
        handle.write_file("new/file.txt", b"x")
        listing = handle.exec(["ls", "-ldn", ".", "up.txt", "new", "new/file.txt"]).stdout.splitlines()
        assert all(line.split()[2:4] == ["1000", "1000"] for line in listing), listing
        assert shell(handle, "echo more >> up.txt && cat up.txt").stdout == "from the worker\nmore\n"
    finally:
        docker_provider.destroy(handle.id)


def test_it_has_only_loopback_when_the_policy_is_none(docker_provider):
    handle = docker_provider.create(SandboxSpec(session_id=1))
    bridged = docker_provider.create(SandboxSpec(session_id=2, network="bridge"))
    try:
        interfaces = [
            line.split(":")[0].strip()
            for line in handle.exec(["cat", "/proc/net/dev"]).stdout.splitlines()[2:]
        ]
        assert interfaces == ["lo"]
        gateway = gateway_of(bridged)
        with socket.socket() as listener:
            try:
                listener.bind((gateway, 0))
            except OSError:
                pytest.skip(f"the engine's bridge gateway {gateway} is not an address of this host")
            listener.listen()
            port = listener.getsockname()[1]
            assert tcp_connect(bridged, gateway, port).exit_code == 0  # the host is there...
            assert tcp_connect(handle, gateway, port).exit_code != 0  # ...but not for "none"
    finally:
        docker_provider.destroy(handle.id)
        docker_provider.destroy(bridged.id)


def test_it_keeps_the_workspace_when_the_container_restarts(docker_provider):
    handle = docker_provider.create(SandboxSpec(session_id=1, env={"GREETING": "hi"}))
    try:
        handle.write_file("kept.txt", b"still here")
        engine_client().api.stop(handle.id, timeout=5)
        again = docker_provider.connect(handle.id, env={"GREETING": "hi"})  # starts it again
        assert again.read_file("kept.txt") == b"still here"
        assert shell(again, "echo $GREETING; touch more").stdout == "hi\n"
    finally:
        docker_provider.destroy(handle.id)


def test_it_keeps_the_specs_values_out_of_the_containers_configuration(docker_provider):
    value = "canary-" + os.urandom(8).hex()
    handle = docker_provider.create(SandboxSpec(session_id=1, env={"API_TOKEN": value}))
    try:
        assert shell(handle, "echo $API_TOKEN").stdout == f"{value}\n"
        # What `docker inspect` shows, and what the engine keeps on its disk.
        info = engine_client().api.inspect_container(handle.id)
        assert value not in repr(info)
        assert not any(e.startswith("API_TOKEN=") for e in info["Config"]["Env"])
    finally:
        docker_provider.destroy(handle.id)


def test_it_removes_the_container_and_the_volume(docker_provider):
    handle = docker_provider.create(SandboxSpec(session_id=1))
    docker_provider.destroy(handle.id)
    api = engine_client().api
    with pytest.raises(docker.errors.NotFound):
        api.inspect_container(handle.id)
    with pytest.raises(docker.errors.NotFound):
        api.inspect_volume(f"{handle.id}-workspace")
    docker_provider.destroy(handle.id)


def test_it_refuses_containers_it_does_not_manage(docker_provider):
    client = engine_client()
    other = client.containers.create(IMAGE, ["sleep", "60"], labels={DEPLOYMENT_LABEL: DEPLOYMENT})
    try:
        for action in (docker_provider.connect, docker_provider.destroy):
            with pytest.raises(SandboxError, match="not a sandbox of this deployment"):
                action(other.name)
        other.reload()  # still there
    finally:
        other.remove(force=True)


def test_it_refuses_another_deployments_sandbox(docker_provider, docker_settings):
    handle = docker_provider.create(SandboxSpec(session_id=1))
    try:
        docker_settings.DOCKER_DEPLOYMENT = "someone-else"
        with pytest.raises(SandboxError, match="not a sandbox of this deployment"):
            docker_provider.destroy(handle.id)
    finally:
        docker_settings.DOCKER_DEPLOYMENT = DEPLOYMENT
        docker_provider.destroy(handle.id)


@pytest.mark.parametrize("bad_id", ["../etc", "a/b", "", "-rf", "x" * 200])
def test_it_refuses_malformed_sandbox_ids(docker_provider, bad_id):
    with pytest.raises(SandboxError):
        docker_provider.connect(bad_id)
    with pytest.raises(SandboxError):
        docker_provider.destroy(bad_id)


def test_it_fails_cleanly_for_an_image_it_cannot_get(docker_provider):
    with pytest.raises(SandboxError, match="could not be pulled"):
        docker_provider.create(SandboxSpec(session_id=77, image="deputies/no-such-image:never"))
    label = {"label": f"{SESSION_LABEL}=77"}
    assert engine_client().containers.list(all=True, filters=label) == []
    assert engine_client().volumes.list(filters=label) == []


def test_it_reports_the_engine(docker_provider, engine):
    health = docker_provider.health()
    assert health["ok"] is True
    expected = ("Podman", True) if engine.podman else ("Docker Engine", False)
    assert (health["engine"], health["podman"]) == expected
    assert health["version"] and health["api_version"]
    assert health["image_present"] is True


def test_it_reports_an_engine_that_does_not_answer(docker_settings, tmp_path):
    docker_settings.DOCKER_HOST = f"unix://{tmp_path}/nothing.sock"
    provider = DockerProvider()
    health = provider.health()
    assert health["ok"] is False
    assert "does not answer" in health["reason"] and "nothing.sock" in health["reason"]
    with pytest.raises(SandboxError, match="does not answer"):
        provider.create(SandboxSpec(session_id=1))


def test_it_keeps_the_executable_bit_when_a_file_is_rewritten(docker_provider):
    handle = docker_provider.create(SandboxSpec(session_id=1))
    try:
        handle.write_file("run.sh", b"#!/bin/sh\necho one\n")
        assert handle.exec(["chmod", "+x", "run.sh"]).exit_code == 0
        handle.write_file("run.sh", b"#!/bin/sh\necho two\n")
        assert handle.exec(["./run.sh"]).stdout == "two\n"
    finally:
        docker_provider.destroy(handle.id)


def test_it_reports_signals_like_a_shell(docker_provider):
    handle = docker_provider.create(SandboxSpec(session_id=1))
    try:
        result = handle.exec(["sh", "-c", "kill -TERM $$"])
        assert (result.exit_code, result.stderr) == (128 + 15, "")
        assert handle.exec(["no-such-program"]).exit_code == 127
    finally:
        docker_provider.destroy(handle.id)


def test_it_ends_the_call_when_the_callback_fails(docker_provider):
    handle = docker_provider.create(SandboxSpec(session_id=1))
    try:

        def explode(stream, text):
            raise RuntimeError("callback failed")

        started = time.monotonic()
        with pytest.raises(RuntimeError, match="callback failed"):
            handle.exec(["sh", "-c", "echo hi; sleep 100"], timeout=30, on_output=explode)
        assert time.monotonic() - started < 10
        assert "sleep 100" not in handle.exec(["ps", "-o", "args"]).stdout
    finally:
        docker_provider.destroy(handle.id)


def test_it_outlasts_the_http_clients_read_timeout(docker_provider, docker_settings):
    handle = docker_provider.create(SandboxSpec(session_id=1))
    try:
        docker_settings.DOCKER_API_TIMEOUT = 2  # from here on, a client whose reads time out after 2 s
        result = handle.exec(["sh", "-c", "sleep 3.5; echo late"], timeout=30)
        assert (result.exit_code, result.stdout, result.timed_out) == (0, "late\n", False)
    finally:
        docker_provider.destroy(handle.id)


def test_it_refuses_special_files_and_writes_through_links(docker_provider):
    handle = docker_provider.create(SandboxSpec(session_id=1))
    try:
        with pytest.raises(SandboxError, match="special file"):
            handle.put_archive(".", make_tar([("fifo", None, None, tarfile.FIFOTYPE)]))
        handle.exec(["ln", "-s", "/tmp", "out"])
        with pytest.raises(PathEscape):
            handle.put_archive(".", make_tar([("out/x", b"owned", None, tarfile.REGTYPE)]))
        with pytest.raises(PathEscape):
            handle.write_file("out/new/dir/x", b"owned")
        assert handle.exec(["ls", "-A", "/tmp"]).stdout == ""
    finally:
        docker_provider.destroy(handle.id)


def test_it_returns_when_the_command_ends_though_an_escaped_process_holds_its_output(docker_provider):
    # setsid leaves the command's process group, so nothing kills it, and it keeps stdout open.
    handle = docker_provider.create(SandboxSpec(session_id=1))
    try:
        started = time.monotonic()
        result = handle.exec(["sh", "-c", "setsid sleep 30 & echo escaped"], timeout=60)
        assert time.monotonic() - started < 10
        assert (result.exit_code, result.stdout, result.timed_out) == (0, "escaped\n", False)
    finally:
        docker_provider.destroy(handle.id)


def test_it_reads_files_whatever_the_engine_puts_in_the_archive_stat_header(docker_provider):
    # Podman encodes that header as URL-safe base64. Its JSON starts with {"name":" (9 bytes), so a
    # name starting "ab?" puts "?" (0x3f) last in an aligned group: "_" there, which the SDK rejected.
    handle = docker_provider.create(SandboxSpec(session_id=1))
    try:
        for name in ("ab?.txt", "dïr/ab?ünï ☃.bin"):
            handle.write_file(name, name.encode())
            assert handle.read_file(name) == name.encode()
    finally:
        docker_provider.destroy(handle.id)
