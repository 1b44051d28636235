#!/usr/bin/env bash
# Builds the stillroom image with docker or podman, also on a machine without a container registry.
#
#   scripts/build-image.sh [--tag NAME] [--base python:3.11-slim|debian|IMAGE] [--variant full|slim]
#                          [--no-cache]
#
# --base debian (chosen automatically when python:3.11-slim cannot be pulled) first makes a base
# image from this machine's own apt sources with mmdebstrap, once. Host quirks (ulimits, hybrid
# cgroups, a TLS-intercepting proxy) are detected and worked around, each announced in one line.
# --variant slim leaves out triton (only torch.compile on CUDA needs it) and the dev tools.
# Rerunning is cheap: the base is reused and unchanged build steps come from the layer cache
# (--no-cache rebuilds every step).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=build-image
# shellcheck source-path=SCRIPTDIR/..
source scripts/container-common.sh

DEFAULT_BASE=python:3.11-slim
TAG=""
BASE=$DEFAULT_BASE
VARIANT=full
CACHE_OPTS=()
WORK=""
MIN_FREE_GB=30 # a build on the development machine ran out of space with 23 GB free

usage() { sed -n '2,12s/^# \{0,1\}//p' "$0"; }

parse_args() {
  while [ $# -gt 0 ]; do
    case $1 in
      --tag) TAG=${2:?--tag needs a value} && shift ;;
      --base) BASE=${2:?--base needs a value} && shift ;;
      --variant) VARIANT=${2:?--variant needs a value} && shift ;;
      --no-cache) CACHE_OPTS=(--no-cache) ;;
      -h | --help) usage && exit 0 ;;
      *) usage >&2 && die "unknown argument '$1'" ;;
    esac
    shift
  done
  case $VARIANT in full | slim) ;; *) die "--variant must be full or slim, not '$VARIANT'" ;; esac
  if [ -z "$TAG" ]; then
    if [ "$VARIANT" = full ]; then TAG=stillroom:latest; else TAG=stillroom:slim; fi
  fi
}

# A registry name without a registry host is Docker Hub's (podman would otherwise ask which).
qualified() {
  case $1 in
    */*) echo "$1" ;;
    *) echo "docker.io/library/$1" ;;
  esac
}

# The Debian release to bootstrap: this host's if it is Debian, else bookworm (Python 3.11).
debian_suite() {
  local id="" codename=""
  # shellcheck disable=SC1091
  [ -r /etc/os-release ] && id=$(. /etc/os-release && echo "${ID:-}") && codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  if [ "$id" = debian ] && [ -n "$codename" ]; then echo "$codename"; else echo bookworm; fi
}

# Makes (once) a minimal Debian image with python3 + venv from this machine's apt sources.
make_debian_base() {
  local suite name sources=()
  suite=$(debian_suite)
  name=$(local_name "stillroom-base:$suite")
  if image_exists "$name"; then
    say "base image $name exists: reusing it"
    BASE_IMAGE=$name
    return
  fi
  command -v mmdebstrap >/dev/null 2>&1 || {
    say "installing mmdebstrap to make the Debian base image"
    apt_install mmdebstrap || die "mmdebstrap is missing and cannot be installed here (needs root and apt-get)"
  }
  if [ -r /etc/apt/sources.list.d/debian.sources ]; then
    sources=(/etc/apt/sources.list.d/debian.sources)
    say "making base image $name with mmdebstrap from this machine's apt sources (${sources[0]})"
  else
    say "making base image $name with mmdebstrap from the default Debian mirrors"
  fi
  # shellcheck disable=SC2016 # $1 is the hook's argument (the root directory), expanded by mmdebstrap
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --customize-hook='rm -f "$1"/etc/hostname "$1"/etc/resolv.conf' \
    "$suite" "$WORK/rootfs.tar" "${sources[@]}" </dev/null || die "mmdebstrap failed"
  # An imported tarball carries no environment: give it the PATH and locale a Debian image has.
  "${ENGINE_CMD[@]}" import \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV LANG=C.UTF-8" --change 'CMD ["bash"]' \
    "$WORK/rootfs.tar" "$name" >"$WORK/import.log" 2>&1 || die "could not import the base image: $(tail -n 3 "$WORK/import.log")"
  rm -f "$WORK/rootfs.tar"
  BASE_IMAGE=$name
}

# Sets BASE_IMAGE: the --base image (pulled if need be), or the Debian base.
resolve_base() {
  if [ "$BASE" = debian ]; then
    make_debian_base
    return
  fi
  if image_exists "$BASE"; then
    BASE_IMAGE=$BASE
  elif timeout 120 "${ENGINE_CMD[@]}" pull -q "$(qualified "$BASE")" >/dev/null 2>&1; then
    BASE_IMAGE=$(qualified "$BASE")
  elif [ "$BASE" = "$DEFAULT_BASE" ]; then
    say "cannot pull $BASE (no registry reachable?): making a Debian base image instead (--base debian)"
    make_debian_base
    return
  else
    die "base image $BASE is neither here nor pullable"
  fi
  say "base image: $BASE_IMAGE"
}

# Sets BUILD_OPTS. If the base cannot verify PyPI's certificate but this host can (a proxy that
# re-signs TLS with a CA only the host trusts), the host's CA bundle is mounted over the base's for
# the build steps only (pip reads it there: the Dockerfile's PIP_CERT); it is not in the image.
BUILD_OPTS=()
tls_mounts() {
  local probe='import urllib.request; urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=30)'
  local err bundle=/etc/ssl/certs/ca-certificates.crt
  if err=$("${ENGINE_CMD[@]}" run --rm "${RUN_OPTS[@]}" --entrypoint python3 "$BASE_IMAGE" -c "$probe" 2>&1); then
    say "containers reach PyPI with their own CA certificates"
    return
  fi
  case $err in
    *CERTIFICATE_VERIFY_FAILED*) ;;
    *) say "WARNING: cannot check PyPI from a container (the build needs it): $(printf '%s' "$err" | tail -n 1)" && return ;;
  esac
  [ -r "$bundle" ] || die "PyPI's certificate is not trusted inside containers and $bundle is missing on this host"
  [ "$ENGINE" = podman ] || die "a TLS-intercepting proxy re-signs PyPI's certificate; docker build cannot mount" \
    "this host's CA bundle into the build: use podman (CONTAINER_ENGINE=podman)"
  say "PyPI's certificate is re-signed by a proxy only this host trusts: mounting the host CA bundle" \
    "into the build steps (not into the image)"
  BUILD_OPTS+=(-v "$bundle:$bundle:ro")
}

build() {
  say "building $TAG (variant $VARIANT) from $BASE_IMAGE"
  "${ENGINE_CMD[@]}" build "${RUN_OPTS[@]}" "${BUILD_OPTS[@]}" "${CACHE_OPTS[@]}" \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "VARIANT=$VARIANT" -t "$TAG" -f Dockerfile . ||
    die "the build failed (see above)"
}

gb() { awk -v b="$1" 'BEGIN { printf "%.2f GB", b / 1e9 }'; }

# The engine writes the ~6.5 GB install layer more than once while committing it; with less free space
# the build fails after minutes with "no space left on device", so say so before starting.
check_space() {
  local root free_gb
  if [ "$ENGINE" = podman ]; then
    root=$("${ENGINE_CMD[@]}" info --format '{{.Store.GraphRoot}}' 2>/dev/null) || return 0
  else
    root=$("${ENGINE_CMD[@]}" info --format '{{.DockerRootDir}}' 2>/dev/null) || return 0
  fi
  [ -d "$root" ] || return 0
  free_gb=$(df -Pk "$root" | awk 'NR == 2 { printf "%d", $4 / 1e6 }')
  if [ "$free_gb" -lt "$MIN_FREE_GB" ]; then
    say "WARNING: $free_gb GB free under $root; a build needs about $MIN_FREE_GB GB" \
      "(free space with '$ENGINE image prune' or '$ENGINE rmi' of old stillroom images)"
  fi
}

# One line: the image's size and what makes it up (sizes inside the image, from du).
report_size() {
  local bytes parts
  bytes=$("${ENGINE_CMD[@]}" image inspect --format '{{.Size}}' "$TAG")
  # shellcheck disable=SC2016 # expanded inside the container
  parts=$("${ENGINE_CMD[@]}" run --rm --network none "${RUN_OPTS[@]}" --entrypoint sh "$TAG" -c '
    cd /opt/venv/lib/python3*/site-packages && for d in nvidia torch triton; do
      echo "$d $(du -sk "$d" 2>/dev/null | cut -f1 || echo 0)"; done
    echo "venv $(du -sk /opt/venv | cut -f1)"; echo "app $(du -sk /app | cut -f1)"')
  awk -v total="$bytes" '
    { kb[$1] = $2 }
    END {
      other = kb["venv"] - kb["nvidia"] - kb["torch"] - kb["triton"]
      sys = total / 1024 - kb["venv"] - kb["app"]
      printf "CUDA libraries (nvidia-*) %.2f GB, torch %.2f GB, triton %.2f GB, other Python packages %.2f GB, ",
        kb["nvidia"] * 1024 / 1e9, kb["torch"] * 1024 / 1e9, kb["triton"] * 1024 / 1e9, other * 1024 / 1e9
      printf "base system %.2f GB, /app %.1f MB\n", sys * 1024 / 1e9, kb["app"] * 1024 / 1e6
    }' <<<"$parts" | sed "s/^/$PREFIX: size breakdown: /" >&2
  echo "$bytes"
}

main() {
  parse_args "$@"
  local start bytes
  start=$(date +%s)
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  pick_engine install
  resolve_base
  fix_quirks "$BASE_IMAGE"
  tls_mounts
  check_space
  build
  bytes=$(report_size)
  say "OK $(local_name "$TAG"): $(gb "$bytes") ($bytes bytes), variant $VARIANT, base $BASE_IMAGE," \
    "built in $(($(date +%s) - start))s"
}

main "$@"
