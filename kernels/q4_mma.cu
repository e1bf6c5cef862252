// 4-bit GPTQ matmul on tensor cores for a few rows (the batched decode step: 2 to 64 sequences).
//
// y[M, N] = x[M, K] @ W, W in the GPTQ layout as the exllama backend keeps it: qweight [K/8, N] int32 (row k
// in bits 4*(k%8) of word k/8), scales [G, N] fp16, qzeros [G, N/8] int32, groups contiguous runs of
// group_size rows (a multiple of 32; act-order checkpoints are reordered at load and x is gathered
// through perm). No copy of the weights in another layout: the GEMV reads the same tensors.
//
// The weights are the mma's A operand and x its B operand (y^T = W^T x^T), so mma.m16n8k16's 16 rows are
// 16 output columns and its 8 columns are 8 rows of x: a batch of 8 wastes nothing, a batch of 64 is 8
// mmas per weight tile. The trick that makes the GPTQ layout an mma fragment without any shuffle: the
// reduction index k may be assigned to the mma's k slots in any order, as long as A and B agree. Lane
// (g = lane / 4, q = lane % 4) holds A's rows g and g + 8 at k slots 2q, 2q+1, 2q+8, 2q+9 and B's column g
// at the same slots. In a step of 32 rows of K (4 word rows, two k16 mmas) lane q takes word row q, whose
// 8 nibbles are its 4 slots in each of the two mmas: slots (2q, 2q+1, 2q+8, 2q+9) are nibbles (0, 4, 1, 5)
// in the first mma and (2, 6, 3, 7) in the second. Those pairs are what the fp16 exponent trick gives:
// (w & 0x000F000F) | 0x64006400 is the half2 (1024 + n0, 1024 + n4), (w & 0x00F000F0) | 0x64006400 is
// (1024 + 16 n1, 1024 + 16 n5), and the same of w >> 8 gives (n2, n6) and (n3, n7): one lop3 a pair. x is staged in shared memory as it is (cp.async, all in
// flight at once); one 16-byte shared load is a lane's 8 rows of K, and byte permutes pair them as
// (0, 4), (1, 5), (2, 6), (3, 7): its B fragments for both mmas. A lane loads one 16-byte word of 4 adjacent columns per word row: columns 4g .. 4g + 3 of a
// 32-column slab; the warp's 8 g's cover the slab, its 4 q's the step's 4 word rows (four full 128-byte
// lines). Column 4g + 2h + r is row g + 8r of the slab's mma tile h.
//
// Weights are dequantized exactly: h - (1024 + z), or h / 16 - (64 + z) in one hfma2, is n - z, with
// the two half2 constants of each column's zero made once a group, not every step. Up to 16 rows of x the
// mma takes n - z, each group's fp32 sums are kept apart and scaled once when the group ends (fold()):
// cheaper than scaling every weight pair while an A fragment serves at most two mmas; from 17 rows the
// weight is (n - z) * s in fp16, rounded once as the dequantized fp16 weight is. Accumulation is fp32 (the
// mma's accumulators).
//
// At these sizes the kernel is bound by latencies (x staged before the loop, four warps a scheduler waiting
// on their loads, the split-K tail), not by DRAM's bandwidth: called again on weights it has just read it is
// barely faster (benchmarks/experiments/mma_sweep.py; RESULTS.md's log). Prefetching the weights into L2 some
// steps ahead of the loads (prefetch) shortens those waits on the wider shapes.
//
// A block is 4 warps: warps_n side by side over columns (a warp's slab: COLS = 32 or 64 columns), the
// others splitting the block's rows of K into contiguous runs of steps, DEPTH steps' loads in flight per
// warp. x is staged once per block, so wider blocks read less of it from L2. The grid's second dimension
// splits K: each block sums its warps in shared memory and adds the sums to an fp32 workspace [row][column]
// by vector atomics (in an order that varies from call to call, and so may a result's last bits); the last
// block of a column tile to arrive (an arrival counter says which) stores fp16, and zeroes the workspace
// and the counter. Weight loads of the first DEPTH steps
// are issued before griddepcontrol.wait (programmatic dependent launch), as in the GEMV.

#include <cuda_fp16.h>
#include <cstdint>

#include "launch.cuh"

// Outside the anonymous namespace: q4_mma() below is exported with it.
struct Q4MmaArgs {  // mirrored by q4_mma.py's _Args
  const half* x;             // [M, K]
  const uint32_t* qweight;   // [K / 8, N]
  const half* scales;        // [G, N]
  const uint32_t* qzeros;    // [G, N / 8]
  const int* perm;           // [K] or null: row k of W multiplies x[perm[k]]
  half* out;                 // [M, N]
  float* ws;                 // [M, N] fp32 sums, zero before and after each call (not used with one split)
  int* counters;             // [column tiles] arrival counters, zero before and after each call
  int M, N, K, group_size, zero_offset;
  int steps_per_block;  // a step: 32 rows of K
  int warps_n;          // 1, 2 or 4: the block's warps side by side over columns; the rest split its K
  int prefetch;         // steps ahead of the loads that a warp's weights are prefetched into L2 (0: none)
};

namespace {

constexpr int WARPS = 4;
constexpr int STEP = 32;  // rows of K per step

__device__ __forceinline__ half2 as_half2(uint32_t v) { return *reinterpret_cast<half2*>(&v); }
__device__ __forceinline__ uint32_t as_u32(half2 v) { return *reinterpret_cast<uint32_t*>(&v); }

// (a & 0x000F000F) | 0x64006400 in one instruction: the half2 (1024 + low nibble, 1024 + nibble 4).
__device__ __forceinline__ uint32_t low_pair(uint32_t a) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "n"(0x000F000F), "r"(0x64006400));
  return r;
}

__device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                    uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// A step's loads for a lane: its word row of 4 columns in each 32-column slab; on the first step of a group
// (or of the warp's run), also the group's scales and zeros of those columns.
template <int CT>
struct Step {
  uint4 words[CT];
  uint2 scales[CT];
  uint32_t zeros[CT];  // the zero word holding the 4 columns' nibbles (shifted where used: the load stays in flight)
  bool fresh;          // scales and zeros loaded: the step starts a group
};

// Where a lane's next step comes from: pointers advanced a step at a time (no index arithmetic in the loop),
// and the steps left in the current group.
template <int CT>
struct Loader {
  const uint4* words;    // the step's word row q, columns col0 .. col0 + 3 (slab l 8 * l further)
  const uint2* scales;   // the group's scales of those columns (slab l 8 * l further)
  const uint32_t* zeros; // the group's zero word of those columns (slab l 4 * l further)
  int n;                 // N: uint4s per step of word rows; N / 4 uint2s of scales and N / 8 words of zeros per group
  int shift;             // 4 * (col0 % 8): the columns' nibbles in the zero word
  int steps_per_group, group_left;
  int prefetch, prefetch_left;  // steps ahead prefetched into L2 (lanes g = 0: a 128-byte line a row and slab)
  bool fresh;
  bool in_range[CT];

  __device__ __forceinline__ Loader(const Q4MmaArgs& a, int first, int col0) {
    const int steps_per_group_ = a.group_size / STEP, group = first / steps_per_group_;
    n = a.N;
    words = reinterpret_cast<const uint4*>(a.qweight + ((size_t)first * (STEP / 8) + (threadIdx.x & 3)) * n + col0);
    scales = reinterpret_cast<const uint2*>(a.scales + (size_t)group * n + col0);
    zeros = a.qzeros + (size_t)group * (n / 8) + col0 / 8;
    shift = 4 * (col0 % 8);
    steps_per_group = steps_per_group_;
    group_left = steps_per_group_ - first % steps_per_group_;
    fresh = true;
#pragma unroll
    for (int l = 0; l < CT; ++l) in_range[l] = col0 + 32 * l < n;
    prefetch = (threadIdx.x & 28) == 0 ? a.prefetch : 0;
    prefetch_left = a.K / STEP - first - prefetch;
  }

  __device__ __forceinline__ void load(Step<CT>& s) {
    s.fresh = fresh;
#pragma unroll
    for (int l = 0; l < CT; ++l) {
      s.words[l] = in_range[l] ? __ldcs(words + 8 * l) : make_uint4(0, 0, 0, 0);
      if (fresh) {
        s.scales[l] = in_range[l] ? __ldg(scales + 8 * l) : make_uint2(0, 0);
        s.zeros[l] = in_range[l] ? __ldg(zeros + 4 * l) : 0;
      }
    }
    if (prefetch > 0 && prefetch_left-- > 0) {
#pragma unroll
      for (int l = 0; l < CT; ++l) {
        if (in_range[l]) asm volatile("prefetch.global.L2 [%0];" ::"l"(words + (size_t)prefetch * n + 8 * l));
      }
    }
    words += n;
    fresh = --group_left == 0;
    if (fresh) {
      group_left = steps_per_group;
      scales += n / 4;
      zeros += n / 8;
    }
  }
};

// A group's constants for a lane's 4 columns in each slab: its scale, and its zero as the two half2 that
// undo the exponent trick exactly: 1024 + z (subtracted from 1024 + n) and -(64 + z) (added to (1024 + 16n)
// / 16).
template <int CT>
struct GroupConsts {
  uint32_t low[CT][4], high[CT][4];
  half2 scale[CT][4];   // applied to the weights
  float fscale[CT][4];  // or to the group's sums (fold)

  __device__ __forceinline__ void set(const Step<CT>& s, int zero_offset, int shift) {
    const uint32_t low0 = 0x64006400u + 0x10001u * zero_offset, high0 = 0xD400D400u + 0x100010u * zero_offset;
#pragma unroll
    for (int l = 0; l < CT; ++l) {
      const half* sc = reinterpret_cast<const half*>(&s.scales[l]);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const uint32_t z = (s.zeros[l] >> (shift + 4 * c)) & 0xF;
        low[l][c] = low0 + 0x10001u * z;    // (1024 + z, 1024 + z)
        high[l][c] = high0 + 0x100010u * z;  // (-(64 + z), -(64 + z))
        scale[l][c] = __half2half2(sc[c]);
        fscale[l][c] = __half2float(sc[c]);
      }
    }
  }
};

// (a & 0x00F000F0) | 0x64006400: the half2 (1024 + 16 * nibble 1, 1024 + 16 * nibble 5).
__device__ __forceinline__ uint32_t high_pair(uint32_t a) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "n"(0x00F000F0), "r"(0x64006400));
  return r;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(selector));
  return r;
}

// acc[l][h][j]: slab l's mma tile h (columns 4g + 2h, 4g + 2h + 1) times rows 8j .. 8j + 7 of x. SCALED:
// the weights are (n - z) * s, else n - z (the group's sums are scaled once, by fold()).
template <int MT, int CT, bool SCALED>
__device__ __forceinline__ void compute_step(const Step<CT>& s, const GroupConsts<CT>& k, const uint4* xs,
                                             int x_stride16, float (&acc)[CT][2][MT][4]) {
  uint4 xv[MT];  // B fragments of rows 8j + g: .x .y the first mma's (x0, x4), (x1, x5); .z .w the second's
#pragma unroll
  for (int j = 0; j < MT; ++j) {
    const uint4 v = xs[(size_t)(8 * j) * x_stride16];  // x0 .. x7 of the lane's word row
    xv[j] = make_uint4(prmt(v.x, v.z, 0x5410), prmt(v.x, v.z, 0x7632), prmt(v.y, v.w, 0x5410),
                       prmt(v.y, v.w, 0x7632));
  }
  const half2 sixteenth = __float2half2_rn(1.f / 16);
#pragma unroll
  for (int l = 0; l < CT; ++l) {
    const uint32_t words[4] = {s.words[l].x, s.words[l].y, s.words[l].z, s.words[l].w};
    uint32_t frag[2][4][2];  // [mma][column c][first/second slot pair]: dequantized half2
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const half2 low = as_half2(k.low[l][c]), high = as_half2(k.high[l][c]);
      const uint32_t w = words[c], w8 = w >> 8;
      half2 v[2][2] = {{__hsub2(as_half2(low_pair(w)), low), __hfma2(as_half2(high_pair(w)), sixteenth, high)},
                       {__hsub2(as_half2(low_pair(w8)), low), __hfma2(as_half2(high_pair(w8)), sixteenth, high)}};
#pragma unroll
      for (int kk = 0; kk < 2; ++kk)  // (n0, n4), (n1, n5); (n2, n6), (n3, n7)
#pragma unroll
        for (int p = 0; p < 2; ++p) frag[kk][c][p] = as_u32(SCALED ? __hmul2(v[kk][p], k.scale[l][c]) : v[kk][p]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        // A: row g (column 2h) then row g + 8 (column 2h + 1), slots (2q, 2q+1) then (2q+8, 2q+9).
        const uint32_t a0 = frag[kk][2 * h][0], a1 = frag[kk][2 * h + 1][0];
        const uint32_t a2 = frag[kk][2 * h][1], a3 = frag[kk][2 * h + 1][1];
#pragma unroll
        for (int j = 0; j < MT; ++j) {
          const uint32_t b0 = kk == 0 ? xv[j].x : xv[j].z, b1 = kk == 0 ? xv[j].y : xv[j].w;
          mma(acc[l][h][j], a0, a1, a2, a3, b0, b1);
        }
      }
    }
  }
}

// f(l, h, j, c) for each of a lane's sums: slab l, mma tile h, rows 8j .., accumulator c.
template <int MT, int CT, class F>
__device__ __forceinline__ void each_sum(F&& f) {
#pragma unroll
  for (int l = 0; l < CT; ++l)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) f(l, h, j, c);
}

// acc += part * the group's scales (a column's: 4g + 2h + c / 2 of slab l), and part = 0 for the next group.
template <int MT, int CT>
__device__ __forceinline__ void fold(float (&acc)[CT][2][MT][4], float (&part)[CT][2][MT][4],
                                     const GroupConsts<CT>& k) {
  each_sum<MT, CT>([&](int l, int h, int j, int c) {
    acc[l][h][j][c] = fmaf(part[l][h][j][c], k.fscale[l][2 * h + c / 2], acc[l][h][j][c]);
    part[l][h][j][c] = 0.f;
  });
}

__device__ __forceinline__ void store4(half* out, float4 v) {  // 8-byte aligned: n is a multiple of 4
  uint2 h;
  h.x = as_u32(__floats2half2_rn(v.x, v.y));
  h.y = as_u32(__floats2half2_rn(v.z, v.w));
  *reinterpret_cast<uint2*>(out) = h;
}

__device__ __forceinline__ void add4(float* ws, float4 v) {
#if __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(ws), v);
#else
  atomicAdd(ws, v.x);
  atomicAdd(ws + 1, v.y);
  atomicAdd(ws + 2, v.z);
  atomicAdd(ws + 3, v.w);
#endif
}

__device__ __forceinline__ void copy16_async(void* smem_dst, const void* src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}

// Halves per staged row: a row starts 64 bytes off a 128-byte line from the last, so that the 8 lanes of a
// 16-byte shared load phase (rows g and g + 1, 4 lanes each) hit all 32 banks.
__host__ __device__ __forceinline__ int x_stride(int steps_per_block) {
  return steps_per_block * STEP + (steps_per_block % 2 ? 0 : 32);
}

template <int MT, int CT, int DEPTH>
__global__ void __launch_bounds__(WARPS * 32) q4_mma_kernel(const Q4MmaArgs a) {
  constexpr int COLS = 32 * CT, ROWS = 8 * MT;
  extern __shared__ uint4 smem[];
  __shared__ int is_last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int tile = blockIdx.x, split = blockIdx.y;
  const int N = a.N, K = a.K, M = a.M;
  const int warps_n = a.warps_n, warps_k = WARPS / warps_n, block_cols = warps_n * COLS;
  const int warp_n = warp % warps_n, warp_k = warp / warps_n;
  const int first_step = split * a.steps_per_block;
  const int block_steps = min(a.steps_per_block, K / STEP - first_step);
  const int per_warp = (block_steps + warps_k - 1) / warps_k;
  const int w_begin = min(warp_k * per_warp, block_steps);
  const int n_steps = min(w_begin + per_warp, block_steps) - w_begin;
  const int col0 = tile * block_cols + warp_n * COLS + 4 * g;

#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  Step<CT> ring[DEPTH];
  Loader<CT> loader(a, first_step + w_begin, col0);
#pragma unroll
  for (int d = 0; d < DEPTH; ++d) {
    if (d < n_steps) loader.load(ring[d]);
  }
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif

  // The rows of x (past M: whatever the memory holds, which only reaches the columns of rows never stored),
  // the block's rows of K. Without perm all copies are in flight at once (cp.async), beside the weights'.
  const int stride = x_stride(a.steps_per_block);
  half* xs = reinterpret_cast<half*>(smem);
  const int k0 = first_step * STEP, block_k = block_steps * STEP;
  if (a.perm == nullptr) {
    for (int r = threadIdx.x; r < block_k / 8; r += WARPS * 32) {
      for (int m = 0; m < M; ++m) copy16_async(xs + (size_t)m * stride + 8 * r, a.x + (size_t)m * K + k0 + 8 * r);
    }
    asm volatile("cp.async.commit_group;\ncp.async.wait_all;" ::: "memory");
  } else {  // one lookup of perm per row of K, then the x rows' values at it
    for (int k = threadIdx.x; k < block_k; k += WARPS * 32) {
      const int src = a.perm[k0 + k];
#pragma unroll 8
      for (int m = 0; m < M; ++m) xs[(size_t)m * stride + k] = a.x[(size_t)m * K + src];
    }
  }
  __syncthreads();

  // Few rows: the weights are n - z, and a group's sums are scaled once when it ends (fewer instructions
  // than scaling every weight while an A fragment serves at most two mmas).
  constexpr bool FOLD = MT <= 2;
  float acc[CT][2][MT][4] = {};
  float part[CT][2][MT][4] = {};  // FOLD: the current group's unscaled sums
  GroupConsts<CT> consts;

  // This lane's B fragments: row g of x, its word row's 8 rows of K in the step.
  const uint4* xl = reinterpret_cast<const uint4*>(xs + (size_t)g * stride + w_begin * STEP + 8 * q);
  const int x_stride16 = stride / 8;
  for (int s0 = 0; s0 < n_steps; s0 += DEPTH) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      const int s = s0 + d;
      if (s < n_steps) {
        if (ring[d].fresh) {
          if (FOLD && s > 0) fold(acc, part, consts);
          consts.set(ring[d], a.zero_offset, loader.shift);
        }
        compute_step<MT, CT, !FOLD>(ring[d], consts, xl + s * (STEP / 8), x_stride16, FOLD ? part : acc);
        if (s + DEPTH < n_steps) loader.load(ring[d]);
      }
    }
  }

  if (FOLD && n_steps > 0) fold(acc, part, consts);

  // The warps' sums, in the shared memory x was staged in: red[warp][row][column]; warp = warp_k * warps_n +
  // warp_n.
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem);
  each_sum<MT, CT>([&](int l, int h, int j, int c) {
    const int row = 8 * j + 2 * q + (c & 1), column = 32 * l + 4 * g + 2 * h + (c >> 1);
    red[(warp * ROWS + row) * COLS + column] = acc[l][h][j][c];
  });
  __syncthreads();

  // Four adjacent columns per thread: the block's sums stored (one split) or added into the fp32 workspace.
  const bool direct = gridDim.y == 1;
  const int quads = M * block_cols / 4;
  for (int i = threadIdx.x; i < quads; i += WARPS * 32) {
    const int row = i / (block_cols / 4), column = 4 * (i % (block_cols / 4)), n = tile * block_cols + column;
    if (n >= N) continue;  // (N is a multiple of 8: a quad is in or out whole)
    const int wn = column / COLS, c = column % COLS;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int wk = 0; wk < warps_k; ++wk) {
      const float4 p = *reinterpret_cast<const float4*>(red + ((wk * warps_n + wn) * ROWS + row) * COLS + c);
      v.x += p.x;
      v.y += p.y;
      v.z += p.z;
      v.w += p.w;
    }
    if (direct) {
      store4(a.out + (size_t)row * N + n, v);
    } else {
      add4(a.ws + (size_t)row * N + n, v);
    }
  }
  if (direct) return;

  // The last block of the tile to arrive stores the sums as fp16 and zeroes them for the next call; its
  // loads are issued UNROLL at a time, since this tail is on every call's critical path.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(a.counters + tile, 1) == (int)gridDim.y - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  constexpr int UNROLL = 4;
  for (int i0 = threadIdx.x; i0 < quads; i0 += UNROLL * WARPS * 32) {
    float4 v[UNROLL];
    size_t at[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int i = i0 + u * WARPS * 32;
      const int row = i / (block_cols / 4), n = tile * block_cols + 4 * (i % (block_cols / 4));
      at[u] = i < quads && n < N ? (size_t)row * N + n : SIZE_MAX;
      if (at[u] != SIZE_MAX) v[u] = __ldcg(reinterpret_cast<const float4*>(a.ws + at[u]));
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (at[u] == SIZE_MAX) continue;
      store4(a.out + at[u], v[u]);
      __stcg(reinterpret_cast<float4*>(a.ws + at[u]), make_float4(0.f, 0.f, 0.f, 0.f));
    }
  }
  if (threadIdx.x == 0) a.counters[tile] = 0;
}

// x staged (rows of the instance, the block's rows of K), then the same memory holds the warps' sums.
size_t smem_bytes(int rows, int cols, int steps_per_block) {
  const size_t staged = (size_t)rows * x_stride(steps_per_block) * sizeof(half);
  const size_t reduced = (size_t)WARPS * rows * cols * sizeof(float);
  return staged > reduced ? staged : reduced;
}

template <int MT, int CT, int DEPTH>
cudaError_t launch(const Q4MmaArgs& a, bool pdl, cudaStream_t stream) {
  const int steps = a.K / STEP;
  cudaLaunchConfig_t config = {};
  const int block_cols = 32 * CT * a.warps_n;
  config.gridDim = dim3((a.N + block_cols - 1) / block_cols, (steps + a.steps_per_block - 1) / a.steps_per_block);
  config.blockDim = dim3(WARPS * 32);
  config.dynamicSmemBytes = smem_bytes(8 * MT, 32 * CT, a.steps_per_block);
  config.stream = stream;
  const cudaError_t rc = allow_dynamic_smem<q4_mma_kernel<MT, CT, DEPTH>>(config.dynamicSmemBytes);
  if (rc != cudaSuccess) return rc;
  return launch_kernel(config, pdl, q4_mma_kernel<MT, CT, DEPTH>, a);
}

template <int MT, int CT>
cudaError_t launch_depth(const Q4MmaArgs& a, int depth, bool pdl, cudaStream_t stream) {
  switch (depth) {
    case 2: return launch<MT, CT, 2>(a, pdl, stream);
    case 4: return launch<MT, CT, 4>(a, pdl, stream);
    case 8: return launch<MT, CT, 8>(a, pdl, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <int MT>
cudaError_t launch_cols(const Q4MmaArgs& a, int cols, int depth, bool pdl, cudaStream_t stream) {
  switch (cols) {
    case 32: return launch_depth<MT, 1>(a, depth, pdl, stream);
    case 64: return MT <= 4 ? launch_depth<MT, MT <= 4 ? 2 : 1>(a, depth, pdl, stream) : cudaErrorInvalidValue;
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" {

// Returns 0, -1 for unsupported arguments, or a CUDA error code (launch errors only; the kernel is
// asynchronous). M: 1 to 64 rows; cols: 32 or 64 columns per block (64 for at most 32 rows); depth: 2, 4 or
// 8 steps in flight per warp; steps_per_block: the rows of K per block / 32, which sets the split of K. With
// more than one split, ws holds [M, N] floats and counters ceil(N / (cols * warps_n)) ints, both zero; the
// kernel leaves them zero.
int q4_mma(const Q4MmaArgs* args, int cols, int depth, int pdl, void* stream) {
  const Q4MmaArgs& a = *args;
  if (a.M < 1 || a.M > 64 || a.N % 8 || a.K % STEP || a.group_size % STEP || a.group_size <= 0) return -1;
  if (a.steps_per_block <= 0 || (a.warps_n != 1 && a.warps_n != 2 && a.warps_n != 4)) return -1;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t rc;
  const int mt = (a.M + 7) / 8;
  switch (mt) {
    case 1: rc = launch_cols<1>(a, cols, depth, pdl, s); break;
    case 2: rc = launch_cols<2>(a, cols, depth, pdl, s); break;
    case 3: case 4: rc = launch_cols<4>(a, cols, depth, pdl, s); break;
    default: rc = launch_cols<8>(a, cols, depth, pdl, s); break;
  }
  return rc == cudaErrorInvalidValue ? -1 : static_cast<int>(rc);
}

// The dynamic shared memory of a launch: rows 8, 16, 32 or 64 (the instance's), cols 32 or 64.
long q4_mma_smem_bytes(int rows, int cols, int steps_per_block) {
  return static_cast<long>(smem_bytes(rows, cols, steps_per_block));
}

}
