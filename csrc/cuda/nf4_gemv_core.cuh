// The NF4 GEMV algorithm, one warp's work, written once for the GPU and for a host emulation.
//
// nf4_gemv.cu instantiates it with device policies (warp-shuffle table lookup, __ldg loads,
// bf16/fp16 conversions); tests/cuda_host/gemv_emulation.cpp instantiates it with host policies
// and runs every lane of every warp of the grid on the CPU, so the indexing, the nibble order, the
// K splits and the tail handling are tested without a GPU. This header includes nothing from CUDA.
//
// What one warp computes (blocksize = 2^blocksize_log2, a multiple of 32 dividing K): for rows row0 .. row0 + R - 1 of W [N, K] (those < N) and all M rows of
// x [M, K], the partial sums  sum_{k in [k_begin, k_end)} x[m, k] * deq(W)[row, k]  spread over
// its 32 lanes (the caller reduces across lanes). The warp walks its K range in steps of 1024
// weights: lane l owns the 32 weights [base + 32 l, base + 32 l + 32) of each row, which are 16
// packed bytes (one 16-byte load per row) and share one absmax block (blocksize >= 32, K % blocksize
// == 0). The lane loads the 32 matching x values of each of the M rows once and uses them for all R
// rows (x is read once per R rows, not once per row). The next step's packed words are loaded
// before the current step is computed (two steps of loads in flight).
//
// Decode: a 32-bit word holds 8 codes; element 2i of the word is the high nibble of byte i, element
// 2i+1 the low nibble (bitsandbytes' order). The lookup takes the code *shifted down* (not masked):
// the device policy is a warp shuffle from a lane holding code[lane & 15], and a shuffle reads only
// the low 5 bits of its source lane, so bits above the nibble select a replica of the same value.
// Each weight then costs one shift, one lookup and one FMA. The 32 weights of a lane are summed
// unscaled and multiplied by the block's absmax once.
//
// Uniformity: every lane of a warp runs the same number of steps and every lookup (a shuffle must
// be executed by the whole warp); lanes past k_end or rows past N work on zeros and write nothing.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define QK_HD __host__ __device__ __forceinline__
#else
#define QK_HD inline
#endif

namespace qk_cuda {

// 16 packed bytes: 32 NF4 codes, the four words in memory order.
struct Words4 {
  uint32_t w[4];
};

constexpr int kGemvLaneElems = 32;                        // weights per lane per step (16 bytes)
constexpr int kGemvWarpElems = 32 * kGemvLaneElems;       // 1024 weights per warp per step
constexpr int kGemvWarps = 4;                             // warps per block
constexpr int kGemvRows = 4;                              // rows of W per warp

// The launch geometry: blocks along N (kGemvWarps * kGemvRows rows each) and the K range of each of
// the `splits` blocks along y (a multiple of a warp's step, so lanes stay on 32-weight chunks).
struct GemvGeometry {
  int64_t blocks_x;
  int64_t k_per_split;
};

QK_HD GemvGeometry gemv_geometry(int64_t n, int64_t k, int64_t splits) {
  int64_t k_per_split = (k + splits - 1) / splits;
  k_per_split = (k_per_split + kGemvWarpElems - 1) / kGemvWarpElems * kGemvWarpElems;
  const int64_t rows_per_block = static_cast<int64_t>(kGemvWarps) * kGemvRows;
  return GemvGeometry{(n + rows_per_block - 1) / rows_per_block, k_per_split};
}

// How many K splits to launch on `sm_count` SMs: until there are about 16 warps (row groups x splits)
// per SM, keeping >= 1024 weights a split; after rounding each split to whole warp steps, the splits
// left empty are dropped (N = K = 4096 asks for 3 splits of 2048 -> 2).
QK_HD int gemv_splits(int64_t n, int64_t k, int sm_count) {
  const int64_t target_warps = 16LL * sm_count;
  const int64_t warps = (n + kGemvRows - 1) / kGemvRows;
  int64_t splits = (target_warps + warps - 1) / warps;
  if (splits > k / kGemvWarpElems) splits = k / kGemvWarpElems;
  if (splits < 1) splits = 1;
  const int64_t per_split = gemv_geometry(n, k, splits).k_per_split;
  return static_cast<int>((k + per_split - 1) / per_split);
}

// Where warp `warp` of block (bx, by) works: its first row and its K range [k_begin, k_end).
struct GemvWarpRange {
  int64_t row0, k_begin, k_end;
};

QK_HD GemvWarpRange gemv_warp_range(int64_t bx, int64_t by, int warp, int64_t k, int64_t k_per_split) {
  const int64_t k_begin = by * k_per_split;
  return GemvWarpRange{(bx * kGemvWarps + warp) * kGemvRows, k_begin,
                       k_begin + k_per_split < k ? k_begin + k_per_split : k};
}

// log2 of a power-of-two blocksize.
QK_HD int gemv_log2(int blocksize) {
  int s = 0;
  while ((1 << s) < blocksize) ++s;
  return s;
}

// The 8 weights (codes, unscaled) of one packed word.
template <typename Lut>
QK_HD void gemv_decode_word(uint32_t word, const Lut& lut, float out[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = lut(word >> (8 * i + 4));  // high nibble of byte i: the earlier element
    out[2 * i + 1] = lut(word >> (8 * i));  // low nibble of byte i
  }
}

// Policy P provides:
//   static Words4 load_words(const uint8_t* p);          16 bytes at p (16-byte aligned)
//   static void load_x8(const T* p, float out[8]);       8 consecutive x values as fp32
//   static float scale(const NF4Scales& s, int64_t b);    fp32 absmax of block b
// and Lut is a callable uint32_t -> float with lut(i) == code[i & 15].
template <typename T, int M, int R, typename P, typename Scales, typename Lut>
QK_HD void gemv_warp(const T* __restrict__ x, const uint8_t* __restrict__ packed, const Scales& scales,
                     int64_t n_rows, int64_t k, int blocksize_log2, int64_t row0, int64_t k_begin, int64_t k_end,
                     int lane, const Lut& lut, float acc[M][R]) {
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.0f;

  const int64_t row_bytes = k / 2;
  bool row_ok[R];
#pragma unroll
  for (int r = 0; r < R; ++r) row_ok[r] = row0 + r < n_rows;

  // Packed words of the step starting at base (zeros where the lane or the row is out of range).
  auto load_step = [&](int64_t base, Words4 out[R]) {
    const int64_t k0 = base + static_cast<int64_t>(lane) * kGemvLaneElems;
    const bool lane_ok = k0 < k_end;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (lane_ok && row_ok[r]) {
        out[r] = P::load_words(packed + (row0 + r) * row_bytes + k0 / 2);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) out[r].w[j] = 0u;
      }
    }
  };

  Words4 cur[R];
  Words4 nxt[R];
  load_step(k_begin, cur);
  for (int64_t base = k_begin; base < k_end; base += kGemvWarpElems) {
    if (base + kGemvWarpElems < k_end) {
      load_step(base + kGemvWarpElems, nxt);
    } else {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < 4; ++j) nxt[r].w[j] = 0u;
    }
    const int64_t k0 = base + static_cast<int64_t>(lane) * kGemvLaneElems;
    const bool lane_ok = k0 < k_end;
    float part[M][R];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) part[m][r] = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // the lane's 4 words: weights k0 + 8j .. k0 + 8j + 7
      float xv[M][8];
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if (lane_ok) {
          P::load_x8(x + m * k + k0 + 8 * j, xv[m]);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) xv[m][i] = 0.0f;
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float w[8];
        gemv_decode_word(cur[r].w[j], lut, w);  // every lane decodes (the lookup is warp-wide)
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
          for (int i = 0; i < 8; ++i) part[m][r] = w[i] * xv[m][i] + part[m][r];
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      // the block of the lane's 32 weights (blocksize is a power of two: a shift, not a 64-bit division)
      const float s = (lane_ok && row_ok[r]) ? P::scale(scales, ((row0 + r) * k + k0) >> blocksize_log2) : 0.0f;
#pragma unroll
      for (int m = 0; m < M; ++m) acc[m][r] = part[m][r] * s + acc[m][r];
    }
#pragma unroll
    for (int r = 0; r < R; ++r) cur[r] = nxt[r];
  }
}

}  // namespace qk_cuda
