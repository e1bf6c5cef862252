// The RMS of whole rows of x, read by every block of a kernel that folds an RMSNorm into its input
// (q4_gemv.cu, head_gemv.cu).
#pragma once

#include <cuda_fp16.h>
#include <cstdint>

#include "q4_chunk.cuh"

namespace q4 {

// fp16(fp16 values + fp32 sums) for 8 values, as the ADD epilogue rounds the residual stream.
__device__ __forceinline__ uint4 add_sums(uint4 v, const float4* s) {
  const float4 a = s[0], b = s[1];
  const float sums[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
  uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(as_half2(words[j]));
    const half2 r = __floats2half2_rn(f.x + sums[2 * j], f.y + sums[2 * j + 1]);
    words[j] = *reinterpret_cast<const uint32_t*>(&r);
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// inv_rms[m] = rsqrt(mean(x[m]^2) + eps) over the whole row (every block of the grid reads the full rows of x,
// from L2: 8 KB for a 4096-wide row). K is a multiple of 32 and x 16-byte aligned. With sums, the row is
// x + sums (see add_sums), which x_out, if given, receives from block (0, 0). row_cache (shared memory,
// M x K, or null) receives the rows as read, for the staging to gather from.
template <int M, int WARPS>
__device__ void rms_of_rows(const half* __restrict__ x, const float* __restrict__ sums, half* x_out,
                            half* row_cache, int K, float eps, float* inv_rms) {
  __shared__ float partial[WARPS][M];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool store = x_out && blockIdx.x == 0 && blockIdx.y == 0;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float ss = 0.f;
    const uint4* row = reinterpret_cast<const uint4*>(x + (size_t)m * K);
    const float4* srow = reinterpret_cast<const float4*>(sums + (size_t)m * K);
#pragma unroll 4
    for (int i = threadIdx.x; i < K / 8; i += WARPS * 32) {
      uint4 v = row[i];
      if (sums) {
        v = add_sums(v, srow + 2 * i);
        if (store) reinterpret_cast<uint4*>(x_out + (size_t)m * K)[i] = v;
      }
      if (row_cache) reinterpret_cast<uint4*>(row_cache + (size_t)m * K)[i] = v;
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = __half22float2(as_half2(words[j]));
        ss = fmaf(f.x, f.x, fmaf(f.y, f.y, ss));
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) partial[warp][m] = ss;
  }
  __syncthreads();
  if (threadIdx.x < M) {
    float ss = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) ss += partial[w][threadIdx.x];
    inv_rms[threadIdx.x] = rsqrtf(ss / K + eps);
  }
  __syncthreads();
}

}  // namespace q4
