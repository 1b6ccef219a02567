"""General-capability material for the embedded policy, the offline stand-in for MMLU/BBH/GSM8K.

(a) `general_text`: prose that is not tool use, taken from the docstrings of a fixed list of standard-library
    modules (no download), split deterministically into a training portion (warm-up mixture, tokenizer corpus)
    and a held-out portion (language-modelling loss). Docstrings come from the running interpreter, so the
    text is identical for a given Python version.
(b) `general_tasks`: short chat tasks with exact-match answers (arithmetic, copying, reversing, counting) that
    the base model learns in warm-up; train and test instances are disjoint by construction.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import zlib
from typing import Any

SPLITS = ("train", "heldout")
TASK_SPLITS = ("train", "test")

# Sorted, import-safe modules with substantial prose; nothing that opens windows, browsers or network sockets.
STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "base64", "bisect", "calendar", "cmath", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "enum", "filecmp", "fnmatch", "fractions", "functools", "getopt", "gettext", "glob", "graphlib", "gzip",
    "hashlib", "heapq", "hmac", "html", "html.parser", "http", "http.client", "inspect", "io", "ipaddress",
    "itertools", "json", "keyword", "linecache", "locale", "logging", "lzma", "mailbox", "math", "mimetypes",
    "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "pprint",
    "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "signal", "smtplib", "socket", "statistics", "string", "struct", "subprocess", "symtable", "tarfile",
    "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "trace", "traceback", "types", "typing",
    "unicodedata", "urllib.parse", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zlib", "zoneinfo",
)  # fmt: skip
MAX_DOC_CHARS = 1500  # one docstring, cut at a paragraph: long reference tables add little
MAX_MODULE_CHARS = 6000  # so that the big modules (typing, os) do not dominate
HELDOUT_EVERY = 8  # about one document in eight is held out, chosen by a hash of its name


def _stable_bucket(key: str, modulus: int) -> int:
    return zlib.crc32(key.encode("utf-8")) % modulus


def _clip(doc: str, limit: int = MAX_DOC_CHARS) -> str:
    if len(doc) <= limit:
        return doc
    cut = doc.rfind("\n\n", 0, limit)
    return doc[: cut if cut > limit // 3 else limit].rstrip()


def _member_docs(module: Any) -> list[tuple[str, str]]:
    """(qualified name, docstring) for the module and its public functions, classes and their methods."""
    docs = []
    module_doc = inspect.getdoc(module)
    if module_doc:
        docs.append((module.__name__, module_doc))
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) not in (module.__name__, "builtins"):
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        doc = inspect.getdoc(obj)
        if doc:
            docs.append((f"{module.__name__}.{name}", doc))
        if inspect.isclass(obj):
            for method_name, method in sorted(vars(obj).items()):
                if method_name.startswith("_") or not inspect.isroutine(method):
                    continue
                method_doc = inspect.getdoc(method)
                if method_doc:
                    docs.append((f"{module.__name__}.{name}.{method_name}", method_doc))
    return docs


@functools.lru_cache(maxsize=1)
def _documents_by_split() -> dict[str, list[str]]:
    per_module: dict[str, list[list[str]]] = {split: [] for split in SPLITS}
    for module_name in STDLIB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a stripped-down Python build; the rest still gives plenty of text
            continue
        chosen: dict[str, list[str]] = {split: [] for split in SPLITS}
        used = 0
        seen_docs: set[str] = set()
        for qualname, doc in _member_docs(module):
            if used >= MAX_MODULE_CHARS or doc in seen_docs:
                continue
            seen_docs.add(doc)  # aliases (e.g. os.stat_result and posix.stat_result) share one docstring
            text = f"{qualname}\n{_clip(doc)}"
            split = "heldout" if _stable_bucket(qualname, HELDOUT_EVERY) == 0 else "train"
            chosen[split].append(text)
            used += len(text)
        for split in SPLITS:
            per_module[split].append(chosen[split])
    # Interleave modules round-robin so that any max_chars prefix still covers many modules.
    out: dict[str, list[str]] = {}
    for split in SPLITS:
        columns = per_module[split]
        depth = max((len(c) for c in columns), default=0)
        out[split] = [column[i] for i in range(depth) for column in columns if i < len(column)]
    return out


def general_text(split: str = "train", max_chars: int | None = None) -> list[str]:
    """Documents (a qualified name line, then its docstring) of the given split, at most `max_chars` in total."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    documents = _documents_by_split()[split]
    if max_chars is None:
        return list(documents)
    kept, total = [], 0
    for document in documents:
        if total + len(document) > max_chars:
            break
        kept.append(document)
        total += len(document)
    return kept


# -- short tasks with exact-match answers --------------------------------------------------------------------

WORDS = (
    "apple", "river", "stone", "cloud", "green", "table", "music", "light", "paper", "house", "water", "smile",
    "tiger", "bread", "chair", "ocean", "plant", "train", "happy", "storm", "glass", "sugar", "night", "horse",
    "dance", "money", "beach", "field", "dream", "candle", "garden", "window", "forest", "silver", "rocket",
    "planet", "bottle", "basket", "market", "winter", "summer", "spring", "autumn", "castle", "pencil", "button",
    "island", "bridge", "copper", "yellow", "orange", "purple", "mirror", "monkey", "rabbit", "turtle", "violin",
    "guitar", "jacket", "pocket", "ticket", "shadow", "feather", "thunder", "blanket", "kitchen", "library",
    "diamond", "lantern", "harbor", "meadow", "canyon", "desert", "valley", "marble", "velvet", "cotton", "cherry",
    "lemon", "mango", "peach", "grape", "melon", "olive", "pepper", "honey", "salt", "rice", "corn", "bean",
    "cat", "dog", "owl", "fox", "bee", "ant", "cow", "pig", "hen", "elk", "red", "blue", "gold", "pink",
    "north", "south", "east", "west", "king", "queen", "knight", "tower", "gate", "road", "path", "lake",
)  # fmt: skip
TASK_KINDS = ("add", "subtract", "multiply", "repeat", "reverse_word", "reverse_list", "count_words")


def _make_task(kind: str, rng: random.Random) -> tuple[str, str]:
    if kind == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"What is {a} + {b}?", str(a + b)
    if kind == "subtract":
        a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
        return f"What is {a} - {b}?", str(a - b)
    if kind == "multiply":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {a} * {b}?", str(a * b)
    if kind == "repeat":
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        return f"Repeat exactly: {words}", words
    if kind == "reverse_word":
        word = rng.choice(WORDS)
        return f"Reverse the letters of: {word}", word[::-1]
    if kind == "reverse_list":
        items = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6))]
        return f"Reverse the list: {', '.join(items)}", ", ".join(reversed(items))
    if kind == "count_words":
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 7)))
        return f"How many words are in: {words}", str(len(words.split()))
    raise ValueError(f"unknown task kind {kind!r}")


def task_split(question: str) -> str:
    """The split an instance belongs to, a function of its text alone: train and test can never share one."""
    return "test" if _stable_bucket(question, 5) == 0 else "train"


def general_tasks(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """`n` distinct tasks: {"messages": [user turn], "answer": str, "kind": str}, the same for the same seed."""
    if split not in TASK_SPLITS:
        raise ValueError(f"split must be one of {TASK_SPLITS}, got {split!r}")
    rng = random.Random(f"general-tasks/{seed}")
    tasks, seen = [], set()
    attempts = 0
    while len(tasks) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct {split} tasks")
        kind = rng.choice(TASK_KINDS)
        question, answer = _make_task(kind, rng)
        if question in seen or task_split(question) != split:
            continue
        seen.add(question)
        tasks.append({"messages": [{"role": "user", "content": question}], "answer": answer, "kind": kind})
    return tasks


def task_chat(task: dict[str, Any]) -> list[dict[str, Any]]:
    """The task as a complete chat (user, then the assistant giving the answer), for supervised warm-up."""
    return [*task["messages"], {"role": "assistant", "content": task["answer"]}]


def exact_match(prediction: str, answer: str) -> bool:
    """Whitespace and a final full stop do not count; everything else must match."""
    return prediction.strip().rstrip(".").strip() == answer.strip()
