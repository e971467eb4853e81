// The fused SimpleNet inference head (SPEC.md section 4): one params struct and the two entry
// points, shared by csrc/cpu and csrc/cuda. The struct holds raw pointers only, so the compiled
// core never links libtorch (STYLE.md). Every check happens once, in simplenet_fast/_fused.py;
// the kernels trust what reaches them.
#pragma once

#include <cstdint>

namespace simplenet_fast {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// At small batches the CUDA kernel lets up to this many blocks share one tile of locations, each
// over part of hidden; each writes partial scores to the workspace, and a last launch adds them in
// a fixed order (deterministic, no atomics).
constexpr int32_t kMaxHiddenSplits = 8;

// One layer's neighbourhood pooling, composed from SPEC 1.5 and 1.6 on the host, stored as a
// padded sparse matrix ("ELL"): pooled column j at a location is
//   sum_{t < width} weight[j*width + t] * unfolded[index[j*width + t]],
// where unfolded index u = c*9 + ky*3 + kx addresses channel c at offset (ky-1, kx-1) of the
// 3x3 zero-padded neighbourhood (SPEC 1.3). Padding entries have weight 0 and index 0.
// The CPU kernel reads each entry's place in the map from two tables instead of `index`, built
// by the caller once per weight state and grid (not per call): offset = c*H*W + (ky-1)*W +
// (kx-1) for this layer's H, W, and neighbour = ky*3 + kx.
struct PoolPlan {
  const int32_t* index;      // [columns, width] (CUDA)
  const float* weight;       // [columns, width]
  const int64_t* offset;     // [columns, width] (CPU)
  const int32_t* neighbour;  // [columns, width] (CPU)
  int32_t columns;           // pooled columns of this layer (768 in the paper configuration)
  int32_t width;             // longest window (6 for layer2, 12 for layer3 in the paper)
};

// Bilinear resampling of the layer3 grid onto the layer2 grid along one axis, align_corners=False
// (SPEC 1.4), precomputed on the host with torch's index rule:
//   out[o] = (1 - lambda1[o]) * in[i0[o]] + lambda1[o] * in[i1[o]].
struct Resample1d {
  const int32_t* i0;       // [out]
  const int32_t* i1;       // [out]
  const float* lambda1;    // [out]
};

struct FusedHeadParams {
  int32_t batch;
  int32_t c2, h2, w2;      // layer2 map [B, C2, H2, W2]; its grid is the output grid
  int32_t c3, h3, w3;      // layer3 map [B, C3, H3, W3]
  int32_t hidden;          // discriminator width (1024 in the paper)
  DType feature_dtype;     // dtype of layer2 / layer3 (CPU: float32 only)
  DType compute_dtype;     // dtype of the GEMM operands weight2 / weight3 (CPU: float32 only);
                           // accumulation is float32 always
  float negative_slope;    // LeakyReLU slope, 0.2 (SPEC 1.8)

  PoolPlan pool2;          // layer2 columns of the folded matrix
  PoolPlan pool3;          // layer3 columns
  Resample1d up_y;         // [H2] rows of the layer3 grid
  Resample1d up_x;         // [W2] columns of the layer3 grid

  const void* layer2;      // [B, C2, H2, W2] contiguous, feature_dtype
  const void* layer3;      // [B, C3, H3, W3] contiguous, feature_dtype
  const void* weight2;     // [hidden, pool2.columns]: BN, adaptor and first layer folded
                           // (SPEC 4). CUDA: row-major, compute_dtype. CPU: float32 packed by
                           // pack_weight_cpu (once per weight state, not per call)
  const void* weight3;     // [hidden, pool3.columns], laid out as weight2
  const float* bias;       // [hidden] folded bias
  const float* w_out;      // [hidden] output layer weights

  float* workspace;        // [workspace_floats]: the layer3 term at the layer3 grid
                           // [B, H3, W3, hidden], then partial scores [kMaxHiddenSplits, B, H2, W2]
  float* scores;           // [B, H2, W2] output: minus the discriminator logit (SPEC 1.9)
};

// Bytes of `workspace` the kernels need for these sizes.
inline int64_t workspace_floats(const FusedHeadParams& p) {
  return static_cast<int64_t>(p.batch) * p.h3 * p.w3 * p.hidden +
         static_cast<int64_t>(kMaxHiddenSplits) * p.batch * p.h2 * p.w2;
}

// CPU: picks the widest vector path the running CPU supports (AVX-512, AVX2, scalar).
void fused_head_cpu(const FusedHeadParams& params);
// CPU: the layout fused_head_cpu reads weight2 / weight3 in: panels of the running vector
// path's micro-tile rows, zero rows past `rows` (csrc/cpu/head_kernel.cpp). pack_weight_cpu
// writes a row-major float32 [rows, depth] matrix into `packed`, a caller-owned buffer of
// packed_weight_floats_cpu(rows, depth) floats.
int64_t packed_weight_floats_cpu(int32_t rows, int32_t depth);
void pack_weight_cpu(const float* weight, int32_t rows, int32_t depth, float* packed);
// Name of the vector path fused_head_cpu runs on this CPU ("avx512", "avx2", "scalar").
const char* cpu_isa();

#ifdef SIMPLENET_FAST_WITH_CUDA
// CUDA: runs on `stream` (a cudaStream_t), allocates nothing; returns a CUDA error string or
// nullptr on success.
const char* fused_head_cuda(const FusedHeadParams& params, void* stream);
#endif

}  // namespace simplenet_fast
