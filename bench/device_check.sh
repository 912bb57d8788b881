#!/usr/bin/env bash
# The one prepared GPU call (issue 13 item 4). Prepare here, once:
#     bash bench/fetch_device_wheels.sh          # -> .whl/ (git-ignored)
# then run on the device machine with `.whl` carried and timeout_s=600:
#     bash bench/device_check.sh
# It installs the wheels offline, makes medium synthetic nuScenes, builds SLidR shards on a 16-worker
# LocalCluster, runs the CUDA tests (and the GPU-worker placement test, on a real GPU), the whole benchmark
# suite with --device cuda (bench/run.py), and a paper-size SLidR training run + linear probe. Every stage has
# its own time limit and all of them share one deadline (BUDGET seconds from the start, default 510), so a slow
# stage shortens the later ones instead of losing the call; the suite saves its JSON after every entry.
# Results land in $OUT: log.txt, bench-$DEVICE.json (render it into docs/benchmarks.md here with
# `bench/run.py --render-only`), pytest.txt, eval.txt.
# Locally, `WHEELS=none PY=.venv/bin/python DEVICE=cpu SIZE=small SYNTH=small TRAIN_STEPS=4 BUILD_WORKERS=2 \
#   WORKERS=0 EVAL_EPOCHS=2 SUITE="--quick --only trainer" TESTS=tests/test_gpu_superpixels.py bash bench/device_check.sh`
# is a smoke run of the script itself (tests/test_gpu.py).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET=${BUDGET:-510}
OUT=${OUT:-bench/out/device}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-paper}
SYNTH=${SYNTH:-medium}
TRAIN_STEPS=${TRAIN_STEPS:-1000}
WORKERS=${WORKERS:-8}            # loader workers of the train stage
BUILD_WORKERS=${BUILD_WORKERS:-16}  # dask workers of the build (the device has 16 cores)
EVAL_EPOCHS=${EVAL_EPOCHS:-100}    # epochs of the linear probe (released: 100)
SUITE=${SUITE:---quick}          # bench/run.py options: --quick keeps the suite to ~3 minutes
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
  # The checkout's own distillkit/ sits first on sys.path (cwd, pytest's rootdir) and would shadow the wheel's
  # distillkit.pipelines etc.: install the checkout editable, as CI does, so its finder maps the subpackages.
  rm -rf /tmp/site/distillkit /tmp/site/distillkit-*.dist-info
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || { echo "editable install failed"; exit 1; }
fi

stage() {  # stage NAME SECONDS CMD...: run CMD under min(SECONDS, time left), report its exit code and time
  local name=$1 limit=$2 t0 rc left
  shift 2
  left=$(( T0 + BUDGET - $(date +%s) ))
  if [ "$left" -lt 10 ]; then echo "== $name: skipped, the ${BUDGET}s budget is spent"; return 124; fi
  [ "$limit" -gt "$left" ] && limit=$left
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
# The suite's medium data lives under its scratch folder; the build and training stages use the same data.
DATA="$WORK/bench/nuscenes-medium"
stage synth 150 $PY -m distillkit synth nuscenes "$DATA" --size "$SYNTH" || exit 1
stage build 90 $PY -m distillkit build manifests/demo-slidr.toml --quiet --workers "$BUILD_WORKERS" \
  --set "source.dataroot=$DATA" --set "output.dir=$WORK/shards" --set output.samples_per_shard=1 || exit 1
if [ -z "${TESTS:-}" ]; then
  TESTS="tests/test_gpu.py tests/test_gpu_superpixels.py tests/test_uniseg_gpu.py tests/test_placement.py"
  TESTS="$TESTS tests/test_audio_logmel_gpu.py"  # CUDA vs CPU torch path: needs no librosa
  $PY -c "import librosa" 2>/dev/null && TESTS="$TESTS tests/test_audio_logmel.py"
fi
# not slow: the slow test here is this script's own smoke run
stage pytest 150 $PY -m pytest -q -rs -m "not slow" -p no:cacheprovider $TESTS | tee "$OUT/pytest.txt"
stage suite 200 $PY bench/run.py --device "$DEVICE" $SUITE --scratch "$WORK/bench" --out "$OUT/bench-$DEVICE.json"
# A train stage cut off by its limit still leaves the checkpoint it wrote last (4 per run): probe that one.
# No MoCo v2 weights can be downloaded: the paper-size run says so with --random-teacher.
stage train 120 $PY -m distillkit train slidr --shards "$WORK/shards" --device "$DEVICE" --size "$SIZE" --random-teacher \
  --max-steps "$TRAIN_STEPS" --batch-size 4 --num-workers "$WORKERS" --out "$WORK/run"
if [ -f "$WORK/run/latest.pt" ]; then
  $PY -c "import sys, torch; print('probing the checkpoint of step', torch.load(sys.argv[1], weights_only=True,
map_location='cpu')['step'])" "$WORK/run/latest.pt" | tee "$OUT/eval.txt"
  stage eval 60 $PY -m distillkit eval slidr --checkpoint "$WORK/run/latest.pt" --shards "$WORK/shards" \
    --device "$DEVICE" --epochs "$EVAL_EPOCHS" | tee -a "$OUT/eval.txt"
fi
echo "== done in $(( $(date +%s) - T0 )) s"
