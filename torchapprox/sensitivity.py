"""How much each quantized layer's loss would grow at each bitwidth: ``ta.sensitivity``.

Two methods, both on a copy of the model in eval mode (the model itself, its quantizers and
the global random state are left as they were), on the batches given:

- ``"hessian"`` (HAWQ-V2: Dong et al., "HAWQ-V2: Hessian Aware trace-Weighted Quantization of
  Neural Networks", NeurIPS 2020): the second-order Taylor estimate of the loss increase with
  an isotropic Hessian per tensor, ``1/2 * Tr(H) / n * ||Q_b(t) - t||^2``, summed over the
  layer's weight and its input (the input term as in HAWQ-V3's activation sensitivity). The
  traces come from Hutchinson's estimator ``Tr(H) = E[v^T H v]`` with Rademacher ``v``
  (``samples`` Hessian-vector products per batch; a negative estimate counts as 0) on the
  float model (quantizers removed),
  and the quantization error ``||Q_b(t) - t||^2`` from the layer's own quantizers set to ``b``
  bits. Cost per batch: one forward, one backward with a graph, ``samples`` double-backward
  passes.
- ``"direct"``: the measured loss increase with only that layer (weight and input) lowered to
  ``b`` bits, the others as they are: ``L(layer at b) - L(model as it is)``, averaged over
  the batches. Cost: ``1 + layers * len(bitwidths)`` forward passes per batch.

A batch is whatever ``loss_fn(model, batch)`` takes (a scalar loss comes back); its first
element (or the batch itself, for a tensor) has the batch dimension first, which is how
multiply-accumulates per sample are counted (Linear, Conv1d/2d/3d, transformers' Conv1D,
MultiheadAttention's input projection; other types count None).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .layers.functional import quantizer_of
from .precision import count_macs

METHODS = ("hessian", "direct")


@dataclasses.dataclass
class Sensitivity:
    """What :func:`sensitivity` measured.

    ``values``: ``{layer: {bits: predicted loss increase}}`` (in the loss's units);
    ``params``: quantized weight parameters per layer; ``macs``: multiply-accumulates per
    sample (None where not counted); ``method``; ``passes``: forward passes over the batches
    (a backward or Hessian-vector product counts as one more each); ``groups``: layers that
    share a quantized weight, one entry under the first one's name (its ``params`` count the
    shared weight once).
    """

    values: dict[str, dict[int, float]]
    params: dict[str, int]
    macs: dict[str, int | None]
    method: str
    passes: int
    # {key: layers}: layers that share a quantized weight (tied embeddings and heads) take one
    # bitwidth and are one entry, keyed by the first; a layer of its own is not listed.
    groups: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (checkpoint state, JSON)."""
        return {"values": {layer: {int(b): float(v) for b, v in by_bits.items()} for layer, by_bits in self.values.items()},
                "params": dict(self.params), "macs": dict(self.macs), "method": self.method, "passes": self.passes,
                "groups": {key: list(members) for key, members in self.groups.items()}}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Sensitivity:
        return cls({layer: {int(b): float(v) for b, v in by_bits.items()} for layer, by_bits in state["values"].items()},
                   dict(state["params"]), dict(state["macs"]), str(state["method"]), int(state["passes"]),
                   {key: list(members) for key, members in (state.get("groups") or {}).items()})


def sensitivity(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor],
                bitwidths: Sequence[int] = (2, 3, 4, 8), method: str = "hessian", samples: int = 4,
                seed: int = 0) -> Sensitivity:
    """Per quantized layer and bitwidth, a number that predicts the loss increase of
    quantizing that layer's weight and input at those bits (module docstring).

    Args:
        model: a model with quantizers (``ta.attach``); left unchanged.
        batches: an iterable of batches (a DataLoader, a list), read once.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        bitwidths: the candidate bits.
        method: ``"hessian"`` or ``"direct"``.
        samples: Hutchinson samples per batch (``"hessian"``).
        seed: of the Rademacher vectors (a generator of its own).

    Raises:
        TypeError, ValueError: a bad argument (named), a model without quantized layers, no
            batches, a loss that is not a scalar.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if isinstance(samples, bool) or not isinstance(samples, numbers.Integral) or samples < 1:
        raise ValueError(f"`samples` must be an int >= 1, got {samples!r}")
    bitwidths = _check_bitwidths(bitwidths)
    from .qat import quantized_layers

    if not quantized_layers(model):
        raise ValueError("`model` has no quantized layers: call ta.attach(model) first")
    batches = list(batches)
    if not batches:
        raise ValueError("`batches` is empty: sensitivity needs at least one batch")
    with preserved_random_state(model):
        work = working_copy(model)
        layers = quantized_layers(work)
        groups, params = layer_groups(layers)
        layer_macs = count_macs(work, layers, lambda: _loss(work, batches[0], loss_fn), batch_size(batches[0]))
        macs = group_macs(groups, layer_macs)
        if method == "direct":
            values, passes = _direct(work, layers, groups, batches, loss_fn, bitwidths)
        else:
            values, passes = _hessian(work, layers, groups, batches, loss_fn, bitwidths, samples, seed)
    return Sensitivity(values, params, macs, method, passes, {k: m for k, m in groups.items() if len(m) > 1})


def working_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode. Tensors a module keeps as plain attributes that
    are not graph leaves (a pruned layer's ``weight``, recomputed from ``weight_orig`` on every
    forward) cannot be deep-copied: the copy gets their detached values instead, through
    ``deepcopy``'s memo."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in module.__dict__.values():
            if isinstance(value, Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo).eval()


@contextlib.contextmanager
def preserved_random_state(model: nn.Module):
    """Torch's global random state (CPU, and the CUDA devices the model is on) as it was
    after the block: a forward or a loss that draws random numbers leaves no trace."""
    devices = sorted({p.device.index or 0 for p in itertools.chain(model.parameters(), model.buffers())
                      if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        yield


def layer_groups(layers: dict[str, nn.Module]) -> tuple[dict[str, list[str]], dict[str, int]]:
    """``({key: member layers}, {key: quantized weight parameters})``: layers that share a
    weight quantizer (a tied weight) form one group under the first one's name, and the
    shared weight counts once."""
    owner: dict[int, str] = {}
    groups: dict[str, list[str]] = {}
    params: dict[str, int] = {}
    for name, layer in layers.items():
        weights = [(id(q), getattr(layer, w).numel()) for w in _weights(layer) if (q := quantizer_of(layer, w)) is not None]
        key = next((owner[i] for i, _ in weights if i in owner), name)
        if key == name:
            groups[name], params[name] = [], 0
        groups[key].append(name)
        for i, numel in weights:
            if i not in owner:
                owner[i] = key
                params[key] += numel
    return groups, params


def group_macs(groups: dict[str, list[str]], macs: dict[str, int | None]) -> dict[str, int | None]:
    return {key: None if any(macs[m] is None for m in members) else sum(macs[m] for m in members)
            for key, members in groups.items()}


def _check_bitwidths(bitwidths: Sequence[int]) -> tuple[int, ...]:
    if isinstance(bitwidths, (str, bytes)) or not isinstance(bitwidths, Sequence) or not bitwidths:
        raise ValueError(f"`bitwidths` must be a non-empty sequence of ints in 2..32, got {bitwidths!r}")
    for b in bitwidths:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 2 <= b <= 32:
            raise ValueError(f"`bitwidths` must hold ints in 2..32, got {b!r} in {list(bitwidths)!r}")
    return tuple(sorted(set(int(b) for b in bitwidths)))


def _weights(layer: nn.Module) -> tuple[str, ...]:
    from .qat import quantized_tensor_names

    return quantized_tensor_names(layer)[0]


def _inputs(layer: nn.Module) -> tuple[str, ...]:
    from .qat import quantized_tensor_names

    return quantized_tensor_names(layer)[1]


def _loss(model: nn.Module, batch: Any, loss_fn: Callable) -> Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"`loss_fn` must return a scalar tensor, got {type(loss).__name__}"
                         f"{'' if not isinstance(loss, Tensor) else ' of shape ' + str(list(loss.shape))}")
    return loss.reshape(())


def batch_size(batch: Any) -> int:
    """The first dimension of the first tensor in a batch (a tensor, or a tuple, list or dict
    of them, nested); 1 when it holds none."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        if isinstance(item, (Tensor, Mapping, tuple, list)):
            return batch_size(item)
    return 1


# ------------------------------------------------------------------------------ direct
def _saved(quantizers: list) -> list[tuple[Any, Any, dict]]:
    return [(q, q.spec, {k: v.clone() for k, v in q.state_dict().items()}) for q in quantizers]


def _restore(saved: list[tuple[Any, Any, dict]]) -> None:
    for quantizer, spec, state in saved:
        quantizer.spec = spec  # not the bitwidth setter: no on_bitwidth_change on the way back
        quantizer.load_state_dict(state)


@torch.no_grad()
def _direct(work, layers, groups, batches, loss_fn, bitwidths):
    def mean_loss() -> float:
        return sum(float(_loss(work, batch, loss_fn)) for batch in batches) / len(batches)

    reference = mean_loss()
    values: dict[str, dict[int, float]] = {}
    for name, members in groups.items():
        unique = {id(q): q for member in members for t in (*_weights(layers[member]), *_inputs(layers[member]))
                  if (q := quantizer_of(layers[member], t)) is not None}
        quantizers = list(unique.values())
        values[name] = {}
        for bits in bitwidths:
            saved = _saved(quantizers)
            try:
                for quantizer in quantizers:
                    quantizer.bitwidth = bits
                values[name][bits] = mean_loss() - reference
            finally:
                _restore(saved)
    return values, len(batches) * (1 + len(groups) * len(bitwidths))


# ------------------------------------------------------------------------------ hessian
def _source_parameter(layer: nn.Module, name: str) -> Tensor | None:
    """The leaf Parameter a weight comes from: itself, ``weight_orig`` of a pruned weight, or
    the original of a parametrized one (the curvature is taken along it)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(layer, name):
        return layer.parametrizations[name].original
    return layer._parameters.get(f"{name}_orig", layer._parameters.get(name))


def _error_power(quantizer, tensor: Tensor, bits: int) -> float:
    """||Q_b(t) - t||^2 with a copy of the quantizer set to ``bits``."""
    q = copy.deepcopy(quantizer)
    q.bitwidth = bits
    with torch.no_grad():
        fake, _ = q.fake_quantize(tensor.detach())
        return float((fake.double() - tensor.detach().double()).square().sum())


def _hessian(work, layers, groups, batches, loss_fn, bitwidths, samples, seed):
    from .qat import detach

    group_of = {member: key for key, members in groups.items() for member in members}
    quantizers = {name: ({w: quantizer_of(layer, w) for w in _weights(layer)},
                         {i: quantizer_of(layer, i) for i in _inputs(layer)}) for name, layer in layers.items()}
    detach(work)  # the float model: its curvature, the quantizers' errors measured apart
    generator = torch.Generator().manual_seed(seed)
    values = {key: {b: 0.0 for b in bitwidths} for key in groups}
    for batch in batches:
        deltas: dict[str, Tensor] = {}
        inputs: dict[str, Tensor] = {}

        def perturb(name):
            def hook(layer, args, kwargs):
                # the first input: the first positional argument, else the first keyword one
                # (attention called as mha(query=..., key=..., value=...))
                if args:
                    key, value = 0, args[0]
                else:
                    key, value = next(iter(kwargs.items()), (None, None))
                if not isinstance(value, Tensor) or not value.is_floating_point():
                    return None
                delta = torch.zeros_like(value, requires_grad=True)
                deltas[name], inputs[name] = delta, value.detach()
                if key == 0:
                    return (value + delta, *args[1:]), kwargs
                return args, {**kwargs, key: value + delta}
            return hook

        handles = [layer.register_forward_pre_hook(perturb(name), with_kwargs=True) for name, layer in layers.items()]
        try:
            # Hessian-vector products differentiate the backward: attention's fused CPU/GPU
            # kernels have no second derivative, its plain-math form has one.
            with sdpa_kernel([SDPBackend.MATH]):
                loss = _loss(work, batch, loss_fn)
        finally:
            for handle in handles:
                handle.remove()
        targets: list[tuple[str, str, Tensor]] = []
        seen: set[int] = set()  # a tied weight is one tensor: its term counts once
        for name, layer in layers.items():
            for w in quantizers[name][0]:
                parameter = _source_parameter(layer, w)
                if parameter is not None and parameter.requires_grad and id(parameter) not in seen:
                    seen.add(id(parameter))
                    targets.append((name, w, parameter))
            if name in deltas and quantizers[name][1]:
                targets.append((name, "input", deltas[name]))
        tensors = [t for *_, t in targets]
        grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
        used = [(target, g) for target, g in zip(targets, grads) if g is not None and g.requires_grad]
        traces = {(name, what): 0.0 for (name, what, _), _ in used}
        for _ in range(samples):
            vectors = [torch.randint(0, 2, t.shape, generator=generator).to(t) * 2 - 1 for (*_, t), _ in used]
            products = torch.autograd.grad([g for _, g in used], [t for (*_, t), _ in used], grad_outputs=vectors,
                                           retain_graph=True, allow_unused=True)
            for ((name, what, _), _), v, hv in zip(used, vectors, products):
                if hv is not None:
                    traces[(name, what)] += float((v * hv).sum()) / samples
        for (name, what, tensor), _ in used:
            # A negative trace estimate (a saddle, or Hutchinson's noise on a flat direction)
            # would predict that quantizing lowers the loss: it counts as no curvature.
            curvature = max(traces[(name, what)], 0.0) / tensor.numel()
            if what == "input":
                quantizer = next(iter(quantizers[name][1].values()))
                source = inputs[name]
            else:  # the error of the weight the layer uses (a pruned or parametrized one's value)
                with torch.no_grad():
                    quantizer, source = quantizers[name][0][what], getattr(layers[name], what)
            for bits in bitwidths:
                values[group_of[name]][bits] += 0.5 * curvature * _error_power(quantizer, source, bits) / len(batches)
    return values, len(batches) * (2 + samples)


def rank_correlation(predicted: Sensitivity, measured: Sensitivity) -> float:
    """Spearman's rank correlation between two sensitivities over every (layer, bits) pair
    both have (ties share their mean rank)."""
    pairs = [(predicted.values[layer][b], measured.values[layer][b]) for layer in predicted.values
             if layer in measured.values for b in predicted.values[layer] if b in measured.values[layer]]
    if len(pairs) < 2:
        raise ValueError("rank_correlation needs at least two (layer, bits) pairs in both sensitivities")

    def ranks(values: list[float]) -> Tensor:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return torch.tensor(result, dtype=torch.float64)

    a, b = ranks([p for p, _ in pairs]), ranks([m for _, m in pairs])
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator else 0.0


__all__ = ["METHODS", "Sensitivity", "group_macs", "layer_groups", "rank_correlation", "sensitivity"]
