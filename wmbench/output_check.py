"""Whether a model rewritten in place still computes its original outputs: the check of the
function-preserving attacks (``permute``, ``dummy_neurons``).

The reference outputs are computed in float64 where the model runs in it: there an exact rewrite
changes the output by rounding alone, whereas in float32 a large logit's summation-order noise
could exceed the tolerance and undo exact rewrites. Where a model does not run in float64, its
float32 checks run with TF32 off (``ieee_float32``): on a CUDA GPU cuDNN convolutions default to
TF32, whose 10-bit mantissa alone moves outputs by about 1e-3, ten times the attacks' tolerance.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from wmbench.errors import NotApplicable


@contextlib.contextmanager
def in_float64(model: nn.Module) -> Iterator[None]:
    """``model``'s floating parameters and buffers (non-persistent ones too) in float64 inside the
    block, each back to its own dtype after (float32 -> float64 -> float32 is exact). Tensors that
    replace them inside the block are not converted back."""
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    dtypes = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.double()
    try:
        yield
    finally:
        for t, dtype in zip(tensors, dtypes):
            t.data = t.data.to(dtype)


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """float32 convolutions and matrix products in full float32 inside the block (TF32 off, the
    process's settings restored after); changes nothing on the CPU."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def runs_in_float64(model: nn.Module, example: Tensor) -> bool:
    """Whether ``model`` accepts float64 weights and inputs (not, e.g., with a float32 tensor
    attribute used in its forward). Without gradients, as every output check."""
    with in_float64(model), torch.no_grad():
        try:
            model(example.double())
        except RuntimeError:
            return False
    return True


class OutputReference:
    """The original model's outputs on a check batch, in float64 where the model runs in it.

    ``matches(model)`` compares inside ``precision(model)`` (one conversion around many checks, for
    rewrites that edit tensors in place); ``kept(model)`` converts around one check (for rewrites
    that replace tensors, which a conversion block would not convert back)."""

    def __init__(self, model: nn.Module, example: Tensor, tolerance: float) -> None:
        self.precise = runs_in_float64(model, example)
        self.example = example.double() if self.precise else example
        self.tolerance = tolerance
        with self.precision(model), torch.no_grad():
            self.output = model(self.example)
        self.floating = isinstance(self.output, Tensor) and self.output.is_floating_point()
        self.scale = (float(self.output.abs().max()) or 1.0) if self.floating else 1.0

    @classmethod
    def of_floating(cls, model: nn.Module, example: Tensor, tolerance: float) -> OutputReference | None:
        """``OutputReference(model, example, tolerance)``, or None where the output is not one
        floating tensor (nothing to compare), told from the reference's own forward."""
        reference = cls(model, example, tolerance)
        return reference if reference.floating else None

    @classmethod
    def of_function(cls, model: nn.Module, example: Tensor, tolerance: float, attack: str) -> OutputReference:
        """``OutputReference(model, example, tolerance)`` for a function-preserving ``attack``;
        NotApplicable where the output is not one floating tensor (a tuple, a dict: nothing to
        check the rewrite against)."""
        reference = cls(model, example, tolerance)
        if not reference.floating:
            raise NotApplicable(f"{attack}: the model's output is a {type(reference.output).__name__}, not one floating tensor, "
                                "so whether the rewrite keeps its function cannot be checked")
        return reference

    def precision(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """The block in which ``matches`` may be called: ``model`` in float64 where the reference is,
        else float32 without TF32."""
        return in_float64(model) if self.precise else ieee_float32()

    def matches(self, model: nn.Module) -> bool:
        """Within ``tolerance`` of the largest reference output and of each (inside ``precision``);
        False where the rewritten model's forward fails (a size it fixes elsewhere: a buffer, a reshape)."""
        try:
            with torch.no_grad():
                out = model(self.example)
        except RuntimeError:
            return False
        return bool(((out - self.output).abs() <= self.tolerance * self.scale + self.tolerance * self.output.abs()).all())

    def kept(self, model: nn.Module) -> bool:
        """``matches``, with its own conversion around it."""
        with self.precision(model):
            return self.matches(model)
