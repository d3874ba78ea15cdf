"""What resync (``wmbench.resync``) does where its traced unit matching cannot be trusted.

- Its outputs are checked: where the suspect has the reference's shapes every step keeps its
  function, so the rearranged copy's outputs on the example batch are compared with the suspect's
  (``output_check``). Where they changed, resync matches again with the check after each unit group,
  puts back a group that changes them (``wmbench.units.Snapshot``) and names it (``unmatched_note``).
- A model torch-pruning cannot trace (``unit_groups`` raises NotApplicable) has no unit group, so no
  unit can be matched; the scale attack's rescaling is still undone row by row, in place, where
  ``coupled_layers`` (torch.fx) finds a coupling (``undo_relu_rescaling`` for the ReLU rule; the
  BatchNorm rule is resync's path for layers in no unit group), and reported (``untraced_note``).
  Where there is nothing to undo, resync fails (``require_undoable``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from wmbench.attention import attention_layers
from wmbench.errors import RESYNC_PARTIAL_NOTE, NotApplicable
from wmbench.output_check import OutputReference
from wmbench.unscale import row_factors, unscale_relu_pair, weight_rows

if TYPE_CHECKING:
    from wmbench.attacks.scale import ReLUPair

NAMED_GROUPS = 4  # unit groups a note names; the rest are counted


def output_check(out: nn.Module, ref: nn.Module, example: Tensor, tolerance: float) -> OutputReference | None:
    """``out``'s outputs on ``example`` to compare it with once rearranged onto ``ref``; None where
    it has other shapes than ``ref`` (collapsing added units drops units by design, and on a model
    not derived from the reference, the null's, that changes its outputs) or where its output is not
    one floating tensor (nothing to compare)."""
    return OutputReference.of_floating(out, example, tolerance) if same_shapes(out, ref) else None


def same_shapes(a: nn.Module, b: nn.Module) -> bool:
    """Whether ``a`` and ``b`` have the same tensors (names and shapes): no unit to collapse."""
    shapes = {k: v.shape for k, v in a.state_dict().items()}
    return shapes == {k: v.shape for k, v in b.state_dict().items()}


def require_undoable(untraced: NotApplicable, model: nn.Module, bn_of: dict[str, nn.Module], relu_pairs: list[ReLUPair]) -> None:
    """Raise ``untraced`` (resync failed) where an untraceable ``model`` has nothing resync can undo
    without unit groups: no BatchNorm- or ReLU-coupled layer, no attention layer."""
    if not bn_of and not relu_pairs and not attention_layers(model):
        raise untraced


def undo_relu_rescaling(relu_pairs: list[ReLUPair], ref_modules: dict[str, nn.Module], names: dict[int, str], masks: dict[str, Tensor]) -> None:
    """On an untraceable model (no unit moved), each ReLU-rule producer's row factors undone against
    the reference's same rows (carriers, ``masks``, left out), in graph order: a consumer's columns
    are back before its own rows are compared."""
    for pair in relu_pairs:
        name = names[id(pair.producer)]
        rm = ref_modules.get(name)
        if rm is not None and rm.weight.shape == pair.producer.weight.shape:
            unscale_relu_pair(pair, row_factors(weight_rows(rm), weight_rows(pair.producer), masks.get(name)))


def untraced_note(untraced: NotApplicable, bn_layers: int, relu_layers: int, attention: bool) -> str:
    """The ``RESYNC_PARTIAL_NOTE`` line of an untraceable model: units not matched, what was undone."""
    undone = [f"{bn_layers} BatchNorm-coupled layers"] * bool(bn_layers) + [f"{relu_layers} ReLU-coupled layers"] * bool(relu_layers) + ["attention layers"] * attention
    return f"{RESYNC_PARTIAL_NOTE} ({untraced}): units not matched, only the rescaling of {' and '.join(undone)} undone"


def unmatched_note(left: list[str], groups: int) -> str:
    """The ``RESYNC_PARTIAL_NOTE`` line naming the unit groups (of ``groups``) left in place because
    matching them changed the outputs (the first NAMED_GROUPS, the rest counted)."""
    listed = ", ".join(left[:NAMED_GROUPS]) + (f" and {len(left) - NAMED_GROUPS} more" if len(left) > NAMED_GROUPS else "")
    return (f"{RESYNC_PARTIAL_NOTE}: {len(left)} of {groups} unit groups left unmatched (matching them changed the "
            f"suspect's outputs: a coupling the dependency graph does not see, e.g. a layer used outside its forward): {listed}")
