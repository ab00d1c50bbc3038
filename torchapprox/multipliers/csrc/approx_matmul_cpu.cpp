// CPU kernels of the approximate-multiplier ops (built on first use by
// multipliers/cpu_extension.py): torchapprox::approx_matmul, approx_matmul_naive,
// level_indices, index_features and table_slope_matmul. The ops (schemas, the plain-torch
// implementation every other device runs, fake kernels) are defined in Python, in
// multipliers/ops.py; this file only registers CPU kernels for them, with the same values.
//
//   out[g, m, n] = sum_k T[x[g, m, k], w[g, n, k]]      exactly, as int64
//
// x: uint8 row indices [G, M, K] (input operand), w: uint8 column indices [G, N, K] (weight
// operand), T: int32 [256, 256]. 2-D x [M, K] and w [N, K] give out [M, N].
//
// The fast kernel (x86-64 with AVX512-VBMI, chosen at run time):
// - Orientation: vector lanes run over the longer operand list ("a": the M inputs or the N
//   weights); the other ("b") picks, per (b, k), one table column of 256 values indexed by
//   a's index. a is transposed block by block to [G][blocks][K][256] (padded with index 0;
//   a plain copy when a's lanes are already contiguous, as im2col gives them),
//   so 64 a-indices at one k are one load and a unit reads one contiguous block (a plain
//   [K][M] transpose would put the loads of successive k 16 KB apart: cache-set conflicts).
// - Byte planes: T - min(T) = sum_p 256^p * plane_p, unsigned bytes, P planes (1..4; 2 for
//   the exact product of 8-bit operands). One 256-entry byte column is four 64-byte
//   registers: two VPERMI2B look up 64 indices among entries 0..127 and 128..255, a blend on
//   bit 7 picks one. No gathers.
// - Accumulation: the bytes of even and odd lanes are separated (and, shift) and added as
//   uint16 lanes, which 256 steps of at most 255 cannot overflow; then they are flushed into
//   int64 plane sums and combined as min(T) * K + sum_p sums_p * 256^p.
// - Threads: at::parallel_for over units (group, block of 256 lanes of a, one b).
// Other CPUs run a portable loop on the same layout with an int32 column table,
// acc[a] += column[a_index], the int32 accumulators flushed into int64 before they can
// overflow (every floor((2^31 - 1) / max|T|) steps). TORCHAPPROX_MULT_KERNEL=portable forces
// the portable loop (for tests and comparisons).
//
// The naive kernel is the straightforward loop of the original library's CPU path: for each
// output, for each k, acc += T[x][w] (threaded over the rows of x): the benchmark's baseline.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TA_X86_INTRINSICS 1
#else
#define TA_X86_INTRINSICS 0
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TA_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TA_VECTOR_CLONES
#endif

// Comparisons that may meet a NaN count as possibly trapping, which keeps GCC from
// vectorising a loop that selects on them; no code here reads floating-point exceptions.
#if defined(__GNUC__) && !defined(__clang__)
#define TA_NO_TRAPPING_MATH __attribute__((optimize("no-trapping-math")))
#else
#define TA_NO_TRAPPING_MATH
#endif

namespace {

constexpr int64_t kVector = 64;       // index bytes per AVX-512 register
constexpr int64_t kBlock = 256;       // lanes of a per work unit (at most 4 registers)
constexpr int64_t kFlush = 256;       // 256 * 255 < 65536: uint16 lane sums never wrap
constexpr int64_t kPlane = 256 * 256;  // bytes per table plane
constexpr int64_t kGrain = 1 << 16;   // lookups below which a loop stays on the calling thread

struct Problem {
  const uint8_t* a_t;  // [G][blocks][K][kBlock]: lane operand, transposed block by block
  const uint8_t* b;    // [G][nb][K]
  int64_t na, a_pad, blocks, nb, K;
  int64_t* out;
  int64_t out_g, out_a, out_b;  // strides of out in (g, a, b)
};

const uint8_t* block_of(const Problem& p, int64_t g, int64_t a0) {
  return p.a_t + ((g * p.blocks + a0 / kBlock) * p.K) * kBlock;
}

// Transposes 8 rows of 8 bytes (row i at src + i * src_stride) into 8 rows of 8 bytes
// (row j at dst + j * dst_stride): dst[j][i] = src[i][j].
void transpose8x8(const uint8_t* src, int64_t src_stride, uint8_t* dst, int64_t dst_stride) {
#if defined(__SSE2__)
  __m128i r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i * src_stride));
  const __m128i a01 = _mm_unpacklo_epi8(r[0], r[1]), a23 = _mm_unpacklo_epi8(r[2], r[3]);
  const __m128i a45 = _mm_unpacklo_epi8(r[4], r[5]), a67 = _mm_unpacklo_epi8(r[6], r[7]);
  const __m128i b0 = _mm_unpacklo_epi16(a01, a23), b1 = _mm_unpackhi_epi16(a01, a23);
  const __m128i b2 = _mm_unpacklo_epi16(a45, a67), b3 = _mm_unpackhi_epi16(a45, a67);
  const __m128i c[4] = {_mm_unpacklo_epi32(b0, b2), _mm_unpackhi_epi32(b0, b2), _mm_unpacklo_epi32(b1, b3),
                        _mm_unpackhi_epi32(b1, b3)};
  for (int j = 0; j < 4; ++j) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + (2 * j) * dst_stride), c[j]);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + (2 * j + 1) * dst_stride), _mm_unpackhi_epi64(c[j], c[j]));
  }
#else
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) dst[j * dst_stride + i] = src[i * src_stride + j];
#endif
}

// a [G][na][K] (rows of K bytes, row stride K) -> a_t [G][blocks][K][kBlock]; lanes past na
// are left as they are (zero).
void transpose_blocks(const uint8_t* a, uint8_t* a_t, int64_t G, int64_t na, int64_t blocks, int64_t K) {
  at::parallel_for(0, G * blocks, std::max<int64_t>(1, kGrain / (K * kBlock)), [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t g = unit / blocks, first = (unit % blocks) * kBlock;
      const int64_t lanes = std::min(kBlock, na - first);
      uint8_t* dst = a_t + unit * K * kBlock;
      const uint8_t* src = a + (g * na + first) * K;
      const int64_t lanes8 = lanes / 8 * 8, k8 = K / 8 * 8;
      for (int64_t l = 0; l < lanes8; l += 8) {
        for (int64_t k = 0; k < k8; k += 8) transpose8x8(src + l * K + k, K, dst + k * kBlock + l, kBlock);
        for (int64_t k = k8; k < K; ++k)
          for (int64_t i = 0; i < 8; ++i) dst[k * kBlock + l + i] = src[(l + i) * K + k];
      }
      for (int64_t l = lanes8; l < lanes; ++l)
        for (int64_t k = 0; k < K; ++k) dst[k * kBlock + l] = src[l * K + k];
    }
  });
}

// a [G][na][K] whose lanes are contiguous (stride 1 along na) -> a_t [G][blocks][K][kBlock].
void copy_blocks(const at::Tensor& a, uint8_t* a_t, int64_t blocks) {
  const int64_t G = a.size(0), na = a.size(1), K = a.size(2);
  const int64_t sg = a.stride(0), sk = a.stride(2);
  const uint8_t* base = a.data_ptr<uint8_t>();
  at::parallel_for(0, G * blocks, std::max<int64_t>(1, kGrain / (K * kBlock)), [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t g = unit / blocks, first = (unit % blocks) * kBlock;
      const int64_t lanes = std::min(kBlock, na - first);
      uint8_t* dst = a_t + unit * K * kBlock;
      for (int64_t k = 0; k < K; ++k) std::memcpy(dst + k * kBlock, base + g * sg + k * sk + first, lanes);
    }
  });
}

void write_lanes(const Problem& p, int64_t g, int64_t a0, int64_t lanes, int64_t bi, const int64_t* values) {
  const int64_t count = std::min(lanes, p.na - a0);
  int64_t* out = p.out + g * p.out_g + a0 * p.out_a + bi * p.out_b;
  for (int64_t l = 0; l < count; ++l) out[l * p.out_a] = values[l];
}

#if TA_X86_INTRINSICS
template <int P, int R>
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) void vbmi_unit(const Problem& p, const uint8_t* planes,
                                                                      int64_t bias, int64_t g, int64_t a0,
                                                                      int64_t bi) {
  const uint8_t* at = block_of(p, g, a0);
  const uint8_t* bk = p.b + (g * p.nb + bi) * p.K;
  int64_t sums[P][R * kVector];
  std::memset(sums, 0, sizeof(sums));
  const __m512i low_bytes = _mm512_set1_epi16(0x00FF);
  alignas(64) uint16_t spill[32];
  for (int64_t k0 = 0; k0 < p.K; k0 += kFlush) {
    const int64_t k1 = std::min(p.K, k0 + kFlush);
    __m512i acc[P][2][R];
    for (int q = 0; q < P; ++q)
      for (int r = 0; r < R; ++r) acc[q][0][r] = acc[q][1][r] = _mm512_setzero_si512();
    for (int64_t k = k0; k < k1; ++k) {
      const uint8_t* column = planes + static_cast<int64_t>(bk[k]) * 256;
      __m512i idx[R];
      __mmask64 upper[R];
      for (int r = 0; r < R; ++r) {
        idx[r] = _mm512_loadu_si512(at + k * kBlock + r * kVector);
        upper[r] = _mm512_movepi8_mask(idx[r]);  // bit 7: entries 128..255
      }
      for (int q = 0; q < P; ++q) {
        const uint8_t* c = column + q * kPlane;
        const __m512i t0 = _mm512_loadu_si512(c), t1 = _mm512_loadu_si512(c + 64);
        const __m512i t2 = _mm512_loadu_si512(c + 128), t3 = _mm512_loadu_si512(c + 192);
        for (int r = 0; r < R; ++r) {
          const __m512i lower_half = _mm512_permutex2var_epi8(t0, idx[r], t1);
          const __m512i upper_half = _mm512_permutex2var_epi8(t2, idx[r], t3);
          const __m512i v = _mm512_mask_blend_epi8(upper[r], lower_half, upper_half);
          acc[q][0][r] = _mm512_add_epi16(acc[q][0][r], _mm512_and_si512(v, low_bytes));  // even lanes
          acc[q][1][r] = _mm512_add_epi16(acc[q][1][r], _mm512_srli_epi16(v, 8));         // odd lanes
        }
      }
    }
    for (int q = 0; q < P; ++q)
      for (int r = 0; r < R; ++r)
        for (int parity = 0; parity < 2; ++parity) {
          _mm512_store_si512(spill, acc[q][parity][r]);
          for (int j = 0; j < 32; ++j) sums[q][r * kVector + 2 * j + parity] += spill[j];
        }
  }
  int64_t values[R * kVector];
  for (int64_t l = 0; l < R * kVector; ++l) {
    int64_t value = bias * p.K;
    for (int q = 0; q < P; ++q) value += sums[q][l] << (8 * q);
    values[l] = value;
  }
  write_lanes(p, g, a0, R * kVector, bi, values);
}

using VbmiUnit = void (*)(const Problem&, const uint8_t*, int64_t, int64_t, int64_t, int64_t);

VbmiUnit vbmi_unit_for(int planes, int64_t lanes) {
  static const VbmiUnit units[4][4] = {
      {vbmi_unit<1, 1>, vbmi_unit<1, 2>, vbmi_unit<1, 3>, vbmi_unit<1, 4>},
      {vbmi_unit<2, 1>, vbmi_unit<2, 2>, vbmi_unit<2, 3>, vbmi_unit<2, 4>},
      {vbmi_unit<3, 1>, vbmi_unit<3, 2>, vbmi_unit<3, 3>, vbmi_unit<3, 4>},
      {vbmi_unit<4, 1>, vbmi_unit<4, 2>, vbmi_unit<4, 3>, vbmi_unit<4, 4>}};
  return units[planes - 1][std::min<int64_t>(4, (lanes + kVector - 1) / kVector) - 1];
}

bool cpu_has_vbmi() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vbmi");
  return has;
}
#endif

TA_VECTOR_CLONES void portable_unit(const Problem& p, const int32_t* columns, int64_t chunk, int64_t g, int64_t a0,
                                    int64_t bi) {
  const int64_t lanes = std::min(kBlock, p.a_pad - a0);
  const uint8_t* at = block_of(p, g, a0);
  const uint8_t* bk = p.b + (g * p.nb + bi) * p.K;
  int64_t total[kBlock] = {0};
  int32_t acc[kBlock];
  for (int64_t k0 = 0; k0 < p.K; k0 += chunk) {
    const int64_t k1 = std::min(p.K, k0 + chunk);
    for (int64_t l = 0; l < lanes; ++l) acc[l] = 0;
    for (int64_t k = k0; k < k1; ++k) {
      const int32_t* column = columns + static_cast<int64_t>(bk[k]) * 256;
      const uint8_t* row = at + k * kBlock;
      for (int64_t l = 0; l < lanes; ++l) acc[l] += column[row[l]];
    }
    for (int64_t l = 0; l < lanes; ++l) total[l] += acc[l];
  }
  write_lanes(p, g, a0, lanes, bi, total);
}

bool portable_forced() {
  const char* value = std::getenv("TORCHAPPROX_MULT_KERNEL");
  return value != nullptr && std::string(value) == "portable";
}

void check_arguments(const at::Tensor& x, const at::Tensor& w, const at::Tensor& table, const char* op) {
  TORCH_CHECK_VALUE(x.scalar_type() == at::kByte && w.scalar_type() == at::kByte, op,
              ": x_idx and w_idx must be uint8 index tensors, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK_VALUE(table.scalar_type() == at::kInt && table.dim() == 2 && table.size(0) == 256 && table.size(1) == 256,
              op, ": table must be int32 [256, 256], got ", table.scalar_type(), " ", table.sizes());
  TORCH_CHECK_VALUE((x.dim() == 2 || x.dim() == 3) && w.dim() == x.dim(), op,
              ": x_idx and w_idx must both be [M, K]/[N, K] or [G, M, K]/[G, N, K], got ", x.sizes(), " and ",
              w.sizes());
  TORCH_CHECK_VALUE(x.size(-1) == w.size(-1) && (x.dim() == 2 || x.size(0) == w.size(0)), op, ": x_idx ", x.sizes(),
              " and w_idx ", w.sizes(), " must share the reduction length K and the group count G");
  TORCH_CHECK_VALUE(x.size(-1) <= (int64_t(1) << 23), op, ": the reduction length K must be at most 2^23, got ",
              x.size(-1));
}

at::Tensor approx_matmul_cpu(const at::Tensor& x_idx, const at::Tensor& w_idx, const at::Tensor& table) {
  check_arguments(x_idx, w_idx, table, "torchapprox::approx_matmul");
  const bool batched = x_idx.dim() == 3;
  const at::Tensor x = batched ? x_idx : x_idx.unsqueeze(0);
  const at::Tensor w = batched ? w_idx : w_idx.unsqueeze(0);
  const int64_t G = x.size(0), M = x.size(1), K = x.size(2), N = w.size(1);
  at::Tensor out = at::empty({G, M, N}, x.options().dtype(at::kLong));
  if (out.numel() > 0 && K == 0) out.zero_();
  if (out.numel() == 0 || K == 0) return batched ? out : out.squeeze(0);

  // Lanes over the longer operand list; t[i_a][v_b] is the table seen from that side.
  const bool lanes_over_x = M >= N;
  const at::Tensor& a = lanes_over_x ? x : w;
  const at::Tensor b = (lanes_over_x ? w : x).contiguous();
  const at::Tensor t = (lanes_over_x ? table : table.t()).contiguous();
  const int64_t na = a.size(1), nb = b.size(1);
  const int64_t a_pad = (na + kVector - 1) / kVector * kVector;
  const int64_t blocks = (a_pad + kBlock - 1) / kBlock;
  at::Tensor a_t = at::zeros({G, blocks, K, kBlock}, x.options());
  if (a.stride(1) == 1 && na > 1) {  // lanes already contiguous (e.g. im2col in [K, M] order): copy rows
    copy_blocks(a, a_t.data_ptr<uint8_t>(), blocks);
  } else {
    const at::Tensor a_c = a.contiguous();
    transpose_blocks(a_c.data_ptr<uint8_t>(), a_t.data_ptr<uint8_t>(), G, na, blocks, K);
  }

  Problem p{a_t.data_ptr<uint8_t>(), b.data_ptr<uint8_t>(), na, a_pad, blocks, nb, K, out.data_ptr<int64_t>(), M * N,
            lanes_over_x ? N : 1, lanes_over_x ? 1 : N};
  const int64_t units = G * blocks * nb;
  const int64_t grain = std::max<int64_t>(1, kGrain / (K * kBlock));
  const int32_t* tv = t.data_ptr<int32_t>();
  auto decode = [&](int64_t u, int64_t& g, int64_t& a0, int64_t& bi) {
    bi = u % nb;
    const int64_t rest = u / nb;
    a0 = (rest % blocks) * kBlock;
    g = rest / blocks;
  };

#if TA_X86_INTRINSICS
  if (cpu_has_vbmi() && !portable_forced()) {
    int64_t low = tv[0], high = tv[0];
    for (int64_t i = 0; i < kPlane; ++i) {
      low = std::min<int64_t>(low, tv[i]);
      high = std::max<int64_t>(high, tv[i]);
    }
    const uint64_t span = static_cast<uint64_t>(high - low);
    int planes = 1;
    while (planes < 4 && (span >> (8 * planes)) != 0) ++planes;
    // plane_q[v][i] = byte q of t[i][v] - low: the column of b-value v, indexed by a-index i.
    std::vector<uint8_t> plane_bytes(static_cast<size_t>(planes) * kPlane);
    for (int64_t i = 0; i < 256; ++i)
      for (int64_t v = 0; v < 256; ++v) {
        const uint64_t d = static_cast<uint64_t>(static_cast<int64_t>(tv[i * 256 + v]) - low);
        for (int q = 0; q < planes; ++q) plane_bytes[q * kPlane + v * 256 + i] = static_cast<uint8_t>(d >> (8 * q));
      }
    const uint8_t* pb = plane_bytes.data();
    at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        int64_t g, a0, bi;
        decode(u, g, a0, bi);
        vbmi_unit_for(planes, a_pad - a0)(p, pb, low, g, a0, bi);
      }
    });
    return batched ? out : out.squeeze(0);
  }
#endif
  // Portable: int32 columns, flushed before |acc| can pass 2^31 - 1.
  std::vector<int32_t> columns(kPlane);
  int64_t largest = 0;
  for (int64_t i = 0; i < 256; ++i)
    for (int64_t v = 0; v < 256; ++v) {
      columns[v * 256 + i] = tv[i * 256 + v];
      largest = std::max<int64_t>(largest, std::abs(static_cast<int64_t>(tv[i * 256 + v])));
    }
  const int64_t chunk = largest == 0 ? K : std::max<int64_t>(1, ((int64_t(1) << 31) - 1) / largest);
  const int32_t* cv = columns.data();
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      int64_t g, a0, bi;
      decode(u, g, a0, bi);
      portable_unit(p, cv, chunk, g, a0, bi);
    }
  });
  return batched ? out : out.squeeze(0);
}

at::Tensor approx_matmul_naive_cpu(const at::Tensor& x_idx, const at::Tensor& w_idx, const at::Tensor& table) {
  check_arguments(x_idx, w_idx, table, "torchapprox::approx_matmul_naive");
  const bool batched = x_idx.dim() == 3;
  const at::Tensor x = (batched ? x_idx : x_idx.unsqueeze(0)).contiguous();
  const at::Tensor w = (batched ? w_idx : w_idx.unsqueeze(0)).contiguous();
  const at::Tensor lut_tensor = table.contiguous();
  const int64_t G = x.size(0), M = x.size(1), K = x.size(2), N = w.size(1);
  at::Tensor out = at::empty({G, M, N}, x.options().dtype(at::kLong));
  const uint8_t* xv = x.data_ptr<uint8_t>();
  const uint8_t* wv = w.data_ptr<uint8_t>();
  const int32_t* lut = lut_tensor.data_ptr<int32_t>();
  int64_t* ov = out.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, N * K));
  at::parallel_for(0, G * M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t g = row / std::max<int64_t>(M, 1);
      const uint8_t* xr = xv + row * K;
      for (int64_t n = 0; n < N; ++n) {
        const uint8_t* wr = wv + (g * N + n) * K;
        int64_t acc = 0;
        for (int64_t k = 0; k < K; ++k) acc += lut[xr[k] * 256 + wr[k]];
        ov[row * N + n] = acc;
      }
    }
  });
  return batched ? out : out.squeeze(0);
}

// ----------------------------------------------------------------------- level indices
// index = level + offset for integer levels in [low, high]; the count of entries that are
// not (non-integer, out of range, NaN) comes back too, and the caller reports them
// (levels.py). The first pass only flags a block (a loop that vectorises); a flagged block
// is counted again exactly.
template <typename T, typename C>
TA_VECTOR_CLONES TA_NO_TRAPPING_MATH bool level_indices_block(const T* levels, uint8_t* index, int64_t begin, int64_t end,
                                          int64_t offset, int64_t low, int64_t high) {
  const C lo = static_cast<C>(low), hi = static_cast<C>(high);
  const int32_t shift = static_cast<int32_t>(offset);
  int32_t bad = 0;
  // No short-circuit operators: the loop stays branch-free and vectorises.
#pragma omp simd reduction(| : bad)
  for (int64_t i = begin; i < end; ++i) {
    const C x = static_cast<C>(levels[i]);
    const bool inside = (x >= lo) & (x <= hi);  // false for NaN
    const C safe = inside ? x : C(0);
    const int32_t whole = static_cast<int32_t>(safe);
    const bool ok = inside & (static_cast<C>(whole) == safe);
    bad |= static_cast<int32_t>(!ok);
    index[i] = static_cast<uint8_t>(whole + shift);
  }
  return bad != 0;
}

template <typename T, typename C>
int64_t count_bad(const T* levels, int64_t begin, int64_t end, int64_t low, int64_t high) {
  int64_t bad = 0;
  for (int64_t i = begin; i < end; ++i) {
    const C x = static_cast<C>(levels[i]);
    const bool inside = x >= static_cast<C>(low) && x <= static_cast<C>(high);
    bad += !(inside && static_cast<C>(static_cast<int64_t>(x)) == x);
  }
  return bad;
}

#if TA_X86_INTRINSICS
// float32 on AVX-512: 16 levels per step, the out-of-range, NaN and fraction checks as masks.
__attribute__((target("avx512f"))) bool level_indices_f32_avx512(const float* levels, uint8_t* index, int64_t begin,
                                                                 int64_t end, int64_t offset, int64_t low,
                                                                 int64_t high) {
  const __m512 lo = _mm512_set1_ps(static_cast<float>(low)), hi = _mm512_set1_ps(static_cast<float>(high));
  const __m512i shift = _mm512_set1_epi32(static_cast<int32_t>(offset));
  __mmask16 bad = 0;
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m512 x = _mm512_loadu_ps(levels + i);
    const __m512i whole = _mm512_cvttps_epi32(x);  // NaN and huge values give INT_MIN: caught below
    const __mmask16 ok = _mm512_cmp_ps_mask(_mm512_cvtepi32_ps(whole), x, _CMP_EQ_OQ) &
                         _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(x, hi, _CMP_LE_OQ);
    bad |= static_cast<__mmask16>(~ok);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(index + i), _mm512_cvtepi32_epi8(_mm512_add_epi32(whole, shift)));
  }
  const bool tail_bad = level_indices_block<float, float>(levels, index, i, end, offset, low, high);
  return bad != 0 || tail_bad;
}

bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}
#endif

template <typename T>
int64_t level_indices_range(const T* levels, uint8_t* index, int64_t begin, int64_t end, int64_t offset, int64_t low,
                            int64_t high) {
  // Compare in the type's own precision (float for half types: exact for |x| <= 2048;
  // int64 for integers, so no large integer wraps into range).
  using C = typename std::conditional<std::is_same<T, double>::value, double,
                                      typename std::conditional<std::is_integral<T>::value, int64_t,
                                                                float>::type>::type;
#if TA_X86_INTRINSICS
  if constexpr (std::is_same<T, float>::value) {
    if (cpu_has_avx512f()) {
      if (!level_indices_f32_avx512(levels, index, begin, end, offset, low, high)) return 0;
      return count_bad<T, C>(levels, begin, end, low, high);
    }
  }
#endif
  if (!level_indices_block<T, C>(levels, index, begin, end, offset, low, high)) return 0;
  return count_bad<T, C>(levels, begin, end, low, high);
}

std::tuple<at::Tensor, at::Tensor> level_indices_cpu(const at::Tensor& levels, int64_t offset, int64_t low,
                                                      int64_t high) {
  TORCH_CHECK_VALUE(low <= high && low + offset >= 0 && high + offset <= 255,
                    "torchapprox::level_indices: [low, high] + offset must map into 0..255, got [", low, ", ", high,
                    "] + ", offset);
  const at::Tensor values = levels.contiguous();
  at::Tensor index = at::empty(values.sizes(), values.options().dtype(at::kByte));
  int64_t bad = 0;
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "level_indices", [&] {
    const scalar_t* v = values.data_ptr<scalar_t>();
    uint8_t* out = index.data_ptr<uint8_t>();
    bad = at::parallel_reduce(
        0, values.numel(), kGrain, int64_t(0),
        [&](int64_t begin, int64_t end, int64_t partial) {
          return partial + level_indices_range(v, out, begin, end, offset, low, high);
        },
        std::plus<int64_t>());
  });
  return {index, at::scalar_tensor(bad, values.options().dtype(at::kLong))};
}

// ------------------------------------------------------------------------- index features
// out[..., k * r + f] = factors[index[..., k], f]: the operand features of a decomposition.
template <typename T>
void index_features_range(const uint8_t* index, const T* factors, T* out, int64_t r, int64_t begin, int64_t end) {
  if (r == 1) {
    for (int64_t i = begin; i < end; ++i) out[i] = factors[index[i]];
    return;
  }
  for (int64_t i = begin; i < end; ++i) {
    const T* row = factors + static_cast<int64_t>(index[i]) * r;
    for (int64_t f = 0; f < r; ++f) out[i * r + f] = row[f];
  }
}

at::Tensor index_features_cpu(const at::Tensor& index, const at::Tensor& factors) {
  TORCH_CHECK_VALUE(index.scalar_type() == at::kByte, "torchapprox::index_features: index must be uint8, got ",
                    index.scalar_type());
  TORCH_CHECK_VALUE(factors.dim() == 2 && factors.size(0) == 256 && factors.size(1) >= 1 &&
                        (factors.scalar_type() == at::kFloat || factors.scalar_type() == at::kDouble),
                    "torchapprox::index_features: factors must be float32/float64 [256, r], got ",
                    factors.scalar_type(), " ", factors.sizes());
  TORCH_CHECK_VALUE(index.dim() >= 1, "torchapprox::index_features: index must have a last dimension");
  const at::Tensor idx = index.contiguous();
  const at::Tensor table = factors.contiguous();
  const int64_t r = table.size(1);
  std::vector<int64_t> shape(idx.sizes().begin(), idx.sizes().end());
  shape.back() *= r;
  at::Tensor out = at::empty(shape, table.options());
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "index_features", [&] {
    const uint8_t* iv = idx.data_ptr<uint8_t>();
    const scalar_t* fv = table.data_ptr<scalar_t>();
    scalar_t* ov = out.data_ptr<scalar_t>();
    at::parallel_for(0, idx.numel(), std::max<int64_t>(1, kGrain / r),
                     [&](int64_t begin, int64_t end) { index_features_range(iv, fv, ov, r, begin, end); });
  });
  return out;
}

// --------------------------------------------------------------------- table-slope matmul
// out[g, a, k] = sum_b grad[g, a, b] * slopes[a_idx[g, a, k], b_idx[g, b, k]]: the "table"
// gradient of approx_matmul (gradients.py): with (x_idx, w_idx, dP/dx) it is grad_x, with
// (grad^T, w_idx, x_idx, (dP/dw)^T) grad_w. Threads over (g, a); the inner loop over k
// gathers from the 256 x 256 slope table (L2-resident) and accumulates in grad's dtype.
template <typename T>
TA_VECTOR_CLONES void slope_row(const T* grad_row, const uint8_t* a_row, const uint8_t* b, const T* slopes, T* out,
                                int64_t nb, int64_t K) {
  for (int64_t k = 0; k < K; ++k) out[k] = T(0);
  for (int64_t bi = 0; bi < nb; ++bi) {
    const T g = grad_row[bi];
    if (g == T(0)) continue;
    const uint8_t* b_row = b + bi * K;
    for (int64_t k = 0; k < K; ++k) out[k] += g * slopes[static_cast<int64_t>(a_row[k]) * 256 + b_row[k]];
  }
}

at::Tensor table_slope_matmul_cpu(const at::Tensor& grad, const at::Tensor& a_idx, const at::Tensor& b_idx,
                                  const at::Tensor& slopes) {
  TORCH_CHECK_VALUE(a_idx.scalar_type() == at::kByte && b_idx.scalar_type() == at::kByte && a_idx.dim() == 3 &&
                        b_idx.dim() == 3 && a_idx.size(0) == b_idx.size(0) && a_idx.size(2) == b_idx.size(2),
                    "torchapprox::table_slope_matmul: a_idx [G, A, K] and b_idx [G, B, K] must be uint8, got ",
                    a_idx.scalar_type(), " ", a_idx.sizes(), " and ", b_idx.scalar_type(), " ", b_idx.sizes());
  TORCH_CHECK_VALUE(grad.dim() == 3 && grad.size(0) == a_idx.size(0) && grad.size(1) == a_idx.size(1) &&
                        grad.size(2) == b_idx.size(1),
                    "torchapprox::table_slope_matmul: grad must be [G, A, B] = ", a_idx.size(0), ", ",
                    a_idx.size(1), ", ", b_idx.size(1), ", got ", grad.sizes());
  TORCH_CHECK_VALUE(slopes.dim() == 2 && slopes.size(0) == 256 && slopes.size(1) == 256 &&
                        slopes.scalar_type() == grad.scalar_type(),
                    "torchapprox::table_slope_matmul: slopes must be [256, 256] of grad's dtype, got ",
                    slopes.scalar_type(), " ", slopes.sizes());
  const int64_t G = a_idx.size(0), A = a_idx.size(1), B = b_idx.size(1), K = a_idx.size(2);
  at::Tensor out = at::empty({G, A, K}, grad.options());
  if (out.numel() == 0) return out;
  const at::Tensor g_c = grad.contiguous(), a_c = a_idx.contiguous(), b_c = b_idx.contiguous();
  const at::Tensor s_c = slopes.contiguous();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "table_slope_matmul", [&] {
    const scalar_t* gv = g_c.data_ptr<scalar_t>();
    const uint8_t* av = a_c.data_ptr<uint8_t>();
    const uint8_t* bv = b_c.data_ptr<uint8_t>();
    const scalar_t* sv = s_c.data_ptr<scalar_t>();
    scalar_t* ov = out.data_ptr<scalar_t>();
    at::parallel_for(0, G * A, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, B * K)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t row = begin; row < end; ++row) {
                         const int64_t g = row / A;
                         slope_row(gv + row * B, av + row * K, bv + g * B * K, sv, ov + row * K, B, K);
                       }
                     });
  });
  return out;
}

}  // namespace

// The schemas are defined in Python (torch.library.custom_op in multipliers/ops.py); these
// kernels take the CPU dispatch key ahead of the Python implementation the other devices use.
TORCH_LIBRARY_IMPL(torchapprox, CPU, m) {
  m.impl("approx_matmul", &approx_matmul_cpu);
  m.impl("approx_matmul_naive", &approx_matmul_naive_cpu);
  m.impl("level_indices", &level_indices_cpu);
  m.impl("index_features", &index_features_cpu);
  m.impl("table_slope_matmul", &table_slope_matmul_cpu);
}
