"""What a model file that safetensors cannot read is, told from its first bytes and, for a zip,
its list of members: no pickle or TorchScript loader ever runs on it. ``wmbench detect``
names it in its one-line refusal."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import BinaryIO

CONVERT = "convert its state dict to safetensors (README, 'Proving ownership: embed and detect')"
MAX_HEADER = 100 * 2**20  # safetensors' own limit on a header's size


def foreign_format(path: Path) -> str | None:
    """A short description of ``path``'s format where it is known and not safetensors (a pickle, a
    TorchScript archive, an empty or truncated file), with what to do; None where it is unknown."""
    size = path.stat().st_size
    if size == 0:
        return "an empty file, not a safetensors model"
    with open(path, "rb") as fh:
        head = fh.read(16)
        if head.startswith(b"PK\x03\x04"):
            return _zip_format(path)
        if head[8:9] == b"{":  # a safetensors layout (a JSON header after its length), whatever its length's bytes look like
            return _truncated(fh, head, size)
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            return f"a pickle (torch.save's legacy format, or Python's pickle), not safetensors: wmbench never loads pickled checkpoints; {CONVERT}"
        if head.startswith(b"\x89HDF"):
            return "an HDF5 file (Keras?), not a PyTorch safetensors model"
        return _truncated(fh, head, size)


def _zip_format(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()  # the central directory only: no member is read
    except (zipfile.BadZipFile, OSError, ValueError):
        return "a damaged or truncated zip archive (a torch.save checkpoint?), not safetensors"
    if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
        return f"a TorchScript archive (torch.jit.save), not safetensors: wmbench never loads a model file's code or pickles; {CONVERT}"
    if any(n.endswith("data.pkl") for n in names):
        return f"a PyTorch checkpoint written by torch.save (a pickle), not safetensors: wmbench never loads pickled checkpoints; {CONVERT}"
    return "a zip archive, not a safetensors model file"


def _truncated(fh: BinaryIO, head: bytes, size: int) -> str | None:
    """``a truncated safetensors file`` where its header, or the tensors it describes, end past the file."""
    length = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if head[8:9] == b"{" and size - 8 < length <= MAX_HEADER:
        return f"a truncated safetensors file ({size} bytes: its header alone takes {8 + length})"
    if not 0 < length <= min(size - 8, MAX_HEADER):
        return None
    fh.seek(8)
    try:
        header = json.loads(fh.read(length))
        end = 8 + length + max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    return f"a truncated safetensors file ({size} bytes of the {end} its header describes)" if end > size else None
