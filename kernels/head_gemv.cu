// The model's head for one decoded token: logits = lm_head(RMSNorm(x)), fp16 weights, in one kernel.
//
// out[n] = fp16(sum_k W[n, k] * xn[k]) as fp32, W the nn.Linear weight [N, K] (row-major, rows contiguous),
// xn = fp16(x * rsqrt(mean(x^2) + eps) * norm_weight) as the RMSNorm kernel stores it: the separate norm
// kernel, the cuBLAS GEMV and the cast to fp32 in one launch. Every block reduces the full row of x (from
// L2) and stages xn in shared memory; a warp takes one row of W at a time (16-byte loads per lane, summed
// in fp32, then a shuffle reduction). Launched as a programmatic dependent of the last layer's kernel: the
// first row's loads are issued before griddepcontrol.wait (the weight does not depend on it).

#include <cuda_fp16.h>
#include <cstdint>

#include "launch.cuh"
#include "row_rms.cuh"

struct HeadGemvArgs {  // mirrored by head_gemv.py's _Args
  const half* x;            // [K]
  const half* weight;       // [N, K]
  const half* norm_weight;  // [K]
  float* out;               // [N]
  int N, K;
  float norm_eps;
};

namespace {

constexpr int WARPS = 8;
constexpr int PER_LANE = 8;  // 16-byte loads of a row in flight per lane (a 4096-wide row: 16 per lane)

__device__ __forceinline__ float dot8(uint4 w, uint4 x) {
  const uint32_t ws[4] = {w.x, w.y, w.z, w.w}, xs[4] = {x.x, x.y, x.z, x.w};
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 a = __half22float2(*reinterpret_cast<const half2*>(&ws[j]));
    const float2 b = __half22float2(*reinterpret_cast<const half2*>(&xs[j]));
    s = fmaf(a.x, b.x, fmaf(a.y, b.y, s));
  }
  return s;
}

// One row's loads, PER_LANE at a time: lane l takes the 16-byte pieces l, l + 32, ...
struct RowLoads {
  uint4 w[PER_LANE];

  __device__ __forceinline__ void load(const uint4* row, int piece0, int pieces, int lane) {
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
      const int p = piece0 + i * 32 + lane;
      if (p < pieces) w[i] = __ldcs(row + p);
    }
  }
};

__global__ void __launch_bounds__(WARPS * 32) head_gemv_kernel(const HeadGemvArgs a) {
  extern __shared__ uint4 xs[];  // xn, K / 8 pieces
  __shared__ float inv_rms[1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int pieces = a.K / 8;
  const int warps = gridDim.x * WARPS;
  int row = blockIdx.x * WARPS + warp;

  RowLoads loads;
  if (row < a.N) loads.load(reinterpret_cast<const uint4*>(a.weight + (size_t)row * a.K), 0, pieces, lane);
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif

  // RMSNorm of x, rounded to fp16 as the norm kernel stores it.
  q4::rms_of_rows<1, WARPS>(a.x, nullptr, nullptr, nullptr, a.K, a.norm_eps, inv_rms);
  const uint4* xv = reinterpret_cast<const uint4*>(a.x);
  const uint4* nw = reinterpret_cast<const uint4*>(a.norm_weight);
  for (int p = threadIdx.x; p < pieces; p += WARPS * 32) {
    const uint4 v = xv[p], g = nw[p];
    const uint32_t vw[4] = {v.x, v.y, v.z, v.w}, gw[4] = {g.x, g.y, g.z, g.w};
    uint32_t r[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __half22float2(*reinterpret_cast<const half2*>(&vw[j]));
      const float2 h = __half22float2(*reinterpret_cast<const half2*>(&gw[j]));
      const half2 n = __floats2half2_rn(f.x * inv_rms[0] * h.x, f.y * inv_rms[0] * h.y);
      r[j] = *reinterpret_cast<const uint32_t*>(&n);
    }
    xs[p] = make_uint4(r[0], r[1], r[2], r[3]);
  }
  __syncthreads();

  for (; row < a.N; row += warps) {
    const uint4* wrow = reinterpret_cast<const uint4*>(a.weight + (size_t)row * a.K);
    float s = 0.f;
    for (int piece0 = 0; piece0 < pieces; piece0 += PER_LANE * 32) {
      if (piece0 > 0) loads.load(wrow, piece0, pieces, lane);
#pragma unroll
      for (int i = 0; i < PER_LANE; ++i) {
        const int p = piece0 + i * 32 + lane;
        if (p < pieces) s += dot8(loads.w[i], xs[p]);
      }
    }
    // The next row's first loads before the reduction, so they are in flight during it.
    if (row + warps < a.N) loads.load(reinterpret_cast<const uint4*>(a.weight + (size_t)(row + warps) * a.K), 0,
                                      pieces, lane);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) a.out[row] = __half2float(__float2half(s));
  }
}

}  // namespace

extern "C" {

// Returns 0, -1 for unsupported arguments (K not a multiple of 8 or above 32768), or a CUDA launch error code.
// x, weight and norm_weight 16-byte aligned. blocks: the grid size (the caller: a few per SM). pdl: launch as a
// programmatic dependent of the previous kernel in the stream.
int head_gemv(const HeadGemvArgs* args, int blocks, int pdl, void* stream) {
  const HeadGemvArgs& a = *args;
  if (a.K % 8 || a.K <= 0 || a.K > 32768 || a.N <= 0 || blocks <= 0) return -1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(WARPS * 32);
  config.dynamicSmemBytes = (size_t)a.K * sizeof(half);
  config.stream = static_cast<cudaStream_t>(stream);
  cudaError_t rc = allow_dynamic_smem<head_gemv_kernel>(config.dynamicSmemBytes);
  if (rc == cudaSuccess) rc = launch_kernel(config, pdl, head_gemv_kernel, a);
  return rc == cudaErrorInvalidValue ? -1 : static_cast<int>(rc);
}

}
