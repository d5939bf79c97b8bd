"""Sandbox lifecycle per provider: create-to-ready, an exec round trip (`true`), a file round trip, destroy.

p50/p99 over 30 sandboxes made one after another, for the local provider (bubblewrap when it works
here, else unisolated; the output says which) and the docker provider when an engine answers at
DOCKER_HOST. "ready" means the first command ran: create() plus one `true`. Each sandbox then runs
five more `true` round trips and writes and reads back 1 KB. Needs no database. Prints JSON.

    engine_env=$(scripts/docker-engine.sh) && eval "$engine_env"
    .venv/bin/python bench/sandbox.py [--count 30] [--image IMAGE]

The docker image defaults to the offline test image that scripts/docker-engine.sh imports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import percentiles  # noqa: E402

EXECS_PER_SANDBOX = 5


def measure(provider, count: int) -> dict:
    from sandboxes.base import SandboxSpec

    samples: dict[str, list[float]] = {
        "create_to_ready": [],
        "exec_true": [],
        "file_round_trip_1k": [],
        "destroy": [],
    }
    payload = os.urandom(1024)
    for n in range(count):
        started = time.perf_counter()
        handle = provider.create(SandboxSpec(session_id=900_000 + n))
        try:
            result = handle.exec(["true"], timeout=60)
            samples["create_to_ready"].append(time.perf_counter() - started)
            assert result.exit_code == 0, result
            for _ in range(EXECS_PER_SANDBOX):
                started = time.perf_counter()
                result = handle.exec(["true"], timeout=60)
                samples["exec_true"].append(time.perf_counter() - started)
                assert result.exit_code == 0, result
            started = time.perf_counter()
            handle.write_file("bench/data.bin", payload)
            assert handle.read_file("bench/data.bin") == payload
            samples["file_round_trip_1k"].append(time.perf_counter() - started)
        finally:
            started = time.perf_counter()
            provider.destroy(handle.id)
            samples["destroy"].append(time.perf_counter() - started)
    return {name: {**percentiles(values), "n": len(values)} for name, values in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument(
        "--image", default=os.environ.get("DEPUTIES_TEST_DOCKER_IMAGE", "deputies/sandbox-test:busybox")
    )
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="deputies-bench-sandbox-"))
    os.environ["DEPUTIES_DATA_DIR"] = str(data_dir)
    os.environ["DEPUTIES_DOCKER_IMAGE"] = args.image
    os.environ["DEPUTIES_DOCKER_DEPLOYMENT"] = f"bench-{os.getpid()}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deputies.settings")
    os.environ.setdefault("DEPUTIES_LOG_LEVEL", "WARNING")
    import django

    django.setup()
    from sandboxes.providers.docker import DockerProvider
    from sandboxes.providers.local import LocalProvider

    report: dict = {"count": args.count, "results": {}}
    local = LocalProvider(root=data_dir / "sandboxes")
    caps = local.capabilities()
    report["results"]["local"] = {
        "isolated": caps.isolated,
        "reason": caps.reason,
        **measure(local, args.count),
    }

    docker_provider = DockerProvider()
    health = docker_provider.health()
    if not health["ok"]:
        report["results"]["docker"] = {"skipped": health["reason"]}
    elif not health["image_present"]:
        report["results"]["docker"] = {"skipped": f"image {args.image} is not on the engine"}
    else:
        report["results"]["docker"] = {
            "engine": f"{health['engine']} {health['version']}",
            "image": args.image,
            **measure(docker_provider, args.count),
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
