#!/bin/sh
# Makes a local base image for deploy/Dockerfile where no registry can be reached (`docker pull` fails):
# a minimal root file system of the Debian release this machine runs (debootstrap), with CPython 3.11 and
# venv, imported into the engine with `docker import`. The package source is read from this machine's own
# apt configuration, so the image installs further packages (build tools, espeak-ng) from the same mirror.
#
#   sudo deploy/make-base-image.sh [TAG]       # default TAG: parley-base:<codename>, e.g. parley-base:bookworm
#
# Then build with it (what `make images` does when the public images cannot be pulled):
#   docker build -f deploy/Dockerfile --target cpu \
#     --build-arg BUILDER_IMAGE=parley-base:bookworm --build-arg PYTHON_IMAGE=parley-base:bookworm -t parley:cpu .
# Needs root, debootstrap (installed with apt when missing) and a Debian release with Python 3.11 as its python3 (Debian 12), the CPython
# the lock (requirements/runtime.txt) is resolved for.
set -eu

. /etc/os-release
codename=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
tag=${1:-parley-base:$codename}

# The first apt source of this release, in either format (deb822 .sources or one-line .list).
mirror_of() {
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v want="$1" '
      /^URIs:/ { uri = $2 } /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == want) found = 1 }
      /^$/ { if (found && uri) { print uri; exit } uri = ""; found = 0 }
      END { if (found && uri) print uri }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk -v want="$1" '$1 == "deb" { u = ($2 ~ /^\[/) ? $3 : $2; s = ($2 ~ /^\[/) ? $4 : $3; if (s == want) print u }' "$f"
  done
}
mirror=$(mirror_of "$codename" | head -n 1)
security=$(mirror_of "$codename-security" | head -n 1)
[ -n "$mirror" ] || { echo "no apt source for $codename in /etc/apt" >&2; exit 1; }
if ! command -v debootstrap >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase "$codename" "$root" "$mirror"

{
  echo "deb $mirror $codename main"
  echo "deb $mirror $codename-updates main"
  [ -z "$security" ] || echo "deb $security $codename-security main"
} >"$root/etc/apt/sources.list"
# Like the official Debian images: no recommended packages, no documentation, no apt lists in layers.
cat >"$root/etc/apt/apt.conf.d/90parley-base" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF
cat >"$root/etc/dpkg/dpkg.cfg.d/90parley-base" <<'EOF'
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
# The certificate authorities this machine adds to Debian's (a proxy's, a company's) so that pip inside a
# build reaches the package index the way this host does.
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
# apt resolves the dependencies (debootstrap's --include does not follow all of them).
chroot "$root" sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
  ca-certificates python3.11 python3.11-venv && update-ca-certificates && apt-get clean'
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*

tar --numeric-owner -C "$root" -c . | docker import \
  --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["/bin/bash"]' - "$tag"
echo "$tag"
