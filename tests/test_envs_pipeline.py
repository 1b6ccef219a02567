"""`envs build`: files, FTRL compatibility, determinism, split disjointness, integration and scaling."""

import json
from pathlib import Path

import pytest
from conftest import FTRL_TEST_SET as FTRL_TEST

from toolrl_analysis import cli
from toolrl_analysis.envs.decompose import FTRL_PROMPT
from toolrl_analysis.envs.schema import FTRL_FIELDS, SCENARIOS, read_envs

REPO = Path(__file__).resolve().parents[1]

SMALL = ["--set", "train_size=20", "--set", "test_per_scenario=2", "--set", "validation_per_scenario=2",
         "--set", "same_world_test_per_scenario=2", "--set", "train_worlds=5", "--set", "analysis_per_scenario=3"]  # fmt: skip


def build(out: Path, *extra: str) -> dict:
    return run_json(["envs", "build", "--out", str(out), *SMALL, *extra])


def run_json(argv: list[str]) -> dict:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert cli.main([*argv, "--json"]) == 0
    return json.loads(buffer.getvalue())


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("envs")
    document = build(out)
    return out, document["manifest"]


def exec_tools(record) -> dict:
    namespace: dict = {}
    for code in record.codes.values():
        exec(code, namespace)
    return namespace


def test_build_writes_every_split_with_the_configured_counts(small):
    out, manifest = small
    assert sorted(p.name for p in out.iterdir()) == [
        "analysis.jsonl", "manifest.json", "test.jsonl", "test_same_world.jsonl", "train.jsonl", "validation.jsonl",
    ]  # fmt: skip
    train, test = read_envs(out / "train.jsonl"), read_envs(out / "test.jsonl")
    assert len(train) == 20 and len(test) == 8
    for split in ("test", "test_same_world", "validation"):
        assert manifest["counts"][split] == {s: 2 for s in SCENARIOS}
    assert manifest["counts"]["analysis"] == {s: 3 for s in SCENARIOS}
    assert sum(manifest["counts"]["train"].values()) == 20
    assert {r.split for r in train} == {"train"} and {r.split for r in test} == {"test"}
    assert len(manifest["worlds"]["train"]) == 5 and manifest["worlds"]["train"][0] == "0"
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["files"]["test"]["records"] == 8 and on_disk["files"]["validation"]["records"] == 8
    assert on_disk["integration"]["documents"] >= on_disk["integration"]["tools"]


def test_records_use_ftrl_encoding_and_prompt(small):
    out, _ = small
    first = json.loads((out / "test.jsonl").read_text().splitlines()[0])
    assert list(first)[: len(FTRL_FIELDS)] == list(FTRL_FIELDS)
    assert all(isinstance(first[k], str) for k in ("tools", "codes", "unsolved_set"))
    assert first["messages"][0]["content"].startswith(FTRL_PROMPT)
    if FTRL_TEST.is_file():
        ftrl = json.loads(FTRL_TEST.read_text().splitlines()[0])
        assert ftrl["messages"][0]["content"].startswith(FTRL_PROMPT)
        assert list(ftrl) == list(first)[: len(FTRL_FIELDS)]


def test_every_record_is_consistent_and_its_golden_calls_answer_it(small):
    out, _ = small
    for record in read_envs(out / "train.jsonl") + read_envs(out / "test.jsonl"):
        meta = record.meta
        names = record.tool_names
        assert names == list(record.codes) and len(set(names)) == len(names)
        assert set(record.unsolved_set) <= set(names)
        assert not set(meta["distractors"]) & set(record.unsolved_set) and meta["distractors"]
        assert meta["tools"] == len(record.unsolved_set) and meta["documents"] == record.n_subquestions
        assert record.data_source == f"self/{meta['scenario']}" and record.solve_rate == 0.0
        for tool in record.tools:
            params = tool["function"]["parameters"]
            assert set(params["required"]) <= set(params["properties"])
        assert sorted(i for turn in meta["golden_turns"] for i in turn) == list(range(record.n_subquestions))
        tools = exec_tools(record)
        for sq in meta["subquestions"]:
            output = tools[sq["tool"]](**sq["arguments"])
            assert sq["answer"] in output and sq["answer"] in record.unsolved_set[sq["tool"]]
            if sq["depends_on"] is not None:
                previous = meta["subquestions"][sq["depends_on"]]
                assert previous["answer"] == sq["subject"]
                assert sq["argument_from_answer"] in sq["arguments"]


def test_wrong_calls_return_errors_and_never_raise(small):
    out, _ = small
    for record in read_envs(out / "test.jsonl"):
        tools = exec_tools(record)
        for name in record.codes:
            subject = name.split("_")[0]
            for arguments in (
                {},
                {"nonsense": 1},
                {subject: "Nobody Here"},
                {subject: 42},
                {subject: ["Nobody"], "field": ["x"]},
                {subject: {"name": 3}, "language": None, "max_results": "many"},
            ):
                output = tools[name](**arguments)
                assert isinstance(output, str) and output
                assert output.startswith(("Error:", "No record found")), output
                assert not any(a in output for a in record.unsolved_set.get(name, []))


def test_same_seed_same_bytes_and_different_seed_different_files(small, tmp_path):
    out, _ = small
    again = tmp_path / "again"
    build(again)
    for name in ("train.jsonl", "test.jsonl", "manifest.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    other = tmp_path / "other"
    build(other, "--seed", "1")
    assert (other / "train.jsonl").read_bytes() != (out / "train.jsonl").read_bytes()
    assert json.loads((other / "manifest.json").read_text())["seed"] == 1


def test_train_and_test_share_no_question(small):
    out, _ = small
    train, test = read_envs(out / "train.jsonl"), read_envs(out / "test.jsonl")

    def key(record):
        chains = {}
        for sq in record.meta["subquestions"]:
            chains.setdefault(sq["chain"], []).append((sq["subject"], sq["relation"]))
        return (record.scenario, tuple(sorted(tuple(c) for c in chains.values())))

    assert not {r.question for r in train} & {r.question for r in test}
    assert not {key(r) for r in train} & {key(r) for r in test}


def test_all_scaling_operations_and_integration_show_in_records_and_manifest(tmp_path):
    manifest = build(
        tmp_path,
        "--set",
        "functional_generalisation=1",
        "--set",
        "parameter_expansion=1",
        "--set",
        "parameter_type_generalisation=1",
    )["manifest"]
    counts = manifest["scaling"]["environments"]
    assert all(counts[op]["train"] + counts[op]["test"] > 0 for op in counts)
    assert manifest["integration"]["merges"] > 0
    assert manifest["integration"]["tools"] < manifest["integration"]["documents"]
    records = read_envs(tmp_path / "train.jsonl")
    types = set()
    for record in records:
        assert "parameter_type_generalisation" in record.meta["scaling"]
        for tool in record.tools:
            props = tool["function"]["parameters"]["properties"]
            types.add(next(iter(props.values()))["type"])
        assert any(len(tool["function"]["parameters"]["properties"]) > 2 for tool in record.tools)
    assert {"array", "object", "string"} <= types


def test_no_integration_keeps_one_tool_per_distinct_document(tmp_path):
    manifest = build(tmp_path, "--set", "merge_prob=0", "--set", "functional_generalisation=0")["manifest"]
    assert manifest["integration"]["merges"] == 0
    assert manifest["integration"]["tools"] == manifest["integration"]["distinct_documents"]


def test_tool_counts_stay_within_max_tools_with_at_least_one_distractor(tmp_path):
    manifest = build(tmp_path, "--set", "max_tools=4", "--set", "distractors_min=3")["manifest"]
    for record in read_envs(tmp_path / "train.jsonl"):
        assert len(record.meta["distractors"]) >= 1
        assert len(record.tools) <= max(4, record.meta["tools"] + 1)
    assert manifest["tools_per_environment"]["distractors"]["min"] >= 1


def test_samples_are_what_the_default_config_builds(tmp_path):
    """envs/samples holds the first test environment of each scenario; regenerate it when generation changes."""
    from toolrl_analysis.config import load_config
    from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, write_samples

    config = load_config(EnvBuildConfig, None, ["train_size=0"])
    written = write_samples(build_envsets(config).test, tmp_path)
    assert [p.name for p in written] == [f"{s}.json" for s in SCENARIOS]
    for path in written:
        assert path.read_text() == (REPO / "envs" / "samples" / path.name).read_text(), path.name


def entity_names(record) -> set[str]:
    """The entities a record's questions are about and answer with (numbers left out)."""
    names = set()
    for sub in record.meta["subquestions"]:
        names.add(sub["subject"])
        if not str(sub["answer"]).isdigit():
            names.add(str(sub["answer"]))
    return names


def test_held_out_splits_share_no_entity_with_train_and_the_same_world_split_does(small):
    out, _ = small
    train_text = (out / "train.jsonl").read_text(encoding="utf-8").lower()
    held_out = {split: read_envs(out / f"{split}.jsonl") for split in ("test", "validation")}
    for split, records in held_out.items():
        names = set().union(*(entity_names(r) for r in records))
        assert len(names) > 20
        assert not [n for n in names if n.lower() in train_text], split  # not as a name, nor inside one
    # test and validation come from different held-out worlds as well
    test_names = set().union(*(entity_names(r) for r in held_out["test"]))
    validation_text = (out / "validation.jsonl").read_text(encoding="utf-8").lower()
    assert not [n for n in test_names if n.lower() in validation_text]
    # the same-world split asks new questions about the training worlds' entities
    from toolrl_analysis.envs.pipeline import EnvBuildConfig, split_worlds

    worlds = split_worlds(EnvBuildConfig(**json.loads((out / "manifest.json").read_text())["config"]))
    train_world_names = {n for w in worlds["train"] for n in w.names()}
    same = read_envs(out / "test_same_world.jsonl")
    assert set().union(*(entity_names(r) for r in same)) <= train_world_names
    assert not set().union(*(entity_names(r) for r in held_out["test"])) & train_world_names
    train_questions = {r.question for r in read_envs(out / "train.jsonl")}
    assert not train_questions & {r.question for r in same}


def test_the_default_build_keeps_its_headline_test_split_out_of_the_training_worlds():
    """At the shipped sizes (50 training worlds), every test environment's entities are new to train."""
    from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets

    built = build_envsets(
        EnvBuildConfig(test_per_scenario=5, validation_per_scenario=0, same_world_test_per_scenario=0)
    )
    train_names = {n.lower() for r in built.train for n in entity_names(r)}
    test_names = {n.lower() for r in built.test for n in entity_names(r)}
    assert len(built.train) == 2000 and len({w for w in built.manifest["worlds"]["train"]}) == 50
    assert not test_names & train_names
    assert not [t for t in test_names if any(t in n or n in t for n in train_names)]
