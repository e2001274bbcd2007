#!/usr/bin/env bash
# Installs what the real-VM test (tests/tests/vm.rs) needs on a Debian bookworm machine:
# QEMU 10 from bookworm-backports (bookworm's 7.2 conflicts with the installed qemu-utils 10),
# busybox-static and cpio for the guest's initramfs, and Debian's cloud kernel, unpacked
# (not installed) into ${TERN_VM_DIR:-/var/cache/tern-vm}/kernel. Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
dir=${TERN_VM_DIR:-/var/cache/tern-vm}

need_update=1
apt_update() { if [ $need_update = 1 ]; then apt-get update; need_update=0; fi; }

if ! command -v qemu-system-x86_64 >/dev/null; then
  if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  apt_update
  apt-get install -y -t bookworm-backports --no-install-recommends qemu-system-x86
fi
missing=()
[ -x /bin/busybox ] && /bin/busybox --list | grep -qx insmod || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)
if [ ${#missing[@]} -gt 0 ]; then
  apt_update
  apt-get install -y --no-install-recommends "${missing[@]}"
fi

if ! ls "$dir"/kernel/boot/vmlinuz-* >/dev/null 2>&1; then
  apt_update
  mkdir -p "$dir/debs" "$dir/kernel"
  cd "$dir/debs"
  apt-get download linux-image-cloud-amd64
  # The meta package depends on the versioned image package: fetch that one too.
  versioned=$(dpkg-deb -f linux-image-cloud-amd64_*.deb Depends | tr ',' '\n' | grep -o 'linux-image-[^ ]*-cloud-amd64' | head -1)
  apt-get download "$versioned"
  for deb in linux-image-*.deb; do dpkg -x "$deb" "$dir/kernel"; done
  rm -rf "$dir/debs"
fi
ls "$dir"/kernel/boot/vmlinuz-*
