#!/usr/bin/env bash
# The SLidR GPU check in one device call (issue: trainer, item 5). Prepare here, once:
#     bash bench/fetch_device_wheels.sh          # -> .whl/ (git-ignored), ~6 MB
# then run on the device machine with `.whl` carried and timeout_s=600 (the stages' limits add up to
# about 9 minutes; a medium build and a paper-size run take most of them):
#     bash bench/device_check.sh
# It installs the wheels offline, makes medium synthetic nuScenes, builds shards on a 16-worker
# LocalCluster, runs the CUDA tests, the throughput benchmark (bench/gpu_slidr.py) and a
# paper-size training run + linear probe, each under its own time limit so that a slow stage
# still leaves the others' results. Results land in $OUT (log.txt, gpu_slidr.json, eval.txt).
# Locally, `WHEELS=none PY=.venv/bin/python DEVICE=cpu SIZE=small STEPS=1 TRAIN_STEPS=4 SYNTH=small BUILD_WORKERS=2 \
#   EVAL_EPOCHS=2 bash bench/device_check.sh`
# is a smoke run of the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/device}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-paper}
SYNTH=${SYNTH:-medium}
STEPS=${STEPS:-50}
TRAIN_STEPS=${TRAIN_STEPS:-1000}
WORKERS=${WORKERS:-8}            # loader workers of the bench and train stages
BUILD_WORKERS=${BUILD_WORKERS:-16}  # dask workers of the build (the device has 16 cores)
EVAL_EPOCHS=${EVAL_EPOCHS:-100}    # epochs of the linear probe (released: 100)
if [ -z "${WORK:-}" ]; then WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; fi
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}  # WHEELS=none: use what $PY already has
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi

stage() {  # stage NAME SECONDS CMD...: run CMD under a time limit, report its exit code and time
  local name=$1 limit=$2 t0 rc
  shift 2
  echo "== $name (limit ${limit}s): $*"
  t0=$(date +%s)
  timeout "$limit" "$@"
  rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s"
  return $rc
}

stage env 60 $PY -c "import torch, numpy, webdataset, distributed, nuscenes; print('torch', torch.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU',
'numpy', numpy.__version__)" || exit 1
stage synth 150 $PY -m distillkit synth nuscenes "$WORK/nus" --size "$SYNTH" || exit 1
stage build 180 $PY -m distillkit build manifests/demo-slidr.toml --quiet --workers "$BUILD_WORKERS" \
  --set "source.dataroot=$WORK/nus" --set "output.dir=$WORK/shards" --set output.samples_per_shard=1 || exit 1
if [ "$DEVICE" = cuda ]; then
  stage pytest-gpu 240 $PY -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_gpu_superpixels.py
fi
stage bench 240 $PY bench/gpu_slidr.py --shards "$WORK/shards" --device "$DEVICE" --size "$SIZE" \
  --steps "$STEPS" --workers "$WORKERS" --out "$OUT/gpu_slidr.json"
# A train stage cut off by its limit still leaves the checkpoint it wrote last (4 per run): probe that one.
# No MoCo v2 weights can be downloaded: the paper-size run says so with --random-teacher.
stage train 210 $PY -m distillkit train slidr --shards "$WORK/shards" --device "$DEVICE" --size "$SIZE" --random-teacher \
  --max-steps "$TRAIN_STEPS" --batch-size 4 --num-workers "$WORKERS" --out "$WORK/run"
if [ -f "$WORK/run/latest.pt" ]; then
  $PY -c "import sys, torch; print('probing the checkpoint of step', torch.load(sys.argv[1], weights_only=True,
map_location='cpu')['step'])" "$WORK/run/latest.pt" | tee "$OUT/eval.txt"
  stage eval 90 $PY -m distillkit eval slidr --checkpoint "$WORK/run/latest.pt" --shards "$WORK/shards" \
    --device "$DEVICE" --epochs "$EVAL_EPOCHS" | tee -a "$OUT/eval.txt"
fi
echo "== done"
