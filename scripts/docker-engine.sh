#!/usr/bin/env bash
# A private Docker Engine for tests, CI and benchmarks, started without touching the host's own engine.
#
#   engine_env=$(scripts/docker-engine.sh) && eval "$engine_env"
#
# Idempotent: installs Debian's docker.io, busybox-static and bash-static when missing, starts
# dockerd with its own data root (cached, so images survive between runs) and its own socket, waits
# until it answers, and imports the offline test image (busybox plus a static bash; no registry is
# needed) when it is missing or its recipe changed. Progress goes to stderr; stdout is only the
# `export` lines, which are also kept in "$DEPUTIES_DOCKER_RUN/env" for other shells to source.
#
#   DEPUTIES_DOCKER_CACHE  data root and image cache   (default /var/cache/deputies-ci/docker)
#   DEPUTIES_DOCKER_RUN    socket, pid file, exec root (default ${TMPDIR:-/tmp}/deputies-docker)
#   scripts/docker-engine.sh stop    stops the engine this script started
#
# On a workstation that already runs Docker, the private engine shares the docker0 bridge with the
# host's engine; `stop` it when done.
set -euo pipefail

CACHE=${DEPUTIES_DOCKER_CACHE:-/var/cache/deputies-ci/docker}
RUN=${DEPUTIES_DOCKER_RUN:-${TMPDIR:-/tmp}/deputies-docker}
SOCK="$RUN/docker.sock"
export DOCKER_HOST="unix://$SOCK"
IMAGE=${DEPUTIES_TEST_DOCKER_IMAGE:-deputies/sandbox-test:busybox}
# Bump when the image recipe below changes; the image is rebuilt when its label differs.
RECIPE=3
START_TIMEOUT=${DEPUTIES_DOCKER_START_TIMEOUT:-60}

say() { echo "docker-engine: $*" >&2; }

answers() { timeout 5 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

stop_engine() {
  local pid
  pid=$(cat "$RUN/dockerd.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    say "stopping dockerd (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
}

if [ "${1:-}" = "stop" ]; then
  stop_engine
  exit 0
fi

need=()
command -v dockerd >/dev/null || need+=(docker.io)
[ -x /bin/busybox ] || need+=(busybox-static)
[ -x /bin/bash-static ] || need+=(bash-static)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's CLI is /usr/bin/docker; any docker on PATH that speaks the API will do.
command -v docker >/dev/null || { say "no docker CLI after installing docker.io"; exit 1; }

mkdir -p "$RUN" "$CACHE"
exec 9>"$RUN/lock"
flock 9  # two concurrent callers must not start two engines on one data root

start_engine() {
  local driver=$1
  say "starting dockerd (storage driver ${driver:-default}) with data root $CACHE/data"
  rm -f "$SOCK"
  local args=(--data-root "$CACHE/data" --exec-root "$RUN/exec" --pidfile "$RUN/dockerd.pid"
    --host "$DOCKER_HOST" --userland-proxy=false --log-level warn)
  [ -n "$driver" ] && args+=(--storage-driver "$driver")
  # setsid: the engine outlives this script and its caller's process group; 9>&-: it must not
  # inherit (and so hold forever) the start-up lock.
  # cd /: the engine must not keep (or depend on) the caller's directory, which may be a deleted clone.
  (cd / && exec setsid dockerd "${args[@]}" </dev/null >"$RUN/dockerd.log" 2>&1 9>&-) &
  local pid=$! deadline=$((SECONDS + START_TIMEOUT))
  until answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
      say "dockerd exited; the end of $RUN/dockerd.log:"
      tail -n 15 "$RUN/dockerd.log" >&2
      return 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      say "dockerd did not answer within ${START_TIMEOUT}s; the end of $RUN/dockerd.log:"
      tail -n 15 "$RUN/dockerd.log" >&2
      kill -TERM "$pid" 2>/dev/null || true
      return 1
    fi
    sleep 0.2
  done
}

if answers; then
  say "dockerd already answers at $DOCKER_HOST"
else
  stop_engine  # a stale engine that stopped answering
  driver=$(cat "$CACHE/storage-driver" 2>/dev/null || true)
  if ! start_engine "$driver"; then
    [ "$driver" = vfs ] && exit 1
    say "retrying with the vfs storage driver (slower, works on any filesystem)"
    stop_engine
    start_engine vfs
    echo vfs >"$CACHE/storage-driver"
  fi
fi

build_image() {
  local tree
  tree=$(mktemp -d "$RUN/rootfs.XXXXXX")
  mkdir -p "$tree"/{bin,etc,tmp,usr}
  chmod 1777 "$tree/tmp"
  cp /bin/busybox "$tree/bin/busybox"
  cp /bin/bash-static "$tree/bin/bash"
  local applet
  for applet in $(/bin/busybox --list); do
    [ -e "$tree/bin/$applet" ] || ln -s busybox "$tree/bin/$applet"
  done
  ln -s ../bin "$tree/usr/bin"
  ln -s bin "$tree/sbin"
  ln -s ../bin "$tree/usr/sbin"
  printf 'root:x:0:0:root:/root:/bin/sh\nsandbox:x:1000:1000:sandbox:/workspace:/bin/sh\n' >"$tree/etc/passwd"
  printf 'root:x:0:\nsandbox:x:1000:\n' >"$tree/etc/group"
  tar -C "$tree" --numeric-owner -c . |
    docker import \
      --change "LABEL org.deputies.recipe=$RECIPE" \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["sh"]' \
      - "$IMAGE" >/dev/null
  rm -rf "$tree"
}

have=$(docker image inspect --format '{{index .Config.Labels "org.deputies.recipe"}}' "$IMAGE" 2>/dev/null || true)
if [ "$have" != "$RECIPE" ]; then
  say "importing the test image $IMAGE (busybox $(/bin/busybox | head -n1 | awk '{print $2}') and bash, offline)"
  build_image
fi

{
  echo "export DOCKER_HOST=$DOCKER_HOST"
  echo "export DEPUTIES_TEST_DOCKER_IMAGE=$IMAGE"
} | tee "$RUN/env"
