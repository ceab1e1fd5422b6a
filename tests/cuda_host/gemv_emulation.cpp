// Host emulation of the CUDA NF4 GEMV (csrc/cuda/nf4_gemv.cu): the same per-warp algorithm
// (csrc/cuda/nf4_gemv_core.cuh) and the same launch geometry, with every lane of every warp of the
// grid run on the CPU, a table lookup in place of the warp shuffle (the same low-5-bit rule), a sum
// over lanes in place of the shuffle reduction. tests/test_cuda_gemv_emulation.py compiles it with
// g++ and compares its output with the reference nf4_matmul.
//
// Usage: gemv_emulation IN OUT. IN holds little-endian int64 n, k, m, blocksize, splits (0: the split
// count the CUDA glue picks on a 132-SM H100/H200), nested,
// dtype (0 fp32, 2 bf16), float offset, then packed [n*k/2] u8, absmax ([nb] f32, or [nb] u8 when
// nested), nested_absmax [ceil(nb/256)] f32 and nested_code [256] f32 (nested only), code [16] f32,
// x [m*k] (f32, or bf16 bits as u16). OUT gets y [m*n] as f32 (the kernel's output rounded to its
// dtype, as the kernel stores it).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "nf4_gemv_core.cuh"

using namespace qk_cuda;

namespace {

struct Scales {
  const float* absmax = nullptr;
  const uint8_t* absmax_q = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  float offset = 0.0f;
};

struct Bf16 {
  uint16_t bits;
};

float to_float(float v) { return v; }
float to_float(Bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float round_to(float v, bool bf16) {  // what the kernel's store does (round to nearest even)
  if (!bf16) return v;
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&v, &u, 4);
  return v;
}

template <typename T>
struct HostPolicy {
  static Words4 load_words(const uint8_t* p) {
    Words4 w;
    std::memcpy(w.w, p, 16);
    return w;
  }
  static void load_x8(const T* p, float out[8]) {
    for (int i = 0; i < 8; ++i) out[i] = to_float(p[i]);
  }
  static float scale(const Scales& s, int64_t b) {
    if (s.absmax_q == nullptr) return s.absmax[b];
    return s.nested_code[s.absmax_q[b]] * s.nested_absmax[b >> 8] + s.offset;
  }
};

struct TableLut {  // what __shfl_sync(mask, code[lane & 15], i) returns: lane i & 31
  const float* code;
  float operator()(uint32_t i) const { return code[(i & 31u) & 15u]; }
};

template <typename T, int M>
void run_grid(const T* x, const uint8_t* packed, const Scales& scales, const float* code, int64_t n, int64_t k,
              int blocksize, int splits, bool bf16, float* y, bool check_empty) {
  const GemvGeometry geo = gemv_geometry(n, k, splits);
  std::vector<float> partial(static_cast<size_t>(splits) * M * n, 0.0f);
  std::vector<int> written(static_cast<size_t>(splits) * M * n, 0);
  const TableLut lut{code};
  for (int64_t by = 0; by < splits; ++by) {
    if (check_empty && by * geo.k_per_split >= k)
      std::fprintf(stderr, "split %lld is empty\n", static_cast<long long>(by));
    for (int64_t bx = 0; bx < geo.blocks_x; ++bx) {
      for (int warp = 0; warp < kGemvWarps; ++warp) {
        const GemvWarpRange range = gemv_warp_range(bx, by, warp, k, geo.k_per_split);
        if (range.row0 >= n) continue;
        float sum[M][kGemvRows] = {};
        for (int lane = 0; lane < 32; ++lane) {
          float acc[M][kGemvRows];
          gemv_warp<T, M, kGemvRows, HostPolicy<T>>(x, packed, scales, n, k, gemv_log2(blocksize), range.row0,
                                                    range.k_begin, range.k_end, lane, lut, acc);
          for (int m = 0; m < M; ++m)
            for (int r = 0; r < kGemvRows; ++r) sum[m][r] += acc[m][r];
        }
        for (int m = 0; m < M; ++m)
          for (int r = 0; r < kGemvRows; ++r) {
            const int64_t row = range.row0 + r;
            if (row >= n) continue;
            const size_t at = (static_cast<size_t>(by) * M + m) * n + row;
            if (written[at]++) std::fprintf(stderr, "element (%d, %lld) of split %lld written twice\n", m,
                                            static_cast<long long>(row), static_cast<long long>(by));
            partial[at] = sum[m][r];
          }
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int64_t row = 0; row < n; ++row) {
      float v = 0.0f;
      for (int s = 0; s < splits; ++s) {
        const size_t at = (static_cast<size_t>(s) * M + m) * n + row;
        if (!written[at]) std::fprintf(stderr, "element (%d, %lld) of split %d never written\n", m,
                                       static_cast<long long>(row), s);
        v += partial[at];
      }
      y[m * n + row] = splits == 1 ? round_to(v, bf16) : v;  // split partials are fp32; the caller casts
    }
}

template <typename T>
void dispatch_m(int m, const T* x, const uint8_t* packed, const Scales& s, const float* code, int64_t n, int64_t k,
                int blocksize, int splits, bool bf16, float* y, bool check_empty) {
  switch (m) {
    case 1: return run_grid<T, 1>(x, packed, s, code, n, k, blocksize, splits, bf16, y, check_empty);
    case 2: return run_grid<T, 2>(x, packed, s, code, n, k, blocksize, splits, bf16, y, check_empty);
    case 3: return run_grid<T, 3>(x, packed, s, code, n, k, blocksize, splits, bf16, y, check_empty);
    case 4: return run_grid<T, 4>(x, packed, s, code, n, k, blocksize, splits, bf16, y, check_empty);
  }
  std::fprintf(stderr, "m must be 1..4\n");
}

template <typename V>
std::vector<V> read_array(FILE* f, size_t count) {
  std::vector<V> v(count);
  if (count && std::fread(v.data(), sizeof(V), count, f) != count) std::fprintf(stderr, "short read\n");
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 2;
  int64_t hdr[7];
  if (std::fread(hdr, sizeof(int64_t), 7, in) != 7) return 2;
  const int64_t n = hdr[0], k = hdr[1], m = hdr[2];
  const int blocksize = static_cast<int>(hdr[3]);
  const bool nested = hdr[5] != 0, bf16 = hdr[6] == 2;
  const int splits = hdr[4] > 0 ? static_cast<int>(hdr[4]) : gemv_splits(n, k, 132);  // 0: the glue's choice
  float offset;
  if (std::fread(&offset, 4, 1, in) != 1) return 2;
  const int64_t nb = (n * k + blocksize - 1) / blocksize;
  auto packed = read_array<uint8_t>(in, static_cast<size_t>(n * k / 2));
  Scales s;
  std::vector<float> absmax, nested_absmax, nested_code;
  std::vector<uint8_t> absmax_q;
  if (nested) {
    absmax_q = read_array<uint8_t>(in, nb);
    nested_absmax = read_array<float>(in, (nb + 255) / 256);
    nested_code = read_array<float>(in, 256);
    s.absmax_q = absmax_q.data();
    s.nested_absmax = nested_absmax.data();
    s.nested_code = nested_code.data();
    s.offset = offset;
  } else {
    absmax = read_array<float>(in, nb);
    s.absmax = absmax.data();
  }
  auto code = read_array<float>(in, 16);
  std::vector<float> y(static_cast<size_t>(m * n));
  if (bf16) {
    auto x = read_array<Bf16>(in, static_cast<size_t>(m * k));
    dispatch_m<Bf16>(static_cast<int>(m), x.data(), packed.data(), s, code.data(), n, k, blocksize, splits, true,
                     y.data(), hdr[4] == 0);
  } else {
    auto x = read_array<float>(in, static_cast<size_t>(m * k));
    dispatch_m<float>(static_cast<int>(m), x.data(), packed.data(), s, code.data(), n, k, blocksize, splits, false,
                      y.data(), hdr[4] == 0);
  }
  std::fclose(in);
  FILE* out = std::fopen(argv[2], "wb");
  if (!out) return 2;
  std::fwrite(y.data(), 4, y.size(), out);
  std::fclose(out);
  return 0;
}
