// Attention for one decoded token (batch 1), with the rotary embedding and the KV cache write folded in.
//
// Inputs are a layer's q, k and v projections of the new token (the fused qkv GEMV's output, un-rotated).
// A block owns one kv head (its G = n_heads / n_kv_heads q heads, as repeat_kv groups them; G is a template
// parameter) and one of `splits` equal parts of the keys it attends to: positions [lo, pos], lo = pos -
// window + 1 for a sliding window, else 0. Every block rotates q (folding in 1 / sqrt(D) and log2(e), for
// exp2) and the new k itself; the block whose part holds pos writes the rotated k and v into the cache and
// takes them from shared memory, so no block reads a cache slot another block of the same launch writes.
//
// Keys are taken in chunks of 128 with an online softmax. A chunk's k and v are loaded into registers at
// once (thread t: key t's whole row of k; warp w: lane-sized slices of the v rows of keys 32w..32w+31), then
// the scores (a thread per key against the group's q heads, no shuffles), the chunk's max and sum per head
// (a warp per head), and the probabilities times v (a lane per D / 32 dimensions). With more than one split,
// each block stores its unnormalised output, max and sum to a workspace and the last block of a kv head (an
// arrival counter) combines them, so a call is one kernel.
//
// q, k and v come as fp16 vectors, or as the fp32 sums of a qkv GEMV launched without its finishing tail
// (q4_gemv.cu, epilogue SUMS), rounded to fp16 as that tail would have stored them.
//
// Launched as a programmatic dependent. The position, cos/sin and the cache's earlier slots are written
// before the previous kernel (the qkv GEMV) starts, so the first chunk's loads are issued before
// griddepcontrol.wait; q, k and v are read after it. launch_dependents comes first of all, so the o_proj
// GEMV streams its weights while this kernel runs.

#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

#include "launch.cuh"

struct DecodeAttentionArgs {  // mirrored by decode_attention.py's _Args
  const half* q;           // [Hq * D]
  const half* k;           // [Hkv * D]
  const half* v;           // [Hkv * D]
  const float* cos;        // [D], for this position, or [S, D] (rotary_stride)
  const float* sin;
  const int64_t* position; // [1]
  half* k_cache;           // [Hkv, S, D] (head stride cache_head_stride, position stride D)
  half* v_cache;
  half* out;               // [Hq * D]
  float* ws;               // [Hq, max_splits, D + 2]: partial output, max, sum
  int* counters;           // [Hkv], zero; left zero
  const float* qkv_sums;   // or null: q, k and v as fp32 [Hq * D + 2 * Hkv * D] (the qkv GEMV's unfinished
                           // split-K sums), rounded to fp16 here; q, k and v are then unused
  long long cache_head_stride;
  int rotary_stride;       // 0: cos and sin are [D], for this position; D: tables [S, D], row `position`
  int head_dim, n_heads, n_kv_heads, window, max_splits;
  float scale;             // 1 / sqrt(D)
};

namespace {

constexpr int WARPS = 4;
constexpr int CHUNK = WARPS * 32;  // keys per chunk: one per thread for the scores
constexpr int MAX_GROUP = 8;
constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ float2 h2f(uint32_t v) { return __half22float2(*reinterpret_cast<const half2*>(&v)); }

// Element i of q, k or v: from the fp16 vector, or from the fp32 sums (rounded to fp16).
__device__ __forceinline__ half input(const half* h, const float* sums, size_t i) {
  return sums ? __float2half(sums[i]) : h[i];
}

// A chunk's k and v in registers, its loads issued together: thread t holds key t's row of k (for the
// scores), warp w the v rows of keys 32w..32w+31 with lane l's D / 32 dimensions of each.
template <int D>
struct ChunkRegs {
  using VSlice = std::conditional_t<D == 128, uint2, uint32_t>;  // D / 32 halves
  uint4 k[D / 8];
  VSlice v[32];

  // Keys c0 .. c0 + n - 1 of the cache; the slot of `pos` is read too (and replaced after the wait).
  __device__ __forceinline__ void load(const half* k_cache, const half* v_cache, int c0, int n, int lane, int warp) {
    const int t = threadIdx.x;
    if (t < n) {
      const uint4* row = reinterpret_cast<const uint4*>(k_cache + (size_t)(c0 + t) * D);
#pragma unroll
      for (int c = 0; c < D / 8; ++c) k[c] = row[c];
    }
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int tv = warp * 32 + i;
      if (tv < n) v[i] = *reinterpret_cast<const VSlice*>(v_cache + (size_t)(c0 + tv) * D + lane * (D / 32));
    }
  }
};

template <int D, int G>
__global__ void __launch_bounds__(WARPS * 32) decode_attention_kernel(const DecodeAttentionArgs a) {
  constexpr int DPL = D / 32;  // dimensions per lane in the probabilities-times-v phase
  using VSlice = typename ChunkRegs<D>::VSlice;
  __shared__ float4 q_s[G][D / 4];  // rotated q, times 1 / sqrt(D) * log2(e)
  __shared__ __align__(16) half k_new[D], v_new[D];
  __shared__ float p_s[G][CHUNK];   // scores, then probabilities, of the chunk
  __shared__ float m_s[G], l_s[G], alpha_s[G];
  __shared__ float red[WARPS][G][D];
  __shared__ int is_last;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kvh = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  // The position, cos/sin and the cache's earlier slots were written before the previous kernel (the qkv
  // projection) started, so they are read before griddepcontrol.wait: the first chunk's loads overlap it.
  const int pos = static_cast<int>(a.position[0]);
  const int lo = a.window > 0 ? max(0, pos - a.window + 1) : 0;
  const int per = (pos + 1 - lo + splits - 1) / splits;
  const int j0 = lo + split * per, j1 = min(pos + 1, j0 + per);
  const half* k_cache = a.k_cache + (size_t)kvh * a.cache_head_stride;
  const half* v_cache = a.v_cache + (size_t)kvh * a.cache_head_stride;
#if __CUDA_ARCH__ >= 900  // the next kernel (o_proj) may launch now: it loads weights before its wait
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  ChunkRegs<D> regs;
  if (j0 < j1) regs.load(k_cache, v_cache, j0, min(CHUNK, j1 - j0), lane, warp);
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif

  // Rotary (half-rotation layout: d pairs with d + D/2), rounded to fp16 as the cache stores it.
  const float qscale = a.scale * LOG2E;
  const float* cos = a.cos + (size_t)pos * a.rotary_stride;
  const float* sin = a.sin + (size_t)pos * a.rotary_stride;
  for (int e = threadIdx.x; e < (G + 1) * (D / 2); e += WARPS * 32) {
    const int r = e / (D / 2), d = e % (D / 2);  // rows 0..G-1: q heads, row G: k
    const size_t i = (r < G ? (size_t)(kvh * G + r) * D : (size_t)kvh * D) + d;  // in q or in k
    const half* src = r < G ? a.q : a.k;
    const float* src32 = a.qkv_sums && r == G ? a.qkv_sums + (size_t)a.n_heads * D : a.qkv_sums;
    const float x1 = __half2float(input(src, src32, i)), x2 = __half2float(input(src, src32, i + D / 2));
    const half y1 = __float2half(x1 * cos[d] - x2 * sin[d]);
    const half y2 = __float2half(x2 * cos[d + D / 2] + x1 * sin[d + D / 2]);
    if (r < G) {
      reinterpret_cast<float*>(q_s[r])[d] = __half2float(y1) * qscale;
      reinterpret_cast<float*>(q_s[r])[d + D / 2] = __half2float(y2) * qscale;
    } else {
      k_new[d] = y1;
      k_new[d + D / 2] = y2;
    }
  }
  const float* v32 = a.qkv_sums ? a.qkv_sums + (size_t)(a.n_heads + a.n_kv_heads) * D : nullptr;
  for (int d = threadIdx.x; d < D; d += WARPS * 32) v_new[d] = input(a.v, v32, (size_t)kvh * D + d);
  if (threadIdx.x < G) {
    m_s[threadIdx.x] = -INFINITY;
    l_s[threadIdx.x] = 0.f;
  }
  __syncthreads();
  if (j0 <= pos && pos < j1) {  // this block's part holds the new token: it writes the cache slot
    for (int d = threadIdx.x; d < D; d += WARPS * 32) {
      a.k_cache[(size_t)kvh * a.cache_head_stride + (size_t)pos * D + d] = k_new[d];
      a.v_cache[(size_t)kvh * a.cache_head_stride + (size_t)pos * D + d] = v_new[d];
    }
  }

  float acc[G][DPL];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[g][i] = 0.f;

  for (int c0 = j0; c0 < j1; c0 += CHUNK) {
    const int n = min(CHUNK, j1 - c0);
    if (c0 != j0) regs.load(k_cache, v_cache, c0, n, lane, warp);
    // The new token's slot: from shared memory (the cache write above may not be visible yet).
    if (c0 + threadIdx.x == pos) {
#pragma unroll
      for (int c = 0; c < D / 8; ++c) regs.k[c] = reinterpret_cast<const uint4*>(k_new)[c];
    }
#pragma unroll
    for (int i = 0; i < 32; ++i)
      if (c0 + warp * 32 + i == pos) regs.v[i] = *reinterpret_cast<const VSlice*>(v_new + lane * DPL);
    // Scores: a thread per key, its whole row against every q head of the group.
    {
      const int t = threadIdx.x;
      float s[G][2];  // two partial sums per head: shorter dependency chains
#pragma unroll
      for (int g = 0; g < G; ++g) s[g][0] = s[g][1] = 0.f;
      if (t < n) {
#pragma unroll
        for (int c = 0; c < D / 8; ++c) {
          const uint4 w = regs.k[c];
          const float2 k01 = h2f(w.x), k23 = h2f(w.y), k45 = h2f(w.z), k67 = h2f(w.w);
#pragma unroll
          for (int g = 0; g < G; ++g) {
            const float4 qa = q_s[g][2 * c], qb = q_s[g][2 * c + 1];
            s[g][0] = fmaf(qa.x, k01.x, fmaf(qa.y, k01.y, fmaf(qa.z, k23.x, fmaf(qa.w, k23.y, s[g][0]))));
            s[g][1] = fmaf(qb.x, k45.x, fmaf(qb.y, k45.y, fmaf(qb.z, k67.x, fmaf(qb.w, k67.y, s[g][1]))));
          }
        }
      }
#pragma unroll
      for (int g = 0; g < G; ++g) p_s[g][t] = t < n ? s[g][0] + s[g][1] : -INFINITY;
    }
    __syncthreads();
    // Online softmax per head (a warp per head): the chunk's max, probabilities, sum, and the rescale factor.
    for (int g = warp; g < G; g += WARPS) {
      float v[CHUNK / 32], cmax = -INFINITY;
#pragma unroll
      for (int i = 0; i < CHUNK / 32; ++i) {
        v[i] = p_s[g][lane + 32 * i];
        cmax = fmaxf(cmax, v[i]);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, o));
      const float m_new = fmaxf(m_s[g], cmax);  // finite: the chunk holds at least one key
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < CHUNK / 32; ++i) {
        const float p = exp2f(v[i] - m_new);
        p_s[g][lane + 32 * i] = p;
        sum += p;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      __syncwarp();
      if (lane == 0) {
        const float alpha = exp2f(m_s[g] - m_new);
        alpha_s[g] = alpha;
        l_s[g] = l_s[g] * alpha + sum;
        m_s[g] = m_new;
      }
    }
    __syncthreads();
    // Probabilities times v: warp w over its 32 keys, each lane its D / 32 dimensions.
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float alpha = alpha_s[g];
#pragma unroll
      for (int i = 0; i < DPL; ++i) acc[g][i] *= alpha;
    }
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int t = warp * 32 + i;
      if (t < n) {
        float vf[DPL];
        if constexpr (DPL == 4) {
          const float2 v01 = h2f(regs.v[i].x), v23 = h2f(regs.v[i].y);
          vf[0] = v01.x; vf[1] = v01.y; vf[2] = v23.x; vf[3] = v23.y;
        } else {
          const float2 v01 = h2f(regs.v[i]);
          vf[0] = v01.x; vf[1] = v01.y;
        }
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float p = p_s[g][t];
#pragma unroll
          for (int d = 0; d < DPL; ++d) acc[g][d] = fmaf(p, vf[d], acc[g][d]);
        }
      }
    }
    __syncthreads();  // p_s is overwritten by the next chunk
  }

#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int i = 0; i < DPL; ++i) red[warp][g][lane * DPL + i] = acc[g][i];
  __syncthreads();
  const int stride = D + 2;
  for (int e = threadIdx.x; e < G * D; e += WARPS * 32) {
    const int g = e / D, d = e % D, h = kvh * G + g;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) o += red[w][g][d];
    if (splits == 1) {
      a.out[(size_t)h * D + d] = __float2half(o / l_s[g]);
    } else {
      float* slot = a.ws + ((size_t)h * a.max_splits + split) * stride;
      slot[d] = o;
      if (d == 0) {
        slot[D] = m_s[g];
        slot[D + 1] = l_s[g];
      }
    }
  }
  if (splits == 1) return;

  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(a.counters + kvh, 1) == splits - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int e = threadIdx.x; e < G * D; e += WARPS * 32) {
    const int g = e / D, d = e % D, h = kvh * G + g;
    const float* slots = a.ws + (size_t)h * a.max_splits * stride;
    float m = -INFINITY;
    for (int s = 0; s < splits; ++s) m = fmaxf(m, __ldcg(slots + s * stride + D));
    float o = 0.f, l = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float ms = __ldcg(slots + s * stride + D);
      if (ms == -INFINITY) continue;  // an empty part
      const float w = exp2f(ms - m);
      o = fmaf(w, __ldcg(slots + s * stride + d), o);
      l = fmaf(w, __ldcg(slots + s * stride + D + 1), l);
    }
    a.out[(size_t)h * D + d] = __float2half(o / l);
  }
  if (threadIdx.x == 0) a.counters[kvh] = 0;
}

template <int D, int G>
cudaError_t launch(const DecodeAttentionArgs& a, int splits, bool pdl, cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(a.n_kv_heads, splits);
  config.blockDim = dim3(WARPS * 32);
  config.stream = stream;
  return launch_kernel(config, pdl, decode_attention_kernel<D, G>, a);
}

template <int D>
int launch_group(const DecodeAttentionArgs& a, int splits, bool pdl, cudaStream_t s) {
  cudaError_t rc;
  switch (a.n_heads / a.n_kv_heads) {  // q heads per kv head
    case 1: rc = launch<D, 1>(a, splits, pdl, s); break;
    case 2: rc = launch<D, 2>(a, splits, pdl, s); break;
    case 3: rc = launch<D, 3>(a, splits, pdl, s); break;
    case 4: rc = launch<D, 4>(a, splits, pdl, s); break;
    case 5: rc = launch<D, 5>(a, splits, pdl, s); break;
    case 6: rc = launch<D, 6>(a, splits, pdl, s); break;
    case 7: rc = launch<D, 7>(a, splits, pdl, s); break;
    case 8: rc = launch<D, 8>(a, splits, pdl, s); break;
    default: return -1;
  }
  return static_cast<int>(rc);
}

}  // namespace

extern "C" {

// Returns 0, -1 for unsupported arguments (head dim other than 64 or 128, more than 8 q heads per kv head,
// splits outside 1..max_splits), or a CUDA launch error code. splits: the parts the keys are divided into
// (the caller picks it from the KV length it attends to). pdl: launch as a programmatic dependent.
int decode_attention(const DecodeAttentionArgs* args, int splits, int pdl, void* stream) {
  const DecodeAttentionArgs& a = *args;
  if (a.n_kv_heads <= 0 || a.n_heads % a.n_kv_heads || a.n_heads / a.n_kv_heads > MAX_GROUP) return -1;
  if (splits < 1 || splits > a.max_splits) return -1;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.head_dim) {
    case 64: return launch_group<64>(a, splits, pdl, s);
    case 128: return launch_group<128>(a, splits, pdl, s);
    default: return -1;
  }
}

}
