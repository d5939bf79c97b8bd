#!/usr/bin/env bash
# A Debian base image for the control-plane Dockerfile, made locally: no image registry needed.
#
#   scripts/base-image.sh            makes deputies/base:trixie unless it is already there
#   docker build --build-arg BASE=deputies/base:trixie .
#
# debootstrap (minbase) builds a root filesystem from the Debian mirror with python3, python3-venv,
# git, bubblewrap and ca-certificates (what the Dockerfile needs, so its apt step is skipped), applies
# the -updates and -security suites, and `docker import`s it. The finished tree is kept as a tarball
# under the cache, so the next import (say on a fresh engine) takes seconds; the image and the tarball
# carry a key over the recipe, the suite, the mirrors and the extra CAs, and are remade when it changes.
#
# Why trixie (Debian 13, Python 3.13) and not bookworm: bookworm's python3 is 3.11.2, older than the
# tarfile extraction filters (PEP 706, Python 3.11.4) the sandbox and runner rely on, so on a bookworm
# base the web answers but every session fails preparing its repository (tests/test_image.py shows it).
#
# CAs the host added locally (/usr/local/share/ca-certificates/*.crt, for example the CA of a
# TLS-intercepting egress proxy) are added to the image's trust store and pip is pointed at that store,
# so `pip install` in the build works wherever the host's own pip does. Set DEPUTIES_BASE_HOST_CAS=0 to
# leave them out (then the base trusts only Debian's CAs).
#
#   DEPUTIES_BASE_SUITE   Debian release             (default trixie)
#   DEPUTIES_BASE_IMAGE   image name                 (default deputies/base:$DEPUTIES_BASE_SUITE)
#   DEPUTIES_BASE_CACHE   tarball cache              (default /var/cache/deputies-ci/base)
#   DEPUTIES_BASE_MIRROR  Debian mirror              (default http://deb.debian.org/debian)
#   DEPUTIES_BASE_SECURITY_MIRROR                    (default http://deb.debian.org/debian-security)
#   DEPUTIES_BASE_HOST_CAS  1 or 0                   (default 1)
#   DEPUTIES_BASE_MAX_AGE_DAYS  remake the tree (fresh security updates) after  (default 30)
#
# Progress goes to stderr; stdout is only the image name. Needs root (debootstrap), DOCKER_HOST set
# to an engine that answers (scripts/docker-engine.sh), and apt for debootstrap itself.
set -euo pipefail

SUITE=${DEPUTIES_BASE_SUITE:-trixie}
IMAGE=${DEPUTIES_BASE_IMAGE:-deputies/base:$SUITE}
CACHE=${DEPUTIES_BASE_CACHE:-/var/cache/deputies-ci/base}
MIRROR=${DEPUTIES_BASE_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEPUTIES_BASE_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
HOST_CAS=${DEPUTIES_BASE_HOST_CAS:-1}
MAX_AGE_DAYS=${DEPUTIES_BASE_MAX_AGE_DAYS:-30}
PACKAGES=python3,python3-venv,git,bubblewrap,ca-certificates
# Bump when the recipe below changes; the key then changes and the image and tarball are remade.
RECIPE=1

say() { echo "base-image: $*" >&2; }

case "$HOST_CAS" in 0 | 1) ;; *)
  say "DEPUTIES_BASE_HOST_CAS must be 0 or 1, not '$HOST_CAS'"
  exit 2
  ;;
esac
case "$MAX_AGE_DAYS" in '' | *[!0-9]*)
  say "DEPUTIES_BASE_MAX_AGE_DAYS must be a whole number of days, not '$MAX_AGE_DAYS'"
  exit 2
  ;;
esac

docker version --format '{{.Server.Version}}' >/dev/null 2>&1 || {
  say "no Docker engine answers at ${DOCKER_HOST:-the default socket}; start one with:"
  # shellcheck disable=SC2016 # the command to type, not to expand
  say '  engine_env=$(scripts/docker-engine.sh) && eval "$engine_env"'
  exit 1
}

host_cas=()
if [ "$HOST_CAS" = 1 ]; then
  shopt -s nullglob
  host_cas=(/usr/local/share/ca-certificates/*.crt)
  shopt -u nullglob
fi

key=$({
  echo "recipe=$RECIPE suite=$SUITE packages=$PACKAGES mirror=$MIRROR security=$SECURITY_MIRROR"
  [ ${#host_cas[@]} -eq 0 ] || cat "${host_cas[@]}"
} | sha256sum | cut -c1-16)

# The tree is remade after MAX_AGE days even when nothing else changed, so a long-lived cache still
# picks up Debian's security updates.
max_age=$((MAX_AGE_DAYS * 86400))
have=$(docker image inspect --format \
  '{{index .Config.Labels "org.deputies.base-key"}} {{index .Config.Labels "org.deputies.base-built"}}' \
  "$IMAGE" 2>/dev/null || true)
read -r have_key have_built <<<"$have" || true
if [ "${have_key:-}" = "$key" ] && [ $(($(date +%s) - ${have_built:-0})) -lt $max_age ]; then
  say "$IMAGE is up to date (key $key)"
  echo "$IMAGE"
  exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/lock"
flock 9 # two callers must not debootstrap into the same cache at once
# Trees of an earlier run that was killed before its own clean-up.
for stale in "$CACHE"/rootfs.*; do
  [ -d "$stale" ] || continue
  if mountpoint -q "$stale/proc"; then umount "$stale/proc" || umount -l "$stale/proc"; fi
  rm -rf --one-file-system "$stale"
done

tarball="$CACHE/$SUITE-$key.tar"
if [ -s "$tarball" ] && [ $(($(date +%s) - $(stat -c %Y "$tarball"))) -ge $max_age ]; then
  say "the cached tree is older than $MAX_AGE_DAYS days; making it again"
  rm -f "$tarball"
fi
if [ ! -s "$tarball" ]; then
  command -v debootstrap >/dev/null || {
    say "installing debootstrap"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  }
  tree=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  cleanup() {
    # Never remove a tree with the host's /proc still mounted into it.
    if mountpoint -q "$tree/proc"; then umount "$tree/proc" || umount -l "$tree/proc"; fi
    rm -rf --one-file-system "$tree"
  }
  trap cleanup EXIT
  started=$SECONDS
  say "debootstrap $SUITE (minbase + $PACKAGES) from $MIRROR"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tree" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 || {
    say "debootstrap failed; the end of $CACHE/debootstrap.log:"
    tail -n 20 "$CACHE/debootstrap.log" >&2
    exit 1
  }
  say "debootstrap took $((SECONDS - started))s"

  cat >"$tree/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
  # Keep later apt installs as small as this one.
  cat >"$tree/etc/apt/apt.conf.d/90deputies" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF
  for ca in "${host_cas[@]}"; do
    say "trusting the host's local CA $(basename "$ca")"
    cp "$ca" "$tree/usr/local/share/ca-certificates/"
  done

  say "applying $SUITE-updates and $SUITE-security"
  mount -t proc proc "$tree/proc"
  chroot "$tree" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get update -qq && apt-get upgrade -y -qq && update-ca-certificates' >>"$CACHE/debootstrap.log" 2>&1 || {
    say "updating the tree failed; the end of $CACHE/debootstrap.log:"
    tail -n 20 "$CACHE/debootstrap.log" >&2
    exit 1
  }
  umount "$tree/proc"

  # Nothing of the host or of the build stays in the image: apt caches, docs, the host's name and DNS.
  rm -rf "$tree"/var/cache/apt/*.bin "$tree"/var/cache/apt/archives/*.deb "$tree"/var/lib/apt/lists/*
  find "$tree/usr/share/doc" -type f ! -name copyright -delete
  rm -rf "$tree"/usr/share/man/* "$tree"/usr/share/info/* "$tree"/var/log/*.log "$tree"/var/log/apt/* "$tree"/tmp/* "$tree"/var/tmp/*
  : >"$tree/etc/resolv.conf"
  echo localhost >"$tree/etc/hostname"

  tar -C "$tree" --numeric-owner --xattrs -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  cleanup
  trap - EXIT
  # Older trees are of no further use.
  find "$CACHE" -maxdepth 1 -name "$SUITE-*.tar" ! -name "$(basename "$tarball")" -delete
  say "cached the tree as $tarball ($(du -h "$tarball" | cut -f1))"
fi

started=$SECONDS
changes=(
  --change "LABEL org.deputies.base-key=$key"
  --change "LABEL org.deputies.base-built=$(stat -c %Y "$tarball")"
  --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  --change "ENV LANG=C.UTF-8"
  --change 'CMD ["bash"]'
)
# pip vendors its own CA bundle; point it at the system store, which holds the host's CAs too.
[ ${#host_cas[@]} -eq 0 ] || changes+=(--change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt")
docker import "${changes[@]}" "$tarball" "$IMAGE" >/dev/null
say "imported $IMAGE from $tarball in $((SECONDS - started))s"
echo "$IMAGE"
