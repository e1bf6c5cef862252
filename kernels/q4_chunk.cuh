// The unit of work of the 4-bit GEMV (q4_gemv.cu): a warp's 32 rows of K by 128 columns of a GPTQ weight
// (qweight [K/8, N] int32, scales [G, N] fp16, qzeros [G, N/8] int32), loaded as one 16-byte load per lane
// and word row, and multiplied with the matching 32 staged x values (see q4_gemv.cu for the fp16 exponent
// trick and the x staging layout: 16 half2 pairs, scaled by 1/16 and 1/256).
#pragma once

#include <cuda_fp16.h>
#include <cstdint>

namespace q4 {

constexpr int TILE_N = 128;  // columns per block of the GEMV, and of a chunk: 32 lanes x 4
constexpr int CHUNK = 32;    // rows per chunk: 4 word rows, one scale row (the smallest group size)

__device__ __forceinline__ half2 as_half2(uint32_t v) {
  return *reinterpret_cast<half2*>(&v);
}

// (a & MASK) | c in one instruction (with both constants immediates the compiler emits two).
template <uint32_t MASK>
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "n"(MASK), "r"(c));
  return r;
}

struct Chunk {
  uint4 words[CHUNK / 8];
  uint2 scales;
  uint32_t zeros;
};

__device__ __forceinline__ void load_chunk(Chunk& c, const uint32_t* __restrict__ qweight,
                                           const half* __restrict__ scales, const uint32_t* __restrict__ qzeros,
                                           int k, int col, int N, int group_size) {
#pragma unroll
  for (int r = 0; r < CHUNK / 8; ++r) {
    c.words[r] = __ldcs(reinterpret_cast<const uint4*>(qweight + (size_t)(k / 8 + r) * N + col));
  }
  const int g = k / group_size;
  c.scales = __ldg(reinterpret_cast<const uint2*>(scales + (size_t)g * N + col));
  c.zeros = __ldg(qzeros + (size_t)g * (N / 8) + col / 8) >> (4 * (col % 8));
}

template <int M>
__device__ __forceinline__ void compute_chunk(const Chunk& c, const uint4* xs, int zero_offset, float (&acc)[M][4],
                                              int pairs_per_m) {
  half2 a[M][4];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j) a[m][j] = __float2half2_rn(0.f);
  const uint32_t magic = 0x64006400u;  // in a register: one lop3 per (w & mask) | magic, not two instructions
  half2 z1[4], z16[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t z = ((c.zeros >> (4 * j)) & 0xF) + zero_offset;
    z1[j] = as_half2((0x6400u | z) * 0x10001u);
    z16[j] = as_half2((0x6400u | (z << 4)) * 0x10001u);
  }
#pragma unroll
  for (int r = 0; r < CHUNK / 8; ++r) {
    uint4 xv[M];
#pragma unroll
    for (int m = 0; m < M; ++m) xv[m] = xs[m * (pairs_per_m / 4) + r];
    const uint32_t words[4] = {c.words[r].x, c.words[r].y, c.words[r].z, c.words[r].w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t w = words[j], t = w >> 8;
      const half2 d0 = __hsub2(as_half2(and_or<0x000F000Fu>(w, magic)), z1[j]);
      const half2 d1 = __hsub2(as_half2(and_or<0x00F000F0u>(w, magic)), z16[j]);
      const half2 d2 = __hsub2(as_half2(and_or<0x000F000Fu>(t, magic)), z1[j]);
      const half2 d3 = __hsub2(as_half2(and_or<0x00F000F0u>(t, magic)), z16[j]);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        a[m][j] = __hfma2(d0, as_half2(xv[m].x), a[m][j]);
        a[m][j] = __hfma2(d1, as_half2(xv[m].y), a[m][j]);
        a[m][j] = __hfma2(d2, as_half2(xv[m].z), a[m][j]);
        a[m][j] = __hfma2(d3, as_half2(xv[m].w), a[m][j]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float s = 16.f * __half2float(reinterpret_cast<const half*>(&c.scales)[j]);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float2 f = __half22float2(a[m][j]);
      acc[m][j] = fmaf(f.x + f.y, s, acc[m][j]);
    }
  }
}

}  // namespace q4
