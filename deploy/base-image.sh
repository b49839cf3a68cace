#!/usr/bin/env bash
# A Debian 12 base image with Python, made locally (no registry): debootstrap minbase from
# the Debian mirror apt uses, Python 3.11 with venv and pip, the machine's CA bundle, then
# `podman import`. Usage: deploy/base-image.sh [IMAGE]   (default localhost/etlsvc-base:bookworm)
# Needs root, debootstrap and podman. Kept by podman between runs: build it once.
set -euo pipefail
image=${1:-localhost/etlsvc-base:bookworm}
mirror=$({ grep -rhoE '^(URIs:|deb) +https?://[^ ]*/debian/?( |$)' /etc/apt/sources.list \
  /etc/apt/sources.list.d/ 2>/dev/null || true; } | grep -oE 'https?://[^ ]+' | head -1 || true)
mirror=${mirror:-http://deb.debian.org/debian}
root=$(mktemp -d /var/tmp/etlsvc-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
# No manuals, documentation or translations (as Debian's slim images): about 50 MB.
cat > "$root/etc/dpkg/dpkg.cfg.d/01-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CFG
find "$root/usr/share/doc" -type f ! -name copyright -delete
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
chroot "$root" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install \
  -y -qq --no-install-recommends python3 python3-venv python3-pip python-is-python3 \
  ca-certificates >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*'
# pip installs into the system Python inside an image: that is what the image is for.
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
# Trust what this machine trusts (a mirror or proxy with its own CA).
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "$image"
