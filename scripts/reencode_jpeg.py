"""Re-encode every JPEG of an ImageFolder tree at one quality: the dose arm of the JPEG control
(scenarios/selection/jpeg_dose.yaml). Pillow keeps the 4:2:0 chroma subsampling of the shared copy.

Usage: python scripts/reencode_jpeg.py SRC DST QUALITY   (e.g. ../shared/data/cifar10 /tmp/cifar10_q50 50)
"""

import sys
from pathlib import Path

from PIL import Image


def main(src: Path, dst: Path, quality: int) -> None:
    count = 0
    for path in sorted(src.rglob("*.jpg")):
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("RGB").save(out, "JPEG", quality=quality)
        count += 1
    print(f"{count} images re-encoded at quality {quality} into {dst}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
