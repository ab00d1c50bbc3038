// Fused CPU kernels of MinMaxQuant (built on first use by cpu_extension.py).
//
// Eager torch fake-quantizes a tensor in about ten dispatched ops and four passes over
// memory (aminmax, multiply, round, divide), plus a Python autograd Function. Here it is one
// dispatch: the range in one pass, round(x * scale) / scale in a second, and the
// straight-through (identity) gradient registered in C++, so backward runs no Python.
//
// The arithmetic is that of the torch ops in minmax_quantizer.py, in the same order and
// precision, so both paths give identical bits (tests/test_cpu_kernels.py checks this):
//   scale = minmax > 0 ? int_max / minmax : 1, with minmax = max(-min(x), max(x)), and NaN
//   when x holds a NaN (as torch.aminmax and torch.maximum give it);
//   x_fake = rint(x * scale) / scale (rint rounds half to even, like torch.round).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

// Below this many elements a loop runs on the calling thread: waking the pool costs more.
constexpr int64_t kGrain = 32768;

// x86 with GCC: each hot loop is also compiled for AVX2 and the loader picks the clone the
// CPU supports, so one build runs on any x86-64 machine and uses wide registers where it can.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TA_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TA_VECTOR_CLONES
#endif

template <typename T>
struct Range {
  T low, high;
  bool nan;
};

template <typename T>
Range<T> empty_range() {
  return {std::numeric_limits<T>::infinity(), -std::numeric_limits<T>::infinity(), false};
}

template <typename T>
Range<T> merge(const Range<T>& a, const Range<T>& b) {
  return {std::min(a.low, b.low), std::max(a.high, b.high), a.nan || b.nan};
}

// One min/max accumulator would make the loop wait on each vector min's latency; kLanes
// independent ones (four AVX2 registers of floats) keep the units busy: about 2.5x faster.
template <typename T>
TA_VECTOR_CLONES Range<T> range_of_block(const T* __restrict data, int64_t begin, int64_t end) {
  constexpr int kLanes = 32;
  T low[kLanes], high[kLanes];
  int nan[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    low[j] = std::numeric_limits<T>::infinity();
    high[j] = -std::numeric_limits<T>::infinity();
    nan[j] = 0;
  }
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    // NaNs are flagged apart, so the vectorized min/max may pass over them.
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      const T v = data[i + j];
      low[j] = v < low[j] ? v : low[j];
      high[j] = v > high[j] ? v : high[j];
      nan[j] |= v != v;
    }
  }
  for (int j = 0; i < end; ++i, ++j) {
    const T v = data[i];
    low[j] = v < low[j] ? v : low[j];
    high[j] = v > high[j] ? v : high[j];
    nan[j] |= v != v;
  }
  Range<T> range = empty_range<T>();
  for (int j = 0; j < kLanes; ++j) range = merge(range, Range<T>{low[j], high[j], nan[j] != 0});
  return range;
}

template <typename T>
TA_VECTOR_CLONES void round_to_grid_block(const T* __restrict x, T* __restrict out, int64_t begin, int64_t end,
                                          T scale) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) out[i] = std::rint(x[i] * scale) / scale;
}

// The elements of a non-overlapping, dense tensor (contiguous, channels-last, any
// permutation) lie in one block from its data pointer on, so elementwise work and
// reductions can run over that block whatever the strides.
at::Tensor dense(const at::Tensor& x) { return x.is_non_overlapping_and_dense() ? x : x.contiguous(); }

void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), "torchapprox::", op, ": expected a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "torchapprox::", op,
              ": expected float32 or float64, got ", x.scalar_type());
}

at::Tensor round_to_grid(const at::Tensor& x, const at::Tensor& scale) {
  check_input(x, "round_to_grid");
  TORCH_CHECK(scale.dim() == 0 && scale.scalar_type() == x.scalar_type() && scale.device().is_cpu(),
              "torchapprox::round_to_grid: scale must be a 0-dim CPU tensor of x's dtype");
  const at::Tensor input = dense(x);
  at::Tensor out = at::empty_like(input);  // the same strides as a dense input
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "round_to_grid", [&] {
    const scalar_t s = scale.item<scalar_t>();
    const scalar_t* src = input.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, input.numel(), kGrain,
                     [&](int64_t begin, int64_t end) { round_to_grid_block(src, dst, begin, end, s); });
  });
  return out;
}

// The scale factor of the signed grid, or with auto_grid of the grid "auto" picks: the
// unsigned one [0, 2^b - 1] when min(x) >= 0, else the signed one.
at::Tensor minmax_scale(const at::Tensor& x, int64_t bitwidth, bool auto_grid) {
  check_input(x, "fake_quantize_minmax");
  const at::Tensor input = dense(x);
  at::Tensor scale = at::empty({}, input.options());
  const double signed_max = std::ldexp(1.0, bitwidth - 1) - 1, unsigned_max = std::ldexp(1.0, bitwidth) - 1;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "minmax_scale", [&] {
    const scalar_t* data = input.const_data_ptr<scalar_t>();
    const Range<scalar_t> range = at::parallel_reduce(
        0, input.numel(), kGrain, empty_range<scalar_t>(),
        [&](int64_t begin, int64_t end, Range<scalar_t> acc) { return merge(acc, range_of_block(data, begin, end)); },
        merge<scalar_t>);
    const scalar_t low = range.nan ? NAN : range.low, high = range.nan ? NAN : range.high;
    const scalar_t minmax = range.nan ? NAN : std::max(-low, high);
    const double int_max = auto_grid && low >= 0 ? unsigned_max : signed_max;
    *scale.mutable_data_ptr<scalar_t>() = minmax > 0 ? static_cast<scalar_t>(int_max) / minmax : scalar_t(1);
  });
  return scale;
}

// Fake quantization with the straight-through gradient: backward passes the gradient as is.
class FakeQuantizeMinMax : public torch::autograd::Function<FakeQuantizeMinMax> {
 public:
  static std::vector<at::Tensor> forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                         int64_t bitwidth, bool auto_grid) {
    const at::Tensor input = dense(x);  // one copy at most, shared by both passes
    at::Tensor scale = minmax_scale(input, bitwidth, auto_grid);
    at::Tensor out = round_to_grid(input, scale);
    ctx->mark_non_differentiable({scale});
    return {out, scale};
  }

  static std::vector<at::Tensor> backward(torch::autograd::AutogradContext*, std::vector<at::Tensor> grads) {
    return {grads[0], at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> fake_quantize_minmax(const at::Tensor& x, int64_t bitwidth, bool auto_grid) {
  TORCH_CHECK(bitwidth >= 2 && bitwidth <= 32, "torchapprox::fake_quantize_minmax: bitwidth must be in 2..32, got ",
              bitwidth);
  std::vector<at::Tensor> outs = FakeQuantizeMinMax::apply(x, bitwidth, auto_grid);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY(torchapprox, m) {
  m.def("fake_quantize_minmax(Tensor x, int bitwidth, bool auto_grid) -> (Tensor, Tensor)");
  m.def("round_to_grid(Tensor x, Tensor scale) -> Tensor");
}

// The autograd Function inside handles the gradient, so the op sits above autograd.
TORCH_LIBRARY_IMPL(torchapprox, CompositeImplicitAutograd, m) {
  m.impl("fake_quantize_minmax", &fake_quantize_minmax);
}

TORCH_LIBRARY_IMPL(torchapprox, CPU, m) { m.impl("round_to_grid", &round_to_grid); }
