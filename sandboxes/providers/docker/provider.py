"""Creating, finding and destroying docker sandboxes, and reporting on the engine."""

from __future__ import annotations

import logging
import secrets
import time

import docker
import docker.errors
import docker.types
import docker.utils
import requests
from django.conf import settings

from sandboxes.base import Capabilities, LogLine, SandboxError, SandboxLogs, SandboxSpec
from sandboxes.providers.docker.engine import (
    DEPLOYMENT_LABEL,
    MANAGED_LABEL,
    SESSION_LABEL,
    WORKSPACE,
    check_ours,
    check_sandbox_id,
    engine_address,
    engine_client,
    engine_errors,
    explain,
)
from sandboxes.providers.docker.handle import DockerHandle
from sandboxes.providers.docker.scripts import PID1_SCRIPT, RUN_DIR

log = logging.getLogger(__name__)

INIT_TIMEOUT = 120


class DockerProvider:
    name = "docker"

    def capabilities(self) -> Capabilities:
        return Capabilities(
            isolated=True, network_policy=True, resource_limits=True, secrets_allowed=True, slow_create=True
        )

    @property
    def api(self) -> docker.APIClient:
        return engine_client().api

    def create(self, spec: SandboxSpec) -> DockerHandle:
        if spec.network not in ("none", "bridge"):
            raise SandboxError(f"unknown network policy {spec.network!r}: use none or bridge")
        image = spec.image or settings.DOCKER_IMAGE
        sandbox_id = f"deputies-s{spec.session_id}-{secrets.token_hex(6)}"
        volume = f"{sandbox_id}-workspace"
        user = settings.DOCKER_USER
        handle = DockerHandle(sandbox_id, user, env=spec.env)  # checks the variables before anything exists
        labels = {str(k): str(v) for k, v in spec.labels.items()}
        labels.update(
            {
                SESSION_LABEL: str(spec.session_id),
                DEPLOYMENT_LABEL: settings.DOCKER_DEPLOYMENT,
                MANAGED_LABEL: "true",
            }
        )
        api = self.api
        try:
            with engine_errors(f"could not create a sandbox from {image!r}"):
                self._ensure_image(image)
                api.create_volume(volume, labels=labels)
                self._prepare_volume(image, sandbox_id, volume, user, labels)
                api.create_container(
                    image,
                    name=sandbox_id,
                    entrypoint=["/bin/sh", "-c", PID1_SCRIPT],
                    user=user,
                    working_dir=WORKSPACE,
                    hostname="sandbox",
                    # spec.env goes with each exec (DockerHandle.env), never into the container's config.
                    environment={"HOME": WORKSPACE, "LANG": "C.UTF-8", "TERM": "dumb"},
                    labels=labels,
                    host_config=self._host_config(spec, volume, user),
                )
                api.start(sandbox_id)
        except BaseException:
            try:
                self.destroy(sandbox_id)
            except Exception as exc:  # keep the original error; the reaper finds what is left
                log.warning("could not clean up the half-made sandbox %s: %s", sandbox_id, exc)
            raise
        return handle

    def _host_config(self, spec: SandboxSpec, volume: str, user: str) -> dict:
        memory_mb = spec.memory_mb or settings.DOCKER_MEMORY_MB
        return self.api.create_host_config(
            mounts=[docker.types.Mount(WORKSPACE, volume, type="volume", no_copy=True)],
            # No uid=/gid= tmpfs options: Podman (4.3) refuses them ("unknown mount option"). Every
            # process in the container runs as the sandbox user, so a sticky 1777 is as private.
            tmpfs={
                "/tmp": f"rw,nosuid,nodev,size={settings.DOCKER_TMP_MB}m,mode=1777",
                RUN_DIR: "rw,nosuid,nodev,noexec,size=1m,mode=1777",
            },
            read_only=True,
            network_mode=spec.network,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            nano_cpus=int((spec.cpu_limit or settings.DOCKER_CPUS) * 1_000_000_000),
            mem_limit=f"{memory_mb}m",
            memswap_limit=f"{memory_mb}m",
            pids_limit=spec.pids_limit or settings.DOCKER_PIDS_LIMIT,
        )

    def _ensure_image(self, image: str) -> None:
        try:
            self.api.inspect_image(image)
            return
        except docker.errors.ImageNotFound:
            pass
        repository, tag = docker.utils.parse_repository_tag(image)
        log.info("pulling %s for a sandbox", image)
        problem = ""
        try:
            # A pull can fail after the 200: Docker reports a broken download, and Podman even an
            # unknown image, as an "error" line in the progress stream rather than as a status code.
            for line in self.api.pull(repository, tag=tag or "latest", stream=True, decode=True):
                if isinstance(line, dict) and line.get("error"):
                    problem = str(line["error"])
        except docker.errors.APIError as exc:
            problem = explain(exc)
        try:
            self.api.inspect_image(image)
        except docker.errors.ImageNotFound:
            raise SandboxError(
                f"image {image!r} is not on the engine and could not be pulled: "
                f"{problem or 'the engine reported no error, yet the image is not there'}"
            ) from None

    def _prepare_volume(self, image: str, sandbox_id: str, volume: str, user: str, labels: dict) -> None:
        """Hand the new volume to the sandbox user from an init container that can only chown."""
        api = self.api
        init = f"{sandbox_id}-init"
        api.create_container(
            image,
            name=init,
            entrypoint=["chown", "-R", "-h", user, WORKSPACE],
            user="0:0",
            labels=labels,
            network_disabled=True,
            host_config=api.create_host_config(
                mounts=[docker.types.Mount(WORKSPACE, volume, type="volume")],
                network_mode="none",
                read_only=True,
                cap_drop=["ALL"],
                cap_add=["CHOWN"],
                security_opt=["no-new-privileges"],
                pids_limit=16,
            ),
        )
        try:
            api.start(init)
            status = api.wait(init, timeout=INIT_TIMEOUT).get("StatusCode")
            if status != 0:
                output = api.logs(init).decode("utf-8", "replace").strip()[-500:]
                raise SandboxError(
                    f"could not give the workspace to {user} in image {image!r} "
                    f"(chown exited with {status}): {output}"
                )
        except requests.exceptions.ReadTimeout:
            raise SandboxError(f"preparing the workspace volume took over {INIT_TIMEOUT} s") from None
        finally:
            try:
                api.remove_container(init, force=True)
            except docker.errors.NotFound:
                pass

    def connect(self, sandbox_id: str, env: dict[str, str] | None = None) -> DockerHandle:
        check_sandbox_id(sandbox_id)
        api = self.api
        with engine_errors(f"cannot connect to sandbox {sandbox_id}"):
            try:
                info = api.inspect_container(sandbox_id)
            except docker.errors.NotFound:
                raise SandboxError(f"sandbox {sandbox_id} does not exist") from None
            check_ours("container", sandbox_id, info["Config"].get("Labels"))
            state = info.get("State") or {}
            if not state.get("Running"):
                # The engine restarted, or someone stopped it: the workspace is on the volume.
                if state.get("Status") not in ("created", "exited"):
                    raise SandboxError(f"sandbox {sandbox_id} is {state.get('Status')}")
                api.start(sandbox_id)
        return DockerHandle(sandbox_id, info["Config"].get("User") or settings.DOCKER_USER, env=env)

    def destroy(self, sandbox_id: str) -> None:
        check_sandbox_id(sandbox_id)
        api = self.api
        volumes = {f"{sandbox_id}-workspace"}
        with engine_errors(f"cannot destroy sandbox {sandbox_id}"):
            for name in (sandbox_id, f"{sandbox_id}-init"):
                try:
                    info = api.inspect_container(name)
                except docker.errors.NotFound:
                    continue
                check_ours("container", name, info["Config"].get("Labels"))
                volumes.update(m["Name"] for m in info.get("Mounts") or [] if m.get("Type") == "volume")
                self._remove_container(name)
            for volume in sorted(volumes):
                try:
                    info = api.inspect_volume(volume)
                except docker.errors.NotFound:
                    continue
                check_ours("volume", volume, info.get("Labels"))
                self._remove_volume(volume)

    def _remove_container(self, name: str) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                self.api.remove_container(name, force=True)
                return
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                # "removal already in progress": someone else is destroying it; wait for them.
                if exc.status_code != 409 or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _remove_volume(self, volume: str) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                self.api.remove_volume(volume)
                return
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if exc.status_code != 409 or time.monotonic() > deadline:  # 409: still in use
                    raise
                time.sleep(0.1)

    def logs(self, sandbox_id: str, tail: int = 500) -> SandboxLogs:
        """The container's state and the last ``tail`` lines its main process wrote.

        A sandbox's commands run through exec, whose output never reaches the container log; what
        is there comes from PID 1 (and whatever writes to its stdout or stderr).
        """
        check_sandbox_id(sandbox_id)
        api = self.api
        volume = f"{sandbox_id}-workspace"
        with engine_errors(f"cannot read the logs of sandbox {sandbox_id}"):
            try:
                info = api.inspect_container(sandbox_id)
            except docker.errors.NotFound:
                try:
                    api.inspect_volume(volume)
                    left = f"its workspace volume {volume} is still there"
                except docker.errors.NotFound:
                    left = f"nor does its workspace volume {volume}"
                return SandboxLogs(
                    exists=False,
                    summary=(
                        f"the container {sandbox_id} does not exist on the engine at {engine_address()} "
                        f"(destroyed, or removed outside Deputies); {left}"
                    ),
                    note="no container, so no container logs",
                )
            check_ours("container", sandbox_id, info["Config"].get("Labels"))
            state = info.get("State") or {}
            details = {
                "status": str(state.get("Status", "")),
                "exit code": str(state.get("ExitCode", "")),
                "OOM killed": "yes" if state.get("OOMKilled") else "no",
                "started": _when(state.get("StartedAt")) or "never",
                "finished": _when(state.get("FinishedAt")) or "not finished",
                "restart count": str(info.get("RestartCount", 0)),
            }
            if state.get("Error"):
                details["engine error"] = str(state["Error"])
            details["image"] = str(info["Config"].get("Image", ""))
            details["created"] = str(info.get("Created", ""))
            details["engine"] = engine_address()
            tail = max(1, int(tail))
            response = api._get(
                api._url("/containers/{0}/logs", sandbox_id),
                params={"stdout": 1, "stderr": 1, "timestamps": 1, "tail": tail},
            )
            api._raise_for_status(response)
            lines = _log_lines(response.content, tty=bool(info["Config"].get("Tty")))[-tail:]
        summary = f"container {details['status']}"
        if state.get("OOMKilled"):
            summary += ", killed for running out of memory"
        return SandboxLogs(
            exists=True,
            summary=summary,
            details=details,
            lines=lines,
            note=(
                f"the last {tail} lines of the container log (PID 1's output; commands run through "
                "exec and their output is in the session's events)"
            ),
        )

    def managed_sandboxes(self) -> list[dict]:
        """This deployment's sandbox containers, for the reaper: id, session, state, created."""
        filters = {"label": [f"{MANAGED_LABEL}=true", f"{DEPLOYMENT_LABEL}={settings.DOCKER_DEPLOYMENT}"]}
        with engine_errors("cannot list sandboxes"):
            containers = self.api.containers(all=True, filters=filters)
        found = []
        for c in containers:
            name = (c.get("Names") or ["/"])[0].lstrip("/")
            if name.endswith("-init"):
                continue
            labels = c.get("Labels") or {}
            found.append(
                {
                    "id": name,
                    "session": labels.get(SESSION_LABEL),
                    "state": c.get("State"),
                    "created": c.get("Created"),
                }
            )
        return found

    def health(self) -> dict:
        result = {
            "ok": False,
            "provider": self.name,
            "isolated": True,
            "reason": "",
            "host": engine_address(),
            "engine": "",
            "version": "",
            "api_version": "",
            "podman": False,
            "image": settings.DOCKER_IMAGE,
            "image_present": False,
            "deployment": settings.DOCKER_DEPLOYMENT,
        }
        try:
            client = engine_client()
            client.ping()
            version = client.version()
        except (SandboxError, docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            result["reason"] = f"the container engine at {engine_address()} does not answer: {explain(exc)}"
            return result
        names = [str(c.get("Name", "")) for c in version.get("Components") or []]
        names.append(str((version.get("Platform") or {}).get("Name", "")))
        podman = any("podman" in n.lower() for n in names)
        try:
            client.api.inspect_image(settings.DOCKER_IMAGE)
            present = True
        except docker.errors.DockerException:
            present = False  # pulled on first use
        result.update(
            ok=True,
            engine="Podman" if podman else "Docker Engine",
            version=str(version.get("Version", "")),
            api_version=str(version.get("ApiVersion", "")),
            podman=podman,
            image_present=present,
        )
        return result


def _when(value: object) -> str:
    """An engine timestamp, or "" for the zero time both engines use for "not yet"."""
    text = str(value or "")
    return "" if not text or text.startswith("0001-01-01") else text


def _log_lines(body: bytes, *, tty: bool) -> list[LogLine]:
    """Split a logs response into lines, demultiplexing Docker's 8-byte framed streams."""
    if tty:  # one raw stream, no frames
        chunks = [("stdout", body)]
    else:
        chunks, at = [], 0
        while at + 8 <= len(body):
            size = int.from_bytes(body[at + 4 : at + 8], "big")
            chunks.append(("stderr" if body[at] == 2 else "stdout", body[at + 8 : at + 8 + size]))
            at += 8 + size
    lines: list[LogLine] = []
    for stream, data in chunks:
        text = data.decode("utf-8", "replace")
        lines.extend(LogLine(stream, line) for line in text.splitlines())
    return lines
