// CPU kernels of the torchapprox custom ops (built on first use by cpu_extension.py).
//
// The ops themselves (schemas, the torch-ops implementation every other device uses, fake
// kernels, autograd and vmap rules) are defined in Python, in quantizers/ops.py. This file
// only registers faster CPU kernels for them. Eager torch fake-quantizes a tensor in about
// ten dispatched ops and four passes over memory; here the range is one pass and
// clamp(rint(x * scale), qmin, qmax) / scale a second, in one dispatch.
//
// The arithmetic is that of reference.py, in the same order and precision, so both give
// identical values (tests/test_cpu_kernels.py checks this), and ONNX's QuantizeLinear and
// DequantizeLinear give them too:
//   range: low = min(x), high = max(x), over the whole tensor;
//   scale (the step between levels) = NaN when the tensor holds a NaN or an infinity; else
//   max(top / top_level, smallest normal number) when top > 0; else 1 (all zero);
//   x_fake = clamp(rint(x / scale), qmin, qmax) * scale (rint rounds half to even, like
//   torch.round; a NaN stays NaN).
// Fast loops cover dense float32/float64 tensors with one scale, and contiguous ones with a
// scale per index of leading dimensions (per-channel on dimension 0, per-token). Everything
// else (half types, other axes, non-dense tensors) runs the same ATen ops the Python
// reference runs, so every case still takes the values of the reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
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
                                          T scale, T qmin, T qmax) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    T r = std::rint(x[i] / scale);
    r = r < qmin ? qmin : r;  // comparisons with NaN are false: a NaN passes through
    r = r > qmax ? qmax : r;
    out[i] = r * scale;
  }
}

// The elements of a non-overlapping, dense tensor (contiguous, channels-last, any
// permutation) lie in one block from its data pointer on, so elementwise work and
// reductions can run over that block whatever the strides.
bool fast(const at::Tensor& x) {
  return (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) && x.is_non_overlapping_and_dense();
}

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), "torchapprox::", op, ": expected a CPU tensor, got ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "torchapprox::", op, ": expected a floating-point tensor, got ",
              x.scalar_type());
}

void check_grid(const at::Tensor& x, int64_t bitwidth, const std::string& grid, at::IntArrayRef axes, const char* op) {
  TORCH_CHECK(bitwidth >= 2 && bitwidth <= 32, "torchapprox::", op, ": bitwidth must be in 2..32, got ", bitwidth);
  TORCH_CHECK(grid == "signed" || grid == "unsigned" || grid == "auto", "torchapprox::", op,
              ": grid must be one of signed, unsigned, auto, got '", grid, "'");
  for (size_t i = 0; i < axes.size(); ++i)
    TORCH_CHECK(axes[i] >= 0 && axes[i] < x.dim() && (i == 0 || axes[i] > axes[i - 1]), "torchapprox::", op,
                ": axes must be sorted, distinct dimensions of x (ndim ", x.dim(), "), got ", axes);
}

// ------------------------------------------------------------------ the reference, in ATen
// The same ATen ops, in the same order, as reference.py.
double tiny_of(at::ScalarType type) {
  return type == at::kDouble ? std::numeric_limits<double>::min() : double(std::numeric_limits<float>::min());
}

std::tuple<double, double> grid_bounds(int64_t bitwidth, const std::string& grid) {
  const double signed_max = std::ldexp(1.0, bitwidth - 1) - 1, unsigned_max = std::ldexp(1.0, bitwidth) - 1;
  if (grid == "signed") return {-signed_max, signed_max};
  if (grid == "unsigned") return {0.0, unsigned_max};
  return {-signed_max, unsigned_max};  // auto: the grid each slice picks fits inside
}

at::Tensor reference_scale(const at::Tensor& x, int64_t bitwidth, const std::string& grid, at::IntArrayRef axes) {
  const double signed_max = std::ldexp(1.0, bitwidth - 1) - 1, unsigned_max = std::ldexp(1.0, bitwidth) - 1;
  std::vector<int64_t> reduce;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (std::find(axes.begin(), axes.end(), d) == axes.end()) reduce.push_back(d);
  at::Tensor low, high;
  if (axes.empty()) {
    std::tie(low, high) = at::aminmax(x);
  } else if (reduce.empty()) {  // axes cover every dimension: one scale per element
    low = x;
    high = x;
  } else {
    low = at::amin(x, reduce, true);
    high = at::amax(x, reduce, true);
  }
  low = low.to(compute_type(x));
  high = high.to(compute_type(x));
  const at::Tensor nonfinite = at::logical_not(at::logical_and(at::isfinite(low), at::isfinite(high))).any();
  at::Tensor top, int_max;
  if (grid == "unsigned") {
    top = high.clamp_min(0);
    int_max = at::full_like(top, unsigned_max);
  } else {
    top = at::maximum(low.neg(), high);
    int_max = at::full_like(top, signed_max);
    if (grid == "auto") int_max = at::where(low >= 0, at::full_like(top, unsigned_max), int_max);
  }
  at::Tensor scale = top.div(int_max).clamp_min(tiny_of(top.scalar_type()));
  scale = at::where(top > 0, scale, 1.0);
  return at::where(nonfinite, std::numeric_limits<double>::quiet_NaN(), scale);
}

at::Tensor reference_round(const at::Tensor& x, const at::Tensor& scale, double qmin, double qmax) {
  const at::Tensor compute = x.to(scale.scalar_type());
  return at::clamp(at::round(compute / scale), qmin, qmax).mul_(scale).to(x.scalar_type());
}

// ------------------------------------------------------------------------- the fast loops
template <typename T>
T scale_of_range(const Range<T>& range, int64_t bitwidth, const std::string& grid) {
  if (range.nan || std::isinf(range.low) || std::isinf(range.high)) return std::numeric_limits<T>::quiet_NaN();
  const double signed_max = std::ldexp(1.0, bitwidth - 1) - 1, unsigned_max = std::ldexp(1.0, bitwidth) - 1;
  T top;
  double int_max;
  if (grid == "unsigned") {
    top = std::max(range.high, T(0));
    int_max = unsigned_max;
  } else {
    top = std::max(-range.low, range.high);
    int_max = grid == "auto" && range.low >= 0 ? unsigned_max : signed_max;
  }
  if (!(top > 0)) return T(1);
  const T scale = top / static_cast<T>(int_max);
  return scale < std::numeric_limits<T>::min() ? std::numeric_limits<T>::min() : scale;
}

at::Tensor fast_scale(const at::Tensor& x, int64_t bitwidth, const std::string& grid) {
  at::Tensor scale = at::empty({}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "minmax_scale", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    const Range<scalar_t> range = at::parallel_reduce(
        0, x.numel(), kGrain, empty_range<scalar_t>(),
        [&](int64_t begin, int64_t end, Range<scalar_t> acc) { return merge(acc, range_of_block(data, begin, end)); },
        merge<scalar_t>);
    *scale.mutable_data_ptr<scalar_t>() = scale_of_range(range, bitwidth, grid);
  });
  return scale;
}

at::Tensor fast_round(const at::Tensor& x, const at::Tensor& scale, double qmin, double qmax) {
  at::Tensor out = at::empty_like(x);  // the same strides as a dense input
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "round_to_grid", [&] {
    const scalar_t s = scale.item<scalar_t>();
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const scalar_t low = static_cast<scalar_t>(qmin), high = static_cast<scalar_t>(qmax);
    at::parallel_for(0, x.numel(), kGrain,
                     [&](int64_t begin, int64_t end) { round_to_grid_block(src, dst, begin, end, s, low, high); });
  });
  return out;
}

bool one_scale_for(const at::Tensor& x, const at::Tensor& scale) {
  return scale.dim() == 0 && scale.scalar_type() == x.scalar_type() && scale.device().is_cpu();
}

// Scales one per index of the leading dimensions (per-channel on dimension 0, per-token:
// every dimension but the last) of a contiguous tensor: each slice is a contiguous row.
bool leading_axes(at::IntArrayRef axes) {
  for (size_t i = 0; i < axes.size(); ++i)
    if (axes[i] != int64_t(i)) return false;
  return true;
}

// `result` (contiguous) in the layout of `x`, as the ops' fake kernels (empty_like) promise.
at::Tensor in_layout_of(const at::Tensor& x, const at::Tensor& result) {
  return x.is_contiguous() ? result : at::empty_like(x).copy_(result);
}

// Any layout qualifies: the row loops run on a contiguous copy of a strided input (a
// transposed (seq, batch, features) attention input, say), which costs one copy, far less
// than the reference's dozen ATen ops. The values do not depend on the layout.
bool fast_rows(const at::Tensor& x, at::IntArrayRef axes) {
  return !axes.empty() && int64_t(axes.size()) < x.dim() && leading_axes(axes) &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
}

// A short row's range: one min/max reduction the compiler vectorizes, no lanes to set up.
template <typename T>
TA_VECTOR_CLONES Range<T> range_of_row(const T* __restrict data, int64_t n) {
  T low = std::numeric_limits<T>::infinity(), high = -std::numeric_limits<T>::infinity();
  int nan = 0;
#pragma omp simd reduction(min : low) reduction(max : high) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    const T v = data[i];
    low = v < low ? v : low;
    high = v > high ? v : high;
    nan |= v != v;
  }
  return {low, high, nan != 0};
}

at::Tensor fast_scale_rows(const at::Tensor& x, int64_t bitwidth, const std::string& grid, at::IntArrayRef axes) {
  std::vector<int64_t> shape(x.dim(), 1);
  int64_t rows = 1;
  for (int64_t axis : axes) rows *= (shape[axis] = x.size(axis));
  at::Tensor scale = at::empty(shape, x.options());
  const int64_t n = x.numel() / rows;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "minmax_scale", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    scalar_t* out = scale.mutable_data_ptr<scalar_t>();
    std::vector<char> nonfinite(rows, 0);
    // Per row, scale_of_range's arithmetic with the grid decided once per call.
    const double signed_max = std::ldexp(1.0, bitwidth - 1) - 1, unsigned_max = std::ldexp(1.0, bitwidth) - 1;
    const bool is_unsigned = grid == "unsigned", is_auto = grid == "auto";
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / n), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const Range<scalar_t> range = n >= 256 ? range_of_block(data + row * n, 0, n) : range_of_row(data + row * n, n);
        nonfinite[row] = range.nan || std::isinf(range.low) || std::isinf(range.high);
        const scalar_t top = is_unsigned ? std::max(range.high, scalar_t(0)) : std::max(-range.low, range.high);
        const double top_level = is_unsigned || (is_auto && range.low >= 0) ? unsigned_max : signed_max;
        const scalar_t step = top / static_cast<scalar_t>(top_level);
        out[row] = !(top > 0) ? scalar_t(1) : std::max(step, std::numeric_limits<scalar_t>::min());
      }
    });
    // As the reference: a NaN or an infinity anywhere makes every scale NaN.
    if (std::find(nonfinite.begin(), nonfinite.end(), 1) != nonfinite.end())
      std::fill(out, out + rows, std::numeric_limits<scalar_t>::quiet_NaN());
  });
  return scale;
}

at::Tensor fast_round_rows(const at::Tensor& x, const at::Tensor& scale, double qmin, double qmax) {
  at::Tensor out = at::empty_like(x);
  const int64_t rows = scale.numel(), n = x.numel() / rows;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "round_to_grid", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    const scalar_t* scales = scale.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const scalar_t low = static_cast<scalar_t>(qmin), high = static_cast<scalar_t>(qmax);
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / n), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        round_to_grid_block(src + row * n, dst + row * n, 0, n, scales[row], low, high);
    });
  });
  return out;
}

// ----------------------------------------------------------------------------- the ops
at::Tensor empty_scale(const at::Tensor& x, at::IntArrayRef axes) {
  std::vector<int64_t> shape;
  if (!axes.empty())
    for (int64_t d = 0; d < x.dim(); ++d)
      shape.push_back(std::find(axes.begin(), axes.end(), d) == axes.end() ? 1 : x.size(d));
  return at::ones(shape, x.options().dtype(compute_type(x)));
}

at::Tensor minmax_scale(const at::Tensor& x, int64_t bitwidth, c10::string_view grid_view, at::IntArrayRef axes) {
  check_input(x, "minmax_scale");
  const std::string grid(grid_view);
  check_grid(x, bitwidth, grid, axes, "minmax_scale");
  if (x.numel() == 0) return empty_scale(x, axes);
  if (axes.empty() && fast(x)) return fast_scale(x, bitwidth, grid);
  if (fast_rows(x, axes)) return fast_scale_rows(x.contiguous(), bitwidth, grid, axes);
  return reference_scale(x, bitwidth, grid, axes);
}

// A scale of x's rank whose sizes equal x's on some leading dimensions and are 1 after
// them (per channel on dimension 0, per token): one scale per contiguous row of x.
bool row_scales_for(const at::Tensor& x, const at::Tensor& scale) {
  if (scale.dim() != x.dim() || scale.dim() == 0 || scale.scalar_type() != x.scalar_type() ||
      !(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) || !scale.is_contiguous())
    return false;
  int64_t kept = 0;  // one past the last dimension along which the scale varies
  for (int64_t d = 0; d < x.dim(); ++d)
    if (scale.size(d) != 1) kept = d + 1;
  if (kept == 0 || kept == x.dim()) return false;
  for (int64_t d = 0; d < kept; ++d)
    if (scale.size(d) != x.size(d)) return false;
  return true;
}

at::Tensor round_to_grid(const at::Tensor& x, const at::Tensor& scale, int64_t qmin, int64_t qmax) {
  check_input(x, "round_to_grid");
  if (fast(x) && one_scale_for(x, scale)) return fast_round(x, scale, double(qmin), double(qmax));
  if (row_scales_for(x, scale))
    return in_layout_of(x, fast_round_rows(x.contiguous(), scale, double(qmin), double(qmax)));
  return reference_round(x, scale, double(qmin), double(qmax));
}

std::tuple<at::Tensor, at::Tensor> fake_quantize(const at::Tensor& x, int64_t bitwidth, c10::string_view grid_view,
                                                 at::IntArrayRef axes) {
  check_input(x, "fake_quantize");
  const std::string grid(grid_view);
  check_grid(x, bitwidth, grid, axes, "fake_quantize");
  const auto [qmin, qmax] = grid_bounds(bitwidth, grid);
  if (x.numel() == 0) return {x.clone(), empty_scale(x, axes)};
  if (axes.empty() && fast(x)) {
    at::Tensor scale = fast_scale(x, bitwidth, grid);
    return {fast_round(x, scale, qmin, qmax), scale};
  }
  if (fast_rows(x, axes)) {
    const at::Tensor rows = x.contiguous();
    at::Tensor scale = fast_scale_rows(rows, bitwidth, grid, axes);
    return {in_layout_of(x, fast_round_rows(rows, scale, qmin, qmax)), scale};
  }
  at::Tensor scale = reference_scale(x, bitwidth, grid, axes);
  return {reference_round(x, scale, qmin, qmax), scale};
}


// ------------------------------------------------------ the gradient through the range
// reference.range_gradient_backward in ATen (every case the loop below does not take).
at::Tensor reference_range_gradient(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
                                    int64_t bitwidth, const std::string& grid, at::IntArrayRef axes) {
  const double signed_max = std::ldexp(1.0, bitwidth - 1) - 1, unsigned_max = std::ldexp(1.0, bitwidth) - 1;
  const auto [qmin, qmax] = grid_bounds(bitwidth, grid);
  const at::Tensor compute = x.to(scale.scalar_type()), grad_c = grad.to(scale.scalar_type());
  const at::Tensor u = compute / scale;
  const at::Tensor rounded = at::round(u);
  const at::Tensor passing = at::logical_and(rounded >= qmin, rounded <= qmax);
  std::vector<int64_t> reduce;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (std::find(axes.begin(), axes.end(), d) == axes.end()) reduce.push_back(d);
  auto per_slice = [&](const at::Tensor& t, at::Tensor (*op)(const at::Tensor&, at::IntArrayRef, bool)) {
    return reduce.empty() ? t : op(t, reduce, true);
  };
  auto sum = [](const at::Tensor& t, at::IntArrayRef dims, bool keep) { return at::sum(t, dims, keep); };
  auto amin = [](const at::Tensor& t, at::IntArrayRef dims, bool keep) { return at::amin(t, dims, keep); };
  auto amax = [](const at::Tensor& t, at::IntArrayRef dims, bool keep) { return at::amax(t, dims, keep); };
  at::Tensor magnitude, top_level;
  if (grid == "unsigned") {
    magnitude = compute;
    top_level = at::full_like(scale, unsigned_max);
  } else {
    magnitude = compute.abs();
    top_level = at::full_like(scale, signed_max);
    if (grid == "auto") top_level = at::where(per_slice(compute, amin) >= 0, unsigned_max, top_level);
  }
  const at::Tensor top = per_slice(magnitude, amax);
  at::Tensor d_range = per_slice(grad_c * (rounded - u) * passing, sum) / top_level;
  d_range = at::where(top / top_level == scale, d_range, 0.0);
  const at::Tensor extreme = magnitude == top;
  const at::Tensor ties = per_slice(extreme.to(compute.scalar_type()), sum).clamp_min(1);
  return (grad_c * passing + extreme * at::sign(compute) * d_range / ties).to(x.scalar_type());
}

// The range term's sum and the extreme's ties over one row, in kLanes independent lanes of
// T (see range_of_block): sum(grad * (rint(u) - u) * pass) and the count of |x| == top.
template <typename T>
TA_VECTOR_CLONES void residual_and_ties(const T* __restrict grad, const T* __restrict x, int64_t n, T scale, T qmin,
                                        T qmax, T top, bool plain, double* residual, int64_t* ties) {
  constexpr int kLanes = 16;
  T sum[kLanes], count[kLanes];
  for (int j = 0; j < kLanes; ++j) sum[j] = count[j] = T(0);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      const T v = x[i + j], u = v / scale, r = std::rint(u);
      const T pass = (r >= qmin && r <= qmax) ? T(1) : T(0);
      sum[j] += grad[i + j] * (r - u) * pass;  // as the reference: a NaN scale makes it NaN
      count[j] += ((plain ? v : std::abs(v)) == top) ? T(1) : T(0);
    }
  }
  double total = 0, tied = 0;
  for (int j = 0; j < kLanes; ++j) {
    total += sum[j];
    tied += count[j];
  }
  for (; i < n; ++i) {
    const T v = x[i], u = v / scale, r = std::rint(u);
    const T pass = (r >= qmin && r <= qmax) ? T(1) : T(0);
    total += grad[i] * (r - u) * pass;
    tied += ((plain ? v : std::abs(v)) == top) ? 1 : 0;
  }
  *residual = total;
  *ties = static_cast<int64_t>(tied);
}

template <typename T>
TA_VECTOR_CLONES void range_gradient_output(const T* __restrict grad, const T* __restrict x, T* __restrict out,
                                            int64_t n, T scale, T qmin, T qmax, T top, bool plain, T d_range, T share) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i], r = std::rint(v / scale);
    const T pass = (r >= qmin && r <= qmax) ? T(1) : T(0);
    const T extreme = ((plain ? v : std::abs(v)) == top) ? T(1) : T(0);
    const T sign = v > 0 ? T(1) : (v < 0 ? T(-1) : T(0));
    out[i] = grad[i] * pass + extreme * sign * d_range / share;
  }
}

// One slice (a row of n contiguous elements with one scale) in three vectorized passes: its
// range (range_of_block), the range term's sum and the extreme's ties (summed over lanes:
// the sum may differ from the reference's in the last bits), then the gradient with the
// reference's arithmetic.
template <typename T>
void range_gradient_row(const T* grad, const T* x, T* out, int64_t n, T scale, T qmin, T qmax, double signed_max,
                        double unsigned_max, int grid) {  // grid: 0 signed, 1 unsigned, 2 auto
  const bool plain = grid == 1;  // the unsigned grid's extreme is max(x), the others' max|x|
  const Range<T> range = n >= 256 ? range_of_block(x, 0, n) : range_of_row(x, n);
  // amax propagates NaN: then no element is the extreme
  const T top = range.nan ? std::numeric_limits<T>::quiet_NaN() : (plain ? range.high : std::max(-range.low, range.high));
  double residual = 0;
  int64_t ties = 0;
  residual_and_ties(grad, x, n, scale, qmin, qmax, top, plain, &residual, &ties);
  const T top_level =
      static_cast<T>(grid == 1 || (grid == 2 && range.low >= 0 && !range.nan) ? unsigned_max : signed_max);
  T d_range = static_cast<T>(residual) / top_level;
  if (!(top / top_level == scale)) d_range = T(0);  // a special scale (zero, NaN, raised to the smallest normal)
  range_gradient_output(grad, x, out, n, scale, qmin, qmax, top, plain, d_range,
                        static_cast<T>(std::max<int64_t>(ties, 1)));
}

at::Tensor range_gradient_rows(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, int64_t bitwidth,
                               const std::string& grid, int64_t rows);

at::Tensor range_gradient_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
                                   int64_t bitwidth, c10::string_view grid_view, at::IntArrayRef axes) {
  check_input(x, "range_gradient_backward");
  const std::string grid(grid_view);
  check_grid(x, bitwidth, grid, axes, "range_gradient_backward");
  TORCH_CHECK(grad.sizes() == x.sizes(), "torchapprox::range_gradient_backward: grad must have x's shape ", x.sizes(),
              ", got ", grad.sizes());
  if (x.numel() == 0) return at::zeros_like(x);
  // Strided tensors run on contiguous copies (see fast_rows).
  const bool loop = (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
                    grad.scalar_type() == x.scalar_type() && scale.scalar_type() == x.scalar_type() &&
                    scale.device().is_cpu() && leading_axes(axes);
  int64_t rows = 1;
  for (int64_t axis : axes) rows *= x.size(axis);
  if (!loop || scale.numel() != rows) return reference_range_gradient(grad, x, scale, bitwidth, grid, axes);
  return in_layout_of(x, range_gradient_rows(grad.contiguous(), x.contiguous(), scale.contiguous(), bitwidth, grid, rows));
}

at::Tensor range_gradient_rows(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, int64_t bitwidth,
                               const std::string& grid, int64_t rows) {
  const double signed_max = std::ldexp(1.0, bitwidth - 1) - 1, unsigned_max = std::ldexp(1.0, bitwidth) - 1;
  const auto [qmin, qmax] = grid_bounds(bitwidth, grid);
  const int grid_code = grid == "signed" ? 0 : (grid == "unsigned" ? 1 : 2);
  const int64_t n = x.numel() / rows;
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "range_gradient_backward", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* v = x.const_data_ptr<scalar_t>();
    const scalar_t* s = scale.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / n), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        range_gradient_row(g + row * n, v + row * n, o + row * n, n, s[row], static_cast<scalar_t>(qmin),
                           static_cast<scalar_t>(qmax), signed_max, unsigned_max, grid_code);
    });
  });
  return out;
}

// ------------------------------------------------------------------------------ autograd
// The same straight-through rule as the Python registration in ops.py (which the other
// devices use), here in C++ so that a CPU call runs no Python: the gradient passes where
// the rounded value lies inside [qmin, qmax], the scale gets none.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor passing(const at::Tensor& x, const at::Tensor& scale, double qmin, double qmax) {
  const at::Tensor rounded = at::round(x.to(scale.scalar_type()) / scale);
  return at::logical_and(rounded >= qmin, rounded <= qmax);
}

const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, c10::string_view,
                                                                    at::IntArrayRef)>&
fake_quantize_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torchapprox::fake_quantize", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, c10::string_view,
                                                                       at::IntArrayRef)>();
  return op;
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>& round_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torchapprox::round_to_grid", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  return op;
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, int64_t, c10::string_view, at::IntArrayRef)>& scale_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torchapprox::minmax_scale", "")
                             .typed<at::Tensor(const at::Tensor&, int64_t, c10::string_view, at::IntArrayRef)>();
  return op;
}

class FakeQuantizeSTE : public torch::autograd::Function<FakeQuantizeSTE> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t bitwidth, const std::string& grid,
                               const std::vector<int64_t>& axes) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [x_fake, scale] = fake_quantize_op().call(x, bitwidth, grid, axes);
    ctx->mark_non_differentiable({scale});
    ctx->set_materialize_grads(false);  // no zero tensor for the scale's (absent) gradient
    // A scale from x's own range clips only on the unsigned grid (below zero).
    const bool clips = grid == "unsigned";
    ctx->saved_data["clips"] = clips;
    if (clips) {
      const auto [qmin, qmax] = grid_bounds(bitwidth, grid);
      ctx->saved_data["qmin"] = qmin;
      ctx->saved_data["qmax"] = qmax;
      ctx->save_for_backward({x, scale});
    }
    return {x_fake, scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor grad = grads[0];
    if (grad.defined() && ctx->saved_data["clips"].toBool()) {
      const auto saved = ctx->get_saved_variables();
      grad = grad * passing(saved[0], saved[1], ctx->saved_data["qmin"].toDouble(), ctx->saved_data["qmax"].toDouble());
    }
    return {grad, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class RoundToGridSTE : public torch::autograd::Function<RoundToGridSTE> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale, int64_t qmin,
                            int64_t qmax) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["qmin"] = qmin;
    ctx->saved_data["qmax"] = qmax;
    ctx->save_for_backward({x, scale});
    return round_op().call(x, scale, qmin, qmax);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor mask = passing(saved[0], saved[1], double(ctx->saved_data["qmin"].toInt()),
                                    double(ctx->saved_data["qmax"].toInt()));
    return {grads[0] * mask, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

bool records(const at::Tensor& x) { return at::GradMode::is_enabled() && x.requires_grad(); }

std::tuple<at::Tensor, at::Tensor> fake_quantize_autograd(const at::Tensor& x, int64_t bitwidth,
                                                          c10::string_view grid, at::IntArrayRef axes) {
  if (!records(x)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return fake_quantize_op().call(x, bitwidth, grid, axes);
  }
  const variable_list outs = FakeQuantizeSTE::apply(x, bitwidth, std::string(grid), axes.vec());
  return {outs[0], outs[1]};
}

at::Tensor round_to_grid_autograd(const at::Tensor& x, const at::Tensor& scale, int64_t qmin, int64_t qmax) {
  if (!records(x)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return round_op().call(x, scale, qmin, qmax);
  }
  return RoundToGridSTE::apply(x, scale, qmin, qmax);
}

at::Tensor minmax_scale_autograd(const at::Tensor& x, int64_t bitwidth, c10::string_view grid, at::IntArrayRef axes) {
  at::AutoDispatchBelowADInplaceOrView guard;  // a scale is never differentiable
  return scale_op().call(x, bitwidth, grid, axes);
}

// ------------------------------------------------------ learned steps (the "lsq" family)
// reference.learned_step_backward in ATen (every case the loops below do not take).
std::tuple<at::Tensor, at::Tensor> reference_learned_step(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& scale, double qmin, double qmax) {
  const at::Tensor compute = x.to(scale.scalar_type()), g = grad.to(scale.scalar_type());
  const at::Tensor u = compute / scale;
  const at::Tensor below = u < qmin, above = u > qmax, inside = at::logical_not(at::logical_or(below, above));
  const at::Tensor grad_x = (g * inside).to(x.scalar_type());
  at::Tensor terms = g * at::where(inside, at::round(u) - u, at::where(below, at::full({}, qmin, u.options()),
                                                                       at::full({}, qmax, u.options())));
  if (scale.dim() == 0) return {grad_x, terms.sum()};
  std::vector<int64_t> reduce;
  for (int64_t d = 0; d < terms.dim(); ++d)
    if (scale.size(d) == 1 && terms.size(d) != 1) reduce.push_back(d);
  return {grad_x, reduce.empty() ? terms : terms.sum(reduce, /*keepdim=*/true)};
}

// One block of the backward: grad_x, and the block's share of d x_fake / d scale summed.
template <typename T>
TA_VECTOR_CLONES double learned_step_block(const T* __restrict grad, const T* __restrict x, T* __restrict grad_x,
                                           int64_t begin, int64_t end, T scale, T qmin, T qmax) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = begin; i < end; ++i) {
    const T u = x[i] / scale, g = grad[i];
    const bool below = u < qmin, above = u > qmax;
    grad_x[i] = (below || above) ? T(0) : g;
    sum += double(g * (below ? qmin : above ? qmax : std::rint(u) - u));
  }
  return sum;
}

// The gradient of clip-then-round with a learned step (Esser et al. 2020, eq. 3), in one pass
// over grad and x: grad_x passes where qmin <= x / s <= qmax; the step gets
// sum(grad * (rint(x / s) - x / s)) inside and qmin or qmax where clipped, one per scale.
std::tuple<at::Tensor, at::Tensor> learned_step_backward(const at::Tensor& grad, const at::Tensor& x,
                                                         const at::Tensor& scale, int64_t qmin, int64_t qmax) {
  check_input(x, "learned_step_backward");
  const bool same = grad.scalar_type() == x.scalar_type() && grad.sizes() == x.sizes();
  if (!(same && fast(x) && scale.scalar_type() == x.scalar_type() && x.numel() > 0 &&
        (scale.dim() == 0 || row_scales_for(x, scale))))
    return reference_learned_step(grad, x, scale, double(qmin), double(qmax));
  const at::Tensor xs = x.contiguous(), gs = grad.contiguous().to(x.scalar_type());
  at::Tensor grad_x = at::empty_like(xs);
  at::Tensor grad_scale = at::empty_like(scale);
  const int64_t rows = scale.dim() == 0 ? 1 : scale.numel(), n = xs.numel() / rows;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "learned_step_backward", [&] {
    const scalar_t* g = gs.const_data_ptr<scalar_t>();
    const scalar_t* src = xs.const_data_ptr<scalar_t>();
    const scalar_t* scales = scale.const_data_ptr<scalar_t>();
    scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
    scalar_t* out = grad_scale.mutable_data_ptr<scalar_t>();
    const scalar_t low = static_cast<scalar_t>(qmin), high = static_cast<scalar_t>(qmax);
    if (rows == 1) {
      // Fixed chunks, summed in chunk order: the same total whatever the threads.
      const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(64, n / kGrain));
      std::vector<double> partial(chunks, 0.0);
      at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
        for (int64_t c = first; c < last; ++c)
          partial[c] = learned_step_block(g, src, gx, c * n / chunks, (c + 1) * n / chunks, scales[0], low, high);
      });
      double total = 0;
      for (double value : partial) total += value;
      out[0] = static_cast<scalar_t>(total);
    } else {
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / n), [&](int64_t first, int64_t last) {
        for (int64_t row = first; row < last; ++row)
          out[row] = static_cast<scalar_t>(
              learned_step_block(g + row * n, src + row * n, gx + row * n, 0, n, scales[row], low, high));
      });
    }
  });
  return {in_layout_of(x, grad_x), grad_scale};
}

}  // namespace


// The schemas are defined in Python (torch.library.custom_op in ops.py); these kernels
// take the CPU dispatch keys, ahead of the Python implementation and autograd formula
// that the other devices use.
TORCH_LIBRARY_IMPL(torchapprox, CPU, m) {
  m.impl("learned_step_backward", &learned_step_backward);
  m.impl("minmax_scale", &minmax_scale);
  m.impl("round_to_grid", &round_to_grid);
  m.impl("fake_quantize", &fake_quantize);
  m.impl("range_gradient_backward", &range_gradient_backward);
}

TORCH_LIBRARY_IMPL(torchapprox, AutogradCPU, m) {
  m.impl("minmax_scale", &minmax_scale_autograd);
  m.impl("round_to_grid", &round_to_grid_autograd);
  m.impl("fake_quantize", &fake_quantize_autograd);
}
