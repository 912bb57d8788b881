#!/usr/bin/env bash
# Download the wheels the GPU device machine lacks (bench/device_wheels.txt), and build distillkit's own, into .whl/ for
# Python 3.12 on x86-64 Linux, so a device run can install them offline (bench/device_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
grep -v -E '^\s*(#|$)' bench/device_wheels.txt | while read -r req; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$req"
done
# distillkit itself, as a wheel: the device installs it like a user would (entry points, manifests).
rm -f .whl/distillkit-*.whl
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl . 2>/dev/null || .venv/bin/pip wheel -q --no-deps -w .whl .
ls .whl
du -sh .whl
