// C++ CPU kernels for NF4 (bitsandbytes layout): quantize, dequantize and the small-M matmul.
//
// Layout (see qlora_kernels/reference/nf4.py for the readable formulas these must match):
//   packed  uint8 [(numel+1)/2]  two 4-bit codes a byte, element 2j in the high nibble;
//   absmax  fp32 [nb] (or uint8 codes [nb] with nested_absmax fp32 [ceil(nb/256)] and
//           nested_code fp32 [256]: absmax[i] = nested_code[q[i]] * nested_absmax[i/256] + offset);
//   w[e] = code[q(e)] * absmax[e / blocksize], rounded once to fp32, then to the output dtype.
//
// Parallelism: at::parallel_for (OpenMP in torch's builds), so torch.set_num_threads applies.
// SIMD: on x86-64 the hot loops have an AVX2 version chosen at run time (no -march needed):
// a 16-entry table lookup is two 8-lane permutes and a blend, so one byte costs a fraction of
// an instruction per decoded value. Elsewhere a portable scalar loop runs.
//
// Numerics: built with -ffp-contract=off so that "multiply, then add" stays two fp32 roundings,
// as in bitsandbytes and the reference (bitwise-equal dequantization). The matmul accumulates in
// fp32 and may use FMA: it is compared with a tolerance, not bit for bit.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "isa.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QK_HAVE_X86 1
#else
#define QK_HAVE_X86 0
#endif

namespace qk_cpu {
namespace {

constexpr int64_t kNestedBlock = 256;
constexpr float kTiny = 1e-38f;  // bitsandbytes' floor on absmax before scaling

// fp32 absmax per block, decoding the double quantization if present.
std::vector<float> decode_absmax(const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                                 const std::optional<at::Tensor>& nested_code, double offset) {
  const int64_t nb = absmax.numel();
  std::vector<float> out(nb);
  // Every pointer below comes from a named contiguous tensor that lives until the copy is done
  // (a pointer into the temporary of `t.contiguous().data_ptr()` would dangle for strided input).
  const at::Tensor q_t = absmax.contiguous();
  if (!nested_absmax.has_value()) {
    const float* a = q_t.data_ptr<float>();
    std::copy(a, a + nb, out.begin());
    return out;
  }
  const at::Tensor na_t = nested_absmax->contiguous();
  const at::Tensor nc_t = nested_code->contiguous();
  const uint8_t* q = q_t.data_ptr<uint8_t>();
  const float* na = na_t.data_ptr<float>();
  const float* nc = nc_t.data_ptr<float>();
  const float off = static_cast<float>(offset);
  for (int64_t i = 0; i < nb; ++i) {
    const float scaled = nc[q[i]] * na[i / kNestedBlock];
    out[i] = scaled + off;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Decode elements [e0, e0 + len) of the flat weight into fp32 `out`. Any start and length.

void decode_range_scalar(const uint8_t* packed, const float* absmax, const float* code, int64_t bs, int64_t e0,
                         int64_t len, float* out) {
  int64_t e = e0;
  const int64_t end = e0 + len;
  while (e < end) {
    const int64_t blk_end = std::min(end, (e / bs + 1) * bs);
    const float s = absmax[e / bs];
    float table[16];
    for (int i = 0; i < 16; ++i) table[i] = code[i] * s;
    if ((e & 1) && e < blk_end) {
      *out++ = table[packed[e >> 1] & 15];
      ++e;
    }
    for (; e + 1 < blk_end; e += 2) {
      const uint8_t b = packed[e >> 1];
      *out++ = table[b >> 4];
      *out++ = table[b & 15];
    }
    if (e < blk_end) {
      *out++ = table[packed[e >> 1] >> 4];
      ++e;
    }
  }
}

#if QK_HAVE_X86
__attribute__((target("avx2,fma,f16c"))) inline __m256 lookup8(__m256i idx, __m256 lo, __m256 hi) {
  // permutevar reads the low 3 bits of each index; bit 3, shifted into the sign, picks the half.
  const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// 16 packed bytes -> 32 fp32 values through the scaled table (lo = entries 0..7, hi = 8..15).
__attribute__((target("avx2,fma,f16c"))) inline void decode32(const uint8_t* p, __m256 lo, __m256 hi, float* out) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m128i low = _mm_and_si128(bytes, mask);
  const __m128i c0 = _mm_unpacklo_epi8(high, low);  // codes of elements 0..15, in order
  const __m128i c1 = _mm_unpackhi_epi8(high, low);  // elements 16..31
  _mm256_storeu_ps(out + 0, lookup8(_mm256_cvtepu8_epi32(c0), lo, hi));
  _mm256_storeu_ps(out + 8, lookup8(_mm256_cvtepu8_epi32(_mm_srli_si128(c0, 8)), lo, hi));
  _mm256_storeu_ps(out + 16, lookup8(_mm256_cvtepu8_epi32(c1), lo, hi));
  _mm256_storeu_ps(out + 24, lookup8(_mm256_cvtepu8_epi32(_mm_srli_si128(c1, 8)), lo, hi));
}

__attribute__((target("avx2,fma,f16c"))) void decode_range_avx2(const uint8_t* packed, const float* absmax,
                                                                const float* code, int64_t bs, int64_t e0,
                                                                int64_t len, float* out) {
  int64_t e = e0;
  const int64_t end = e0 + len;
  const __m256 code_lo = _mm256_loadu_ps(code);
  const __m256 code_hi = _mm256_loadu_ps(code + 8);
  while (e < end) {
    const int64_t blk_end = std::min(end, (e / bs + 1) * bs);
    const float s = absmax[e / bs];
    const __m256 vs = _mm256_set1_ps(s);
    // Scaling the table rounds code[q] * s exactly once, as the reference does per element.
    const __m256 lo = _mm256_mul_ps(code_lo, vs);
    const __m256 hi = _mm256_mul_ps(code_hi, vs);
    if ((e & 1) && e < blk_end) {
      *out++ = code[packed[e >> 1] & 15] * s;
      ++e;
    }
    for (; e + 32 <= blk_end; e += 32, out += 32) decode32(packed + (e >> 1), lo, hi, out);
    for (; e < blk_end; ++e) {
      const uint8_t b = packed[e >> 1];
      *out++ = code[(e & 1) ? (b & 15) : (b >> 4)] * s;
    }
  }
}

// Round-to-nearest-even fp32 -> bf16/fp16 (as torch's .to() does), 8 at a time.
__attribute__((target("avx2,fma,f16c"))) void store_bf16(const float* in, int64_t n, c10::BFloat16* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(in + i));
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_castsi256_si128(packed));
  }
  for (; i < n; ++i) out[i] = c10::BFloat16(in[i]);
}

__attribute__((target("avx2,fma,f16c"))) void store_f16(const float* in, int64_t n, c10::Half* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  for (; i < n; ++i) out[i] = c10::Half(in[i]);
}

__attribute__((target("avx2,fma,f16c"))) float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
         acc3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  const __m256 acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  float sum = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

__attribute__((target("avx2,fma,f16c"))) void axpy_avx2(float* y, float alpha, const float* x, int64_t n) {
  const __m256 va = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}
// AVX-512: the whole 16-entry table fits one register, so a lookup is one permutexvar for 16
// values; the result is converted and stored in the output dtype directly (no fp32 round trip).
#define QK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

QK_AVX512 inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
QK_AVX512 inline void store16(c10::BFloat16* out, __m512 v) {
  // Round to nearest even on the bits, exactly as c10::BFloat16(float) (values are finite).
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(r));
}
QK_AVX512 inline void store16(c10::Half* out, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <typename T>
QK_AVX512 void decode_range_avx512(const uint8_t* packed, const float* absmax, const float* code, int64_t bs,
                                   int64_t e0, int64_t len, T* out) {
  int64_t e = e0;
  const int64_t end = e0 + len;
  const __m512 table = _mm512_loadu_ps(code);
  const __m128i mask = _mm_set1_epi8(0x0F);
  while (e < end) {
    const int64_t blk_end = std::min(end, (e / bs + 1) * bs);
    const float s = absmax[e / bs];
    const __m512 scaled = _mm512_mul_ps(table, _mm512_set1_ps(s));  // code[q] * s, rounded once
    if ((e & 1) && e < blk_end) {
      *out++ = T(code[packed[e >> 1] & 15] * s);
      ++e;
    }
    for (; e + 32 <= blk_end; e += 32, out += 32) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (e >> 1)));
      const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
      const __m128i low = _mm_and_si128(bytes, mask);
      store16(out, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(high, low)), scaled));
      store16(out + 16, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(high, low)), scaled));
    }
    for (; e < blk_end; ++e) {
      const uint8_t b = packed[e >> 1];
      *out++ = T(code[(e & 1) ? (b & 15) : (b >> 4)] * s);
    }
  }
}
#endif  // QK_HAVE_X86

void decode_range(const uint8_t* packed, const float* absmax, const float* code, int64_t bs, int64_t e0, int64_t len,
                  float* out) {
#if QK_HAVE_X86
  if (cpu_has_avx512()) return decode_range_avx512<float>(packed, absmax, code, bs, e0, len, out);
  if (cpu_has_avx2()) return decode_range_avx2(packed, absmax, code, bs, e0, len, out);
#endif
  decode_range_scalar(packed, absmax, code, bs, e0, len, out);
}

float dot(const float* a, const float* b, int64_t n) {
#if QK_HAVE_X86
  if (cpu_has_avx2()) return dot_avx2(a, b, n);
#endif
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

void axpy(float* y, float alpha, const float* x, int64_t n) {
#if QK_HAVE_X86
  if (cpu_has_avx2()) return axpy_avx2(y, alpha, x, n);
#endif
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

template <typename T>
void store(const float* in, int64_t n, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(in, in + n, out);
  } else {
#if QK_HAVE_X86
    if (cpu_has_avx2()) {
      if constexpr (std::is_same_v<T, c10::BFloat16>) return store_bf16(in, n, out);
      else return store_f16(in, n, out);
    }
#endif
    for (int64_t i = 0; i < n; ++i) out[i] = T(in[i]);
  }
}

// The block (relative to the first) that element `e` of a row is in, for a power-of-two blocksize `bs` given as
// its log2: a shift, not a division (an integer division per line measured as a large share of the GEMV).
inline int64_t block_of(int64_t e, int bs_log2) { return e >> bs_log2; }

inline int log2_of(int64_t v) {
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Small-M GEMV straight from the NF4 bytes: y[m, r] = sum_b s(r, b) * sum_{j in block b} code[q(r, j)] x[m, j].
// No weight is ever written out: each 64-byte line of packed codes is read once, its 128 codes looked up in
// registers, and multiplied with every x row of the pass; the block scale multiplies the block's partial sums.
//
// The lookup reads the bytes as 16 dwords. Shifting a dword right by 4t puts its nibble t in the low 4 bits,
// which is all a 16-entry permute reads: 8 shifts and 8 permutes give the 128 codes of a line. Nibble t of
// dword lane i is element 8i + (t ^ 1) of the line (bitsandbytes puts the even element in the high nibble),
// so x is laid out once per call in that order (prepare_x), and the 8 products of a lane add up to the dot
// product of its 8 elements. AVX2 does the same on 8 dwords (32 bytes, 64 codes) with two 8-entry permutes
// and a blend.

// x [M, K] in the lane order of `line` elements per line (128 for AVX-512, 64 for AVX2), zero past K.
void prepare_x(const float* x, int64_t m, int64_t k, int64_t line, std::vector<float>& out) {
  const int64_t lanes = line / 8;
  const int64_t kp = (k + line - 1) / line * line;
  out.assign(m * kp, 0.0f);
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * k;
    float* oi = out.data() + i * kp;
    for (int64_t c = 0; c < kp; c += line)
      for (int t = 0; t < 8; ++t)
        for (int64_t l = 0; l < lanes; ++l) {
          const int64_t e = c + 8 * l + (t ^ 1);
          oi[c + t * lanes + l] = e < k ? xi[e] : 0.0f;
        }
  }
}

// The fp32 scales of row r's blocks (bs divides K), decoding the double quantization on the fly, as
// decode_absmax does (product and sum rounded apart), followed by `pad` zeros.
struct ScaleSource {
  const float* absmax = nullptr;  // fp32 absmax, or
  const uint8_t* q = nullptr;     // its codes with the nested constants
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  float offset = 0.0f;
  void row(int64_t b0, int64_t nb, int64_t pad, float* out) const {
    if (absmax != nullptr) {
      std::copy(absmax + b0, absmax + b0 + nb, out);
    } else {
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t b = b0 + j;
        const float scaled = nested_code[q[b]] * nested_absmax[b / kNestedBlock];
        out[j] = scaled + offset;
      }
    }
    std::fill(out + nb, out + nb + pad, 0.0f);
  }
};

// y (fp32 [m, n]) rounded into a bf16 tensor here (round to nearest even, as .to() rounds): a decode layer's call is
// a few microseconds, and each tensor op more is one.
at::Tensor bf16_matrix(const std::vector<float>& y, int64_t m, int64_t n, const at::TensorOptions& options) {
  at::Tensor out = at::empty({m, n}, options.dtype(at::kBFloat16));
  c10::BFloat16* p = out.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < m * n; ++i) p[i] = c10::BFloat16(y[i]);
  return out;
}

// The ScaleSource of a weight's block scales; `keep` holds the contiguous tensors its pointers read.
ScaleSource scale_source(const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& nested_code, double nested_offset,
                         std::vector<at::Tensor>& keep) {
  ScaleSource src;
  keep.push_back(absmax.contiguous());
  if (nested_absmax.has_value()) {
    keep.push_back(nested_absmax->contiguous());
    keep.push_back(nested_code->contiguous());
    src.q = keep[0].data_ptr<uint8_t>();
    src.nested_absmax = keep[1].data_ptr<float>();
    src.nested_code = keep[2].data_ptr<float>();
    src.offset = static_cast<float>(nested_offset);
  } else {
    src.absmax = keep[0].data_ptr<float>();
  }
  return src;
}

#if QK_HAVE_X86
// ScaleSource::row with AVX-512: the double quantization decoded 16 blocks at a time (the codes gathered from
// the 256-entry nested table, which stays in L1), the same two roundings (product, then sum; no FMA: the
// extension is built with -ffp-contract=off). A row's scalar decode measured ~30% of the one-row GEMV's time.
QK_AVX512 void scale_row_avx512(const ScaleSource& s, int64_t b0, int64_t nb, int64_t pad, float* out) {
  static_assert(kNestedBlock == 256, "the straddling case below divides by 256 with a shift");
  if (s.absmax != nullptr || nb < 16) {
    s.row(b0, nb, pad, out);
    return;
  }
  const __m512 offset = _mm512_set1_ps(s.offset);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t j = 0;
  for (; j + 16 <= nb; j += 16) {
    const int64_t b = b0 + j;
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s.q + b)));
    const __m512 code = _mm512_i32gather_ps(q, s.nested_code, 4);
    __m512 na;
    if (b / kNestedBlock == (b + 15) / kNestedBlock) {
      na = _mm512_set1_ps(s.nested_absmax[b / kNestedBlock]);
    } else {  // the 16 blocks straddle two nested blocks
      const __m512i nested = _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(b % kNestedBlock)),
                                                                iota), 8);
      na = _mm512_i32gather_ps(_mm512_add_epi32(nested, _mm512_set1_epi32(static_cast<int32_t>(b / kNestedBlock))),
                               s.nested_absmax, 4);
    }
    _mm512_storeu_ps(out + j, _mm512_add_ps(_mm512_mul_ps(code, na), offset));
  }
  s.row(b0 + j, nb - j, pad, out + j);  // the last blocks and the padding
}
#endif

// The M = 1 walks read rows front to back and prefetch 4 lines ahead: without it one core's stream measured ~9.5
// GB/s from DRAM on the development machine, with it ~12.5-13.5 (further ahead was no better).
constexpr int64_t kPrefetchAhead = 256;

#if QK_HAVE_X86
// Rows [r0, r1) of y for MB x rows (xp: prepare_x with 128-element lines, row stride kp), y row stride ldy.
template <int MB>
QK_AVX512 void gemv_rows_avx512(const uint8_t* packed, const ScaleSource& src, const float* code, int64_t bs,
                                int64_t k, const float* xp, int64_t kp, int64_t r0, int64_t r1, float* y,
                                int64_t ldy) {
  const __m512 table = _mm512_loadu_ps(code);
  const int64_t lines = kp / 128;
  const int64_t nb = k / bs;
  const int bs_log2 = log2_of(bs);
  // lane i covers elements 8i..8i+7 of a line: its block, relative to the line's first
  alignas(64) int32_t lane_block[16];
  for (int i = 0; i < 16; ++i) lane_block[i] = bs < 128 ? static_cast<int32_t>(8 * i / bs) : 0;
  const __m512i sidx = _mm512_load_si512(lane_block);
  std::vector<float> scales(nb + 16);
  // the dwords of a row's last line: all 16, or those of its last 16, 32 or 48 bytes (K % 128 = 32, 64, 96)
  const __mmask16 tail = static_cast<__mmask16>((k / 2) % 64 ? (1u << ((k / 2) % 64 / 4)) - 1 : 0xFFFF);
  for (int64_t r = r0; r < r1; ++r) {
    scale_row_avx512(src, r * nb, nb, 16, scales.data());
    const uint8_t* p = packed + r * (k / 2);
    __m512 acc[MB];
    for (int j = 0; j < MB; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < lines; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(p + c * 64 + kPrefetchAhead), _MM_HINT_T0);
      const __m512i d = c + 1 < lines || tail == 0xFFFF ? _mm512_loadu_si512(p + c * 64)
                                                        : _mm512_maskz_loadu_epi32(tail, p + c * 64);
      __m512 cv[8];
      cv[0] = _mm512_permutexvar_ps(d, table);
      cv[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), table);
      cv[2] = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 8), table);
      cv[3] = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 12), table);
      cv[4] = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 16), table);
      cv[5] = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 20), table);
      cv[6] = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 24), table);
      cv[7] = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 28), table);
      const __m512 sv = _mm512_permutexvar_ps(sidx, _mm512_loadu_ps(scales.data() + block_of(c * 128, bs_log2)));
      for (int j = 0; j < MB; ++j) {
        const float* xj = xp + j * kp + c * 128;
        __m512 t = _mm512_mul_ps(cv[0], _mm512_loadu_ps(xj));
        for (int q = 1; q < 8; ++q) t = _mm512_fmadd_ps(cv[q], _mm512_loadu_ps(xj + 16 * q), t);
        acc[j] = _mm512_fmadd_ps(t, sv, acc[j]);
      }
    }
    for (int j = 0; j < MB; ++j) y[j * ldy + r] = _mm512_reduce_add_ps(acc[j]);
  }
}
#endif

#if QK_HAVE_X86
// bf16 activations with avx512_bf16, M = 1: one vdpbf16ps for 32 products. A row's 64-byte line (128 codes) is
// read as 32 words; shifting the words right by 4t puts nibble t in the low 4 bits of each, and vpermw reads 5
// bits of each word from the 16 bf16 codes stored twice (bit 4, the next nibble's, selects the same value): a
// shift and a permute give 32 weights. Word w covers elements 4w..4w+3 of the line (nibble t is element
// 4w + (t ^ 1): bitsandbytes puts the even element in the high nibble), so x is laid out once per call in that
// order (prepare_x_bf16), and lane l of a dot product sums elements 8l..8l+7 of the line, which are in one block.
// The codes are looked up unscaled, as bf16 (one rounding of the weight, as a bf16 W has); the line's four dot
// products chain into one vector, which the lanes' fp32 block scales multiply into the row's accumulator.
// Per line: 4 permutes, 3 shifts, 4 dot products, 1 FMA and 1 permute of the scales: the machine this was
// measured on (a Zen 4, whose 512-bit operations issue about one a cycle) runs it in ~11-14 cycles, ~1.6x the
// line's table scaled per line (block scales times the codes, rounded to bf16) that it replaced.
void prepare_x_bf16(const c10::BFloat16* x, int64_t k, std::vector<uint16_t>& out) {
  const int64_t kp = (k + 127) / 128 * 128;
  out.assign(kp, 0);
  const uint16_t* xi = reinterpret_cast<const uint16_t*>(x);
  for (int64_t c = 0; c < kp; c += 128)
    for (int t = 0; t < 4; ++t)
      for (int64_t w = 0; w < 32; ++w) {
        const int64_t e = c + 4 * w + (t ^ 1);
        out[c + t * 32 + w] = e < k ? xi[e] : 0;
      }
}

#define QK_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Rows [r0, r1) of y (one x row, from prepare_x_bf16), R rows side by side (each x load serves the R rows: when x
// is longer than L1 holds). Each row is read front to back with a software prefetch kPrefetchAhead bytes ahead.
template <int R>
QK_AVX512BF16 void gemv_rows_avx512_bf16(const uint8_t* packed, const ScaleSource& src, const float* code, int64_t bs,
                                         int64_t k, const uint16_t* xp, int64_t r0, int64_t r1, float* y) {
  alignas(64) uint16_t twice[32];
  alignas(64) int32_t lane_block[16];  // the block of dot-product lane l within its line: 8l / bs
  for (int i = 0; i < 32; ++i) twice[i] = c10::BFloat16(code[i % 16]).x;
  for (int l = 0; l < 16; ++l) lane_block[l] = bs < 128 ? static_cast<int32_t>(8 * l / bs) : 0;
  const __m512i table = _mm512_load_si512(twice);
  const __m512i sidx = _mm512_load_si512(lane_block);
  const int64_t nb = k / bs, row_bytes = k / 2, lines = (row_bytes + 63) / 64;
  const int bs_log2 = log2_of(bs);
  // the dwords of the last line (K % 128 = 32, 64 or 96: 16, 32 or 48 bytes); the masked words look up code 0,
  // which multiplies the zeros of x past K
  const __mmask16 tail = static_cast<__mmask16>(row_bytes % 64 ? (1u << (row_bytes % 64 / 4)) - 1 : 0xFFFF);
  const int64_t ls = nb + 16;
  std::vector<float> scales(R * ls);  // the rows' block scales, and zeros the last line's 4-float load may read
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    const uint8_t* p[R];
    for (int i = 0; i < R; ++i) {
      scale_row_avx512(src, (r + i) * nb, nb, 16, scales.data() + i * ls);
      p[i] = packed + (r + i) * row_bytes;
    }
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < lines; ++c) {
      const uint16_t* xc = xp + c * 128;
      const __m512bh xv[4] = {(__m512bh)_mm512_loadu_si512(xc), (__m512bh)_mm512_loadu_si512(xc + 32),
                              (__m512bh)_mm512_loadu_si512(xc + 64), (__m512bh)_mm512_loadu_si512(xc + 96)};
      const int64_t sb = block_of(c * 128, bs_log2);
      for (int i = 0; i < R; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(p[i] + c * 64 + kPrefetchAhead), _MM_HINT_T0);
        const __m512i d = c + 1 < lines || tail == 0xFFFF ? _mm512_loadu_si512(p[i] + c * 64)
                                                           : _mm512_maskz_loadu_epi32(tail, p[i] + c * 64);
        __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_permutexvar_epi16(d, table), xv[0]);
        for (int s = 1; s < 4; ++s)
          t = _mm512_dpbf16_ps(t, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(d, 4 * s), table), xv[s]);
        const __m512 sv =
            _mm512_permutexvar_ps(sidx, _mm512_castps128_ps512(_mm_loadu_ps(scales.data() + i * ls + sb)));
        acc[i] = _mm512_fmadd_ps(t, sv, acc[i]);
      }
    }
    for (int i = 0; i < R; ++i) y[r + i] = _mm512_reduce_add_ps(acc[i]);
  }
  if constexpr (R > 1) {
    if (r < r1) gemv_rows_avx512_bf16<1>(packed, src, code, bs, k, xp, r, r1, y);
  }
}

// A cursor over bytes to prefetch into L2, one 64-byte line per step (none when empty): the row groups of the
// M >= 2 kernel read their rows in 64-byte pieces, which the hardware prefetcher does not follow, so the next
// group's rows are fetched while this group computes.
struct Prefetch {
  const uint8_t* p = nullptr;
  const uint8_t* end = nullptr;
  void next() {
    if (p < end) {
      _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
      p += 64;
    }
  }
};
#endif

#if QK_HAVE_X86
// ---------------------------------------------------------------------------------------------
// bf16 activations, M >= 2: groups of 8 rows, each 128-bit lane of a vector holding 16 bytes of one row (4 rows
// a vector), so that the decode of W is shared by every x row of the pass and the 8 rows are read as one run.
// vdpbf16ps takes, per 32-bit lane, the products of two bf16 pairs. A lane's dword holds 8 codes, element
// 8j + (t ^ 1) in nibble t (bitsandbytes puts the even element in the high nibble); shifting the words right by
// 4t puts nibble t in the low 4 bits of the low word and nibble t + 4 in those of the high word, and vpermw reads
// 5 bits of each word from a 16-entry table stored twice (bit 4, the next nibble's, selects the same value): one
// shift and one permute give 32 weights, the pair (8j + (t ^ 1), 8j + 4 + (t ^ 1)) per lane. x is laid out once
// per call to match (prepare_x_panel), its 128-bit pattern broadcast to the four rows of a vector. The codes are
// looked up unscaled, as bf16 (one rounding of the weight, as a bf16 W has); a block's dot products are scaled
// by the rows' fp32 block scales when the block ends, and a row's four lanes add up once, at the end of the row.
struct PanelGemv {
  alignas(64) uint16_t table[32];  // bf16 codes, twice
  const uint8_t* packed;
  const ScaleSource* src;
  int64_t n, k, bs, nb, row_bytes, chunks;
  int64_t tail_bytes;  // bytes of a row's last 64-byte chunk (64 when K % 128 == 0; else 16, 32 or 48)
  PanelGemv(const uint8_t* p, const ScaleSource& s, const float* code, int64_t n_, int64_t k_, int64_t bs_)
      : packed(p), src(&s), n(n_), k(k_), bs(bs_), nb(k_ / bs_), row_bytes(k_ / 2), chunks((k_ / 2 + 63) / 64),
        tail_bytes(k_ / 2 - ((k_ / 2 + 63) / 64 - 1) * 64) {
    for (int i = 0; i < 32; ++i) table[i] = c10::BFloat16(code[i % 16]).x;
  }
};

// The 4 rows' fp32 scales of every block, block-major: sc[b * 4 + i] (rows past N: zero).
QK_AVX512 void quad_scales(const PanelGemv& g, int64_t r0, float* tmp, float* sc) {
  for (int i = 0; i < 4; ++i) {
    const int64_t r = r0 + i;
    if (r < g.n) scale_row_avx512(*g.src, r * g.nb, g.nb, 0, tmp);
    else std::fill(tmp, tmp + g.nb, 0.0f);
    for (int64_t b = 0; b < g.nb; ++b) sc[b * 4 + i] = tmp[b];
  }
}

// x [M, K] bf16 in the kernel's order: per 64-byte chunk c of a row (128 elements), per 16-byte lane L and shift t,
// the 4 dwords s = 0..3 of x[e + 4 + (t ^ 1)] << 16 | x[e + (t ^ 1)] with e = 128c + 32L + 8s; zero past K.
void prepare_x_panel(const c10::BFloat16* x, int64_t m, int64_t k, int64_t chunks, std::vector<uint32_t>& out) {
  const int64_t row = chunks * 64;  // dwords per x row
  out.assign(m * row, 0);
  for (int64_t i = 0; i < m; ++i) {
    const uint16_t* xi = reinterpret_cast<const uint16_t*>(x + i * k);
    uint32_t* oi = out.data() + i * row;
    for (int64_t c = 0; c < chunks; ++c)
      for (int L = 0; L < 4; ++L)
        for (int t = 0; t < 4; ++t)
          for (int s = 0; s < 4; ++s) {
            const int64_t e = 128 * c + 32 * L + 8 * s;
            if (e < k)
              oi[c * 64 + (L * 4 + t) * 4 + s] =
                  static_cast<uint32_t>(xi[e + 4 + (t ^ 1)]) << 16 | xi[e + (t ^ 1)];
          }
  }
}

// Rows r0 .. r0 + 4Q - 1 of y (Q groups of 4 rows, each x vector shared by the Q groups' weight vectors) for MB x
// rows: x from prepare_x_panel (rows of ldx dwords), y rows of stride ldy, sc: quad_scales of each group (4 nb
// floats apart), pf: the next rows' bytes. A accumulator chains per x row and group (a dot product takes ~6 cycles:
// at least 8 chains in flight), folded at each block's end.
template <int MB, int Q>
QK_AVX512BF16 void gemv_quad_bf16(const PanelGemv& g, int64_t r0, const float* sc, const uint32_t* x, int64_t ldx,
                                  float* y, int64_t ldy, Prefetch& pf) {
  constexpr int A = Q * MB >= 8 ? 1 : (Q * MB >= 4 ? 2 : 4);
  const __m512i table = _mm512_load_si512(g.table);
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const int64_t lanes_per_block = g.bs / 32;  // 16-byte lanes a block spans (1 at blocksize 32)
  const uint8_t* rows[4 * Q];
  for (int i = 0; i < 4 * Q; ++i) rows[i] = g.packed + std::min(r0 + i, g.n - 1) * g.row_bytes;
  __m512 tot[Q][MB], acc[Q][MB][A];
  for (int G = 0; G < Q; ++G)
    for (int m = 0; m < MB; ++m) {
      tot[G][m] = _mm512_setzero_ps();
      for (int a = 0; a < A; ++a) acc[G][m][a] = _mm512_setzero_ps();
    }
  int64_t lane_count = 0, blk = 0;  // 16-byte lanes of the current block summed so far, and the block
  for (int64_t c = 0; c < g.chunks; ++c) {
    const int64_t bytes = c + 1 == g.chunks ? g.tail_bytes : 64;
    for (int i = 0; i < 4 * Q; ++i) pf.next();
    __m512i v[Q][4];  // v[G][L] lane i = bytes 16L..16L+15 of row 4G + i's chunk (a 4 x 4 transpose of 128-bit lanes)
    for (int G = 0; G < Q; ++G) {
      __m512i r[4];
      if (bytes >= 64) {
        for (int i = 0; i < 4; ++i) r[i] = _mm512_loadu_si512(rows[4 * G + i] + c * 64);
      } else {
        const __mmask64 mask = (__mmask64(1) << bytes) - 1;
        for (int i = 0; i < 4; ++i) r[i] = _mm512_maskz_loadu_epi8(mask, rows[4 * G + i] + c * 64);
      }
      const __m512i t0 = _mm512_shuffle_i32x4(r[0], r[1], 0x44), t1 = _mm512_shuffle_i32x4(r[0], r[1], 0xEE);
      const __m512i t2 = _mm512_shuffle_i32x4(r[2], r[3], 0x44), t3 = _mm512_shuffle_i32x4(r[2], r[3], 0xEE);
      v[G][0] = _mm512_shuffle_i32x4(t0, t2, 0x88);
      v[G][1] = _mm512_shuffle_i32x4(t0, t2, 0xDD);
      v[G][2] = _mm512_shuffle_i32x4(t1, t3, 0x88);
      v[G][3] = _mm512_shuffle_i32x4(t1, t3, 0xDD);
    }
    const int64_t nl = bytes / 16;
    for (int64_t L = 0; L < nl; ++L) {
      const uint32_t* xl = x + c * 64 + L * 16;
      for (int t = 0; t < 4; ++t) {
        __m512bh w[Q];
        for (int G = 0; G < Q; ++G)
          w[G] = (__m512bh)_mm512_permutexvar_epi16(t == 0 ? v[G][L] : _mm512_srli_epi16(v[G][L], 4 * t), table);
        for (int m = 0; m < MB; ++m) {
          const __m512bh xv = (__m512bh)_mm512_broadcast_i32x4(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(xl + m * ldx + t * 4)));
          for (int G = 0; G < Q; ++G) acc[G][m][t % A] = _mm512_dpbf16_ps(acc[G][m][t % A], w[G], xv);
        }
      }
      if (++lane_count == lanes_per_block) {  // the block ends: scale its dot products by the rows' block scales
        for (int G = 0; G < Q; ++G) {
          const __m512 sv =
              _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(sc + G * 4 * g.nb + blk * 4)));
          for (int m = 0; m < MB; ++m) {
            __m512 sum = acc[G][m][0];
            for (int a = 1; a < A; ++a) sum = _mm512_add_ps(sum, acc[G][m][a]);
            tot[G][m] = _mm512_fmadd_ps(sum, sv, tot[G][m]);
            for (int a = 0; a < A; ++a) acc[G][m][a] = _mm512_setzero_ps();
          }
        }
        ++blk;
        lane_count = 0;
      }
    }
  }
  alignas(64) float part[16];
  for (int G = 0; G < Q; ++G) {
    const int64_t rows_here = std::min<int64_t>(4, g.n - r0 - 4 * G);
    for (int m = 0; m < MB; ++m) {
      __m512 s4 = tot[G][m];  // the four lanes of each row add up
      s4 = _mm512_add_ps(s4, _mm512_permute_ps(s4, 0xB1));
      s4 = _mm512_add_ps(s4, _mm512_permute_ps(s4, 0x4E));
      _mm512_store_ps(part, s4);
      for (int i = 0; i < rows_here; ++i) y[m * ldy + r0 + 4 * G + i] = part[4 * i];
    }
  }
}
#endif

#if QK_HAVE_X86
template <int MB>
__attribute__((target("avx2,fma,f16c"))) void gemv_rows_avx2(const uint8_t* packed, const ScaleSource& src,
                                                             const float* code, int64_t bs, int64_t k,
                                                             const float* xp, int64_t kp, int64_t r0, int64_t r1,
                                                             float* y, int64_t ldy) {
  const __m256 lo = _mm256_loadu_ps(code);
  const __m256 hi = _mm256_loadu_ps(code + 8);
  const int64_t lines = kp / 64;
  const int64_t nb = k / bs;
  const int bs_log2 = log2_of(bs);
  alignas(32) int32_t lane_block[8];
  for (int i = 0; i < 8; ++i) lane_block[i] = bs < 64 ? static_cast<int32_t>(8 * i / bs) : 0;
  const __m256i sidx = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_block));
  std::vector<float> scales(nb + 8);
  for (int64_t r = r0; r < r1; ++r) {
    src.row(r * nb, nb, 8, scales.data());
    const uint8_t* p = packed + r * (k / 2);
    __m256 acc[MB];
    for (int j = 0; j < MB; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t c = 0; c < lines; ++c) {  // K is a multiple of the blocksize, itself of 8: whole 32-byte lines
      const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + c * 32));
      __m256 cv[8];
      for (int q = 0; q < 8; ++q) cv[q] = lookup8(_mm256_srli_epi32(d, 4 * q), lo, hi);
      const __m256 sv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(scales.data() + block_of(c * 64, bs_log2)), sidx);
      for (int j = 0; j < MB; ++j) {
        const float* xj = xp + j * kp + c * 64;
        __m256 t = _mm256_mul_ps(cv[0], _mm256_loadu_ps(xj));
        for (int q = 1; q < 8; ++q) t = _mm256_fmadd_ps(cv[q], _mm256_loadu_ps(xj + 8 * q), t);
        acc[j] = _mm256_fmadd_ps(t, sv, acc[j]);
      }
    }
    for (int j = 0; j < MB; ++j) {
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc[j]), _mm256_extractf128_ps(acc[j], 1));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      y[j * ldy + r] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
    }
  }
}
#endif

// Whether gemv() takes this call: the vector ISA is there, every row is whole blocks of whole lines.
bool gemv_supported(int64_t k, int64_t bs) {
#if QK_HAVE_X86
  if (bs < 8 || (bs & (bs - 1)) != 0 || k % bs != 0) return false;  // a power of two: blocks found by a shift
  if (cpu_has_avx512()) return true;
  return cpu_has_avx2() && k % 64 == 0;
#else
  return false;
#endif
}

// y [M, N] (fp32) for bf16 x [M, K] with avx512_bf16; as gemv below.
void gemv_bf16(const uint8_t* packed, const ScaleSource& src, const float* code, int64_t bs, int64_t n, int64_t k,
               const c10::BFloat16* x, int64_t m, float* y) {
#if QK_HAVE_X86
  if (m >= 2) {
    const PanelGemv g(packed, src, code, n, k, bs);
    std::vector<uint32_t> xpv;
    prepare_x_panel(x, m, k, g.chunks, xpv);
    const uint32_t* xw = xpv.data();
    const int64_t ldx = g.chunks * 64;
    const int64_t octs = (n + 7) / 8;  // 8 rows a task unit: two groups of 4
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
    at::parallel_for(0, octs, grain, [&](int64_t o0, int64_t o1) {
      std::vector<float> tmp(g.nb), sc(g.nb * 8);
      for (int64_t oc = o0; oc < o1; ++oc) {
        const int64_t r0 = oc * 8;
        quad_scales(g, r0, tmp.data(), sc.data());
        quad_scales(g, r0 + 4, tmp.data(), sc.data() + 4 * g.nb);
        // 8 rows are one run of 4K bytes: the next 8 stream into L2 while these are read in 64-byte pieces of
        // each row (which the hardware prefetcher does not follow as one stream).
        Prefetch pf{packed + std::min(n, r0 + 8) * (k / 2), packed + std::min(n, r0 + 16) * (k / 2)};
        for (int64_t j0 = 0; j0 < m; j0 += 4) {  // passes of 4 x rows over the 8 rows (in L1 after the first)
          const int64_t mb = std::min<int64_t>(4, m - j0);
          const uint32_t* xj = xw + j0 * ldx;
          float* yj = y + j0 * n;
          Prefetch none;
#define QK_QUAD_CASE(MB) \
  case MB: gemv_quad_bf16<MB, 2>(g, r0, sc.data(), xj, ldx, yj, n, j0 == 0 ? pf : none); break;
          switch (mb) {
            QK_QUAD_CASE(1) QK_QUAD_CASE(2) QK_QUAD_CASE(3) QK_QUAD_CASE(4)
            default: break;
          }
#undef QK_QUAD_CASE
        }
      }
    });
    return;
  }
  std::vector<uint16_t> xp;  // one x row
  prepare_x_bf16(x, k, xp);
  const int64_t grain = std::max<int64_t>(1, 131072 / std::max<int64_t>(k, 1));
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
    // x (2K bytes) beyond half of L1 (K > 8192): 8 rows share each x load (measured 1.3-1.5x one row at a time at
    // K = 14336); below, one row at a time (8 measured ~0.8x there)
    if (k > 8192) gemv_rows_avx512_bf16<8>(packed, src, code, bs, k, xp.data(), r0, r1, y);
    else gemv_rows_avx512_bf16<1>(packed, src, code, bs, k, xp.data(), r0, r1, y);
  });
#else
  (void)packed; (void)src; (void)code; (void)bs; (void)n; (void)k; (void)x; (void)m; (void)y;
  TORCH_CHECK(false, "gemv_bf16: no avx512_bf16");
#endif
}

// y [M, N] (fp32) for x [M, K] fp32; rows of W split over the threads, x rows in passes of up to 8.
void gemv(const uint8_t* packed, const ScaleSource& src, const float* code, int64_t bs, int64_t n, int64_t k,
          const float* x, int64_t m, float* y) {
#if QK_HAVE_X86
  const bool wide = cpu_has_avx512();
  const int64_t line = wide ? 128 : 64;
  std::vector<float> xp;
  prepare_x(x, m, k, line, xp);
  const int64_t kp = xp.size() / std::max<int64_t>(m, 1);
  // ~64 KiB of codes per task: enough to hide the start of a task, small enough to balance two cores
  const int64_t grain = std::max<int64_t>(1, 131072 / std::max<int64_t>(k, 1));
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t j0 = 0; j0 < m; j0 += 8) {
      const int64_t mb = std::min<int64_t>(8, m - j0);
      const float* xj = xp.data() + j0 * kp;
      float* yj = y + j0 * n;
#define QK_GEMV_CASE(MB)                                                                        \
  case MB:                                                                                      \
    if (wide) gemv_rows_avx512<MB>(packed, src, code, bs, k, xj, kp, r0, r1, yj, n);           \
    else gemv_rows_avx2<MB>(packed, src, code, bs, k, xj, kp, r0, r1, yj, n);                  \
    break;
      switch (mb) {
        QK_GEMV_CASE(1) QK_GEMV_CASE(2) QK_GEMV_CASE(3) QK_GEMV_CASE(4)
        QK_GEMV_CASE(5) QK_GEMV_CASE(6) QK_GEMV_CASE(7) QK_GEMV_CASE(8)
        default: break;
      }
#undef QK_GEMV_CASE
    }
  });
#else
  (void)packed; (void)src; (void)code; (void)bs; (void)n; (void)k; (void)x; (void)m; (void)y;
  TORCH_CHECK(false, "gemv: no vector ISA");
#endif
}

// ---------------------------------------------------------------------------------------------
// Ops

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cpu(const at::Tensor& w, int64_t blocksize) {
  TORCH_CHECK(w.device().is_cpu(), "quantize_nf4 (cpp): w must be on the CPU");
  const at::Tensor x = w.contiguous().to(at::kFloat);
  const int64_t n = x.numel();
  const int64_t nb = (n + blocksize - 1) / blocksize;
  at::Tensor packed = at::empty({(n + 1) / 2}, w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nb}, w.options().dtype(at::kFloat));
  const float* px = x.data_ptr<float>();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  float* pa = absmax.data_ptr<float>();

  static const float kCode[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                                  -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                                  0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,
                                  0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
                                  0.7229568362236023f, 1.0f};
  float mids[15];
  for (int i = 0; i < 15; ++i) mids[i] = (kCode[i] + kCode[i + 1]) / 2.0f;

  at::parallel_for(0, nb, std::max<int64_t>(1, 16384 / blocksize), [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> q(blocksize + 1);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      float amax = 0.0f;
      for (int64_t i = 0; i < len; ++i) amax = std::max(amax, std::fabs(px[start + i]));
      // As bitsandbytes (and the reference): full blocks multiply by a reciprocal and store the
      // raw absmax; the partial last block divides and stores the clamped absmax.
      const bool full = len == blocksize;
      const float denom = std::max(amax, kTiny);
      const float inv = 1.0f / denom;
      pa[b] = full ? amax : denom;
      for (int64_t i = 0; i < len; ++i) {
        float v = full ? px[start + i] * inv : px[start + i] / denom;
        v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
        int c = 0;
        for (int j = 0; j < 15; ++j) c += v > mids[j];
        q[i] = static_cast<uint8_t>(c);
      }
      if (len & 1) q[len] = 7;  // odd tail: low nibble is the code of 0.0
      for (int64_t i = 0; i < len; i += 2) pp[(start + i) >> 1] = static_cast<uint8_t>(q[i] << 4 | q[i + 1]);
    }
  });
  return {packed, absmax};
}

// A fresh multi-MB output is mostly page faults on first touch (4 KiB pages); asking for
// transparent huge pages on it (where the kernel's THP mode is "madvise") cuts that ~5x.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = 2u << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = end & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice only: errors ignored
#endif
}

template <typename T>
void dequantize_into(const uint8_t* p, const float* scale, const float* c, int64_t blocksize, int64_t numel, T* o) {
  constexpr int64_t kChunk = 4096;  // elements per inner step: fits L1 as fp32
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
#if QK_HAVE_X86
  if (cpu_has_avx512()) {
    at::parallel_for(0, chunks, 4, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        const int64_t e0 = ch * kChunk;
        decode_range_avx512<T>(p, scale, c, blocksize, e0, std::min(kChunk, numel - e0), o + e0);
      }
    });
    return;
  }
#endif
  at::parallel_for(0, chunks, 4, [&](int64_t c0, int64_t c1) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : kChunk);
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t e0 = ch * kChunk;
      const int64_t len = std::min(kChunk, numel - e0);
      if constexpr (std::is_same_v<T, float>) {
        decode_range(p, scale, c, blocksize, e0, len, o + e0);
      } else {
        decode_range(p, scale, c, blocksize, e0, len, buf.data());
        store(buf.data(), len, o + e0);
      }
    }
  });
}

void dequantize_nf4_into_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                             const std::optional<at::Tensor>& nested_absmax,
                             const std::optional<at::Tensor>& nested_code, double nested_offset, int64_t blocksize,
                             int64_t numel, at::Tensor out) {
  TORCH_CHECK(out.is_contiguous() && out.numel() == numel && out.device().is_cpu(),
              "dequantize_nf4 (cpp): out must be a contiguous CPU tensor of ", numel, " elements");
  const std::vector<float> scale = decode_absmax(absmax, nested_absmax, nested_code, nested_offset);
  const at::Tensor p_t = packed.contiguous();
  const at::Tensor c_t = code.contiguous();
  const uint8_t* p = p_t.data_ptr<uint8_t>();
  const float* c = c_t.data_ptr<float>();
  switch (out.scalar_type()) {
    case at::kFloat:
      dequantize_into(p, scale.data(), c, blocksize, numel, out.data_ptr<float>());
      break;
    case at::kBFloat16:
      dequantize_into(p, scale.data(), c, blocksize, numel, out.data_ptr<c10::BFloat16>());
      break;
    case at::kHalf:
      dequantize_into(p, scale.data(), c, blocksize, numel, out.data_ptr<c10::Half>());
      break;
    default:
      TORCH_CHECK(false, "dequantize_nf4 (cpp): dtype must be float32, float16 or bfloat16; got ", out.scalar_type());
  }
}

at::Tensor dequantize_nf4_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                              const std::optional<at::Tensor>& nested_absmax,
                              const std::optional<at::Tensor>& nested_code, double nested_offset, int64_t blocksize,
                              int64_t numel, at::ScalarType dtype) {
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  advise_huge_pages(out);
  dequantize_nf4_into_cpu(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, numel, out);
  return out;
}

// y = x @ deq(W)^T (x [M, K]) or, transposed, y = x @ deq(W) (x [M, N]), W [N, K]; fp32
// accumulation. Meant for small M (the dispatcher sends large M to dequantize + BLAS): it reads
// each weight byte once and decodes it once per call.
at::Tensor nf4_matmul_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const at::Tensor& code, const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code, double nested_offset, int64_t blocksize,
                          int64_t n, int64_t k, bool transposed) {
  const at::Tensor p_t = packed.contiguous();
  const at::Tensor c_t = code.contiguous();
  const uint8_t* p = p_t.data_ptr<uint8_t>();
  const float* c = c_t.data_ptr<float>();
  const int64_t m = x.size(0);

  if (!transposed && m > 0 && gemv_supported(k, blocksize)) {
    // Straight from the bytes, the scales decoded per row (nothing of the weight's size is written).
    std::vector<at::Tensor> keep;
    const ScaleSource src = scale_source(absmax, nested_absmax, nested_code, nested_offset, keep);
    // bf16 x with avx512_bf16: the bf16 dot product (half the arithmetic and half the x bytes per weight of the
    // fp32 kernel; measured faster at every M, one row included). Otherwise x in fp32, the codes exact.
    if (x.scalar_type() == at::kBFloat16 && cpu_has_avx512_bf16()) {
      const at::Tensor xb = x.contiguous();
      std::vector<float> yf(m * n);
      gemv_bf16(p, src, c, blocksize, n, k, xb.data_ptr<c10::BFloat16>(), m, yf.data());
      return bf16_matrix(yf, m, n, x.options());
    }
    const at::Tensor xf_t = x.contiguous().to(at::kFloat);
    at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
    gemv(p, src, c, blocksize, n, k, xf_t.data_ptr<float>(), m, y.data_ptr<float>());
    return y.to(x.scalar_type());
  }
  const at::Tensor xf_t = x.contiguous().to(at::kFloat);
  const float* xf = xf_t.data_ptr<float>();
  const std::vector<float> scale = decode_absmax(absmax, nested_absmax, nested_code, nested_offset);
  const float* s = scale.data();

  if (!transposed) {
    // One task owns a range of output features n: decode row n once, dot it with every x row.
    at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
    float* py = y.data_ptr<float>();
    at::parallel_for(0, n, std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1)), [&](int64_t n0, int64_t n1) {
      std::vector<float> row(k);
      for (int64_t r = n0; r < n1; ++r) {
        decode_range(p, s, c, blocksize, r * k, k, row.data());
        for (int64_t i = 0; i < m; ++i) py[i * n + r] = dot(xf + i * k, row.data(), k);
      }
    });
    return y.to(x.scalar_type());
  }
  // Transposed: one task owns a slice of columns [k0, k0 + kc) of y and of W, and walks all n
  // rows, adding x[i, r] * W[r, k0:k0+kc] into its slice: no two tasks write the same element.
  constexpr int64_t kCols = 512;
  const int64_t tasks = (k + kCols - 1) / kCols;
  at::Tensor y = at::zeros({m, k}, x.options().dtype(at::kFloat));
  float* py = y.data_ptr<float>();
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> seg(kCols);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k0 = t * kCols;
      const int64_t kc = std::min(kCols, k - k0);
      for (int64_t r = 0; r < n; ++r) {
        decode_range(p, s, c, blocksize, r * k + k0, kc, seg.data());
        for (int64_t i = 0; i < m; ++i) axpy(py + i * k + k0, xf[i * n + r], seg.data(), kc);
      }
    }
  });
  return y.to(x.scalar_type());
}


// ---------------------------------------------------------------------------------------------
// The decode layout: W's codes repacked once (beside the stored bytes, which stay bitsandbytes') into tiles of 16
// rows, each block's 16 fp32 scales after its codes. A tile is its blocks in turn; a block is blocksize / 8 lines
// of codes and one line of scales (64 bytes each), so a tile streams front to back with nothing else to read or
// compute. Code line l of a row (elements 8l..8l+7) holds, in dword c, row 16T + c: its low word the codes of the
// even elements, its high word those of the odd ones, nibble t of each word the pair (8l + 2t, 8l + 2t + 1).
// Shifting the words right by 4t and one vpermw (the 16 bf16 codes stored twice: bit 4, the next nibble's, selects
// the same value) give the pair t of the 16 rows as bf16 pairs, and one vdpbf16ps with x's pair t broadcast (x as it
// lies in memory: no layout of its own) adds those products into the 16 rows' sums: no horizontal sums, and each
// line's decode serves every x row of the pass. The scale line holds the 16 rows' fp32 block scales, the double
// quantization decoded as every other kernel decodes it (rows past N: code 0, scale 0). Per line and x row: 4 dot
// products; shared: 1 load, 3 shifts, 4 permutes. The scales in the stream cost 64 bytes a block (1/8 more bytes
// than the codes at blocksize 64); decoding them per call cost more: on a 2-core Zen 4, 4096 x 4096 from DRAM, M = 1
// took 223-239 us with the scales decoded per tile and 165 us without that work.
at::Tensor nf4_tile_cpu(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                        const std::optional<at::Tensor>& nested_code, double nested_offset, int64_t blocksize,
                        int64_t n, int64_t k) {
  TORCH_CHECK(packed.dtype() == at::kByte && packed.is_contiguous() && packed.numel() == n * k / 2,
              "nf4_tile (cpp): packed must be contiguous uint8 of n * k / 2 = ", n * k / 2, " bytes; got ",
              packed.numel());
  TORCH_CHECK(n > 0 && k > 0 && blocksize > 0 && blocksize % 8 == 0 && k % blocksize == 0,
              "nf4_tile (cpp): k must be a positive multiple of the blocksize, itself of 8; got k = ", k,
              ", blocksize ", blocksize);
  TORCH_CHECK(absmax.numel() == n * k / blocksize &&
                  absmax.dtype() == (nested_absmax.has_value() ? at::kByte : at::kFloat),
              "nf4_tile (cpp): absmax must hold n * k / blocksize = ", n * k / blocksize, " scales (uint8 codes with "
              "the nested constants, else fp32); got ", absmax.numel(), " of ", absmax.dtype());
  TORCH_CHECK(nested_absmax.has_value() == nested_code.has_value(),
              "nf4_tile (cpp): nested_absmax and nested_code come together");
  const int64_t tiles = (n + 15) / 16, lines = k / 8, nb = k / blocksize, lpb = blocksize / 8;
  const int64_t tile_lines = lines + nb;
  at::Tensor out = at::empty({tiles * tile_lines * 64}, packed.options());
  std::vector<at::Tensor> keep;
  const ScaleSource src = scale_source(absmax, nested_absmax, nested_code, nested_offset, keep);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> sc(nb);
    for (int64_t T = t0; T < t1; ++T) {
      uint8_t* tile = o + T * tile_lines * 64;
      for (int64_t c = 0; c < 16; ++c) {
        const int64_t row = 16 * T + c;
        if (row < n) src.row(row * nb, nb, 0, sc.data());
        else std::fill(sc.begin(), sc.end(), 0.0f);
        for (int64_t b = 0; b < nb; ++b) {
          uint8_t* blk = tile + b * (lpb + 1) * 64;
          std::memcpy(blk + lpb * 64 + 4 * c, &sc[b], 4);
          for (int64_t i = 0; i < lpb; ++i) {
            const int64_t l = b * lpb + i;
            uint32_t w = 0, d = 0;  // rows past N: code 0, which their zero scales multiply
            if (row < n) std::memcpy(&w, p + row * (k / 2) + 4 * l, 4);
            for (int t = 0; t < 4; ++t) {  // byte t: element 8l + 2t in its high nibble, 8l + 2t + 1 in its low
              d |= ((w >> (8 * t + 4)) & 0xFu) << (4 * t);
              d |= ((w >> (8 * t)) & 0xFu) << (16 + 4 * t);
            }
            std::memcpy(blk + i * 64 + 4 * c, &d, 4);
          }
        }
      }
    }
  });
  return out;
}

// The tile walk prefetches into L1 kPrefetchAhead and into L2 this far ahead (past the end of a thread's tiles it
// touches the next thread's, or nothing: a prefetch never faults). With the L1 prefetch alone, the walk's time from
// DRAM was the compute's plus much of the memory's from M = 2 on; with it, M = 2-8 ran 10-18% faster on a 2-core
// Zen 4 (4096 x 4096, weights rotated beyond L3: M = 2 414 -> 371 us, M = 4 548 -> 473, M = 8 761 -> 644; M = 1 the
// same; 4 KiB, 8 KiB and 16 KiB ahead alike).
constexpr int64_t kTilePrefetchL2 = 4096;

#if QK_HAVE_X86
// The 16 rows of one tile (the decode layout above: nb blocks of lpb code lines and a scale line) times MB x rows
// (x: bf16 pairs, rows ldx dwords apart): out[j * 16 + c] = y[j, 16T + c].
template <int MB>
QK_AVX512BF16 void gemv_tile_bf16(const uint8_t* tile, int64_t nb, int64_t lpb, const uint32_t* x, int64_t ldx,
                                  __m512i table, float* out) {
  // A accumulators per x row: each takes one of the line's 4 dot products (A = 4) or two (A = 2), so a line costs
  // about one dot product's latency (~6 cycles) per 4 / A, not per 4 (8 chains for any MB measured M = 8 at 24
  // cycles a line, latency-bound; MB <= 4 with 4 each and MB >= 5 with 2 fit the 32 registers)
  constexpr int A = MB <= 4 ? 4 : 2;
  __m512 tot[MB];
  for (int j = 0; j < MB; ++j) tot[j] = _mm512_setzero_ps();
  const uint8_t* line = tile;
  for (int64_t b = 0; b < nb; ++b) {
    __m512 acc[MB][A];
    for (int j = 0; j < MB; ++j)
      for (int a = 0; a < A; ++a) acc[j][a] = _mm512_setzero_ps();
    for (int64_t l = b * lpb; l < (b + 1) * lpb; ++l, line += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(line + kPrefetchAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(line + kTilePrefetchL2), _MM_HINT_T1);
      const __m512i d = _mm512_loadu_si512(line);
      __m512bh q[4];
      q[0] = (__m512bh)_mm512_permutexvar_epi16(d, table);
      for (int t = 1; t < 4; ++t) q[t] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(d, 4 * t), table);
      for (int j = 0; j < MB; ++j)
        for (int t = 0; t < 4; ++t)
          acc[j][t % A] = _mm512_dpbf16_ps(acc[j][t % A], q[t],
                                           (__m512bh)_mm512_set1_epi32(static_cast<int>(x[j * ldx + 4 * l + t])));
    }
    const __m512 sv = _mm512_loadu_ps(reinterpret_cast<const float*>(line));  // the block's scale line
    line += 64;
    for (int j = 0; j < MB; ++j) {
      __m512 sum = acc[j][0];
      for (int a = 1; a < A; ++a) sum = _mm512_add_ps(sum, acc[j][a]);
      tot[j] = _mm512_fmadd_ps(sum, sv, tot[j]);
    }
  }
  for (int j = 0; j < MB; ++j) _mm512_storeu_ps(out + 16 * j, tot[j]);
}

// Tiles [T0, T1) of y (fp32 [M, N]) for nf4_matmul_tiled_cpu, in passes of up to 8 x rows.
QK_AVX512BF16 void gemv_tiles_bf16(const uint8_t* tp, const uint16_t* twice, int64_t n, int64_t k, int64_t blocksize,
                                   const uint32_t* xw, int64_t m, int64_t T0, int64_t T1, float* y) {
  const int64_t nb = k / blocksize, lpb = blocksize / 8, tile_bytes = (k / 8 + nb) * 64;
  const __m512i table = _mm512_loadu_si512(twice);
  alignas(64) float out[8 * 16];
  for (int64_t T = T0; T < T1; ++T) {
    const int64_t rows = std::min<int64_t>(16, n - 16 * T);
    const uint8_t* tile = tp + T * tile_bytes;
    for (int64_t j0 = 0; j0 < m; j0 += 8) {  // passes of up to 8 x rows (the tile in L1 / L2 after the first)
      const int64_t mb = std::min<int64_t>(8, m - j0);
      const uint32_t* xj = xw + j0 * (k / 2);
      switch (mb) {
#define QK_TILE_CASE(MB) \
  case MB: gemv_tile_bf16<MB>(tile, nb, lpb, xj, k / 2, table, out); break;
        QK_TILE_CASE(1) QK_TILE_CASE(2) QK_TILE_CASE(3) QK_TILE_CASE(4)
        QK_TILE_CASE(5) QK_TILE_CASE(6) QK_TILE_CASE(7) QK_TILE_CASE(8)
#undef QK_TILE_CASE
        default: break;
      }
      for (int64_t j = 0; j < mb; ++j)
        for (int64_t c = 0; c < rows; ++c) y[(j0 + j) * n + 16 * T + c] = out[j * 16 + c];
    }
  }
}
#endif

// y = x @ deq(W)^T for bf16 x [M, K] from W's decode layout (nf4_tile_cpu: codes and block scales) and the 16-entry
// code table; y in bf16.
at::Tensor nf4_matmul_tiled_cpu(const at::Tensor& x, const at::Tensor& tiled, const at::Tensor& code,
                                int64_t blocksize, int64_t n, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.scalar_type() == at::kBFloat16,
              "nf4_matmul_tiled (cpp): x must be bf16 [M, ", k, "]");
  TORCH_CHECK(n > 0 && k > 0 && blocksize > 0 && blocksize % 8 == 0 && k % blocksize == 0,
              "nf4_matmul_tiled (cpp): k must be a positive multiple of the blocksize, itself of 8; got k = ", k,
              ", blocksize ", blocksize);
  const int64_t tiles = (n + 15) / 16, tile_bytes = (k / 8 + k / blocksize) * 64;
  TORCH_CHECK(tiled.dtype() == at::kByte && tiled.numel() == tiles * tile_bytes,
              "nf4_matmul_tiled (cpp): tiled must be nf4_tile's layout of a [", n, ", ", k, "] weight at blocksize ",
              blocksize, " (", tiles * tile_bytes, " bytes); got ", tiled.numel());
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16,
              "nf4_matmul_tiled (cpp): code must be the 16 fp32 NF4 values");
#if QK_HAVE_X86
  TORCH_CHECK(cpu_has_avx512_bf16(), "nf4_matmul_tiled (cpp): needs avx512_bf16");
  const at::Tensor xb = x.contiguous(), t_t = tiled.contiguous(), c_t = code.contiguous();
  const int64_t m = x.size(0);
  alignas(64) uint16_t twice[32];
  const float* code_p = c_t.data_ptr<float>();
  for (int i = 0; i < 32; ++i) twice[i] = c10::BFloat16(code_p[i % 16]).x;
  const uint32_t* xw = reinterpret_cast<const uint32_t*>(xb.data_ptr<c10::BFloat16>());
  const uint8_t* tp = t_t.data_ptr<uint8_t>();
  std::vector<float> y(m * n);
  at::parallel_for(0, tiles, std::max<int64_t>(1, 4096 / std::max<int64_t>(k, 1)), [&](int64_t T0, int64_t T1) {
    gemv_tiles_bf16(tp, twice, n, k, blocksize, xw, m, T0, T1, y.data());
  });
  return bf16_matrix(y, m, n, x.options());
#else
  TORCH_CHECK(false, "nf4_matmul_tiled (cpp): needs x86-64 with avx512_bf16");
#endif
}

}  // namespace
}  // namespace qk_cpu

TORCH_LIBRARY_IMPL(qlora_kernels_C, CPU, m) {
  m.impl("quantize_nf4", &qk_cpu::quantize_nf4_cpu);
  m.impl("dequantize_nf4", &qk_cpu::dequantize_nf4_cpu);
  m.impl("dequantize_nf4_into", &qk_cpu::dequantize_nf4_into_cpu);
  m.impl("nf4_matmul", &qk_cpu::nf4_matmul_cpu);
  m.impl("nf4_tile", &qk_cpu::nf4_tile_cpu);
  m.impl("nf4_matmul_tiled", &qk_cpu::nf4_matmul_tiled_cpu);
}

// The vector ISA the CPU kernels run: the CPU's, capped by ATEN_CPU_CAPABILITY (see isa.h).
TORCH_LIBRARY_FRAGMENT(qlora_kernels_C, m) {
  m.def("cpu_isa() -> str", []() -> std::string { return qk_cpu::cpu_isa_name(); });
}
