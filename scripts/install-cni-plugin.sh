#!/usr/bin/env bash
# Installs carve's CNI plugins (carve-cni and carve-ipam) on a host that runs
# no carve-agent DaemonSet, such as a VM joined by hand, the way Azure's
# azure-vnet plugins are installed from their release tarball: download the
# tarball for this version and architecture, verify its SHA-256, extract,
# install each executable (mode 0755) with an atomic rename, print versions.
set -euo pipefail

LATEST=v0.1.0
RELEASE_URL="${CARVE_RELEASE_URL:-https://github.com/carve-dev/carve/releases/download}"
BIN_DIR="${CNI_BIN_DIR:-/opt/cni/bin}"
PLUGINS=(carve-cni carve-ipam)
me="${0##*/}"

usage() {
  cat <<EOF
Usage: $me [VERSION]

Installs carve-cni and carve-ipam into \$CNI_BIN_DIR from the release tarball
carve-cni-plugins-linux-<arch>-<VERSION>.tgz, after checking its .sha256.

  VERSION            release to install, 0.1.0 or v0.1.0 (default $LATEST)

Environment:
  CARVE_RELEASE_URL  where releases live (default https://github.com/carve-dev/carve/releases/download);
                     the tarball is fetched from \$CARVE_RELEASE_URL/<VERSION>/; file:// works
  CNI_BIN_DIR        where the plugins go (default /opt/cni/bin)
EOF
}

die() {
  echo "$me: $*" >&2
  exit 1
}

case "${1:-}" in
  -h | --help)
    usage
    exit 0
    ;;
  -*) die "unknown option $1 (see $me --help)" ;;
esac
(($# <= 1)) || die "expected at most one argument, the version (see $me --help)"

version="${1:-$LATEST}"
[[ $version =~ ^v?[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$ ]] ||
  die "'$version' is not a release version: give one like $LATEST or ${LATEST#v}"
version="v${version#v}"

[[ $(uname -s) == Linux ]] || die "carve's CNI plugins run on Linux only, not $(uname -s)"
case "$(uname -m)" in
  x86_64 | amd64) arch=amd64 ;;
  aarch64 | arm64) arch=arm64 ;;
  *) die "no release for architecture $(uname -m): carve ships amd64 and arm64" ;;
esac

for tool in curl tar sha256sum install; do
  command -v "$tool" >/dev/null || die "$tool is missing: install it (e.g. apt-get install $tool) and run again"
done

# Refuse before downloading anything when the destination cannot be written.
existing="$BIN_DIR"
while [[ ! -e $existing ]]; do existing="$(dirname "$existing")"; done
[[ -d $existing ]] || die "$existing is not a directory, so $BIN_DIR cannot be created: set CNI_BIN_DIR"
[[ -w $existing ]] || die "cannot write to $existing: run as root (sudo $me) or set CNI_BIN_DIR to a writable directory"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/carve-cni.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

tarball="carve-cni-plugins-linux-$arch-$version.tgz"
base="${RELEASE_URL%/}/$version"

fetch() {
  local url="$1" out="$2" err
  if ! err="$(curl -fsSL --retry 3 --connect-timeout 20 -o "$out" "$url" 2>&1)"; then
    die "download failed: $url (${err//$'\n'/ }): check that release $version exists or set CARVE_RELEASE_URL"
  fi
}

fetch "$base/$tarball" "$tmp/$tarball"
fetch "$base/$tarball.sha256" "$tmp/$tarball.sha256"

read -r want _ <"$tmp/$tarball.sha256" || true
[[ ${want:-} =~ ^[0-9a-fA-F]{64}$ ]] ||
  die "checksum file $base/$tarball.sha256 holds no SHA-256 (expected sha256sum output): check CARVE_RELEASE_URL"
read -r got _ < <(sha256sum "$tmp/$tarball")
[[ ${want,,} == "$got" ]] ||
  die "checksum mismatch for $tarball: expected $want, got $got (corrupt or tampered download): retry, or check CARVE_RELEASE_URL"

mkdir -p "$tmp/x"
tar -xzf "$tmp/$tarball" -C "$tmp/x" --no-same-owner "${PLUGINS[@]}" 2>/dev/null ||
  die "$tarball does not hold ${PLUGINS[*]}: it is not a carve CNI plugins release"

mkdir -p "$BIN_DIR" || die "cannot create $BIN_DIR: run as root (sudo $me) or set CNI_BIN_DIR"
for p in "${PLUGINS[@]}"; do
  if cmp -s "$tmp/x/$p" "$BIN_DIR/$p" && [[ -x "$BIN_DIR/$p" ]]; then
    echo "$me: $BIN_DIR/$p is already $version"
    continue
  fi
  # Same directory, then rename: a runtime executing the plugin meanwhile sees
  # the old file or the new one, never half of one.
  install -m 0755 "$tmp/x/$p" "$BIN_DIR/.$p.tmp" || die "cannot write $BIN_DIR/.$p.tmp: run as root or set CNI_BIN_DIR"
  mv -f "$BIN_DIR/.$p.tmp" "$BIN_DIR/$p"
  echo "$me: installed $BIN_DIR/$p"
done

for p in "${PLUGINS[@]}"; do
  "$BIN_DIR/$p" --version || die "$BIN_DIR/$p --version failed: the binary does not run on this host"
done
