// C++ CPU kernels of the multi-tensor AdamW step: fp32 states and blockwise 8-bit states.
//
// Work: the rows of `chunks` (int64 [n, 4]: tensor index i, start, length, state offset) name
// params[i].view(-1)[start : start + length], the same slice of grads[i], and the state
// elements [offset, offset + length) of every state buffer. The math, element by element, is
// the one of qlora_kernels/reference/adamw.py, each fp32 operation rounded once: this file is
// built with -ffp-contract=off and without fast-math, so the results equal the reference bit
// for bit whatever the chunking or the vector width the compiler picks.
//
// SIMD: on x86-64 the fp32 update has an AVX2 version chosen at run time (no -march needed); it
// performs the same IEEE operations lane by lane (mul, add, sqrt, div; no FMA), so it gives the
// same bits as the portable loop.
//
// Parallelism: all chunks are cut into tasks (at most kTile elements for fp32 states,
// kBlocksPerTask blocks of 256 for 8-bit states, never straddling a chunk) run by one
// at::parallel_for, so a single call spreads many tensors over all threads; a call with little
// work in all runs on the calling thread.
//
// Non-finite gradients: an element whose gradient is NaN or +-Inf is skipped (its param, states
// and master copy keep their values; in 8-bit blocks it is requantized with the block's new
// absmax) and found_inf[0] is set to 1.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "isa.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QK_HAVE_X86 1
#else
#define QK_HAVE_X86 0
#endif

namespace qk_cpu_adamw {
using qk_cpu::cpu_has_avx2;
namespace {

constexpr int64_t kBlock = 256;           // elements per 8-bit state block (bitsandbytes' blockwise)
constexpr int64_t kTile = 16384;          // fp32 states: elements per parallel task
constexpr int64_t kBlocksPerTask = 16;    // 8-bit states: blocks per parallel task
// Fewer elements than this per thread are not worth waking a thread for (and on a busy machine a
// parallel region of tiny tasks can wait a scheduler quantum for its second thread).
constexpr int64_t kMinElemsPerThread = 1 << 15;

// at::parallel_for grain (in tasks) so that each thread gets at least kMinElemsPerThread elements.
int64_t grain_for(int64_t n_tasks, int64_t total_elems) {
  if (total_elems <= 0) return 1;
  return std::max<int64_t>(1, (n_tasks * kMinElemsPerThread + total_elems - 1) / total_elems);
}

// The step's scalars, computed in double on the host and rounded once to fp32, exactly as
// reference/adamw.py::step_constants; neg_step_size and inv_bc2 depend on the tensor's step.
struct Consts {
  float decay, beta1, omb1, beta2, omb2, eps;
};
struct StepConsts {
  float neg_step_size, inv_bc2;
};

Consts make_consts(double lr, double beta1, double beta2, double eps, double weight_decay) {
  return {static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(beta1), static_cast<float>(1.0 - beta1),
          static_cast<float>(beta2), static_cast<float>(1.0 - beta2), static_cast<float>(eps)};
}

StepConsts make_step_consts(double lr, double beta1, double beta2, int64_t step) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  return {static_cast<float>(-(lr / bc1)), static_cast<float>(1.0 / std::sqrt(bc2))};
}

inline bool is_finite(float x) { return std::fabs(x) <= std::numeric_limits<float>::max(); }

// One element of AdamW on fp32 values; w is the param (or its master copy) as fp32.
struct Updated {
  float w, m, v;
};
inline Updated update(float w, float g, float m, float v, const Consts& c, const StepConsts& s) {
  w = w * c.decay;
  m = m * c.beta1 + g * c.omb1;
  v = v * c.beta2 + (g * g) * c.omb2;
  const float denom = std::sqrt(v) * s.inv_bc2 + c.eps;
  w = w + (m / denom) * s.neg_step_size;
  return {w, m, v};
}

struct Chunk {
  int64_t tensor, start, length, offset;
};

std::vector<Chunk> read_chunks(const at::Tensor& chunks, at::TensorList params, at::TensorList grads,
                               int64_t state_len, bool blockwise) {
  TORCH_CHECK(chunks.device().is_cpu() && chunks.scalar_type() == at::kLong && chunks.dim() == 2 &&
                  chunks.size(1) == 4,
              "adamw (cpp): chunks must be a CPU int64 tensor [n, 4]");
  const at::Tensor t = chunks.contiguous();
  const int64_t* c = t.data_ptr<int64_t>();
  const int64_t n = t.size(0);
  std::vector<Chunk> out(n);
  for (int64_t r = 0; r < n; ++r) {
    const Chunk ch{c[4 * r], c[4 * r + 1], c[4 * r + 2], c[4 * r + 3]};
    TORCH_CHECK(ch.tensor >= 0 && ch.tensor < static_cast<int64_t>(params.size()), "adamw (cpp): chunk ", r,
                " names tensor ", ch.tensor, " of ", params.size());
    const int64_t numel = params[ch.tensor].numel();
    TORCH_CHECK(ch.start >= 0 && ch.length > 0 && ch.start + ch.length <= numel && ch.offset >= 0 &&
                    ch.offset + ch.length <= state_len,
                "adamw (cpp): chunk ", r, " is out of bounds");
    TORCH_CHECK(grads[ch.tensor].numel() == numel, "adamw (cpp): grad ", ch.tensor, " has the wrong size");
    TORCH_CHECK(!blockwise || (ch.start % kBlock == 0 && ch.offset % kBlock == 0),
                "adamw (cpp): 8-bit chunks must start on a block of 256");
    out[r] = ch;
  }
  return out;
}

void check_tensors(at::TensorList params, at::TensorList grads, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& master, const at::Tensor& found_inf,
                   at::ScalarType state_dtype, at::IntArrayRef steps) {
  TORCH_CHECK(params.size() == grads.size() && params.size() == steps.size(),
              "adamw (cpp): params, grads and steps must have one entry per tensor");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].device().is_cpu() && grads[i].device().is_cpu(), "adamw (cpp): tensors must be on the CPU");
    TORCH_CHECK(params[i].is_contiguous() && grads[i].is_contiguous(), "adamw (cpp): params and grads must be contiguous");
    const at::ScalarType dt = params[i].scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                "adamw (cpp): params must be float32, float16 or bfloat16; got ", dt);
    TORCH_CHECK(grads[i].scalar_type() == dt, "adamw (cpp): grad dtype must equal param dtype");
    TORCH_CHECK(steps[i] >= 1, "adamw (cpp): steps must be >= 1");
  }
  for (const at::Tensor* t : {&exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == state_dtype,
                "adamw (cpp): state buffers must be contiguous CPU tensors of ", state_dtype);
  }
  TORCH_CHECK(exp_avg.numel() == exp_avg_sq.numel(), "adamw (cpp): exp_avg and exp_avg_sq must have one size");
  if (master.has_value()) {
    TORCH_CHECK(master->device().is_cpu() && master->is_contiguous() && master->scalar_type() == at::kFloat &&
                    master->numel() == exp_avg.numel(),
                "adamw (cpp): master must be a contiguous fp32 CPU tensor as long as exp_avg");
  }
  TORCH_CHECK(found_inf.device().is_cpu() && found_inf.scalar_type() == at::kFloat && found_inf.numel() == 1,
              "adamw (cpp): found_inf must be a CPU fp32 tensor of one element");
}

// ---------------------------------------------------------------------------------------------
// fp32 states

// The update of n elements held as fp32 arrays: w (the param or its master copy) and the states
// m, v in place, g read. Skipped elements (non-finite g) keep w, m and v. Returns whether any was.
bool adamw_core_scalar(float* w, const float* g, float* m, float* v, int64_t n, const Consts& c,
                       const StepConsts& s) {
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    const bool ok = is_finite(g[i]);
    bad |= !ok;
    const Updated u = update(w[i], ok ? g[i] : 0.0f, m[i], v[i], c, s);
    w[i] = ok ? u.w : w[i];
    m[i] = ok ? u.m : m[i];
    v[i] = ok ? u.v : v[i];
  }
  return bad;
}

#if QK_HAVE_X86
// The same with 8 lanes: the same IEEE operations (no FMA), so the same bits as the scalar loop.
__attribute__((target("avx2"))) bool adamw_core_avx2(float* w, const float* g, float* m, float* v, int64_t n,
                                                     const Consts& c, const StepConsts& s) {
  const __m256 decay = _mm256_set1_ps(c.decay), beta1 = _mm256_set1_ps(c.beta1), omb1 = _mm256_set1_ps(c.omb1);
  const __m256 beta2 = _mm256_set1_ps(c.beta2), omb2 = _mm256_set1_ps(c.omb2), eps = _mm256_set1_ps(c.eps);
  const __m256 nss = _mm256_set1_ps(s.neg_step_size), ibc2 = _mm256_set1_ps(s.inv_bc2);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 fmax = _mm256_set1_ps(std::numeric_limits<float>::max());
  int bad = 0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gi = _mm256_loadu_ps(g + i);
    const __m256 ok = _mm256_cmp_ps(_mm256_and_ps(gi, abs_mask), fmax, _CMP_LE_OQ);  // false for NaN, +-Inf
    bad |= _mm256_movemask_ps(ok) != 0xFF;
    const __m256 g0 = _mm256_and_ps(gi, ok);  // 0 where skipped, as the scalar loop
    const __m256 w0 = _mm256_loadu_ps(w + i), m0 = _mm256_loadu_ps(m + i), v0 = _mm256_loadu_ps(v + i);
    __m256 wn = _mm256_mul_ps(w0, decay);
    const __m256 mn = _mm256_add_ps(_mm256_mul_ps(m0, beta1), _mm256_mul_ps(g0, omb1));
    const __m256 vn = _mm256_add_ps(_mm256_mul_ps(v0, beta2), _mm256_mul_ps(_mm256_mul_ps(g0, g0), omb2));
    const __m256 denom = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(vn), ibc2), eps);
    wn = _mm256_add_ps(wn, _mm256_mul_ps(_mm256_div_ps(mn, denom), nss));
    _mm256_storeu_ps(w + i, _mm256_blendv_ps(w0, wn, ok));
    _mm256_storeu_ps(m + i, _mm256_blendv_ps(m0, mn, ok));
    _mm256_storeu_ps(v + i, _mm256_blendv_ps(v0, vn, ok));
  }
  return adamw_core_scalar(w + i, g + i, m + i, v + i, n - i, c, s) || bad != 0;
}
#endif

bool adamw_core(float* w, const float* g, float* m, float* v, int64_t n, const Consts& c, const StepConsts& s) {
#if QK_HAVE_X86
  if (cpu_has_avx2()) return adamw_core_avx2(w, g, m, v, n, c, s);
#endif
  return adamw_core_scalar(w, g, m, v, n, c, s);
}

// One piece of a chunk: p, g in the param dtype, m, v (and master) at the piece's state offset.
template <typename T>
bool adamw_piece(T* p, const T* g, float* m, float* v, float* master, int64_t n, const Consts& c,
                 const StepConsts& s) {
  if constexpr (std::is_same_v<T, float>) {
    if (master == nullptr) return adamw_core(p, g, m, v, n, c, s);  // fp32 params: in place
  }
  // Low-precision params, or a master copy: stage kStage elements at a time as fp32.
  constexpr int64_t kStage = 512;
  float wb[kStage], gb[kStage];
  bool bad = false;
  for (int64_t i0 = 0; i0 < n; i0 += kStage) {
    const int64_t k = std::min(kStage, n - i0);
    for (int64_t j = 0; j < k; ++j) {
      gb[j] = static_cast<float>(g[i0 + j]);
      wb[j] = master != nullptr ? master[i0 + j] : static_cast<float>(p[i0 + j]);
    }
    bad |= adamw_core(wb, gb, m + i0, v + i0, k, c, s);
    for (int64_t j = 0; j < k; ++j) {
      if (!is_finite(gb[j])) continue;  // skipped: the param keeps its value
      if (master != nullptr) master[i0 + j] = wb[j];
      p[i0 + j] = static_cast<T>(wb[j]);
    }
  }
  return bad;
}

template <typename T>
bool adamw_chunk_part(const at::Tensor& param, const at::Tensor& grad, const Chunk& ch, int64_t lo, int64_t hi,
                      float* m, float* v, float* master, const Consts& c, const StepConsts& s) {
  const int64_t off = ch.offset + lo;
  return adamw_piece<T>(param.data_ptr<T>() + ch.start + lo, grad.data_ptr<T>() + ch.start + lo, m + off, v + off,
                        master != nullptr ? master + off : nullptr, hi - lo, c, s);
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads, const at::Tensor& exp_avg,
                    const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& master,
                    const at::Tensor& found_inf, const at::Tensor& chunks, at::IntArrayRef steps, double lr,
                    double beta1, double beta2, double eps, double weight_decay) {
  check_tensors(params, grads, exp_avg, exp_avg_sq, master, found_inf, at::kFloat, steps);
  const std::vector<Chunk> work = read_chunks(chunks, params, grads, exp_avg.numel(), false);
  const Consts c = make_consts(lr, beta1, beta2, eps, weight_decay);
  std::vector<StepConsts> sc(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) sc[i] = make_step_consts(lr, beta1, beta2, steps[i]);

  struct Task {
    int64_t chunk, lo, hi;
  };
  std::vector<Task> tasks;
  int64_t total = 0;
  for (int64_t k = 0; k < static_cast<int64_t>(work.size()); ++k) {
    for (int64_t lo = 0; lo < work[k].length; lo += kTile) tasks.push_back({k, lo, std::min(lo + kTile, work[k].length)});
    total += work[k].length;
  }

  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  float* w = master.has_value() ? master->data_ptr<float>() : nullptr;
  std::atomic<bool> bad{false};
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), grain_for(tasks.size(), total), [&](int64_t t0, int64_t t1) {
    bool local = false;
    for (int64_t t = t0; t < t1; ++t) {
      const Task& task = tasks[t];
      const Chunk& ch = work[task.chunk];
      const at::Tensor& p = params[ch.tensor];
      const at::Tensor& g = grads[ch.tensor];
      const StepConsts& s = sc[ch.tensor];
      switch (p.scalar_type()) {
        case at::kFloat:
          local |= adamw_chunk_part<float>(p, g, ch, task.lo, task.hi, m, v, w, c, s);
          break;
        case at::kBFloat16:
          local |= adamw_chunk_part<c10::BFloat16>(p, g, ch, task.lo, task.hi, m, v, w, c, s);
          break;
        case at::kHalf:
          local |= adamw_chunk_part<c10::Half>(p, g, ch, task.lo, task.hi, m, v, w, c, s);
          break;
        default:  // rejected by check_tensors; never throw inside parallel_for
          break;
      }
    }
    if (local) bad.store(true);
  });
  if (bad.load()) found_inf.fill_(1.0);
}

// ---------------------------------------------------------------------------------------------
// Blockwise 8-bit states

// #{i : x > mids[i]} over the 255 sorted midpoints: the nearest code, ties to the lower, NaN -> 0.
// Branch-free binary search (steps 128, 64, ..., 1 never read past index 254).
inline uint8_t nearest(const float* mids, float x) {
  int idx = 0;
  for (int step = 128; step > 0; step >>= 1) idx += step & -static_cast<int>(mids[idx + step - 1] < x);
  return static_cast<uint8_t>(idx);
}

struct Maps {
  float map_m[256], map_v[256], mids_m[255], mids_v[255];
};

// One block of <= 256 elements: dequantize, update, take the new absmax, requantize.
template <typename T>
bool adamw8bit_block(T* p, const T* g, uint8_t* qm, uint8_t* qv, float* am, float* av, float* master, int64_t n,
                     const Maps& q, const Consts& c, const StepConsts& s) {
  float mb[kBlock], vb[kBlock];
  bool bad = false;
  const float scale_m = *am, scale_v = *av;
  float max_m = 0.0f, max_v = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = static_cast<float>(g[i]);
    const bool ok = is_finite(gi);
    bad |= !ok;
    const float m0 = q.map_m[qm[i]] * scale_m;
    const float v0 = q.map_v[qv[i]] * scale_v;
    const float w0 = master != nullptr ? master[i] : static_cast<float>(p[i]);
    const Updated u = update(w0, ok ? gi : 0.0f, m0, v0, c, s);
    mb[i] = ok ? u.m : m0;
    vb[i] = ok ? u.v : v0;
    if (ok) {
      if (master != nullptr) master[i] = u.w;
      p[i] = static_cast<T>(u.w);
    }
    max_m = std::max(max_m, std::fabs(mb[i]));
    max_v = std::max(max_v, vb[i]);
  }
  *am = max_m;
  *av = max_v;
  for (int64_t i = 0; i < n; ++i) {
    qm[i] = nearest(q.mids_m, max_m > 0.0f ? mb[i] / max_m : 0.0f);
    qv[i] = nearest(q.mids_v, max_v > 0.0f ? vb[i] / max_v : 0.0f);
  }
  return bad;
}

template <typename T>
bool adamw8bit_chunk_blocks(const at::Tensor& param, const at::Tensor& grad, const Chunk& ch, int64_t b0, int64_t b1,
                            uint8_t* qm, uint8_t* qv, float* am, float* av, float* master, const Maps& q,
                            const Consts& c, const StepConsts& s) {
  bool bad = false;
  T* p = param.data_ptr<T>() + ch.start;
  const T* g = grad.data_ptr<T>() + ch.start;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t lo = b * kBlock;
    const int64_t n = std::min(kBlock, ch.length - lo);
    const int64_t off = ch.offset + lo;
    bad |= adamw8bit_block<T>(p + lo, g + lo, qm + off, qv + off, am + off / kBlock, av + off / kBlock,
                              master != nullptr ? master + off : nullptr, n, q, c, s);
  }
  return bad;
}

void adamw8bit_step_cpu(at::TensorList params, at::TensorList grads, const at::Tensor& exp_avg,
                        const at::Tensor& exp_avg_sq, const at::Tensor& absmax_m, const at::Tensor& absmax_v,
                        const at::Tensor& qmap_m, const at::Tensor& qmap_v, const std::optional<at::Tensor>& master,
                        const at::Tensor& found_inf, const at::Tensor& chunks, at::IntArrayRef steps, double lr,
                        double beta1, double beta2, double eps, double weight_decay) {
  check_tensors(params, grads, exp_avg, exp_avg_sq, master, found_inf, at::kByte, steps);
  const int64_t nblocks = (exp_avg.numel() + kBlock - 1) / kBlock;
  for (const at::Tensor* t : {&absmax_m, &absmax_v}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == at::kFloat && t->numel() == nblocks,
                "adamw8bit (cpp): absmax buffers must be contiguous fp32 CPU tensors of ceil(len / 256) elements");
  }
  for (const at::Tensor* t : {&qmap_m, &qmap_v}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->numel() == 256,
                "adamw8bit (cpp): quantization maps must be fp32 CPU tensors of 256 values");
  }
  const std::vector<Chunk> work = read_chunks(chunks, params, grads, exp_avg.numel(), true);
  const Consts c = make_consts(lr, beta1, beta2, eps, weight_decay);
  std::vector<StepConsts> sc(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) sc[i] = make_step_consts(lr, beta1, beta2, steps[i]);

  Maps q;
  {
    const at::Tensor mm = qmap_m.contiguous(), mv = qmap_v.contiguous();
    std::copy(mm.data_ptr<float>(), mm.data_ptr<float>() + 256, q.map_m);
    std::copy(mv.data_ptr<float>(), mv.data_ptr<float>() + 256, q.map_v);
    for (int i = 0; i < 255; ++i) {
      q.mids_m[i] = (q.map_m[i] + q.map_m[i + 1]) / 2.0f;
      q.mids_v[i] = (q.map_v[i] + q.map_v[i + 1]) / 2.0f;
    }
  }

  struct Task {
    int64_t chunk, b0, b1;
  };
  std::vector<Task> tasks;
  int64_t total = 0;
  for (int64_t k = 0; k < static_cast<int64_t>(work.size()); ++k) {
    const int64_t nb = (work[k].length + kBlock - 1) / kBlock;
    for (int64_t b = 0; b < nb; b += kBlocksPerTask) tasks.push_back({k, b, std::min(b + kBlocksPerTask, nb)});
    total += work[k].length;
  }

  uint8_t* qm = exp_avg.data_ptr<uint8_t>();
  uint8_t* qv = exp_avg_sq.data_ptr<uint8_t>();
  float* am = absmax_m.data_ptr<float>();
  float* av = absmax_v.data_ptr<float>();
  float* w = master.has_value() ? master->data_ptr<float>() : nullptr;
  std::atomic<bool> bad{false};
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), grain_for(tasks.size(), total), [&](int64_t t0, int64_t t1) {
    bool local = false;
    for (int64_t t = t0; t < t1; ++t) {
      const Task& task = tasks[t];
      const Chunk& ch = work[task.chunk];
      const at::Tensor& p = params[ch.tensor];
      const at::Tensor& g = grads[ch.tensor];
      const StepConsts& s = sc[ch.tensor];
      switch (p.scalar_type()) {
        case at::kFloat:
          local |= adamw8bit_chunk_blocks<float>(p, g, ch, task.b0, task.b1, qm, qv, am, av, w, q, c, s);
          break;
        case at::kBFloat16:
          local |= adamw8bit_chunk_blocks<c10::BFloat16>(p, g, ch, task.b0, task.b1, qm, qv, am, av, w, q, c, s);
          break;
        case at::kHalf:
          local |= adamw8bit_chunk_blocks<c10::Half>(p, g, ch, task.b0, task.b1, qm, qv, am, av, w, q, c, s);
          break;
        default:  // rejected by check_tensors; never throw inside parallel_for
          break;
      }
    }
    if (local) bad.store(true);
  });
  if (bad.load()) found_inf.fill_(1.0);
}

}  // namespace
}  // namespace qk_cpu_adamw

TORCH_LIBRARY_IMPL(qlora_kernels_C, CPU, m) {
  m.impl("adamw_step", &qk_cpu_adamw::adamw_step_cpu);
  m.impl("adamw8bit_step", &qk_cpu_adamw::adamw8bit_step_cpu);
}
