"""Text for the causal-LM example and benchmark (issue 27), from Debian packages, offline.

- General text to keep: `python3.11-doc` (reStructuredText sources of the Python docs) and `jargon-text` (the
  Jargon File). Held-out and anchor text come from disjoint files (python docs) or disjoint halves (jargon).
- A new task: `fortunes` (`/usr/share/games/fortunes/<category>`, entries separated by lines `%`): classify an
  entry's topic, scored by the log-probability of each category's label after a prompt.

Every loader raises `MissingDataError` naming the Debian package to install when its files are absent.
"""

from __future__ import annotations

import gzip
import html
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

PYTHON_DOC_DIR = Path(os.environ.get("PYTHON_DOC_DIR", "/usr/share/doc/python3.11/html/_sources"))
JARGON_FILE = Path(os.environ.get("JARGON_FILE", "/usr/share/doc/jargon-text/jargon.txt.gz"))
FORTUNES_DIR = Path(os.environ.get("FORTUNES_DIR", "/usr/share/games/fortunes"))
FORTUNE_TOPICS = ("computers", "food", "law", "love", "sports")
PROMPT = "Fortune: {text}\nTopic:"


class MissingDataError(FileNotFoundError):
    """Data files absent: the message names the Debian package and the install command."""


def _missing(what: str, where: Path, package: str) -> MissingDataError:
    return MissingDataError(
        f"{what} not found at {where}: install the Debian package `{package}` (apt-get install -y {package}; "
        f"without root: apt-get download {package} && dpkg-deb -x {package}_*.deb DIR, then point the environment "
        "variable at DIR's copy)"
    )


def python_doc_files(root: str | Path | None = None) -> list[Path]:
    """The `.rst.txt` sources of the Python docs, sorted (package `python3.11-doc`; env `PYTHON_DOC_DIR`)."""
    root = Path(root) if root is not None else PYTHON_DOC_DIR
    files = sorted(root.rglob("*.rst.txt")) if root.is_dir() else []
    if not files:
        raise _missing("the Python documentation sources (*.rst.txt)", root, "python3.11-doc")
    return files


def _prose(text: str) -> str:
    """reStructuredText with directive lines, markup and code blocks' indentation dropped: paragraphs of prose."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip() and not re.fullmatch(r"[=\-~^*#+\"'`]+", line)]
        if not lines or lines[0].startswith((" ", "\t", "..", ">>>", "*" * 3)):
            continue
        joined = " ".join(line.strip() for line in lines)
        joined = re.sub(r":[a-z:]+:`~?([^`<]+?)(?:\s*<[^>]*>)?`", r"\1", joined)
        joined = joined.replace("``", "").replace("`", "").replace("**", "")
        if len(joined) > 80 and "." in joined:
            paragraphs.append(joined)
    return "\n\n".join(paragraphs)


def python_doc_texts(split: str, root: str | Path | None = None, max_chars: int = 200_000) -> list[str]:
    """Prose paragraphs of the Python docs: `split="heldout"` the tutorial and FAQ, `"anchor"` the how-tos and
    library reference (disjoint files), at most `max_chars` characters in all."""
    files = python_doc_files(root)
    if split == "heldout":
        chosen = [f for f in files if f.parent.name in ("tutorial", "faq")]
    elif split == "anchor":
        chosen = [f for f in files if f.parent.name in ("howto", "library")]
    else:
        raise ValueError(f"split={split!r}: use 'heldout' or 'anchor'")
    texts, total = [], 0
    for path in chosen:
        prose = _prose(path.read_text(encoding="utf-8", errors="replace"))
        if prose:
            texts.append(prose)
            total += len(prose)
        if total >= max_chars:
            break
    return texts


def jargon_texts(split: str, path: str | Path | None = None, max_chars: int = 200_000) -> list[str]:
    """Entries of the Jargon File (package `jargon-text`; env `JARGON_FILE`): `split="heldout"` the entries at
    even positions, `"anchor"` the odd ones (after the front matter), at most `max_chars` characters."""
    path = Path(path) if path is not None else JARGON_FILE
    if not path.exists():
        raise _missing("the Jargon File", path, "jargon-text")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        raw = handle.read()
    if path.suffix in (".html", ".htm"):
        raw = html.unescape(re.sub(r"<[^>]+>", "", raw))
    entries = [re.sub(r"\s+", " ", e).strip() for e in re.split(r"\n\s*(?=:[^:\n]+:)", raw)]
    entries = [e.replace("{", "").replace("}", "") for e in entries]
    entries = [e for e in entries if e.startswith(":") and len(e) > 80]
    if split not in ("heldout", "anchor"):
        raise ValueError(f"split={split!r}: use 'heldout' or 'anchor'")
    chosen = entries[0::2] if split == "heldout" else entries[1::2]
    texts, total = [], 0
    for entry in chosen:
        texts.append(entry)
        total += len(entry)
        if total >= max_chars:
            break
    return texts


def read_fortunes(category: str, root: str | Path | None = None) -> list[str]:
    """The entries of one fortunes category file (package `fortunes`; env `FORTUNES_DIR`), whitespace-normalised."""
    root = Path(root) if root is not None else FORTUNES_DIR
    path = root / category
    if not path.exists():
        raise _missing(f"fortunes category {category!r}", path, "fortunes")
    text = path.read_text(encoding="utf-8", errors="replace")
    entries = [re.sub(r"\s+", " ", e).strip() for e in re.split(r"^%\s*$", text, flags=re.MULTILINE)]
    return [e for e in entries if e]


@dataclass
class FortuneTask:
    """Topic classification of fortunes: `splits[name]` is a list of (text, label index); `labels` the topics."""

    labels: tuple[str, ...]
    splits: dict[str, list[tuple[str, int]]]

    def prompt(self, text: str) -> str:
        return PROMPT.format(text=text)


def fortune_task(
    topics: tuple[str, ...] = FORTUNE_TOPICS,
    train_per_topic: int = 30,
    validation_per_topic: int = 10,
    test_per_topic: int = 15,
    max_chars: int = 160,
    seed: int = 0,
    root: str | Path | None = None,
) -> FortuneTask:
    """Balanced train/validation/test splits of short fortunes (at most `max_chars` characters) per topic.

    A topic with fewer short entries than the three splits need is refused naming it."""
    rng = random.Random(seed)
    need = train_per_topic + validation_per_topic + test_per_topic
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "validation": [], "test": []}
    for index, topic in enumerate(topics):
        entries = sorted({e for e in read_fortunes(topic, root) if len(e) <= max_chars})
        if len(entries) < need:
            raise ValueError(
                f"fortunes topic {topic!r} has {len(entries)} entries of <= {max_chars} chars, needs {need}"
            )
        rng.shuffle(entries)
        splits["train"] += [(e, index) for e in entries[:train_per_topic]]
        splits["validation"] += [(e, index) for e in entries[train_per_topic : train_per_topic + validation_per_topic]]
        splits["test"] += [(e, index) for e in entries[train_per_topic + validation_per_topic : need]]
    for rows in splits.values():
        rng.shuffle(rows)
    return FortuneTask(labels=tuple(topics), splits=splits)


# A few zero-shot abilities of the instruct model, scored by the log-probability of each choice after the prompt.
ZERO_SHOT = (
    ("The capital of France is", (" Paris", " London", " Rome", " Madrid")),
    ("The capital of Japan is", (" Tokyo", " Beijing", " Seoul", " Bangkok")),
    ("Two plus two equals", (" four", " five", " three", " six")),
    ("Ten minus three equals", (" seven", " six", " eight", " five")),
    ("The opposite of hot is", (" cold", " warm", " big", " fast")),
    ("The opposite of up is", (" down", " left", " over", " high")),
    ("Water freezes at zero degrees", (" Celsius", " Kelvin", " Newton", " Joule")),
    ("The largest planet in the solar system is", (" Jupiter", " Mars", " Venus", " Mercury")),
    ("A baby cat is called a", (" kitten", " puppy", " calf", " foal")),
    ("The color of the clear daytime sky is", (" blue", " green", " red", " purple")),
    ("In Python, the keyword to define a function is", (" def", " func", " function", " lambda")),
    ("The first month of the year is", (" January", " March", " June", " December")),
    ("Bees make", (" honey", " milk", " silk", " wax")),
    ("The chemical symbol for gold is", (" Au", " Ag", " Fe", " Pb")),
    ("A week has seven", (" days", " hours", " months", " years")),
    ("The author of Romeo and Juliet is William", (" Shakespeare", " Wordsworth", " Blake", " Golding")),
)
