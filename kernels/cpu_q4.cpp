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
constexpr int kPrefetch = 1024;  // bytes ahead of the weights being read: the hardware prefetcher alone left
                                 // memory idle between a core's requests

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
      // Four independent sums a row (low/high nibbles x first/second int8 term): vpdpbusd's latency is
      // several cycles, and one chain of them would wait on itself rather than on memory.
      __m512i dots[MB], dots_hi[MB], dots2[MB], dots2_hi[MB];
      for (int m = 0; m < MB; ++m) dots[m] = dots_hi[m] = dots2[m] = dots2_hi[m] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int c = 0; c < kBlock / 8; ++c) {
        const int64_t k = b * kBlock + c * 8;
        _mm_prefetch(reinterpret_cast<const char*>(w + (k / 8) * 64 + kPrefetch), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(w + (k / 8) * 64);
        const __m512i lo = _mm512_and_si512(v, low4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        for (int m = 0; m < MB; ++m) {
          const int8_t* xq = xr.q.data() + (m0 + m) * K + k;
          dots[m] = _mm512_dpbusd_epi32(dots[m], lo, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xq)));
          dots_hi[m] = _mm512_dpbusd_epi32(dots_hi[m], hi,
                                           _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xq + 4)));
          const int8_t* xq2 = xr.q2.data() + (m0 + m) * K + k;
          dots2[m] = _mm512_dpbusd_epi32(dots2[m], lo, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xq2)));
          dots2_hi[m] = _mm512_dpbusd_epi32(dots2_hi[m], hi,
                                            _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xq2 + 4)));
        }
      }
      for (int m = 0; m < MB; ++m) {
        const int64_t at = (m0 + m) * blocks + b;
        const __m512i first = _mm512_add_epi32(dots[m], dots_hi[m]), second = _mm512_add_epi32(dots2[m], dots2_hi[m]);
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(first), _mm512_set1_ps(xr.scale[at]), acc[m]);
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(second), _mm512_set1_ps(xr.scale2[at]), acc[m]);
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

// ---- one-token attention over the paged bf16 KV cache ----------------------------------------------------
// A decoding sequence's query against its keys, read in place from the cache's blocks (torch's path gathered
// them into a new tensor first, then ran SDPA: at 512 tokens that was most of a 7B decode step's time).
// Each (sequence, head) is computed alone, in fp32, so a row's result does not depend on the others.

namespace {

__attribute__((target("avx512f,avx512bw")))
inline __m512 bf16x16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

__attribute__((target("avx512f,avx512bw")))
void attend_row(const float* q, const uint16_t* k, const uint16_t* v, const int32_t* blocks, int64_t begin,
                int64_t end, int64_t block_size, int64_t head_dim, float scale, float* out, std::vector<float>& p) {
  p.resize(end - begin);
  float best = -INFINITY;
  for (int64_t j = begin; j < end; ++j) {
    const int64_t slot = static_cast<int64_t>(blocks[j / block_size]) * block_size + j % block_size;
    const uint16_t* kj = k + slot * head_dim;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < head_dim; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), bf16x16(kj + d), acc);
    const float score = _mm512_reduce_add_ps(acc) * scale;
    p[j - begin] = score;
    best = std::max(best, score);
  }
  float total = 0.f;
  for (auto& x : p) {
    x = std::exp(x - best);
    total += x;
  }
  for (int64_t d = 0; d < head_dim; d += 16) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = begin; j < end; ++j) {
      const int64_t slot = static_cast<int64_t>(blocks[j / block_size]) * block_size + j % block_size;
      acc = _mm512_fmadd_ps(_mm512_set1_ps(p[j - begin]), bf16x16(v + slot * head_dim + d), acc);
    }
    _mm512_storeu_ps(out + d, _mm512_mul_ps(acc, _mm512_set1_ps(1.f / total)));
  }
}

}  // namespace

// q [B, Hq, D] float32; k, v [Hkv, slots, D] bf16 (one layer of the pool); table [B, W] int32; lens [B] int32.
// window: attend to the last ``window`` positions only (0: all). Returns [B, Hq, D] float32.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor table,
                                     torch::Tensor lens, int64_t block_size, int64_t window) {
  TORCH_CHECK(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"), "this CPU has no AVX-512");
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.is_contiguous(), "q: float32 [B, Hq, D]");
  TORCH_CHECK(k.scalar_type() == torch::kBFloat16 && k.is_contiguous() && v.is_contiguous() && k.dim() == 3, "k, v");
  TORCH_CHECK(table.scalar_type() == torch::kInt32 && lens.scalar_type() == torch::kInt32, "table, lens: int32");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(0), slots = k.size(1);
  TORCH_CHECK(D % 16 == 0 && k.size(2) == D && Hq % Hkv == 0, "head sizes");
  auto out = torch::empty_like(q);
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  const auto table_c = table.contiguous();
  const int32_t *tp = table_c.data_ptr<int32_t>(), *lp = lens.data_ptr<int32_t>();
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t width = table_c.size(1), group = Hq / Hkv;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, B * Hq, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> p;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / Hq, h = r % Hq, kvh = h / group, len = lp[b];
      const int64_t begin = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      attend_row(qp + r * D, kp + kvh * slots * D, vp + kvh * slots * D, tp + b * width, begin, len, block_size, D,
                 scale, op + r * D, p);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supported", &supported);
  m.def("q4_matmul", &q4_matmul);
  m.def("paged_decode_attention", &paged_decode_attention);
}
