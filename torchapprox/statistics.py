"""Per-layer quantization statistics, gathered by a collector the caller opens.

    with ta.collect_statistics(model) as stats:
        model(x)
    stats.results()   # {layer: {"weight" | "input": {"scale_factor", "mse", "sqnr_db"}}}

While a collector is open every quantized layer that runs reports the error of each of its
quantizations to it (and nothing is computed when none is open). Nothing is kept on the
quantizers: a layer that did not run while the collector was open reports nothing, not its
numbers of an earlier step. For several processes (DDP), :meth:`StatisticsCollector.reduced`
reduces one fixed set of values, the same on every rank whichever layers ran there, so a
branch that runs on some ranks only neither errors nor hangs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .quantizers.approx_quantizer import ApproxQuantizer

STAT_NAMES = ("scale_factor", "mse", "sqnr_db")
LEARNED_STAT = "step"  # the mean learned step, for quantizers that learn theirs


@torch.no_grad()
def quantization_error(x: torch.Tensor, x_fake: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scale factor (``1 / scale``, the seed's ``int_max / max|x|``; the mean over the scales
    of a per-channel or per-token quantization), MSE and SQNR (dB) of one quantization, as
    0-dim float64 tensors on x's device.

    float64 because a float64 tensor's factor may exceed float32's range (max|x| = 1e-38
    gives 1.3e40), and a logged inf would read as divergence. Nothing is read back to the
    host. Both powers are clamped to the smallest normal float so that an exact quantization
    (or an all-zero tensor) gives a large finite SQNR rather than inf/NaN.
    """
    x = x.detach().float()
    error = x_fake.detach().float() - x
    mse = error.square().mean()
    signal = x.square().mean()
    tiny = torch.finfo(torch.float32).tiny
    sqnr_db = 10.0 * (signal.clamp_min(tiny).log10() - mse.clamp_min(tiny).log10())
    scale_factor = 1.0 / scale.detach().double()
    return {"scale_factor": scale_factor.mean(), "mse": mse.double(), "sqnr_db": sqnr_db.double()}


def _learns(quantizer: ApproxQuantizer) -> bool:
    return any(p.requires_grad for p in quantizer._parameters.values() if p is not None)


class StatisticsCollector:
    """Collects the quantization error of every quantized layer of ``model`` that runs
    while it is open (a context manager; :func:`collect_statistics` makes one).

    Results are keyed by layer name and kind: "weight" is the layer's first quantized
    weight (attention: the input projection; LSTM: ``weight_ih_l0``), "input" its first
    quantized input (attention: the query). A quantizer that learns its step (the "lsq"
    family) reports that step too (``step``: the mean over its channels).
    """

    def __init__(self, model: nn.Module) -> None:
        from .qat import quantized_layers, quantized_tensor_names

        # (id(layer), tensor name) -> (layer name, tensor name); the first weight and the
        # first input of each layer are its "weight" and "input" (the logged ones).
        self._sites: dict[tuple[int, str], tuple[str, str]] = {}
        self._kinds: dict[tuple[str, str], tuple[str, str]] = {}  # (layer, kind) -> (layer, tensor)
        self._learned: set[tuple[str, str]] = set()  # the (layer, kind) whose quantizer learns its step
        self._layer_names = {id(layer): name for name, layer in quantized_layers(model).items()}
        for layer_name, layer in quantized_layers(model).items():
            weights, inputs = quantized_tensor_names(layer)
            for kind, names in (("weight", weights), ("input", inputs)):
                for tensor in names:
                    self._sites[(id(layer), tensor)] = (layer_name, tensor)
                if names:
                    self._kinds[(layer_name, kind)] = (layer_name, names[0])
                    if _learns(layer._modules[f"{names[0]}_quantizer"]):
                        self._learned.add((layer_name, kind))
        self._order = list(self._kinds)  # every (layer, kind) the model can report, in order
        # Layers computing with an approximate multiplier report the error it adds to their
        # output, relative to the exact integer output (``record_products``).
        from .layers.approximate import multiplier_of

        self._approximate = [name for name, layer in quantized_layers(model).items() if multiplier_of(layer)]
        self._products: dict[str, torch.Tensor] = {}
        self._quantizers = list({id(m): m for m in model.modules() if isinstance(m, ApproxQuantizer)}.values())
        self._values: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self._open = False

    def __enter__(self) -> StatisticsCollector:
        for quantizer in self._quantizers:
            if quantizer._collector is not None and quantizer._collector is not self:
                raise RuntimeError("another statistics collector is open on this model: close it first")
        for quantizer in self._quantizers:
            quantizer._collector = self
        self._open = True
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        for quantizer in self._quantizers:
            if quantizer._collector is self:
                quantizer._collector = None
        self._open = False

    def record(self, quantizer: ApproxQuantizer, site: tuple[nn.Module, str] | None, x: torch.Tensor,
               x_fake: torch.Tensor, qparams) -> None:
        """Called by quantized layers: ``site`` is (layer, tensor name); None (a direct call
        of the quantizer) is not a layer's and is not kept."""
        if site is None or x.numel() == 0:
            return
        key = self._sites.get((id(site[0]), site[1]))
        if key is not None:
            stats = quantization_error(x, x_fake, qparams.channel_scale())
            if _learns(quantizer):
                stats[LEARNED_STAT] = qparams.channel_scale().detach().double().mean()
            self._values[key] = stats

    @torch.no_grad()
    def record_products(self, layer: nn.Module, approximate: torch.Tensor, exact: torch.Tensor) -> None:
        """Called by layers with an approximate multiplier: their sums of products and the
        exact sums of the same levels; kept as ``error_std``, the standard deviation of the
        difference over that of the exact sums (0 for an exact multiplier)."""
        name = self._layer_names.get(id(layer))
        if name is None or exact.numel() < 2:
            return
        exact = exact.detach().double()
        error = approximate.detach().double() - exact
        tiny = torch.finfo(torch.float64).tiny
        self._products[name] = error.std() / exact.std().clamp_min(tiny)

    def _value(self, layer: str, kind: str) -> dict[str, torch.Tensor] | None:
        return self._values.get(self._kinds[(layer, kind)])

    def results(self) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """``{layer: {"weight" | "input": {"scale_factor", "mse", "sqnr_db": 0-dim tensor}}}``
        for the layers that ran; values stay on their device (``float(v)`` reads one)."""
        result: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for layer, kind in self._order:
            value = self._value(layer, kind)
            if value is not None:
                result.setdefault(layer, {})[kind] = dict(value)
        for layer, error_std in self._products.items():
            result.setdefault(layer, {})["products"] = {"error_std": error_std}
        return result

    def tensors(self) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """Every quantized tensor that ran: ``{layer: {tensor name: {stat: value}}}`` (the
        key and value inputs of attention, every weight matrix of an LSTM)."""
        result: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for (layer, tensor), value in self._values.items():
            result.setdefault(layer, {})[tensor] = dict(value)
        return result

    def reduced(self, all_reduce: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
                device: torch.device | None = None) -> dict[str, float]:
        """``{"quant/{layer}/{kind}/{stat}": value}`` (and ``"approx/{layer}/error_std"`` for
        layers with an approximate multiplier), each the mean over the processes where that
        layer ran (``all_reduce(tensor, "sum")``; None: this process alone), read back to the
        host in one transfer. Every process reduces the same fixed-size tensor."""
        names = {key: STAT_NAMES + ((LEARNED_STAT,) if key in self._learned else ()) for key in self._order}
        tags = [f"quant/{layer}/{kind}/{stat}" for layer, kind in self._order for stat in names[(layer, kind)]]
        tags += [f"approx/{layer}/error_std" for layer in self._approximate]
        if not tags:
            return {}
        if device is None:
            device = next((v.device for stats in self._values.values() for v in stats.values()), torch.device("cpu"))
        values = torch.zeros(len(tags), dtype=torch.float64, device=device)
        present = torch.zeros(len(tags), dtype=torch.float64, device=device)
        position = 0
        for key in self._order:
            stats, count = self._value(*key), len(names[key])
            if stats is not None and all(s in stats for s in names[key]):
                values[position:position + count] = torch.stack([stats[s].to(device) for s in names[key]])
                present[position:position + count] = 1.0
            position += count
        for layer in self._approximate:
            if layer in self._products:
                values[position], present[position] = self._products[layer].to(device), 1.0
            position += 1
        both = torch.stack([values, present])
        if all_reduce is not None:
            both = all_reduce(both, "sum")
        totals, counts = both.tolist()  # the one host-device sync
        return {tag: total / count for tag, total, count in zip(tags, totals, counts) if count > 0}


def collect_statistics(model: nn.Module) -> StatisticsCollector:
    """A collector of ``model``'s per-layer quantization statistics (a context manager)."""
    return StatisticsCollector(model)


# The legacy switch (``enable_statistics`` / ``statistics``): one collector per model, kept
# on the model between the two calls.
_LEGACY_ATTR = "_torchapprox_statistics"


def enable_statistics(model: nn.Module, enabled: bool = True) -> None:
    """Record (or stop recording) the error of every quantized layer's next calls, read back
    with :func:`statistics`. Off by default: MSE and SQNR cost a pass over every weight and
    input. ``with collect_statistics(model) as stats:`` does the same for one block."""
    if not isinstance(enabled, bool):
        raise TypeError(f"`enabled` must be True or False, got {enabled!r}")
    collector = model.__dict__.get(_LEGACY_ATTR)
    if enabled:
        if collector is not None:
            collector.close()
        collector = StatisticsCollector(model).__enter__()
        model.__dict__[_LEGACY_ATTR] = collector
    elif collector is not None:
        collector.close()


def statistics(model: nn.Module) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Per-layer statistics recorded since :func:`enable_statistics` (the latest call of
    each layer): ``{layer: {"weight" | "input": {"scale_factor", "mse", "sqnr_db"}}}``."""
    collector = model.__dict__.get(_LEGACY_ATTR)
    return {} if collector is None else collector.results()


__all__ = ["LEARNED_STAT", "STAT_NAMES", "StatisticsCollector", "collect_statistics", "enable_statistics", "quantization_error",
           "statistics"]
