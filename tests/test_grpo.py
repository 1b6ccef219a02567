"""The GRPO trainer on real (tiny) models, real environments and a real sandbox."""

import math
import os
import signal

import pandas as pd
import pytest
import torch

from toolrl_analysis.cli import main
from toolrl_analysis.config import load_config
from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, write_envset
from toolrl_analysis.envs.sandbox import Sandbox
from toolrl_analysis.errors import CheckpointError, ConfigError, TrainingDiverged
from toolrl_analysis.models.checkpoint import load_policy, save_policy
from toolrl_analysis.models.factory import build_model
from toolrl_analysis.models.tokenizer import build_policy_tokenizer
from toolrl_analysis.training import objective
from toolrl_analysis.training.advantages import episode_group_advantages
from toolrl_analysis.training.grpo import GRPOConfig, GRPOTrainer, train_grpo
from toolrl_analysis.training.resume import load_train_state


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    build = build_envsets(EnvBuildConfig(seed=5, train_size=12, test_per_scenario=1, validation_per_scenario=2,
                                         same_world_test_per_scenario=1))  # fmt: skip
    tokenizer = build_policy_tokenizer(build.train, vocab_size=600)
    root = tmp_path_factory.mktemp("grpo")
    write_envset(build, root / "envs")
    model = build_model("tiny", tokenizer=tokenizer, seed=0)
    save_policy(model, tokenizer, root / "init.pt")
    return root, build


def small_config(**overrides) -> GRPOConfig:
    values = dict(
        iterations=2,
        envs_per_iteration=2,
        group_size=2,
        max_samples_per_iteration=3,
        max_turns=2,
        max_new_tokens=12,
        max_prompt_tokens=1024,
        lr=1e-3,
        drop_flat_groups=False,  # the random init rarely has reward spread; its flat groups still move weights
        eval_every=0,
        save_every=1,
        keep_last=2,
        generation_batch_size=8,
        mini_batch_size=4,
        sandbox_workers=1,
    )
    values.update(overrides)
    config = GRPOConfig(**values)
    config.validate()
    return config


def run(root, build, out, config, resume=False, poison_after=None, interrupt_after=None, on_row=None):
    model, tokenizer = load_policy(root / "init.pt")
    with Sandbox(workers=1) as sandbox:
        trainer = GRPOTrainer(config, model, tokenizer, build.train, out, sandbox, log=lambda _: None)

        def on_iteration(row):
            if on_row is not None:
                on_row(row)
            if poison_after is not None and row["iteration"] == poison_after:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))
            if interrupt_after is not None and row["iteration"] == interrupt_after:
                os.kill(os.getpid(), signal.SIGINT)

        history = trainer.train(resume=resume, on_iteration=on_iteration)
    return trainer, history


def test_resume_reproduces_an_uninterrupted_run(setup, tmp_path):
    root, build = setup
    straight, history = run(root, build, tmp_path / "a", small_config(iterations=3))
    assert [row["iteration"] for row in history] == [1, 2, 3]
    for key in (
        "reward_mean",
        "reward_std",
        "zero_spread_groups",
        "kl",
        "entropy",
        "clip_fraction",
        "grad_norm",
        "samples_per_second",
        "tokens_per_second",
    ):
        assert key in history[0]
    run(root, build, tmp_path / "b", small_config(iterations=2))
    resumed, _ = run(root, build, tmp_path / "b", small_config(iterations=3), resume=True)
    assert resumed.iteration == 3
    for (name, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert len(list((tmp_path / "b" / "checkpoints").glob("iter-*.pt"))) == 2  # keep_last


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    root, build = setup
    real_loss, calls = objective.clipped_policy_loss, []

    def loss_turning_nan_in_iteration_two(*args, **kwargs):
        loss, clip_fraction = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if trainer_iteration[0] >= 1 else loss), clip_fraction

    trainer_iteration = [0]
    monkeypatch.setattr(objective, "clipped_policy_loss", loss_turning_nan_in_iteration_two)
    with pytest.raises(TrainingDiverged, match="loss nan.*last good checkpoint"):
        run(
            root,
            build,
            tmp_path,
            small_config(iterations=4),
            on_row=lambda row: trainer_iteration.__setitem__(0, row["iteration"]),
        )
    checkpoints = sorted((tmp_path / "checkpoints").glob("iter-*.pt"))
    assert [p.name for p in checkpoints] == ["iter-000001.pt"]
    weights, state = load_train_state(checkpoints[0])
    assert state["iteration"] == 1 and all(torch.isfinite(t).all() for t in weights.values())


def test_non_finite_weights_stop_the_run(setup, tmp_path):
    root, build = setup
    with pytest.raises(TrainingDiverged, match="weights became NaN"):
        run(root, build, tmp_path, small_config(iterations=4), poison_after=1)
    assert [p.name for p in (tmp_path / "checkpoints").glob("iter-*.pt")] == ["iter-000001.pt"]


def test_sigint_saves_and_exits_cleanly(setup, tmp_path):
    root, build = setup
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN, not the default, under `nohup ... &`
    trainer, history = run(root, build, tmp_path, small_config(iterations=5, save_every=0), interrupt_after=1)
    assert trainer.stop_requested and trainer.iteration == 1 and len(history) == 1
    assert (tmp_path / "checkpoints" / "iter-000001.pt").exists()
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


@pytest.mark.parametrize(
    "overrides",
    [
        {"algo": "reinforce++"},
        {"algo": "reinforce++", "kl_in_reward": True, "temperature": 0.7},
        {"credit": "episode", "loss_aggregation": "seq-mean-token-sum-norm", "normalize_std": False},
    ],
)
def test_other_estimators_and_credit_modes_train(setup, tmp_path, overrides):
    root, build = setup
    before = load_policy(root / "init.pt")[0].state_dict()
    config = small_config(iterations=1, **overrides)
    trainer, history = run(root, build, tmp_path, config)
    row = history[0]
    assert trainer.iteration == 1 and row["updated_samples"] == row["samples"] > 0
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the update moved the policy
    assert all(math.isfinite(row[k]) for k in ("loss", "kl", "entropy", "grad_norm"))
    if config.credit == "episode":  # G whole episodes per environment, every turn of them a sample
        assert row["samples"] >= config.envs_per_iteration * config.group_size
    else:  # G completions of each of at most max_samples_per_iteration states
        assert row["samples"] == row["step_states"] * config.group_size
        assert row["step_states"] <= config.max_samples_per_iteration
    if config.kl_in_reward:  # the k1 paid in the return: behaviour policy against the reference, equal before
        assert abs(row["kl"]) < 1e-4  # any update (sampling and scoring use the same logits / temperature)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_flat_groups_and_the_update_batch_are_sliced_once():
    from toolrl_analysis.training.grpo import UpdateBatch, drop_flat_groups, flat_groups, reward_stats
    from toolrl_analysis.training.sequences import pack_sequences
    from toolrl_analysis.training.step_samples import Sample

    rewards = [1.0, 1.0, 0.0, 1.0, 0.5, 0.5]  # group 0 flat, group 1 spread, group 2 flat
    samples = [Sample([1, 2], [3 + i], [-0.1], r, i // 2, i) for i, r in enumerate(rewards)]
    assert flat_groups(samples) == {0, 2}
    assert [s.episode for s in drop_flat_groups(samples)] == [2, 3]
    stats = reward_stats(samples)
    assert stats["zero_spread_groups"] == pytest.approx(2 / 3) and stats["samples"] == 6
    sequences = pack_sequences(
        [[1, 2], [4], [5, 6, 7]], [[10], [11, 12], [13], [14], [15], [16, 17]], 0, repeats=2
    )
    n, t = sequences.completion_mask.shape
    values = torch.arange(n * t, dtype=torch.float32).reshape(n, t)
    batch = UpdateBatch(sequences, values, values + 100, values + 200)
    part = batch.select(torch.tensor([2, 0]))  # prompts 2 and 0 with their two completions each
    assert part.prompts == 2 and part.sequences.repeats == 2
    assert part.old_logprobs[:, 0].tolist() == [4 * t, 5 * t, 0, t]
    assert torch.equal(part.ref_logprobs, part.old_logprobs + 100)
    assert torch.equal(part.advantages, part.old_logprobs + 200)
    assert torch.equal(part.mask, sequences.completion_mask[[4, 5, 0, 1]])


def test_a_corrupt_checkpoint_stops_a_resume_with_one_line(setup, tmp_path):
    root, build = setup
    run(root, build, tmp_path, small_config(iterations=1))
    (tmp_path / "checkpoints" / "iter-000001.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="iter-000001.pt"):
        run(root, build, tmp_path, small_config(iterations=2), resume=True)
    save_policy(
        *load_policy(root / "init.pt"), tmp_path / "checkpoints" / "iter-000002.pt"
    )  # a policy, no state
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        run(root, build, tmp_path, small_config(iterations=3), resume=True)


def test_episode_group_advantages_count_each_episode_once():
    # episode 0 has three turns, episode 1 one; both in group 0
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0])
    episodes = torch.tensor([0, 0, 0, 1])
    adv = episode_group_advantages(rewards, groups, episodes, normalize_std=False)
    assert adv.tolist() == [0.5, 0.5, 0.5, -0.5]


def test_train_grpo_validates_on_held_out_worlds_and_tests_once(setup, tmp_path):
    root, build = setup
    lines = []
    config = small_config(iterations=1, eval_every=5, val_solve_envs=1, val_meter_envs=1, test_at_end=True)
    summary = train_grpo(root / "envs", root / "init.pt", tmp_path, config, log=lines.append)
    assert summary["iterations"] == 1
    # Validation: before the first iteration and after the last (eval_every is not reached here), on the
    # build's validation split (held-out worlds; never test.jsonl), so every train environment stays in RL.
    validation = pd.read_csv(tmp_path / "validation.csv")
    assert validation["iteration"].tolist() == [0, 1]
    assert {"val_f1_overall", "nll_format", "gap_format", "top1_format"} <= set(validation.columns)
    held_out = summary["validation_envs"]
    assert held_out and set(held_out) <= {r.env_id for r in build.validation}
    assert summary["training_envs"] == len(build.train)
    assert any("held-out worlds (validation.jsonl)" in line for line in lines)
    assert all("val_f1_overall" in row for row in summary["history"])
    assert any(line.startswith("validation at iteration 0: Solve-F1") for line in lines)
    assert any(line.strip().startswith("role") and "gap" in line for line in lines)  # the role-NLL table
    # The test split, once, at the end, written as `evaluate --out` writes it.
    assert isinstance(summary["test_solve_f1"], float)
    assert {"tool_use.csv", "general.csv", "evaluation.json"} <= {
        p.name for p in (tmp_path / "test").iterdir()
    }
    load_policy(tmp_path / "trained.pt")
    load_policy(tmp_path / "hf")
    assert "val_f1_overall" in pd.read_csv(tmp_path / "metrics.csv").columns
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_config_errors_name_the_key(setup, tmp_path, capsys):
    with pytest.raises(ConfigError, match="'group_size'"):
        load_config(GRPOConfig, None, ["group_size=1"])
    with pytest.raises(ConfigError, match="'clip_eps_high'"):
        load_config(GRPOConfig, None, ["clip_eps=0.3", "clip_eps_high=0.2"])
    with pytest.raises(ConfigError, match="'kl_in_reward'"):
        load_config(GRPOConfig, None, ["kl_in_reward=true"])  # GRPO takes its KL as a loss
    with pytest.raises(ConfigError, match="'val_solve_envs'"):
        load_config(GRPOConfig, None, ["val_solve_envs=-1"])
    with pytest.raises(ConfigError, match="'warmup_steps'.*no effect"):  # a ramp the schedule would ignore
        load_config(GRPOConfig, None, ["schedule=constant", "warmup_steps=5"])
    assert load_config(GRPOConfig, None, ["schedule=warmup", "warmup_steps=5"]).warmup_steps == 5
    with pytest.raises(ConfigError, match="'test_at_end'"):
        load_config(GRPOConfig, None, ["test_at_end=maybe"])
    root, _ = setup
    code = main(
        [
            "train-grpo",
            "--envs",
            str(root / "envs"),
            "--init",
            str(root / "init.pt"),
            "--out",
            str(tmp_path),
            "--set",
            "lr=-1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "'lr'" in err and "Traceback" not in err
    code = main(
        [
            "train-grpo",
            "--envs",
            str(root / "envs"),
            "--init",
            str(tmp_path / "missing.pt"),
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2 and "Traceback" not in capsys.readouterr().err


def test_cosine_schedule_runs_over_iterations(setup, tmp_path):
    root, build = setup
    trainer, history = run(
        root, build, tmp_path, small_config(iterations=3, schedule="cosine", warmup_steps=1, lr=1e-3)
    )
    assert [round(row["lr"], 6) for row in history] == [
        pytest.approx(1e-3 * f) for f in (1.0, 0.1 + 0.9 * 0.75, 0.1 + 0.9 * 0.25)
    ]


def test_without_a_validation_split_the_end_of_train_is_held_out(setup, tmp_path):
    root, build = setup
    config = small_config(iterations=1, eval_every=5, val_solve_envs=1, val_meter_envs=1)
    summary = train_grpo(
        root / "envs" / "train.jsonl", root / "init.pt", tmp_path, config, log=lambda _: None
    )
    held_out, train_ids = summary["validation_envs"], {r.env_id for r in build.train}
    assert held_out and set(held_out) <= train_ids
    assert summary["training_envs"] == len(train_ids) - len(held_out)


def test_oracle_prefixes_put_later_hops_among_the_states(setup, tmp_path):
    """With oracle_prefix_share, part of each iteration's states come from golden trajectories after one or
    more correct turns: something already solved, something (or the final answer) left."""
    from toolrl_analysis.training.step_samples import oracle_prefix_states

    root, build = setup
    _, tokenizer = load_policy(root / "init.pt")
    multi = [r for r in build.train if r.scenario in ("multi_hop", "parallel_multi_hop")][:2]
    with Sandbox(workers=1) as sandbox:
        states = oracle_prefix_states(multi, tokenizer, sandbox, max_prompt_tokens=4096)
    assert states and all(s.solve_rate > 0 for s in states)
    hops = sum(len(r.meta["golden_turns"]) for r in multi)
    assert len(states) == hops  # after each golden turn: the next hop, or the final answer after the last
    assert any(s.unsolved_set and any(s.unsolved_set.values()) for s in states)
    trainer, history = run(root, build, tmp_path, small_config(iterations=1, oracle_prefix_share=0.5))
    assert history[0]["oracle_states"] >= 1 and history[0]["step_states"] <= 3
    with pytest.raises(ConfigError, match="'oracle_prefix_share'"):
        load_config(GRPOConfig, None, ["credit=episode", "oracle_prefix_share=0.5"])
