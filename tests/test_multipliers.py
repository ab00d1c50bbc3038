"""The multiplier catalogue: tables against independent scalar models, error metrics against
hand-computed values, costs, ``from_table`` validation and ``product``.

The scalar references below are plain Python integer arithmetic written from the published
definitions, independent of ``torchapprox.multipliers.models``.
"""

import random
from fractions import Fraction

import numpy as np
import pytest
import torch

import torchapprox.multipliers as tm
from torchapprox.multipliers import domain

SIGNED_EDGES = [-128, -127, -65, -64, -63, -1, 0, 1, 2, 3, 63, 64, 65, 126, 127]
UNSIGNED_EDGES = [0, 1, 2, 3, 63, 64, 127, 128, 129, 191, 254, 255]


def _pairs(input_signed: bool, count: int = 600):
    """Edge operand pairs and a fixed random sample of the domain."""
    rng = random.Random(1234)
    xs = SIGNED_EDGES if input_signed else UNSIGNED_EDGES
    low, high = domain.input_range(input_signed)
    pairs = [(x, w) for x in xs for w in SIGNED_EDGES]
    pairs += [(rng.randint(low, high), rng.randint(-128, 127)) for _ in range(count)]
    return pairs


def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


# ----------------------------------------------------------------- scalar reference models
def _array_reference(a: int, b: int, h: int, v: int) -> int:
    """Sum of partial-product bits a_j b_i 2^(i+j) kept by a broken array: i >= h, i + j >= v."""
    total = 0
    for i in range(8):  # weight bits: rows
        for j in range(8):  # input bits: columns
            if i >= h and i + j >= v and (a >> j) & 1 and (b >> i) & 1:
                total += 1 << (i + j)
    return total


def _drum_reference(a: int, k: int) -> int:
    n = a.bit_length()
    if n <= k:
        return a
    dropped = n - k
    return ((a >> dropped) | 1) << dropped


def _mitchell_reference(a: int, b: int) -> int:
    """Mitchell 1962 with exact rational arithmetic: log2(2^k (1 + f)) ~ k + f and back."""
    if a == 0 or b == 0:
        return 0
    ka, kb = a.bit_length() - 1, b.bit_length() - 1
    log_sum = ka + kb + Fraction(a, 1 << ka) - 1 + Fraction(b, 1 << kb) - 1
    whole = log_sum.numerator // log_sum.denominator
    result = Fraction(2) ** whole * (1 + log_sum - whole)
    assert result.denominator == 1
    return int(result)


def _sign_magnitude(model, x: int, w: int) -> int:
    return _sign(x) * _sign(w) * model(abs(x), abs(w))


CASES = [
    ("exact", lambda: tm.exact, lambda a, b: a * b),
    ("truncated(0)", lambda: lambda **kw: tm.truncated(0, **kw), lambda a, b: a * b),
    ("truncated(5)", lambda: lambda **kw: tm.truncated(5, **kw), lambda a, b: _array_reference(a, b, 0, 5)),
    ("truncated(11)", lambda: lambda **kw: tm.truncated(11, **kw), lambda a, b: _array_reference(a, b, 0, 11)),
    ("broken_array(2, 6)", lambda: lambda **kw: tm.broken_array(2, 6, **kw), lambda a, b: _array_reference(a, b, 2, 6)),
    ("broken_array(3, 0)", lambda: lambda **kw: tm.broken_array(3, 0, **kw), lambda a, b: _array_reference(a, b, 3, 0)),
    ("drum(3)", lambda: lambda **kw: tm.drum(3, **kw), lambda a, b: _drum_reference(a, 3) * _drum_reference(b, 3)),
    ("drum(6)", lambda: lambda **kw: tm.drum(6, **kw), lambda a, b: _drum_reference(a, 6) * _drum_reference(b, 6)),
    ("mitchell", lambda: tm.mitchell, _mitchell_reference),
]


@pytest.mark.parametrize("input_signed", [True, False])
@pytest.mark.parametrize("name,make,model", CASES, ids=[c[0] for c in CASES])
def test_tables_follow_the_published_definitions(name, make, model, input_signed):
    m = make()(input_signed=input_signed)
    assert m.table.dtype == torch.int32 and m.table.shape == (256, 256)
    assert m.name == name and m.input_signed == input_signed
    for x, w in _pairs(input_signed):
        expected = _sign_magnitude(model, x, w)
        row, col = x + (128 if input_signed else 0), w + 128
        assert m.table[row, col].item() == expected, (name, x, w)


def test_hand_checked_entries():
    # DRUM(3): 91 = 0b1011011 keeps 101, lowest kept bit already 1 -> 0b1010000 = 80;
    # 64 = 0b1000000 -> 100 -> 101 -> 0b1010000 = 80 (the unbiasing bit rounds up).
    assert tm.drum(3).product(91, 1).item() == 80
    assert tm.drum(3).product(64, -1).item() == -80
    assert tm.drum(3).product(7, 7).item() == 49  # 3 significant bits: exact
    # Mitchell: 3 * 3: log2 3 ~ 1.5 each, sum 3.0 -> 2^3 = 8 (the worst case, -1/9).
    assert tm.mitchell().product(3, 3).item() == 8
    assert tm.mitchell().product(-3, 3).item() == -8
    # Truncated(2) of 3 * 3: bits a0b0 (2^0), a1b0, a0b1 (2^1) dropped, a1b1 = 4 kept.
    assert tm.truncated(2).product(3, 3).item() == 4
    # BAM(1, 0): weight bit 0's row dropped: 3 * 3 -> 3 * 2 = 6; the input's bit 0 is kept: 3 * 2 = 6.
    assert tm.broken_array(1, 0).product(3, 3).item() == 6
    assert tm.broken_array(1, 0).product(2, 3).item() == 4
    assert tm.broken_array(1, 0).product(3, 2).item() == 6
    # Domain edges and the index convention.
    assert tm.exact().table[0, 0].item() == 16384  # -128 * -128
    assert tm.exact(input_signed=False).table[255, 0].item() == -32640  # 255 * -128
    assert tm.exact(input_signed=False).table[0, 255].item() == 0  # 0 * 127


@pytest.mark.parametrize("input_signed", [True, False])
def test_design_properties_over_the_whole_domain(input_signed):
    exact = domain.exact_table(input_signed).to(torch.int64)
    magnitude = exact.abs()
    for make in (lambda: tm.truncated(6, input_signed=input_signed),
                 lambda: tm.broken_array(3, 7, input_signed=input_signed),
                 lambda: tm.mitchell(input_signed=input_signed)):
        m = make()
        approx = m.table.to(torch.int64)
        assert (approx.abs() <= magnitude).all(), m.name  # these designs never overestimate
        assert (torch.sign(approx) * torch.sign(exact) >= 0).all(), m.name
    # Mitchell's error is at most 1/9 of the product, attained (3 * 3 -> 8).
    mitchell = tm.mitchell(input_signed=input_signed).table.to(torch.int64)
    nonzero = exact != 0
    relative = ((exact - mitchell).abs()[nonzero].double() / magnitude[nonzero].double())
    assert relative.max().item() == pytest.approx(1 / 9, abs=1e-12)
    # The limits of the parameters are exact designs.
    assert tm.drum(8, input_signed=input_signed).is_exact
    assert tm.truncated(0, input_signed=input_signed).is_exact
    assert tm.broken_array(0, 0, input_signed=input_signed).is_exact
    assert torch.equal(tm.broken_array(0, 9, input_signed=input_signed).table,
                       tm.truncated(9, input_signed=input_signed).table)


def test_signed_tables_are_odd_in_each_operand():
    for m in (tm.drum(4), tm.mitchell(), tm.broken_array(2, 5), tm.truncated(7)):
        t = m.table.to(torch.int64)
        inner = t[1:, 1:]  # values -127..127: negation stays in range
        assert torch.equal(inner.flip(0), -inner) and torch.equal(inner.flip(1), -inner), m.name


def test_symmetry_and_exactness_flags():
    assert tm.exact().is_exact and tm.exact().is_symmetric
    assert tm.exact(input_signed=False).is_symmetric
    assert not tm.drum(4).is_exact and tm.drum(4).is_symmetric
    assert not tm.broken_array(2, 4).is_symmetric  # rows are weight bits
    assert not tm.broken_array(2, 4, input_signed=False).is_symmetric
    assert tm.mitchell().is_symmetric


# -------------------------------------------------------------------------------- metrics
def test_metrics_of_a_table_off_by_one_everywhere():
    table = domain.exact_table(True) + 1
    m = tm.Multiplier(table, name="plus one")
    expected_mred = 0.0
    count = 0
    for x in range(-128, 128):
        for w in range(-128, 128):
            if x * w:
                expected_mred += 1 / abs(x * w)
                count += 1
    assert m.mae == 1.0 and m.error_probability == 1.0 and m.mean_error == 1.0 and m.worst_case_error == 1
    assert m.mred == pytest.approx(expected_mred / count, rel=1e-12)
    assert m.nmed == pytest.approx(1 / 16384)
    assert set(m.metrics()) == {"mae", "nmed", "mred", "error_probability", "worst_case_error", "mean_error"}


def test_metrics_of_one_wrong_entry_and_of_the_exact_table():
    table = domain.exact_table(False).clone()
    table[200, 10] -= 1000  # input 200, weight -118
    m = tm.Multiplier(table, input_signed=False)
    assert m.error_probability == 1 / 65536
    assert m.worst_case_error == 1000
    assert m.mae == pytest.approx(1000 / 65536) and m.mean_error == pytest.approx(-1000 / 65536)
    pairs_nonzero = 255 * 255  # inputs 1..255 times weights other than 0
    assert m.mred == pytest.approx(1000 / (200 * 118) / pairs_nonzero)
    exact = tm.exact()
    assert exact.metrics() == {"mae": 0.0, "nmed": 0.0, "mred": 0.0, "error_probability": 0.0,
                               "worst_case_error": 0, "mean_error": 0.0}


def test_metrics_order_the_designs_sensibly():
    assert 0 < tm.truncated(2).mae < tm.truncated(5).mae < tm.truncated(9).mae
    assert tm.drum(6).mae < tm.drum(4).mae < tm.drum(3).mae
    # Sign-magnitude designs err symmetrically in the sign of the weight (and -128's magnitude,
    # a power of two, is handled exactly by these): no bias over the whole domain, in either.
    for input_signed in (True, False):
        for m in (tm.mitchell(input_signed=input_signed), tm.truncated(6, input_signed=input_signed)):
            assert m.mean_error == 0.0 and m.mae > 0, m.name
    # A table that overestimates every product has a positive bias.
    assert tm.Multiplier(domain.exact_table(True) + 3).mean_error == 3.0


def test_costs():
    assert tm.exact().cost == 1.0 and tm.truncated(0).cost == 1.0
    assert tm.truncated(8).cost == 28 / 64  # columns 8..14 hold 7+6+...+1 = 28 of the 64 bits
    assert tm.truncated(1).cost == 63 / 64
    assert tm.broken_array(2, 0).cost == 48 / 64  # two of eight rows gone
    assert tm.broken_array(2, 3).cost == (48 - 1) / 64  # and bit (i=2, j=0) of column 2 < 3
    assert tm.drum(4).cost is None and tm.mitchell().cost is None


def test_generator_arguments_are_checked():
    with pytest.raises(ValueError, match=r"truncated: k must be an integer in \[0, 15\], got 16"):
        tm.truncated(16)
    with pytest.raises(ValueError, match=r"broken_array: h must be an integer in \[0, 7\], got 8"):
        tm.broken_array(8, 0)
    with pytest.raises(ValueError, match=r"drum: k must be an integer in \[1, 8\], got 2.5"):
        tm.drum(2.5)


# ----------------------------------------------------------------------------- from_table
def test_from_table_accepts_tensors_arrays_lists_and_npy_files(tmp_path):
    table = tm.broken_array(2, 5).table
    path = tmp_path / "bam.npy"
    np.save(path, table.numpy().astype(np.int64))
    for source in (table, table.numpy(), table.tolist(), str(path), path, table.double()):
        m = tm.Multiplier.from_table(source, name="bam")
        assert torch.equal(m.table, table) and m.table.dtype == torch.int32 and m.name == "bam"
    weight_major = tm.Multiplier.from_table(table.t().clone(), transpose=True)
    assert torch.equal(weight_major.table, table)


def test_from_table_errors_name_what_is_wrong(tmp_path):
    exact = domain.exact_table(True)
    with pytest.raises(ValueError, match=r"shape \[256, 256\].*got \[256, 255\]"):
        tm.Multiplier.from_table(exact[:, :255])
    half = exact.double()
    half[3, 4] = 0.5
    with pytest.raises(ValueError, match=r"must hold integers; entry \[3, 4\] is 0.5"):
        tm.Multiplier.from_table(half)
    nan = exact.float()
    nan[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"entry \[0, 1\] is nan"):
        tm.Multiplier.from_table(nan)
    big = exact.to(torch.int64)
    big[5, 6] = 1 << 31
    with pytest.raises(ValueError, match=r"fit in int32.*entry \[5, 6\] is 2147483648"):
        tm.Multiplier.from_table(big)
    with pytest.raises(TypeError, match="must hold integers, got dtype torch.bool"):
        tm.Multiplier.from_table(torch.ones(256, 256, dtype=torch.bool))
    with pytest.raises(ValueError, match="cannot read a .npy array"):
        tm.Multiplier.from_table(tmp_path / "missing.npy")


def test_from_table_detects_layout_mistakes():
    unsigned = domain.exact_table(False)
    with pytest.raises(ValueError, match="weight-major.*transpose=True"):
        tm.Multiplier.from_table(unsigned.t().clone(), input_signed=False)
    approx = tm.mitchell(input_signed=False).table
    with pytest.raises(ValueError, match="weight-major.*transpose=True"):
        tm.Multiplier.from_table(approx.t().clone(), input_signed=False)
    assert torch.equal(tm.Multiplier.from_table(approx.t().clone(), input_signed=False, transpose=True).table, approx)
    with pytest.raises(ValueError, match="signed x signed domain; pass input_signed=True"):
        tm.Multiplier.from_table(domain.exact_table(True), input_signed=False)
    with pytest.raises(ValueError, match="unsigned input x signed weight domain; pass input_signed=False"):
        tm.Multiplier.from_table(unsigned, input_signed=True)
    twos_complement = torch.roll(domain.exact_table(True), shifts=(128, 128), dims=(0, 1))
    with pytest.raises(ValueError, match=r"two's-complement.*torch.roll\(table, shifts=\[128, 128\], dims=\[0, 1\]\)"):
        tm.Multiplier.from_table(twos_complement)
    fixed = torch.roll(twos_complement, shifts=[128, 128], dims=[0, 1])  # the fix the message gives
    assert tm.Multiplier.from_table(fixed).is_exact
    # check_layout=False keeps any table as given; an asymmetric signed table cannot be
    # checked for its order (documented): its transpose is accepted.
    assert tm.Multiplier.from_table(unsigned.t().clone(), input_signed=False, check_layout=False) is not None
    bam = tm.broken_array(3, 3).table
    assert not torch.equal(tm.Multiplier.from_table(bam.t().clone()).table, bam)


def test_a_wrong_decomposition_is_refused():
    good = tm.drum(4).decomposition
    with pytest.raises(ValueError, match="decomposition does not reproduce the table"):
        tm.Multiplier(tm.drum(5).table, decomposition=good)


def test_decompositions_of_the_builtins():
    assert tm.exact().decomposition.rank == 1 and tm.exact().decomposition_is_identity
    assert tm.drum(4).decomposition.rank == 1 and not tm.drum(4).decomposition_is_identity
    assert tm.truncated(3).decomposition.rank == 4  # the full-input row group and one per cut row
    assert tm.broken_array(4, 0).decomposition.rank == 1  # rows of weight bits 4..7: one mask
    assert tm.mitchell().decomposition is None
    custom_exact = tm.Multiplier.from_table(domain.exact_table(False), input_signed=False)
    assert custom_exact.decomposition_is_identity


# -------------------------------------------------------------------------------- product
def test_product_broadcasts_and_keeps_dtypes():
    m = tm.drum(4, input_signed=False)
    x = torch.tensor([[0], [200], [255]])
    w = torch.tensor([-128, 5, 127])
    out = m.product(x, w)
    assert out.shape == (3, 3) and out.dtype == torch.int32
    for i, xv in enumerate([0, 200, 255]):
        for j, wv in enumerate([-128, 5, 127]):
            drum4 = _sign_magnitude(lambda a, b: _drum_reference(a, 4) * _drum_reference(b, 4), xv, wv)
            assert out[i, j].item() == drum4
    assert m.product(x.float(), w).dtype == torch.float32
    assert m.product(x.double(), w.float()).dtype == torch.float64
    assert m.product(3, -2).item() == -6


def test_product_errors_name_the_argument_value_and_range():
    m = tm.exact(input_signed=False)
    with pytest.raises(ValueError, match=r"x must hold integers in \[0, 255\].*got -1 at index \(1,\)"):
        m.product(torch.tensor([3, -1]), 2)
    with pytest.raises(ValueError, match=r"w must hold integers in \[-128, 127\].*got 128"):
        m.product(3, torch.tensor([1, 128]))
    with pytest.raises(ValueError, match=r"x must hold integers.*got 2.5"):
        m.product(torch.tensor([2.5]), 1)
    with pytest.raises(ValueError, match=r"x must hold integers.*got nan"):
        m.product(torch.tensor([float("nan")]), 1)
