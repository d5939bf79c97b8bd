#!/usr/bin/env bash
# A private Podman API service (Docker-compatible) for the docker provider's tests, rootful, on its
# own socket and storage, without touching the host's containers or /etc/containers.
#
#   engine_env=$(scripts/podman-engine.sh) && eval "$engine_env"
#
# Idempotent: installs Debian's podman, busybox-static and bash-static when missing, writes a
# private containers.conf and storage.conf (cgroupfs, file events, k8s-file logs, its own network
# config dir), starts `podman system service` on its own socket, waits until it answers, and imports
# the same offline test image as scripts/docker-engine.sh (busybox plus a static bash) when it is
# missing or its recipe changed. Progress goes to stderr; stdout is only the `export` lines, also
# kept in "$DEPUTIES_PODMAN_RUN/env" for other shells to source.
#
#   DEPUTIES_PODMAN_CACHE  storage root and image cache (default /var/cache/deputies-ci/podman)
#   DEPUTIES_PODMAN_RUN    socket, pid file, run root   (default ${TMPDIR:-/tmp}/deputies-podman)
#   scripts/podman-engine.sh stop    stops the service this script started
#
# The tests use it through DEPUTIES_TEST_PODMAN_HOST (tests/test_sandbox_docker.py runs the docker
# provider against both engines); DOCKER_HOST is left alone.
set -euo pipefail

CACHE=${DEPUTIES_PODMAN_CACHE:-/var/cache/deputies-ci/podman}
RUN=${DEPUTIES_PODMAN_RUN:-${TMPDIR:-/tmp}/deputies-podman}
SOCK="$RUN/podman.sock"
HOST="unix://$SOCK"
IMAGE=${DEPUTIES_TEST_DOCKER_IMAGE:-deputies/sandbox-test:busybox}
# Keep in step with RECIPE in scripts/docker-engine.sh: the image is the same.
RECIPE=3
START_TIMEOUT=${DEPUTIES_PODMAN_START_TIMEOUT:-60}

say() { echo "podman-engine: $*" >&2; }

export CONTAINERS_CONF="$RUN/containers.conf"
export CONTAINERS_STORAGE_CONF="$RUN/storage.conf"
# Every podman command below (and the service) uses the private configuration and storage.
pm() { podman --root "$CACHE/storage" --runroot "$RUN/runroot" "$@"; }

answers() { timeout 5 curl -fsS --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1; }

stop_service() {
  local pid
  pid=$(cat "$RUN/podman.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    say "stopping podman system service (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
}

if [ "${1:-}" = "stop" ]; then
  stop_service
  exit 0
fi

need=()
command -v podman >/dev/null || need+=(podman)
command -v curl >/dev/null || need+=(curl)
[ -x /bin/busybox ] || need+=(busybox-static)
[ -x /bin/bash-static ] || need+=(bash-static)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

mkdir -p "$RUN" "$CACHE/storage" "$CACHE/networks"
exec 9>"$RUN/lock"
flock 9  # two concurrent callers must not start two services on one storage root

write_config() {
  local driver=$1
  # cgroupfs and file events: there is no systemd or journald in CI containers. Rootful podman
  # raises a container's nofile and nproc limits to the kernel's maximum, which fails ("error setting
  # rlimit type 7: operation not permitted") where the engine lacks CAP_SYS_RESOURCE, as inside an
  # unprivileged CI container; containers get this shell's hard nofile limit instead, as under
  # dockerd, and at most 32768 processes (podman lowers its own nproc limit to that when it cannot
  # raise it, and a child cannot get more than its parent).
  local nofile nproc
  nofile=$(ulimit -Hn)
  nproc=$(ulimit -Hu)
  [ "$nofile" = unlimited ] && nofile=1048576
  if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
  cat >"$CONTAINERS_CONF" <<CONF
[containers]
log_driver = "k8s-file"
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$RUN/events.log"
tmp_dir = "$RUN/tmp"
volume_path = "$CACHE/storage/volumes"

[network]
network_config_dir = "$CACHE/networks"
CONF
  cat >"$CONTAINERS_STORAGE_CONF" <<CONF
[storage]
driver = "$driver"
graphroot = "$CACHE/storage"
runroot = "$RUN/runroot"
CONF
}

start_service() {
  local driver=$1
  say "starting podman system service (storage driver $driver) with storage under $CACHE/storage"
  write_config "$driver"
  rm -f "$SOCK"
  # setsid: the service outlives this script and its caller's process group; 9>&-: it must not
  # inherit (and so hold forever) the start-up lock.
  # cd /: conmon inherits the service's working directory and fails ("Failed to get working
  # directory", then "write child: broken pipe") once that directory is deleted, e.g. a CI clone.
  (cd / && exec setsid podman --root "$CACHE/storage" --runroot "$RUN/runroot" --log-level warn \
    system service --time=0 "$HOST" </dev/null >"$RUN/podman.log" 2>&1 9>&-) &
  local pid=$! deadline=$((SECONDS + START_TIMEOUT))
  echo "$pid" >"$RUN/podman.pid"
  until answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
      say "podman exited; the end of $RUN/podman.log:"
      tail -n 15 "$RUN/podman.log" >&2
      return 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      say "podman did not answer within ${START_TIMEOUT}s; the end of $RUN/podman.log:"
      tail -n 15 "$RUN/podman.log" >&2
      kill -TERM "$pid" 2>/dev/null || true
      return 1
    fi
    sleep 0.2
  done
  # The storage driver cannot change under existing images; probe it with a real container.
  if ! pm info >/dev/null 2>"$RUN/info.err"; then
    say "podman info failed: $(tail -n 5 "$RUN/info.err")"
    return 1
  fi
}

# A service started from a directory that is gone since cannot start containers (see start_service).
cwd_gone() {
  local pid
  pid=$(cat "$RUN/podman.pid" 2>/dev/null || true)
  [ -n "$pid" ] && [[ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" == *" (deleted)" ]]
}

if answers && ! cwd_gone; then
  say "podman already answers at $HOST"
  [ -f "$CONTAINERS_CONF" ] || write_config "$(cat "$CACHE/storage-driver" 2>/dev/null || echo overlay)"
else
  stop_service # a stale service that stopped answering
  driver=$(cat "$CACHE/storage-driver" 2>/dev/null || echo overlay)
  if ! start_service "$driver"; then
    [ "$driver" = vfs ] && exit 1
    say "retrying with the vfs storage driver (slower, works on any filesystem)"
    stop_service
    rm -rf "$CACHE/storage"
    mkdir -p "$CACHE/storage"
    start_service vfs
    driver=vfs
  fi
  echo "$driver" >"$CACHE/storage-driver"
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
    pm import --quiet \
      --change "LABEL org.deputies.recipe=$RECIPE" \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["sh"]' \
      - "$IMAGE" >/dev/null
  rm -rf "$tree"
}

have=$(pm image inspect --format '{{index .Config.Labels "org.deputies.recipe"}}' "$IMAGE" 2>/dev/null || true)
if [ "$have" != "$RECIPE" ]; then
  say "importing the test image $IMAGE (busybox $(/bin/busybox | head -n1 | awk '{print $2}') and bash, offline)"
  build_image
fi

{
  echo "export DEPUTIES_TEST_PODMAN_HOST=$HOST"
  echo "export DEPUTIES_TEST_DOCKER_IMAGE=$IMAGE"
} | tee "$RUN/env"
