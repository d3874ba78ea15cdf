"""airbench's alternating flip (``training.alternate_flip``): each image mirrored in every other epoch."""

from __future__ import annotations

import pytest
import torch

from wmbench.augment import AlternatingFlip, mirror
from wmbench.errors import ConfigError
from wmbench.scenario import build_dataclass
from wmbench.train import DeviceData, Trainer, TrainingConfig


def test_each_image_is_mirrored_in_every_other_epoch_from_a_seeded_random_half() -> None:
    flips = AlternatingFlip(1000, torch.Generator().manual_seed(0))
    assert 400 < int(flips.mask(0).sum()) < 600
    assert torch.equal(flips.mask(0), flips.mask(2)) and torch.equal(flips.mask(1), flips.mask(5))
    assert bool((flips.mask(0) ^ flips.mask(1)).all())
    assert torch.equal(flips.mask(0), AlternatingFlip(1000, torch.Generator().manual_seed(0)).mask(0))
    assert not torch.equal(flips.mask(0), AlternatingFlip(1000, torch.Generator().manual_seed(1)).mask(0))


def test_batches_mirror_exactly_the_flagged_images_and_their_label_maps() -> None:
    x = torch.randn(50, 2, 4, 4)
    data = DeviceData(x, torch.arange(50))  # label i: image i
    flagged = torch.arange(50) % 3 == 0
    seen = 0
    for xb, yb in data.batches(8, torch.Generator().manual_seed(0), flagged):
        for image, i in zip(xb, yb.tolist()):
            assert torch.equal(image, x[i].flip(-1) if flagged[i] else x[i])
            seen += 1
    assert seen == 50
    maps = torch.arange(2 * 4 * 4).view(2, 4, 4)
    images, labels = mirror(maps[:, None].float(), maps, torch.tensor([True, False]))
    assert torch.equal(labels[0], maps[0].flip(-1)) and torch.equal(labels[1], maps[1])
    assert torch.equal(images[:, 0].long(), labels)


def test_the_per_batch_random_flip_is_off_under_alternate_flip_and_alone_it_is_refused() -> None:
    config = TrainingConfig(flip=True, alternate_flip=True, translate=2)
    assert config.augment.flip is False and config.augment.translate == 2
    assert TrainingConfig(flip=True).augment.flip is True
    with pytest.raises(ConfigError, match="alternate_flip needs flip"):
        build_dataclass(TrainingConfig, {"alternate_flip": True}, "training")


def test_a_fit_shows_each_image_both_ways_in_two_consecutive_epochs() -> None:
    from wmbench.datasets.synthetic import Synthetic

    data = Synthetic(n_train=40, size=8).load(None)  # type: ignore[arg-type]
    config = TrainingConfig(epochs=3, batch_size=10, lr=1e-9, flip=True, alternate_flip=True)
    seen: list[torch.Tensor] = []

    def recording_step(model, batch, loss_fn, optimizer):  # records the inputs, trains nothing
        seen.append(batch[0].clone())
        optimizer.step()
        return torch.zeros(())

    Trainer(data, config, torch.device("cpu"), torch.Generator().manual_seed(0), progress=False).fit(torch.nn.Linear(1, 1), recording_step)
    per_epoch = [torch.cat(seen[i : i + 4]) for i in range(0, 12, 4)]
    originals = {bytes(img.numpy().tobytes()) for img in data.train_x}
    for epoch in per_epoch:
        plain = sum(bytes(img.numpy().tobytes()) in originals for img in epoch)
        assert 0 < plain < 40  # some mirrored, some not
    for a, b in zip(per_epoch, per_epoch[1:]):
        assert sum(bytes(img.numpy().tobytes()) in originals for img in torch.cat([a, b])) == 40  # each image once plain
