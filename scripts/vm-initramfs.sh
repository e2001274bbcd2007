#!/usr/bin/env bash
# Builds the test guest's initramfs: busybox-static, the six virtio modules the cloud kernel
# needs for /dev/vda (it has no modules.dep, so they are insmod'ed in dependency order), and
# an init that writes sequence-numbered 4 KiB records to random blocks of /dev/vda with
# O_DIRECT and prints "ACK <seq> <block>" on the serial console after each completed write.
# Usage: vm-initramfs.sh OUT.cpio.gz   (kernel from scripts/vm-deps.sh)
set -euo pipefail
out=$(realpath -m "$1")
kernel=${TERN_VM_DIR:-/var/cache/tern-vm}/kernel
modules=$(echo "$kernel"/lib/modules/*/kernel/drivers)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,lib/modules}
cp /bin/busybox "$root/bin/busybox"
for m in virtio/virtio_ring virtio/virtio virtio/virtio_pci_modern_dev \
         virtio/virtio_pci_legacy_dev virtio/virtio_pci block/virtio_blk; do
  cp "$modules/$m.ko" "$root/lib/modules/"
done
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
  insmod /lib/modules/$m.ko
done
while [ ! -b /dev/vda ]; do sleep 0.1; done
blocks=$(( $(cat /sys/block/vda/size) / 8 ))
echo GUEST-READY
seq=0
while true; do
  seq=$((seq + 1))
  b=$(( (RANDOM * 32768 + RANDOM) % blocks ))
  printf 'VMRECIPE SEQ %010d BLK %08d\n' $seq $b |
    dd of=/dev/vda bs=4096 seek=$b count=1 conv=sync,notrunc iflag=fullblock oflag=direct status=none &&
    echo "ACK $seq $b"
done
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"
