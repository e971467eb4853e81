// Run-time choice of the CPU vector path (STYLE.md: never -march=native in a wheel).
// csrc/cpu/head_kernel.cpp is compiled once per ISA into its own namespace; this file picks one.
#include "head.h"
#include "cpu/head_kernel.h"

namespace simplenet_fast {
namespace {

enum class Isa { kAvx512, kAvx2, kScalar };

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

const Isa kIsa = detect_isa();

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

}  // namespace simplenet_fast
