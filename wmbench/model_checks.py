"""Checks on a model around its training: before, that it runs on the data's inputs, that its
weights are parameters (not recomputed by a parametrization) and that it returns a tensor of
logits in train and eval mode; after, that its weights and buffers are finite and that the model
read back from its checkpoint computes what the trained one does, and that the method's embed
changed it at all."""

from __future__ import annotations

import zlib
from typing import Any, Iterator, Mapping

import torch

from wmbench.data import DataBundle
from wmbench.errors import ConfigError, TrainingDiverged, WmbenchError
from wmbench.liveness import live_map
from wmbench.models import computed_weight
from wmbench.seeding import seeded


def nonfinite_tensor(state: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor of ``state`` (a state dict) holding a NaN or an infinity, or None."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_finite(model: torch.nn.Module, desc: str) -> None:
    """TrainingDiverged when a weight or buffer of a trained model is NaN or infinite (never cached)."""
    name = nonfinite_tensor(model.state_dict())
    if name is not None:
        raise TrainingDiverged(f"{desc}: {name} holds non-finite values after training (learning rate or method strength too large?)")


def state_digest(model: torch.nn.Module) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    """Each weight and buffer's dtype, shape and CRC-32 of its bytes, by state-dict name: equal
    before and after a method's ``embed`` only where it changed nothing (it trained a copy)."""
    return {name: (t.dtype, tuple(t.shape), _crc(t)) for name, t in model.state_dict().items()}


def _crc(t: torch.Tensor) -> object:
    """CRC-32 of a tensor's bytes; a tensor they cannot be read from (sparse, quantized) gives an
    object equal to no other, so the check never refuses a model for it."""
    try:
        return zlib.crc32(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    except (RuntimeError, TypeError):
        return object()


def check_embedded(before: Mapping[str, Any], model: torch.nn.Module, method: object) -> None:
    """WmbenchError when ``model`` holds, after ``method.embed``, exactly the weights and buffers of
    ``before`` (its ``state_digest`` taken before): an embed that trained a copy would have its
    untrained model stored and measured."""
    if state_digest(model) == before:
        raise WmbenchError(f"{type(method).__name__}.embed left the model it was given as built: no weight or buffer changed. "
                           "embed must train `model` in place (a copy it trains is not what wmbench stores and measures)")


def still_batchnorm(model: torch.nn.Module, steps: int) -> str | None:
    """``BatchNorm momentum 0.0003: its running statistics still hold about 97% of their
    initialisation after 100 steps`` where a BatchNorm of ``model`` keeps more than half of its
    initial running statistics after ``steps`` training steps (momentum m: (1 - m)^steps > 0.5,
    e.g. torchvision MNASNet's m = 3e-4 over fewer than 2,300 steps), else None: an evaluation
    normalises with those near-initial statistics, which can hold a trained model at chance."""
    momenta = [m.momentum for m in model.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.momentum is not None]
    if not momenta:
        return None
    kept = (1.0 - min(momenta)) ** steps
    if kept <= 0.5:
        return None
    return f"BatchNorm momentum {min(momenta):g}: its running statistics still hold about {100 * kept:.0f}% of their initialisation after {steps} steps"


def check_runs(model: torch.nn.Module, data: DataBundle) -> None:
    """A ConfigError when one of ``model``'s weights is computed from other tensors (a
    parametrization: a mark or an attack written there would be lost at the next forward), when it
    cannot take ``data``'s inputs at all (an image smaller than its poolings need, found by one
    forward pass in eval mode: ``wmbench.liveness``, cached), or when its outputs are not one logit
    per class."""
    computed = computed_weight(model)
    if computed:
        raise ConfigError("models", f"{computed} is computed from other tensors at each forward (weight_norm, spectral_norm or another "
                          "torch.nn.utils.parametrize parametrization), not a parameter: marks and attacks write Conv/Linear weights, "
                          "and a write there would be lost. Remove it before returning the model (torch.nn.utils.parametrize.remove_parametrizations; "
                          "remove_weight_norm or remove_spectral_norm for the older hooks)")
    failure = live_map(model, data.train_x.shape[1:]).failure
    if failure:
        shape = "x".join(map(str, data.train_x.shape[1:]))
        raise ConfigError("models", f"the model does not run on {data.name} inputs of shape {shape} ({failure})")
    for train in (True, False):
        problem = mode_output(model, data, train)
        if problem:
            raise ConfigError("models", problem)


def mode_output(model: torch.nn.Module, data: DataBundle, train: bool) -> str | None:
    """What is wrong with a forward of two of ``data``'s training inputs in train or eval mode: a
    non-tensor (an auxiliary head's tuple), or logits for another number of classes than the data's
    (dimension 1; more would train and score silently, the argmax free to pick a class the data
    lacks); in eval mode, a forward that fails (float32 inputs to a float64 model: the liveness pass
    feeds the model's own dtype) or outputs that change from one forward to the next; in train mode, a non-persistent buffer it changes (the checkpoint
    would not hold it, and the training would fail once done, read back as another function); else
    None. Leaves no trace: buffers (BatchNorm statistics) restored, the random state forked, so the
    training that follows is the same. A train-mode forward that fails is for the training to report."""
    x, classes, mode = data.train_x[:2], data.num_classes, "train" if train else "eval"
    saved = {name: b.clone() for name, b in model.named_buffers()}
    volatile = {f"{prefix}.{b}" if prefix else b for prefix, m in model.named_modules() for b in m._non_persistent_buffers_set}
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            out = model.train(train)(x)
            if not train and isinstance(out, torch.Tensor):  # a second pass (the generator has moved on): the same logits
                again = model(x)
                if not torch.allclose(again, out, rtol=1e-5, atol=1e-6 * float(out.abs().max())):
                    return ("in eval mode the model's outputs change from one forward to the next (dropout or noise active in eval?): "
                            "errors would differ by chance, and function-preserving attacks would be undone as if they changed the function")
        changed = next((n for n, b in model.named_buffers() if n in volatile and not torch.equal(b, saved[n])), None)
        if changed:
            return (f"in train mode the model changes its non-persistent buffer {changed}: a checkpoint does not hold it, so the "
                    "stored model would compute another function than the trained one (register it with persistent=True)")
    except Exception as exc:  # noqa: BLE001 - in train mode reported by the training itself
        return None if train else f"in eval mode the model fails on {data.name} inputs of dtype {x.dtype} ({type(exc).__name__}: {exc})"
    finally:
        model.train(was_training)
        for name, b in model.named_buffers():
            b.copy_(saved[name])
    need = "training, its loss and the metric" if train else "evaluation and the metric"
    if not isinstance(out, torch.Tensor):
        return f"in {mode} mode the model returns {type(out).__name__}, not a tensor of logits ({need} need one logit per class)"
    if out.dim() < 2 or out.shape[1] != classes:
        return (f"in {mode} mode the model returns outputs of shape {tuple(out.shape)}, not {classes} logits per example along "
                f"dimension 1 (the dataset has {classes} classes; {need} need one logit per class)")
    return None


@torch.no_grad()
def function_change(trained: torch.nn.Module, rebuilt: torch.nn.Module, example: torch.Tensor) -> str | None:
    """How the model ``rebuilt`` from ``trained``'s checkpoint computes another function on ``example``
    (eval mode, same random state), naming the first module whose class differs; None when it does not."""
    outputs = []
    for model in (trained, rebuilt):
        with seeded(0, example.device):
            outputs.append(_tensors(model.eval()(example)))
    ours, theirs = outputs
    if [t.shape for t in ours] != [t.shape for t in theirs]:
        difference = "outputs of other shapes"
    else:
        gaps = [float((a.double() - b.double()).abs().max()) for a, b in zip(ours, theirs) if a.numel()]
        scale = max([float(a.double().abs().max()) for a in ours if a.numel()] + [1.0])
        if not gaps or max(gaps) <= 1e-4 * scale:
            return None
        difference = f"outputs {max(gaps):.3g} apart"
    for (name, one), (_, other) in zip(trained.named_modules(), rebuilt.named_modules()):
        if type(one).__name__ != type(other).__name__:  # by name: torch.fx gives every GraphModule its own class
            return f"{difference}; at {name or 'the top'!r} the trained model has a {type(one).__name__}, the rebuilt one a {type(other).__name__}"
    return difference


def _tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or a tuple, list or dict of them), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    return [t for item in output for t in _tensors(item)] if isinstance(output, (tuple, list)) else []


def shared_parameter(model: torch.nn.Module, other: torch.nn.Module) -> str | None:
    """The name of the first parameter of ``model`` whose storage a parameter of ``other`` (both
    alive) shares, or None."""
    def storages(m: torch.nn.Module) -> Iterator[tuple[str, int]]:
        for name, p in m.named_parameters():
            if not isinstance(p, torch.nn.parameter.UninitializedParameter) and p.device.type != "meta" and p.numel():
                yield name, p.untyped_storage().data_ptr()
    theirs = {ptr for _, ptr in storages(other)}
    return next((name for name, ptr in storages(model) if ptr in theirs), None)


def floating_dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    """The dtype of each floating parameter and buffer of ``model``, by state-dict name (taken before
    an attack that may cast the model in place, for ``restore_precision``)."""
    return {name: t.dtype for name, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()}


def restore_precision(attacked: torch.nn.Module, trained: torch.nn.Module | Mapping[str, torch.dtype]) -> tuple[list[str], list[str]]:
    """Cast back, in place, each floating parameter or buffer of ``attacked`` whose dtype is not that
    of the same-named tensor of ``trained`` (a model, or its ``floating_dtypes``; float32 for a name
    ``trained`` lacks: a layer the attack added), so that a thief's float16 copy is evaluated at the
    trained model's precision, whatever it is (a float64 model stays float64). Returns the dtypes
    found and those cast to, sorted."""
    want = trained if isinstance(trained, Mapping) else floating_dtypes(trained)
    found, cast = set(), set()
    for prefix, module in attacked.named_modules():
        for store in (module._parameters, module._buffers):
            for k, t in store.items():
                dtype = want.get(f"{prefix}.{k}" if prefix else k, torch.float32)
                if t is None or not t.is_floating_point() or t.dtype == dtype:
                    continue
                found.add(str(t.dtype))
                cast.add(str(dtype).removeprefix("torch."))
                if isinstance(t, torch.nn.Parameter):
                    t.data = t.data.to(dtype)
                else:
                    store[k] = t.to(dtype)
    return sorted(found), sorted(cast)
