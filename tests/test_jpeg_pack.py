"""The JPEG folder pack: byte-identical round trip (files of another encoder setting stored whole),
smaller than the files, and a damaged or hostile pack refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from wmbench.jpeg_pack import main, pack, unpack


def jpeg(seed: int, quality: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    for s, split in enumerate(("train", "test")):
        for c, label in enumerate(("cat", "dog")):
            (root / split / label).mkdir(parents=True)
            for i in range(5):
                (root / split / label / f"{i:04d}.jpg").write_bytes(jpeg(100 * s + 10 * c + i, 75))
    (root / "train" / "cat" / "odd.jpg").write_bytes(jpeg(99, 20))  # other quantisation tables
    return root


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.jpg")}


def test_round_trip_is_byte_identical_and_smaller(folder, tmp_path):
    count, size = pack(folder, tmp_path / "p.npz")
    assert count == 21
    assert size < sum(len(b) for b in files(folder).values())  # the shared tables are stored once
    assert unpack(tmp_path / "p.npz", tmp_path / "out") == 21
    assert files(tmp_path / "out") == files(folder)


def test_a_damaged_or_hostile_pack_is_refused(folder, tmp_path):
    pack(folder, tmp_path / "p.npz")
    with np.load(tmp_path / "p.npz") as z:
        arrays = dict(z)
    blob = arrays["blob"].copy()
    blob[100] ^= 1
    np.savez(tmp_path / "bad.npz", **{**arrays, "blob": blob})
    with pytest.raises(SystemExit, match="damaged"):
        unpack(tmp_path / "bad.npz", tmp_path / "out")
    paths = arrays["paths"].tobytes().decode().split("\n")
    paths[0] = "../../escaped.jpg"
    np.savez(tmp_path / "evil.npz", **{**arrays, "paths": np.frombuffer("\n".join(paths).encode(), dtype=np.uint8)})
    with pytest.raises(SystemExit, match="leaves"):
        unpack(tmp_path / "evil.npz", tmp_path / "out2")
    assert not (tmp_path / "escaped.jpg").exists()


def test_command_line(folder, tmp_path, capsys):
    assert main(["pack", str(folder), str(tmp_path / "p.npz")]) == 0
    assert main(["unpack", str(tmp_path / "p.npz"), str(tmp_path / "out")]) == 0
    assert "21 files" in capsys.readouterr().out and files(tmp_path / "out") == files(folder)
