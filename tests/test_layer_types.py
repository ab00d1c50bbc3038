"""Every registered layer type against an independent functional reference, per-tensor and
per-channel; the registration API; coverage reports; tied weights and baking.

References compute with explicitly fake-quantized operands (MinMaxQuant, checked against
ATen's per-tensor and per-channel fake quantization below and in test_quantizers.py) and
torch's own functional ops or modules, never through torchapprox's layer code.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import torchapprox as ta
from torchapprox.layers import quantized_input, quantized_weight, register_layer

BITS = 4


def fq(t, axis=None, bits=BITS, grid="signed"):
    return ta.MinMaxQuant(bits, grid=grid, axis=axis)(t)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------ per-channel scales
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_equals_torchs_per_channel_fake_quantization(axis, bits):
    x = torch.randn(6, 5, 4) * torch.linspace(0.1, 5, 4)  # channels of very different ranges
    q = ta.MinMaxQuant(bits, axis=axis)
    top = 2 ** (bits - 1) - 1
    dim = axis % x.dim()
    reduce = [d for d in range(x.dim()) if d != dim]
    scales = x.abs().amax(dim=reduce).double() / top
    oracle = torch.fake_quantize_per_channel_affine(x, scales.float(), torch.zeros(x.shape[dim], dtype=torch.int32),
                                                    dim, -top, top)
    actual = q(x)
    step = (scales.float().reshape([-1 if d == dim else 1 for d in range(x.dim())]))
    index_diff = ((actual - oracle) / step).round().abs()
    assert index_diff.max() <= 1 and index_diff.sum() <= 2  # equal but at rounding ties
    assert q.scale_factor.shape == (x.shape[dim],)
    assert torch.allclose(q.scale_factor.double(), 1 / scales, rtol=1e-6)


def test_per_channel_gives_each_channel_all_its_levels():
    w = torch.randn(8, 16) * torch.logspace(-2, 1, 8).unsqueeze(1)
    per_tensor, per_channel = fq(w, bits=3), fq(w, axis=0, bits=3)
    levels = lambda t: [len(row.unique()) for row in t]  # noqa: E731
    assert min(levels(per_channel)) >= 5 and min(levels(per_tensor)) == 1  # small rows collapse to 0
    assert (per_channel - w).square().mean() < (per_tensor - w).square().mean()


def test_bad_axis_is_rejected():
    with pytest.raises(TypeError, match=r"`axis` must be None \(per tensor\), an int dimension or .token., got 1.5"):
        ta.MinMaxQuant(4, axis=1.5)
    with pytest.raises(ValueError, match=r"`axis` 3 is out of range for a tensor of 2 dimensions"):
        ta.MinMaxQuant(4, axis=3)(torch.randn(2, 3))


# ------------------------------------------------------------------------------ layer types
def fq_transposed_weight(weight, groups):
    """Per-channel fake quantization of a ConvTranspose weight [in, out/groups, ...]: one scale
    per output channel, i.e. per column of each group's own block of rows."""
    blocks = weight.chunk(groups, dim=0)
    return torch.cat([fq(block, 1) for block in blocks], dim=0)


def _attached(layer, per_channel, **kwargs):
    reference = copy.deepcopy(layer)
    ta.attach(layer, BITS, per_channel_weights=per_channel, **kwargs)
    return layer, reference


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dims, kwargs, output_size", [
    (1, {"stride": 2, "padding": 1}, None),
    (2, {"stride": 2, "padding": 1, "output_padding": 1, "groups": 2, "dilation": 1}, None),
    (2, {"stride": 2, "padding": 1}, [10, 10]),  # output_size chooses the output padding
    (3, {"stride": 1, "padding": 0, "bias": False}, None),
])
def test_conv_transpose(dims, kwargs, output_size, per_channel):
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    layer, ref = _attached(cls(4, 6, 3, **kwargs), per_channel)
    x = torch.randn(2, 4, *([5] * dims), requires_grad=True)
    out = layer(x, output_size) if output_size else layer(x)
    functional = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
    output_padding = kwargs.get("output_padding", 0) if output_size is None else 1
    weight = fq_transposed_weight(ref.weight, kwargs.get("groups", 1)) if per_channel else fq(ref.weight)
    expected = functional(fq(x), weight, ref.bias, kwargs["stride"],
                          kwargs["padding"], output_padding, kwargs.get("groups", 1), kwargs.get("dilation", 1))
    assert torch.allclose(out, expected, atol=1e-5)
    out.square().sum().backward()
    assert layer.weight.grad is not None and x.grad is not None
    assert layer.weight_quantizer.axis == (1 if per_channel else None)


@pytest.mark.parametrize("padding, padding_mode", [("same", "zeros"), ("same", "reflect"), (2, "circular"),
                                                   ("valid", "zeros"), (1, "replicate")])
def test_conv_padding_modes(padding, padding_mode):
    layer, ref = _attached(nn.Conv2d(3, 4, (4, 3), padding=padding, padding_mode=padding_mode), False)
    x = torch.randn(2, 3, 7, 7)
    ref.weight.data = fq(ref.weight)
    ref.register_forward_pre_hook(lambda m, args: (fq(args[0]),))
    assert torch.allclose(layer(x), ref(x), atol=1e-5)  # nn.Conv2d's own padding, on quantized operands


def test_unbatched_conv_input():
    layer, ref = _attached(nn.Conv1d(2, 3, 3), False)
    x = torch.randn(2, 9, requires_grad=True)
    out = layer(x)
    assert torch.allclose(out, F.conv1d(fq(x), fq(ref.weight), ref.bias), atol=1e-6)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("kwargs", [{}, {"padding_idx": 0}, {"max_norm": 1.0}, {"sparse": True}])
def test_embedding_quantizes_its_weight_only(kwargs, per_channel):
    layer, ref = _attached(nn.Embedding(20, 6, **kwargs), per_channel)
    assert not hasattr(layer, "input_quantizer")  # the input is indices
    idx = torch.tensor([[0, 3, 5], [7, 0, 19]])
    out = layer(idx)
    if "max_norm" in kwargs:  # both renormalise the looked-up rows of their float master in place
        F.embedding(idx, ref.weight.detach(), max_norm=1.0)
        assert torch.allclose(layer.weight, ref.weight)
    expected = F.embedding(idx, fq(ref.weight, 0 if per_channel else None), kwargs.get("padding_idx"))
    assert torch.equal(out, expected)
    out.sum().backward()
    grad = layer.weight.grad.to_dense() if kwargs.get("sparse") else layer.weight.grad
    assert grad[3].sum() == 6 and grad[1].sum() == 0
    if "padding_idx" in kwargs:
        assert grad[0].abs().sum() == 0


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag(mode):
    layer, ref = _attached(nn.EmbeddingBag(20, 6, mode=mode), True)
    idx, offsets = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9]), torch.tensor([0, 4])
    weights = torch.rand(8) if mode == "sum" else None
    out = layer(idx, offsets, per_sample_weights=weights)
    expected = F.embedding_bag(idx, fq(ref.weight, 0), offsets, mode=mode, per_sample_weights=weights)
    assert torch.allclose(out, expected, atol=1e-6)


def _rnn_reference(ref, x, hx, per_channel):
    with torch.no_grad():
        for name, parameter in ref.named_parameters():
            if name.startswith("weight_"):
                parameter.copy_(fq(parameter, 0 if per_channel else None))
    data = x if not isinstance(x, nn.utils.rnn.PackedSequence) else x
    return ref(data, hx)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("cls, kwargs", [
    (nn.LSTM, {"num_layers": 2, "bidirectional": True}),
    (nn.LSTM, {"proj_size": 3, "batch_first": True}),
    (nn.GRU, {"num_layers": 2, "batch_first": True}),
    (nn.RNN, {"nonlinearity": "relu", "bias": False}),
    (nn.RNN, {"bidirectional": True}),
])
def test_recurrent_layers_quantize_every_weight_matrix_and_the_input(cls, kwargs, per_channel):
    layer, ref = _attached(cls(5, 4, **kwargs), per_channel)
    matrices = [n for n, _ in layer.named_parameters() if n.startswith("weight_")]
    assert {f"{n}_quantizer" for n in matrices} <= set(dict(layer.named_children()))
    x = torch.randn(7, 3, 5)
    out, hidden = layer(x)
    expected, expected_hidden = _rnn_reference(ref, fq(x), None, per_channel)
    assert torch.allclose(out, expected, atol=1e-5)
    for h, e in zip(hidden if isinstance(hidden, tuple) else (hidden,),
                    expected_hidden if isinstance(expected_hidden, tuple) else (expected_hidden,)):
        assert torch.allclose(h, e, atol=1e-5)
    out.sum().backward()
    assert all(getattr(layer, n).grad is not None for n in matrices)


def test_recurrent_layers_take_packed_sequences_unbatched_input_and_a_state():
    layer, ref = _attached(nn.LSTM(5, 4), False)
    x, lengths = torch.randn(6, 3, 5), torch.tensor([6, 2, 4])
    state = (torch.randn(1, 3, 4), torch.randn(1, 3, 4))
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, (h, c) = layer(packed, state)
    quantized = pack_padded_sequence(fq(x), lengths, enforce_sorted=False)  # max|x| over the padding too
    expected, (eh, ec) = _rnn_reference(ref, quantized, state, False)
    max_data = packed.data.abs().max()
    if max_data == x.abs().max():  # the scale is the data's own: equal when padding holds no larger value
        assert torch.allclose(out.data, expected.data, atol=1e-5) and torch.allclose(h, eh, atol=1e-5)
    single, (hs, cs) = layer(x[:, 0], (state[0][:, 0], state[1][:, 0]))
    assert single.shape == (6, 4) and hs.shape == (1, 4)
    with pytest.raises(RuntimeError, match="For unbatched 2-D input, hx and cx should also be 2-D"):
        layer(x[:, 0], state)


class Conv1D(nn.Module):
    """transformers' Conv1D (GPT-2): weight stored [in, out], x @ weight + bias."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


Conv1D.__module__, Conv1D.__qualname__ = "transformers.pytorch_utils", "Conv1D"  # as transformers names it


@pytest.mark.parametrize("per_channel", [False, True])
def test_transformers_conv1d_without_transformers_installed(per_channel):
    layer, ref = _attached(Conv1D(6, 4), per_channel)
    x = torch.randn(2, 3, 4)
    expected = fq(x) @ fq(ref.weight, 1 if per_channel else None) + ref.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert layer.weight_quantizer.axis == (1 if per_channel else None)


def test_transformers_gpt2_is_fully_quantized():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    names = ta.attach(model, 8, activations=False)  # weights only: the baked model computes the same
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj", "transformer.wte", "lm_head"} <= set(names)
    rows = {r["layer_type"]: r for r in ta.coverage(model)}
    assert rows["Conv1D"]["quantized_layers"] == rows["Conv1D"]["layers"] == 8
    assert sum(r["quantized_share"] for r in rows.values()) > 0.95
    assert model.lm_head.weight_quantizer is model.transformer.wte.weight_quantizer  # tied: one quantizer
    with torch.no_grad():
        attached = model(ids).logits
    ta.detach(model, bake=True)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, attached, atol=1e-5)


# --------------------------------------------------------------------------- registration
class Scaled(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


def scaled_forward(layer, x):
    return 2.0 * F.linear(quantized_input(layer, x), quantized_weight(layer), layer.bias)


def test_a_subclass_with_its_own_forward_stays_float_until_registered():
    model = nn.Sequential(nn.Linear(4, 4), Scaled(4, 4))
    with pytest.warns(UserWarning, match=r"Scaled \(1 layer, [\d.]+% of parameters\) left in float"):
        assert ta.attach(model, 4) == ["0"]
    register_layer(Scaled, weights={"weight": 0}, forward=scaled_forward)
    try:
        assert ta.attach(model, 4) == ["0", "1"]
        x = torch.randn(3, 4)
        h = F.linear(fq(x), fq(model[0].weight), model[0].bias)
        assert torch.allclose(model(x), 2.0 * F.linear(fq(h), fq(model[1].weight), model[1].bias), atol=1e-6)
    finally:
        from torchapprox.layers.registry import _REGISTRY
        _REGISTRY.pop(Scaled)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"layer_type": "Conv1D", "weights": {"weight": 1}}, TypeError, "qualified class name"),
    ({"layer_type": int, "weights": {"weight": 1}}, TypeError, "must be an nn.Module subclass"),
    ({"layer_type": Scaled, "weights": {}}, TypeError, "non-empty dict"),
    ({"layer_type": Scaled, "weights": {"weight": "0"}}, TypeError, r"map weight names \(str\) to axes \(int\)"),
    ({"layer_type": Scaled, "weights": {"weight": 0}, "inputs": ["not a name"]}, TypeError, "identifiers"),
])
def test_register_layer_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        register_layer(**kwargs)(scaled_forward)


# ------------------------------------------------------------------------------- coverage
class Tagger(nn.Module):
    """A sequence tagger with a layer type torchapprox does not know."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.mixer = Scaled(16, 16)
        self.head = nn.Linear(16, 5)
        self.norm = nn.LayerNorm(16)

    def forward(self, ids):
        return self.head(self.norm(self.mixer(self.embed(ids))))


def test_coverage_table_and_the_warning_name_the_float_layer_types():
    model = Tagger()
    with pytest.warns(UserWarning) as caught:
        names = ta.attach(model, 4)
    messages = [str(w.message) for w in caught if "left in float" in str(w.message)]
    assert len(messages) == 1  # once per attach
    total = sum(p.numel() for p in model.parameters())
    share = f"{100 * (16 * 16 + 16) / total:.1f}"
    assert f"Scaled (1 layer, {share}% of parameters) left in float" in messages[0]
    assert names == ["embed", "head"]
    rows = {r["layer_type"]: r for r in ta.coverage(model)}
    assert rows["Embedding"]["quantized_parameters"] == 800 and rows["Linear"]["quantized_parameters"] == 80
    assert rows["Scaled"]["quantized_parameters"] == 0 and not rows["Scaled"]["registered"]
    assert rows["LayerNorm"]["float_weighted_layers"] == 0  # 1-D parameters: left in float by design
    assert abs(sum(r["share"] for r in rows.values()) - 1) < 1e-9
    summary = ta.coverage_summary(model)
    assert summary.startswith("quantized ") and "Embedding 1/1" in summary and "Scaled 0/1" in summary


def test_excluded_layers_are_not_warned_about():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ta.attach(nn.Sequential(nn.Linear(4, 4), nn.GRU(4, 4)), 4, exclude=["1"])


# -------------------------------------------------------------------------- tied weights
class TiedLM(nn.Module):
    def __init__(self, tie_to_float=False):
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 30, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.embed(ids))))


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_tied_weight_is_quantized_the_same_wherever_it_is_used_and_bakes_once(per_channel):
    model = TiedLM()
    ta.attach(model, 3, per_channel_weights=per_channel, activation_grid="auto")
    assert model.head.weight_quantizer is model.embed.weight_quantizer
    ids = torch.randint(0, 30, (4, 5))
    model.eval()
    with torch.no_grad():
        attached = model(ids)
        w = fq(model.embed.weight, 0 if per_channel else None, bits=3)
        body = fq(model.body.weight, 0 if per_channel else None, bits=3)
        h = torch.tanh(F.linear(fq(F.embedding(ids, w), bits=3, grid="auto"), body, model.body.bias))
        assert torch.allclose(attached, F.linear(fq(h, bits=3, grid="auto"), w), atol=1e-6)
    ta.detach(model, bake=True)
    assert model.head.weight is model.embed.weight  # still tied
    assert torch.equal(model.embed.weight, w)  # quantized once, not twice
    with torch.no_grad():
        # the plain model computes with the grid weights; its activations are float now
        assert torch.allclose(model.embed(ids), F.embedding(ids, w))


def test_bake_refuses_to_change_a_weight_a_float_layer_also_uses():
    model = TiedLM()
    ta.attach(model, 4, exclude=["head"])
    before = model.embed.weight.detach().clone()
    with pytest.raises(ValueError, match=r"cannot bake: the weight quantized as embed.weight is also used, in float, "
                                         r"as 'head.weight'"):
        ta.detach(model, bake=True)
    assert torch.equal(model.embed.weight, before) and ta.quantized_layers(model)  # nothing changed


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 2, 3)),
    lambda: nn.Sequential(nn.Embedding(10, 4), nn.LSTM(4, 3, batch_first=True)),
    lambda: nn.Sequential(nn.Linear(4, 4), nn.utils.parametrizations.weight_norm(nn.Linear(4, 2))),
])
@pytest.mark.parametrize("per_channel", [False, True])
def test_bake_leaves_a_plain_model_computing_the_quantized_weights(make, per_channel):
    model = make()
    x = torch.randn(2, 3, 6, 6) if isinstance(model[0], nn.Conv2d) else (
        torch.randint(0, 10, (2, 5)) if isinstance(model[0], nn.Embedding) else torch.randn(3, 4))
    ta.attach(model, 4, per_channel_weights=per_channel, activations=False)
    model.eval()
    with torch.no_grad():
        attached = model(x)
    ta.detach(model, bake=True)
    assert not ta.quantized_layers(model)
    with torch.no_grad():
        baked = model(x)
    baked, attached = (baked[0], attached[0]) if isinstance(baked, tuple) else (baked, attached)
    assert torch.allclose(baked, attached, atol=1e-6)


# ------------------------------------------------------------------------------ attention
def _reference_attention(attn, query, key, value, **kwargs):
    """F.multi_head_attention_forward on quantized operands, with an identity output
    projection, followed by the quantized out_proj: the attached layer's computation."""
    batch_first = attn.batch_first and query.dim() == 3
    q, k, v = (t.transpose(0, 1) if batch_first else t for t in (query, key, value))
    quantized = {}
    for tensor in (q, k, v):
        quantized.setdefault(id(tensor), fq(tensor))
    q, k, v = quantized[id(q)], quantized[id(k)], quantized[id(v)]
    embed = attn.embed_dim
    separate = attn.in_proj_weight is None
    pre, weights = F.multi_head_attention_forward(
        q, k, v, embed, attn.num_heads, None if separate else fq(attn.in_proj_weight), attn.in_proj_bias,
        attn.bias_k, attn.bias_v, attn.add_zero_attn, 0.0, torch.eye(embed), torch.zeros(embed), training=False,
        use_separate_proj_weight=separate, q_proj_weight=fq(attn.q_proj_weight) if separate else None,
        k_proj_weight=fq(attn.k_proj_weight) if separate else None,
        v_proj_weight=fq(attn.v_proj_weight) if separate else None, **kwargs)
    out = F.linear(fq(pre), fq(attn.out_proj.weight), attn.out_proj.bias)
    return (out.transpose(0, 1) if batch_first else out), weights


@pytest.mark.parametrize("options", [
    {},
    {"batch_first": True},
    {"add_bias_kv": True, "add_zero_attn": True},
    {"kdim": 6, "vdim": 5},
])
@pytest.mark.parametrize("call", [
    {"need_weights": True},
    {"need_weights": False},
    {"need_weights": True, "average_attn_weights": False, "padding": True},
    {"need_weights": False, "padding": True, "mask": "bool"},
    {"need_weights": False, "mask": "float"},
    {"need_weights": False, "mask": "causal"},
])
def test_multihead_attention_against_torchs_functional(options, call):
    attn = nn.MultiheadAttention(8, 2, **options).eval()
    ta.attach(attn, BITS)
    length, batch = 5, 3
    shape = (batch, length) if options.get("batch_first") else (length, batch)
    query = torch.randn(*shape, 8)
    key = torch.randn(*shape, options.get("kdim", 8)) if "kdim" in options else query
    value = torch.randn(*shape, options.get("vdim", 8)) if "vdim" in options else key
    kwargs = {k: v for k, v in call.items() if k in ("need_weights", "average_attn_weights")}
    if call.get("padding"):
        kwargs["key_padding_mask"] = torch.tensor([[False] * length, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    mask = call.get("mask")
    if mask == "bool":
        kwargs["attn_mask"] = torch.rand(length, length) > 0.7
        kwargs["attn_mask"][:, 0] = False
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(length, length)
    elif mask == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length)
        kwargs["is_causal"] = True
    with torch.no_grad():
        out, weights = attn(query, key, value, **kwargs)
        expected, expected_weights = _reference_attention(attn, query, key, value, **kwargs)
    assert torch.allclose(out, expected, atol=1e-5)
    assert (weights is None) == (expected_weights is None)
    if weights is not None:
        assert torch.allclose(weights, expected_weights, atol=1e-6)
    unbatched = attn(query[0] if options.get("batch_first") else query[:, 0],
                     (key[0] if options.get("batch_first") else key[:, 0]),
                     (value[0] if options.get("batch_first") else value[:, 0]), need_weights=False)[0]
    assert unbatched.shape == (length, 8)
