// CUDA NF4 GEMV for decode-sized batches (M = 1..4): y = x @ deq(W)^T, bound by the weight bytes.
//
// Launch shape: a block of 4 warps; each warp owns kRows = 4 consecutive rows of W (all M outputs
// of each) over one K split; its lanes walk K as nf4_gemv_core.cuh describes (16 packed bytes per
// lane per row per step, the matching x values loaded once for the 4 rows, the next step's bytes in
// flight while the current one is computed). fp32 accumulation; warp-shuffle reduction; lane 0
// writes the warp's M x 4 results.
//
// Decode: the 16-entry NF4 table lives in registers, code[lane & 15] in each lane, and a lookup is
// a warp shuffle (`__shfl_sync` reads the low 5 bits of its source lane, so the code shifted down
// to the nibble is the lane index as it is): one shift, one shuffle and one FMA per weight, no
// shared memory and no bank conflicts (a 256-entry float2 table in shared memory costs about six
// wavefronts per warp-wide random 8-byte load).
//
// Split-K: with few rows (N small against the SM count) grid.y splits K, each split writing its
// fp32 partial sums to a workspace [splits, M, N] that the caller reduces.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dtype_convert.cuh"
#include "nf4_gemv_core.cuh"
#include "nf4_kernels.h"

namespace qk_cuda {
namespace {

constexpr int kWarps = kGemvWarps;
constexpr int kRows = kGemvRows;

template <typename T>
struct DevicePolicy {
  static __device__ __forceinline__ Words4 load_words(const uint8_t* p) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    return Words4{{v.x, v.y, v.z, v.w}};
  }
  // 8 consecutive x values (16 bytes for 16-bit types, 32 bytes for fp32); x is 16-byte aligned and
  // every lane's offset is a multiple of 8 elements.
  static __device__ __forceinline__ void load_x8(const T* p, float out[8]) {
    constexpr int kVec = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < 8; i += kVec) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p + i));
      const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < kVec; ++j) out[i + j] = to_float<T>(v[j]);
    }
  }
  static __device__ __forceinline__ float scale(const NF4Scales& s, int64_t block) { return nf4_block_scale(s, block); }
};

// code[i & 15] from the lane that holds it.
struct ShuffleLut {
  float mine;  // code[lane & 15]
  __device__ __forceinline__ float operator()(uint32_t i) const {
    return __shfl_sync(0xffffffffu, mine, static_cast<int>(i));
  }
};

template <typename T, int M>
__global__ void __launch_bounds__(kWarps * 32)
    nf4_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed, NF4Scales scales,
                    const float* __restrict__ code, int64_t n_rows, int64_t k, int blocksize_log2, int64_t k_per_split,
                    T* __restrict__ y, float* __restrict__ partial) {
  const int lane = threadIdx.x & 31;
  const GemvWarpRange range = gemv_warp_range(blockIdx.x, blockIdx.y, threadIdx.x >> 5, k, k_per_split);
  const int64_t row0 = range.row0;
  if (row0 >= n_rows) return;  // the whole warp leaves together
  const ShuffleLut lut{__ldg(code + (lane & 15))};

  float acc[M][kRows];
  gemv_warp<T, M, kRows, DevicePolicy<T>>(x, packed, scales, n_rows, k, blocksize_log2, row0, range.k_begin,
                                          range.k_end, lane, lut, acc);
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float v = acc[m][r];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      const int64_t row = row0 + r;
      if (lane == 0 && row < n_rows) {
        if (partial != nullptr) {
          partial[(static_cast<int64_t>(blockIdx.y) * M + m) * n_rows + row] = v;
        } else {
          y[m * n_rows + row] = from_float<T>(v);
        }
      }
    }
  }
}

template <typename T, int M>
cudaError_t launch_m(const void* x, const uint8_t* packed, NF4Scales scales, const float* code, int64_t n, int64_t k,
                     int blocksize, int splits, void* y, cudaStream_t stream) {
  const GemvGeometry geo = gemv_geometry(n, k, splits);
  const dim3 grid(static_cast<unsigned>(geo.blocks_x), static_cast<unsigned>(splits));
  T* y_out = splits == 1 ? static_cast<T*>(y) : nullptr;
  float* partial = splits == 1 ? nullptr : static_cast<float*>(y);
  nf4_gemv_kernel<T, M><<<grid, kWarps * 32, 0, stream>>>(static_cast<const T*>(x), packed, scales, code, n, k,
                                                          gemv_log2(blocksize), geo.k_per_split, y_out, partial);
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
  const bool power_of_two = blocksize >= kGemvLaneElems && (blocksize & (blocksize - 1)) == 0;
  if (!power_of_two || k % blocksize != 0 || splits < 1) return cudaErrorInvalidValue;
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
