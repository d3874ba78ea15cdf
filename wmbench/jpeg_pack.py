"""A JPEG image folder (CIFAR-10's ImageFolder layout) packed into one small file, and restored
byte for byte: for a machine the folder cannot reach whole (a lent GPU takes 64 MiB of files).

Images written by one encoder share everything before their scan data (quantisation and Huffman
tables, frame header: 623 bytes of CIFAR-10's 920 on average), so the pack stores that prefix once
and each file's remaining bytes: ../shared/data/cifar10 (55 MB of JPEG in 60 000 files) packs into
about 20 MB. A file with another prefix is stored whole. ``unpack`` checks a SHA-256 of every
file's bytes, so the restored folder decodes to the same pixels (same ``data_digest``).

    python -m wmbench.jpeg_pack pack ../shared/data/cifar10 .device/cifar10.npz
    python -m wmbench.jpeg_pack unpack .device/cifar10.npz /tmp/cifar10
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections import Counter
from pathlib import Path

import numpy as np

SOS = b"\xff\xda"  # start of scan: the segment after which each image's own bytes begin


def scan_prefix(data: bytes) -> bytes:
    """The bytes of a JPEG up to the end of its start-of-scan header (b"" when there is none)."""
    at = data.find(SOS)
    if at < 0 or at + 4 > len(data):
        return b""
    return data[: at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")]


def pack(root: Path, out: Path) -> tuple[int, int]:
    """Pack every ``*.jpg`` under ``root`` into ``out`` (an uncompressed .npz); (files, bytes written)."""
    paths = sorted(p for p in root.rglob("*.jpg") if p.is_file())
    if not paths:
        raise SystemExit(f"no .jpg files under {root}")
    contents = [p.read_bytes() for p in paths]
    header = Counter(scan_prefix(c) for c in contents).most_common(1)[0][0]
    whole = np.array([not c.startswith(header) or not header for c in contents])
    tails = [c if w else c[len(header) :] for c, w in zip(contents, whole)]
    digest = hashlib.sha256(b"".join(contents)).hexdigest()
    np.savez(
        out,
        header=np.frombuffer(header, dtype=np.uint8),
        blob=np.frombuffer(b"".join(tails), dtype=np.uint8),
        offsets=np.cumsum([0] + [len(t) for t in tails]).astype(np.int64),
        whole=whole,
        paths=np.frombuffer("\n".join(p.relative_to(root).as_posix() for p in paths).encode(), dtype=np.uint8),
        sha256=np.array(digest),
    )
    return len(paths), out.stat().st_size


def unpack(pack_file: Path, root: Path) -> int:
    """Restore the files of ``pack_file`` under ``root``; the number written. A pack whose bytes do
    not hash to its recorded SHA-256, or a path that would leave ``root``, is an error."""
    with np.load(pack_file, allow_pickle=False) as z:
        header, blob, offsets, whole = z["header"].tobytes(), z["blob"], z["offsets"], z["whole"]
        paths, digest = z["paths"].tobytes().decode().split("\n"), str(z["sha256"])
    contents = [
        (b"" if w else header) + blob[offsets[i] : offsets[i + 1]].tobytes() for i, w in enumerate(whole)
    ]
    if hashlib.sha256(b"".join(contents)).hexdigest() != digest:
        raise SystemExit(f"{pack_file}: damaged (its files do not hash to the recorded SHA-256)")
    root = root.resolve()
    for rel, data in zip(paths, contents):
        target = (root / rel).resolve()
        if not target.is_relative_to(root):
            raise SystemExit(f"{pack_file}: path {rel!r} leaves {root}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return len(paths)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wmbench.jpeg_pack", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="pack ROOT's *.jpg files into OUT (.npz)")
    p.add_argument("root", type=Path)
    p.add_argument("out", type=Path)
    u = sub.add_parser("unpack", help="restore PACK's files under ROOT")
    u.add_argument("pack", type=Path)
    u.add_argument("root", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        files, size = pack(args.root, args.out)
        print(f"{args.out}: {files} files, {size / 1e6:.1f} MB")
    else:
        print(f"{args.root}: {unpack(args.pack, args.root)} files restored")
    return 0


if __name__ == "__main__":
    sys.exit(main())
