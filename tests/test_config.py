"""One source of truth: each command's defaults are the shipped recipe wherever it runs, `--print-config`
prints them as TOML that loads back to the same configuration, and a flag means one thing everywhere."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from toolrl_analysis.analysis.probe.run import ProbeConfig
from toolrl_analysis.cli import main
from toolrl_analysis.config import config_toml, load_config
from toolrl_analysis.envs.pipeline import EnvBuildConfig
from toolrl_analysis.episodes import EPISODES, EpisodeOptions
from toolrl_analysis.reproduce.settings import load_settings
from toolrl_analysis.training.grpo import GRPOConfig
from toolrl_analysis.training.sft import SFTConfig

REPO = Path(__file__).resolve().parents[1]
COMMANDS = (["envs", "build"], ["train-base"], ["train-grpo"], ["reproduce"], ["probe"])


def printed(argv: list[str], capsys) -> str:
    assert main([*argv, "--print-config"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


@pytest.mark.parametrize("cls", [EnvBuildConfig, SFTConfig, GRPOConfig])
def test_every_field_sits_in_exactly_one_table(cls):
    listed = [key for keys in cls.SECTIONS.values() for key in keys]
    assert sorted(listed) == sorted(f.name for f in dataclasses.fields(cls))


@pytest.mark.parametrize(
    ("cls", "changes"),
    [
        (EnvBuildConfig, {"train_mix": [1.0, 0.5, 0.25, 2.0], "seed": 7}),
        (SFTConfig, {"band": [0.1, 0.9], "lr": 1.5e-6, "loss_on": "assistant", "time_limit_s": 60.0}),
        (GRPOConfig, {"algo": "reinforce++", "kl_in_reward": True, "lr": 1e-6, "drop_flat_groups": False}),
        (ProbeConfig, {"tasks": ["next_tool"], "layers": "-2:", "C": 0.25}),
    ],
)
def test_a_printed_configuration_loads_back_to_itself(cls, changes, tmp_path):
    for config in (cls(), dataclasses.replace(cls(), **changes)):
        path = tmp_path / "printed.toml"
        path.write_text(config_toml(config))
        tomllib.loads(path.read_text())  # valid TOML
        assert load_config(cls, path) == config


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a))
def test_print_config_is_the_same_from_the_repository_and_from_elsewhere(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    here = printed(argv, capsys)
    monkeypatch.chdir(tmp_path)
    assert printed(argv, capsys) == here
    tomllib.loads(here)


def test_the_shipped_recipes_are_the_defaults(capsys):
    grpo = tomllib.loads(printed(["train-grpo"], capsys))
    assert grpo["optimiser"]["lr"] == 3e-4 and grpo["algorithm"]["drop_flat_groups"] is True
    base = tomllib.loads(printed(["train-base"], capsys))
    assert base["optimiser"]["steps"] == 5500 and base["data"]["general_from_step"] == 5000
    chain = tomllib.loads(printed(["reproduce"], capsys))
    assert chain["grpo"] == grpo["algorithm"] | grpo["sampling"] | grpo["optimiser"] | grpo["run"]
    assert chain["base"]["steps"] == 5500 and chain["chain"]["grpo_seeds"] == 3
    quick = tomllib.loads(printed(["reproduce", "--quick"], capsys))
    assert quick["grpo"]["iterations"] == 2 and quick["eval"]["limit"] == 8


def test_overrides_and_files_reach_the_printed_configuration(tmp_path, capsys):
    (tmp_path / "mine.toml").write_text("[optimiser]\nlr = 2e-4\n")
    text = printed(["train-grpo", "--config", str(tmp_path / "mine.toml"), "--set", "group_size=4"], capsys)
    assert load_config(GRPOConfig, None, []) != load_config(GRPOConfig, tmp_path / "mine.toml", [])
    config = tomllib.loads(text)
    assert config["optimiser"]["lr"] == 2e-4 and config["algorithm"]["group_size"] == 4
    chain = tomllib.loads(printed(["reproduce", "--set", "grpo.lr=5e-5", "--set", "grpo.seeds=2"], capsys))
    assert chain["grpo"]["lr"] == 5e-5 and chain["chain"]["grpo_seeds"] == 2


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        (["envs", "build"], "--out"),
        (["train-base", "--out", "x"], "--envs"),
        (["train-grpo", "--envs", "e"], "--init, --out"),
        (["reproduce"], "--out"),
        (["probe", "a", "b"], "--envs"),
    ],
)
def test_without_print_config_the_usual_arguments_are_required(argv, missing, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"toolrl-analyze: error: the following arguments are required: {missing}"]


def test_a_bad_value_in_print_config_is_one_line(capsys):
    assert main(["train-grpo", "--print-config", "--set", "lr=fast"]) == 2
    assert (
        capsys.readouterr().err.strip() == "toolrl-analyze: error: config key 'lr' must be float, got 'fast'"
    )


def test_the_installed_command_prints_the_same_outside_the_repository(tmp_path, capsys):
    here = printed(["reproduce"], capsys)
    result = subprocess.run(
        [sys.executable, "-m", "toolrl_analysis.cli", "reproduce", "--print-config"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert result.stdout == here


def test_episodes_are_played_the_same_way_by_every_command():
    settings = load_settings()
    played = (EPISODES.max_turns, EPISODES.max_new_tokens, EPISODES.batch_size)
    for options in (settings.eval, settings.ablate):
        assert (options.max_turns, options.max_new_tokens, options.batch_size) == played
    assert ProbeConfig().rollout_max_new_tokens == EPISODES.max_new_tokens
    from toolrl_analysis.analysis.ablate import EvaluationOptions

    evaluation = EvaluationOptions()
    assert (evaluation.max_turns, evaluation.max_new_tokens, evaluation.batch_size) == played
    assert evaluation.thinking is EPISODES.thinking is None  # the template's own default
    with pytest.raises(Exception, match="--max-new-tokens must be a whole number, at least 1"):
        EpisodeOptions(max_new_tokens=0)


def test_optional_keys_read_none_and_numbers():
    from dataclasses import dataclass

    from toolrl_analysis.config import build_config

    @dataclass
    class Optional:
        cap: int | None = None

    assert build_config(Optional, {"cap": "none"}).cap is None
    assert build_config(Optional, {"cap": "5"}).cap == 5


def test_reproduce_without_an_analysis_split_is_one_line_and_exit_2(capsys, tmp_path):
    status = main(["reproduce", "--out", str(tmp_path / "run"), "--set", "envs.analysis_per_scenario=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "envs.analysis_per_scenario" in err[0]
    assert not (tmp_path / "run" / "envs").exists()
