"""An image written into weights at secret random positions, read back by Pearson correlation.

Shared by WaterMAS, Tartaglione and the unwatermarked reference. The key holds, per carrier:
``param_id`` (into ``meta['params']``), ``flat_idx`` (into that tensor viewed flat), ``pixels``
(the inserted image, 0..255), the mapping's ``mu``/``sigma`` and, once training is over,
``channel_norm`` (the L2 norm of the carrier's output channel) and ``balance_scale`` (the factor
that Sinkhorn balancing of its tensor applies to it), both for aligned detection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import ClassVar, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from wmbench.api import Carriers, Detection, Key, keyed_tensor
from wmbench.errors import ConfigError, NotApplicable
from wmbench.liveness import live_map
from wmbench.metrics import pearson_detection
from wmbench.models import weight_params

CarrierScope = Literal["weights", "all"]


def candidate_params(model: nn.Module, scope: CarrierScope) -> dict[str, nn.Parameter]:
    """Tensors that may carry the mark: Conv/Linear weights, or every parameter (``all``)."""
    if scope == "all":
        return dict(model.named_parameters())
    return weight_params(model)


def load_image(path: str | None, n: int) -> Tensor:
    """Grayscale pixels (0..255, float) of ``path`` (default: the shipped image), resized to a
    square of side ceil(sqrt(n)) and cut to its first ``n`` pixels in row-major order."""
    from PIL import Image, UnidentifiedImageError

    source = Path(path).expanduser() if path else resources.files("wmbench") / "assets" / "mark.png"
    side = math.isqrt(n - 1) + 1 if n > 0 else 0
    try:
        with Image.open(source) as img:  # type: ignore[arg-type]
            gray = img.convert("L").resize((side, side), Image.BILINEAR)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise ConfigError("image", f"cannot read image {source}: {exc}") from None
    return torch.from_numpy(np.asarray(gray, dtype=np.float32).reshape(-1)[:n].copy())


def check_image(path: str) -> str | None:
    """Why ``path`` cannot serve as a mark image (missing, not an image), or None if it can."""
    from PIL import Image

    try:
        source = Path(path).expanduser()
    except RuntimeError as exc:  # ~user that does not exist
        return f"cannot resolve image path {path!r}: {exc}"
    if not source.is_file():
        return f"no such image file: {source}"
    try:
        with Image.open(source) as img:
            img.verify()
    except Exception as exc:  # PIL raises many types for damaged or foreign files
        return f"not an image: {source} ({exc})"
    return None


def sample_positions(sizes: list[int], n: int, rng: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` distinct positions drawn uniformly over all entries of tensors of ``sizes`` (so a
    tensor is chosen with probability proportional to its size); returns (param_id, flat_idx)."""
    total = sum(sizes)
    if n > total:
        raise ConfigError("n_carriers", f"{n} carriers requested but the model has only {total} candidate weights")
    chosen = np.empty(0, dtype=np.int64)
    while len(chosen) < n:  # draw with replacement, keep first occurrences in order, top up
        draw = torch.randint(total, (2 * (n - len(chosen)) + 16,), generator=rng).numpy()
        merged = np.concatenate([chosen, draw])
        _, first = np.unique(merged, return_index=True)
        chosen = merged[np.sort(first)][:n]
    chosen = torch.from_numpy(chosen)
    offsets = torch.tensor([0] + sizes).cumsum(0)
    param_id = torch.searchsorted(offsets, chosen, right=True) - 1
    return param_id, chosen - offsets[param_id]


def draw_key(
    model: nn.Module,
    method: str,
    n: int,
    scope: CarrierScope,
    image: str | None,
    rng: torch.Generator,
    input_shape: Sequence[int] | None = None,
    varying_only: bool = False,
) -> Key:
    """Carrier positions, the image and its eq. 5 mapping (mu, sigma of each carrier's tensor now).

    With ``input_shape`` (C, H, W), carriers are drawn only among the weights that can change the
    output at that input size (``wmbench.liveness``): uniformly over the live entries, so a model
    with no dead weight gets exactly the draw it gets without ``input_shape``. ``varying_only``
    leaves out tensors whose entries are all equal now (BatchNorm's weights and biases at
    initialisation): eq. 5 maps the image through each tensor's std, and theirs is 0."""
    params = candidate_params(model, scope)
    if varying_only:
        params = {k: p for k, p in params.items() if p.numel() == 1 or bool((p.detach() != p.detach().reshape(-1)[0]).any())}
        if not params:
            raise ConfigError("carriers_scope", "every candidate tensor is constant: nothing can carry an image mapped through its spread")
    names = list(params)
    if input_shape is None:
        param_id, flat_idx = sample_positions([p.numel() for p in params.values()], n, rng)
    else:
        live = live_map(model, input_shape)
        try:
            param_id, live_idx = sample_positions([live.live_count(k) for k in names], n, rng)
        except ConfigError as exc:
            raise ConfigError(exc.field, f"{exc.message} that can affect the output at input size {tuple(input_shape)}") from None
        flat_idx = live_idx.clone()
        for pid, name in enumerate(names):
            chosen = param_id == pid
            if bool(chosen.any()) and live.live_count(name) < live.numel(name):
                flat_idx[chosen] = live.live_indices(name)[live_idx[chosen]]
    stats = torch.tensor([[float(p.detach().mean()), float(p.detach().std()) if p.numel() > 1 else 1.0] for p in params.values()])
    return Key(
        method,
        {
            "param_id": param_id,
            "flat_idx": flat_idx,
            "pixels": load_image(image, n),
            "mu": stats[param_id, 0].float(),
            "sigma": stats[param_id, 1].clamp_min(1e-8).float(),
        },
        {"params": names, "shapes": [list(params[k].shape) for k in names]},
    )


def pixels_to_weights(key: Key, scale: float = 1.0) -> Tensor:
    """Eq. 5 [wmbench choice]: x = 2p/255 - 1, w = mu + sigma * scale * x."""
    t = key.tensors
    return t["mu"] + t["sigma"] * scale * (2.0 * t["pixels"] / 255.0 - 1.0)


@dataclass
class CarrierSet:
    """The key's carriers bound to one model's parameter objects, grouped by tensor."""

    params: list[nn.Parameter]
    indices: list[Tensor]  # flat indices into each param
    slots: list[Tensor]  # positions of those carriers in the key's order

    @classmethod
    def bind(cls, model: nn.Module, key: Key) -> "CarrierSet":
        named = dict(model.named_parameters())
        params, indices, slots = [], [], []
        param_id, flat_idx = key.tensors["param_id"], key.tensors["flat_idx"]
        for pid, (name, shape) in enumerate(zip(key.meta["params"], key.meta["shapes"])):
            mask = param_id == pid
            if not bool(mask.any()):
                continue
            p = keyed_tensor(named, name, shape)
            params.append(p)
            indices.append(flat_idx[mask].to(p.device))
            slots.append(mask.nonzero().flatten())
        return cls(params, indices, slots)

    def read(self, n: int) -> Tensor:
        """Current carrier values, in the key's order (on the CPU)."""
        out = torch.empty(n)
        for p, idx, slot in zip(self.params, self.indices, self.slots):
            out[slot] = p.detach().reshape(-1)[idx].float().cpu()
        return out

    def per_param(self, values: Tensor) -> list[Tensor]:
        """``values`` (in the key's order) split per tensor, on each tensor's device and dtype."""
        return [values[slot].to(p.device, p.dtype) for p, slot in zip(self.params, self.slots)]

    @torch.no_grad()
    def write(self, values: list[Tensor]) -> None:
        """Set the carriers to per-tensor ``values`` (from ``per_param``), bit for bit."""
        for p, idx, v in zip(self.params, self.indices, values):
            p.data.view(-1)[idx] = v

    def channel_norms(self, n: int) -> Tensor:
        """L2 norm of each carrier's output channel (row of its tensor); NaN in 1-D tensors, where
        the "channel" is the carrier itself and a norm ratio would hand back the recorded value."""
        out = torch.full((n,), float("nan"))
        for p, idx, slot in zip(self.params, self.indices, self.slots):
            if p.dim() < 2:
                continue
            rows = p.detach().reshape(p.shape[0], -1)
            out[slot] = rows.float().norm(dim=1)[idx // rows.shape[1]].cpu()
        return out

    def balance_scales(self, n: int) -> Tensor:
        """Per carrier, the factor ``balancing`` of its tensor applies to it (NaN in 1-D tensors)."""
        out = torch.full((n,), float("nan"))
        for p, idx, slot in zip(self.params, self.indices, self.slots):
            if p.dim() < 2:
                continue
            rows, cols = balancing(p)
            per_row, kernel = p[0].numel(), p[0, 0].numel()
            idx = idx.to(rows.device)
            out[slot] = (rows[idx // per_row] * cols[(idx % per_row) // kernel]).float().cpu()
        return out


@torch.no_grad()
def balancing(p: Tensor, tol: float = 1e-9, max_iter: int = 300) -> tuple[Tensor, Tensor]:
    """Factors r (per output channel) and c (per input channel) such that r_o c_i p[o, i, ...] has
    squared row sums all equal to the number of input channels and squared column sums all equal to
    the number of output channels (Sinkhorn balancing of p^2 summed over the kernel) [wmbench choice].

    The balanced tensor is the same for p and for any diag(a) p diag(b), a, b > 0: it undoes the
    scale attack's rescaling of outputs (BatchNorm rule, ReLU producer) and inputs (ReLU consumer).
    All-zero rows and columns get factor 0; where balancing does not converge (a sparsity pattern
    without total support, e.g. after heavy pruning) all factors are NaN. Grouped convolutions are
    balanced on their (out, in / groups) view: exact for groups = 1 and depthwise convolutions."""
    a = torch.linalg.vector_norm(p.detach().reshape(p.shape[0], p.shape[1], -1), dim=-1, dtype=torch.float64).pow(2)
    live_rows, live_cols = a.sum(1) > 0, a.sum(0) > 0
    sub = a[live_rows][:, live_cols]
    m, k = sub.shape
    x = torch.ones(m, dtype=torch.float64, device=a.device)
    y = torch.ones(k, dtype=torch.float64, device=a.device)
    done = k == 0
    for _ in range(max_iter if k else 0):
        x = k / (sub @ y)
        col = sub.T @ x
        err = float((col * y / m - 1.0).abs().max())
        y = m / col
        done = err < tol
        if done or err != err:
            break
    rows, cols = torch.zeros_like(a[:, 0]), torch.zeros_like(a[0])
    if not done:
        return rows.fill_(float("nan")), cols.fill_(float("nan"))
    rows[live_rows], cols[live_cols] = x.sqrt(), y.sqrt()
    return rows, cols


def carriers_of(key: Key) -> Carriers:
    """Parameter name -> flat indices of the carriers."""
    out: Carriers = {}
    for pid, name in enumerate(key.meta["params"]):
        idx = key.tensors["flat_idx"][key.tensors["param_id"] == pid]
        if len(idx):
            out[name] = idx
    return out


# Key tensors in which NaN is a value, not damage: the channel records of carriers in 1-D tensors
# (biases, norm layers), which have no output channel to align.
NAN_MEANS_NONE = frozenset({"channel_norm", "balance_scale"})


def record_channel_norms(model: nn.Module, key: Key) -> Key:
    """The key with each carrier's output-channel norm and balancing factor as they are now (end of
    embedding)."""
    n = len(key.tensors["flat_idx"])
    carriers = CarrierSet.bind(model, key)
    key.tensors["channel_norm"] = carriers.channel_norms(n)
    key.tensors["balance_scale"] = carriers.balance_scales(n)
    return key


def extract_pixels(model: nn.Module, key: Key, align: bool = False, scale: float = 1.0) -> Tensor:
    """Invert eq. 5 on the carriers; with ``align``, first undo per-channel rescaling: carriers of
    Conv/Linear weights are balanced (``balancing``) and divided by the factor recorded at embedding,
    which undoes any rescaling of output and input channels; where balancing fails (or keys lack
    ``balance_scale``) they are divided by (their channel's norm now / the norm recorded). Carriers
    in 1-D tensors (biases, BatchNorm) are read as they are."""
    n = len(key.tensors["flat_idx"])
    carriers = CarrierSet.bind(model, key)
    w = carriers.read(n)
    if align:
        if "channel_norm" not in key.tensors:
            raise NotApplicable("key has no recorded channel norms (align needs a key from wmbench >= 0.1)")
        ratio = carriers.channel_norms(n) / key.tensors["channel_norm"].clamp_min(1e-12)
        aligned = torch.where(torch.isfinite(ratio), w / ratio.clamp_min(1e-12), w)  # 1-D carriers: as read
        recorded = key.tensors.get("balance_scale")
        if recorded is not None:  # where balancing fails, now or then, the norm ratio stands in
            now = carriers.balance_scales(n)
            factor = now / recorded
            aligned = torch.where(torch.isfinite(factor) & (recorded > 0), w * factor, aligned)
        w = aligned
    t = key.tensors
    return 255.0 * ((w - t["mu"]) / (t["sigma"] * scale) + 1.0) / 2.0


def detect_image(model: nn.Module, key: Key, align: bool = False, scale: float = 1.0) -> Detection:
    """Pearson r between the recovered and the inserted image, with its p-value."""
    return pearson_detection(extract_pixels(model, key, align, scale), key.tensors["pixels"])


class ImageMarkDetection:
    """Mixin for methods whose mark is an image read back by Pearson correlation: key completion,
    extraction, detection and carriers, honouring the method's ``align`` field."""

    align: bool
    statistic: ClassVar[str] = "pearson_r"

    def finalize_key(self, model: nn.Module, key: Key) -> Key:
        return record_channel_norms(model, key)

    def extract(self, model: nn.Module, key: Key) -> Tensor:
        return extract_pixels(model, key, self.align)

    def detect(self, model: nn.Module, key: Key) -> Detection:
        return detect_image(model, key, self.align)

    def carriers(self, key: Key) -> Carriers:
        return carriers_of(key)
