"""Stage 6: localized deployment. Each tool becomes standalone Python source (standard library only).

The function validates its arguments like FTRL's released tools do and *returns* a message for every
wrong call ("Error: 'person' is a required parameter...", "No record found for ..."); it never raises,
and it accepts unknown keyword arguments only to name them in an error. A correct call returns the
fact inside one plain sentence, with the answer verbatim. The lookup table embeds the facts the
environment needs plus a few neighbouring records, chosen so that no neighbour's fact equals a gold
answer (a wrong call must not solve a sub-question by accident).
"""

from __future__ import annotations

import random

from toolrl_analysis.envs.documents import ToolSpec
from toolrl_analysis.envs.world import World


def lookup_records(
    spec: ToolSpec,
    world: World,
    subjects: list[str],
    rng: random.Random,
    neighbours: int,
    avoid_values: set[str],
) -> dict[str, dict[str, str]]:
    """Facts for `subjects` plus up to `neighbours` other entities of the kind, sorted by name."""
    chosen = list(dict.fromkeys(subjects))
    pool = [e for e in world.entities[spec.kind] if e not in chosen and e not in avoid_values]
    rng.shuffle(pool)
    for name in pool:
        if len(chosen) >= len(subjects) + neighbours:
            break
        if any(world.value(spec.kind, key, name) in avoid_values for key in spec.relations):
            continue
        chosen.append(name)
    return {
        name: {key: world.value(spec.kind, key, name) for key in spec.relations} for name in sorted(chosen)
    }


def _literal(value: object) -> str:
    return repr(value)


def tool_source(spec: ToolSpec, records: dict[str, dict[str, str]]) -> str:
    """The Python source of `spec`'s function, with `records` embedded."""
    subject = spec.subject_param
    params = [f"{subject}=None"] + (["field=None"] if spec.selector else [])
    params += [f"{e.name}={_literal(e.default)}" for e in spec.extras] + ["**unexpected"]
    sentences = {r.key: r.sentence for r in spec.relation_objects}
    valid = ", ".join(spec.parameter_names)
    article = "the " if spec.kind == "artefact" else ""
    lines = [
        f"def {spec.name}({', '.join(params)}):",
        f'    """{spec.description()}',
        "",
        "    Parameters:",
    ]
    lines += [f"    - {name}: {_doc_of(spec, name)}" for name in spec.parameter_names]
    lines += ['    """', "    records = {"]
    lines += [f"        {_literal(name)}: {_literal(facts)}," for name, facts in records.items()]
    lines += ["    }", f"    sentences = {_literal(sentences)}"]
    lines += [
        "    if unexpected:",
        "        name = sorted(unexpected)[0]",
        f'        return "Error: unknown parameter \'" + name + "\' for {spec.name}. Valid parameters are: {valid}."',
        f"    if {subject} is None:",
        f"        return \"Error: '{subject}' is a required parameter. Please provide {_expects(spec)}.\"",
    ]
    lines += _subject_checks(spec)
    if spec.selector:
        choices = ", ".join(spec.relations)
        lines += [
            "    if field is None:",
            f"        return \"Error: 'field' is a required parameter. Choose one of: {choices}.\"",
            "    if not isinstance(field, str) or field not in sentences:",
            f"        return \"Error: 'field' must be one of: {choices} (got '\" + str(field)[:40] + \"').\"",
            "    key = field",
        ]
    else:
        lines.append(f"    key = {_literal(spec.relations[0])}")
    for extra in spec.extras:
        lines += _extra_check(extra)
    lines += [
        "    index = {' '.join(k.lower().split()): k for k in records}",
        "    out = []",
        "    for asked in names:",
        "        wanted = ' '.join(asked.lower().split())",
        "        if wanted.startswith('the '):",
        "            wanted = wanted[4:]",
        "        found = index.get(wanted)",
        "        if found is None:",
        f'            out.append("No record found for {spec.kind} \'" + asked[:60] + "\'. Check the spelling of the name.")',
        "            continue",
        f"        text = sentences[key].format(subject={_literal(article) + ' + ' if article else ''}found, value=records[found][key])",
        "        out.append(text[0].upper() + text[1:])",
    ]
    if any(e.name == "include_source" for e in spec.extras):
        lines += ["    if include_source:", f"        out.append('Source: {spec.kind} registry.')"]
    if any(e.name == "detail" for e in spec.extras):
        lines += [
            "    if detail == 'full':",
            f"        out.append('This entry was checked against the {spec.kind} archive.')",
        ]
    lines += ["    return ' '.join(out)", ""]
    return "\n".join(lines)


def _doc_of(spec: ToolSpec, name: str) -> str:
    if name == spec.subject_param:
        return spec.subject_schema()["description"]
    if name == "field":
        return "Which fact to return: " + ", ".join(spec.relations) + "."
    extra = next(e for e in spec.extras if e.name == name)
    return f"{extra.description} Optional, default {extra.default!r}."


def _expects(spec: ToolSpec) -> str:
    words = {"person": "person", "place": "place", "organisation": "organisation", "artefact": "artefact"}[
        spec.kind
    ]
    if spec.subject_type == "list":
        return f"a list of names, e.g. ['name of the {words}']"
    if spec.subject_type == "object":
        return f"an object like {{'name': 'name of the {words}'}}"
    return f"the name of the {words}"


def _subject_checks(spec: ToolSpec) -> list[str]:
    s = spec.subject_param
    if spec.subject_type == "list":
        return [
            f"    if not isinstance({s}, list) or not {s} or not all(isinstance(x, str) and x.strip() for x in {s}):",
            f"        return \"Error: '{s}' must be a non-empty list of names, e.g. ['name of the {s}'].\"",
            f"    names = {s}",
        ]
    if spec.subject_type == "object":
        return [
            f"    if not isinstance({s}, dict) or not isinstance({s}.get('name'), str) or not {s}['name'].strip():",
            f"        return \"Error: '{s}' must be an object with a 'name' string, e.g. {{'name': 'name of the {s}'}}.\"",
            f"    names = [{s}['name']]",
        ]
    return [
        f"    if not isinstance({s}, str) or not {s}.strip():",
        f"        return \"Error: '{s}' must be a non-empty string (the name of the {s}).\"",
        f"    names = [{s}]",
    ]


def _extra_check(extra) -> list[str]:
    n = extra.name
    if extra.enum is not None:
        choices = ", ".join(extra.enum)
        return [
            f"    if {n} not in {_literal(extra.enum)}:",
            f"        return \"Error: '{n}' must be one of: {choices} (got '\" + str({n})[:40] + \"').\"",
        ]
    if extra.type == "boolean":
        return [
            f"    if not isinstance({n}, bool):",
            f"        return \"Error: '{n}' must be true or false.\"",
        ]
    return [
        f"    if type({n}) is not int or not {extra.minimum} <= {n} <= {extra.maximum}:",
        f"        return \"Error: '{n}' must be an integer between {extra.minimum} and {extra.maximum}.\"",
    ]
