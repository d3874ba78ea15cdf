"""Datasets read from files: the decoded cache follows edits of the source files, ImageFolder class
folders must match between train/ and test/, and unreadable images are ConfigErrors naming the file
(a fault of the filesystem stays an OSError)."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wmbench.datasets.decoded import source_fingerprint
from wmbench.errors import ConfigError
from wmbench.registry import DATASETS

CLASSES = tuple("abcdefghij")


def write_tree(root: Path, classes: tuple[str, ...] = CLASSES, test_classes: tuple[str, ...] | None = None) -> None:
    """An ImageFolder copy: one flat-colour 32x32 PNG per class in train/ and test/ (class i's red = 20 i)."""
    for split, names in (("train", classes), ("test", classes if test_classes is None else test_classes)):
        for name in names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            colour = (20 * classes.index(name) if name in classes else 0, 0, 0)
            Image.new("RGB", (32, 32), colour).save(root / split / name / "0.png")


def cifar(root: Path, **args: object) -> object:
    return DATASETS.build("cifar10", {"root": str(root), "layout": "imagefolder", **args})


def rewrite(file: Path, image: Image.Image) -> None:
    """Replace ``file`` by ``image``, its modification time moved on (coarse clocks can repeat it)."""
    before = file.stat().st_mtime_ns
    image.save(file)
    os.utime(file, ns=(before, before + 10**9))


def jpeg(size: int = 64) -> bytes:
    """A noisy JPEG (its scan data far longer than its header)."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


# --- the decoded cache follows the source files ---


def test_edited_image_is_decoded_again(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    write_tree(root)
    first = cifar(root).load(tmp_path / "cache")
    rewrite(root / "train" / "a" / "0.png", Image.new("RGB", (32, 32), (255, 255, 255)))
    second = cifar(root).load(tmp_path / "cache")
    assert not torch.equal(first.train_u8, second.train_u8) and second.train_u8[0].min() == 255
    assert first.digest != second.digest  # the rows name the data read now


def test_an_edit_replaces_the_earlier_decoding_of_its_copy_only(tmp_path: Path) -> None:
    """Each edit left another decoded copy behind (184 MB for CIFAR-10); another copy's stays."""
    root, other = tmp_path / "cifar", tmp_path / "other"
    write_tree(root)
    write_tree(other)
    cifar(root).load(tmp_path / "cache")
    cifar(other).load(tmp_path / "cache")
    for colour in (255, 128):
        rewrite(root / "train" / "a" / "0.png", Image.new("RGB", (32, 32), (colour, colour, colour)))
        assert cifar(root).load(tmp_path / "cache").train_u8[0].min() == colour
    assert len(list((tmp_path / "cache" / "datasets").glob("cifar10-*.safetensors"))) == 2  # root's latest, other's


def test_added_image_is_decoded_again_and_an_unchanged_tree_is_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cifar"
    write_tree(root)
    first = cifar(root).load(tmp_path / "cache")
    Image.new("RGB", (32, 32), (0, 0, 255)).save(root / "train" / "j" / "1.png")
    second = cifar(root).load(tmp_path / "cache")
    assert len(first.train_x) == 10 and len(second.train_x) == 11
    monkeypatch.setattr("wmbench.datasets.cifar10._read_imagefolder", None)  # nothing changed: no decoding
    assert cifar(root).load(tmp_path / "cache").digest == second.digest


def test_torchvision_batches_are_fingerprinted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cifar"
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (batches / "data_batch_1").write_bytes(b"\x01")

    def fake_read(root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
        value = (root / "cifar-10-batches-py" / "data_batch_1").read_bytes()[0]
        return torch.full((2, 3, 32, 32), value, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)

    monkeypatch.setattr("wmbench.datasets.cifar10._read_torchvision_cifar", fake_read)
    dataset = DATASETS.build("cifar10", {"root": str(root), "download": False})
    assert dataset.load(tmp_path / "cache").train_u8.max() == 1
    (batches / "data_batch_1").write_bytes(b"\x02\x02")
    assert dataset.load(tmp_path / "cache").train_u8.max() == 2


def test_edited_cityscapes_image_is_decoded_again(tmp_path: Path) -> None:
    root = tmp_path / "cityscapes"
    for split in ("train", "val"):
        (root / "leftImg8bit" / split / "city").mkdir(parents=True)
        (root / "gtFine" / split / "city").mkdir(parents=True)
        Image.new("RGB", (32, 16), (255, 0, 0)).save(root / "leftImg8bit" / split / "city" / "city_0_0_leftImg8bit.png")
        Image.new("L", (32, 16), 7).save(root / "gtFine" / split / "city" / "city_0_0_gtFine_labelIds.png")
    dataset = DATASETS.build("cityscapes", {"root": str(root), "size": [8, 16]})
    first = dataset.load(tmp_path / "cache")
    rewrite(root / "leftImg8bit" / "train" / "city" / "city_0_0_leftImg8bit.png", Image.new("RGB", (32, 16), (0, 255, 0)))
    second = dataset.load(tmp_path / "cache")
    assert first.train_u8[0, 1].max() == 0 and second.train_u8[0, 1].min() == 255 and first.digest != second.digest


def test_fingerprint_reads_no_file_and_sees_names_sizes_and_times(tmp_path: Path) -> None:
    write_tree(tmp_path)
    file = tmp_path / "train" / "a" / "0.png"
    base = source_fingerprint(tmp_path, ("train", "test"))
    assert source_fingerprint(tmp_path, ("train", "test", "missing")) == base  # a missing folder is empty
    os.chmod(file, 0)  # stat only: an unreadable file still has a fingerprint (as root, read is allowed anyway)
    stat = file.stat()
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert source_fingerprint(tmp_path, ("train", "test")) != base
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source_fingerprint(tmp_path, ("train", "test")) == base
    file.rename(file.with_name("1.png"))
    assert source_fingerprint(tmp_path, ("train", "test")) != base


# --- class folders ---


def test_class_missing_from_test_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    write_tree(root, test_classes=tuple(c for c in CLASSES if c != "c"))
    for call in (lambda: cifar(root).check(tmp_path / "cache"), lambda: cifar(root).load(tmp_path / "cache")):
        with pytest.raises(ConfigError) as info:
            call()
        assert info.value.field == "root" and "only in train/: 'c';" in info.value.message and "only in test/: -" in info.value.message


def test_folder_names_that_look_alike_are_told_apart(tmp_path: Path) -> None:
    """A folder copied from macOS (NFD) against its NFC twin, or one with a trailing space, printed
    as two identical names; they are shown escaped now."""
    import unicodedata

    nfc, nfd = "avi\u00f3n", unicodedata.normalize("NFD", "avi\u00f3n")
    for train, test in ((nfc, nfd), ("a", "a ")):
        root = tmp_path / f"cifar-{len(test)}"
        write_tree(root, classes=(train, *CLASSES[1:]), test_classes=(test, *CLASSES[1:]))
        with pytest.raises(ConfigError) as info:
            cifar(root).check(tmp_path / "cache")
        assert f"only in train/: {ascii(train)};" in info.value.message and f"only in test/: {ascii(test)}" in info.value.message
        assert ascii(train) != ascii(test)


@pytest.mark.parametrize("mode, value", [("I;16", 75 * 257), ("I", 75 * 257), ("F", 75 / 255)])
def test_an_image_of_more_than_8_bits_is_refused_not_clipped(tmp_path: Path, mode: str, value: float) -> None:
    """16-bit grey 75 decoded as white (255), a float image as black: convert("RGB") clips."""
    root = tmp_path / "cifar"
    write_tree(root)
    suffix = ".png" if mode == "I;16" else ".tif"
    Image.new(mode, (32, 32), value).save(root / "train" / "a" / f"wide{suffix}")
    with pytest.raises(ConfigError) as info:
        cifar(root).load(tmp_path / "cache")
    assert info.value.field == "root" and f"wide{suffix}" in info.value.message and "8-bit" in info.value.message


def test_a_symlink_loop_is_a_config_error_naming_the_link(tmp_path: Path) -> None:
    """A link to a folder above it (ln -s .. train/a/loop): exit 4 with a 1,700-character path."""
    root = tmp_path / "cifar"
    write_tree(root)
    os.symlink("..", root / "train" / "a" / "loop")
    with pytest.raises(ConfigError) as info:
        cifar(root).load(tmp_path / "cache")
    assert info.value.field == "root" and info.value.message.startswith(os.path.join("train", "a", "loop") + ": ")
    os.unlink(root / "train" / "a" / "loop")
    os.symlink("../b", root / "train" / "a" / "to_b")  # two links leading to each other
    os.symlink("../a", root / "train" / "b" / "to_a")
    with pytest.raises(ConfigError) as info:
        cifar(root).load(tmp_path / "cache")
    assert info.value.field == "root" and "a loop" in info.value.message and len(info.value.message) < 200


def test_stray_folder_in_test_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    write_tree(root)
    (root / "test" / ".ipynb_checkpoints").mkdir()  # ImageFolder would take it for a class, shifting b..j
    with pytest.raises(ConfigError) as info:
        cifar(root).load(tmp_path / "cache")
    assert info.value.field == "root" and "only in test/: '.ipynb_checkpoints'" in info.value.message


def test_class_count_must_be_ten(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    write_tree(root, classes=("a", "b"))
    with pytest.raises(ConfigError) as info:
        cifar(root).check(tmp_path / "cache")
    assert info.value.field == "root" and "2 class folders (a, b)" in info.value.message and "has 10" in info.value.message


# --- unreadable images ---


@pytest.mark.parametrize("where, content", [
    ("train/d/bad.jpg", lambda: b"\xff\xd8\xff\xe0 this is not a JPEG" * 4),  # corrupt
    ("test/e/cut.jpg", lambda: jpeg()[: len(jpeg()) * 2 // 3]),  # truncated
])
def test_an_unreadable_image_names_the_file(tmp_path: Path, where: str, content) -> None:
    root = tmp_path / "cifar"
    write_tree(root)
    bad = root / where
    bad.write_bytes(content())
    with pytest.raises(ConfigError) as info:
        cifar(root).load(tmp_path / "cache")
    assert info.value.field == "root" and info.value.message.startswith(f"{bad}: not a readable image (")


def test_empty_class_folder_names_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    write_tree(root)
    (root / "test" / "f" / "0.png").unlink()
    (root / "test" / "f" / "notes.txt").write_text("no image here")
    with pytest.raises(ConfigError) as info:
        cifar(root).load(tmp_path / "cache")
    assert info.value.field == "root" and str(root / "test" / "f") in info.value.message and "no image" in info.value.message


def test_empty_train_names_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    for call in (lambda: cifar(root).check(tmp_path / "cache"), lambda: cifar(root).load(tmp_path / "cache")):
        with pytest.raises(ConfigError) as info:
            call()
        assert info.value.field == "root" and info.value.message.startswith(f"{root / 'train'}: no class folder")


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO])
def test_filesystem_fault_on_an_image_stays_an_os_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    root = tmp_path / "cifar"
    write_tree(root)

    def refuse(file: str, *args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code), str(file))

    monkeypatch.setattr(Image, "open", refuse)
    with pytest.raises(OSError) as info:
        cifar(root).load(tmp_path / "cache")
    assert info.value.errno == code and info.value.filename.startswith(str(root))


def test_unreadable_cityscapes_label_map_names_it(tmp_path: Path) -> None:
    root = tmp_path / "cityscapes"
    for split in ("train", "val"):
        (root / "leftImg8bit" / split / "city").mkdir(parents=True)
        (root / "gtFine" / split / "city").mkdir(parents=True)
        Image.new("RGB", (32, 16)).save(root / "leftImg8bit" / split / "city" / "city_0_0_leftImg8bit.png")
        Image.new("L", (32, 16)).save(root / "gtFine" / split / "city" / "city_0_0_gtFine_labelIds.png")
    bad = root / "gtFine" / "val" / "city" / "city_0_0_gtFine_labelIds.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(ConfigError) as info:
        DATASETS.build("cityscapes", {"root": str(root), "size": [8, 16]}).load(tmp_path / "cache")
    assert info.value.field == "root" and info.value.message.startswith(f"{bad}: not a readable image (")


def run_cli(tmp_path: Path, root: Path) -> int:
    from wmbench.cli import main

    (tmp_path / "s.yaml").write_text(
        "name: inputs\nseeds: [0]\ndevice: cpu\ndatasets: [{name: cifar10, args: {layout: imagefolder}}]\n"
        "models: [{name: small_cnn, args: {width: 4, hidden: 8}}]\nmethods: [none]\ntraining: {epochs: 1}\n"
    )
    args = ["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "lb"), "-q"]
    return main([*args, "--set", f"datasets[0].args.root={root}"])


def test_cli_bad_image_is_exit_2_and_a_denied_root_exit_4(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "cifar"
    write_tree(root)
    bad = root / "train" / "a" / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert run_cli(tmp_path, root) == 2
    err = capsys.readouterr().err
    assert "datasets[0].args.root" in err and f"{bad}: not a readable image" in err
    bad.unlink()
    scandir = os.scandir

    def denied(path: object = ".") -> object:
        if str(path).startswith(str(root)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", denied)
    assert run_cli(tmp_path, root) == 4  # the machine's fault, not the scenario's
    assert f"{root / 'train'}: Permission denied" in capsys.readouterr().err


@pytest.mark.at_chance("plumbing: which rows run again when the data changes")
def test_rows_measured_on_other_data_run_again(tmp_path: Path) -> None:
    """An image of the copy edited after a run: the store's rows (measured on the old contents)
    were reused as done; now they run again, here on a fresh cache beside the same store."""
    import pandas as pd

    from wmbench.cli import main

    root = tmp_path / "cifar"
    write_tree(root)
    (tmp_path / "s.yaml").write_text(
        "name: inputs\nseeds: [0]\ndevice: cpu\ndatasets: [{name: cifar10, args: {layout: imagefolder}}]\n"
        "models: [{name: small_cnn, args: {width: 4, hidden: 8}}]\nmethods: [{name: none, args: {n_carriers: 64}}]\n"
        "training: {epochs: 1}\nattacks: [{name: noise, strengths: [0.1]}]\n"
    )

    def run(cache: str) -> pd.DataFrame:
        args = ["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / cache), "--store", str(tmp_path / "store.jsonl"),
                "--out", str(tmp_path / "lb"), "-q", "--set", f"datasets[0].args.root={root}"]
        assert main(args) == 0
        return pd.read_csv(tmp_path / "lb" / "inputs.csv")

    before = run("c1")
    rewrite(root / "test" / "c" / "0.png", Image.new("RGB", (32, 32), (255, 255, 255)))
    after = run("c2")
    assert before["data_digest"].nunique() == after["data_digest"].nunique() == 1
    assert before["data_digest"].iloc[0] != after["data_digest"].iloc[0]


def test_a_fifo_named_like_an_image_is_an_error_not_a_hang(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    write_tree(root)
    os.mkfifo(root / "train" / "a" / "pipe.jpg")
    with pytest.raises(ConfigError, match="pipe.jpg: not a regular file"):
        cifar(root).load(tmp_path / "cache")


@pytest.mark.parametrize("fraction", [0.001, 0.005, 0.995, 0.9999])
def test_a_digits_split_without_every_class_is_a_config_error(fraction: float) -> None:
    """test_fraction 0.001 passed its range check and then crashed in scikit-learn (exit 1)."""
    with pytest.raises(ConfigError) as info:
        DATASETS.build("digits", {"test_fraction": fraction}).load(Path("unused"))
    assert info.value.field == "test_fraction" and "one image per class" in info.value.message


def test_the_extreme_digits_splits_that_hold_every_class_load() -> None:
    for fraction in (0.006, 0.99):
        data = DATASETS.build("digits", {"test_fraction": fraction}).load(Path("unused"))
        assert set(data.train_y.tolist()) == set(data.test_y.tolist()) == set(range(10))


def test_an_imagefolder_copy_read_with_the_default_layout_is_refused(tmp_path: Path) -> None:
    """Without layout: imagefolder the dry run said 'its data would be downloaded' (into the copy)."""
    root = tmp_path / "cifar"
    write_tree(root)
    for call in (lambda d: d.check(tmp_path / "cache"), lambda d: d.load(tmp_path / "cache")):
        with pytest.raises(ConfigError) as info:
            call(DATASETS.build("cifar10", {"root": str(root)}))
        assert info.value.field == "root" and "set layout: imagefolder" in info.value.message
