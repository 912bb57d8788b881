"""``distillkit train METHOD --strict`` stopping on a bad sample: one line naming the sample and the reason,
exit 1 (the command was right and the run had started: the data stopped it), no traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from distillkit.pipelines.codecs import npy_bytes
from distillkit.pipelines.shards import iter_samples, load_index
from tests.index_helpers import rewrite_shard


@pytest.mark.parametrize("workers", [0, 1])  # in the training process, and in a DataLoader worker
def test_strict_stops_on_a_bad_sample_in_one_line(slidr_shards, tmp_path, workers):
    bad = tmp_path / "bad"
    shutil.copytree(slidr_shards, bad)
    first = load_index(bad)["shards"][0]["file"]
    samples = list(iter_samples(bad / first))
    samples[0][1]["pairs.npy"] = npy_bytes(np.zeros((0, 4), np.int32))  # no point-pixel pairs: unusable
    samples[0][1]["pairs_uvd.npy"] = npy_bytes(np.zeros((0, 3), np.float32))
    rewrite_shard(bad, first, samples)
    # A real process: CliRunner would catch the exception that a user would see as a traceback.
    r = subprocess.run([sys.executable, "-m", "distillkit", "train", "slidr", "--shards", str(bad), "--strict",
                        "--max-steps", "50", "--num-workers", str(workers), "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", **_env()})
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --strict: {bad / first}: sample {samples[0][0]}: zero point-pixel pairs (without "
                      "--strict a bad sample is skipped, logged and counted)"], r.stderr[-3000:]


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
