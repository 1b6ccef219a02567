"""Parameter names -> (layer, component), and the selector language shared by compare/ablate/probe."""

from __future__ import annotations

import pytest
from test_compare_support import tiny_model

from toolrl_analysis.analysis.components import (
    BLOCK_COMPONENTS,
    ParameterPart,
    band_of_layer,
    detect_family,
    map_parameter,
    map_parameters,
    parse_selector,
    select_parameters,
    selected_names,
)
from toolrl_analysis.errors import SelectorError


def shapes_of(model) -> dict:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama", "mistral", "gpt2"])
def test_every_parameter_of_real_architectures_is_placed(arch):
    mapping = map_parameters(shapes_of(tiny_model(arch, layers=3)))
    assert mapping.family == ("gpt2" if arch == "gpt2" else "llama")
    assert mapping.n_layers == 3
    assert [p.name for p in mapping.parts if p.component == "other"] == []
    in_blocks = {p.component for p in mapping.parts if p.layer is not None}
    outside = {p.component for p in mapping.parts if p.layer is None}
    expected_blocks = set(BLOCK_COMPONENTS) - ({"mlp.gate"} if arch == "gpt2" else set())
    if arch == "qwen3":
        expected_blocks |= {"norm.q", "norm.k"}
    assert in_blocks == expected_blocks
    assert outside >= {"embed", "norm.final", "lm_head"}
    for layer in range(3):
        assert {p.component for p in mapping.parts if p.layer == layer} == expected_blocks


@pytest.mark.parametrize(
    "name, layer, component, role",
    [
        ("model.embed_tokens.weight", None, "embed", "weight"),
        ("model.layers.0.self_attn.q_proj.weight", 0, "attn.q", "weight"),
        ("model.layers.0.self_attn.q_proj.bias", 0, "attn.q", "bias"),
        ("model.layers.11.self_attn.k_norm.weight", 11, "norm.k", "weight"),
        ("model.layers.2.self_attn.o_proj.weight", 2, "attn.o", "weight"),
        ("model.layers.2.mlp.gate_proj.weight", 2, "mlp.gate", "weight"),
        ("model.layers.2.mlp.down_proj.weight", 2, "mlp.down", "weight"),
        ("model.layers.2.input_layernorm.weight", 2, "norm.attn", "weight"),
        ("model.layers.2.post_attention_layernorm.weight", 2, "norm.mlp", "weight"),
        ("model.norm.weight", None, "norm.final", "weight"),
        ("lm_head.weight", None, "lm_head", "weight"),
        # Without the CausalLM wrapper, and nested in a multimodal model.
        ("layers.5.mlp.up_proj.weight", 5, "mlp.up", "weight"),
        ("model.language_model.layers.1.self_attn.v_proj.weight", 1, "attn.v", "weight"),
        # Buffers some old checkpoints carry: kept, reported as 'other' with no layer.
        ("model.layers.3.self_attn.rotary_emb.inv_freq", None, "other", "inv_freq"),
    ],
)
def test_llama_like_names(name, layer, component, role):
    [part] = map_parameter(name, family="llama")
    assert (part.layer, part.component, part.role) == (layer, component, role)


def test_gpt2_names_and_fused_qkv_split():
    assert [
        (p.layer, p.component) for p in map_parameter("transformer.h.7.mlp.c_proj.weight", (128, 32), "gpt2")
    ] == [(7, "mlp.down")]
    assert map_parameter("transformer.h.7.attn.c_proj.bias", (32,), "gpt2")[0].component == "attn.o"
    assert map_parameter("transformer.wpe.weight", (64, 32), "gpt2")[0].component == "embed.pos"
    assert map_parameter("transformer.ln_f.bias", (32,), "gpt2")[0].component == "norm.final"
    parts = map_parameter("transformer.h.0.attn.c_attn.weight", (32, 96), "gpt2")
    assert [(p.component, p.part, p.dim, p.start, p.stop) for p in parts] == [
        ("attn.q", "q", 1, 0, 32),
        ("attn.k", "k", 1, 32, 64),
        ("attn.v", "v", 1, 64, 96),
    ]
    bias_parts = map_parameter("transformer.h.0.attn.c_attn.bias", (96,), "gpt2")
    assert [(p.dim, p.start, p.stop, p.role) for p in bias_parts][1] == (0, 32, 64, "bias")
    import torch

    weight = torch.arange(32 * 96).reshape(32, 96)
    assert torch.equal(parts[2].take(weight), weight[:, 64:])
    assert parts[2].label == "transformer.h.0.attn.c_attn.weight[v]"


@pytest.mark.parametrize(
    "name, layer, component",
    [
        ("gpt_neox.layers.0.attention.query_key_value.weight", 0, "attn.qkv"),
        ("gpt_neox.layers.0.attention.dense.weight", 0, "attn.o"),
        ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight", 0, "mlp.up"),
        ("gpt_neox.layers.0.mlp.dense_4h_to_h.bias", 0, "mlp.down"),
        ("gpt_neox.layers.0.input_layernorm.weight", 0, "norm.attn"),
        ("gpt_neox.embed_in.weight", None, "embed"),
        ("gpt_neox.final_layer_norm.weight", None, "norm.final"),
        ("embed_out.weight", None, "lm_head"),
        ("model.layers.1.self_attn.qkv_proj.weight", 1, "attn.qkv"),  # Phi-3
        ("model.layers.1.mlp.gate_up_proj.weight", 1, "mlp.gate_up"),
        ("layers.4.attention.wq.weight", 4, "attn.q"),  # Meta's original Llama names
        ("layers.4.feed_forward.w1.weight", 4, "mlp.gate"),
        ("layers.4.feed_forward.w2.weight", 4, "mlp.down"),
        ("layers.4.ffn_norm.weight", 4, "norm.mlp"),
        ("tok_embeddings.weight", None, "embed"),
        ("encoder.blocks.3.attn.out_proj.weight", 3, "attn.o"),
        ("encoder.blocks.3.frobnicator.weight", None, "other"),
        ("some.unknown.thing", None, "other"),
    ],
)
def test_generic_fallback(name, layer, component):
    [part] = map_parameter(name)
    assert (part.layer, part.component) == (layer, component)


def test_detect_family():
    assert detect_family(["model.layers.0.self_attn.q_proj.weight"]) == "llama"
    assert detect_family(["transformer.h.0.attn.c_attn.weight"]) == "gpt2"
    assert detect_family(["gpt_neox.layers.0.attention.dense.weight"]) == "generic"


# ---------------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------------
def layers_of(text: str, n_layers: int = 8, component: str = "mlp.down") -> set:
    selector = parse_selector(text, n_layers)
    return {layer for layer in range(n_layers) if selector.matches(layer, component)}


@pytest.mark.parametrize(
    "text, layers",
    [
        ("mlp@0-2", {0, 1, 2}),
        ("mlp.down@-4:", {4, 5, 6, 7}),
        ("mlp@lower", {0, 1, 2}),  # the thirds of band_layers: 0 .. round(8/3)=3 exclusive
        ("mlp@upper", {5, 6, 7}),
        ("mlp@middle", {3, 4}),  # round(8/3)=3 .. round(16/3)=5 exclusive
        ("mlp@3", {3}),
        ("mlp@-1", {7}),
        ("mlp@-3--2", {5, 6}),
        ("mlp@2:5", {2, 3, 4}),
        ("mlp@:2", {0, 1}),
        ("mlp@6:", {6, 7}),
        ("mlp@all", set(range(8))),
        ("mlp.down", set(range(8))),
        ("mlp@0, mlp@7", {0, 7}),
        ("all", set(range(8))),
        ("*@1", {1}),
        ("@5", {5}),
        ("attn", set()),
        ("mlp.*@1", {1}),
        ("mlp.d*@1", {1}),
    ],
)
def test_selector_layers(text, layers):
    assert layers_of(text) == layers


def test_selector_components_and_outside_parameters():
    selector = parse_selector("attn.*@lower, embed", 4)
    assert selector.matches(0, "attn.q") and selector.matches(0, "attn.o")  # lower: the first third, block 0
    assert not selector.matches(1, "attn.q") and not selector.matches(0, "mlp.up")
    assert selector.matches(None, "embed") and selector.matches(None, "embed.pos")
    assert not selector.matches(None, "lm_head")
    # A layer spec only matches parameters inside blocks.
    assert not parse_selector("embed@0", 4).matches(None, "embed")
    assert parse_selector("norm", 4).matches(None, "norm.final") and parse_selector("norm", 4).matches(
        2, "norm.q"
    )
    assert str(selector) == "attn.*@lower, embed"


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty selector"),
        ("mlp@0,,attn", "empty term"),
        ("mpl@0-2", "unknown component 'mpl'"),
        ("mlp@abc", "bad layer spec 'abc'"),
        ("mlp@9", "layer 9 .* out of range: the model has 8 blocks"),
        ("mlp@-9", "layer -9 .* out of range"),
        ("mlp@5-2", "runs backwards"),
        ("mlp@5:2", "selects no layers"),
        ("mlp@0-20", "layer 20 .* out of range"),
    ],
)
def test_bad_selectors(text, message):
    with pytest.raises(SelectorError, match=message) as info:
        parse_selector(text, 8)
    assert "\n" not in str(info.value)


def test_selector_selecting_nothing_is_an_error():
    shapes = shapes_of(tiny_model("qwen2", layers=2))
    with pytest.raises(SelectorError, match="selects no parameters"):
        select_parameters("norm.q", shapes)  # Qwen2 has no q_norm
    with pytest.raises(SelectorError, match="no numbered blocks"):
        parse_selector("mlp@0", 0)


def test_selecting_names_from_a_mapping():
    model = tiny_model("gpt2", layers=4)
    shapes = shapes_of(model)
    names = selected_names("mlp.down@-2:, attn.q@0", shapes)
    assert names == [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_attn.bias",
        "transformer.h.2.mlp.c_proj.weight",
        "transformer.h.2.mlp.c_proj.bias",
        "transformer.h.3.mlp.c_proj.weight",
        "transformer.h.3.mlp.c_proj.bias",
    ]
    parts = select_parameters("attn.q@0", shapes)
    assert all(isinstance(p, ParameterPart) and p.part == "q" for p in parts)
    frame = map_parameters(shapes).to_frame()
    assert {"name", "part", "layer", "component", "role"} <= set(frame.columns)


def test_bands_are_thirds():
    assert [band_of_layer(i, 28) for i in (0, 8, 9, 18, 19, 27)] == [
        "lower",
        "lower",
        "middle",
        "middle",
        "upper",
        "upper",
    ]
    assert [band_of_layer(i, 4) for i in range(4)] == ["lower", "middle", "middle", "upper"]
    # one definition: the selectors name exactly the blocks of each band, at every depth
    for n_layers in (1, 2, 3, 4, 5, 7, 24, 28):
        for band in ("lower", "middle", "upper"):
            in_band = {i for i in range(n_layers) if band_of_layer(i, n_layers) == band}
            if in_band:
                assert layers_of(f"mlp@{band}", n_layers) == in_band
