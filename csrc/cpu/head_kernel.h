// One fused-head implementation per ISA: csrc/cpu/head_kernel.cpp compiled with each ISA's
// flags into namespace isa_<name> (CMakeLists.txt). csrc/cpu/head.cpp picks one at run time.
#pragma once

#include "head.h"

namespace simplenet_fast {
#define SIMPLENET_FAST_ISA_ENTRIES                                                    \
  void fused_head(const FusedHeadParams& p);                                        \
  int64_t packed_weight_floats(int64_t rows, int64_t depth);                        \
  void pack_weight(const float* weight, int64_t rows, int64_t depth, float* packed);
namespace isa_avx512 { SIMPLENET_FAST_ISA_ENTRIES }
namespace isa_avx2 { SIMPLENET_FAST_ISA_ENTRIES }
namespace isa_scalar { SIMPLENET_FAST_ISA_ENTRIES }
#undef SIMPLENET_FAST_ISA_ENTRIES
}  // namespace simplenet_fast
