"""--device and --dtype: how they resolve, the errors they give, and the bfloat16 path of every command that
loads a model, run for real on the CPU (this machine has no GPU; the GPU branches are reached by telling
torch there is one, and stop at their one-line errors before any tensor would move)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_random_qwen2

from toolrl_analysis.analysis.probe.activations import BACKENDS, CaptureRequest, capture_activations
from toolrl_analysis.cli import main
from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, write_envset
from toolrl_analysis.errors import UserError
from toolrl_analysis.models import placement as placement_module
from toolrl_analysis.models.checkpoint import load_pair, load_policy, save_hf_dir, save_policy
from toolrl_analysis.models.placement import Placement, describe, resolve_device, resolve_dtype
from toolrl_analysis.models.tokenizer import build_policy_tokenizer


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny float32 pair (a policy file and an HF directory) and a small environment set."""
    root = tmp_path_factory.mktemp("placement")
    build = build_envsets(
        EnvBuildConfig(seed=3, train_size=16, test_per_scenario=2, validation_per_scenario=1,
                       analysis_per_scenario=2)
    )  # fmt: skip
    write_envset(build, root / "envs")
    tokenizer = build_policy_tokenizer(build.train, vocab_size=600)
    base = save_policy(tiny_random_qwen2(tokenizer, seed=0, max_positions=4096), tokenizer, root / "base.pt")
    trained = save_hf_dir(tiny_random_qwen2(tokenizer, seed=1, max_positions=4096), tokenizer, root / "hf")
    return str(base), str(trained), root / "envs"


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch says one GPU is there (nothing may touch it: every path under test stops at an error first)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(placement_module, "_cuda_bf16", lambda device: False)
    monkeypatch.setattr(placement_module, "_cuda_name", lambda device: "Tesla V100")


def test_devices_resolve_and_the_cpu_machine_refuses_a_gpu():
    assert resolve_device("auto") == "cpu"  # no GPU here
    assert resolve_device("CPU") == "cpu"
    for name in ("cuda", "cuda:0"):
        with pytest.raises(UserError, match=f"--device {name}: torch sees no CUDA GPU"):
            resolve_device(name)
    with pytest.raises(UserError, match="--device 'gpu': use one of auto, cpu, cuda, cuda:N"):
        resolve_device("gpu")


def test_dtypes_resolve_and_a_gpu_without_bfloat16_refuses_it(fake_gpu):
    assert resolve_dtype("auto", "cpu") is None
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    assert resolve_dtype("float16", "cuda:0") is torch.float16
    with pytest.raises(UserError, match="--dtype bfloat16: cuda:0 \\(Tesla V100\\) has no bfloat16 support"):
        resolve_dtype("bfloat16", "cuda:0")
    with pytest.raises(UserError, match="--dtype 'int8': use one of auto, float32, bfloat16, float16"):
        resolve_dtype("int8", "cpu")
    assert resolve_device("auto") == "cuda:0" and resolve_device("cuda") == "cuda:0"
    with pytest.raises(UserError, match="--device cuda:1: this machine has 1 CUDA GPU"):
        resolve_device("cuda:1")
    # auto spreads a model over the GPUs (accelerate's device_map); a named GPU takes the whole model
    # sequential, not auto: the first GPU takes a model that fits ("auto" balances any model over every GPU)
    assert Placement("auto").resolve().load_kwargs() == {"dtype": "auto", "device_map": "sequential"}
    assert Placement("cuda:0", "float16").resolve().load_kwargs() == {
        "dtype": torch.float16, "device_map": {"": "cuda:0"}
    }  # fmt: skip
    assert Placement("cpu").resolve().load_kwargs() == {"dtype": "auto"}


def test_records_keep_only_what_is_not_auto(monkeypatch):
    assert Placement().record() == {}
    # on this machine auto is the CPU: spelling it out changes no record, and nothing reruns
    assert Placement("CPU", "BFloat16").record() == {"dtype": "bfloat16"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert Placement("cuda").record() == {} and Placement("cuda:1").record() == {"device": "cuda:1"}
    assert Placement("cpu").record() == {"device": "cpu"}


@pytest.mark.parametrize("which", ["policy file", "hf directory"])
def test_both_checkpoint_kinds_load_in_bfloat16_and_agree_with_float32(pair, which):
    path = pair[0] if which == "policy file" else pair[1]
    full, _ = load_policy(path)
    half, _ = load_policy(path, placement=Placement("cpu", "bfloat16"))
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert describe(half) == {"device": "cpu", "dtype": "bfloat16"}
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        reference = full(input_ids=ids).logits.log_softmax(-1)
        rounded = half(input_ids=ids).logits.float().log_softmax(-1)
    # bfloat16 keeps 8 bits of mantissa: a 2-block model's log-probs move by rounding only
    assert (reference - rounded).abs().max() < 0.1
    assert (reference.argmax(-1) == rounded.argmax(-1)).float().mean() > 0.9


def test_the_three_backends_capture_the_same_bfloat16_activations(pair):
    (base, _), tokenizer = load_pair(pair[0], pair[1], "a test", "eager", Placement("cpu", "bfloat16"))
    full, _ = load_policy(pair[0], "eager")
    requests = [CaptureRequest(list(range(5, 30)), positions=[3, 10, 24])]
    captured = {
        b: capture_activations(
            base, tokenizer, requests, backend=b, sites=("resid", "mlp_out"), pad_token_id=0
        )
        for b in BACKENDS
    }
    reference = capture_activations(
        full, tokenizer, requests, backend="hf", sites=("resid", "mlp_out"), pad_token_id=0
    )
    for backend, found in captured.items():
        assert found.resid.dtype == torch.float32  # captured values are float32 whatever the model's dtype
        assert torch.allclose(found.resid, captured["hf"].resid, atol=1e-2), backend
        assert torch.allclose(found.mlp_out, captured["hf"].mlp_out, atol=1e-2), backend
    scale = reference.resid.abs().max()
    assert (captured["hf"].resid - reference.resid).abs().max() < 0.05 * scale


def test_evaluate_probe_and_ablate_run_in_bfloat16_on_the_cpu(pair, tmp_path, capsys):
    base, trained, envs = pair
    flags = ["--device", "cpu", "--dtype", "bfloat16"]
    play = ["--max-turns", "2", "--max-new-tokens", "12", "--no-general", "--no-roles"]
    assert main(["evaluate", base, "--envs", str(envs), "--limit", "2", "--json", *play, *flags]) == 0
    info = json.loads(capsys.readouterr().out)["info"]
    assert info["dtype"] == "bfloat16" and info["device"] == "cpu" and info["environments"] == 2

    probe = [
        "--set",
        "rollout_envs=0",
        "--set",
        "min_class_count=2",
        "--seeds",
        "2",
        "--tasks",
        "call_or_answer",
    ]
    assert main(["probe", base, trained, "--envs", str(envs / "test.jsonl"), "--json", *probe, *flags]) == 0
    summary = json.loads(capsys.readouterr().out)["probe_summary"]
    assert summary and all(0 <= r["accuracy_mean"] <= 1 for r in summary)

    ablate = ["ablate", base, trained, "--revert", "mlp@0", "--envs", str(envs), "--limit", "2",
              "--analysis-limit", "2", "--json", *play, *flags]  # fmt: skip
    assert main(ablate) == 0
    variants = json.loads(capsys.readouterr().out)["variants"]
    assert [v["variant"] for v in variants] == ["base", "trained", "revert mlp@0"]


def test_the_embedded_base_evaluates_in_bfloat16(pair, capsys):
    _, _, envs = pair
    play = ["--limit", "1", "--max-turns", "1", "--max-new-tokens", "8", "--no-general", "--no-roles"]
    assert (
        main(
            [
                "evaluate",
                "embedded",
                "--envs",
                str(envs),
                "--json",
                *play,
                "--device",
                "cpu",
                "--dtype",
                "bfloat16",
            ]
        )
        == 0
    )
    info = json.loads(capsys.readouterr().out)["info"]
    assert info["model"] == "embedded" and info["dtype"] == "bfloat16"


def test_train_grpo_trains_float32_weights_from_a_bfloat16_checkpoint(pair, tmp_path, capsys):
    """AdamW on bf16 weights drops every step below half a ULP: at a real checkpoint's learning rate most
    weights would never move. So training loads float32 weights whatever the checkpoint stores, and refuses a
    half-precision --dtype in one line."""
    base, _, envs = pair
    model, tokenizer = load_policy(base, placement=Placement("cpu", "bfloat16"))
    stored = save_policy(model, tokenizer, tmp_path / "bf16.pt")
    sets = ["iterations=1", "envs_per_iteration=2", "group_size=2", "max_samples_per_iteration=3", "max_turns=2",
            "max_new_tokens=12", "eval_every=0", "drop_flat_groups=false", "mini_batch_size=4", "lr=1e-6",
            "sandbox_workers=1", "test_at_end=false"]  # fmt: skip
    arguments = ["train-grpo", "--envs", str(envs), "--init", str(stored), "--out", str(tmp_path / "grpo")]
    overrides = [a for s in sets for a in ("--set", s)]
    assert main([*arguments, "--dtype", "bfloat16", *overrides]) == 2
    assert "--dtype bfloat16: train-grpo trains float32 weights" in capsys.readouterr().err
    assert main([*arguments, *overrides]) == 0
    after, _ = load_policy(tmp_path / "grpo" / "trained.pt")
    assert {p.dtype for p in after.parameters()} == {torch.float32}
    before = dict(model.named_parameters())
    changed = kept = 0
    for name, weight in after.named_parameters():
        moved = weight != before[name].float()
        changed += int(moved.sum())
        kept += int((moved & (weight.to(torch.bfloat16) != before[name])).sum())
    assert changed > 0 and kept < changed / 2  # most of these steps would have vanished in bf16 weights


@pytest.mark.parametrize(
    "command",
    [
        ["evaluate", "BASE", "--envs", "ENVS"],
        ["probe", "BASE", "TRAINED", "--envs", "ENVS"],
        ["ablate", "BASE", "TRAINED", "--revert", "mlp@0", "--envs", "ENVS"],
        ["judge", "BASE", "TRAINED", "--envs", "ENVS"],
        ["divergence", "BASE", "TRAINED", "--envs", "ENVS"],
        ["train-grpo", "--envs", "ENVS", "--init", "BASE", "--out", "OUT"],
        ["reproduce", "--out", "OUT", "--quick"],
    ],
)
def test_a_gpu_flag_on_a_cpu_machine_is_one_line_and_exit_2(pair, command, tmp_path, capsys):
    base, trained, envs = pair
    names = {"BASE": base, "TRAINED": trained, "ENVS": str(envs), "OUT": str(tmp_path / "out")}
    arguments = [names.get(a, a) for a in command]
    assert main([*arguments, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "toolrl-analyze: error: --device cuda: torch sees no CUDA GPU on this machine (use --device cpu or auto)\n"
    )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing was started


def test_an_unusable_dtype_names_the_flag(pair, fake_gpu, capsys):
    base, _, envs = pair
    assert main(["evaluate", base, "--envs", str(envs), "--device", "cuda", "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "toolrl-analyze: error: --dtype bfloat16: cuda:0 (Tesla V100) has no bfloat16 support"
    )
    assert err.count("\n") == 1


def test_reproduce_prints_and_records_its_placement(capsys):
    assert main(["reproduce", "--print-config", "--quick", "--device", "cpu", "--dtype", "bfloat16"]) == 0
    text = capsys.readouterr().out
    assert 'device = "cpu"' in text and 'dtype = "bfloat16"' in text
    from toolrl_analysis.reproduce.chain import build_stages
    from toolrl_analysis.reproduce.settings import load_settings

    settings = load_settings(True, placement=Placement("cpu", "bfloat16"))
    stages = {s.name: s for s in build_stages(Path("/nonexistent"), settings)}
    loading = [n for n in stages if n.startswith(("evaluate", "pass@k", "train", "ablate", "probe", "judge"))]
    analyses = [n for n in loading if not n.startswith("train")]
    assert analyses and all(stages[n].config["dtype"] == "bfloat16" for n in analyses)
    # training keeps float32 weights whatever --dtype says, so its record does not hold the dtype
    assert all("dtype" not in stages[n].config for n in loading if n.startswith("train"))
    assert "dtype" not in stages["envs"].config and "dtype" not in stages["compare grpo"].config
    defaults = {s.name: s for s in build_stages(Path("/nonexistent"), load_settings(True))}
    assert all("dtype" not in s.config and "device" not in s.config for s in defaults.values())
