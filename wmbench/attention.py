"""Function-preserving rearrangements inside ``nn.MultiheadAttention`` (torchvision's ViT, any model
built on it), which no dependency-graph unit group covers.

Three symmetries leave the layer's output exactly the same:

- the heads may be reordered (q, k and v rows of a head move together, with its out_proj columns);
- within a head, the query/key dimensions may be permuted (the same permutation on q and k rows:
  the score is a sum over them) and the value dimensions too (with out_proj's columns);
- a query dimension may be multiplied by c and its key dimension by 1/c, any c != 0 (the score
  q . k is unchanged), and a value dimension by c with its out_proj column by 1/c.

``rearrange`` applies them (the permute and scale attacks draw them); ``match`` finds the ones that
map a suspect's layer onto the owner's, for resynchronised detection (wmbench.resync).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

SCALE_COS = 0.98  # a dimension's factor is undone only where its row is this close to a multiple of the reference's
# The smallest |factor| resync undoes (here and in wmbench.resync). A factor is estimated only where
# a row is within SCALE_COS of a multiple of the reference's, so a tiny one is real: ``scale``
# reaches e^-30 ~ 9e-14 at its largest strength (ReLU-rule rows, attention dimensions). A floor of
# 1e-6 left every factor below it in place, and resync read scale >= 14 worse than plain detection
# (small_cnn, WaterMAS: r 0.05 against 0.21 at strength 30).
MIN_FACTOR = 1e-30


@dataclass(frozen=True)
class HeadMap:
    """New head ``h`` is old head ``heads[h]``; within it, query/key dimension ``i`` is that head's
    old dimension ``qk[h, i]`` and value dimension ``i`` its old ``v[h, i]``; after the move, query
    rows are multiplied by ``qk_factor`` (key rows divided) and value rows by ``v_factor`` (out_proj
    columns divided). Factors (heads, head_dim); None: 1."""

    heads: Tensor
    qk: Tensor
    v: Tensor
    qk_factor: Tensor | None = None
    v_factor: Tensor | None = None


def attention_layers(model: nn.Module) -> list[tuple[str, nn.MultiheadAttention]]:
    """Every ``nn.MultiheadAttention`` of ``model`` with its name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]


def _projections(mha: nn.MultiheadAttention) -> tuple[list[Tensor], list[Tensor | None]]:
    """The q, k, v weight tensors (E_out rows each, views into ``in_proj_weight`` when packed) and their biases."""
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        w = mha.in_proj_weight
        weights = [w[:e], w[e : 2 * e], w[2 * e :]]
    else:
        weights = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
    b = mha.in_proj_bias
    biases: list[Tensor | None] = [b[:e], b[e : 2 * e], b[2 * e :]] if b is not None else [None, None, None]
    return weights, biases


def head_rows(mha: nn.MultiheadAttention) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q, k, v rows as (heads, head_dim, inputs) float64 copies, and out_proj's columns as (heads, head_dim, outputs)."""
    h, d = mha.num_heads, mha.head_dim
    (q, k, v), _ = _projections(mha)
    out = mha.out_proj.weight.detach().double().T
    return tuple(t.detach().double().reshape(h, d, -1) for t in (q, k, v)) + (out.reshape(h, d, -1),)  # type: ignore[return-value]


def row_index(heads: Tensor, within: Tensor) -> Tensor:
    """Row index (heads * head_dim,) of new row (h, i) = old row (heads[h], within[h, i])."""
    return (heads.view(-1, 1) * within.shape[1] + within).flatten()


@torch.no_grad()
def rearrange(mha: nn.MultiheadAttention, move: HeadMap) -> None:
    """Apply ``move`` to ``mha`` in place (see HeadMap); the layer's output is the same (its
    per-head attention weights, when asked for, come in the new head order)."""
    qk_index, v_index = row_index(move.heads, move.qk), row_index(move.heads, move.v)
    ones = torch.ones(mha.embed_dim, dtype=torch.float64)
    fq = ones if move.qk_factor is None else move.qk_factor.double().flatten()
    fv = ones if move.v_factor is None else move.v_factor.double().flatten()
    weights, biases = _projections(mha)
    for t_w, t_b, index, factor in zip(weights, biases, (qk_index, qk_index, v_index), (fq, 1 / fq, fv)):
        for t in (t_w, t_b):
            if t is not None:
                moved = t.index_select(0, index.to(t.device)).double()
                t.copy_((moved * factor.to(t.device).view(-1, *([1] * (t.dim() - 1)))).to(t.dtype))
    for extra, index, factor in ((mha.bias_k, qk_index, 1 / fq), (mha.bias_v, v_index, fv)):
        if extra is not None:  # add_bias_kv: one extra key and value token, along the last dim
            extra.copy_((extra.index_select(-1, index.to(extra.device)).double() * factor.to(extra.device)).to(extra.dtype))
    w = mha.out_proj.weight
    w.copy_((w.index_select(1, v_index.to(w.device)).double() / fv.to(w.device).view(1, -1)).to(w.dtype))


def random_map(mha: nn.MultiheadAttention, rng: torch.Generator, log_scale: float = 0.0, negate: bool = False, permute: bool = True) -> HeadMap:
    """A random HeadMap: heads and within-head dimensions shuffled (``permute``), factors
    exp(U(-log_scale, log_scale)) with a random half of the signs flipped (``negate``)."""
    h, d = mha.num_heads, mha.head_dim

    def perms() -> Tensor:
        return torch.stack([torch.randperm(d, generator=rng) for _ in range(h)]) if permute else torch.arange(d).repeat(h, 1)

    heads = torch.randperm(h, generator=rng) if permute else torch.arange(h)
    qk, v = perms(), perms()

    def factors() -> Tensor:
        a = ((2.0 * torch.rand(h, d, generator=rng, dtype=torch.float64) - 1.0) * log_scale).exp()
        return torch.where(torch.rand(h, d, generator=rng) < 0.5, -a, a) if negate else a

    return HeadMap(heads, qk, v, factors(), factors())


def match(reference: nn.MultiheadAttention, suspect: nn.MultiheadAttention, carriers: dict[str, Tensor] | None = None) -> HeadMap | None:
    """The HeadMap that puts ``suspect``'s heads, dimensions and scales back in ``reference``'s
    layout (None when the two layers differ in shape). Heads and dimensions are assigned with the
    Hungarian algorithm on the absolute cosine similarity of their q and k rows (query/key
    dimensions) and of their v rows and out_proj columns (value dimensions). ``carriers``: the
    key's flat positions by the layer's own parameter names (``in_proj_weight``, ``q_proj_weight``,
    ``out_proj.weight``, ...), left out of the similarity and of the factors."""
    if (reference.num_heads, reference.head_dim) != (suspect.num_heads, suspect.head_dim):
        return None
    ref, sus = head_rows(reference), head_rows(suspect)
    if any(r.shape != s.shape for r, s in zip(ref, sus)):
        return None
    h, d = reference.num_heads, reference.head_dim
    masks = _masks(reference, carriers or {})
    cos = [_abs_cos(r * m, s, m) for r, s, m in zip(ref, sus, masks)]  # each (h, d, h, d): ref head, dim, sus head, dim
    qk_sim, v_sim = cos[0] + cos[1], cos[2] + cos[3]
    head_value = np.zeros((h, h))
    within: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for a in range(h):
        for b in range(h):
            pair = []
            for sim in (qk_sim, v_sim):
                block = sim[a, :, b, :].numpy()
                _, cols = linear_sum_assignment(block, maximize=True)
                head_value[a, b] += block[np.arange(d), cols].sum()
                pair.append(cols)
            within[a, b] = (pair[0], pair[1])
    _, heads = linear_sum_assignment(head_value, maximize=True)
    qk = torch.as_tensor(np.stack([within[a, int(heads[a])][0] for a in range(h)]))
    v = torch.as_tensor(np.stack([within[a, int(heads[a])][1] for a in range(h)]))
    heads_t = torch.as_tensor(heads)
    qk_factor = 1 / _factors(ref[0], sus[0], masks[0], heads_t, qk)  # undo: query rows divided by c
    v_factor = 1 / _factors(ref[2], sus[2], masks[2], heads_t, v)
    return HeadMap(heads_t, qk, v, qk_factor, v_factor)


MASK_LIMIT = 0.5  # a tensor more than half carriers is compared whole (as wmbench.resync does)


def _masks(mha: nn.MultiheadAttention, carriers: dict[str, Tensor]) -> list[Tensor]:
    """0/1 masks shaped as ``head_rows``' four tensors, 0 at the carriers."""
    params = dict(mha.named_parameters())

    def mask(name: str) -> Tensor:
        p = params[name]
        m = torch.ones(p.numel(), dtype=torch.float64)
        idx = carriers.get(name)
        if idx is not None and 0 < len(idx) <= MASK_LIMIT * p.numel():
            m[idx.long().cpu()] = 0.0
        return m.view(p.shape)

    h, d = mha.num_heads, mha.head_dim
    if mha._qkv_same_embed_dim:
        q, k, v = mask("in_proj_weight").chunk(3)
    else:
        q, k, v = (mask(f"{x}_proj_weight") for x in "qkv")
    out = mask("out_proj.weight").T
    return [t.reshape(h, d, -1) for t in (q, k, v, out)]


def _abs_cos(ref_masked: Tensor, sus: Tensor, mask: Tensor) -> Tensor:
    """|cos| between every reference row (masked) and every suspect row restricted to that row's mask: (h, d, h, d)."""
    h, d, n = ref_masked.shape
    r, s, m = ref_masked.reshape(h * d, n), sus.reshape(h * d, n), mask.reshape(h * d, n)
    dots = r @ s.T
    sus_norm = ((s**2) @ m.T).T.clamp_min(1e-30).sqrt()
    return (dots.abs() / (r.norm(dim=1, keepdim=True).clamp_min(1e-30) * sus_norm)).reshape(h, d, h, d)


def _factors(ref: Tensor, sus: Tensor, mask: Tensor, heads: Tensor, within: Tensor) -> Tensor:
    """Per (head, dim), c of ``matched suspect row ~ c x reference row`` (masked); 1 where the rows
    are not that close to multiples of each other."""
    matched = sus[heads.view(-1, 1), within]  # (h, d, n): the suspect row matched to each reference row
    rm = ref * mask
    c = (rm * matched).sum(-1) / (rm * ref).sum(-1).clamp_min(1e-30)
    cos = (rm * matched).sum(-1) / (rm.norm(dim=-1) * (matched * mask).norm(dim=-1)).clamp_min(1e-30)
    return torch.where((cos.abs() >= SCALE_COS) & (c.abs() > MIN_FACTOR) & c.isfinite(), c, torch.ones_like(c))
