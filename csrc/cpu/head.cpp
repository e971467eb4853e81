// Run-time choice of the CPU vector path (STYLE.md: never -march=native in a wheel).
// csrc/cpu/head_kernel.cpp is compiled once per ISA into its own namespace; this file picks one:
// the widest the running CPU supports, capped by the environment variable
//   SIMPLENET_FAST_CPU_ISA=avx512|avx2|scalar
// read once when the module loads (tests use it to run the narrower paths on a wide CPU; a
// value wider than the CPU supports, or an unknown one, leaves the detected path).
#include <cstdlib>
#include <cstring>

#include "head.h"
#include "cpu/head_kernel.h"

namespace simplenet_fast {
namespace {

// Ordered narrowest first, so that a cap is a min().
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detect_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("fma")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

Isa choose_isa() {
  const Isa detected = detect_isa();
  const char* cap = std::getenv("SIMPLENET_FAST_CPU_ISA");
  if (cap == nullptr) return detected;
  Isa wanted = detected;
  if (std::strcmp(cap, "scalar") == 0) wanted = Isa::kScalar;
  if (std::strcmp(cap, "avx2") == 0) wanted = Isa::kAvx2;
  return static_cast<int>(wanted) < static_cast<int>(detected) ? wanted : detected;
}

const Isa kIsa = choose_isa();

}  // namespace

const char* cpu_isa() {
  switch (kIsa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

void fused_head_cpu(const FusedHeadParams& params) {
  if (params.batch == 0) return;
  switch (kIsa) {
    case Isa::kAvx512: isa_avx512::fused_head(params); break;
    case Isa::kAvx2: isa_avx2::fused_head(params); break;
    default: isa_scalar::fused_head(params); break;
  }
}

int64_t packed_weight_floats_cpu(int32_t rows, int32_t depth) {
  switch (kIsa) {
    case Isa::kAvx512: return isa_avx512::packed_weight_floats(rows, depth);
    case Isa::kAvx2: return isa_avx2::packed_weight_floats(rows, depth);
    default: return isa_scalar::packed_weight_floats(rows, depth);
  }
}

void pack_weight_cpu(const float* weight, int32_t rows, int32_t depth, float* packed) {
  switch (kIsa) {
    case Isa::kAvx512: isa_avx512::pack_weight(weight, rows, depth, packed); break;
    case Isa::kAvx2: isa_avx2::pack_weight(weight, rows, depth, packed); break;
    default: isa_scalar::pack_weight(weight, rows, depth, packed); break;
  }
}

}  // namespace simplenet_fast
