"""The causal-LM example's data loaders and argument parsing (issue 27) on tiny files: no model, no Debian package."""

from __future__ import annotations

import gzip
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "benchmarks")]
data_lm = importlib.import_module("data_lm")


def write_fortunes(root: Path, topics: tuple[str, ...], per_topic: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for topic in topics:
        entries = [f"A short {topic} saying number {i}.\n  -- someone" for i in range(per_topic)]
        (root / topic).write_text("\n%\n".join(entries) + "\n%\n")


def test_fortune_task_is_balanced_disjoint_and_seeded(tmp_path):
    topics = ("a", "b", "c")
    write_fortunes(tmp_path, topics, 12)
    task = data_lm.fortune_task(topics, 4, 2, 3, seed=1, root=tmp_path)
    sizes = {k: len(v) for k, v in task.splits.items()}
    assert sizes == {"train": 12, "validation": 6, "test": 9}
    texts = [t for rows in task.splits.values() for t, _ in rows]
    assert len(set(texts)) == len(texts)
    assert all(sum(1 for _, y in task.splits["train"] if y == i) == 4 for i in range(3))
    assert "-- someone" in texts[0] and "\n" not in texts[0]
    assert task.splits == data_lm.fortune_task(topics, 4, 2, 3, seed=1, root=tmp_path).splits
    with pytest.raises(ValueError, match=r"topic 'a' has 12 entries.*needs 20"):
        data_lm.fortune_task(topics, 10, 5, 5, root=tmp_path)


def test_missing_data_names_the_debian_package(tmp_path):
    with pytest.raises(data_lm.MissingDataError, match=r"`fortunes`.*apt-get install -y fortunes"):
        data_lm.read_fortunes("law", root=tmp_path)
    with pytest.raises(data_lm.MissingDataError, match=r"python3.11-doc"):
        data_lm.python_doc_files(tmp_path)
    with pytest.raises(data_lm.MissingDataError, match=r"jargon-text"):
        data_lm.jargon_texts("heldout", path=tmp_path / "jargon.txt.gz")


def test_python_docs_prose_and_splits_use_disjoint_folders(tmp_path):
    prose = "This paragraph explains how a :func:`len` call counts the items of a container in Python."
    for folder in ("tutorial", "library"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.rst.txt").write_text(f"Title\n=====\n\n{folder}: {prose}\n\n.. note::\n\n   skip\n")
    heldout = data_lm.python_doc_texts("heldout", root=tmp_path)
    anchor = data_lm.python_doc_texts("anchor", root=tmp_path)
    assert heldout == [f"tutorial: {prose.replace(':func:`len`', 'len')}"]
    assert anchor[0].startswith("library:")
    with pytest.raises(ValueError, match="split="):
        data_lm.python_doc_texts("train", root=tmp_path)


def test_jargon_entries_alternate_between_heldout_and_anchor(tmp_path):
    entries = [
        f"   :word{i}: n.\n\n   A {{word}} that hackers use for thing {i}, explained at some length here,"
        " long enough to count."
        for i in range(4)
    ]
    path = tmp_path / "jargon.txt.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("front matter\n\n" + "\n\n".join(entries))
    heldout, anchor = data_lm.jargon_texts("heldout", path=path), data_lm.jargon_texts("anchor", path=path)
    assert [e.split(":")[1] for e in heldout] == ["word0", "word2"]
    assert [e.split(":")[1] for e in anchor] == ["word1", "word3"]
    assert "{" not in heldout[0]


def test_example_and_benchmark_parse_training_arguments_names():
    continual_lm = importlib.import_module("continual_lm")
    args = continual_lm.parse_args(
        ["--max_steps", "5", "--learning_rate", "0.01", "--per_device_train_batch_size", "2", "--output_dir", "o",
         "--seed", "3", "--baseline"]
    )  # fmt: skip
    assert (args.max_steps, args.learning_rate, args.per_device_train_batch_size, args.seed) == (5, 0.01, 2, 3)
    assert args.baseline and args.output_dir == "o"
    with pytest.raises(SystemExit):
        continual_lm.parse_args(["--max_steps", "0"])
    bench = importlib.import_module("lm_forgetting")
    quick = bench.parse_args(["--quick", "--methods", "full,fip8", "--seeds", "0,1"])
    assert quick.max_steps == 2 and quick.methods == ["full", "fip8"] and quick.seeds == [0, 1]
    assert (
        bench.make_method("lora16_kl", quick).kind == "lora_kl" and bench.make_method("fip_full", quick).rank is None
    )
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "nope"])
