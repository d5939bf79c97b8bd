#!/usr/bin/env bash
# Builds the control-plane image on the locally imported Debian base: no image registry needed.
#
#   engine_env=$(scripts/docker-engine.sh) && eval "$engine_env"    (or any engine in DOCKER_HOST)
#   scripts/build-image.sh                                          -> deputies/control-plane:dev
#
# Makes the base with scripts/base-image.sh when it is missing or stale (seconds from its cache), then
# `docker build`s the Dockerfile on it. The build reaches PyPI from the engine's default bridge
# network; where containers have no route out but the host does, set DEPUTIES_BUILD_NETWORK=host.
# Timings go to stderr; stdout is only the image name.
#
#   DEPUTIES_CONTROL_IMAGE   tag to build          (default deputies/control-plane:dev)
#   DEPUTIES_BASE_SUITE, DEPUTIES_BASE_IMAGE, ...   passed on to scripts/base-image.sh
#   DEPUTIES_BUILD_NETWORK   docker build --network (default: the engine's default)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${DEPUTIES_CONTROL_IMAGE:-deputies/control-plane:dev}

say() { echo "build-image: $*" >&2; }

started=$SECONDS
base=$(scripts/base-image.sh)
base_took=$((SECONDS - started))

args=(--tag "$IMAGE" --build-arg "BASE=$base")
[ -z "${DEPUTIES_BUILD_NETWORK:-}" ] || args+=(--network "$DEPUTIES_BUILD_NETWORK")
build_started=$SECONDS
log=$(mktemp "${TMPDIR:-/tmp}/deputies-build.XXXXXX")
if ! docker build "${args[@]}" . >"$log" 2>&1; then
  say "docker build failed; the end of its output ($log):"
  tail -n 30 "$log" >&2
  exit 1
fi
build_took=$((SECONDS - build_started))
cached=$(grep -c -E -- '---> Using cache|CACHED' "$log" || true)
rm -f "$log"
# Earlier builds of this image, untagged by this one, would pile up in a long-lived engine.
docker image prune --force --filter label=org.deputies.image=control-plane >/dev/null
say "base ${base_took}s, build ${build_took}s (${cached} cached steps), total $((SECONDS - started))s: $IMAGE on $base"
echo "$IMAGE"
