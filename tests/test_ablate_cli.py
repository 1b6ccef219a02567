"""`toolrl-analyze ablate` end to end on planted pairs of tiny policies (the update lies in the lower MLPs
only, in upper attention only, or is too faint to detect, so what each variant keeps of the change and the
verdict are known), and its one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from toolrl_analysis.cli import main

LAYERS = 4


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A random 4-block Qwen2 policy with our tokenizer (base.pt); copies (HF directories) whose lower MLPs
    (block 0, the lower third) carry a planted update (`trained`), whose upper attention (block 3) does
    (`trained-attn`), and whose every weight moves by a faint 1e-4 of its spread (`trained-faint`); and a
    small environment set."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, write_envset
    from toolrl_analysis.models.chat_template import render_chat
    from toolrl_analysis.models.checkpoint import save_hf_dir, save_policy
    from toolrl_analysis.models.general import general_text
    from toolrl_analysis.models.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("ablate-cli")
    build = build_envsets(EnvBuildConfig(seed=5, train_size=8, test_per_scenario=2))
    write_envset(build, root / "envs")
    corpus = [render_chat(r.messages, tools=r.tools) for r in build.train + build.test]
    tokenizer = train_tokenizer(corpus + general_text("train", max_chars=10_000), vocab_size=600)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    save_policy(model, tokenizer, root / "base.pt")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    plants = {
        "trained": (lambda n: ".mlp." in n and int(n.split(".")[2]) == 0, 1.0),
        "trained-attn": (lambda n: ".self_attn." in n and int(n.split(".")[2]) == LAYERS - 1, 1.0),
        "trained-faint": (lambda n: True, 1e-4),
    }
    for seed, (directory, (where, scale)) in enumerate(plants.items(), start=1):
        model.load_state_dict(base_state)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if where(name) and parameter.dim() == 2:
                    parameter.add_(
                        torch.randn(parameter.shape, generator=generator) * parameter.std() * scale
                    )
        save_hf_dir(model, tokenizer, root / directory)
    return root


def run(capsys, *argv) -> tuple[int, str, str]:
    status = main(["ablate", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


FAST = (
    "--limit", "4", "--analysis-limit", "12", "--max-turns", "1", "--max-new-tokens", "4", "--no-general",
    "--bootstrap", "200", "--score-threads", "1",  # the suite runs two tests at a time on 2 cores
)  # fmt: skip
GRID = ("--grid", "paper", "--controls", "4")


def test_paper_grid_on_a_planted_pair_recovers_where_the_gain_lives(planted, capsys, tmp_path):
    status, out, err = run(
        capsys, planted / "base.pt", planted / "trained", *GRID, "--envs", planted / "envs",
        *FAST, "--metric", "nll_real", "--out", tmp_path, "--json",
    )  # fmt: skip
    assert status == 0, err
    document = json.loads(out)
    frame = pd.DataFrame(document["variants"]).set_index("variant")
    main = frame[~frame["control"]]
    subsets = (
        "mlp@lower",
        "mlp@middle",
        "mlp@upper",
        "attn@lower",
        "attn@middle",
        "attn@upper",
        "mlp@0-2",
        "embed",
        "norm",
    )  # fmt: skip (lm_head is tied to the embedding: `embed` covers it)
    expected = ["base", "trained"] + [f"{kind} {s}" for s in subsets for kind in ("revert", "transplant")]
    rank = [f"{kind} {which}-1" for kind in ("transplant", "revert") for which in ("rank", "residual")]
    assert sorted(main.index) == sorted(expected + rank)
    assert main.loc[[v for v in expected if "mlp@0-2" not in v], "played"].all()
    # Matched controls: 4 draws for each subset that has room; for the others, one row that says why.
    for subset in ("mlp@lower", "mlp@upper", "attn@lower", "attn@upper"):
        for kind in ("revert", "transplant"):
            drawn = frame[frame.index.str.startswith(f"{kind} control({subset})#")]
            assert (
                len(drawn) == 4 and (drawn["parameters"] == frame.loc[f"{kind} {subset}", "parameters"]).all()
            )
    assert "complement" in frame.loc["revert control(mlp@middle)", "note"]
    assert "outside the blocks" in frame.loc["revert control(embed)", "note"]
    # The whole update is in block 0's MLP: reverting it is the base, transplanting it is the trained model,
    # in Solve-F1's oracle NLL and in the teacher-forced metric alike; every control holds no update.
    retained = frame["gain_retained"]
    assert retained["revert mlp@lower"] == 0.0 and retained["transplant mlp@lower"] == 1.0
    for subset in ("mlp@upper", "attn@lower", "attn@upper"):
        assert retained[f"revert {subset}"] == 1.0 and retained[f"transplant {subset}"] == 0.0
    assert frame.loc["revert mlp@lower", "ll_retained"] == pytest.approx(0.0, abs=1e-9)
    assert frame.loc["transplant mlp@lower", "ll_retained"] == pytest.approx(1.0)
    controls = frame[frame.index.str.startswith("revert control(mlp@lower)#")]
    assert (controls["ll_retained"] == 1.0).all() and (controls["update_share"] == 0.0).all()
    assert frame.loc["revert mlp@lower", "update_share"] == pytest.approx(1.0)
    # The verdicts: one object per subset, with the rule and the numbers behind it.
    verdicts = {v["subset"]: v for v in document["verdicts"]}
    assert verdicts["mlp@lower"]["verdict"] == "reproduced", verdicts["mlp@lower"]["reason"]
    for subset in ("mlp@middle", "embed", "norm"):
        assert verdicts[subset]["verdict"] == "inconclusive" and verdicts[subset]["reason"]
    for found in verdicts.values():
        assert {"subset", "verdict", "rule", "reason"} <= set(found)
    lower = verdicts["mlp@lower"]["revert"]
    assert lower["controls"]["draws"] == 4 and lower["environments"] == 12
    assert {"p", "p_holm", "p_equivalent", "p_equivalent_holm", "mde", "environments_differ"} <= set(lower)
    # Per role, on the trained model's trajectories: reverting the lower MLPs keeps nothing of any role's
    # change, transplanting them all of it.
    roles = pd.read_csv(tmp_path / "roles_kept.csv")
    mine = roles[(roles["source"] == "trained")].set_index(["variant", "role"])["kept"]
    assert len(mine.loc["revert mlp@lower"]) >= 1  # four tokens a turn: mostly format tokens
    assert np.allclose(mine.loc["revert mlp@lower"], 0.0, atol=1e-9)
    assert np.allclose(mine.loc["transplant mlp@lower"], 1.0)
    assert {
        "variants.csv", "variants.parquet", "metrics.csv", "likelihood.csv", "likelihood.parquet", "roles_kept.csv",
        "ablation.json", "gain_retained.png", "control_null.png",
    } <= {p.name for p in tmp_path.iterdir()}  # fmt: skip
    # The report recomputes the same verdicts from the saved files, by the same function.
    from toolrl_analysis.analysis.ablate import verdicts_of

    saved = json.loads((tmp_path / "ablation.json").read_text())
    again = verdicts_of(saved, pd.read_csv(tmp_path / "likelihood.csv"))
    assert [v["verdict"] for v in again] == [v["verdict"] for v in document["verdicts"]]
    metrics = pd.read_parquet(tmp_path / "metrics.parquet")
    overall_f1 = metrics[(metrics["metric"] == "solve_f1") & (metrics["scope"] == "overall")]
    assert len(overall_f1) == main["played"].sum() and overall_f1[["se", "low", "high"]].notna().all().all()
    # Per variant x environment, the episodes and the meter's sums are kept, so that a later reader (the
    # report) redraws the same paired bootstrap: here it recovers the variants' own figures.
    from toolrl_analysis.analysis.ablate import stratified_resamples
    from toolrl_analysis.analysis.ablate.tables import role_estimates

    episodes, meter = pd.read_csv(tmp_path / "episodes.csv"), pd.read_csv(tmp_path / "meter.csv")
    assert set(episodes["variant"]) == set(meter["variant"]) == set(main.index[main["played"]])
    first = episodes[episodes["variant"] == "base"]
    resamples = stratified_resamples(first["scenario"].tolist(), 200, 0)
    for variant in ("base", "trained", "revert mlp@upper"):
        nll = role_estimates(meter[meter["variant"] == variant], len(first), resamples)[("all", "nll_real")]
        assert nll.value == pytest.approx(frame.loc[variant, "nll_real"])
        assert nll.se == pytest.approx(frame.loc[variant, "nll_real_se"])


@pytest.mark.parametrize(
    ("trained", "verdict"), [("trained-attn", "not reproduced"), ("trained-faint", "inconclusive")]
)
def test_planted_pairs_elsewhere_or_below_detection_are_not_called_reproduced(
    planted, capsys, trained, verdict
):
    status, out, err = run(
        capsys, planted / "base.pt", planted / trained, *GRID, "--envs", planted / "envs", *FAST, "--json"
    )
    assert status == 0, err
    verdicts = {v["subset"]: v for v in json.loads(out)["verdicts"]}
    assert verdicts["mlp@lower"]["verdict"] == verdict, verdicts["mlp@lower"]["reason"]
    if trained == "trained-attn":
        assert verdicts["attn@upper"]["verdict"] == "reproduced", verdicts["attn@upper"]["reason"]


def test_variants_are_the_models_evaluate_measures(planted, capsys):
    """The base and trained rows are what the meter measures on each checkpoint loaded on its own (the
    variants are written into one model object), and the user's splice sits beside them."""
    from toolrl_analysis.analysis.ablate import heldout_records
    from toolrl_analysis.context_meter import measure_roles, role_table
    from toolrl_analysis.envs.sandbox import Sandbox
    from toolrl_analysis.models.checkpoint import load_policy

    status, out, err = run(
        capsys, planted / "base.pt", planted / "trained", "--revert", "mlp@0", "--envs", planted / "envs",
        *FAST, "--json",
    )  # fmt: skip
    assert status == 0, err
    frame = pd.DataFrame(json.loads(out)["variants"]).set_index("variant")
    assert list(frame.index) == ["base", "trained", "revert mlp@0"]
    assert pd.isna(frame.loc["revert mlp@0", "gain_retained"])  # NaN, written as null in JSON
    assert "within its noise" in frame.loc["revert mlp@0", "gain_retained_reason"]
    records = heldout_records(planted / "envs", 4)
    with Sandbox(workers=2) as sandbox:
        for name, path in (("base", planted / "base.pt"), ("trained", planted / "trained")):
            model, tokenizer = load_policy(path)
            table = role_table(measure_roles(model, tokenizer, records, sandbox)).set_index("role")
            assert frame.loc[name, "nll_real"] == pytest.approx(table.loc["all", "nll_real"], rel=1e-5)


def test_save_only_writes_the_hybrid(planted, capsys, tmp_path):
    from toolrl_analysis.analysis.checkpoints import open_checkpoint
    from toolrl_analysis.models.checkpoint import load_policy

    target = tmp_path / "hybrid"
    status, out, err = run(
        capsys, planted / "base.pt", planted / "trained", "--revert", "mlp@lower", "--save", target
    )
    assert status == 0, err
    assert "saved revert mlp@lower" in out and "hf-directory" in out
    with open_checkpoint(target) as saved, open_checkpoint(planted / "base.pt") as base:
        name = "model.layers.0.mlp.up_proj.weight"
        assert torch.equal(saved.get(name), base.get(name))
    model, _ = load_policy(target)  # config and tokenizer came along: it loads as a policy
    assert model.config.num_hidden_layers == LAYERS


def assert_one_line_error(status: int, err: str, *fragments: str) -> None:
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--revert", "mlp@9", "--save", "{tmp}/x"], ["out of range", "mlp.down", "blocks 0-3"]),
        (["--revert", "norm.q", "--save", "{tmp}/x"], ["selects no parameters", "attn.q", "blocks 0-3"]),
        (["--revert", "mlpp", "--save", "{tmp}/x"], ["unknown component", "blocks 0-3"]),
        (["--grid", "paper", "--save", "{tmp}/x"], ["--grid"]),
        (["--revert", "mlp"], ["nothing to do"]),
        (["--envs", "{envs}"], ["nothing to ablate"]),
        (["--scale", "mlp", "half", "--save", "{tmp}/x"], ["factor must be a number"]),
        (["--scale", "mlp", "nan", "--save", "{tmp}/x"], ["finite number"]),
        (["--revert", "mlp", "--save", "{tmp}/x", "--shard-size", "big"], ["--shard-size"]),
        (["--revert", "mlp", "--envs", "{envs}", "--metric", "accuracy"], ["--metric"]),
        (["--grid", "paper", "--envs", "{envs}", "--controls", "1"], ["--controls must be at least 2"]),
        (["--revert", "mlp", "--envs", "{envs}", "--analysis-limit", "-1"], ["--analysis-limit"]),
        (["--revert", "mlp", "--save", "{existing}"], ["exists; pass --force"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(planted, capsys, tmp_path, argv, fragments):
    (tmp_path / "existing").mkdir()
    values = {"tmp": tmp_path, "envs": planted / "envs", "existing": tmp_path / "existing"}
    argv = [a.format(**values) for a in argv]
    status, _, err = run(capsys, planted / "base.pt", planted / "trained", *argv)
    assert_one_line_error(status, err, *fragments)
    assert not (tmp_path / "x").exists()


def test_mismatched_checkpoints_are_reported_as_compare_does(planted, capsys, tmp_path):
    from safetensors.torch import save_file

    from toolrl_analysis.analysis.checkpoints import open_checkpoint

    with open_checkpoint(planted / "trained") as trained:
        state = trained.state_dict()
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(60, 32)
    save_file(state, str(tmp_path / "reshaped.safetensors"))
    status, _, err = run(
        capsys,
        planted / "base.pt",
        tmp_path / "reshaped.safetensors",
        "--revert",
        "mlp",
        "--save",
        tmp_path / "x",
    )
    assert_one_line_error(status, err, "shape mismatch", "model.layers.1.mlp.up_proj.weight")
