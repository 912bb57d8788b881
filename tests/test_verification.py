"""Speaker verification (issue 23 item 4): EER and minDCF against independent computations (scikit-learn's ROC,
a brute-force threshold sweep) and hand-made cases; trials drawn from labels and read from a VoxCeleb-style file;
`eval audio --protocol verification` end to end on a short run of synthetic data whose classes stand in for
speakers."""

from __future__ import annotations

import csv
import itertools
import math

import numpy as np
import pytest

from distillkit.train.base import ConfigError
from distillkit.train.verification import (
    Trials,
    TrialsFileError,
    cosine_scores,
    draw_trials,
    equal_error_rate,
    error_rates,
    min_dcf,
    read_trials,
)


# --------------------------------------------------------------------------- independent references
def sklearn_eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """The EER as commonly computed from scikit-learn's ROC: the root of ``1 - x = tpr(x)`` on the ROC
    interpolated linearly (``brentq`` on ``interp1d``), i.e. the crossing of fnr and fpr."""
    from scipy.interpolate import interp1d
    from scipy.optimize import brentq
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0, xtol=1e-12))


def brute_min_dcf(scores: np.ndarray, labels: np.ndarray, p_target: float, c_miss: float = 1.0,
                  c_fa: float = 1.0) -> float:
    """Every threshold tried one by one (accept when score >= threshold), plus accept-nothing."""
    targets, nontargets = scores[labels == 1], scores[labels == 0]
    best = math.inf
    for t in [*sorted(set(scores.tolist())), math.inf]:
        p_miss = float(np.mean(targets < t))
        p_fa = float(np.mean(nontargets >= t))
        best = min(best, c_miss * p_target * p_miss + c_fa * (1 - p_target) * p_fa)
    return best / min(c_miss * p_target, c_fa * (1 - p_target))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_eer_matches_sklearn_roc(seed, ties):
    rng = np.random.default_rng(seed)
    n_t, n_n = int(rng.integers(5, 300)), int(rng.integers(5, 300))
    scores = np.r_[rng.normal(1.0, 1.0, n_t), rng.normal(0.0, 1.0, n_n)]
    if ties:  # few distinct scores: diagonal ROC segments, tied targets and non-targets
        scores = np.round(scores * 2) / 2
    labels = np.r_[np.ones(n_t, int), np.zeros(n_n, int)]
    perm = rng.permutation(len(scores))
    eer, threshold = equal_error_rate(scores[perm], labels[perm])
    assert eer == pytest.approx(sklearn_eer(scores, labels), abs=1e-9)
    assert threshold in set(scores.tolist())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("p_target, c_miss", [(0.05, 1.0), (0.01, 1.0), (0.5, 1.0), (0.01, 10.0)])
def test_min_dcf_matches_a_brute_force_sweep(seed, p_target, c_miss):
    rng = np.random.default_rng(100 + seed)
    scores = np.round(np.r_[rng.normal(1.5, 1.0, 80), rng.normal(0.0, 1.0, 400)], 1)  # with ties
    labels = np.r_[np.ones(80, int), np.zeros(400, int)]
    value, threshold = min_dcf(scores, labels, p_target, c_miss=c_miss)
    assert value == pytest.approx(brute_min_dcf(scores, labels, p_target, c_miss), abs=1e-12)
    assert 0.0 <= value <= 1.0


def test_known_answers():
    # perfect separation: EER 0 and minDCF 0 (a threshold between the two sets makes no error)
    assert equal_error_rate([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == (0.0, 0.8)
    assert min_dcf(np.array([0.9, 0.8, 0.2, 0.1]), np.array([1, 1, 0, 0]))[0] == 0.0
    # identical score distributions: the ROC is the diagonal, EER exactly 0.5
    same = np.array([0.1, 0.4, 0.7, 0.9])
    assert equal_error_rate(np.r_[same, same], np.r_[np.ones(4), np.zeros(4)])[0] == 0.5
    rng = np.random.default_rng(0)
    assert equal_error_rate(rng.normal(size=4000), rng.integers(0, 2, 4000))[0] == pytest.approx(0.5, abs=0.03)
    # inverted scores: every error; minDCF never exceeds the trivial systems' cost (1)
    assert equal_error_rate([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0])[0] == 1.0
    assert min_dcf(np.array([0.1, 0.2, 0.8, 0.9]), np.array([1, 1, 0, 0]))[0] == 1.0
    # interpolated: targets {2, 2}, non-targets {2, 0}. At threshold 2 both targets and one non-target pass:
    # (fnr, fpr) goes from (1, 0) to (0, 0.5), crossing fnr = fpr at 1/3
    assert equal_error_rate([2, 2, 2, 0], [1, 1, 0, 0])[0] == pytest.approx(1 / 3)
    # one false alarm in 20 non-targets costs 0.95 x 0.05 / 0.05 = 0.95 at P_target 0.05; a miss of 1 in 2 costs
    # 0.5: minDCF takes the cheaper, rejecting the top target along with the non-target
    scores, labels = np.array([5.0, 4.0, *np.linspace(0, 1, 19)]), np.r_[0, 1, 1, np.zeros(18, int)]
    assert min_dcf(scores, labels, 0.05)[0] == pytest.approx(brute_min_dcf(scores, labels, 0.05))


def test_error_rates_operating_points_and_bad_input():
    thresholds, fnr, fpr = error_rates(np.array([3.0, 1.0, 2.0, 1.0]), np.array([1, 0, 0, 1]))
    assert thresholds.tolist() == [math.inf, 3.0, 2.0, 1.0]
    assert fnr.tolist() == [1.0, 0.5, 0.5, 0.0] and fpr.tolist() == [0.0, 0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="need target and non-target"):
        equal_error_rate([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="non-finite"):
        equal_error_rate([0.1, float("nan")], [1, 0])
    with pytest.raises(ValueError, match="0 .non-target. or 1"):
        equal_error_rate([0.1, 0.2], [1, 2])
    with pytest.raises(ValueError, match="p_target"):
        min_dcf(np.array([0.1, 0.2]), np.array([1, 0]), 0.0)


def test_cosine_scores_centre_and_normalise():
    emb = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    trials = Trials(np.array([0, 0]), np.array([1, 2]), np.array([1, 0]))
    assert cosine_scores(emb, trials, center=False).tolist() == pytest.approx([1.0, 0.0])
    # centred: the mean (1, 1) removed, (0, -1) vs (1, -1) and (0, -1) vs (-1, 2)
    assert cosine_scores(emb, trials).tolist() == pytest.approx([1 / math.sqrt(2), -2 / math.sqrt(5)])


# --------------------------------------------------------------------------- trials
SPEAKERS = list("aaaabbbccd")
GROUPS = ["r1", "r1", "r2", "r3", "r4", "r4", "r5", "r6", "r7", "r8"]


def _all_pairs(speakers, groups):
    target = {frozenset(p) for p in itertools.combinations(range(len(speakers)), 2)
              if speakers[p[0]] == speakers[p[1]] and groups[p[0]] != groups[p[1]]}
    nontarget = {frozenset(p) for p in itertools.combinations(range(len(speakers)), 2)
                 if speakers[p[0]] != speakers[p[1]]}
    return target, nontarget


def test_drawn_trials_are_balanced_valid_and_deterministic():
    target, nontarget = _all_pairs(SPEAKERS, GROUPS)
    t = draw_trials(SPEAKERS, GROUPS, 8, seed=0)
    assert len(t) == 8 and int(t.label.sum()) == 4
    pairs = [frozenset((int(e), int(s))) for e, s in zip(t.enrol, t.test, strict=True)]
    assert len(set(pairs)) == len(pairs) and all(len(p) == 2 for p in pairs)  # distinct, never a file with itself
    assert all((p in target) if y else (p in nontarget) for p, y in zip(pairs, t.label, strict=True))
    again = draw_trials(SPEAKERS, GROUPS, 8, seed=0)
    assert all(np.array_equal(getattr(t, k), getattr(again, k)) for k in ("enrol", "test", "label"))
    draws = {tuple(map(tuple, np.c_[d.enrol, d.test])) for d in (draw_trials(SPEAKERS, GROUPS, 8, s) for s in range(5))}
    assert len(draws) > 1  # the seed matters


def test_drawn_trials_respect_groups_and_stay_balanced_when_pairs_run_out():
    target, nontarget = _all_pairs(SPEAKERS, GROUPS)
    t = draw_trials(SPEAKERS, GROUPS, 1000, seed=3)
    # a: r1 r1 r2 r3 -> 5 pairs across recordings (not the r1-r1 one: [0, 1]); b: r4 r4 r5 -> 2; c: 1; d: none
    assert len(target) == 8 and int(t.label.sum()) == 8 and len(t) == 16
    got = {frozenset((int(e), int(s))) for e, s, y in zip(t.enrol, t.test, t.label, strict=True) if y}
    assert got == target and frozenset((0, 1)) not in got
    # without groups every file is its own recording: the same-recording pairs become targets too
    assert int(draw_trials(SPEAKERS, None, 1000).label.sum()) == 6 + 3 + 1
    # draws from millions of candidate pairs stay fast and exact (pairs are numbered, not listed)
    many = draw_trials([f"s{i % 50}" for i in range(4000)], None, 2000, seed=1)
    assert len(many) == 2000 and len({frozenset(p) for p in zip(many.enrol, many.test, strict=True)}) == 2000


def test_drawing_refuses_data_without_both_kinds_of_pairs():
    with pytest.raises(ValueError, match="no target trial"):
        draw_trials(["a", "b", "c"], None, 10)
    with pytest.raises(ValueError, match="no target trial"):
        draw_trials(["a", "a", "b"], ["r", "r", "q"], 10)
    with pytest.raises(ValueError, match="no non-target trial"):
        draw_trials(["a", "a"], None, 10)


def test_read_trials_voxceleb_convention(tmp_path):
    files = ["id1/v1/00001.wav", "id1/v2/00002.wav", "id2/v3/00001.wav"]
    path = tmp_path / "trials.txt"
    path.write_text("1 id1/v1/00001.wav id1/v2/00002.wav\n\n0 id1/v1/00001.wav id2/v3/00001.wav\n")
    t = read_trials(path, files)
    assert t.enrol.tolist() == [0, 0] and t.test.tolist() == [1, 2] and t.label.tolist() == [1, 0]
    bad = {
        "2 id1/v1/00001.wav id1/v2/00002.wav\n": ":1: expected 'label enrol test'",
        "1 id1/v1/00001.wav\n": ":1: expected 'label enrol test'",
        "0 id1/v1/00001.wav id2/v3/00001.wav\n1 id9/x.wav id1/v1/00001.wav\n": ":2: id9/x.wav is not a file",
        "1 id1/v1/00001.wav id1/v1/00001.wav\n": ":1: id1/v1/00001.wav against itself",
        "1 id1/v1/00001.wav id1/v2/00002.wav\n": "needs target .1. and non-target .0. trials",
    }
    for text, message in bad.items():
        path.write_text(text)
        with pytest.raises(TrialsFileError, match=message) as err:
            read_trials(path, files)
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Small synthetic audio whose 5 classes stand in for speakers (4 files each; a labels.csv ``group`` column
    puts each class's files in two recordings of two), its shards, and a 3-step checkpoint."""
    from distillkit.sensors.synth.audio import make_audio
    from distillkit.train.audio import AudioTrainer
    from distillkit.train.checkpoint import CHECKPOINT_NAME
    from tests.conftest import build_serial

    root = make_audio(tmp_path_factory.mktemp("audio") / "src", seed=1, size="small")
    rows = list(csv.DictReader((root / "labels.csv").open()))
    seen: dict[str, int] = {}
    with (root / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "label", "group"])
        for row in rows:
            k = seen[row["label"]] = seen.get(row["label"], -1) + 1
            w.writerow([row["path"], row["label"], f"{row['label']}-rec{k // 2}"])
    shards = build_serial("demo-audio", tmp_path_factory.mktemp("shards"), f"source.root={root}",
                          "stages.audio.store_waveform=false")
    out = tmp_path_factory.mktemp("run")
    config = AudioTrainer.resolve_config({"max_steps": 3, "batch_size": 4, "log_every": 1})
    AudioTrainer().train(shards, out, config)
    return root, shards, out / CHECKPOINT_NAME, config


def test_trials_from_the_shards_keep_recordings_apart(run):
    from distillkit.train.audio_verification import list_files, make_trials

    root, shards, _, _ = run
    files = list_files([shards])
    rows = {r["path"]: r for r in csv.DictReader((root / "labels.csv").open())}
    assert files.names == sorted(rows)  # one entry per file, whatever its number of segments
    trials, source = make_trials(files, None, 10_000, seed=0)
    speakers = [rows[n]["label"] for n in files.names]
    groups = [rows[n]["group"] for n in files.names]
    target, _ = _all_pairs(speakers, groups)
    got = {frozenset((int(e), int(s))) for e, s, y in zip(trials.enrol, trials.test, trials.label, strict=True) if y}
    assert got == target and len(target) == 5 * 4  # per class: 2 x 2 pairs across its two recordings
    assert int(trials.label.sum()) * 2 == len(trials) and "5 speakers" in source and "trials_seed 0" in source
    with pytest.raises(ConfigError, match="n_trials: must be >= 2"):
        make_trials(files, None, 1, seed=0)


def _segments_per_file(shards):
    """{file: segments}, counted by reading every sample (the reference for what the evaluation decodes)."""
    from distillkit.train.streaming import ShardStream

    counts: dict[str, int] = {}
    for s in ShardStream(shards, epochs=1, shuffle_shards=False, keep_raw=(".npy",)):
        counts[s["meta.json"]["source"]] = counts.get(s["meta.json"]["source"], 0) + 1
    return counts


def test_only_the_trials_files_are_decoded_and_kept(run, tmp_path, monkeypatch):
    from distillkit.train import streaming
    from distillkit.train.audio import AudioTrainer
    from distillkit.train.audio_verification import evaluate_verification

    root, shards, _, config = run
    per_file = _segments_per_file(shards)
    assert sum(per_file.values()) > len(per_file)  # small files run 2.5-13 s: several have two segments
    by: dict[str, list[str]] = {}
    for r in sorted(csv.DictReader((root / "labels.csv").open()), key=lambda r: r["path"]):
        by.setdefault(r["label"], []).append(r["path"])
    a, b = sorted(by)[:2]
    named = {by[a][0], by[a][2], by[b][0]}
    trials = tmp_path / "trials.txt"
    trials.write_text(f"1 {by[a][0]} {by[a][2]}\n0 {by[a][0]} {by[b][0]}\n")
    decoded = []
    real = streaming.decode_field

    def counting(name, value, **kw):
        if name.endswith("logmel.npy"):
            decoded.append(name)
        return real(name, value, **kw)

    monkeypatch.setattr(streaming, "decode_field", counting)
    config = AudioTrainer.effective_config(config)
    result = evaluate_verification(None, None, [shards], config, trials=trials)
    expected = sum(per_file[n] for n in named)
    assert expected < sum(per_file.values())
    assert len(decoded) == expected and result["trials"]["segments"] == expected
    assert result["trials"]["files"] == 3


def test_trials_seed_not_the_training_seed(run, monkeypatch):
    from distillkit.train import audio_verification
    from distillkit.train.audio import AudioTrainer

    _, shards, _, config = run
    drawn = []
    real = audio_verification.draw_trials

    def recording(speakers, groups, n_trials, seed=0):
        trials = real(speakers, groups, n_trials, seed)
        drawn.append((seed, trials.enrol.tolist(), trials.test.tolist()))
        return trials

    monkeypatch.setattr(audio_verification, "draw_trials", recording)
    for train_seed, trials_seed in [(0, 0), (5, 0), (0, 3)]:
        cfg = AudioTrainer.effective_config({**config, "seed": train_seed})
        result = audio_verification.evaluate_verification(None, None, [shards], cfg, n_trials=8,
                                                          trials_seed=trials_seed)
        assert f"trials_seed {trials_seed}" in result["trials"]["source"]
    # another training seed leaves the trials as they were; another trials_seed draws others
    assert [d[0] for d in drawn] == [0, 0, 3]
    assert drawn[0] == drawn[1] and drawn[0][1:] != drawn[2][1:]
    # the eval option reaches it through the trainer
    trainer = AudioTrainer()
    result = trainer.evaluate(None, [shards], config, options=trainer.resolve_eval_options(
        {"protocol": "verification", "trials_seed": 3, "n_trials": 8}))
    assert "trials_seed 3" in result["trials"]["source"] and drawn[-1][0] == 3


def test_verification_through_the_trainer(run):
    from distillkit.train.audio import AudioTrainer

    _, shards, ckpt, config = run
    trainer = AudioTrainer()
    options = trainer.resolve_eval_options({"protocol": "verification"})
    result = trainer.evaluate(ckpt, [shards], config, options=options)
    assert result["eval_protocol"] == "verification" and result["trials"]["target"] == 20
    assert result["trials"]["nontarget"] == 20 and result["p_target"] == 0.05
    for name in ("random_init", "distilled"):
        assert all(np.isfinite(result[name][k]) for k in ("eer", "min_dcf"))
        assert 0 <= result[name]["eer"] <= 1 and 0 <= result[name]["min_dcf"] <= 1
    assert result["gain_eer"] == pytest.approx(result["random_init"]["eer"] - result["distilled"]["eer"])
    text = trainer.format_eval(result)
    assert "random init" in text and "distilled" in text and "minDCF(0.05)" in text and "nan" not in text
    head = trainer.headline(result)
    assert head["random"] == result["random_init"]["eer"] and head["gain"] == pytest.approx(result["gain_eer"])
    # the same trials for both encoders, drawn again identically
    assert trainer.evaluate(ckpt, [shards], config, options=options) == result


def test_eval_cli_verification_with_a_trials_file(run, tmp_path):
    from click.testing import CliRunner

    from distillkit.pipelines.cli import main

    root, shards, ckpt, _ = run
    rows = sorted(csv.DictReader((root / "labels.csv").open()), key=lambda r: r["path"])
    by = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r["path"])
    a, b = sorted(by)[:2]
    trials = tmp_path / "trials.txt"
    trials.write_text(f"1 {by[a][0]} {by[a][2]}\n0 {by[a][0]} {by[b][0]}\n1 {by[b][0]} {by[b][3]}\n"
                      f"0 {by[a][1]} {by[b][1]}\n")
    base = ["eval", "audio", "--checkpoint", str(ckpt), "--shards", str(shards)]
    ok = CliRunner().invoke(main, [*base, "--protocol", "verification", "--trials", str(trials)])
    assert ok.exit_code == 0, ok.output
    assert f"trials file {trials}" in ok.output and "2 target + 2 non-target trials over 6 files" in ok.output
    assert "random init" in ok.output and "distilled" in ok.output
    trials.write_text(f"1 {by[a][0]} missing.wav\n")
    bad = CliRunner().invoke(main, [*base, "--protocol", "verification", "--trials", str(trials)])
    assert bad.exit_code == 2 and f"{trials}:1: missing.wav is not a file" in bad.output, bad.output
    assert "Traceback" not in bad.output
    linear = CliRunner().invoke(main, [*base, "--trials", str(trials)])
    assert linear.exit_code == 2 and "--protocol verification only" in linear.output, linear.output
