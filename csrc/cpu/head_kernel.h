// One fused-head implementation per ISA: csrc/cpu/head_kernel.cpp compiled with each ISA's
// flags into namespace isa_<name> (CMakeLists.txt). csrc/cpu/head.cpp picks one at run time.
#pragma once

#include "head.h"

namespace simplenet_fast {
namespace isa_avx512 { void fused_head(const FusedHeadParams& p); }
namespace isa_avx2 { void fused_head(const FusedHeadParams& p); }
namespace isa_scalar { void fused_head(const FusedHeadParams& p); }
}  // namespace simplenet_fast
