"""Other model families' formats end to end: prompts rendered by the tokenizer's own chat template (with
`tools=` and Qwen3's `enable_thinking`), the family's tool calls parsed, run in the sandbox and written back
into the history in the family's format.

The templates are the real ones, as trl ships them (a dev extra): Qwen3's (`enable_thinking=False` writes an
empty thinking block into the generation prompt; reasoning is read from `reasoning_content`) and Llama 3.1's
(tools as JSON in the first user turn, a call as `{"name", "parameters"}`, tool output under `ipython`)."""

import copy
import json
from importlib.resources import files

import pytest

from toolrl_analysis.envs.oracle import golden_calls
from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets
from toolrl_analysis.envs.sandbox import Sandbox
from toolrl_analysis.envs.toolcalls import parse_tool_calls, split_reasoning
from toolrl_analysis.episodes import EpisodeOptions
from toolrl_analysis.models.tokenizer import build_policy_tokenizer
from toolrl_analysis.rollout import ScriptedPolicy, run_episodes


def trl_template(name: str) -> str:
    path = files("trl") / "chat_templates" / name
    assert path.is_file(), f"trl ships no {name}"
    return path.read_text(encoding="utf-8")


QWEN3 = trl_template("qwen3.jinja")
LLAMA31 = trl_template("llama3_1.jinja")


@pytest.fixture(scope="module")
def setting():
    build = build_envsets(EnvBuildConfig(seed=3, train_size=12, test_per_scenario=1))
    record = next(r for r in build.test if r.scenario == "single_hop")
    tokenizer = build_policy_tokenizer(build.train, vocab_size=600)
    with Sandbox(workers=1, timeout=10.0) as sandbox:
        yield record, tokenizer, sandbox


def with_template(tokenizer, template: str):
    family = copy.deepcopy(tokenizer)
    family.chat_template = template
    return family


class RecordingPolicy(ScriptedPolicy):
    """A scripted policy that keeps the prompt text of every request, with a template choice of its own."""

    def __init__(self, tokenizer, responses, template_kwargs=None):
        super().__init__(tokenizer, responses)
        self.template_kwargs = template_kwargs or {}
        self.prompts: list[str] = []

    def act(self, requests):
        self.prompts += [self.tokenizer.decode(r.prompt_ids) for r in requests]
        return super().act(requests)


def golden(record) -> tuple[str, dict]:
    (_, name, arguments), *_ = golden_calls(record)[0]
    return name, arguments


@pytest.mark.parametrize("thinking, block", [(None, False), (True, False), (False, True)])
def test_enable_thinking_reaches_the_template_through_the_policy(setting, thinking, block):
    record, tokenizer, sandbox = setting
    family = with_template(tokenizer, QWEN3)
    options = EpisodeOptions(max_turns=1, thinking=thinking)
    policy = RecordingPolicy(family, [["The answer is unknown."]], options.template_kwargs())
    run_episodes(policy, [record], sandbox, max_turns=1)
    (prompt,) = policy.prompts
    assert prompt.startswith("<|im_start|>system\n# Tools")  # rendered with tools= by the template
    assert json.dumps(record.tools[0], ensure_ascii=False) in prompt
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") is block
    assert options.template_kwargs() == ({} if thinking is None else {"enable_thinking": thinking})


def test_a_qwen3_turn_that_thinks_first_calls_only_after_its_reasoning(setting):
    record, tokenizer, sandbox = setting
    family = with_template(tokenizer, QWEN3)
    name, arguments = golden(record)
    call = json.dumps({"name": name, "arguments": arguments})
    decoy = json.dumps({"name": name, "arguments": {"wrong": 1}})
    turn = f"<think>\nMaybe <tool_call>{decoy}</tool_call>? No, the question names it.\n</think>\n\n<tool_call>\n{call}\n</tool_call>"
    policy = RecordingPolicy(family, [[turn, "Done."]])
    (episode,) = run_episodes(policy, [record], sandbox, max_turns=2)
    first = episode.turns[0]
    assert [c.arguments for c in first.parsed.calls] == [arguments]  # the decoy in the thinking never ran
    assert first.parsed.reasoning.startswith("Maybe <tool_call>") and not first.parsed.malformed
    assert first.reward.score == pytest.approx(1.0)  # one call, one hop solved: 2q/(p+1) = 1
    history = policy.prompts[1]
    assert f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>' in history
    # within one tool-use exchange Qwen3's template shows the turn's reasoning again, from reasoning_content
    assert f"<think>\n{first.parsed.reasoning}\n</think>" in history
    assert f"<tool_response>\n{first.results[0].content}\n</tool_response>" in history


def test_a_llama_turn_calls_runs_and_comes_back_in_llama_format(setting):
    record, tokenizer, sandbox = setting
    family = with_template(tokenizer, LLAMA31)
    name, arguments = golden(record)
    turn = "<|python_tag|>" + json.dumps({"name": name, "parameters": arguments}) + "<|eom_id|>"
    policy = RecordingPolicy(family, [[turn, "It is done."]])
    (episode,) = run_episodes(policy, [record], sandbox, max_turns=2)
    first = episode.turns[0]
    assert [(c.name, c.arguments) for c in first.parsed.calls] == [(name, arguments)]
    assert first.results[0].ok and first.reward.score == pytest.approx(1.0)
    prompt, history = policy.prompts
    assert prompt.startswith("<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython")
    assert json.dumps(record.tools[0], indent=4, ensure_ascii=False) in prompt  # in the first user turn
    rendered_call = json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)
    assert f"<|start_header_id|>assistant<|end_header_id|>\n\n{rendered_call}<|eot_id|>" in history
    output = json.dumps(first.results[0].content, ensure_ascii=False)  # the template writes it as JSON
    assert f"<|start_header_id|>ipython<|end_header_id|>\n\n{output}<|eot_id|>" in history
    assert history.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize(
    "text, reasoning, rest",
    [
        ("<think>\nplan\n</think>\n\nanswer", "plan", "answer"),
        ("plan opened by the template\n</think>\nanswer", "plan opened by the template", "answer"),
        ("<think>\nthe budget ran out", "the budget ran out", ""),
        ("no thinking at all", "", "no thinking at all"),
        ("text <think>mid-turn</think> more", "", "text <think>mid-turn</think> more"),
    ],
)
def test_reasoning_is_set_apart(text, reasoning, rest):
    assert split_reasoning(text) == (reasoning, rest)
    parsed = parse_tool_calls(text)
    assert parsed.reasoning == reasoning and not parsed.calls


def test_an_unclosed_thinking_block_has_no_call_and_no_content():
    parsed = parse_tool_calls('<think>\nI will call <tool_call>{"name": "a", "arguments": {}}</tool_call>')
    assert parsed.calls == [] and parsed.content == "" and not parsed.malformed


def test_a_stray_closing_tag_after_a_call_is_not_reasoning():
    text = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call></think>'
    assert split_reasoning(text) == ("", text)
    assert [(c.name, c.arguments) for c in parse_tool_calls(text).calls] == [("f", {"x": 1})]
