// 4-bit GPTQ GEMV for 1 to 4 rows (decode), ExLlama style, with fused epilogues.
//
// y[M, N] = x[M, K] @ W, W in the GPTQ layout: qweight [K/8, N] int32 (8 rows of K per word, row k in
// bits 4*(k%8)), scales [G, N] fp16, qzeros [G, N/8] int32, groups contiguous runs of group_size rows
// (a multiple of 32; act-order checkpoints are reordered at load).
//
// A block owns 128 columns (32 lanes x 4, one 16-byte load per lane and word row) and WARPS * 128 rows
// of K, 128 per warp. Each lane issues all 16 of its weight loads before it computes. A word holds
// rows 8i..8i+7 of one column; (word >> 4j) & 0x000F000F | 0x64006400 is the half2 (1024 + q[8i+j],
// 1024 + q[8i+j+4]) -- the fp16 exponent trick, no int-to-float conversion -- and subtracting
// (1024 + zero) leaves q - zero exactly. Products of four row pairs are summed in half2, then in fp32;
// the scale multiplies each 32-row slice in fp32.
//
// Blocks along K add their partial sums into an fp32 workspace; the last block of a column tile (an
// arrival counter says which) applies the epilogue -- store, add a residual, or SiLU(gate) * up -- and
// resets the workspace and the counter to zero for the next call. So one call is one kernel: no
// zero-fill and no cast kernels around it, which matters when a decode step is hundreds of kernels.

#include <cuda_fp16.h>
#include <cstdint>

namespace {

constexpr int TILE_N = 128;  // columns per block
constexpr int KW = 128;      // rows of K per warp
constexpr int SLICE = 32;    // rows per scale application (the smallest group size)

enum Epilogue { STORE = 0, ADD = 1, SILU_MUL = 2 };

__device__ __forceinline__ half2 as_half2(uint32_t v) {
  return *reinterpret_cast<half2*>(&v);
}

template <int M, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) q4_gemv_kernel(
    const half* __restrict__ x, const uint32_t* __restrict__ qweight, const half* __restrict__ scales,
    const uint32_t* __restrict__ qzeros, half* out, const half* residual, float* __restrict__ ws,
    int* __restrict__ counters, int N, int K, int group_size, int zero_offset, int epilogue) {
  constexpr int ROWS = KW / 8;  // word rows per warp
  constexpr int PAIRS = WARPS * KW / 2;
  __shared__ uint4 xs_raw[M * PAIRS / 4];  // x as half2 pairs (x[8i+j], x[8i+j+4]), 4 pairs per uint4
  __shared__ float red[WARPS][M][TILE_N];
  __shared__ int is_last;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int tile = blockIdx.x;
  const int k_block = blockIdx.y * WARPS * KW;
  const int col = tile * TILE_N + lane * 4;
  const bool col_ok = col < N;
  const int k_warp = k_block + warp * KW;

  // Weight loads first, so that all of them are in flight while x is staged.
  uint4 wq[ROWS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    if (col_ok && k_warp + 8 * i < K) {
      wq[i] = __ldcs(reinterpret_cast<const uint4*>(qweight + (size_t)(k_warp / 8 + i) * N + col));
    } else {
      wq[i] = make_uint4(0, 0, 0, 0);
    }
  }

  half2* xs = reinterpret_cast<half2*>(xs_raw);
  for (int p = threadIdx.x; p < M * PAIRS; p += WARPS * 32) {
    const int m = p / PAIRS, q = p % PAIRS;
    const int k = k_block + (q / 4) * 8 + (q % 4);
    half lo = __float2half(0.f), hi = __float2half(0.f);
    if (k < K) {
      lo = x[(size_t)m * K + k];
      hi = x[(size_t)m * K + k + 4];
    }
    xs[p] = __halves2half2(lo, hi);
  }
  __syncthreads();

  float acc[M][4];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[m][c] = 0.f;

#pragma unroll
  for (int s = 0; s < KW / SLICE; ++s) {
    const int k0 = k_warp + s * SLICE;
    if (k0 >= K || !col_ok) break;
    const int g = k0 / group_size;
    const uint2 sraw = *reinterpret_cast<const uint2*>(scales + (size_t)g * N + col);
    const uint32_t zword = qzeros[(size_t)g * (N / 8) + col / 8] >> (4 * (col % 8));
    half2 z2[4];
    float scale[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const uint32_t z = ((zword >> (4 * c)) & 0xF) + zero_offset;
      z2[c] = as_half2((0x6400u | z) * 0x10001u);
      scale[c] = __half2float(reinterpret_cast<const half*>(&sraw)[c]);
    }
    float part[M][4];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int c = 0; c < 4; ++c) part[m][c] = 0.f;
#pragma unroll
    for (int r = 0; r < SLICE / 8; ++r) {
      const int row = s * (SLICE / 8) + r;
      const uint32_t words[4] = {wq[row].x, wq[row].y, wq[row].z, wq[row].w};
      uint4 xv[M];
#pragma unroll
      for (int m = 0; m < M; ++m) xv[m] = xs_raw[m * (PAIRS / 4) + warp * ROWS + row];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        half2 d[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          d[j] = __hsub2(as_half2(((words[c] >> (4 * j)) & 0x000F000Fu) | 0x64006400u), z2[c]);
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
          half2 a = __hmul2(d[0], as_half2(xv[m].x));
          a = __hfma2(d[1], as_half2(xv[m].y), a);
          a = __hfma2(d[2], as_half2(xv[m].z), a);
          a = __hfma2(d[3], as_half2(xv[m].w), a);
          const float2 f = __half22float2(a);
          part[m][c] += f.x + f.y;
        }
      }
    }
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[m][c] = fmaf(part[m][c], scale[c], acc[m][c]);
  }

#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) red[warp][m][lane * 4 + c] = acc[m][c];
  __syncthreads();

  const bool direct = gridDim.y == 1 && epilogue != SILU_MUL;
  for (int t = threadIdx.x; t < M * TILE_N; t += WARPS * 32) {
    const int m = t / TILE_N, n = tile * TILE_N + t % TILE_N;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) v += red[w][m][t % TILE_N];
    if (n >= N) continue;
    if (direct) {
      if (epilogue == ADD) v += __half2float(residual[(size_t)m * N + n]);
      out[(size_t)m * N + n] = __float2half(v);
    } else {
      atomicAdd(ws + (size_t)m * N + n, v);
    }
  }
  if (direct) return;

  // The last block to arrive for this tile (or tile pair, for SILU_MUL) finishes it.
  __threadfence();
  __syncthreads();
  const int counter = epilogue == SILU_MUL ? tile / 2 : tile;
  const int expected = (epilogue == SILU_MUL ? 2 : 1) * gridDim.y;
  if (threadIdx.x == 0) is_last = atomicAdd(counters + counter, 1) == expected - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  if (epilogue == SILU_MUL) {
    // Columns are interleaved by tile: gate tile 2t, up tile 2t + 1 -> output columns of tile t.
    const int half_n = N / 2;
    for (int t = threadIdx.x; t < M * TILE_N; t += WARPS * 32) {
      const int m = t / TILE_N, c = t % TILE_N;
      const size_t gi = (size_t)m * N + (tile & ~1) * TILE_N + c;
      const size_t ui = gi + TILE_N;
      const float g = __ldcg(ws + gi), u = __ldcg(ws + ui);
      ws[gi] = 0.f;
      ws[ui] = 0.f;
      out[(size_t)m * half_n + (tile / 2) * TILE_N + c] = __float2half(g / (1.f + __expf(-g)) * u);
    }
  } else {
    for (int t = threadIdx.x; t < M * TILE_N; t += WARPS * 32) {
      const int m = t / TILE_N, n = tile * TILE_N + t % TILE_N;
      if (n >= N) continue;
      const size_t i = (size_t)m * N + n;
      float v = __ldcg(ws + i);
      ws[i] = 0.f;
      if (epilogue == ADD) v += __half2float(residual[i]);
      out[i] = __float2half(v);
    }
  }
  if (threadIdx.x == 0) counters[counter] = 0;
}

template <int M, int WARPS>
void launch(const void* x, const void* qweight, const void* scales, const void* qzeros, void* out,
            const void* residual, void* ws, void* counters, int N, int K, int group_size, int zero_offset,
            int epilogue, cudaStream_t stream) {
  const dim3 grid((N + TILE_N - 1) / TILE_N, (K + WARPS * KW - 1) / (WARPS * KW));
  q4_gemv_kernel<M, WARPS><<<grid, WARPS * 32, 0, stream>>>(
      static_cast<const half*>(x), static_cast<const uint32_t*>(qweight), static_cast<const half*>(scales),
      static_cast<const uint32_t*>(qzeros), static_cast<half*>(out), static_cast<const half*>(residual),
      static_cast<float*>(ws), static_cast<int*>(counters), N, K, group_size, zero_offset, epilogue);
}

template <int WARPS>
int dispatch_m(int M, const void* x, const void* qweight, const void* scales, const void* qzeros, void* out,
               const void* residual, void* ws, void* counters, int N, int K, int group_size, int zero_offset,
               int epilogue, cudaStream_t stream) {
  switch (M) {
    case 1: launch<1, WARPS>(x, qweight, scales, qzeros, out, residual, ws, counters, N, K, group_size, zero_offset, epilogue, stream); break;
    case 2: launch<2, WARPS>(x, qweight, scales, qzeros, out, residual, ws, counters, N, K, group_size, zero_offset, epilogue, stream); break;
    case 3: launch<3, WARPS>(x, qweight, scales, qzeros, out, residual, ws, counters, N, K, group_size, zero_offset, epilogue, stream); break;
    case 4: launch<4, WARPS>(x, qweight, scales, qzeros, out, residual, ws, counters, N, K, group_size, zero_offset, epilogue, stream); break;
    default: return -1;
  }
  return 0;
}

}  // namespace

extern "C" {

// Returns 0, -1 for an unsupported argument, or a CUDA error code (launch errors only; the kernel is
// asynchronous). ws: fp32 [M, N] and counters: int32 [ceil(N / 128)], both zero before the first call;
// the kernel leaves them zero. For SILU_MUL, out is [M, N / 2] and N a multiple of 256.
int q4_gemv(int M, const void* x, const void* qweight, const void* scales, const void* qzeros, void* out,
            const void* residual, void* ws, void* counters, int N, int K, int group_size, int zero_offset,
            int epilogue, int warps, void* stream) {
  if (N % 8 || K % 32 || group_size % 32 || group_size <= 0) return -1;
  if (epilogue == SILU_MUL && N % (2 * TILE_N)) return -1;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  int rc;
  if (warps == 4) {
    rc = dispatch_m<4>(M, x, qweight, scales, qzeros, out, residual, ws, counters, N, K, group_size, zero_offset, epilogue, s);
  } else if (warps == 8) {
    rc = dispatch_m<8>(M, x, qweight, scales, qzeros, out, residual, ws, counters, N, K, group_size, zero_offset, epilogue, s);
  } else {
    return -1;
  }
  if (rc) return rc;
  return static_cast<int>(cudaGetLastError());
}

int q4_tile_n() { return TILE_N; }

}
