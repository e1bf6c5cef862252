// 4-bit GPTQ GEMV for 1 to 4 rows (decode), ExLlama style, with fused epilogues.
//
// y[M, N] = x[M, K] @ W, W in the GPTQ layout: qweight [K/8, N] int32 (8 rows of K per word, row k in
// bits 4*(k%8)), scales [G, N] fp16, qzeros [G, N/8] int32, groups contiguous runs of group_size rows
// (a multiple of 32; act-order checkpoints are reordered at load).
//
// A block owns 128 columns (32 lanes x 4: one 16-byte load per lane and word row) and WARPS ranges of
// rows_per_warp rows of K, one per warp. A warp walks its range in chunks of 32 rows (4 word rows, one
// scale row) and keeps the next DEPTH (2 or 4) chunks' loads in flight while it computes one. A word holds rows
// 8i..8i+7 of one column; (w & 0x000F000F) | 0x64006400 is the half2 (1024 + q0, 1024 + q4) and
// (w & 0x00F000F0) | 0x64006400 is (1024 + 16 q1, 1024 + 16 q5) -- the fp16 exponent trick, no
// int-to-float conversions -- and w >> 8 gives q2, q6, q3, q7 the same way. Subtracting (1024 + zero),
// or (1024 + 16 zero), leaves q - zero (times 16) exactly. x is staged in shared memory as the matching
// pairs (gathered through q_perm for act-order checkpoints), divided by 16 (by 256 for the pairs that come
// times 16), so the 16 products of a chunk sum in half2 without overflow for |x| < 4096; each chunk's sum
// is then scaled (times 16) in fp32. With norm_weight, x is the layer's input before its RMSNorm: every
// block first reduces the sum of squares of the full rows, then stages the normalised values.
//
// The first DEPTH chunks' loads are issued before griddepcontrol.wait (programmatic dependent launch):
// weights never depend on the previous kernel, so they stream while it finishes. A block lets the next
// kernel launch as it starts (launch_dependents), so that kernel's blocks take the SM room this one
// leaves and issue their own weight loads early (with act-order, also their row lookups): 7B act-order
// step 2.152 -> 1.996 ms, without act-order 1.962 -> 1.950 (H100, 2026-11-23).
//
// Blocks along K add their partial sums into an fp32 workspace; the last block of a column tile (an
// arrival counter says which) applies the epilogue -- store, add a residual, or SiLU(gate) * up -- and
// resets the workspace and the counter to zero for the next call. So one call is one kernel: no
// zero-fill and no cast kernels around it, which matters when a decode step is hundreds of kernels.
//
// Within a decode step that finishing tail (fence, arrival counter, the last block's re-read) sits on the
// critical path of every GEMV, so the step can leave it out (epilogue SUMS): the blocks only add into the
// workspace, and the next kernel, which waits for this one to complete anyway, reads the fp32 sums as its
// input: x_mode RESIDUAL_SUMS takes x + sums (the residual stream after o_proj or down_proj, rounded to
// fp16 as the ADD epilogue would store it; block (0, 0) also stores it to x_out for the layer's next add),
// x_mode GLU_SUMS takes SiLU(gate) * up from gate/up sums in the SILU_MUL tile order. A SUMS workspace is
// zeroed by a later kernel of the step, once its readers are done: zero0/zero1 name up to two such buffers,
// cleared right after griddepcontrol.wait.

#include <cuda_fp16.h>
#include <cstdint>

#include "launch.cuh"
#include "q4_chunk.cuh"
#include "row_rms.cuh"

// Outside the anonymous namespace: q4_gemv() below is exported with it.
struct Q4GemvArgs {  // mirrored by q4_gemv.py's _Args
  const half* x;             // [M, K]
  const uint32_t* qweight;   // [K / 8, N]
  const half* scales;        // [G, N]
  const uint32_t* qzeros;    // [G, N / 8]
  half* out;                 // [M, N], or [M, N / 2] for SILU_MUL
  const half* residual;      // [M, N] for ADD (may be out itself)
  float* ws;                 // [M, N] fp32 partial sums
  int* counters;             // [ceil(N / 128)] arrival counters
  const int* perm;           // [K] or null: row k of W multiplies x[perm[k]] (act-order, q_perm)
  const half* norm_weight;   // [K] or null: x is RMS-normalized first (the layer's input norm, folded in)
  const float* x_sums;       // x_mode RESIDUAL_SUMS: [M, K]; GLU_SUMS: [M, 2K] (gate/up tiles interleaved)
  half* x_out;               // RESIDUAL_SUMS with norm_weight, or null: receives the rows x + x_sums (fp16)
  float* zero0;              // [zero0_n] or null: zeroed after griddepcontrol.wait
  float* zero1;              // [zero1_n] or null
  int N, K, group_size, zero_offset, epilogue, rows_per_warp, x_mode, zero0_n, zero1_n;
  float norm_eps;
};

namespace {

using namespace q4;

enum Epilogue { STORE = 0, ADD = 1, SILU_MUL = 2, SUMS = 3 };
enum XMode { X_PLAIN = 0, RESIDUAL_SUMS = 1, GLU_SUMS = 2 };


// Row m's input value k (before the norm), rounded to fp16: x, x + sums, or SiLU(gate) * up from gate/up sums
// in tiles of TILE_N columns (the SILU_MUL epilogue's order and rounding).
__device__ __forceinline__ float x_value(const half* __restrict__ x, const float* sums, int x_mode, int K, int m,
                                         int k) {
  if (x_mode == GLU_SUMS) {
    const float* gate = sums + (size_t)m * 2 * K + (k / TILE_N) * 2 * TILE_N + k % TILE_N;
    const float g = gate[0], u = gate[TILE_N];
    return __half2float(__float2half(g / (1.f + __expf(-g)) * u));
  }
  const float v = __half2float(x[(size_t)m * K + k]);
  return x_mode == RESIDUAL_SUMS ? __half2float(__float2half(v + sums[(size_t)m * K + k])) : v;
}

// Offsets (bytes) into the kernel's dynamic shared memory. The row cache: where the rows are read whole (for
// the norm) and then gathered through perm, if it fits in 32 KB; without perm, reading x again is as quick.
struct SmemLayout {
  int source, weight, cache, total;
  bool cached;
};

__host__ __device__ __forceinline__ SmemLayout smem_layout(int M, int block_rows, int K, bool norm, bool perm) {
  SmemLayout l;
  l.source = M * block_rows * (int)sizeof(half);
  l.weight = l.source + block_rows * (int)sizeof(unsigned short);
  l.cache = (l.weight + block_rows * (int)sizeof(half) + 15) / 16 * 16;
  l.cached = norm && perm && M * K * (int)sizeof(half) <= 32768;
  l.total = l.cache + (l.cached ? M * K * (int)sizeof(half) : 0);
  return l;
}

// Zeroes n floats (n a multiple of 4, 16-byte aligned), spread over the grid's blocks.
__device__ __forceinline__ void zero_fill(float* p, int n) {
  if (!p) return;
  const int blocks = gridDim.x * gridDim.y, block = blockIdx.y * gridDim.x + blockIdx.x;
  for (int i = block * blockDim.x + threadIdx.x; i < n / 4; i += blocks * blockDim.x) {
    reinterpret_cast<float4*>(p)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

template <int M, int WARPS, int DEPTH>
__global__ void __launch_bounds__(WARPS * 32) q4_gemv_kernel(const Q4GemvArgs args) {
  const half* __restrict__ x = args.x;
  const uint32_t* __restrict__ qweight = args.qweight;
  const half* __restrict__ scales = args.scales;
  const uint32_t* __restrict__ qzeros = args.qzeros;
  half* out = args.out;
  const half* residual = args.residual;
  float* __restrict__ ws = args.ws;
  int* __restrict__ counters = args.counters;
  const int* __restrict__ perm = args.perm;
  const half* __restrict__ norm_weight = args.norm_weight;
  const float* x_sums = args.x_sums;
  const int N = args.N, K = args.K, group_size = args.group_size, zero_offset = args.zero_offset;
  const int epilogue = args.epilogue, rows_per_warp = args.rows_per_warp, x_mode = args.x_mode;
  // Dynamic shared memory (smem_layout): the x pairs of the block's rows (M x rows / 2 half2), the source
  // row of x for each of its rows and their norm weights, and with row_cache the full rows of x.
  extern __shared__ uint4 smem[];
  __shared__ float red[WARPS][M][TILE_N];
  __shared__ float inv_rms[M];
  __shared__ int is_last;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int tile = blockIdx.x;
  const int block_rows = WARPS * rows_per_warp;
  const int k_block = blockIdx.y * block_rows;
  const int col = tile * TILE_N + lane * 4;
  const int k_warp = k_block + warp * rows_per_warp;
  const int n_chunks = col < N ? max(0, min(rows_per_warp, K - k_warp)) / CHUNK : 0;

  // Weight loads first: they do not depend on the previous kernel, so under programmatic dependent
  // launch they overlap its tail. Everything it writes (x, residual, and the memory of out) is touched
  // only after griddepcontrol.wait.
#if __CUDA_ARCH__ >= 900  // the next kernel may launch now: it too only loads weights before its wait
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  Chunk ring[DEPTH];
#pragma unroll
  for (int d = 0; d < DEPTH; ++d) {
    if (d < n_chunks) load_chunk(ring[d], qweight, scales, qzeros, k_warp + d * CHUNK, col, N, group_size);
  }
  // So do the rows of x that the block's rows multiply (through perm) and their norm weights: looked up
  // now, so that after the wait x is read in one round trip.
  const SmemLayout layout = smem_layout(M, block_rows, K, norm_weight != nullptr, perm != nullptr);
  half2* xs = reinterpret_cast<half2*>(smem);
  unsigned short* source = reinterpret_cast<unsigned short*>(reinterpret_cast<char*>(smem) + layout.source);
  half* row_weight = reinterpret_cast<half*>(reinterpret_cast<char*>(smem) + layout.weight);
  half* row_cache = layout.cached ? reinterpret_cast<half*>(reinterpret_cast<char*>(smem) + layout.cache) : nullptr;
  for (int r = threadIdx.x; r < block_rows; r += WARPS * 32) {
    const int k = k_block + r;
    const int src = k < K ? (perm ? perm[k] : k) : 0;
    source[r] = static_cast<unsigned short>(src);
    row_weight[r] = norm_weight && k < K ? norm_weight[src] : __float2half(1.f);
  }
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  zero_fill(args.zero0, args.zero0_n);
  zero_fill(args.zero1, args.zero1_n);

  if (norm_weight) {  // (its __syncthreads also publish the row table)
    rms_of_rows<M, WARPS>(x, x_mode == RESIDUAL_SUMS ? x_sums : nullptr, args.x_out, row_cache, K, args.norm_eps,
                          inv_rms);
  } else {
    __syncthreads();
  }

  const int pairs_per_m = block_rows / 2;
  for (int p = threadIdx.x; p < M * pairs_per_m; p += WARPS * 32) {
    const int m = p / pairs_per_m, q = p % pairs_per_m;
    const int j = q % 4;
    const int r = (q / 4) * 8 + j;  // the pair's rows: r and r + 4
    float lo = 0.f, hi = 0.f;
    if (k_block + r < K) {  // (then r + 4 too: K is a multiple of 32)
      const float f = (j & 1) ? 1.f / 256.f : 1.f / 16.f;
      const int k_lo = source[r], k_hi = source[r + 4];
      if (row_cache) {
        lo = __half2float(row_cache[(size_t)m * K + k_lo]);
        hi = __half2float(row_cache[(size_t)m * K + k_hi]);
      } else {
        lo = x_value(x, x_sums, x_mode, K, m, k_lo);
        hi = x_value(x, x_sums, x_mode, K, m, k_hi);
      }
      if (norm_weight) {  // RMSNorm's output, rounded to fp16 as the separate kernel would store it
        lo = __half2float(__float2half(lo * inv_rms[m] * __half2float(row_weight[r])));
        hi = __half2float(__float2half(hi * inv_rms[m] * __half2float(row_weight[r + 4])));
      }
      lo *= f;
      hi *= f;
    }
    xs[p] = __floats2half2_rn(lo, hi);
  }
  __syncthreads();

  float acc[M][4];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[m][c] = 0.f;

  const uint4* xw = smem + warp * (rows_per_warp / 8);  // this warp's rows, 4 pairs per uint4
  for (int c0 = 0; c0 < n_chunks; c0 += DEPTH) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      const int ch = c0 + d;
      if (ch < n_chunks) {
        compute_chunk<M>(ring[d], xw + ch * (CHUNK / 8), zero_offset, acc, pairs_per_m);
        if (ch + DEPTH < n_chunks) {
          load_chunk(ring[d], qweight, scales, qzeros, k_warp + (ch + DEPTH) * CHUNK, col, N, group_size);
        }
      }
    }
  }

#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) red[warp][m][lane * 4 + c] = acc[m][c];
  __syncthreads();

  const bool direct = gridDim.y == 1 && (epilogue == STORE || epilogue == ADD);
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
  if (direct || epilogue == SUMS) return;

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

template <int M, int WARPS, int DEPTH>
cudaError_t launch(const Q4GemvArgs& args, bool pdl, cudaStream_t stream) {
  const int block_rows = WARPS * args.rows_per_warp;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3((args.N + TILE_N - 1) / TILE_N, (args.K + block_rows - 1) / block_rows);
  config.blockDim = dim3(WARPS * 32);
  config.dynamicSmemBytes = smem_layout(M, block_rows, args.K, args.norm_weight != nullptr, args.perm != nullptr).total;
  config.stream = stream;
  const cudaError_t rc = allow_dynamic_smem<q4_gemv_kernel<M, WARPS, DEPTH>>(config.dynamicSmemBytes);
  if (rc != cudaSuccess) return rc;
  return launch_kernel(config, pdl, q4_gemv_kernel<M, WARPS, DEPTH>, args);
}

template <int M, int WARPS>
cudaError_t launch_depth(const Q4GemvArgs& args, int depth, bool pdl, cudaStream_t stream) {
  switch (depth) {
    case 2: return launch<M, WARPS, 2>(args, pdl, stream);
    case 4: return launch<M, WARPS, 4>(args, pdl, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <int M>
cudaError_t launch_warps(const Q4GemvArgs& args, int warps, int depth, bool pdl, cudaStream_t stream) {
  switch (warps) {
    case 4: return launch_depth<M, 4>(args, depth, pdl, stream);
    case 8: return launch_depth<M, 8>(args, depth, pdl, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" {

// Returns 0, -1 for unsupported arguments, or a CUDA error code (launch errors only; the kernel is
// asynchronous). rows_per_warp: a multiple of 32 with M * warps * rows_per_warp <= 16384. ws: fp32
// [M, N] and counters: int32 [ceil(N / 128)], both zero before the first call; the kernel leaves them
// zero, except with SUMS, where ws holds the result. For SILU_MUL, out is [M, N / 2] and N a multiple of
// 256; for GLU_SUMS, K a multiple of 128. pdl: launch as a programmatic dependent of the previous kernel in
// the stream (Hopper and later).
int q4_gemv(const Q4GemvArgs* args, int M, int warps, int depth, int pdl, void* stream) {
  const Q4GemvArgs& a = *args;
  if (a.N % 8 || a.K % 32 || a.group_size % 32 || a.group_size <= 0) return -1;
  if (a.epilogue == SILU_MUL && a.N % (2 * TILE_N)) return -1;
  if (a.epilogue < STORE || a.epilogue > SUMS || a.x_mode < X_PLAIN || a.x_mode > GLU_SUMS) return -1;
  if (a.x_mode != X_PLAIN && !a.x_sums) return -1;
  if (a.x_mode == GLU_SUMS && (a.K % TILE_N || a.norm_weight)) return -1;
  if (a.x_out && (a.x_mode != RESIDUAL_SUMS || !a.norm_weight)) return -1;
  if ((a.zero0 && a.zero0_n % 4) || (a.zero1 && a.zero1_n % 4)) return -1;
  if (a.rows_per_warp % CHUNK || a.rows_per_warp <= 0 || (size_t)M * warps * a.rows_per_warp > 16384) return -1;
  if (a.K > 65536) return -1;  // the row table holds 16-bit row numbers
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t rc;
  switch (M) {
    case 1: rc = launch_warps<1>(a, warps, depth, pdl, s); break;
    case 2: rc = launch_warps<2>(a, warps, depth, pdl, s); break;
    case 3: rc = launch_warps<3>(a, warps, depth, pdl, s); break;
    case 4: rc = launch_warps<4>(a, warps, depth, pdl, s); break;
    default: return -1;
  }
  return rc == cudaErrorInvalidValue ? -1 : static_cast<int>(rc);
}

int q4_tile_n() { return TILE_N; }

}
