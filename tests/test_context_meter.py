"""The context-reading meter: role labels on a hand-built trajectory, and NLLs of a scripted model whose
probabilities are known exactly."""

import math
import random
from types import SimpleNamespace

import pytest
import torch

from toolrl_analysis.context_meter import (
    ROLES,
    build_meter_set,
    context_gap,
    donor_order,
    label_roles,
    meter_frame,
    replace_context,
    role_table,
)
from toolrl_analysis.envs.oracle import oracle_conversations
from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets
from toolrl_analysis.envs.sandbox import Sandbox
from toolrl_analysis.errors import ConfigError
from toolrl_analysis.models.tokenizer import build_policy_tokenizer


@pytest.fixture(scope="module")
def build():
    return build_envsets(EnvBuildConfig(seed=5, train_size=24, test_per_scenario=3))


@pytest.fixture(scope="module")
def tokenizer(build):
    return build_policy_tokenizer(build.train, vocab_size=700)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "person_info",
            "description": "Look up facts about a person.",
            "parameters": {
                "type": "object",
                "properties": {"person": {"type": "string"}, "field": {"type": "string"}},
                "required": ["person", "field"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "place_mayor",
            "description": "Look up the mayor of a place.",
            "parameters": {"type": "object", "properties": {"place": {"type": "string"}}},
        },
    },
]


def _call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _hand_built():
    return [
        {"role": "user", "content": "Question: Who is the mayor of the birthplace of Zobu Kela?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("person_info", {"person": "Zobu Kela", "field": "birthplace"})]},
        {"role": "tool", "name": "person_info", "content": "Zobu Kela was born in Vantor."},
        {"role": "assistant", "content": "", "tool_calls": [_call("place_mayor", {"place": "Vantor"})]},
        {"role": "tool", "name": "place_mayor", "content": "The mayor of Vantor is Lise Dura."},
        {"role": "assistant", "content": "The answer is Lise Dura."},
    ]  # fmt: skip


def _text_of(tokenizer, example, role):
    """The assistant text of every token with `role`, each span of consecutive tokens joined."""
    pieces, current = [], []
    for index, token_role in enumerate(example.roles):
        if token_role == role:
            current.append(example.ids[index])
        elif current:
            pieces.append(tokenizer.decode(current))
            current = []
    if current:
        pieces.append(tokenizer.decode(current))
    return pieces


def test_roles_of_a_hand_built_trajectory(tokenizer):
    example = label_roles(tokenizer, _hand_built(), TOOLS, answer="Lise Dura")
    assert _text_of(tokenizer, example, "tool_kind") == ["person", "place"]
    assert _text_of(tokenizer, example, "tool_relation") == ["_info", "_mayor"]
    assert _text_of(tokenizer, example, "arg_key") == ["person", "field", "place"]
    # The name in the question, the enum value the question also names, the name from the tool response:
    assert _text_of(tokenizer, example, "value_from_question") == ["Zobu Kela", "birthplace"]
    assert _text_of(tokenizer, example, "value_from_response") == ["Vantor"]
    assert _text_of(tokenizer, example, "answer_from_response") == ["Lise Dura"]
    # Everything else the assistant writes is format; nothing outside the assistant turns has a role.
    labelled = [i for i, r in enumerate(example.roles) if r is not None]
    assert tokenizer.decode([example.ids[i] for i in labelled]).count("<tool_call>") == 2
    assert "Question" not in tokenizer.decode([example.ids[i] for i, r in enumerate(example.roles) if r])
    assert all(r in ROLES for r in example.roles if r is not None)


def test_a_value_not_in_the_context_and_a_computed_answer(tokenizer):
    messages = [
        {"role": "user", "content": "Question: What is the combined weight of the Zuva Harp and the Kemo Bell?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("artefact_weight", {"artefact": "Zuva Harp", "max_results": 2})]},
        {"role": "tool", "content": "The Zuva Harp has a weight of 2100 grams."},
        {"role": "assistant", "content": "The answer is 5312."},
    ]  # fmt: skip
    example = label_roles(tokenizer, messages, None, answer="5312")
    assert _text_of(tokenizer, example, "value_other") == ["2"]
    assert _text_of(tokenizer, example, "answer_other") == ["5312"]
    assert _text_of(tokenizer, example, "answer_from_response") == []


def test_replaced_context_keeps_the_assistant_turns_and_tools():
    mine, donor = _hand_built(), _hand_built()
    donor[0] = {"role": "user", "content": "Question: What is the owner of the Pesa Lamp?"}
    donor[2] = {"role": "tool", "content": "The Pesa Lamp is owned by Kiro Bank."}
    del donor[3:]
    swapped = replace_context(mine, donor)
    assert swapped[0]["content"] == donor[0]["content"]
    # tool responses cycle through the donor's
    assert [m["content"] for m in swapped if m["role"] == "tool"] == [donor[2]["content"]] * 2
    assert [m for m in swapped if m["role"] == "assistant"] == [m for m in mine if m["role"] == "assistant"]


def test_donors_are_other_environments_of_the_same_scenario(build):
    records = build.test
    donors = donor_order(records, seed=0)
    for index, donor in enumerate(donors):
        assert donor != index
        assert records[donor].scenario == records[index].scenario
    assert donors == donor_order(records, seed=0)


class ScriptedLM(torch.nn.Module):
    """Knows the real conversations by heart: after a prefix it has seen, the true next token gets
    probability `q`; after any other prefix the distribution is uniform. So on the real context every
    labelled token costs exactly -ln q, and on a replaced context (unseen prefixes) ln V."""

    def __init__(self, sequences, vocab_size, q):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size, self.q = vocab_size, q
        self.next_token = {tuple(s[: t + 1]): s[t + 1] for s in sequences for t in range(len(s) - 1)}
        self.config = SimpleNamespace(pad_token_id=0)

    def forward(self, input_ids, attention_mask):
        batch, width = input_ids.shape
        other = math.log((1 - self.q) / (self.vocab_size - 1))
        logits = torch.zeros(batch, width, self.vocab_size)
        for row in range(batch):
            ids = input_ids[row].tolist()
            for t in range(width):
                target = self.next_token.get(tuple(ids[: t + 1]))
                if target is not None:
                    logits[row, t] = other
                    logits[row, t, target] = math.log(self.q)
        return SimpleNamespace(logits=logits)


def test_meter_on_a_scripted_model_with_known_nlls(build, tokenizer):
    records = [r for r in build.test if r.scenario in ("single_hop", "multi_hop")]
    with Sandbox(workers=1) as sandbox:
        conversations = oracle_conversations(records, sandbox, random.Random(0))
    meter_set = build_meter_set(tokenizer, records, conversations)
    vocab, q = len(tokenizer), 0.5
    model = ScriptedLM([e.ids for e in meter_set.real], vocab, q)
    frame = meter_frame(model, meter_set)
    table = role_table(frame).set_index("role")
    for role in (
        "format",
        "tool_kind",
        "tool_relation",
        "arg_key",
        "value_from_question",
        "value_from_response",
    ):
        assert table.loc[role, "tokens"] > 0, role
        assert table.loc[role, "nll_real"] == pytest.approx(-math.log(q), abs=1e-5)
        assert table.loc[role, "nll_replaced"] == pytest.approx(math.log(vocab), abs=1e-4)
        assert table.loc[role, "top1_real"] == 1.0
        assert table.loc[role, "gap"] == pytest.approx(math.log(vocab) + math.log(q), abs=1e-4)
    assert context_gap(frame) == pytest.approx(math.log(vocab) + math.log(q), abs=1e-4)
    # Both contexts score the same number of tokens per role.
    counts = frame.pivot_table(index="role", columns="context", values="tokens")
    assert (counts["real"] == counts["replaced"]).all()


def test_meter_gap_is_zero_for_a_model_that_ignores_its_input(build, tokenizer):
    records = build.test[:6]
    with Sandbox(workers=1) as sandbox:
        conversations = oracle_conversations(records, sandbox, random.Random(0))
    meter_set = build_meter_set(tokenizer, records, conversations)

    class Uniform(torch.nn.Module):
        config = SimpleNamespace(pad_token_id=0)

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, len(tokenizer)))

    table = role_table(meter_frame(Uniform(), meter_set)).set_index("role")
    assert table.loc["all", "nll_real"] == pytest.approx(math.log(len(tokenizer)), abs=1e-5)
    assert table["gap"].abs().max() < 1e-5


def test_meter_refuses_an_empty_set(tokenizer):
    with pytest.raises(ConfigError, match="golden calls"):
        build_meter_set(tokenizer, [], [])
