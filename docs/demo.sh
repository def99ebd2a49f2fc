#!/usr/bin/env bash
# The README's demo: import a real image (the shared corpus's debian-multi,
# built from Debian packages) into a scratch store and inspect it.
set -euo pipefail
cd "$(dirname "$0")/.."
corpus=${LAYERD_CORPUS:-../shared/corpus}
root=${LAYERD_DEMO_ROOT:-$(mktemp -d /tmp/layerd-demo.XXXXXX)}
echo "== store: $root"
echo "== layerctl import $corpus/oci/debian-multi"
./bin/layerctl --root "$root" import "$corpus/oci/debian-multi"
echo "== layerctl images"
./bin/layerctl --root "$root" images
echo "== layerctl inspect debian-multi:latest --format table"
./bin/layerctl --root "$root" inspect debian-multi:latest --format table
echo "== layerctl fsck"
./bin/layerctl --root "$root" fsck
echo "== done; remove the store with: rm -rf $root"
