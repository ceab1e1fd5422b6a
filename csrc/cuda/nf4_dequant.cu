// CUDA NF4 dequantize with the double-quantized absmax decoded in the same kernel.
//
//   out[e] = code[q(e)] * absmax[e / blocksize]   (fp32 product, rounded once to the out dtype)
//   absmax[b] = nested_code[absmax_q[b]] * nested_absmax[b / 256] + offset   (when nested)
//
// Launch shape: one thread owns 32 consecutive elements = 16 packed bytes (one 16-byte load) and
// writes them with 16-byte stores. Every allowed blocksize is a multiple of 32, so a thread's
// elements share one absmax: one scale decode per thread. The byte -> (value, value) decode reads
// a 256-entry float2 table in shared memory: one lookup yields two weights (not two nibble
// lookups), which keeps the kernel bound by memory rather than by issue slots.
//
// Numerics: __fmul_rn / __fadd_rn keep the absmax decode a separate multiply and add (no FMA
// contraction), matching bitsandbytes and the reference bit for bit.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dtype_convert.cuh"
#include "nf4_kernels.h"

namespace qk_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kElemsPerThread = 32;

template <typename T>
__global__ void __launch_bounds__(kThreads) dequantize_nf4_kernel(const uint8_t* __restrict__ packed,
                                                                  NF4Scales scales, const float* __restrict__ code,
                                                                  int64_t numel, int blocksize, T* __restrict__ out) {
  __shared__ float2 pair[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) pair[i] = make_float2(code[i >> 4], code[i & 15]);
  __syncthreads();

  const int64_t e0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kElemsPerThread;
  if (e0 >= numel) return;
  const float s = nf4_block_scale(scales, e0 / blocksize);

  if (e0 + kElemsPerThread <= numel && (reinterpret_cast<uintptr_t>(packed) & 15) == 0 &&
      (reinterpret_cast<uintptr_t>(out) & 15) == 0) {
    const uint4 word = *reinterpret_cast<const uint4*>(packed + e0 / 2);
    const uint32_t w[4] = {word.x, word.y, word.z, word.w};
    alignas(16) T vals[kElemsPerThread];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const float2 p = pair[(w[i / 4] >> (8 * (i % 4))) & 0xFF];
      vals[2 * i] = from_float<T>(__fmul_rn(p.x, s));
      vals[2 * i + 1] = from_float<T>(__fmul_rn(p.y, s));
    }
    constexpr int kVec = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < kElemsPerThread; i += kVec)
      *reinterpret_cast<uint4*>(out + e0 + i) = *reinterpret_cast<const uint4*>(vals + i);
    return;
  }
  // Tail (or unaligned pointers): element by element.
  for (int64_t e = e0; e < numel && e < e0 + kElemsPerThread; ++e) {
    const uint8_t b = packed[e >> 1];
    const float c = code[(e & 1) ? (b & 15) : (b >> 4)];
    out[e] = from_float<T>(__fmul_rn(c, s));
  }
}

template <typename T>
cudaError_t launch(const uint8_t* packed, NF4Scales scales, const float* code, int64_t numel, int blocksize, void* out,
                   cudaStream_t stream) {
  const int64_t threads = (numel + kElemsPerThread - 1) / kElemsPerThread;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  dequantize_nf4_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(packed, scales, code, numel,
                                                                                    blocksize, static_cast<T*>(out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_dequantize_nf4(const uint8_t* packed, NF4Scales scales, const float* code, int64_t numel,
                                  int blocksize, OutDtype out_dtype, void* out, cudaStream_t stream) {
  switch (out_dtype) {
    case OutDtype::kFloat32:
      return launch<float>(packed, scales, code, numel, blocksize, out, stream);
    case OutDtype::kFloat16:
      return launch<__half>(packed, scales, code, numel, blocksize, out, stream);
    case OutDtype::kBFloat16:
      return launch<__nv_bfloat16>(packed, scales, code, numel, blocksize, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qk_cuda
