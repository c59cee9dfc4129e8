"""The model card of FIP adapters, push_to_hub (intercepted at the huggingface_hub API boundary) and resuming
continual learning from a pushed adapter in a fresh process."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub.repocard
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoUrl
from huggingface_hub.errors import EntryNotFoundError
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import fip_peft
from fip_peft.apps.evaluation import AccuracyMatrix
from fip_peft.integrations.model_card import BEGIN, END
from tests._tasks import MLP, as_tokens, digits_tasks, tiny_bert

REPO = Path(__file__).resolve().parents[1]
REPO_ID = "someone/fip-digits"


class FakeHub:
    """The Hub's repositories as seen through `HfApi.create_repo`, `HfApi.create_commit` and the card download."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: dict[str, bytes] = {}
        self.commits: list[dict] = []

    def create_repo(self, repo_id):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        sent = {}
        for operation in operations:
            source = operation.path_or_fileobj
            sent[operation.path_in_repo] = Path(source).read_bytes() if isinstance(source, str) else source
        self.files.update(sent)
        self.commits.append({"repo_id": repo_id, "files": sent, **kwargs})

    def hf_hub_download(self, repo_id, filename, **kwargs):
        if filename not in self.files:
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        path = self.folder / "download" / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.files[filename])
        return str(path)

    def snapshot(self, folder: Path) -> Path:
        """What `snapshot_download` would give: the repository's files in a folder."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in self.files.items():
            (folder / name).write_bytes(content)
        return folder

    def card(self) -> ModelCard:
        return ModelCard(self.files["README.md"].decode())


@pytest.fixture
def hub(monkeypatch, tmp_path):
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kwargs: fake.create_repo(repo_id))
    monkeypatch.setattr(
        HfApi,
        "create_commit",
        lambda api, repo_id, operations, **kwargs: fake.create_commit(repo_id, operations, **kwargs),
    )
    monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", fake.hf_hub_download)
    return fake


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base")
    tiny_bert().save_pretrained(folder)
    return folder


def fip_bert(base_path, **config):
    base = AutoModelForSequenceClassification.from_pretrained(base_path)
    config = {"task_type": "SEQ_CLS", "init_weights": False, "anchor_budget": 40, **config}
    return get_peft_model(base, fip_peft.FIPConfig(**config))


def section(card: ModelCard) -> str:
    return card.text[card.text.index(BEGIN) : card.text.index(END)]


def test_push_to_hub_sends_exactly_the_card_config_weights_and_labels_in_one_commit(hub, base_path):
    model = fip_bert(base_path)
    model.remember(as_tokens(digits_tasks()["x_a_train"][:60]), task_name="digits 0-4")
    model.push_to_hub(REPO_ID, token="not-a-real-token")
    assert len(hub.commits) == 1
    files = {"README.md", "adapter_config.json", "adapter_model.safetensors", "fip_labels.json"}
    assert set(hub.commits[0]["files"]) == files
    assert json.loads(hub.files["adapter_config.json"])["peft_type"] == "FIP"


def test_pushed_card_has_the_hub_metadata(hub, base_path):
    model = fip_bert(base_path)
    model.remember(as_tokens(digits_tasks()["x_a_train"][:60]))
    model.push_to_hub(REPO_ID, token="not-a-real-token", tags=["digits"])
    data = hub.card().data
    assert data.library_name == "peft"
    assert data.pipeline_tag == "text-classification"
    assert data.base_model is None  # a folder of this machine is no Hub id
    assert {"fip", "continual-learning", "transformers", "digits"} <= set(data.tags)
    assert "sparsification" not in data.tags


def test_card_base_model_is_the_hub_id_of_the_base_not_a_local_path(tmp_path, base_path):
    model = fip_bert(base_path)
    model.peft_config["default"].base_model_name_or_path = "someone/tiny-bert"
    model.save_pretrained(tmp_path / "adapter")
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.base_model == "someone/tiny-bert"
    assert str(base_path) not in str(card.data.to_dict())


def test_card_names_the_labels_of_a_classifier(tmp_path, base_path):
    base = AutoModelForSequenceClassification.from_pretrained(
        base_path, id2label={i: f"digit {i}" for i in range(10)}, label2id={f"digit {i}": i for i in range(10)}
    )
    model = get_peft_model(base, fip_peft.FIPConfig(task_type="SEQ_CLS", anchor_budget=40))
    model.save_pretrained(tmp_path / "adapter")
    text = section(ModelCard.load(tmp_path / "adapter" / "README.md"))
    assert "## Labels" in text and "| 0 | digit 0 |" in text and "| 9 | digit 9 |" in text


def test_card_explains_acc_bwt_and_forgetting_next_to_the_accuracy_matrix(tmp_path, base_path):
    model = fip_bert(base_path)
    matrix = AccuracyMatrix(["a", "b"])
    matrix.record(0, [0.9, 0.1])
    matrix.record(1, [0.8, 0.9])
    model.record_accuracy(matrix)
    model.save_pretrained(tmp_path / "adapter")
    text = section(ModelCard.load(tmp_path / "adapter" / "README.md"))
    after = text[text.index("ACC = ") :]
    assert "**ACC** (average accuracy)" in after and "**BWT** (backward transfer)" in after
    assert "negative means forgetting" in after


def test_pushed_card_says_how_to_load_the_adapter(hub, base_path):
    model = fip_bert(base_path)
    model.push_to_hub(REPO_ID, token="not-a-real-token")
    text = section(hub.card())
    assert "pip install fip-peft" in text
    assert "import fip_peft" in text
    assert "from transformers import AutoModelForSequenceClassification" in text
    loading = f'base = AutoModelForSequenceClassification.from_pretrained(\n    "{base_path}",\n    id2label=id2label,'
    assert loading in text
    assert f'model = PeftModel.from_pretrained(base, "{REPO_ID}")' in text


def test_card_lists_the_task_history_with_anchors_per_task(tmp_path, base_path):
    model = fip_bert(base_path)
    tasks = digits_tasks()
    model.remember(as_tokens(tasks["x_a_train"][:60]), task_name="digits 0-4")
    model.remember(as_tokens(tasks["x_b_train"][:60]), task_name="digits 5-9")
    model.save_pretrained(tmp_path / "adapter")
    text = section(ModelCard.load(tmp_path / "adapter" / "README.md"))
    assert "| 0 | digits 0-4 | 20 |" in text
    assert "| 1 | digits 5-9 | 20 |" in text


def test_tasks_remembered_without_a_name_are_numbered():
    model = get_peft_model(MLP(), fip_peft.FIPConfig(target_modules=["fc1"], anchor_budget=8))
    model.remember(digits_tasks()["x_a_train"])
    model.remember(digits_tasks()["x_b_train"], task_name="b")
    assert model.peft_config["default"].task_names == ["task 0", "b"]


def test_recorded_accuracy_matrix_is_saved_with_the_adapter_and_shown_in_the_card(tmp_path, base_path):
    model = fip_bert(base_path)
    model.remember(as_tokens(digits_tasks()["x_a_train"][:60]), task_name="a")
    matrix = AccuracyMatrix(["a", "b"])
    matrix.record(0, [0.9])
    matrix.record(1, [0.85, 0.8])
    model.record_accuracy(matrix)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["accuracy_matrix"] == matrix.to_dict()
    text = section(ModelCard.load(tmp_path / "adapter" / "README.md"))
    assert "| after \\ on | a | b |" in text
    assert "| a | 0.9000 | - |" in text
    assert "| b | 0.8500 | 0.8000 |" in text
    assert "ACC = 0.8250, BWT = -0.0500" in text


def test_record_accuracy_refuses_a_plain_list(base_path):
    model = fip_bert(base_path)
    with pytest.raises(TypeError, match="AccuracyMatrix"):
        model.record_accuracy([[0.9]])


def test_card_warns_that_anchors_are_training_inputs(tmp_path, base_path):
    model = fip_bert(base_path)
    model.remember(as_tokens(digits_tasks()["x_a_train"][:60]))
    model.save_pretrained(tmp_path / "adapter")
    text = section(ModelCard.load(tmp_path / "adapter" / "README.md"))
    assert "stores 40 anchors" in text
    assert "inputs taken from the training data" in text
    assert "save_anchors=False" in text


def test_card_says_what_is_lost_when_anchors_are_not_saved(tmp_path, base_path):
    model = fip_bert(base_path, save_anchors=False)
    model.remember(as_tokens(digits_tasks()["x_a_train"][:60]), task_name="a")
    model.save_pretrained(tmp_path / "adapter")
    text = section(ModelCard.load(tmp_path / "adapter" / "README.md"))
    assert "saved **without its anchors**" in text
    assert "does not preserve the tasks above" in text


def test_history_of_tasks_whose_anchors_were_not_saved_survives_reloading(tmp_path, base_path):
    model = fip_bert(base_path, save_anchors=False)
    model.remember(as_tokens(digits_tasks()["x_a_train"][:60]), task_name="a")
    model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(base_path)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
    loaded.remember(as_tokens(digits_tasks()["x_b_train"][:60]), task_name="b")
    loaded.save_pretrained(tmp_path / "again")
    text = section(ModelCard.load(tmp_path / "again" / "README.md"))
    assert "| 0 | a | none (lost: saved without anchors) |" in text
    assert "| 1 | b | 40 |" in text


def test_card_of_a_sparsified_adapter_reports_its_sparsity(tmp_path):
    config = fip_peft.FIPConfig(target_modules=["fc1", "fc2"], objective="sparsify", target_sparsity=0.5)
    model = get_peft_model(MLP(), config)
    reached = model.apply_sparsity_mask()
    model.save_pretrained(tmp_path / "adapter")
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert "sparsification" in card.data.tags
    assert f"(W + delta): {reached:.4f}" in section(card)


def test_card_of_a_sparsified_adapter_speaks_of_sparsity_not_of_forgetting(tmp_path):
    config = fip_peft.FIPConfig(target_modules=["fc1", "fc2"], objective="sparsify", target_sparsity=0.5)
    model = get_peft_model(MLP(), config)
    model.remember(digits_tasks()["x_a_train"][:40], task_name="digits")
    model.apply_sparsity_mask()
    model.save_pretrained(tmp_path / "adapter")
    text = section(ModelCard.load(tmp_path / "adapter" / "README.md"))
    assert "forgetting" not in text and "after each task" not in text
    assert "sparsity" in text and "## Remembered data" in text and "exact zeros" in text


def test_saving_again_rewrites_the_fip_section_and_keeps_the_users_text(tmp_path, base_path):
    model = fip_bert(base_path)
    model.save_pretrained(tmp_path / "adapter")
    card_path = tmp_path / "adapter" / "README.md"
    card_path.write_text(card_path.read_text() + "\n## Notes by the author\n\nTrained on digits.\n")
    model.remember(as_tokens(digits_tasks()["x_a_train"][:60]), task_name="a")
    model.save_pretrained(tmp_path / "adapter")
    text = card_path.read_text()
    assert text.count(BEGIN) == 1
    assert "| 0 | a | 40 |" in text
    assert "Trained on digits." in text


def test_push_keeps_the_text_of_the_card_already_on_the_hub(hub, base_path):
    hub.files["README.md"] = b"---\nlicense: mit\n---\n\n# My adapter\n\nWritten by hand.\n"
    fip_bert(base_path).push_to_hub(REPO_ID, token="not-a-real-token")
    card = hub.card()
    assert card.data.license == "mit"
    assert "Written by hand." in card.text
    assert BEGIN in card.text


def test_lora_cards_are_left_to_peft(tmp_path):
    model = get_peft_model(MLP(), LoraConfig(target_modules=["fc1"]))
    model.save_pretrained(tmp_path / "lora")
    card = ModelCard.load(tmp_path / "lora" / "README.md")
    assert "fip" not in (card.data.tags or [])
    assert BEGIN not in card.text


def test_continual_learning_resumes_from_a_pushed_adapter_in_a_fresh_process(hub, tmp_path, base_path):
    model = fip_bert(base_path)
    model.remember(as_tokens(digits_tasks()["x_a_train"][:60]), task_name="digits 0-4")
    model.push_to_hub(REPO_ID, token="not-a-real-token")
    pushed = hub.snapshot(tmp_path / "snapshot")
    script = textwrap.dedent(
        f"""
        import torch, fip_peft
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification
        from tests._tasks import as_tokens, digits_tasks
        base = AutoModelForSequenceClassification.from_pretrained({str(base_path)!r})
        model = PeftModel.from_pretrained(base, {str(pushed)!r}, is_trainable=True)
        tasks = digits_tasks()
        model.remember(as_tokens(tasks["x_b_train"][:60]), task_name="digits 5-9")
        optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
        batch = as_tokens(tasks["x_b_train"][:32])
        model.train()
        for _ in range(3):
            model(**batch, labels=tasks["y_b_train"][:32]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.save_pretrained({str(tmp_path / "resumed")!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    before = load_file(pushed / "adapter_model.safetensors")
    after = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    anchors, task_ids = "base_model.fip_memory.anchor__input_ids", "base_model.fip_memory.task_ids"
    assert before[task_ids].tolist() == [0] * 40
    assert after[task_ids].tolist() == [0] * 20 + [1] * 20
    assert torch.equal(after[anchors][:20], before[anchors][:20])
    config = json.loads((tmp_path / "resumed" / "adapter_config.json").read_text())
    assert config["task_names"] == ["digits 0-4", "digits 5-9"]


def test_causal_lm_adapter_loads_with_auto_peft_model_and_its_card_says_how(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)).save_pretrained(
        tmp_path / "gpt2"
    )
    base = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    model = get_peft_model(base, fip_peft.FIPConfig(task_type="CAUSAL_LM", init_weights=False)).eval()
    model.save_pretrained(tmp_path / "adapter")
    tokens = torch.randint(0, 64, (2, 8))
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, model(input_ids=tokens).logits, atol=1e-6, rtol=0)
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.pipeline_tag == "text-generation"
    assert "base = AutoModelForCausalLM.from_pretrained(" in section(card)


@pytest.mark.parametrize("history", [{"task_names": "films"}, {"task_names": [1]}, {"accuracy_matrix": [[0.9]]}])
def test_task_history_fields_of_the_config_are_checked(history):
    with pytest.raises(TypeError, match="FIPConfig.(task_names|accuracy_matrix)"):
        fip_peft.FIPConfig(**history)


def test_remember_refuses_a_task_name_that_is_not_a_string():
    model = get_peft_model(MLP(), fip_peft.FIPConfig(target_modules=["fc1"], anchor_budget=8))
    with pytest.raises(TypeError, match="task_name"):
        model.remember(digits_tasks()["x_a_train"], task_name=3)
    assert model.peft_config["default"].task_names == []
