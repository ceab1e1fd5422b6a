// CUDA NF4 GEMV for decode-sized batches (M = 1..4): y = x @ deq(W)^T, bound by the weight bytes.
//
// Launch shape: a block of 4 warps; each warp owns one output row n of W (all M outputs of it)
// over one K-split. Per step a lane loads 16 packed bytes (32 weights, one 16-byte load), and the
// 32 matching x values of each of the M rows (16-byte loads, served from L1/L2: x is tiny).
// Decode: one shared-memory lookup per byte yields both weights as a float2 (256-entry table of
// code pairs), so the lookup costs half an instruction per weight. The absmax block (blocksize
// >= 32) is constant over a lane's 32 weights: the lane accumulates sum(code * x) unscaled and
// multiplies by the block scale once, decoding the double-quantized scale inline (one uint8, one
// fp32 nested absmax, one table read per 32 weights). fp32 accumulation; warp-shuffle reduction.
//
// Split-K: with few rows (N small against the SM count) grid.y splits K, each split writing its
// fp32 partial sums to a workspace [splits, M, N] that the caller reduces.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dtype_convert.cuh"
#include "nf4_kernels.h"

namespace qk_cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kLaneElems = 32;                     // weights per lane per step (16 bytes)
constexpr int kWarpElems = 32 * kLaneElems;        // 1024 weights per warp per step

// 32 consecutive x values starting at p (16-byte aligned) as fp32.
template <typename T>
__device__ __forceinline__ void load_x32(const T* __restrict__ p, float* out) {
  constexpr int kVec = 16 / sizeof(T);
#pragma unroll
  for (int i = 0; i < kLaneElems; i += kVec) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p + i));
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[i + j] = to_float<T>(v[j]);
  }
}

template <typename T, int M>
__global__ void __launch_bounds__(kWarps * 32)
    nf4_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed, NF4Scales scales,
                    const float* __restrict__ code, int64_t n_rows, int64_t k, int blocksize, int64_t k_per_split,
                    T* __restrict__ y, float* __restrict__ partial) {
  __shared__ float2 pair[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) pair[i] = make_float2(code[i >> 4], code[i & 15]);
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= n_rows) return;
  const int64_t k_begin = blockIdx.y * k_per_split;
  const int64_t k_end = k_begin + k_per_split < k ? k_begin + k_per_split : k;

  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;

  const uint8_t* w_row = packed + row * (k / 2);
  for (int64_t k0 = k_begin + lane * kLaneElems; k0 < k_end; k0 += kWarpElems) {
    const uint4 word = __ldg(reinterpret_cast<const uint4*>(w_row + k0 / 2));
    const uint32_t bytes[4] = {word.x, word.y, word.z, word.w};
    float w[kLaneElems];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const float2 p = pair[(bytes[i / 4] >> (8 * (i % 4))) & 0xFF];
      w[2 * i] = p.x;
      w[2 * i + 1] = p.y;
    }
    const float s = nf4_block_scale(scales, (row * k + k0) / blocksize);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xv[kLaneElems];
      load_x32<T>(x + m * k + k0, xv);
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < kLaneElems; ++i) dot = fmaf(w[i], xv[i], dot);
      acc[m] = fmaf(dot, s, acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) {
      if (partial != nullptr) {
        partial[(static_cast<int64_t>(blockIdx.y) * M + m) * n_rows + row] = v;
      } else {
        y[m * n_rows + row] = from_float<T>(v);
      }
    }
  }
}

template <typename T, int M>
cudaError_t launch_m(const void* x, const uint8_t* packed, NF4Scales scales, const float* code, int64_t n, int64_t k,
                     int blocksize, int splits, void* y, cudaStream_t stream) {
  // Each split covers a multiple of a warp's step so lanes stay aligned to 32-weight chunks.
  int64_t k_per_split = (k + splits - 1) / splits;
  k_per_split = (k_per_split + kWarpElems - 1) / kWarpElems * kWarpElems;
  const dim3 grid(static_cast<unsigned>((n + kWarps - 1) / kWarps), static_cast<unsigned>(splits));
  T* y_out = splits == 1 ? static_cast<T*>(y) : nullptr;
  float* partial = splits == 1 ? nullptr : static_cast<float*>(y);
  nf4_gemv_kernel<T, M><<<grid, kWarps * 32, 0, stream>>>(static_cast<const T*>(x), packed, scales, code, n, k,
                                                          blocksize, k_per_split, y_out, partial);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_t(const void* x, int m, const uint8_t* packed, NF4Scales scales, const float* code, int64_t n,
                     int64_t k, int blocksize, int splits, void* y, cudaStream_t stream) {
  switch (m) {
    case 1:
      return launch_m<T, 1>(x, packed, scales, code, n, k, blocksize, splits, y, stream);
    case 2:
      return launch_m<T, 2>(x, packed, scales, code, n, k, blocksize, splits, y, stream);
    case 3:
      return launch_m<T, 3>(x, packed, scales, code, n, k, blocksize, splits, y, stream);
    case 4:
      return launch_m<T, 4>(x, packed, scales, code, n, k, blocksize, splits, y, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_nf4_gemv(const void* x, OutDtype x_dtype, int m, const uint8_t* packed, NF4Scales scales,
                            const float* code, int64_t n, int64_t k, int blocksize, int splits, void* y,
                            cudaStream_t stream) {
  if (k % kLaneElems != 0 || k % blocksize != 0 || splits < 1) return cudaErrorInvalidValue;
  switch (x_dtype) {
    case OutDtype::kFloat32:
      return launch_t<float>(x, m, packed, scales, code, n, k, blocksize, splits, y, stream);
    case OutDtype::kFloat16:
      return launch_t<__half>(x, m, packed, scales, code, n, k, blocksize, splits, y, stream);
    case OutDtype::kBFloat16:
      return launch_t<__nv_bfloat16>(x, m, packed, scales, code, n, k, blocksize, splits, y, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qk_cuda
