// Which x86 vector ISA the CPU kernels may use: what the CPU supports, capped by the capability the user
// asked torch for. ATEN_CPU_CAPABILITY=default|avx2|avx512 (torch's own variable; QLORA_KERNELS_CPU_CAPABILITY
// overrides it for these kernels alone) limits our kernels the way it limits ATen's, so that one setting runs
// the whole program at the narrower width: what a machine without the wider ISA would compute.
#pragma once

#include <cstdlib>
#include <cstring>

namespace qk_cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa requested_isa_cap() {
  const char* v = std::getenv("QLORA_KERNELS_CPU_CAPABILITY");
  if (v == nullptr || *v == '\0') v = std::getenv("ATEN_CPU_CAPABILITY");
  if (v == nullptr || *v == '\0') return Isa::kAvx512;
  if (std::strcmp(v, "default") == 0) return Isa::kScalar;
  if (std::strncmp(v, "avx2", 4) == 0) return Isa::kAvx2;
  return Isa::kAvx512;  // avx512, avx512_vnni, ... (an unknown value: no cap, as ATen ignores it)
}

inline Isa cpu_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  static const Isa isa = [] {
    Isa hw = Isa::kScalar;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
      hw = Isa::kAvx2;
      if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl"))
        hw = Isa::kAvx512;
    }
    const Isa cap = requested_isa_cap();
    return static_cast<int>(cap) < static_cast<int>(hw) ? cap : hw;
  }();
  return isa;
#else
  return Isa::kScalar;
#endif
}

inline bool cpu_has_avx2() { return static_cast<int>(cpu_isa()) >= static_cast<int>(Isa::kAvx2); }
inline bool cpu_has_avx512() { return static_cast<int>(cpu_isa()) >= static_cast<int>(Isa::kAvx512); }

// AVX-512 with the bf16 dot product (vdpbf16ps): the bf16 GEMV reads bf16 activations as they are.
inline bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// "scalar", "avx2", "avx512" or "avx512+bf16": what the kernels run (reported by qlora_kernels.backends_report()).
inline const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case Isa::kAvx512: return cpu_has_avx512_bf16() ? "avx512+bf16" : "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace qk_cpu
