#!/usr/bin/env bash
# The README's demo, on the embedded default image (the shared corpus's
# debian-multi, built from Debian packages): start the daemon on a scratch
# store, import the image, mount it as a container, show the merged tree and
# what the container changed, then clean everything up.
set -euo pipefail
cd "$(dirname "$0")/.."
corpus=${LAYERD_CORPUS:-../shared/corpus}
work=$(mktemp -d /tmp/layerd-demo.XXXXXX)
export LAYERD_SOCKET="$work/layerd.sock"
daemon_pid=
cleanup() {
  ./bin/layerctl rm demo >/dev/null 2>&1 || true
  if [ -n "$daemon_pid" ]; then kill -TERM "$daemon_pid" 2>/dev/null || true; wait "$daemon_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "start the daemon: layerd --root $work/root --socket $LAYERD_SOCKET"
./bin/layerd --root "$work/root" --socket "$LAYERD_SOCKET" --mount-root "$work/mounts" --config /dev/null 2>"$work/layerd.log" &
daemon_pid=$!
for _ in $(seq 1 100); do [ -S "$LAYERD_SOCKET" ] && break; sleep 0.1; done
./bin/layerctl status

step "layerctl import $corpus/oci/debian-multi"
./bin/layerctl import "$corpus/oci/debian-multi"
./bin/layerctl images

step "layerctl inspect debian-multi:latest --format table"
./bin/layerctl inspect debian-multi:latest --format table

step "layerctl create debian-multi:latest --name demo   (a FUSE mount with its own writable layer)"
mnt=$(./bin/layerctl create debian-multi:latest --name demo --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["mountpoint"])')
echo "mounted at $mnt"
mount | grep " $mnt " || true

step "the merged tree: ls -l $mnt  and  /etc/os-release"
ls -l "$mnt"
head -3 "$mnt/etc/os-release"
echo "whiteouts of layer 3 honoured: /etc/motd $( [ -e "$mnt/etc/motd" ] && echo present || echo absent ), /usr/share/locale $( [ -e "$mnt/usr/share/locale" ] && echo present || echo absent )"
echo "layer 4's special files:"; ls -l "$mnt/opt/corpus/special" | head -8

step "write in the container, then layerctl diff demo"
echo "hello from layerd" > "$mnt/root/hello.txt"
rm "$mnt/etc/issue"
./bin/layerctl diff demo

step "layerctl rm demo, stop the daemon"
./bin/layerctl rm demo
kill -TERM "$daemon_pid"; wait "$daemon_pid" || true; daemon_pid=
echo "done"
