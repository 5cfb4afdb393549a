#!/usr/bin/env bash
# Build the keel-pdp container image with buildah (Containerfile at the repository root).
#
#   scripts/build-image.sh                      # BASE from the registry (debian:bookworm-slim)
#   scripts/build-image.sh --debootstrap-base   # no registry: make the Debian base first
#   scripts/build-image.sh --base IMAGE --tag localhost/keel-pdp:dev
#
# --debootstrap-base builds localhost/keel-base:bookworm from Debian's packages
# (debootstrap --variant=minbase, plus python3, python3-venv and ca-certificates;
# mirror: $DEBIAN_MIRROR, default http://deb.debian.org/debian) unless that image
# exists already, and uses it as BASE. Needs root (debootstrap), buildah and
# debootstrap (Debian packages of the same names).
#
# The wheels of keel-pdp and its dependencies are built first on this machine
# (build/wheels, with $PYTHON's pip, default .venv/bin/python); the image build
# fetches only what the image's own Python needs beyond them, and no registry.
#
# Environment: BUILDAH_ISOLATION (default chroot: works where no OCI runtime can
# start containers), DEBIAN_MIRROR, DEBIAN_SUITE (default bookworm), PYTHON,
# KEEL_BUILD_CA_DIR (the CA store pip trusts during the build; /etc/ssl/certs).
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=localhost/keel-pdp:0.1.0
BASE=""
MAKE_BASE=0
BASE_IMAGE=localhost/keel-base:bookworm
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ISOLATION=${BUILDAH_ISOLATION:-chroot}

while [ $# -gt 0 ]; do
  case "$1" in
    --base) BASE=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --debootstrap-base) MAKE_BASE=1; shift ;;
    --base-image) BASE_IMAGE=$2; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "build-image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

command -v buildah >/dev/null || { echo "build-image.sh: buildah is not installed" >&2; exit 3; }

make_base() {
  command -v debootstrap >/dev/null || {
    echo "build-image.sh: debootstrap is not installed" >&2; exit 3; }
  local work ctr
  work=$(mktemp -d)
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" EXIT
  echo "build-image.sh: debootstrap --variant=minbase $SUITE from $MIRROR" >&2
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
      tail -20 "$work/debootstrap.log" >&2; exit 4; }
  # What an image never needs: downloaded packages, package lists, docs.
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"* \
         "$work/rootfs/usr/share/doc/"* "$work/rootfs/usr/share/man/"*
  tar --numeric-owner -C "$work/rootfs" -cf "$work/rootfs.tar" .
  ctr=$(buildah from scratch)
  buildah add --quiet "$ctr" "$work/rootfs.tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd /bin/sh --label "org.opencontainers.image.description=Debian $SUITE minbase" "$ctr"
  buildah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
  echo "build-image.sh: base $BASE_IMAGE ready" >&2
}

if [ "$MAKE_BASE" = 1 ]; then
  if ! buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    make_base
  fi
  BASE=$BASE_IMAGE
fi

# Wheels of keel-pdp and its runtime dependencies, made here where pip knows the
# index; the image build installs from them first.
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
rm -rf build/wheels
mkdir -p build/wheels
"$PYTHON" -m pip wheel --quiet --wheel-dir build/wheels . >&2

args=(bud --isolation "$ISOLATION" --network host --layers=false -f Containerfile -t "$TAG")
# The build stage's pip trusts what this host trusts (a TLS-intercepting proxy's CA
# included): the host's CA store is mounted for the build, not copied into the image.
CA_DIR=${KEEL_BUILD_CA_DIR:-/etc/ssl/certs}
[ -f "$CA_DIR/ca-certificates.crt" ] && args+=(--volume "$CA_DIR:/etc/ssl/certs:ro")
[ -n "$BASE" ] && args+=(--build-arg "BASE=$BASE")
buildah "${args[@]}" .
echo "build-image.sh: built $TAG${BASE:+ on $BASE}" >&2
