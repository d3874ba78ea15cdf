"""The cifar10 dataset: an ImageFolder copy decodes to the expected tensors; a failed download is a ConfigError."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image

from wmbench.errors import ConfigError
from wmbench.registry import DATASETS


def write_imagefolder(root: Path) -> None:
    """CIFAR-10's ten classes a..j; train: 3 + 2 + 1 each, test: 1 each; each image one flat colour,
    class a's black, b's red, the others' green."""
    for split, counts in (("train", (3, 2) + (1,) * 8), ("test", (1,) * 10)):
        for name, count in zip("abcdefghij", counts):
            colour = {"a": (0, 0, 0), "b": (255, 0, 0)}.get(name, (0, 255, 0))
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((32, 32, 3), colour, dtype=np.uint8)).save(root / split / name / f"{i}.png")


def test_imagefolder_copy_loads_and_subsets(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    write_imagefolder(root)
    data = DATASETS.build("cifar10", {"root": str(root), "layout": "imagefolder"}).load(tmp_path / "cache")
    assert data.train_x.shape == (13, 3, 32, 32) and data.test_x.shape == (10, 3, 32, 32) and data.num_classes == 10
    assert sorted(data.train_y.tolist()) == [0, 0, 0, 1, 1, *range(2, 10)]
    red = data.train_x[data.train_y == 1][0, :, 0, 0]
    black = data.train_x[data.train_y == 0][0, :, 0, 0]
    assert red[0] > 0 > red[1] and torch.all(black < 0)  # normalised: red channel high, others at their minimum
    subset = DATASETS.build("cifar10", {"root": str(root), "layout": "imagefolder", "subset_train": 2}).load(tmp_path / "cache")
    assert len(subset.train_x) == 2


def test_failed_download_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Offline:
        def __init__(self, *args, **kwargs) -> None:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(ConfigError) as info:
        DATASETS.build("cifar10", {"root": str(tmp_path / "none")}).load(tmp_path / "cache")
    assert info.value.field == "root"  # the scenario names it datasets[i].args.root
    assert "could not download CIFAR-10" in str(info.value) and "layout=imagefolder" in str(info.value)


@pytest.mark.at_chance("plumbing: training ids of copies of a dataset")
def test_a_copy_elsewhere_keeps_the_ids_and_an_edited_copy_trains_its_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    import pandas as pd

    from wmbench.cli import main

    first, copy, other = tmp_path / "first", tmp_path / "copy", tmp_path / "other"
    write_imagefolder(first)
    shutil.copytree(first, copy)
    write_imagefolder(other)
    Image.fromarray(np.full((32, 32, 3), (0, 255, 0), dtype=np.uint8)).save(other / "train" / "a" / "0.png")  # one image differs
    (tmp_path / "s.yaml").write_text(
        "name: where\nseeds: [0]\ndevice: cpu\ndatasets: [{name: cifar10, args: {layout: imagefolder}}]\n"
        "models: [{name: small_cnn, args: {width: 4, hidden: 8}}]\nmethods: [{name: none, args: {n_carriers: 64}}]\ntraining: {epochs: 1}\n"
    )

    def run(root: Path, *extra: str) -> int:
        args = ["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "lb"), "-q"]
        return main([*args, "--set", f"datasets[0].args.root={root}", *extra])

    assert run(first) == 0
    store = tmp_path / "cache" / "results" / "where.jsonl"
    rows = store.read_text()
    digest = pd.read_csv(tmp_path / "lb" / "where.csv")["data_digest"].item()
    assert isinstance(digest, str) and len(digest) == 64  # the row names the data it was measured on
    assert run(copy) == 0 and store.read_text() == rows  # the same cells: found done, nothing ran again
    assert run(copy, "--store", str(tmp_path / "fresh.jsonl")) == 0  # its cached training serves the copy
    capsys.readouterr()
    # Same ids, other pixels (an edited copy): trained once under its own entry, never served the first copy's.
    assert run(other) == 0 and len(list((tmp_path / "cache" / "models").glob("*-data*"))) == 1
    other_digest = pd.read_csv(tmp_path / "lb" / "where.csv")["data_digest"].item()
    assert other_digest != digest and other_digest.startswith(next((tmp_path / "cache" / "models").glob("*-data*")).name.split("-data")[1])
    assert run(other, "--store", str(tmp_path / "other.jsonl")) == 0 and len(list((tmp_path / "cache" / "models").iterdir())) == 2
    assert run(first, "--store", str(tmp_path / "first.jsonl")) == 0  # the first copy still has its own
    assert pd.read_csv(tmp_path / "lb" / "where.csv")["data_digest"].item() == digest
    edited = next((tmp_path / "cache" / "models").glob("*-data*"))
    for entry in (tmp_path / "cache" / "models").iterdir():  # the first copy's training removed:
        if entry != edited:
            shutil.rmtree(entry)
    assert run(other, "--store", str(tmp_path / "again.jsonl")) == 0  # the edited copy's is still found
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [edited.name]


@pytest.mark.at_chance("plumbing: training ids of copies of a dataset")
def test_two_copies_of_a_dataset_in_one_grid_train_each_their_own(tmp_path: Path) -> None:
    """Two cifar10 entries differing only in root share their ids (where data lies is not in them):
    the second failed every cell with 'use another --cache'; each now has its own training."""
    import pandas as pd

    from wmbench.cli import main

    first, other = tmp_path / "first", tmp_path / "other"
    write_imagefolder(first)
    write_imagefolder(other)
    Image.fromarray(np.full((32, 32, 3), (0, 255, 0), dtype=np.uint8)).save(other / "train" / "a" / "0.png")
    (tmp_path / "s.yaml").write_text(
        f"name: two\nseeds: [0]\ndevice: cpu\ndatasets: [{{name: cifar10, label: first, args: {{layout: imagefolder, root: {first}}}}},"
        f" {{name: cifar10, label: other, args: {{layout: imagefolder, root: {other}}}}}]\n"
        "models: [{name: small_cnn, args: {width: 4, hidden: 8}}]\nmethods: [{name: none, args: {n_carriers: 64}}]\ntraining: {epochs: 1}\n"
    )
    assert main(["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"]) == 0
    rows = pd.read_csv(tmp_path / "lb" / "two.csv").set_index("dataset")
    assert rows.loc["first", "data_digest"] != rows.loc["other", "data_digest"] and rows["failure"].isna().all()
    assert len(list((tmp_path / "c" / "models").iterdir())) == 2
