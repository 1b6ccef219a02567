"""Benchmark `toolrl-analyze ablate --grid paper`: its wall time, and its table, on a pair you name or on a
planted pair built here.

With --base/--trained/--envs it times the grid on that pair (the issue's target: the embedded pair in
<= 20 minutes on 2 cores, with 20 matched controls per subset). Without them it builds a *planted* pair in a temporary directory, so the grid has
a known answer to find:

  environments  `envs build --set train_size=40 --set test_per_scenario=5` (the analysis split: 192
                held-out environments);
  base          a tiny Qwen2 policy (hidden 64, 4 blocks, our tokenizer) after a short supervised warm-up on
                oracle trajectories of the training environments, every parameter trained;
  trained       the base after more supervised steps in which only the lower MLPs (block 0, the lower third) were
                trainable -- the planted location of the gain -- plus Gaussian noise on every other block
                matrix holding a tenth of that update's energy, so that random controls have update to draw.

On the planted pair, reverting mlp@lower should remove the change in the teacher-forced metric, its matched
controls should not (its verdict: reproduced), and the other subsets should keep it.

    .venv/bin/python benchmarks/bench_ablate_grid.py                       # planted pair, ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_ablate_grid.py --base B --trained T --envs DIR [--limit 40]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_planted_pair(root: Path, steps: int = 300, seed: int = 0) -> dict[str, Path]:
    """Environments, base.pt and trained.pt under root (see the module docstring)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from toolrl_analysis.context_meter import label_roles
    from toolrl_analysis.envs.oracle import oracle_conversations
    from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, write_envset
    from toolrl_analysis.envs.sandbox import Sandbox
    from toolrl_analysis.models.chat_template import render_chat
    from toolrl_analysis.models.checkpoint import save_policy
    from toolrl_analysis.models.general import general_text
    from toolrl_analysis.models.tokenizer import train_tokenizer

    build = build_envsets(EnvBuildConfig(seed=seed, train_size=40, test_per_scenario=5))
    write_envset(build, root / "envs")
    with Sandbox(workers=2) as sandbox:
        conversations = oracle_conversations(build.train, sandbox, random.Random(seed))
    rendered = [render_chat(c, tools=r.tools) for r, c in zip(build.train, conversations, strict=True)]
    tokenizer = train_tokenizer(rendered + general_text("train", max_chars=20_000), vocab_size=1000)
    examples = []
    for record, conversation in zip(build.train, conversations, strict=True):
        labelled = label_roles(tokenizer, conversation, record.tools, record.answer)
        examples.append((torch.tensor(labelled.ids), torch.tensor([r is not None for r in labelled.roles])))
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)

    def train(parameters, train_seed: int) -> None:
        """Teacher-forced loss on the assistant tokens of one oracle trajectory per step."""
        optimiser = torch.optim.AdamW(parameters, lr=3e-3, weight_decay=0.0)
        rng = random.Random(train_seed)
        model.train()
        for _ in range(steps):
            ids, mask = examples[rng.randrange(len(examples))]
            logits = model(input_ids=ids[None]).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(logits, ids[1:].masked_fill(~mask[1:], -100))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        model.eval()

    def lower_mlp(name: str) -> bool:
        return ".mlp." in name and int(name.split(".")[2]) == 0

    train(list(model.parameters()), seed)
    save_policy(model, tokenizer, root / "base.pt")
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    train([p for n, p in model.named_parameters() if lower_mlp(n)], seed + 1)
    with torch.no_grad():
        signal = sum(float(((p - base[n]) ** 2).sum()) for n, p in model.named_parameters() if lower_mlp(n))
        others = [
            p for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2 and not lower_mlp(n)
        ]
        size = sum(p.numel() for p in others)
        generator = torch.Generator().manual_seed(seed + 2)
        for parameter in others:  # a tenth of the signal's energy in all, each matrix at its own scale
            scale = (0.1 * signal / size) ** 0.5 * float(
                torch.empty(()).uniform_(0.3, 1.7, generator=generator)
            )
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    save_policy(model, tokenizer, root / "trained.pt")
    return {"base": root / "base.pt", "trained": root / "trained.pt", "envs": root / "envs"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default=None)
    parser.add_argument("--trained", default=None)
    parser.add_argument("--envs", default=None, help="an environment set (its test.jsonl) or a .jsonl file")
    parser.add_argument(
        "--limit", type=int, default=48, help="Solve-F1 environments, round-robin over scenarios"
    )
    parser.add_argument("--analysis-limit", type=int, default=None, help="teacher-forced environments (all)")
    parser.add_argument("--controls", type=int, default=20, help="matched controls per subset")
    parser.add_argument("--metric", default=None, help="default: nll_real on the planted pair, else solve_f1")
    parser.add_argument("--steps", type=int, default=300, help="planted pair: supervised steps of each stage")
    parser.add_argument("--out", default=None, help="keep the ablation's files here")
    args = parser.parse_args(argv)

    import torch
    from rich.console import Console

    from toolrl_analysis.analysis.ablate import ablate, render_ablation

    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        "(other processes share these CPUs)"
    )
    root = Path(tempfile.mkdtemp(prefix="bench_ablate_grid_"))
    try:
        if args.base is None:
            started = time.perf_counter()
            torch.set_num_threads(1)
            pair = build_planted_pair(root, steps=args.steps)
            print(f"built the planted pair in {time.perf_counter() - started:.0f} s")
            metric = args.metric or "nll_real"
        else:
            pair = {"base": args.base, "trained": args.trained, "envs": args.envs}
            metric = args.metric or "solve_f1"
        started = time.perf_counter()
        ablation = ablate(
            pair["base"], pair["trained"], grid="paper", envs=pair["envs"], limit=args.limit, metric=metric,
            analysis_limit=args.analysis_limit, controls=args.controls,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        render_ablation(ablation, Console(width=100))
        variants = ablation.variants
        per_variant = variants["seconds"].dropna()
        print(
            f"ablate --grid paper: {seconds / 60:.1f} min for {len(variants)} variants on "
            f"{ablation.summary['environments']} played and {ablation.summary['analysis_environments']} scored "
            f"environments (per variant {per_variant.mean():.1f} s, {per_variant.min():.1f}-{per_variant.max():.1f}"
            f" s); target <= 20 min on 2 cores: {'met' if seconds <= 1200 else 'MISSED'}"
        )
        if args.out:
            ablation.write(args.out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
