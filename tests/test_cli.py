"""`fip-peft` command line: train, sparsify, eval and info on a tiny BERT and small csv/json/parquet task files."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pandas as pd
import pytest
import torch
from peft import AutoPeftModelForSequenceClassification, get_peft_model
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertTokenizerFast, pipeline

from fip_peft import FIPConfig
from fip_peft.apps.cli import build_parser, main, train_pooler_as_new, untrained_pooler
from fip_peft.integrations.model_card import PLACEHOLDER_ID

WORDS = {
    "films": (
        ["great film", "lovely acting", "superb plot", "fine story"],
        ["awful film", "dull acting", "poor plot"],
    ),
    "pets": (["cat purrs", "cat sleeps", "kitten naps"], ["dog barks", "dog runs", "puppy fetches", "dog digs"]),
}
LABELS = {"films": ("good", "bad"), "pets": ("cat", "dog")}


def write_task(folder, name, suffix=".csv", rows=24):
    """A small task file: texts built from the task's words, with string labels."""
    first, second = WORDS[name]
    texts, labels = [], []
    for i in range(rows):
        group, label = (first, LABELS[name][0]) if i % 2 == 0 else (second, LABELS[name][1])
        texts.append(f"{group[i % len(group)]} {group[(i // 2) % len(group)]}")
        labels.append(label)
    frame = pd.DataFrame({"text": texts, "label": labels})
    path = folder / f"{name}{suffix}"
    {".csv": frame.to_csv, ".parquet": frame.to_parquet, ".jsonl": frame.to_json}[suffix](
        path,
        **(
            {"index": False}
            if suffix == ".csv"
            else {"orient": "records", "lines": True}
            if suffix == ".jsonl"
            else {}
        ),
    )
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny BERT with a word-level WordPiece tokenizer over the task words, saved like a Hub model."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    words = sorted({w for groups in WORDS.values() for group in groups for text in group for w in text.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """Two tasks (a json lines and a parquet file) learned in turn by `fip-peft train`, with what it printed."""
    folder = tmp_path_factory.mktemp("train")
    films, pets = write_task(folder, "films", ".jsonl"), write_task(folder, "pets", ".parquet")
    out = folder / "adapter"
    argv = ["train", "--model", str(base), "--task", str(films), "--task", str(pets), "--output-dir", str(out)]
    argv += ["--max-steps", "4", "--learning-rate", "1e-3", "--anchor-budget", "16", "--quiet", "--cpu", "--merge"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return {"folder": folder, "adapter": out, "films": films, "pets": pets, "printed": printed.getvalue()}


def test_train_saves_the_adapter_with_tokenizer_labels_and_card(trained):
    files = {p.name for p in trained["adapter"].iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "fip_labels.json"} <= files
    assert "tokenizer.json" in files
    assert json.loads((trained["adapter"] / "fip_labels.json").read_text())["labels"] == ["bad", "good", "cat", "dog"]


def test_train_records_task_names_and_the_accuracy_matrix(trained):
    config = json.loads((trained["adapter"] / "adapter_config.json").read_text())
    assert config["task_names"] == ["films", "pets"]
    matrix = config["accuracy_matrix"]
    assert matrix["task_names"] == ["films", "pets"]
    assert len(matrix["matrix"]) == 2 and matrix["matrix"][0][1] is not None


def test_train_prints_the_accuracy_matrix(trained):
    assert "after films" in trained["printed"] and "after pets" in trained["printed"]
    assert "ACC=" in trained["printed"]


def test_info_lists_tasks_and_anchors_per_task(trained, capsys):
    assert main(["info", str(trained["adapter"])]) == 0
    out = capsys.readouterr().out
    assert "0: films  anchors 8" in out
    assert "1: pets  anchors 8" in out
    assert "ACC=" in out


def test_info_json_has_config_tasks_and_matrix(trained, capsys):
    main(["info", str(trained["adapter"]), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["objective"] == "continual"
    assert info["tasks"] == [{"task": "films", "anchors": 8}, {"task": "pets", "anchors": 8}]
    assert info["accuracy_matrix"]["task_names"] == ["films", "pets"]


def test_eval_of_one_adapter_per_task_gives_the_accuracy_matrix(trained, tmp_path, capsys):
    out = tmp_path / "R.json"
    argv = ["eval", "--adapter", str(trained["adapter"]), "--adapter", str(trained["adapter"])]
    argv += ["--task", str(trained["films"]), "--task", str(trained["pets"]), "--output-json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["task_names"] == ["films", "pets"]
    assert result["matrix"][0] == result["matrix"][1]
    assert all(0.0 <= value <= 1.0 for value in result["matrix"][1])
    assert "ACC=" in capsys.readouterr().out


def test_sparsify_reaches_the_target_sparsity(base, tmp_path, capsys):
    films = write_task(tmp_path, "films")
    argv = ["sparsify", "--model", str(base), "--task", str(films), "--target-sparsity", "0.5"]
    argv += ["--output-dir", str(tmp_path / "sparse"), "--max-steps", "4", "--quiet", "--cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "sparsity_criterion='magnitude'" in out  # the measured default at 0.5
    assert re.search(r"accuracy on \d+ held-out rows of films: dense [\d.]+, sparse [\d.]+", out)
    main(["info", str(tmp_path / "sparse"), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["objective"] == "sparsify"
    assert info["sparsity"]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_a_classifier_that_knows_the_labels_keeps_its_class_order(base, tmp_path):
    names = {"id2label": {0: "good", 1: "bad"}, "label2id": {"good": 0, "bad": 1}}
    classifier = BertForSequenceClassification.from_pretrained(base, **names)
    classifier.save_pretrained(tmp_path / "classifier")
    BertTokenizerFast.from_pretrained(base).save_pretrained(tmp_path / "classifier")
    films = write_task(tmp_path, "films")
    argv = [
        "train",
        "--model",
        str(tmp_path / "classifier"),
        "--task",
        str(films),
        "--output-dir",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--max-steps", "1", "--test-fraction", "0", "--quiet", "--cpu"]) == 0
    assert json.loads((tmp_path / "o" / "fip_labels.json").read_text())["labels"] == ["good", "bad"]


def test_missing_task_file_is_refused_before_loading_the_model(tmp_path, capsys):
    argv = ["train", "--model", str(tmp_path / "no-model"), "--task", str(tmp_path / "nope.csv")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_column_names_the_flag_to_fix_it(tmp_path, capsys):
    films = write_task(tmp_path, "films")
    argv = ["train", "--model", str(tmp_path / "no-model"), "--task", str(films), "--text-column", "review"]
    with pytest.raises(SystemExit):
        main([*argv, "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "no column 'review'" in err and "--text-column" in err


def test_unsupported_file_type_is_refused(tmp_path, capsys):
    (tmp_path / "films.txt").write_text("great film\n")
    with pytest.raises(SystemExit):
        main(["train", "--model", "m", "--task", str(tmp_path / "films.txt"), "--output-dir", str(tmp_path / "o")])
    assert "unsupported file type '.txt'" in capsys.readouterr().err


def test_sparsify_objective_needs_a_target(tmp_path, capsys):
    films = write_task(tmp_path, "films")
    argv = ["train", "--model", "m", "--task", str(films), "--objective", "sparsify", "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit):
        main(argv)
    assert "--target-sparsity" in capsys.readouterr().err


def test_info_refuses_a_folder_without_an_adapter(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["info", str(tmp_path)])
    assert "not an adapter folder" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "sparsify", "eval", "info"])
def test_help_explains_every_option(command):
    parser = build_parser()
    subparser = parser._subparsers._group_actions[0].choices[command]
    for action in subparser._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"


def test_fip_peft_is_installed_as_a_console_script():
    scripts = entry_points(group="console_scripts")
    assert scripts["fip-peft"].value == "fip_peft.apps.cli:main"


def test_eval_refuses_labels_the_adapter_does_not_know(trained, tmp_path, capsys):
    other = tmp_path / "other.csv"
    other.write_text("text,label\ngreat film,fish\ndull film,fish\n")
    with pytest.raises(SystemExit):
        main(["eval", "--adapter", str(trained["adapter"]), "--task", str(other)])
    assert "labels ['fish'] are not classes" in capsys.readouterr().err


def test_an_untrained_pooler_is_found_by_its_all_zero_bias(base):
    model = BertForSequenceClassification.from_pretrained(base)
    assert untrained_pooler(model) == "bert.pooler"
    with torch.no_grad():
        model.bert.pooler.dense.bias.fill_(0.1)
    assert untrained_pooler(model) is None


def test_the_new_pooler_starts_as_a_pass_through_and_the_base_pooler_is_kept(base):
    model = BertForSequenceClassification.from_pretrained(base)
    original = model.bert.pooler.dense.weight.clone()
    config = FIPConfig(task_type="SEQ_CLS", modules_to_save=["bert.pooler"], exclude_modules=["bert.pooler.dense"])
    peft_model = get_peft_model(model, config)
    train_pooler_as_new(peft_model, "bert.pooler")
    wrapper = peft_model.get_base_model().bert.pooler
    assert torch.equal(wrapper.modules_to_save["default"].dense.weight, torch.eye(32))
    assert torch.equal(wrapper.original_module.dense.weight, original)


def test_train_saves_an_untrained_pooler_in_full_with_the_adapter(trained):
    config = json.loads((trained["adapter"] / "adapter_config.json").read_text())
    assert "bert.pooler" in config["modules_to_save"]
    keys = load_file(trained["adapter"] / "adapter_model.safetensors").keys()
    assert {"base_model.model.bert.pooler.dense.weight", "base_model.model.bert.pooler.dense.bias"} <= keys
    assert not any("pooler.dense.fip_delta" in key for key in keys)


def test_the_trained_pooler_loads_with_auto_peft_model(trained):
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        trained["adapter"], num_labels=4, ignore_mismatched_sizes=True
    )
    saved = load_file(trained["adapter"] / "adapter_model.safetensors")
    trained_weight = saved["base_model.model.bert.pooler.dense.weight"]
    pooler = model.get_base_model().bert.pooler
    assert torch.equal(pooler.modules_to_save["default"].dense.weight, trained_weight)
    assert not torch.equal(pooler.original_module.dense.weight, trained_weight)


def test_pooler_keep_adapts_the_pooler_like_any_linear_layer(base, tmp_path):
    films = write_task(tmp_path, "films")
    argv = ["train", "--model", str(base), "--task", str(films), "--output-dir", str(tmp_path / "o")]
    assert main([*argv, "--pooler", "keep", "--max-steps", "1", "--test-fraction", "0", "--quiet", "--cpu"]) == 0
    config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert "bert.pooler" not in (config["modules_to_save"] or [])
    assert any("pooler.dense.fip_delta" in key for key in load_file(tmp_path / "o" / "adapter_model.safetensors"))


def test_a_fractional_warmup_above_one_is_refused_before_loading(tmp_path, capsys):
    films = write_task(tmp_path, "films")
    argv = ["train", "--model", str(tmp_path / "no-model"), "--task", str(films), "--warmup-steps", "2.5"]
    with pytest.raises(SystemExit):
        main([*argv, "--output-dir", str(tmp_path / "out")])
    assert "--warmup-steps must be a whole number of steps or a fraction in [0, 1)" in capsys.readouterr().err


def python_snippet(card: str) -> str:
    """The python code block of a model card's "How to load" section."""
    section = card.split("## How to load", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def run_fresh(code: str) -> str:
    """Run `code` in a fresh Python process (offline) and return what it printed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_cards_snippet_loads_the_adapter_with_its_labels_in_a_fresh_process(trained):
    snippet = python_snippet((trained["adapter"] / "README.md").read_text())
    assert PLACEHOLDER_ID in snippet
    code = snippet.replace(PLACEHOLDER_ID, str(trained["adapter"]))
    code += "\nimport json\nprint(json.dumps(model.config.id2label))\n"
    assert json.loads(run_fresh(code).strip().splitlines()[-1]) == {"0": "bad", "1": "good", "2": "cat", "3": "dog"}


def test_auto_peft_model_restores_the_labels_and_a_pipeline_answers_with_their_names(trained):
    model = AutoPeftModelForSequenceClassification.from_pretrained(trained["adapter"])
    assert model.config.num_labels == 4
    assert model.config.id2label == {0: "bad", 1: "good", 2: "cat", 3: "dog"}
    assert model.config.label2id == {"bad": 0, "good": 1, "cat": 2, "dog": 3}
    tokenizer = AutoTokenizer.from_pretrained(trained["adapter"])
    answer = pipeline("text-classification", model=model, tokenizer=tokenizer)("cat purrs")
    assert answer[0]["label"] in {"bad", "good", "cat", "dog"}


def refused(argv, capsys) -> str:
    """Run the command line, expect `fip-peft: error: ...` with exit status 2, and return the message."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fip-peft: error: "), err
    return err


def train_argv(model, task, out) -> list[str]:
    return ["train", "--model", str(model), "--task", str(task), "--output-dir", str(out), "--quiet"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "the file is empty"),
        ("text,label\n", "has no data rows"),
        (
            "text,label\ngreat film,good\n,bad\nfine story,good\n",
            "row 2 (line 3, after the header) has no value in column 'text'",
        ),
        (
            "text,label\ngreat film,good\ndull film,\nfine story,good\n",
            "row 2 (line 3, after the header) has no value in column 'label'",
        ),
    ],
    ids=["empty", "header-only", "missing-text", "missing-label"],
)
def test_a_bad_task_file_is_refused_naming_the_file_and_row_before_loading_the_model(
    base, tmp_path, capsys, content, expected
):
    task = tmp_path / "films.csv"
    task.write_text(content)
    err = refused(train_argv(base, task, tmp_path / "out"), capsys)
    assert f"--task {task}: " in err and expected in err
    assert not (tmp_path / "out").exists()


def test_a_missing_label_does_not_become_a_class_none_in_eval(trained, tmp_path, capsys):
    task = tmp_path / "films.csv"
    task.write_text("text,label\ngreat film,good\ndull film,\nfine story,good\nawful film,bad\n")
    err = refused(["eval", "--adapter", str(trained["adapter"]), "--task", str(task)], capsys)
    assert "no value in column 'label'" in err


def test_a_model_folder_that_does_not_exist_is_refused_naming_the_flag(tmp_path, capsys):
    films = write_task(tmp_path, "films")
    err = refused(train_argv(tmp_path / "no-model", films, tmp_path / "out"), capsys)
    assert f"--model {tmp_path / 'no-model'}: no such folder" in err and "Hub id" in err


def test_target_sparsity_out_of_range_names_the_flag_not_the_config(base, tmp_path, capsys):
    films = write_task(tmp_path, "films")
    argv = ["sparsify", "--model", str(base), "--task", str(films), "--output-dir", str(tmp_path / "out")]
    err = refused([*argv, "--target-sparsity", "1.2"], capsys)
    assert "--target-sparsity" in err and "1.2" in err and "[0, 1)" in err
    assert "FIPConfig" not in err


@pytest.mark.parametrize("damage", ["truncated-weights", "broken-config"])
def test_info_on_a_damaged_adapter_is_an_error_naming_the_file(trained, tmp_path, capsys, damage):
    import shutil

    folder = tmp_path / "damaged"
    shutil.copytree(trained["adapter"], folder)
    name = "adapter_model.safetensors" if damage == "truncated-weights" else "adapter_config.json"
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    err = refused(["info", str(folder)], capsys)
    assert str(folder / name) in err and "damaged" in err


# ---- the workflow: an adapter per task, eval on held-out rows, merge, continue --------------------------------------


def test_train_saves_an_adapter_after_each_task(trained):
    for index, tasks in ((1, ["films"]), (2, ["films", "pets"])):
        folder = trained["adapter"] / f"after-task-{index}"
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["task_names"] == tasks
        assert {"adapter_model.safetensors", "README.md", "fip_labels.json", "tokenizer.json"} <= {
            p.name for p in folder.iterdir()
        }


def test_eval_of_the_adapters_after_each_task_scores_the_held_out_rows_train_scored(trained, tmp_path, capsys):
    out = tmp_path / "R.json"
    argv = ["eval", "--adapter", str(trained["adapter"] / "after-task-1")]
    argv += ["--adapter", str(trained["adapter"] / "after-task-2"), "--task", str(trained["films"])]
    argv += ["--task", str(trained["pets"]), "--output-json", str(out), "--quiet"]
    assert main(argv) == 0
    assert "held-out rows (--test-fraction 0.2, --seed 0)" in capsys.readouterr().out
    result = json.loads(out.read_text())
    recorded = json.loads((trained["adapter"] / "adapter_config.json").read_text())["accuracy_matrix"]
    assert [pytest.approx(row) for row in recorded["matrix"]] == result["matrix"]
    assert result["test_fraction"] == 0.2


def test_the_merged_model_answers_with_the_real_label_names_in_a_fresh_process(trained):
    merged = trained["adapter"] / "merged"
    assert not (merged / "adapter_config.json").exists()
    code = (
        "import json\nfrom transformers import pipeline\n"
        f"classify = pipeline('text-classification', model={str(merged)!r})\n"
        "print(json.dumps([classify('cat purrs')[0]['label'], classify.model.config.id2label]))\n"
    )
    label, id2label = json.loads(run_fresh(code).strip().splitlines()[-1])
    assert id2label == {"0": "bad", "1": "good", "2": "cat", "3": "dog"}
    assert label in {"bad", "good", "cat", "dog"}


def test_train_continues_from_an_adapter_and_keeps_its_remembered_tasks(trained, tmp_path, capsys):
    out = tmp_path / "continued"
    argv = ["train", "--adapter", str(trained["adapter"] / "after-task-1"), "--task", str(trained["pets"])]
    assert main([*argv, "--output-dir", str(out), "--max-steps", "2", "--quiet", "--cpu"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_names"] == ["films", "pets"]
    assert config["modules_to_save"] and "bert.pooler" in config["modules_to_save"]
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("adapter saved to")[-1].split("\n", 1)[1])
    assert [task["anchors"] for task in info["tasks"]] == [8, 8]


def test_continuing_refuses_labels_the_adapters_head_does_not_have(trained, tmp_path, capsys):
    other = tmp_path / "fish.csv"
    other.write_text("text,label\ngreat film,fish\ndull film,fish\ncat purrs,cat\n")
    argv = ["train", "--adapter", str(trained["adapter"]), "--task", str(other), "--output-dir", str(tmp_path / "o")]
    err = refused(argv, capsys)
    assert "['fish']" in err and "--adapter" in err


def test_train_refuses_a_non_empty_output_dir_unless_overwrite(base, tmp_path, capsys):
    films = write_task(tmp_path, "films")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = refused(train_argv(base, films, out), capsys)
    assert f"--output-dir {out} is not empty" in err and "--overwrite" in err
    argv = [*train_argv(base, films, out), "--overwrite", "--max-steps", "1", "--test-fraction", "0", "--cpu"]
    assert main(argv) == 0
    assert (out / "adapter_config.json").is_file() and (out / "notes.txt").read_text() == "mine"


def test_sparsify_exposes_ramp_criterion_and_scope(base, tmp_path):
    films = write_task(tmp_path, "films")
    argv = ["sparsify", "--model", str(base), "--task", str(films), "--target-sparsity", "0.3", "--quiet", "--cpu"]
    argv += ["--output-dir", str(tmp_path / "s"), "--max-steps", "2", "--test-fraction", "0"]
    argv += ["--sparsity-ramp-steps", "1", "--sparsity-criterion", "saliency", "--sparsity-scope", "layer"]
    assert main(argv) == 0
    config = json.loads((tmp_path / "s" / "adapter_config.json").read_text())
    assert config["sparsity_ramp_steps"] == 1
    assert (config["sparsity_criterion"], config["sparsity_scope"]) == ("saliency", "layer")


def test_sparsify_default_learning_rate_does_not_trigger_the_pace_warning(base, tmp_path, caplog):
    films = write_task(tmp_path, "films")
    argv = ["sparsify", "--model", str(base), "--task", str(films), "--target-sparsity", "0.5", "--quiet", "--cpu"]
    argv += ["--output-dir", str(tmp_path / "s"), "--max-steps", "20", "--test-fraction", "0"]
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    assert not [r for r in caplog.records if "FIP sparsify" in r.getMessage()]


def test_quiet_silences_every_progress_bar_and_the_load_report(base, tmp_path, capfd):
    films, pets = write_task(tmp_path, "films"), write_task(tmp_path, "pets")
    argv = ["train", "--model", str(base), "--task", str(films), "--task", str(pets), "--quiet", "--cpu"]
    assert main([*argv, "--output-dir", str(tmp_path / "o"), "--max-steps", "1"]) == 0
    err = capfd.readouterr().err
    assert "it/s" not in err and "%|" not in err and "examples/s" not in err
    assert "LOAD REPORT" not in err and "MISMATCH" not in err


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("fip-peft ")


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "fip_peft", "--help"],
        ["-m", "fip_peft.apps.cli", "--help"],
        ["-m", "fip_peft", "train", "--help"],
        ["-c", "import sys; sys.argv = ['fip-peft', '--version']; from fip_peft.apps.cli import main; main()"],
    ],
    ids=["python-m-help", "python-m-apps-cli-help", "train-help", "console-script-version"],
)
def test_help_and_version_answer_without_loading_torch_transformers_or_peft(argv):
    """`--help` answers in well under 2 seconds because it imports none of the heavy libraries."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "transformers", "peft", "datasets"}
    assert "fip-peft" in done.stdout


def test_a_command_still_registers_fip_with_peft_in_a_fresh_process(tmp_path):
    code = "from fip_peft.apps.cli import main\nfrom peft.utils import PeftType\nprint(PeftType('FIP'))\n"
    assert "FIP" in run_fresh(code)


def test_base_model_id_names_the_base_on_the_card_and_eval_still_finds_the_local_folder(base, tmp_path, capsys):
    from huggingface_hub import ModelCard

    films = write_task(tmp_path, "films")
    out = tmp_path / "out"
    argv = [*train_argv(base, films, out), "--base-model-id", "someone/tiny-bert", "--max-steps", "1", "--cpu"]
    assert main(argv) == 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "someone/tiny-bert"
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "someone/tiny-bert" and card.data.pipeline_tag == "text-classification"
    assert str(base) not in card.content
    assert main(["eval", "--adapter", str(out), "--task", str(films), "--quiet"]) == 0


def test_train_continues_from_an_adapter_on_the_hub(trained, tmp_path, monkeypatch):
    import huggingface_hub

    fetched = []

    def snapshot_download(repo_id, **kwargs):  # the Hub download, answered from the adapter trained here
        fetched.append(repo_id)
        return str(trained["adapter"] / "after-task-1")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    out = tmp_path / "continued"
    argv = ["train", "--adapter", "someone/fip-films", "--task", str(trained["pets"]), "--output-dir", str(out)]
    assert main([*argv, "--max-steps", "1", "--quiet", "--cpu"]) == 0
    assert fetched == ["someone/fip-films"]
    assert json.loads((out / "adapter_config.json").read_text())["task_names"] == ["films", "pets"]
