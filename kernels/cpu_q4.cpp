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
//
// The calls split their work over a pool of threads of this file's own (parallel_for below), not OpenMP's:
// libgomp keeps a team per calling thread and, once two exist (the app loads a model on one thread and its
// engine runs it on another), counts more threads than cores and lets its workers sleep after ~100 spins,
// so each call paid a wake-up: 47-67 µs a call from the second thread against 5-6 µs from the first,
// measured on 2 cores.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <unistd.h>
#include <atomic>
#include <chrono>
#include <cmath>
#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace {

// Fork-join over [begin, end) as at::parallel_for splits it (at most torch's thread count of contiguous
// chunks, none smaller than grain; the caller runs the first), by workers that spin for a while after each
// task before they block, so that a model's many short calls in a row find them awake. One caller at a time
// uses the workers; a call that finds them busy (another Python thread's) or comes from a forked child runs
// its range alone, on its own thread.
class WorkerPool {
 public:
  static WorkerPool& get() {
    static WorkerPool* pool = new WorkerPool();  // never destroyed: its threads live as long as the process
    return *pool;
  }

  void run(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
    const int64_t n = end - begin;
    if (n <= 0) return;
    const int64_t least = std::max<int64_t>(grain, 1);
    const int parts = static_cast<int>(std::min<int64_t>(at::get_num_threads(), (n + least - 1) / least));
    std::unique_lock<std::mutex> use(busy_, std::try_to_lock);
    if (parts <= 1 || !use.owns_lock() || getpid() != pid_) {
      f(begin, end);
      return;
    }
    grow(parts - 1);
    const int64_t chunk = (n + parts - 1) / parts;
    const std::function<void(int)> task = [&](int part) {
      const int64_t b = begin + part * chunk, e = std::min(end, b + chunk);
      if (b < e) f(b, e);
    };
    task_ = &task;
    helpers_ = parts - 1;
    failure_ = nullptr;
    remaining_.store(static_cast<int>(threads_.size()), std::memory_order_relaxed);  // each worker answers
    {
      std::lock_guard<std::mutex> lock(wake_mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    std::exception_ptr mine;
    try {
      task(0);
    } catch (...) {
      mine = std::current_exception();
    }
    for (int spins = 0; remaining_.load(std::memory_order_acquire) > 0; ++spins) pause_or_yield(spins);
    task_ = nullptr;
    if (mine) std::rethrow_exception(mine);
    if (failure_) std::rethrow_exception(failure_);
  }

 private:
  static constexpr auto kSpin = std::chrono::milliseconds(2);

  // Spinning on a busy machine (more runnable threads than cores) would keep the thread being waited for off
  // its core: after the first few microseconds every spin also offers the core to another thread.
  static void pause_or_yield(int spins) {
    _mm_pause();
    if (spins >= 256) std::this_thread::yield();
  }

  void grow(int workers) {
    while (static_cast<int>(threads_.size()) < workers) {
      const int id = static_cast<int>(threads_.size());
      threads_.emplace_back([this, id, seen = generation_.load()] { loop(id, seen); });
      threads_.back().detach();
    }
  }

  void loop(int id, uint64_t seen) {
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      for (int spins = 0; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        pause_or_yield(spins);
        if (spins % 256 == 255 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lock(wake_mutex_);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        }
      }
      ++seen;  // the caller waits for every worker before the next task: no task is missed or run twice
      if (id < helpers_) {  // else a task with fewer parts than workers
        try {
          (*task_)(id + 1);
        } catch (...) {
          std::lock_guard<std::mutex> lock(wake_mutex_);
          failure_ = std::current_exception();
        }
      }
      remaining_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  WorkerPool() : pid_(getpid()) {}

  const pid_t pid_;
  std::vector<std::thread> threads_;
  std::mutex busy_, wake_mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> remaining_{0};
  const std::function<void(int)>* task_ = nullptr;
  int helpers_ = 0;
  std::exception_ptr failure_;
};

template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  WorkerPool::get().run(begin, end, grain, f);
}

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
  parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
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
void tile_rows(const uint8_t* w, const uint16_t* s, const float* zs, float zero, const QuantizedRows& xr,
               int64_t m0, int64_t K, int64_t group, float* y, int64_t N, int64_t col) {
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
    const __m512 sg = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + g * kTile)));
    const __m512 zg = zs ? _mm512_loadu_ps(zs + g * kTile) : _mm512_mul_ps(sg, _mm512_set1_ps(zero));
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
void rows_of_tile(const uint8_t* w, const uint16_t* s, const float* zs, float zero, const QuantizedRows& xr,
                  int64_t m, int64_t m_end, int64_t K, int64_t group, float* y, int64_t N, int64_t col) {
  for (; m + MB <= m_end; m += MB) tile_rows<MB>(w, s, zs, zero, xr, m, K, group, y, N, col);
  if constexpr (MB > 1) {
    for (; m < m_end; ++m) tile_rows<1>(w, s, zs, zero, xr, m, K, group, y, N, col);
  }
}

}  // namespace

bool supported() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni"); }

namespace {

// A layer's packed weights: packed [N/16, K/8, 64] uint8; scales [N/16, groups, 16] fp16 (GPTQ stores them in
// fp16); the zero points as zero_scales (z * s, float32, same shape) or, where every group has the same z (a
// symmetric checkpoint), that one z: its z * s is formed from the scale, and the float32 table is not read.
struct Weights {
  const uint8_t* packed;
  const uint16_t* scales;
  const float* zero_scales;
  float zero;
  int64_t K, N, group;
};

Weights weights_of(const torch::Tensor& packed, const torch::Tensor& scales,
                   const c10::optional<torch::Tensor>& zero_scales, double zero, int64_t K, int64_t group) {
  TORCH_CHECK(supported(), "this CPU has no AVX-512 VNNI");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() && packed.dim() == 3, "packed");
  TORCH_CHECK(packed.size(1) * 8 == K && packed.size(2) == 64, "packed does not match K");
  TORCH_CHECK(K % group == 0 && group % kBlock == 0, "the group must divide K and be a multiple of 32");
  const int64_t tiles = packed.size(0), groups = K / group;
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous() && scales.numel() == tiles * groups * kTile,
              "scales: contiguous fp16 [N/16, groups, 16]");
  TORCH_CHECK(!zero_scales || (zero_scales->scalar_type() == torch::kFloat32 && zero_scales->is_contiguous() &&
                               zero_scales->numel() == scales.numel()), "zero_scales: contiguous float32, as scales");
  return {packed.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
          zero_scales ? zero_scales->data_ptr<float>() : nullptr, static_cast<float>(zero), K, tiles * kTile, group};
}

// y [M, N] (float) = x [M, K] (float) . W
void matmul_into(const float* x, int64_t M, const Weights& w, float* out) {
  const int64_t K = w.K, N = w.N, group = w.group;
  const QuantizedRows xr = quantize_rows(x, M, K, group);
  const int64_t tiles = N / kTile, groups = K / group;
  for (int64_t m0 = 0; m0 < M; m0 += kPanel) {
    const int64_t m1 = std::min(M, m0 + kPanel);
    parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* wt = w.packed + t * (K / 8) * 64;
        const uint16_t* st = w.scales + t * groups * kTile;
        const float* zt = w.zero_scales ? w.zero_scales + t * groups * kTile : nullptr;
        if (m1 - m0 == 1)
          rows_of_tile<1>(wt, st, zt, w.zero, xr, m0, m1, K, group, out, N, t * kTile);
        else
          rows_of_tile<kRows>(wt, st, zt, w.zero, xr, m0, m1, K, group, out, N, t * kTile);
      }
    });
  }
}

inline float round_bf16(float v) { return static_cast<float>(c10::BFloat16(v)); }

// e^x: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor polynomial to r^6 (relative error about 1e-7), times
// 2^n by vscalefps (so large x give inf, as they should). Below -87 the result is 0 or a denormal either way.
__attribute__((target("avx512f")))
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 poly = _mm512_set1_ps(1.f / 720.f);
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.f / 120.f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.f / 24.f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.f / 6.f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(0.5f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(poly, n);
}

// 16 floats rounded to bf16 (to nearest even, as torch's c10::BFloat16 rounds, denormals kept, NaN stays NaN),
// and bf16 <-> float for 16 lanes. In integer steps, not vcvtneps2bf16: AVX-512 VNNI CPUs before Zen 4 and
// Cooper Lake (Cascade Lake, Ice Lake) lack that instruction, and it flushes denormals.
__attribute__((target("avx512f")))
inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i up = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  up = _mm512_mask_mov_epi32(up, nan, _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(up);
}

__attribute__((target("avx512f,avx512bw")))
inline __m512 from_bf16(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

__attribute__((target("avx512f,avx512bw")))
inline __m512 rounded(__m512 v) { return from_bf16(to_bf16(v)); }

// A bf16 row as floats, RMS-normalized when weight is given (x * rsqrt(mean(x^2) + eps) in fp32, times the
// weight, rounded to bf16: the model's RMSNorm step).
void normalized_row(const at::BFloat16* src, int64_t K, const at::BFloat16* weight, double eps, float* out) {
  for (int64_t k = 0; k < K; ++k) out[k] = static_cast<float>(src[k]);
  if (!weight) return;
  double squares = 0.0;
  for (int64_t k = 0; k < K; ++k) squares += static_cast<double>(out[k]) * out[k];
  const float inv = 1.f / std::sqrt(static_cast<float>(squares / K) + static_cast<float>(eps));
  for (int64_t k = 0; k < K; ++k) out[k] = round_bf16(static_cast<float>(weight[k]) * (out[k] * inv));
}

// The layer step's end, 16 columns at a time: y (float [M, N]) rounded to bf16, plus the residual, or
// silu(gate) * up of its halves (each step rounded as torch's bf16 ops round).
__attribute__((target("avx512f,avx512bw,avx512vl")))
void finish_rows(const float* y, int64_t M, int64_t N, const at::BFloat16* residual, bool glu, at::BFloat16* out) {
  const int64_t width = glu ? N / 2 : N;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < width; n += 16) {
      const __mmask16 valid = width - n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (width - n)) - 1);
      const __m512 v = rounded(_mm512_maskz_loadu_ps(valid, y + m * N + n));
      __m512 o = v;
      if (glu) {
        const __m512 up = rounded(_mm512_maskz_loadu_ps(valid, y + m * N + width + n));
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), v));
        o = _mm512_mul_ps(rounded(_mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), e))), up);
      } else if (residual) {
        o = _mm512_add_ps(from_bf16(_mm256_maskz_loadu_epi16(valid, residual + m * width + n)), v);
      }
      _mm256_mask_storeu_epi16(out + m * width + n, valid, to_bf16(o));
    }
  }
}

}  // namespace

// x [M, K] float32; packed [N/16, K/8, 64] uint8; scales, zero_scales [N/16, groups, 16] float32.
torch::Tensor q4_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor scales,
                        c10::optional<torch::Tensor> zero_scales, double zero, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 [M, K]");
  const int64_t M = x.size(0);
  const Weights w = weights_of(packed, scales, zero_scales, zero, x.size(1), group);
  auto y = torch::empty({M, w.N}, x.options());
  matmul_into(x.data_ptr<float>(), M, w, y.data_ptr<float>());
  return y;
}

// A layer of the bf16 model in one call, rounding to bf16 where the model's torch steps would: x [M, K] bf16,
// optionally RMS-normalized first (norm_weight [K] bf16: x * rsqrt(mean(x^2) + eps) in fp32, times the weight,
// rounded) and gathered through perm [K] int64 (act-order rows sorted by group); the projection rounded to bf16;
// then with residual [M, N] bf16: residual + it; with glu (columns [gate | up]): silu(gate) * up, [M, N / 2].
torch::Tensor q4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scales,
                        c10::optional<torch::Tensor> zero_scales, double zero, int64_t group,
                        c10::optional<torch::Tensor> norm_weight, double eps,
                        c10::optional<torch::Tensor> perm, c10::optional<torch::Tensor> residual, bool glu) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous(), "x: contiguous bf16 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  const Weights w = weights_of(packed, scales, zero_scales, zero, K, group);
  const int64_t N = w.N;
  TORCH_CHECK(!norm_weight || (norm_weight->scalar_type() == torch::kBFloat16 && norm_weight->numel() == K &&
                               norm_weight->is_contiguous()), "norm_weight: bf16 [K]");
  TORCH_CHECK(!perm || (perm->scalar_type() == torch::kInt64 && perm->numel() == K && perm->is_contiguous()),
              "perm: int64 [K]");
  TORCH_CHECK(!residual || (residual->scalar_type() == torch::kBFloat16 && residual->is_contiguous() &&
                            residual->numel() == M * N), "residual: contiguous bf16 [M, N]");
  TORCH_CHECK(!(glu && residual) && (!glu || N % 2 == 0), "glu: an even N, and no residual");
  const auto* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = norm_weight ? norm_weight->data_ptr<at::BFloat16>() : nullptr;
  const int64_t* pp = perm ? perm->data_ptr<int64_t>() : nullptr;
  std::vector<float> rows(M * K);
  parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> normed(K);
    for (int64_t m = m0; m < m1; ++m) {
      normalized_row(xp + m * K, K, wp, eps, normed.data());
      float* dst = rows.data() + m * K;
      for (int64_t k = 0; k < K; ++k) dst[k] = normed[pp ? pp[k] : k];
    }
  });
  std::vector<float> y(M * N);
  matmul_into(rows.data(), M, w, y.data());
  auto out = torch::empty({M, glu ? N / 2 : N}, x.options());
  finish_rows(y.data(), M, N, residual ? residual->data_ptr<at::BFloat16>() : nullptr, glu,
              out.data_ptr<at::BFloat16>());
  return out;
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

// Positions are visited a block's run at a time: the run from position j (its length), and its row in the cache.
inline int64_t run_at(const int32_t* blocks, int64_t j, int64_t end, int64_t block_size, int64_t* slot) {
  const int64_t off = j % block_size;
  *slot = static_cast<int64_t>(blocks[j / block_size]) * block_size + off;
  return std::min(block_size - off, end - j);
}

// One (row, head): C = head_dim / 16 vectors. Scores four keys at a time (independent sums), the softmax's
// exponentials 16 at a time, then the values key by key into C accumulators, each row of V read once.
template <int C>
__attribute__((target("avx512f,avx512bw")))
void attend_row(const float* q, const uint16_t* k, const uint16_t* v, const int32_t* blocks, int64_t begin,
                int64_t end, int64_t block_size, float scale, float* out, std::vector<float>& p) {
  constexpr int64_t D = 16 * C;
  p.resize(end - begin + 16);
  float* score = p.data();
  __m512 qv[C];
  for (int c = 0; c < C; ++c) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * c), _mm512_set1_ps(scale));
  for (int64_t j = begin, slot = 0, run = 0; j < end; j += run) {
    run = run_at(blocks, j, end, block_size, &slot);
    const uint16_t* kr = k + slot * D;
    float* sr = score + (j - begin);
    int64_t i = 0;
    for (; i + 4 <= run; i += 4) {
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      for (int c = 0; c < C; ++c) {
        a0 = _mm512_fmadd_ps(qv[c], bf16x16(kr + (i + 0) * D + 16 * c), a0);
        a1 = _mm512_fmadd_ps(qv[c], bf16x16(kr + (i + 1) * D + 16 * c), a1);
        a2 = _mm512_fmadd_ps(qv[c], bf16x16(kr + (i + 2) * D + 16 * c), a2);
        a3 = _mm512_fmadd_ps(qv[c], bf16x16(kr + (i + 3) * D + 16 * c), a3);
      }
      sr[i] = _mm512_reduce_add_ps(a0);
      sr[i + 1] = _mm512_reduce_add_ps(a1);
      sr[i + 2] = _mm512_reduce_add_ps(a2);
      sr[i + 3] = _mm512_reduce_add_ps(a3);
    }
    for (; i < run; ++i) {
      __m512 a = _mm512_setzero_ps();
      for (int c = 0; c < C; ++c) a = _mm512_fmadd_ps(qv[c], bf16x16(kr + i * D + 16 * c), a);
      sr[i] = _mm512_reduce_add_ps(a);
    }
  }
  const int64_t n = end - begin;
  float best = -INFINITY;
  for (int64_t i = 0; i < n; ++i) best = std::max(best, score[i]);
  __m512 total = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 valid = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, score + i), _mm512_set1_ps(best)));
    _mm512_mask_storeu_ps(score + i, valid, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(valid, e));
  }
  __m512 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t j = begin, slot = 0, run = 0; j < end; j += run) {
    run = run_at(blocks, j, end, block_size, &slot);
    const uint16_t* vr = v + slot * D;
    for (int64_t i = 0; i < run; ++i) {
      const __m512 pj = _mm512_set1_ps(score[j - begin + i]);
      for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(pj, bf16x16(vr + i * D + 16 * c), acc[c]);
    }
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], inv));
}

using AttendRow = void (*)(const float*, const uint16_t*, const uint16_t*, const int32_t*, int64_t, int64_t, int64_t,
                           float, float*, std::vector<float>&);

template <int... C>
AttendRow attend_row_for(int64_t chunks, std::integer_sequence<int, C...>) {
  AttendRow table[] = {nullptr, &attend_row<C + 1>...};
  return chunks >= 1 && chunks <= static_cast<int64_t>(sizeof...(C)) ? table[chunks] : nullptr;
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
  TORCH_CHECK(D % 16 == 0 && D <= 256 && k.size(2) == D && Hq % Hkv == 0, "head sizes");
  const AttendRow attend = attend_row_for(D / 16, std::make_integer_sequence<int, 16>{});
  auto out = torch::empty_like(q);
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  const auto table_c = table.contiguous();
  const int32_t *tp = table_c.data_ptr<int32_t>(), *lp = lens.data_ptr<int32_t>();
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t width = table_c.size(1), group = Hq / Hkv;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  parallel_for(0, B * Hq, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> p;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / Hq, h = r % Hq, kvh = h / group, len = lp[b];
      const int64_t begin = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      attend(qp + r * D, kp + kvh * slots * D, vp + kvh * slots * D, tp + b * width, begin, len, block_size, scale,
             op + r * D, p);
    }
  });
  return out;
}

// A step's attention in one call, as backends/paged_attention.py's torch steps would compute it, each row a
// sequence's token at position lens - 1: q, k, v [T, H * D] bf16 (rows may be strided: views of the fused
// projection); cos, sin [T, D] float32. Rotary (half-rotation layout) on q and k, rounded to bf16; k and v
// written to their slots (write_slots [T] int64) of this layer's cache [Hkv, slots, D]; then every row's
// query over its keys, rounded to bf16: [T, Hq * D]. All writes come before any read, so a prompt row sees
// the keys of the rows before it in the same step.
torch::Tensor rope_store_attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos,
                                torch::Tensor sin, torch::Tensor cache_k, torch::Tensor cache_v,
                                torch::Tensor write_slots, torch::Tensor table, torch::Tensor lens, int64_t block_size,
                                int64_t window) {
  TORCH_CHECK(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"), "this CPU has no AVX-512");
  const int64_t T = q.size(0), Hkv = cache_k.size(0), slots = cache_k.size(1), D = cache_k.size(2);
  TORCH_CHECK(D % 16 == 0 && D <= 256 && q.size(1) % D == 0, "head sizes");
  const int64_t Hq = q.size(1) / D, group = Hq / Hkv;
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->scalar_type() == torch::kBFloat16 && t->dim() == 2 && t->size(0) == T && t->stride(1) == 1,
                "q, k, v: bf16 [T, H * D], rows contiguous");
  }
  TORCH_CHECK(k.size(1) == Hkv * D && v.size(1) == Hkv * D && Hq % Hkv == 0, "k, v: [T, Hkv * D]");
  TORCH_CHECK(cache_k.scalar_type() == torch::kBFloat16 && cache_k.is_contiguous() && cache_v.is_contiguous() &&
              cache_v.sizes() == cache_k.sizes(), "cache: bf16 [Hkv, slots, D]");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 && cos.is_contiguous() &&
              sin.is_contiguous() && cos.numel() == T * D && sin.numel() == T * D, "cos, sin: float32 [T, D]");
  TORCH_CHECK(write_slots.scalar_type() == torch::kInt64 && write_slots.numel() == T, "write_slots: int64 [T]");
  TORCH_CHECK(table.scalar_type() == torch::kInt32 && table.dim() == 2 && table.size(0) == T &&
              lens.scalar_type() == torch::kInt32 && lens.numel() == T, "table [T, W], lens [T]: int32");
  const AttendRow attend = attend_row_for(D / 16, std::make_integer_sequence<int, 16>{});
  const auto *qp = q.data_ptr<at::BFloat16>(), *kp = k.data_ptr<at::BFloat16>(), *vp = v.data_ptr<at::BFloat16>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  auto* ck = cache_k.data_ptr<at::BFloat16>();
  auto* cv = cache_v.data_ptr<at::BFloat16>();
  const int64_t* ws = write_slots.data_ptr<int64_t>();
  const auto table_c = table.contiguous();
  const int32_t *tp = table_c.data_ptr<int32_t>(), *lp = lens.data_ptr<int32_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(ws[t] >= 0 && ws[t] < slots, "a write slot is out of the cache");
  std::vector<float> queries(T * Hq * D);
  const int64_t half = D / 2, heads = Hq + 2 * Hkv;
  parallel_for(0, T * heads, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / heads, h = r % heads;
      const float *c = cp + t * D, *sn = sp + t * D;
      if (h >= Hq + Hkv) {  // v: stored as it is
        const int64_t kvh = h - Hq - Hkv;
        std::copy(vp + t * v.stride(0) + kvh * D, vp + t * v.stride(0) + (kvh + 1) * D, cv + (kvh * slots + ws[t]) * D);
        continue;
      }
      const at::BFloat16* x = h < Hq ? qp + t * q.stride(0) + h * D : kp + t * k.stride(0) + (h - Hq) * D;
      for (int64_t i = 0; i < D; ++i) {
        const float rotated = i < half ? -static_cast<float>(x[i + half]) : static_cast<float>(x[i - half]);
        const float value = round_bf16(static_cast<float>(x[i]) * c[i] + rotated * sn[i]);
        if (h < Hq) {
          queries[(t * Hq + h) * D + i] = value;
        } else {
          ck[((h - Hq) * slots + ws[t]) * D + i] = c10::BFloat16(value);
        }
      }
    }
  });
  auto out = torch::empty({T, Hq * D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  auto* op = out.data_ptr<at::BFloat16>();
  const int64_t width = table_c.size(1);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const auto* kc = reinterpret_cast<const uint16_t*>(ck);
  const auto* vc = reinterpret_cast<const uint16_t*>(cv);
  parallel_for(0, T * Hq, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> p;
    float row[256];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / Hq, h = r % Hq, kvh = h / group, len = lp[t];
      const int64_t begin = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      attend(queries.data() + r * D, kc + kvh * slots * D, vc + kvh * slots * D, tp + t * width, begin, len,
             block_size, scale, row, p);
      for (int64_t i = 0; i < D; ++i) op[r * D + i] = c10::BFloat16(row[i]);
    }
  });
  return out;
}

// ---- the model's head: final RMSNorm and the dense bf16 lm_head ---------------------------------------------
// torch's bf16 matmul reads this 32000 x 4096 weight (262 MB, the largest single read of a 7B decode step) at
// about 20 GB/s here; this reads it at the memory's rate, 8 weight rows at a time against each row of x. The
// products of two bf16 are exact in fp32 and each logit's sum runs in one fixed order whatever M is, so a
// row's logits do not depend on the other rows (prompt scoring equals generation).

namespace {

constexpr int kHeadRows = 8;       // weight rows a pass holds accumulators for
constexpr int64_t kHeadPanel = 64;  // rows of x a pass over the weights takes (they stay in L2)

__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 bf16x16_masked(const at::BFloat16* p, __mmask16 valid) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void head_pass(const at::BFloat16* x, int64_t K, const at::BFloat16* w, float* y) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 valid = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 xv = bf16x16_masked(x + k, valid);
    for (int r = 0; r < R; ++r) {
      if ((k & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k) + kPrefetch, _MM_HINT_T0);
      acc[r] = _mm512_fmadd_ps(bf16x16_masked(w + r * K + k, valid), xv, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r] = _mm512_reduce_add_ps(acc[r]);
}

}  // namespace

// x [M, K] bf16, norm_weight [K] bf16, weight [N, K] bf16 -> float32 logits [M, N] of norm(x) · weight^T.
torch::Tensor norm_head(torch::Tensor x, torch::Tensor norm_weight, double eps, torch::Tensor weight) {
  TORCH_CHECK(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"), "this CPU has no AVX-512");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous(), "x: contiguous bf16 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K && weight.scalar_type() == torch::kBFloat16 &&
              weight.is_contiguous(), "weight: contiguous bf16 [N, K]");
  TORCH_CHECK(norm_weight.scalar_type() == torch::kBFloat16 && norm_weight.numel() == K &&
              norm_weight.is_contiguous(), "norm_weight: bf16 [K]");
  const int64_t N = weight.size(0);
  std::vector<at::BFloat16> rows(M * K);
  {
    std::vector<float> normed(K);
    for (int64_t m = 0; m < M; ++m) {
      normalized_row(x.data_ptr<at::BFloat16>() + m * K, K, norm_weight.data_ptr<at::BFloat16>(), eps, normed.data());
      for (int64_t k = 0; k < K; ++k) rows[m * K + k] = c10::BFloat16(normed[k]);  // already bf16 values
    }
  }
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
  float* yp = y.data_ptr<float>();
  const at::BFloat16* wp = weight.data_ptr<at::BFloat16>();
  const int64_t passes = (N + kHeadRows - 1) / kHeadRows;
  parallel_for(0, passes, 16, [&](int64_t p0, int64_t p1) {
    float out[kHeadRows];
    for (int64_t m0 = 0; m0 < M; m0 += kHeadPanel) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p * kHeadRows, count = std::min<int64_t>(kHeadRows, N - n);
        for (int64_t m = m0; m < std::min(M, m0 + kHeadPanel); ++m) {
          for (int64_t r = 0; r < count; r += (count - r >= kHeadRows ? kHeadRows : 1)) {
            if (count - r >= kHeadRows) {
              head_pass<kHeadRows>(rows.data() + m * K, K, wp + (n + r) * K, out);
              std::copy(out, out + kHeadRows, yp + m * N + n + r);
            } else {
              head_pass<1>(rows.data() + m * K, K, wp + (n + r) * K, out);
              yp[m * N + n + r] = out[0];
            }
          }
        }
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The calls run without the GIL: a long prompt's layer call must not hold up the app's other threads (the
  // HTTP server, the UI, the streams' detokenizing) for its whole length.
  const auto without_gil = py::call_guard<py::gil_scoped_release>();
  m.def("supported", &supported);
  m.def("q4_matmul", &q4_matmul, without_gil);
  m.def("q4_linear", &q4_linear, without_gil);
  m.def("paged_decode_attention", &paged_decode_attention, without_gil);
  m.def("rope_store_attend", &rope_store_attend, without_gil);
  m.def("norm_head", &norm_head, without_gil);
}
