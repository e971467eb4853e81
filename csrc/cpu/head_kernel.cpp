// Fused head on the CPU, plain loops (SPEC.md section 4). Compiled once per ISA (CMakeLists.txt).
#include <cstddef>
#include <vector>

#include "cpu/head_kernel.h"

#define SIMPLENET_FAST_CAT_(a, b) a##b
#define SIMPLENET_FAST_CAT(a, b) SIMPLENET_FAST_CAT_(a, b)

namespace simplenet_fast {
namespace SIMPLENET_FAST_CAT(isa_, SIMPLENET_FAST_ISA) {
namespace {

// Pooled columns of one grid row: out[j * width + x] for every column j of `plan`.
void pool_row(const float* __restrict__ feature,  // [C, H, W] one image
              int height, int width, int y, const PoolPlan& plan,
              float* __restrict__ out) {           // [plan.columns, W]
  for (int j = 0; j < plan.columns; ++j) {
    for (int x = 0; x < width; ++x) {
      float acc = 0.f;
      for (int t = 0; t < plan.width; ++t) {
        const int u = plan.index[j * plan.width + t];
        const int c = u / 9, yy = y + (u % 9) / 3 - 1, xx = x + u % 3 - 1;
        if (yy >= 0 && yy < height && xx >= 0 && xx < width) {
          acc += plan.weight[j * plan.width + t] * feature[(static_cast<int64_t>(c) * height + yy) * width + xx];
        }
      }
      out[j * width + x] = acc;
    }
  }
}

}  // namespace

void fused_head(const FusedHeadParams& p) {
  const float* layer2 = static_cast<const float*>(p.layer2);
  const float* layer3 = static_cast<const float*>(p.layer3);
  const float* weight2 = static_cast<const float*>(p.weight2);
  const float* weight3 = static_cast<const float*>(p.weight3);

  // Layer3 term at the layer3 grid (a quarter of the rows, SPEC 4): parallel over (image, row).
#pragma omp parallel
  {
    std::vector<float> pooled(static_cast<size_t>(p.pool3.columns) * p.w3);
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < p.batch; ++b) {
      for (int y = 0; y < p.h3; ++y) {
        pool_row(layer3 + static_cast<int64_t>(b) * p.c3 * p.h3 * p.w3, p.h3, p.w3, y, p.pool3, pooled.data());
        float* out = p.workspace + (static_cast<int64_t>(b) * p.h3 + y) * p.w3 * p.hidden;  // [W3, hidden]
        for (int x = 0; x < p.w3; ++x) {
          for (int k = 0; k < p.hidden; ++k) {
            float acc = 0.f;
            for (int j = 0; j < p.pool3.columns; ++j) acc += weight3[static_cast<int64_t>(k) * p.pool3.columns + j] * pooled[j * p.w3 + x];
            out[static_cast<int64_t>(x) * p.hidden + k] = acc;
          }
        }
      }
    }
  }

  // Layer2 term, upsampled layer3 term, bias, LeakyReLU, output dot: parallel over (image, row).
#pragma omp parallel
  {
    std::vector<float> pooled(static_cast<size_t>(p.pool2.columns) * p.w2);
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < p.batch; ++b) {
      for (int y = 0; y < p.h2; ++y) {
        pool_row(layer2 + static_cast<int64_t>(b) * p.c2 * p.h2 * p.w2, p.h2, p.w2, y, p.pool2, pooled.data());
        const float* g3 = p.workspace + static_cast<int64_t>(b) * p.h3 * p.w3 * p.hidden;
        const float ly = p.up_y.lambda1[y];
        const float* row0 = g3 + static_cast<int64_t>(p.up_y.i0[y]) * p.w3 * p.hidden;
        const float* row1 = g3 + static_cast<int64_t>(p.up_y.i1[y]) * p.w3 * p.hidden;
        for (int x = 0; x < p.w2; ++x) {
          const float lx = p.up_x.lambda1[x];
          const int64_t x0 = static_cast<int64_t>(p.up_x.i0[x]) * p.hidden, x1 = static_cast<int64_t>(p.up_x.i1[x]) * p.hidden;
          float score = 0.f;
          for (int k = 0; k < p.hidden; ++k) {
            float h = p.bias[k];
            for (int j = 0; j < p.pool2.columns; ++j) h += weight2[static_cast<int64_t>(k) * p.pool2.columns + j] * pooled[j * p.w2 + x];
            h += (1.f - ly) * ((1.f - lx) * row0[x0 + k] + lx * row0[x1 + k]) +
                 ly * ((1.f - lx) * row1[x0 + k] + lx * row1[x1 + k]);
            score += p.w_out[k] * (h > 0.f ? h : p.negative_slope * h);
          }
          p.scores[(static_cast<int64_t>(b) * p.h2 + y) * p.w2 + x] = -score;
        }
      }
    }
  }
}

}  // namespace SIMPLENET_FAST_CAT(isa_, SIMPLENET_FAST_ISA)
}  // namespace simplenet_fast
