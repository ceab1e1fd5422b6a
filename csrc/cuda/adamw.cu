// Multi-tensor AdamW CUDA kernels: one launch updates every chunk of a work table (many params).
//
// Math (qlora_kernels/reference/adamw.py), per element, fp32, each operation rounded once: the
// __f*_rn intrinsics forbid FMA contraction and approximate division/sqrt, so the results equal
// the reference and the C++ CPU kernel bit for bit:
//   skip if !isfinite(g) (found_inf = 1)
//   w = w * decay;  m = m * beta1 + g * omb1;  v = v * beta2 + (g * g) * omb2
//   w = w + (m / (sqrt(v) * inv_bc2 + eps)) * neg_step_size;   param = round(w)
// where w is the fp32 master copy if there is one, else the param read as fp32.
//
// Work table: AdamWChunk rows (adamw_kernels.h) with the prefix sum `work_begin` of their work
// units; a work unit finds its chunk by binary search over work_begin (n_chunks is at most a few
// thousand: ~12 cached loads).
//
// fp32 states, launch shape: 256 threads per block, one work unit = a tile of 4096 consecutive
// elements of one chunk; blocks stride over the tiles. A thread owns elements tid + 256 j and
// loads kIlp of them before computing (memory-level parallelism; loads are coalesced).
//
// 8-bit states, launch shape: one warp per quantization block of 256 elements (8 per lane,
// lane + 32 j), 8 warps per block striding over the blocks. Dequantize with the maps in shared
// memory, update in fp32, warp-reduce the new absmax (max |m|, max v), requantize to the
// nearest code by binary search over the 255 midpoints (ties to the lower code).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "adamw_kernels.h"
#include "dtype_convert.cuh"

namespace qk_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kIlp = 4;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ bool finite(float x) { return fabsf(x) <= 3.402823466e38f; }

struct Updated {
  float w, m, v;
};

__device__ __forceinline__ Updated update(float w, float g, float m, float v, const AdamWConsts& c, float nss,
                                          float inv_bc2) {
  w = __fmul_rn(w, c.decay);
  m = __fadd_rn(__fmul_rn(m, c.beta1), __fmul_rn(g, c.omb1));
  v = __fadd_rn(__fmul_rn(v, c.beta2), __fmul_rn(__fmul_rn(g, g), c.omb2));
  const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v), inv_bc2), c.eps);
  w = __fadd_rn(w, __fmul_rn(__fdiv_rn(m, denom), nss));
  return {w, m, v};
}

// The chunk that owns work unit `work`: the last row with work_begin <= work.
__device__ __forceinline__ int64_t find_chunk(const AdamWChunk* __restrict__ chunks, int64_t n_chunks, int64_t work) {
  int64_t lo = 0, hi = n_chunks - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (chunks[mid].work_begin <= work) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// ---------------------------------------------------------------------------------------------
// fp32 states

template <typename T>
__device__ void adamw_tile(const AdamWChunk& c, int64_t lo, int64_t hi, const AdamWStates& s,
                           const AdamWConsts& k, bool& bad) {
  T* p = static_cast<T*>(c.param);
  const T* g = static_cast<const T*>(c.grad);
  float* m = s.exp_avg + c.state_offset;
  float* v = s.exp_avg_sq + c.state_offset;
  float* w = s.master != nullptr ? s.master + c.state_offset : nullptr;
  for (int64_t base = lo + threadIdx.x; base < hi; base += kThreads * kIlp) {
    float gr[kIlp], wr[kIlp], mr[kIlp], vr[kIlp];
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      const int64_t i = base + j * kThreads;
      if (i < hi) {
        gr[j] = to_float<T>(g[i]);
        wr[j] = w != nullptr ? w[i] : to_float<T>(p[i]);
        mr[j] = m[i];
        vr[j] = v[i];
      }
    }
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      const int64_t i = base + j * kThreads;
      if (i < hi) {
        if (!finite(gr[j])) {
          bad = true;
          continue;
        }
        const Updated u = update(wr[j], gr[j], mr[j], vr[j], k, c.neg_step_size, c.inv_bc2);
        m[i] = u.m;
        v[i] = u.v;
        if (w != nullptr) w[i] = u.w;
        p[i] = from_float<T>(u.w);
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    adamw_step_kernel(const AdamWChunk* __restrict__ chunks, int64_t n_chunks, int64_t n_work, AdamWStates s,
                      AdamWConsts k, float* found_inf) {
  bool bad = false;
  for (int64_t work = blockIdx.x; work < n_work; work += gridDim.x) {
    const AdamWChunk c = chunks[find_chunk(chunks, n_chunks, work)];
    const int64_t lo = (work - c.work_begin) * kAdamWTile;
    const int64_t hi = lo + kAdamWTile < c.length ? lo + kAdamWTile : c.length;
    switch (static_cast<ParamDtype>(c.dtype)) {  // uniform across the block
      case ParamDtype::kFloat32:
        adamw_tile<float>(c, lo, hi, s, k, bad);
        break;
      case ParamDtype::kFloat16:
        adamw_tile<__half>(c, lo, hi, s, k, bad);
        break;
      case ParamDtype::kBFloat16:
        adamw_tile<__nv_bfloat16>(c, lo, hi, s, k, bad);
        break;
    }
  }
  if (bad) *found_inf = 1.0f;  // benign race: every writer stores the same value
}

// ---------------------------------------------------------------------------------------------
// Blockwise 8-bit states

// #{i : x > mids[i]} over the 255 sorted midpoints: the nearest code, ties to the lower, NaN -> 0.
// Branch-free binary search (steps 128, 64, ..., 1 never read past index 254).
__device__ __forceinline__ uint8_t nearest(const float* mids, float x) {
  int idx = 0;
#pragma unroll
  for (int step = 128; step > 0; step >>= 1) idx += mids[idx + step - 1] < x ? step : 0;
  return static_cast<uint8_t>(idx);
}

struct SharedMaps {
  float map_m[256], map_v[256], mids_m[256], mids_v[256];
};

template <typename T>
__device__ void adamw8bit_block(const AdamWChunk& c, int64_t b, const AdamWStates& s, const AdamWConsts& k,
                                const SharedMaps& q, int lane, bool& bad) {
  constexpr int kPerLane = kAdamWBlock / 32;
  const int64_t lo = b * kAdamWBlock;
  const int64_t n = kAdamWBlock < c.length - lo ? kAdamWBlock : c.length - lo;
  T* p = static_cast<T*>(c.param) + lo;
  const T* g = static_cast<const T*>(c.grad) + lo;
  const int64_t off = c.state_offset + lo;
  uint8_t* qm = s.exp_avg_q + off;
  uint8_t* qv = s.exp_avg_sq_q + off;
  float* w = s.master != nullptr ? s.master + off : nullptr;
  float* am = s.absmax_m + off / kAdamWBlock;
  float* av = s.absmax_v + off / kAdamWBlock;
  const float scale_m = *am, scale_v = *av;

  float mr[kPerLane], vr[kPerLane];
  float max_m = 0.0f, max_v = 0.0f;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int64_t i = lane + 32 * j;
    if (i < n) {
      const float gi = to_float<T>(g[i]);
      const bool ok = finite(gi);
      bad |= !ok;
      const float m0 = __fmul_rn(q.map_m[qm[i]], scale_m);
      const float v0 = __fmul_rn(q.map_v[qv[i]], scale_v);
      const float w0 = w != nullptr ? w[i] : to_float<T>(p[i]);
      const Updated u = update(w0, ok ? gi : 0.0f, m0, v0, k, c.neg_step_size, c.inv_bc2);
      mr[j] = ok ? u.m : m0;
      vr[j] = ok ? u.v : v0;
      if (ok) {
        if (w != nullptr) w[i] = u.w;
        p[i] = from_float<T>(u.w);
      }
      max_m = fmaxf(max_m, fabsf(mr[j]));
      max_v = fmaxf(max_v, vr[j]);
    }
  }
  // The shuffles also order every lane's read of the old absmax before lane 0 writes the new one.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    max_m = fmaxf(max_m, __shfl_xor_sync(0xffffffffu, max_m, o));
    max_v = fmaxf(max_v, __shfl_xor_sync(0xffffffffu, max_v, o));
  }
  if (lane == 0) {
    *am = max_m;
    *av = max_v;
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int64_t i = lane + 32 * j;
    if (i < n) {
      qm[i] = nearest(q.mids_m, max_m > 0.0f ? __fdiv_rn(mr[j], max_m) : 0.0f);
      qv[i] = nearest(q.mids_v, max_v > 0.0f ? __fdiv_rn(vr[j], max_v) : 0.0f);
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    adamw8bit_step_kernel(const AdamWChunk* __restrict__ chunks, int64_t n_chunks, int64_t n_work, AdamWStates s,
                          AdamWConsts k, float* found_inf) {
  __shared__ SharedMaps q;
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    q.map_m[i] = s.qmap_m[i];
    q.map_v[i] = s.qmap_v[i];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 255; i += blockDim.x) {
    q.mids_m[i] = __fmul_rn(__fadd_rn(q.map_m[i], q.map_m[i + 1]), 0.5f);
    q.mids_v[i] = __fmul_rn(__fadd_rn(q.map_v[i], q.map_v[i + 1]), 0.5f);
  }
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  bool bad = false;
  // The loop bound is uniform across a warp, so every lane takes part in the shuffles.
  for (int64_t work = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); work < n_work; work += stride) {
    const AdamWChunk c = chunks[find_chunk(chunks, n_chunks, work)];
    const int64_t b = work - c.work_begin;
    switch (static_cast<ParamDtype>(c.dtype)) {  // uniform across the warp
      case ParamDtype::kFloat32:
        adamw8bit_block<float>(c, b, s, k, q, lane, bad);
        break;
      case ParamDtype::kFloat16:
        adamw8bit_block<__half>(c, b, s, k, q, lane, bad);
        break;
      case ParamDtype::kBFloat16:
        adamw8bit_block<__nv_bfloat16>(c, b, s, k, q, lane, bad);
        break;
    }
  }
  if (bad) *found_inf = 1.0f;
}

int64_t grid_for(int64_t blocks_wanted, int sm_count) {
  const int64_t cap = static_cast<int64_t>(sm_count > 0 ? sm_count : 132) * 8;  // 8 resident blocks per SM
  return blocks_wanted < cap ? blocks_wanted : cap;
}

}  // namespace

cudaError_t launch_adamw_step(const AdamWChunk* chunks, int64_t n_chunks, int64_t n_work, AdamWStates states,
                              AdamWConsts consts, float* found_inf, int sm_count, cudaStream_t stream) {
  if (n_work <= 0 || n_chunks <= 0) return cudaSuccess;
  const int64_t grid = grid_for(n_work, sm_count);
  adamw_step_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(chunks, n_chunks, n_work, states, consts,
                                                                          found_inf);
  return cudaGetLastError();
}

cudaError_t launch_adamw8bit_step(const AdamWChunk* chunks, int64_t n_chunks, int64_t n_work, AdamWStates states,
                                  AdamWConsts consts, float* found_inf, int sm_count, cudaStream_t stream) {
  if (n_work <= 0 || n_chunks <= 0) return cudaSuccess;
  const int64_t grid = grid_for((n_work + kWarps - 1) / kWarps, sm_count);
  adamw8bit_step_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(chunks, n_chunks, n_work, states,
                                                                              consts, found_inf);
  return cudaGetLastError();
}

}  // namespace qk_cuda
