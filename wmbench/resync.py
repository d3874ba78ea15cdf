"""Resynchronised detection: match a suspect model's units to the owner's reference model before the
mark is read, undoing permutation, sign flips, rescaling and added (dummy) units.

``resync(suspect, reference, example, exclude)`` returns a copy of the suspect with the reference's
shapes. Group by group (``wmbench.units``: the same dependency-graph groups the permute attack
shuffles), in an order where each group's producing layers already have their inputs matched, the
suspect's units are assigned to the reference's with the Hungarian algorithm
(``scipy.optimize.linear_sum_assignment``) on the absolute cosine similarity of their incoming
weights (summed over the group's producing layers; input positions zero in every suspect row, as
structured pruning leaves them, left out), a unit staying in place winning ties (``TIE_BONUS``:
dead or pruned units, all-zero rows). An assignment that moves units is then checked on weights it
was not fitted on, the group's outgoing ones: where an attack leaves rows that carry little
information (magnitude pruning at 0.9, noise as large as the weights, 2-bit quantization, a first
layer of 9 inputs), chance similarities outweigh a unit's own and the assignment moves units of a
model that was never permuted, and the fixed bonus cannot tell that from a permutation without
losing real ones. Per row of the reference's consumers (the Conv/Linear layers reading the group),
its best absolute cosine with any suspect consumer row (a consumer may be permuted itself) over the
group's input columns, taken in the assignment's order, is compared with the same with every unit
left in place; where the rows fit worse moved, by a paired t below -``STAY_T`` (2) over the rows,
the group is left in place. A permuted group's consumers fit only once it is put back (t of tens to
hundreds on the quickstart; down to -1.3 where a permute chain left nothing to recover), a group
moved by noise fits only in place (t of -2.6 to -37). The check is skipped where every moved unit
lands on a copy of its reference row (absolute cosine at least SCALE_COS: no chance match), and
where the group has no such consumer (the assignment is kept). Then, per matched unit:

- rows, BatchNorm entries and the next layers' input columns are taken in the reference's order;
- a suspect unit left over whose weights duplicate a matched one (a split unit) has its outgoing
  columns added to that unit's (weighted by their ratio where no BatchNorm normalises them), other
  left-over units (zero-out or clique dummies) are dropped;
- the factor c of suspect row ~ c x reference row is undone the way the scale attack applies it
  (``wmbench.attacks.scale.coupled_layers``): with a following BatchNorm, rows, running mean and
  variance divided by c, gamma's sign restored; through ReLU, rows divided and the consumer's columns
  multiplied by c.

Then each ``nn.MultiheadAttention`` gets its heads, their query/key and value dimensions and their
factors matched the same way (``wmbench.attention.match``). A transformer's residual stream is one of
the groups, matched before: on ViT's patch embedding rows, not on the out_proj rows, whose inputs
(the value dimensions) are put in place with the heads.

Where the suspect has the reference's shapes every step keeps its function, so the result's outputs
on the example batch are compared with the suspect's (float64 where the model runs in it, within
TOLERANCE; a suspect with added units is not checked: collapsing them drops units by design): a coupling the
dependency graph does not see (a layer used outside its forward, ``F.linear(h, layer.weight)``,
which torch-pruning reads as element-wise) made a matching move the wrong columns, silently. Where
they changed, the matching runs again with the check after each unit group, and a group that
changes them is left in place and named in a ``RESYNC_PARTIAL_NOTE`` line; where they still change,
NotApplicable (resync failed). Where they did not change (every model resync handled right), the
first run stands, at the cost of three forwards of the example batch. These fallbacks, and the next,
are ``wmbench.resync_fallbacks``.

Where torch-pruning cannot trace the model (``unit_groups`` raises NotApplicable: ShuffleNetV2 with a
stage of three units or more, where its reshape index mapping divides by zero after a channel
shuffle), no unit can be matched, but the scale attack, which never moves units, still
rescales every Conv/Linear whose BatchNorm absorbs it (``coupled_layers`` traces with torch.fx,
which follows the shuffle): each of those layers gets its rows' factors undone against the
reference's same rows, in place (``row_factors``, carriers left out, then ``unscale_with_bn``: the
path of the layers in no unit group, RegNet's grouped convolutions), and so does every ReLU-rule
producer, before them and in graph order (``unscale_relu_pair``: rows divided by the factor, the
consumer's columns multiplied by it, so that a layer's columns are back before its own rows are
compared); an exact inverse, since both sides use the attack's own coupling. ``notes`` then gets
``RESYNC_PARTIAL_NOTE`` (units not matched: a permutation by other means would stay). Where even
that finds nothing to undo (no such layer, no attention layer), the NotApplicable is raised:
resync failed.

The carriers of the key (``Method.carriers``) are left out of the similarity and of the factor, so
the matching never looks at the values it is meant to test: an unwatermarked suspect gains no
correlation from it (tests/test_resync.py, the null over many keys). Used by ``detect`` in
wmbench.worker (the reference is the trained model the worker holds) and by ``wmbench detect
--resync --reference MODEL``; it works for any method whose detector reads weights by position.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from wmbench.api import Carriers
from wmbench.attention import MIN_FACTOR, attention_layers, match, rearrange
from wmbench.errors import NotApplicable
from wmbench.output_check import OutputReference
from wmbench.resync_fallbacks import output_check, require_undoable, undo_relu_rescaling, unmatched_note, untraced_note
from wmbench.units import LAYERS, Member, Snapshot, UnitGroup, assign, is_depthwise, refresh_shape, unit_groups
from wmbench.unscale import SCALE_COS, divide_rows, live_columns, row_factors, unscale_with_bn, weight_rows

if TYPE_CHECKING:
    from wmbench.attacks.scale import ReLUPair

log = logging.getLogger(__name__)
Pair = tuple[Member, Member, Tensor, Tensor, Tensor]  # reference and suspect producer, dots, |reference row|^2, cosines

# What a ``resync: true`` cell's id holds, so that a changed matching re-runs stored rows. 2
# (2026-12-05): frozen layers traced, inputs zero in every suspect row (structured pruning) left out
# of the matching, factors undone down to 1e-30 (scale's strengths up to 30). Ids before held True.
# 3: an assignment that moves units is checked on the group's consumers and dropped (units left in
# place) where they fit significantly worse with it (STAY_T): chance matches no longer move the
# units of a model that was never permuted (Tartaglione+resync after prune 0.9, noise 1.0); on a
# model torch-pruning cannot trace (ShuffleNetV2), BatchNorm-coupled rescaling is undone in place
# ("resync partial") where the whole resync failed before (both 2026-12-05, one version: neither
# left this change set before the other). 4: on such a model, ReLU-rule rescaling (no BatchNorm)
# is undone too; and the resynchronised model's outputs are checked against the suspect's: where
# they changed, a group whose matching changes them is left in place ("resync partial"), and where
# they still change, resync fails (both one version, as above).
VERSION = "4"
DUPLICATE_COS = 0.999  # a left-over unit this similar to a matched one is a split copy of it
MASK_LIMIT = 0.5  # a layer more than half carriers (uchida) is compared whole
TIE_BONUS = 0.05  # per producer, for leaving a unit where it is (ties: dead or pruned units)
STAY_T = 2.0  # units are left in place when their consumers fit this much worse moved (paired t over the consumer rows)
TOLERANCE = 1e-4  # outputs kept within this, relative to the largest and to each (as permute's and merge's)


@torch.no_grad()
def resync(
    suspect: nn.Module, reference: nn.Module, example: Tensor, exclude: Carriers | None = None, signed: bool = False, notes: list[str] | None = None,
    check_outputs: bool = True,
) -> nn.Module:
    """A copy of ``suspect`` rearranged onto ``reference``'s units (see the module docstring).

    ``signed``: match on the signed cosine, with no bonus for a unit staying in place, for a suspect
    trained apart from the reference (the merge attack's weight matching, Git Re-Basin): the
    absolute cosine pairs a unit with its negation, which only a sign flip (``scale``) makes the
    same unit, and between independent models a unit's place means nothing. Attention heads are
    matched as without it (``wmbench.attention.match``, absolute cosine).

    ``check_outputs``: where the suspect has the reference's shapes, every step rewrites it without
    changing its function, so its outputs on ``example`` are compared after (``OutputReference``,
    TOLERANCE; not where it has other shapes: collapsing added units drops units by design, and on a
    model not derived from the reference, the null's, that changes its outputs). Where they changed
    (a coupling the dependency graph does not see: a layer used outside its forward), the matching
    is run again with that check after each unit group, a group that changes them left in place
    (``RESYNC_PARTIAL_NOTE``); where they still change, NotApplicable (resync failed). Off for a
    caller that checks on its own (the merge attack).

    ``notes``: where given, a line is appended to it when the units could not be matched and only
    the rescaling was undone, or groups were left in place (``RESYNC_PARTIAL_NOTE``); without it,
    that is logged as a warning."""
    device = next(suspect.parameters()).device
    ref = reference if next(reference.parameters()).device.type == "cpu" else copy.deepcopy(reference).cpu()  # read only
    example = example[:2].cpu()
    out = copy.deepcopy(suspect).cpu().eval()
    check = output_check(out, ref, example, TOLERANCE) if check_outputs else None  # None where it has other shapes
    lines = _rearrange(out, ref, example, exclude, signed)
    if check is not None and not check.kept(out):
        out = copy.deepcopy(suspect).cpu().eval()
        lines = _rearrange(out, ref, example, exclude, signed, check)
        if not check.kept(out):
            raise NotApplicable("resync changed the suspect's outputs on the probe batch (a coupling the dependency graph does not see)")
    for line in lines:
        if notes is None:
            log.warning("%s", line)
        else:
            notes.append(line)
    return out.to(device)


def _rearrange(
    out: nn.Module, ref: nn.Module, example: Tensor, exclude: Carriers | None, signed: bool, check: OutputReference | None = None,
) -> list[str]:
    """Rearrange ``out`` onto ``ref`` in place (``resync``); the ``RESYNC_PARTIAL_NOTE`` lines to
    report. With ``check``, a unit group whose matching changes ``out``'s outputs is put back as it
    was (``Snapshot``) and named in a line."""
    untraced = None
    try:
        ref_groups, _ = unit_groups(ref, example)
        sus_groups = {g.ident: g for g in unit_groups(out, example)[0]}
    except NotApplicable as exc:  # torch-pruning cannot trace it: no group, every coupled layer row by row below
        untraced, ref_groups, sus_groups = exc, [], {}
    names = {id(m): n for n, m in out.named_modules()}
    bn_of, consumer_of, relu_pairs = _couplings(out, names)
    if untraced is not None:
        require_undoable(untraced, out, bn_of, relu_pairs)
    masks = _masks(ref, exclude or {})
    pending = [(r, sus_groups[r.ident]) for r in ref_groups if r.ident in sus_groups]
    ins = {names[id(mha.out_proj)]: 1 for _, mha in attention_layers(out)}  # its inputs, the value dimensions, are matched last
    for r, _ in pending:
        for m in r.members:
            if m.kind == "in":
                ins[m.name] = ins.get(m.name, 0) + 1
    deferred, left = [], []
    while pending:
        index = next((i for i, (r, _) in enumerate(pending) if any(ins.get(p.name, 0) == 0 for p in r.producers)), 0)
        r, s = pending.pop(index)
        ready = [p.name for p in r.producers if ins.get(p.name, 0) == 0] or [p.name for p in r.producers]
        saved = Snapshot(s, extra=[bn for bn in (bn_of.get(p.name) for p in s.producers) if bn is not None]) if check is not None else None
        if _match_group(r, s, ready, masks, bn_of, consumer_of, signed):
            if saved is not None and not check.kept(out):  # type: ignore[union-attr]
                saved.restore()
                left.append(r.producers[0].name if r.producers else r.members[0].name)
            else:
                deferred += [(r, s, p) for p in r.producers if p.name not in ready]
                deferred += [(r, s, m) for m in r.members if m.kind == "out" and isinstance(m.module, LAYERS) and is_depthwise(m.module)]
        for m in r.members:
            if m.kind == "in":
                ins[m.name] -= 1
    for r, s, rp in deferred:  # producers matched before their inputs, depthwise convs: undo their scale now
        sp = next(m for m in s.members if (m.name, m.kind) == (rp.name, "out"))
        ref_rows, sus_rows = _rows(rp), _rows(sp)
        if ref_rows.shape == sus_rows.shape:
            c = row_factors(ref_rows, sus_rows, masks.get(rp.name))
            _unscale(sp, c, bn_of.get(rp.name), next((m for m in s.members if (m.name, m.kind) == (consumer_of.get(rp.name, ""), "in")), None), r)
    # Layers in no unit group (grouped convolutions: RegNet, ResNeXt) cannot have been permuted, but
    # the scale attack rescales them with their BatchNorm all the same: undo it row by row.
    grouped = {m.name for g in ref_groups for m in g.members if m.kind == "out"}
    ref_modules, sus_modules = dict(ref.named_modules()), dict(out.named_modules())
    if untraced is not None:  # no unit moved: ReLU-rule factors in graph order
        undo_relu_rescaling(relu_pairs, ref_modules, names, masks)
    for name, bn in bn_of.items():
        rm, sm = ref_modules.get(name), sus_modules[name]
        if name not in grouped and rm is not None and rm.weight.shape == sm.weight.shape:
            unscale_with_bn(sm, row_factors(weight_rows(rm), weight_rows(sm), masks.get(name)), bn)
    ref_attention = dict(attention_layers(ref))
    for name, mha in attention_layers(out):  # heads, their dimensions and scales (wmbench.attention)
        own = {k[len(name) + 1 :]: idx for k, idx in (exclude or {}).items() if k.startswith(f"{name}.")}
        move = match(ref_attention[name], mha, own) if name in ref_attention else None
        if move is not None:
            rearrange(mha, move)
    lines = [untraced_note(untraced, len(bn_of), len(relu_pairs), bool(ref_attention))] if untraced is not None else []
    return lines + ([unmatched_note(left, len(ref_groups))] if left else [])


def _couplings(model: nn.Module, names: dict[int, str]) -> tuple[dict[str, nn.Module], dict[str, str], list[ReLUPair]]:
    """The scale attack's couplings (``coupled_layers``): producer name -> its BatchNorm, producer
    name -> its ReLU-rule consumer's name, and the ReLU-rule pairs in graph order."""
    from wmbench.attacks.scale import Untraceable, coupled_layers

    try:
        bn_pairs, relu_pairs = coupled_layers(model)
    except Untraceable:
        return {}, {}, []
    return ({names[id(p.layer)]: p.bn for p in bn_pairs}, {names[id(p.producer)]: names[id(p.consumer)] for p in relu_pairs},
            relu_pairs)


def _masks(model: nn.Module, exclude: Carriers) -> dict[str, Tensor]:
    """Per weight name, a 0/1 mask of the weights used for matching (carriers are 0)."""
    params = dict(model.named_parameters())
    masks = {}
    for name, idx in exclude.items():
        p = params.get(name)
        if p is None or p.dim() < 2 or len(idx) > MASK_LIMIT * p.numel():
            continue
        mask = torch.ones(p.numel(), dtype=torch.float64)
        mask[idx.long().cpu()] = 0.0
        masks[name.rpartition(".")[0]] = mask.view(p.shape[0], -1)
    return masks


def _cosines(ref_rows: Tensor, sus_rows: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The cosines of every reference row with every suspect row over the columns ``mask`` keeps
    for that reference row (a (n_ref, D) 0/1 mask: carriers are 0; None keeps all) and that are
    live in the suspect (``live_columns``): (the masked reference rows, their dots with the
    suspect rows, the cosines), each (n_ref, n_sus) but the first. A norm is floored at 1e-30 on
    its own, so an all-zero row has cosine 0 with every row."""
    mask = (mask if mask is not None else torch.ones_like(ref_rows)) * live_columns(sus_rows)
    rm = ref_rows * mask
    dots = rm @ sus_rows.T
    sus_norm = ((sus_rows**2) @ mask.T).T.clamp_min(1e-30).sqrt()  # |s_j restricted to r_i's mask|
    ref_norm = rm.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return rm, dots, dots / (ref_norm * sus_norm)


def _rows(member: Member) -> Tensor:
    return weight_rows(member.module)


def _match_group(
    r: UnitGroup, s: UnitGroup, ready: list[str], masks: dict[str, Tensor], bn_of: dict[str, nn.Module], consumer_of: dict[str, str], signed: bool = False,
) -> bool:
    """Match group ``s`` of the suspect onto group ``r`` of the reference (in place); whether it ran."""
    n_ref, n_sus = r.units, s.units
    if n_sus < n_ref:
        log.info("resync: group of %s has fewer units than the reference; left as it is", r.members[0].name)
        return False
    s_members = {(m.name, m.kind): m for m in s.members}
    if n_sus != n_ref and not all(m.covers for m in s.members):
        return False
    producers = [(p, s_members[(p.name, "out")]) for p in r.producers if p.name in ready]
    sim = np.zeros((n_ref, n_sus))
    pairs = []
    for rp, sp in producers:
        ref_rows, sus_rows = _rows(rp), _rows(sp)
        if ref_rows.shape[1] != sus_rows.shape[1]:
            continue
        rm, dots, cos = _cosines(ref_rows, sus_rows, masks.get(rp.name))
        sim += (cos if signed else cos.abs()).numpy()
        pairs.append((rp, sp, dots, (rm * ref_rows).sum(1), cos))
    if not pairs:
        return False
    stay = n_sus == n_ref and not signed
    if stay:  # ties (dead or pruned units, all-zero rows) keep their place
        sim += TIE_BONUS * len(pairs) * np.eye(n_ref)
    rows, cols = linear_sum_assignment(sim, maximize=True)
    sigma = torch.as_tensor(cols[np.argsort(rows)])
    if stay and _consumers_reject(r, s_members, sigma, sim, pairs, masks, bn_of, consumer_of):
        sigma = torch.arange(n_ref)  # chance similarities moved units the next layers say are in place
    factors = _factors(pairs, sigma)
    extra = _duplicates(pairs, sigma, n_sus, any(bn_of.get(pair[0].name) is not None for pair in pairs))
    for rm in r.members:
        sm = s_members.get((rm.name, rm.kind))
        if sm is not None:
            _take(rm, sm, sigma, extra)
    for name, c in factors.items():
        _unscale(s_members[(name, "out")], c, bn_of.get(name), s_members.get((consumer_of.get(name, ""), "in")), r)
    return True


def _factors(pairs: list[Pair], sigma: Tensor) -> dict[str, Tensor]:
    """Per producer, the factor c of suspect row sigma[i] ~ c x reference row i (1 where the rows
    are not within SCALE_COS of multiples of each other)."""
    n = torch.arange(len(sigma))
    factors = {}
    for rp, _, dots, ref_sq, cos in pairs:
        c = dots[n, sigma] / ref_sq.clamp_min(1e-30)
        factors[rp.name] = torch.where(cos[n, sigma].abs() >= SCALE_COS, c, torch.ones_like(c))
    return factors


def _consumers_reject(
    r: UnitGroup, s_members: dict[tuple[str, str], Member], sigma: Tensor, sim: np.ndarray, pairs: list[Pair], masks: dict[str, Tensor], bn_of: dict[str, nn.Module],
    consumer_of: dict[str, str],
) -> bool:
    """Whether the group's consumers fit the reference significantly worse with its units moved by
    ``sigma`` than left in place: the paired t, over the reference's consumer rows, of (fit moved -
    fit in place) below -STAY_T (the module docstring). False where ``sigma`` moves nothing, where
    every unit it moves lands on a copy of its reference row (absolute cosine at least SCALE_COS per
    producer: no chance match), or where no consumer can be read."""
    identity = torch.arange(len(sigma))
    moves = (sigma != identity).numpy()
    if not moves.any() or (sim[moves, sigma.numpy()[moves]] >= SCALE_COS * len(pairs)).all():
        return False
    moved = _consumer_fit(r, s_members, sigma, pairs, masks, bn_of, consumer_of)
    if moved is None or len(moved) < 2:
        return False
    d = moved - _consumer_fit(r, s_members, identity, pairs, masks, bn_of, consumer_of)
    return float(d.mean()) < -STAY_T * float(d.std()) / len(d) ** 0.5


def _consumer_fit(
    r: UnitGroup, s_members: dict[tuple[str, str], Member], sigma: Tensor, pairs: list[Pair], masks: dict[str, Tensor], bn_of: dict[str, nn.Module], consumer_of: dict[str, str],
) -> Tensor | None:
    """Per row of the reference's consumers of group ``r`` (the plain Conv/Linear layers reading its
    units), its best absolute cosine with any row of the suspect's same layer (consumers may be
    permuted themselves), over the group's input columns, the suspect's taken in the order
    ``sigma`` gives (factors through ReLU undone as ``_unscale`` would), carriers and columns zero
    in every suspect row left out. None where the group has no such consumer."""
    relu = {}
    for name, c in _factors(pairs, sigma).items():
        if bn_of.get(name) is None and name in consumer_of:
            relu[consumer_of[name]] = torch.where((c > MIN_FACTOR) & c.isfinite(), c, torch.ones_like(c))
    fits = []
    for rm in r.members:
        sm = s_members.get((rm.name, rm.kind))
        plain = isinstance(rm.module, nn.Linear) or (isinstance(rm.module, nn.modules.conv._ConvNd) and not rm.module.transposed and rm.module.groups == 1)
        if rm.kind != "in" or sm is None or not plain or rm.tensor is not None or rm.axis != 1 or rm.pos.shape != sm.pos.shape:
            continue
        w_r, w_s = rm.module.weight.detach().double(), sm.module.weight.detach().double()
        if w_r.shape[2:] != w_s.shape[2:]:
            continue
        ref = w_r.index_select(1, rm.pos.flatten())
        sus = w_s.index_select(1, sm.pos[sigma].flatten())
        if rm.name in relu:
            sus = sus * relu[rm.name].repeat_interleave(rm.pos.shape[1]).view(1, -1, *([1] * (sus.dim() - 2)))
        ref, sus = ref.reshape(len(ref), -1), sus.reshape(len(sus), -1)
        mask = masks.get(rm.name)
        if mask is not None:  # the carriers among the group's input columns
            mask = mask.view(*w_r.shape[:2], -1).index_select(1, rm.pos.flatten()).reshape(ref.shape)
        fits.append(_cosines(ref, sus, mask)[2].abs().max(dim=1).values)
    return torch.cat(fits) if fits else None


def _duplicates(pairs, sigma: Tensor, n_sus: int, normalised: bool) -> list[tuple[int, int, float]]:  # type: ignore[no-untyped-def]
    """(reference unit, left-over suspect unit, weight) for each left-over unit duplicating a matched one."""
    if len(sigma) == n_sus:
        return []
    left = sorted(set(range(n_sus)) - set(sigma.tolist()))
    rows = torch.cat([_rows(pair[1]) for pair in pairs], dim=1)
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
    cos = unit[left] @ unit[sigma].T  # (left, matched)
    best, where = cos.max(dim=1)
    found = []
    for k, b, i in zip(left, best.tolist(), where.tolist()):
        if b > DUPLICATE_COS:
            j = int(sigma[i])
            weight = 1.0 if normalised else float(rows[k] @ rows[j] / (rows[j] @ rows[j]).clamp_min(1e-30))
            found.append((i, k, weight))
    return found


def _take(rm: Member, sm: Member, sigma: Tensor, extra: list[tuple[int, int, float]]) -> None:
    """Set ``sm``'s tensors to the reference layout: unit i = suspect unit sigma[i] (+ duplicates)."""
    if rm.size - rm.pos.numel() != sm.size - sm.pos.numel():
        return
    src = torch.arange(rm.size)
    src[rm.pos.flatten()] = sm.pos[sigma].flatten()
    for name in sm.names:
        old = getattr(sm.module, name)
        new = old.detach().index_select(sm.axis, src.to(old.device)).clone()
        if sm.kind == "in":
            for i, k, weight in extra:
                new[:, rm.pos[i]] += weight * old.detach()[:, sm.pos[k]]
        assign(sm.module, name, new)
    refresh_shape(sm.module)


def _unscale(sm: Member, c: Tensor, bn: nn.Module | None, consumer: Member | None, r: UnitGroup) -> None:
    """Undo ``row ~ c x reference row`` where the scale attack could have applied it."""
    if bn is not None:
        unscale_with_bn(sm.module, c, bn)
        return
    if consumer is None:
        return
    c = torch.where((c > MIN_FACTOR) & c.isfinite(), c, torch.ones_like(c))
    divide_rows(sm.module, c)
    rc = next((m for m in r.members if (m.name, m.kind) == (consumer.name, "in")), None)
    if rc is None:
        return
    w = consumer.module.weight
    cols = torch.ones(w.shape[1], dtype=torch.float64)
    cols[rc.pos.flatten()] = c.repeat_interleave(rc.pos.shape[1])
    w.mul_(cols.to(w).view(1, -1, *([1] * (w.dim() - 2))))
