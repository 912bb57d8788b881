"""``distillkit train METHOD --show-config``: the fully resolved configuration as TOML that ``--config`` accepts,
every key commented with where its value comes from (train/config_toml.py)."""

from __future__ import annotations

import tomllib

import pytest
from click.testing import CliRunner

from distillkit.pipelines.cli import main
from distillkit.train.config_toml import flatten, render_config, toml_value
from distillkit.train.registry import TRAINERS, get_trainer

METHODS = ["slidr", "audio", "comodo", "uniseg"]
PAPER = {"slidr": ["--random-teacher"], "audio": [], "comodo": ["--random-student"], "uniseg": []}


def show(*args: str):
    return CliRunner().invoke(main, ["train", *args, "--show-config"])


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("size", ["small", "paper"])
def test_the_printed_configuration_trains_the_same_run(name, size, tmp_path):
    result = show(name, "--size", size, *(PAPER[name] if size == "paper" else []))
    assert result.exit_code == 0, result.output
    text = result.output
    data = tomllib.loads(text)
    lines = text.splitlines()
    for i, line in enumerate(lines):  # every key says where its value comes from, just above it
        if line and not line.startswith(("#", "[")):
            assert lines[i - 1].startswith("# source:"), f"{line!r} has no source comment just above it"
    trainer = get_trainer(name)
    # what the run does is what the file says: resolving the file gives the same effective configuration
    original = trainer.effective_config(trainer.resolve_config(
        {"size": size, **({"random_teacher": True} if name == "slidr" and size == "paper" else {}),
         **({"random_student": True} if name == "comodo" and size == "paper" else {})}))
    path = tmp_path / "config.toml"
    path.write_text(text)
    again = trainer.effective_config(trainer.resolve_config(data))
    assert again == original
    # every key of the effective configuration is in the file, or said to be unset
    for key, value in flatten(original).items():
        leaf = key.rpartition(".")[2]
        assert (f"{leaf} = " in text) if value is not None else (f"# {leaf} is unset" in text), key
    # the same through --config
    result = show(name, "--config", str(path))
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.output) == data


def test_slidr_paper_shows_the_released_recipe():
    result = show("slidr", "--size", "paper", "--random-teacher")
    assert result.exit_code == 0, result.output
    data = tomllib.loads(result.output)
    assert (data["batch_size"], data["epochs"], data["sync_batchnorm"]) == (4, 50, True)
    block = result.output.split("batch_size = 4")[0].rsplit("\n# source:", 1)[1]
    assert "valeoai/SLidR" in block, block  # cited to the released file


def test_keys_the_user_sets_are_named_as_the_users():
    result = show("slidr", "--batch-size", "8", "--set", "seed=3")
    assert result.exit_code == 0, result.output
    text = result.output
    assert "# source: set by you (--batch-size)\nbatch_size = 8" in text
    assert "# source: set by you (--set)\nseed = 3" in text


def test_a_bad_value_is_one_line_and_needs_no_shards():
    result = show("slidr", "--set", "batch_size=x")  # cannot be read: one line, nothing printed
    assert result.exit_code == 2 and result.output.startswith("error: ") and "batch_size" in result.output
    # read but refused by the run (the paper size without its teacher): printed, with the refusal, exit 2
    result = show("slidr", "--size", "paper")
    assert result.exit_code == 2 and "epochs = 50" in result.output
    assert result.output.startswith("# note: a run with this configuration is refused: ")
    assert result.output.rstrip().splitlines()[-1].startswith("error: train slidr: teacher_checkpoint: ")
    result = CliRunner().invoke(main, ["train", "slidr"])  # without --show-config, --shards is required
    assert result.exit_code == 2 and "Missing option '--shards'" in result.output


def test_every_registered_trainer_renders():
    for name in TRAINERS.names():
        trainer = get_trainer(name)
        text = render_config(trainer, trainer.resolve_config({}))
        tomllib.loads(text)


def test_toml_values():
    assert toml_value(True) == "true" and toml_value(3) == "3" and toml_value(1e-6) == "1e-06"
    assert toml_value(float("inf")) == "inf" and toml_value("a\"b") == '"a\\"b"' and toml_value([1, 2.5]) == "[1, 2.5]"
    assert tomllib.loads(f"x = {toml_value(float('nan'))}")["x"] != tomllib.loads("x = 0.0")["x"]
    with pytest.raises(TypeError):
        toml_value(object())
