"""BatchNorm folded into the quantized weight, in training too (``attach(fold_batchnorm=True)``).

An integer runtime computes a convolution followed by BatchNorm as one convolution whose
weight is ``w * gamma / sqrt(running_var + eps)`` (per output channel) and whose bias is
``beta + (b - running_mean) * gamma / sqrt(running_var + eps)``. For its integer weights to
be the trained ones, QAT quantizes that folded weight. This is the fold of Jacob et al.,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", CVPR 2018, section 3.2, in the form of torch.ao's ``ConvBn`` modules:

- training, BatchNorm using batch statistics: the layer computes
  ``conv(x_q, Q(w * f)) / f + b`` with ``f = gamma / sqrt(running_var + eps)``, and the
  BatchNorm module then runs as usual (normalising with the batch's statistics and updating
  its running ones): the running-statistics fold is corrected by the batch statistics;
- evaluation, or statistics frozen (:func:`freeze_batchnorm`, or the BatchNorm module in
  eval mode): the layer computes the folded layer itself, ``conv(x_q, Q(w * f), bias)`` with
  the folded bias (on the int32 accumulator grid where the input's scale is constant), and
  the BatchNorm module passes its input through. That is exactly what the exported graph
  computes.

Pairs are found by tracing the model with ``torch.fx``: a Conv1d/2d/3d whose only use is a
BatchNorm1d/2d/3d (or SyncBatchNorm) with as many features as the layer has output channels
and running statistics (not Linear + BatchNorm1d: on a 3-D input BatchNorm1d normalises
dimension 1, not the Linear's features). The BatchNorm module keeps its parameters and buffers
(``state_dict`` is unchanged); its ``forward`` is replaced on the instance while folded
(as ``attach`` does for quantized layers) and restored by ``detach``.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor, nn

FOLD_ATTR = "_torchapprox_fold"  # on the layer and on its BatchNorm: the BatchNormFold
# Not Linear + BatchNorm1d: on a 3-D input BatchNorm1d normalises dimension 1, not the
# Linear's features, and which input a Linear gets is not known when attaching.
FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class BatchNormFold:
    """The BatchNorm folded into one layer: ``layer`` (its qualified name ``layer_name``),
    ``batchnorm`` (``batchnorm_name``), and ``frozen`` (use the running statistics in
    training too)."""

    def __init__(self, layer_name: str, layer: nn.Module, batchnorm_name: str, batchnorm: nn.Module) -> None:
        self.layer_name, self.layer = layer_name, layer
        self.batchnorm_name, self.batchnorm = batchnorm_name, batchnorm
        self.frozen = False

    def uses_running_statistics(self) -> bool:
        """Whether the layer computes the folded layer itself (and the BatchNorm passes
        its input through): in eval mode, with frozen statistics, or with the BatchNorm
        module set to eval by the user."""
        return not self.layer.training or self.frozen or not self.batchnorm.training

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(f, shift)``, 1-D per output channel: ``f = gamma / sqrt(running_var + eps)``
        and ``shift = beta - running_mean * f`` (gamma 1 and beta 0 without affine)."""
        bn = self.batchnorm
        inverse_std = torch.rsqrt(bn.running_var + bn.eps)
        factor = inverse_std if bn.weight is None else bn.weight * inverse_std
        shift = -bn.running_mean * factor
        return factor, shift if bn.bias is None else shift + bn.bias


def fold_of(layer: nn.Module) -> BatchNormFold | None:
    """The fold of a quantized layer, or None."""
    fold = layer.__dict__.get(FOLD_ATTR)
    return fold if fold is not None and fold.layer is layer else None


def _batchnorm_forward(batchnorm: nn.Module, input: Tensor) -> Tensor:
    """A folded BatchNorm's forward: its input as it is while the layer before it computes
    the folded layer (running statistics), else the module's own forward."""
    fold = batchnorm.__dict__.get(FOLD_ATTR)
    if fold is not None and fold.uses_running_statistics():
        return input
    return type(batchnorm).forward(batchnorm, input)


class _Leaves(torch.fx.Tracer):
    """Every registered layer type and every BatchNorm is one call, not traced into."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        from .layers import find_layer_type

        return (isinstance(module, BATCHNORMS) or find_layer_type(module) is not None
                or super().is_leaf_module(module, qualified_name))


def find_pairs(model: nn.Module, layer_names: list[str]) -> dict[str, str]:
    """``{layer name: BatchNorm name}`` for each of ``layer_names`` whose only use is a
    BatchNorm over its output channels (see the module docstring).

    Raises:
        ValueError: the model cannot be traced by ``torch.fx`` (data-dependent control
            flow), with the tracer's message.
    """
    wanted = set(layer_names)
    if not wanted:
        return {}
    try:
        graph = _Leaves().trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure gets the same explanation
        raise ValueError("fold_batchnorm=True finds each layer followed by BatchNorm by tracing the model with "
                         f"torch.fx, which failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                         "fold only traceable parts with a rule ({'pattern': {'fold_batchnorm': True}}) or attach "
                         "without it") from None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in wanted or calls[node.target] != 1 or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op != "call_module" or calls[user.target] != 1 or user.args[:1] != (node,):
            continue
        layer, batchnorm = model.get_submodule(node.target), model.get_submodule(user.target)
        if foldable(layer, batchnorm):
            pairs[node.target] = user.target
    return pairs


def foldable(layer: nn.Module, batchnorm: nn.Module) -> bool:
    """Whether ``batchnorm`` can be folded into ``layer``: a Conv1d/2d/3d and a BatchNorm
    with running statistics over its output channels."""
    if not isinstance(layer, FOLDABLE_LAYERS) or not isinstance(batchnorm, BATCHNORMS):
        return False
    channels = layer.out_channels
    return batchnorm.num_features == channels and batchnorm.track_running_stats and batchnorm.running_var is not None


def install(model: nn.Module, pairs: dict[str, str]) -> None:
    """Fold each ``{layer: BatchNorm}`` of ``pairs`` (names in ``model``)."""
    for layer_name, batchnorm_name in pairs.items():
        layer, batchnorm = model.get_submodule(layer_name), model.get_submodule(batchnorm_name)
        if not foldable(layer, batchnorm):
            raise ValueError(f"cannot fold {batchnorm_name!r} ({type(batchnorm).__name__}) into {layer_name!r} "
                             f"({type(layer).__name__}): a Conv1d/2d/3d followed by a BatchNorm with running "
                             "statistics over its output channels is needed")
        fold = BatchNormFold(layer_name, layer, batchnorm_name, batchnorm)
        layer.__dict__[FOLD_ATTR] = fold
        batchnorm.__dict__[FOLD_ATTR] = fold
        # A partial of a module-level function survives pickling and deepcopy.
        batchnorm.forward = functools.partial(_batchnorm_forward, batchnorm)


def remove(model: nn.Module) -> None:
    """Undo every fold in ``model``: the BatchNorm modules compute on their own again."""
    for module in model.modules():
        fold = module.__dict__.pop(FOLD_ATTR, None)
        if fold is not None and isinstance(module, BATCHNORMS):
            module.__dict__.pop("forward", None)


def folds(model: nn.Module) -> dict[str, str]:
    """``{layer name: BatchNorm name}`` of the folds in ``model``."""
    return {name: fold.batchnorm_name for name, module in model.named_modules()
            if (fold := fold_of(module)) is not None}


def rebind(model: nn.Module) -> list[str]:
    """Fold again into the BatchNorm modules the model holds now, under the recorded names.

    Something that replaces modules after ``attach`` (Lightning's ``sync_batchnorm=True``
    converts BatchNorm to SyncBatchNorm when the strategy sets up, after callbacks attach)
    leaves a fold pointing at a module that no longer runs; the callback calls this when
    fitting, validation, testing and prediction start. Returns the BatchNorm names rebound.
    """
    rebound = []
    for layer_name, layer in model.named_modules():
        fold = fold_of(layer)
        if fold is None:
            continue
        try:
            current = model.get_submodule(fold.batchnorm_name)
        except AttributeError:
            current = None
        if current is fold.batchnorm:
            continue
        if current is None or not foldable(layer, current):
            warnings.warn(f"the BatchNorm {fold.batchnorm_name!r} folded into {layer_name!r} was replaced by "
                          f"{type(current).__name__}, which cannot be folded: the fold is removed", UserWarning,
                          stacklevel=2)
            layer.__dict__.pop(FOLD_ATTR, None)
            continue
        old = fold.batchnorm
        old.__dict__.pop(FOLD_ATTR, None)
        old.__dict__.pop("forward", None)
        frozen = fold.frozen
        install(model, {layer_name: fold.batchnorm_name})
        fold_of(layer).frozen = frozen
        rebound.append(fold.batchnorm_name)
    return rebound


def freeze_batchnorm(model: nn.Module, frozen: bool = True) -> list[str]:
    """Freeze (or unfreeze) the statistics of every folded BatchNorm in ``model``: frozen,
    training uses the running statistics (they stop updating) and computes exactly the
    folded layer that is exported (Jacob et al. 2018 freeze them late in training).
    Returns the folded layers' names.

    Raises:
        TypeError: ``frozen`` is not a bool.
        ValueError: ``model`` has no folded BatchNorm.
    """
    if not isinstance(frozen, bool):
        raise TypeError(f"`frozen` must be True or False, got {frozen!r}")
    names = []
    for name, module in model.named_modules():
        fold = fold_of(module)
        if fold is not None:
            fold.frozen = frozen
            names.append(name)
    if not names:
        raise ValueError("`model` has no folded BatchNorm: attach(model, fold_batchnorm=True) first")
    return names


def frozen_layers(model: nn.Module) -> list[str]:
    """The names of the layers whose folded BatchNorm statistics are frozen."""
    return [name for name, module in model.named_modules() if (fold := fold_of(module)) is not None and fold.frozen]


def batchnorm_frozen(model: nn.Module) -> bool | None:
    """Whether the model's folded BatchNorm statistics are frozen (None: no fold)."""
    states = {fold.frozen for module in model.modules() if (fold := fold_of(module)) is not None}
    return None if not states else all(states)
