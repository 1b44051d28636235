# shellcheck shell=bash
# Shared by scripts/build-image.sh and scripts/test-image.sh (sourced, not run).
#
# Picks a working container engine (docker if its daemon answers, else podman) and finds the
# flags this host needs to run containers at all. Each workaround is found by its symptom (a
# probe container fails with a known message), applied, and announced in one line. The caller
# sets PREFIX (e.g. "build-image") before sourcing; afterwards it runs containers as
#
#   "${ENGINE_CMD[@]}" run "${RUN_OPTS[@]}" ...     and     "${ENGINE_CMD[@]}" build "${RUN_OPTS[@]}" ...

ENGINE=""     # docker or podman
ENGINE_CMD=() # the engine and its global flags, e.g. (podman --runtime runc)
RUN_OPTS=()   # flags every container (run and build) needs on this host, e.g. --ulimit ...

# Packages that make podman work as root on Debian/Ubuntu (no daemon, no registry needed).
PODMAN_PACKAGES=(podman buildah runc crun fuse-overlayfs uidmap slirp4netns containernetworking-plugins
  netavark aardvark-dns catatonit conmon golang-github-containers-common iptables)

say() { printf '%s: %s\n' "$PREFIX" "$*" >&2; }
# shellcheck disable=SC2034 # read by test-image.sh's exit trap
REPORTED=0 # an error has been explained (callers' exit traps need not add a generic one)
# shellcheck disable=SC2034
die() {
  REPORTED=1
  say "ERROR: $*"
  exit 1
}

is_root() { [ "$(id -u)" -eq 0 ]; }

# apt-get install, for root on Debian-like hosts only.
apt_install() {
  is_root && command -v apt-get >/dev/null 2>&1 || return 1
  DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

docker_is_podman() { docker --version 2>/dev/null | grep -qi podman; }
docker_works() { command -v docker >/dev/null 2>&1 && timeout 30 docker info >/dev/null 2>&1; }
podman_works() { command -v podman >/dev/null 2>&1 && timeout 60 podman info >/dev/null 2>&1; }

# Sets ENGINE and ENGINE_CMD. With "install", installs podman if neither engine works (root + apt).
pick_engine() {
  local may_install=${1:-}
  case ${CONTAINER_ENGINE:-} in
    docker) docker_works || die "CONTAINER_ENGINE=docker but the docker daemon does not answer" ;;
    podman) podman_works || die "CONTAINER_ENGINE=podman but podman does not work (podman info fails)" ;;
    "")
      if command -v docker >/dev/null 2>&1 && ! docker_is_podman; then
        if docker_works; then
          CONTAINER_ENGINE=docker
        else
          say "a docker client is installed but no docker daemon answers (docker info fails): trying podman"
        fi
      fi
      if [ -z "${CONTAINER_ENGINE:-}" ] && ! podman_works; then
        [ "$may_install" = install ] || die "neither docker nor podman works; run scripts/build-image.sh first"
        say "neither docker nor podman works: installing podman from the distribution's packages"
        apt_install "${PODMAN_PACKAGES[@]}" || die "could not install podman (needs root and apt-get); install docker or podman"
        podman_works || die "podman was installed but 'podman info' still fails"
      fi
      CONTAINER_ENGINE=${CONTAINER_ENGINE:-podman}
      ;;
    *) die "CONTAINER_ENGINE must be docker or podman, not '$CONTAINER_ENGINE'" ;;
  esac
  ENGINE=$CONTAINER_ENGINE
  ENGINE_CMD=("$ENGINE")
  say "container engine: $ENGINE ($("$ENGINE" --version 2>/dev/null | head -n1))"
}

# podman names local images localhost/NAME; docker uses NAME as is.
local_name() {
  case $1 in
    */*) echo "$1" ;;
    *) if [ "$ENGINE" = podman ]; then echo "localhost/$1"; else echo "$1"; fi ;;
  esac
}

image_exists() { "${ENGINE_CMD[@]}" image inspect "$1" >/dev/null 2>&1; }

# Workarounds, each applied at most once. They return 1 when already applied (nothing left to try).
# The hard limit this engine may hand on: the host's, or lower where podman lowered its own (it
# applies its default nproc, 32768, to itself; `podman run --help` shows that default).
engine_hard_limit() {
  local name=$1 host=$2 own
  [ "$host" = unlimited ] && host=-1
  own=$("${ENGINE_CMD[@]}" run --help 2>/dev/null | sed -n "s/.*default \[.*$name=\([0-9]*\):\([0-9]*\).*/\2/p" | head -n1)
  if [ -n "$own" ] && { [ "$host" -lt 0 ] || [ "$own" -lt "$host" ]; }; then echo "$own"; else echo "$host"; fi
}

fix_ulimits() {
  [[ " ${RUN_OPTS[*]} " == *" --ulimit "* ]] && return 1
  local nofile nproc
  nofile=$(engine_hard_limit nofile "$(ulimit -Hn)")
  nproc=$(engine_hard_limit nproc "$(ulimit -Hu)")
  say "the engine's default ulimits exceed the hard limits it may set (no CAP_SYS_RESOURCE):" \
    "passing --ulimit nofile=$nofile:$nofile --ulimit nproc=$nproc:$nproc"
  RUN_OPTS+=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
}

fix_runtime() {
  [ "$ENGINE" = podman ] || return 1
  [[ " ${ENGINE_CMD[*]} " == *" --runtime "* ]] && return 1
  command -v runc >/dev/null 2>&1 || apt_install runc || die "crun cannot use this host's hybrid cgroups; install runc"
  say "cgroups v1 and v2 are mounted together (hybrid), which crun does not support: using --runtime runc"
  ENGINE_CMD+=(--runtime runc)
}

# Runs a trivial container from IMAGE; on a known failure applies its workaround and tries again.
fix_quirks() {
  local image=$1 err="" attempt
  for attempt in 1 2 3 4; do
    if err=$("${ENGINE_CMD[@]}" run --rm --network none "${RUN_OPTS[@]}" --entrypoint true "$image" 2>&1 >/dev/null); then
      [ "$attempt" -gt 1 ] || say "containers run on this host without workarounds"
      return 0
    fi
    case $err in
      *setrlimit*) fix_ulimits || break ;;
      *"hybrid mode"* | *cgroup*hybrid*) fix_runtime || break ;;
      *) break ;;
    esac
  done
  die "cannot run a container from $image: $(printf '%s' "$err" | tail -n 3)"
}
