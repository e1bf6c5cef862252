// 4-bit GPTQ matmul on the CPU with AVX-512 VNNI: y[M, N] = x[M, K] · dequant(W)[K, N].
//
// The activations are quantized to int8 in blocks of 32 (one float scale a block, as llama.cpp's Q8_0, plus
// a second int8 term for what the first leaves over), the
// weights stay 4-bit unsigned, and vpdpbusd multiplies 64 u8 x s8 pairs into 16 int32 lanes at once. Each
// lane is one output column: a 64-byte chunk of the packed weights holds 8 consecutive k of 16 columns
// (column r's four bytes: k0..k3 in the low nibbles, k4..k7 in the high ones), so the low and the high
// nibbles are each one vpdpbusd against 4 broadcast activation bytes. Per group of the GPTQ format:
//   sum_k x_k s (q_k - z) = s * sum_b dx_b * sum_{k in b} xq_k q_k  -  (z s) * sum_k x_k
// where the second sum is taken over the quantized activations too, so the zero point cancels exactly.
// Columns are split over torch's threads in tiles of 16; each tile's weights are read from memory once per
// call and reused, from the cache, for every row of x (MB rows at a time held in registers).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int kBlock = 32;  // activations' quantization block
constexpr int kTile = 16;   // output columns a tile

// x ~ scale * q + scale2 * q2 per block: the second int8 term quantizes what the first left over, so the
// activations keep about 14 bits (one int8 alone lost more than bf16 does, measured on the test checkpoints).
struct QuantizedRows {
  std::vector<int8_t> q, q2;         // [M, K]
  std::vector<float> scale, scale2;  // [M, K / 32]
  std::vector<float> sums;           // [M, groups]: sum over the group of the dequantized activations
};

float quantize_block(const float* x, int8_t* q, int* total) {
  float amax = 0.f;
  for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int sum = 0;
  for (int i = 0; i < kBlock; ++i) {
    const int v = static_cast<int>(std::nearbyint(x[i] * inv));
    q[i] = static_cast<int8_t>(v);
    sum += v;
  }
  *total = sum;
  return amax / 127.f;
}

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, int64_t group) {
  QuantizedRows r;
  const int64_t blocks = K / kBlock, groups = K / group, per_group = group / kBlock;
  r.q.resize(M * K);
  r.q2.resize(M * K);
  r.scale.resize(M * blocks);
  r.scale2.resize(M * blocks);
  r.sums.assign(M * groups, 0.f);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    float rest[kBlock];
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t at = m * K + b * kBlock;
        int sum = 0, sum2 = 0;
        const float d = quantize_block(x + at, r.q.data() + at, &sum);
        for (int i = 0; i < kBlock; ++i) rest[i] = x[at + i] - d * static_cast<float>(r.q[at + i]);
        const float d2 = quantize_block(rest, r.q2.data() + at, &sum2);
        r.scale[m * blocks + b] = d;
        r.scale2[m * blocks + b] = d2;
        r.sums[m * groups + b / per_group] += d * static_cast<float>(sum) + d2 * static_cast<float>(sum2);
      }
    }
  });
  return r;
}

template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void tile_rows(const uint8_t* w, const float* s, const float* zs, const QuantizedRows& xr, int64_t m0,
               int64_t K, int64_t group, float* y, int64_t N, int64_t col) {
  const int64_t blocks = K / kBlock, groups = K / group, per_group = group / kBlock;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 out[MB];
  for (int m = 0; m < MB; ++m) out[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      __m512i dots[MB], dots2[MB];
      for (int m = 0; m < MB; ++m) dots[m] = dots2[m] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int c = 0; c < kBlock / 8; ++c) {
        const int64_t k = b * kBlock + c * 8;
        const __m512i v = _mm512_loadu_si512(w + (k / 8) * 64);
        const __m512i lo = _mm512_and_si512(v, low4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        for (int m = 0; m < MB; ++m) {
          const int8_t* xq = xr.q.data() + (m0 + m) * K + k;
          dots[m] = _mm512_dpbusd_epi32(dots[m], lo, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xq)));
          dots[m] = _mm512_dpbusd_epi32(dots[m], hi, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xq + 4)));
          const int8_t* xq2 = xr.q2.data() + (m0 + m) * K + k;
          dots2[m] = _mm512_dpbusd_epi32(dots2[m], lo, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xq2)));
          dots2[m] = _mm512_dpbusd_epi32(dots2[m], hi,
                                         _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xq2 + 4)));
        }
      }
      for (int m = 0; m < MB; ++m) {
        const int64_t at = (m0 + m) * blocks + b;
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[m]), _mm512_set1_ps(xr.scale[at]), acc[m]);
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots2[m]), _mm512_set1_ps(xr.scale2[at]), acc[m]);
      }
    }
    const __m512 sg = _mm512_loadu_ps(s + g * kTile), zg = _mm512_loadu_ps(zs + g * kTile);
    for (int m = 0; m < MB; ++m) {
      out[m] = _mm512_fmadd_ps(sg, acc[m], out[m]);
      out[m] = _mm512_fnmadd_ps(zg, _mm512_set1_ps(xr.sums[(m0 + m) * groups + g]), out[m]);
    }
  }
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(y + (m0 + m) * N + col, out[m]);
}

constexpr int kRows = 4;        // rows of x held in registers at once
constexpr int64_t kPanel = 128;  // rows of x a pass over the weights takes (their int8 form stays in L2)

template <int MB>
void rows_of_tile(const uint8_t* w, const float* s, const float* zs, const QuantizedRows& xr, int64_t m,
                  int64_t m_end, int64_t K, int64_t group, float* y, int64_t N, int64_t col) {
  for (; m + MB <= m_end; m += MB) tile_rows<MB>(w, s, zs, xr, m, K, group, y, N, col);
  if constexpr (MB > 1) {
    for (; m < m_end; ++m) tile_rows<1>(w, s, zs, xr, m, K, group, y, N, col);
  }
}

}  // namespace

bool supported() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni"); }

// x [M, K] float32; packed [N/16, K/8, 64] uint8; scales, zero_scales [N/16, groups, 16] float32.
torch::Tensor q4_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, torch::Tensor zero_scales,
                        int64_t group) {
  TORCH_CHECK(supported(), "this CPU has no AVX-512 VNNI");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() && packed.dim() == 3, "packed");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0) * kTile;
  TORCH_CHECK(packed.size(1) * 8 == K && packed.size(2) == 64, "packed does not match K");
  TORCH_CHECK(K % group == 0 && group % kBlock == 0, "the group must divide K and be a multiple of 32");
  TORCH_CHECK(scales.is_contiguous() && zero_scales.is_contiguous() && scales.size(1) == K / group, "scales");
  const QuantizedRows xr = quantize_rows(x.data_ptr<float>(), M, K, group);
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const float *s = scales.data_ptr<float>(), *zs = zero_scales.data_ptr<float>();
  float* out = y.data_ptr<float>();
  const int64_t tiles = N / kTile, groups = K / group;
  for (int64_t m0 = 0; m0 < M; m0 += kPanel) {
    const int64_t m1 = std::min(M, m0 + kPanel);
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* wt = w + t * (K / 8) * 64;
        const float *st = s + t * groups * kTile, *zt = zs + t * groups * kTile;
        if (m1 - m0 == 1)
          rows_of_tile<1>(wt, st, zt, xr, m0, m1, K, group, out, N, t * kTile);
        else
          rows_of_tile<kRows>(wt, st, zt, xr, m0, m1, K, group, out, N, t * kTile);
      }
    });
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supported", &supported);
  m.def("q4_matmul", &q4_matmul);
}
