"""The shipped embedded base: it is there, it is fresh, and the name `embedded` reaches it everywhere."""

import json

import pytest
import torch

from toolrl_analysis.cli import main
from toolrl_analysis.errors import CheckpointError
from toolrl_analysis.models.chat_template import CHAT_TEMPLATE
from toolrl_analysis.models.checkpoint import load_policy, save_policy
from toolrl_analysis.models.embedded import (
    EMBEDDED_DIR,
    REGENERATE,
    embedded_base_path,
    read_manifest,
    resolve_model,
    stale_reasons,
    tokenizer_fingerprint,
)


@pytest.fixture(scope="module")
def manifest():
    return read_manifest()


@pytest.fixture(scope="module")
def embedded():
    return load_policy("embedded")


def test_the_manifest_describes_the_recipe_and_its_validation(manifest):
    assert manifest["format"] == "toolrl-analysis.embedded/1"
    for key in (
        "recipe",
        "envs_seed",
        "envs_config",
        "fingerprint",
        "validation",
        "chosen_step",
        "train_seconds",
    ):
        assert key in manifest, key
    steps = [row["step"] for row in manifest["validation"]]
    assert steps == sorted(steps) and manifest["chosen_step"] in steps
    chosen = next(row for row in manifest["validation"] if row["step"] == manifest["chosen_step"])
    assert {"val_f1_overall", "nll_value_from_question", "gap_tool_kind"} <= set(chosen)
    # The file is the one the manifest was written for.
    import hashlib

    assert hashlib.sha256(embedded_base_path().read_bytes()).hexdigest() == manifest["base_sha256"]


def test_the_shipped_base_is_fresh(manifest, embedded):
    """The code's tokenizer recipe and chat template must still be the ones the base was trained with."""
    from toolrl_analysis.config import build_config
    from toolrl_analysis.envs.pipeline import EnvBuildConfig
    from toolrl_analysis.training.sft import SFTConfig, base_tokenizer

    recipe = build_config(SFTConfig, manifest["recipe"])
    build = (
        build_config(EnvBuildConfig, manifest["envs_config"]) if manifest["envs_config"] else EnvBuildConfig()
    )
    rebuilt = base_tokenizer(recipe, build, [])
    rebuilt.chat_template = CHAT_TEMPLATE
    problems = stale_reasons(manifest, tokenizer_fingerprint(rebuilt))
    assert not problems, "; ".join(problems)
    _, tokenizer = embedded
    assert tokenizer.chat_template == CHAT_TEMPLATE, f"the code's chat template changed: {REGENERATE}"


def test_a_changed_template_or_tokenizer_is_reported_as_stale(manifest, embedded):
    _, tokenizer = embedded
    current = tokenizer_fingerprint(tokenizer)
    assert stale_reasons(manifest, current) == []
    edited = dict(current, chat_template_sha256="0" * 64)
    (reason,) = stale_reasons(manifest, edited)
    assert "chat template" in reason and "regenerate the base" in reason
    edited = dict(current, tokenizer_sha256="0" * 64)
    (reason,) = stale_reasons(manifest, edited)
    assert "tokenizer" in reason and "regenerate the base" in reason


def test_embedded_resolves_to_the_shipped_file(tmp_path):
    assert resolve_model("embedded") == EMBEDDED_DIR / "base.pt"
    assert resolve_model(tmp_path / "x.pt") == tmp_path / "x.pt"
    with pytest.raises(CheckpointError, match="regenerate the base"):
        embedded_base_path(tmp_path)


def test_evaluate_embedded(tmp_path, capsys):
    from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, write_envset

    write_envset(build_envsets(EnvBuildConfig(seed=11, train_size=4, test_per_scenario=1)), tmp_path / "envs")
    code = main(["evaluate", "embedded", "--envs", str(tmp_path / "envs" / "test.jsonl"), "--no-general",
                 "--max-turns", "3", "--max-new-tokens", "64", "--json"])  # fmt: skip
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    assert document["info"]["model"] == "embedded" and len(document["episodes"]) == 4
    assert {row["role"] for row in document["roles"]} >= {"tool_kind", "value_from_question"}


def test_compare_embedded_with_a_changed_copy(tmp_path, capsys, embedded):
    model, tokenizer = embedded
    changed = load_policy("embedded")[0]
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight.add_(0.01)
    save_policy(changed, tokenizer, tmp_path / "trained.pt")
    assert main(["compare", "embedded", str(tmp_path / "trained.pt"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    moved = [r for r in rows if r["relative_frobenius_change"]]
    assert [(r["layer"], r["component"]) for r in moved] == [(0, "mlp.down")]


def test_train_grpo_starts_from_embedded(tmp_path):
    from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, write_envset

    write_envset(
        build_envsets(EnvBuildConfig(seed=12, train_size=40, test_per_scenario=1)), tmp_path / "envs"
    )
    code = main(["train-grpo", "--envs", str(tmp_path / "envs"), "--init", "embedded", "--out", str(tmp_path / "rl"),
                 "--set", "iterations=1", "--set", "envs_per_iteration=2", "--set", "max_samples_per_iteration=4",
                 "--set", "eval_every=0", "--set", "max_turns=2", "--set", "val_solve_envs=1",
                 "--set", "val_meter_envs=1", "--set", "threads=1"])  # fmt: skip
    assert code == 0
    trained, _ = load_policy(tmp_path / "rl" / "trained.pt")
    base, _ = load_policy("embedded")
    assert trained.config.to_dict()["num_hidden_layers"] == base.config.num_hidden_layers
