"""One configuration per run: RunConfig, its TOML file, and the command line's options mapped onto it."""

from dataclasses import replace

import pytest
import typer
from typer.testing import CliRunner

from misstep.optimize.config import ConfigError, RunConfig, load_config, write_config
from misstep.options import OPTIONS, configured, option_names


def test_a_written_config_reads_back_equal(tmp_path):
    config = RunConfig()
    config = replace(
        config,
        serving="vllm",
        train=replace(config.train, learning_rate=3e-5, launcher="torchrun"),
        loop=replace(config.loop, error_types=["wrong_operand"], stop=replace(config.loop.stop, patience=4)),
    )
    write_config(config, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == config
    write_config(RunConfig(), tmp_path / "default.toml")
    assert load_config(tmp_path / "default.toml") == RunConfig()


def test_a_file_changes_only_what_it_sets_and_names_the_key_it_cannot_use(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "my-model"\n[train]\nlearning_rate = 1\n[loop]\nrounds = 5\n[loop.stop]\npatience = 3\n')
    config = load_config(path)
    assert (config.model, config.train.learning_rate, config.loop.rounds, config.loop.stop.patience) == (
        "my-model",
        1.0,
        5,
        3,
    )
    assert isinstance(config.train.learning_rate, float)  # an int where a float goes
    assert replace(config, model=RunConfig().model, train=RunConfig().train, loop=RunConfig().loop) == RunConfig()

    for text, message in [
        ("[train]\nlearning_rat = 1\n", "unknown key train.learning_rat"),
        ('[train]\nbatch_size = "four"\n', "train.batch_size must be int, not 'four'"),
        ("[train]\nbatch_size = 0\n", "train: batch_size must be positive"),
        ('[loop]\nerror_types = ["typo"]\n', "unknown error type 'typo'"),
        ("train = 3\n", "train is a section"),
        ("[train\n", "not a TOML file"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"^{path}: .*{message}"):
            load_config(path)


def test_an_arm_s_own_table_changes_that_arm_only_and_a_bad_one_names_its_file_and_key(tmp_path):
    from misstep.optimize.run import arm_variants, named_arms

    path = tmp_path / "arms.toml"
    path.write_text(
        "[loop]\nrounds = 3\n[arms.judge-curriculum]\nrounds = 4\n[arms.judge-curriculum.stop]\nfixed_budget = true\n"
    )
    config = load_config(path)
    arms = named_arms(config.loop, ["judge", "judge-curriculum", "oracle"], config.arms)
    assert [arms[name].rounds for name in arms] == [3, 4, 3]
    assert arms["judge-curriculum"].stop.fixed_budget and not arms["judge"].stop.fixed_budget
    assert arms["judge-curriculum"].seeds_from == "procedural"  # the seed mode stays the arm's own
    # --keep with --seed-mode names the same arm "curriculum": the table still finds it by its full name
    assert arm_variants(config.loop, ["judge"], ["gsm8k", "curriculum"], config.arms)["curriculum"].rounds == 4
    write_config(config, tmp_path / "written.toml")
    assert load_config(tmp_path / "written.toml") == config

    for text, message in [
        ("[arms.judge-curiculum]\nrounds = 4\n", "an arm is <keep> or <keep>-<seed mode>.*'judge-curiculum'"),
        ("[arms.judge]\nround = 4\n", "unknown key arms.judge.round"),
        ('[arms.judge]\nrounds = "four"\n', "arms.judge.rounds must be int"),
        ("[arms.judge]\nrounds = 0\n", "rounds must be at least 1"),
        ("[arms]\njudge = 4\n", r"arms.judge is a section \(\[arms.judge\]\)"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"^{path}: .*{message}"):
            load_config(path)


def test_the_arms_run_s_configuration_loads_with_every_arm_at_a_fixed_budget():
    from pathlib import Path

    from misstep.optimize.run import named_arms

    config = load_config(Path(__file__).parents[1] / "configs" / "arms.toml")
    arms = named_arms(config.loop, ["judge", "oracle", "random", "judge-curriculum", "judge-uniform"], config.arms)
    assert {name: (arm.rounds, arm.stop.fixed_budget) for name, arm in arms.items()} == {
        "judge": (4, True),
        "oracle": (3, True),
        "random": (3, True),
        "judge-curriculum": (4, True),
        "judge-uniform": (4, True),
    }


def test_none_where_the_default_is_not_none_is_refused_when_written(tmp_path):
    config = RunConfig()
    with pytest.raises(ConfigError, match="train.resume_every_s is None"):
        write_config(replace(config, train=replace(config.train, resume_every_s=None)), tmp_path / "c.toml")


def test_every_option_sets_real_fields():
    known = set(option_names())
    for name, option in OPTIONS.items():
        assert set(option.fields) <= known, name


def test_options_override_the_file_and_the_file_overrides_the_defaults(tmp_path):
    app = typer.Typer()
    seen = []

    @app.command()
    @configured("rounds", "threads", "learning_rate", "error_type")
    def command(config: RunConfig, label: str = "x") -> None:
        seen.append((label, config))

    @app.command()
    def other() -> None:  # a second command, so that typer keeps command names
        pass

    def run(*args):
        result = CliRunner().invoke(app, ["command", *map(str, args)])
        assert result.exit_code == 0, result.output
        return seen[-1][1]

    assert run() == RunConfig()
    config = run("--threads", 3, "--error-type", "wrong_operand", "--error-type", "skipped_step")
    assert (config.loop.num_threads, config.engine.max_batch_size) == (3, 3)  # one option, two fields
    assert config.loop.error_types == ["wrong_operand", "skipped_step"]
    path = tmp_path / "run.toml"
    path.write_text("[loop]\nrounds = 7\nnum_threads = 5\n[train]\nlearning_rate = 1e-4\n")
    config = run("--config", path)
    assert (config.loop.rounds, config.loop.num_threads, config.train.learning_rate) == (7, 5, 1e-4)
    config = run("--config", path, "--rounds", 2)  # given on the command line: it wins
    assert (config.loop.rounds, config.loop.num_threads, config.train.learning_rate) == (2, 5, 1e-4)
    bad = CliRunner().invoke(app, ["command", "--rounds", "0"])
    assert bad.exit_code == 2 and "--rounds: rounds must be at least 1" in bad.output
