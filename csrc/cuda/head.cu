// Fused SimpleNet head on the GPU (SPEC.md section 4). csrc/cpu/head_kernel.cpp computes exactly
// the same thing with plain loops; read it first.
//
// Launches, all on the caller's stream, nothing allocated (so the whole call can be captured in a
// CUDA graph):
//   layer3_term_kernel   workspace[b, y3, x3, :] = weight3 @ pool3(layer3)          (SPEC 4)
//   patch_score_kernel   scores[b, y, x] = -w_out . lrelu(weight2 @ pool2(layer2)
//                                            + bilinear(workspace)[b, y, x] + bias)
//   sum_partials_kernel  only when a small batch splits hidden across blocks: adds the per-split
//                        dots in a fixed order (deterministic, no atomics).
//
// Both GEMM kernels share one body, pooled_gemm: a block owns BM consecutive locations of one
// grid. A prologue gathers their pooled columns (the ELL plan of head.h, zero padding) into shared
// memory, where they stay while the block streams the weight rows of its hidden range through a
// cp.async pipeline, 128 hidden units ("a chunk") at a time; each finished chunk goes straight to
// the stage's epilogue from registers. So every location is pooled once, the pooled columns never
// reach global memory, and [locations, hidden] never leaves registers (the score epilogue reduces
// it to one number per location inside the block).
//
// Two operand paths (template parameter `Tile`, chosen in one switch on compute_dtype):
//   SimtTile      float32 operands on the CUDA cores (FFMA): exact float32 (SPEC 6: 1e-4).
//   MmaTile<BM>   bfloat16 operands on the tensor cores (mma.sync m16n8k16, float32 accumulation),
//                 which every target from sm_80 up runs; BM = 128 locations when the pooled
//                 columns of 128 locations fit in shared memory (Hopper), else 64.
// Pooling, the layer3 term, bias, LeakyReLU and the output dot are float32 on both paths.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "head.h"

namespace simplenet_fast {
namespace {

constexpr int kThreads = 256;      // 8 warps per block, every kernel below
constexpr int kWarps = kThreads / 32;
constexpr int kBN = 128;           // hidden units per chunk
constexpr int kStages = 3;         // weight tiles in flight (cp.async); 3 is what fits beside A on sm_90

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------ device helpers

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T zero_value();
template <>
__device__ __forceinline__ float zero_value<float>() { return 0.f; }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_value<__nv_bfloat16>() { return __float2bfloat16(0.f); }

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// 16 bytes global -> shared, bypassing L1 (weights are shared by all blocks through L2). A
// zero source size fills the destination with zeros: rows past hidden, columns past the plan.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* pointer) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(pointer)));
}

// d += a * b for one m16n8k16 bf16 tile, float32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float low, float high) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);  // .x (low half) = low
  return *reinterpret_cast<const uint32_t*>(&pair);
}

// One weight tile, rows [n0, n0 + kBN) x columns [k0, k0 + kBK) of weight [hidden, columns], into
// shared memory [kBN][kStride], zero outside the matrix. 16-byte cp.async when every row starts on
// a 16-byte boundary (`vector`: columns a multiple of kElems, aligned base); otherwise element loads
// through registers (odd plan sizes only; correct, slower).
template <typename Op, int kBK, int kStride>
__device__ __forceinline__ void load_weight_tile(const Op* __restrict__ weight,  // [hidden, columns]
                                                 int hidden, int columns, int n0, int k0, bool vector,
                                                 Op* __restrict__ tile) {        // [kBN, kStride]
  constexpr int kElems = 16 / sizeof(Op);
  constexpr int kChunksPerRow = kBK / kElems;
  for (int id = threadIdx.x; id < kBN * kChunksPerRow; id += kThreads) {
    const int row = id / kChunksPerRow, k = (id % kChunksPerRow) * kElems;
    const int n = n0 + row, kg = k0 + k;
    Op* dst = tile + row * kStride + k;
    if (vector) {
      const bool valid = n < hidden && kg < columns;
      cp_async_16(dst, valid ? weight + static_cast<int64_t>(n) * columns + kg : weight, valid);
    } else {
      alignas(16) Op values[kElems];
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        values[e] = (n < hidden && kg + e < columns) ? weight[static_cast<int64_t>(n) * columns + kg + e]
                                                     : zero_value<Op>();
      }
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(values);
    }
  }
}

// ------------------------------------------------------------------------------ operand tiles
//
// A tile type fixes the operand dtype, the block's location count kBM, the k step kBK, the shared
// memory layout of the pooled columns ("A", resident for the whole block) and of one weight tile
// ("B", one per pipeline stage), the inner product, and which accumulators each thread owns. Every
// thread owns kRows locations x kPairs pairs of adjacent hidden units; the epilogues below are
// written against that ownership only.

// float32 operands on the CUDA cores: 64 locations x 128 hidden per chunk, 4 x 8 per thread.
struct SimtTile {
  using Operand = float;
  static constexpr int kBM = 64, kBK = 16;
  static constexpr int kBStride = kBK;  // B reads are warp-broadcasts: no padding needed
  static constexpr int kRows = 4, kPairs = 4;
  static constexpr int kRowSlots = kWarps;  // warps that own a share of one location's hidden units
  // MAC-equivalents of one gathered tap (about 9 issued instructions against one FFMA per MAC);
  // an estimate for the split heuristic, not a measurement.
  static constexpr float kTapCost = 9.f;

  // A is k-major, [piece][kBM], so that a thread reads its 4 consecutive locations as one float4.
  static __host__ __device__ int64_t a_elems(int piece) { return static_cast<int64_t>(piece) * kBM; }

  struct Acc {
    float v[kRows][2 * kPairs];
    __device__ __forceinline__ void zero() {
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int c = 0; c < 2 * kPairs; ++c) v[r][c] = 0.f;
    }
  };

  // Thread layout: lane % 16 picks 4 consecutive locations, warp * 2 + lane / 16 (0..15) picks
  // hidden units 2*tn + 32*p + {0, 1}.
  static __device__ __forceinline__ int tm() { return threadIdx.x % 16; }
  static __device__ __forceinline__ int tn() { return (threadIdx.x / 32) * 2 + (threadIdx.x % 32) / 16; }
  static __device__ __forceinline__ int row(int r) { return 4 * tm() + r; }
  static __device__ __forceinline__ int pair_column(int p) { return 2 * tn() + 32 * p; }
  static __device__ __forceinline__ float2 pair(const Acc& acc, int r, int p) {
    return make_float2(acc.v[r][2 * p], acc.v[r][2 * p + 1]);
  }
  // Sum over the two lanes of a warp that share a location.
  static __device__ __forceinline__ float reduce_row(float s) { return s + __shfl_xor_sync(0xffffffffu, s, 16); }
  static __device__ __forceinline__ int row_slot() { return threadIdx.x / 32; }
  static __device__ __forceinline__ bool row_writer() { return threadIdx.x % 32 < 16; }

  static __device__ __forceinline__ void store_pooled(float* __restrict__ a,  // [piece][kBM]
                                                      int piece, int m, int k, const float (&v)[8]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) a[(k + j) * kBM + m] = v[j];  // lanes: consecutive m, no conflicts
  }

  // acc += A[:, k0 : k0 + kBK] x B^T for this thread's 4 x 8 outputs.
  static __device__ __forceinline__ void mma(Acc& acc, const float* __restrict__ a,  // [piece][kBM]
                                             int k0, int piece,
                                             const float* __restrict__ b) {  // [kBN][kBStride]
    const int m0 = 4 * tm(), n0 = 2 * tn();
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 4) {
      float4 av[4], bv[2 * kPairs];
#pragma unroll
      for (int q = 0; q < 4; ++q) av[q] = *reinterpret_cast<const float4*>(a + (k0 + kk + q) * kBM + m0);
#pragma unroll
      for (int c = 0; c < 2 * kPairs; ++c) {
        bv[c] = *reinterpret_cast<const float4*>(b + (n0 + 32 * (c / 2) + c % 2) * kBStride + kk);
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float a_q[4] = {av[q].x, av[q].y, av[q].z, av[q].w};
#pragma unroll
        for (int c = 0; c < 2 * kPairs; ++c) {
          const float b_q = q == 0 ? bv[c].x : q == 1 ? bv[c].y : q == 2 ? bv[c].z : bv[c].w;
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc.v[r][c] = fmaf(a_q[r], b_q, acc.v[r][c]);
        }
      }
    }
  }
};

// bfloat16 operands on the tensor cores: kBM locations x 128 hidden per chunk; warps 2 (M) x 4
// (N), each owning (kBM / 2) x 32 outputs as m16n8 mma.sync tiles.
template <int BM>
struct MmaTile {
  using Operand = __nv_bfloat16;
  static constexpr int kBM = BM, kBK = 32;
  // +8 bf16 per B row: an 80-byte stride puts ldmatrix's 8 row addresses in distinct bank groups.
  static constexpr int kBStride = kBK + 8;
  static constexpr int kWarpsM = 2, kWarpsN = 4;
  static constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN;
  static constexpr int kMI = kWM / 16, kNI = kWN / 8;
  static constexpr int kRows = 2 * kMI, kPairs = kNI;
  static constexpr int kRowSlots = kWarpsN;
  // MAC-equivalents of one gathered tap: ~9 issued instructions at 128 lanes per clock against
  // ~1300 bf16 MACs per clock and SM through mma.sync; an estimate for the split heuristic.
  static constexpr float kTapCost = 90.f;
  static_assert(kWM % 16 == 0 && kWN == 32, "warp tile");

  // A is [kBM][piece + 8]: the +8 makes the row stride an odd number of 16-byte units, so the
  // 8 rows of every ldmatrix (and the prologue's 16-byte stores) hit distinct bank groups.
  static __host__ __device__ int a_stride(int piece) { return piece + 8; }
  static __host__ __device__ int64_t a_elems(int piece) { return static_cast<int64_t>(kBM) * a_stride(piece); }

  struct Acc {
    float v[kMI][kNI][4];  // mma.sync C fragments
    __device__ __forceinline__ void zero() {
#pragma unroll
      for (int i = 0; i < kMI; ++i)
#pragma unroll
        for (int j = 0; j < kNI; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) v[i][j][e] = 0.f;
    }
  };

  static __device__ __forceinline__ int warp_m() { return (threadIdx.x / 32) % kWarpsM; }
  static __device__ __forceinline__ int warp_n() { return (threadIdx.x / 32) / kWarpsM; }
  // C fragment of m16n8: lane holds rows lane/4 and lane/4 + 8, columns 2*(lane%4) + {0, 1}.
  static __device__ __forceinline__ int row(int r) {
    return warp_m() * kWM + (r / 2) * 16 + (r % 2) * 8 + (threadIdx.x % 32) / 4;
  }
  static __device__ __forceinline__ int pair_column(int p) { return warp_n() * kWN + p * 8 + 2 * (threadIdx.x % 4); }
  static __device__ __forceinline__ float2 pair(const Acc& acc, int r, int p) {
    return make_float2(acc.v[r / 2][p][(r % 2) * 2], acc.v[r / 2][p][(r % 2) * 2 + 1]);
  }
  // Sum over the four lanes of a warp that share a location.
  static __device__ __forceinline__ float reduce_row(float s) {
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    return s + __shfl_xor_sync(0xffffffffu, s, 2);
  }
  static __device__ __forceinline__ int row_slot() { return warp_n(); }
  static __device__ __forceinline__ bool row_writer() { return threadIdx.x % 4 == 0; }

  static __device__ __forceinline__ void store_pooled(__nv_bfloat16* __restrict__ a,  // [kBM][piece + 8]
                                                      int piece, int m, int k, const float (&v)[8]) {
    uint4 packed;
    packed.x = pack_bf16x2(v[0], v[1]);
    packed.y = pack_bf16x2(v[2], v[3]);
    packed.z = pack_bf16x2(v[4], v[5]);
    packed.w = pack_bf16x2(v[6], v[7]);
    *reinterpret_cast<uint4*>(a + m * a_stride(piece) + k) = packed;
  }

  // acc += A[:, k0 : k0 + kBK] x B^T on this warp's (kBM / 2) x 32 outputs.
  static __device__ __forceinline__ void mma(Acc& acc, const __nv_bfloat16* __restrict__ a,  // [kBM][piece + 8]
                                             int k0, int piece,
                                             const __nv_bfloat16* __restrict__ b) {  // [kBN][kBStride]
    const int lane = threadIdx.x % 32;
    const int lda = a_stride(piece);
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[kMI][4], bf[kNI / 2][4];
      // A x4: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
      // = a0..a3 of m16n8k16; lane l addresses row l % 16, k 8 * (l / 16).
#pragma unroll
      for (int i = 0; i < kMI; ++i) {
        ldmatrix_x4(af[i], a + (warp_m() * kWM + i * 16 + lane % 16) * lda + k0 + kk + (lane / 16) * 8);
      }
      // B x4 (B stored [n][k]): matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
      // (n 8-15, k 8-15) = b0, b1 of two n8 tiles; lane l addresses n l%8 + 8*(l/16), k 8*((l/8)%2).
#pragma unroll
      for (int j = 0; j < kNI / 2; ++j) {
        ldmatrix_x4(bf[j], b + (warp_n() * kWN + j * 16 + lane % 8 + (lane / 16) * 8) * kBStride + kk +
                               ((lane / 8) % 2) * 8);
      }
#pragma unroll
      for (int i = 0; i < kMI; ++i)
#pragma unroll
        for (int j = 0; j < kNI; ++j) mma_bf16_16816(acc.v[i][j], af[i], bf[j / 2][(j % 2) * 2], bf[j / 2][(j % 2) * 2 + 1]);
    }
  }
};

template <typename Tile>
__host__ __device__ constexpr int b_stage_elems() { return kBN * Tile::kBStride; }

// Shared memory of one block: A (pooled columns of `piece` columns), kStages weight tiles, and the
// per-warp partial scores of the score epilogue.
template <typename Tile>
__host__ __device__ int64_t shared_bytes(int piece) {
  using Op = typename Tile::Operand;
  return (Tile::a_elems(piece) + kStages * b_stage_elems<Tile>()) * static_cast<int64_t>(sizeof(Op)) +
         static_cast<int64_t>(Tile::kRowSlots) * Tile::kBM * sizeof(float);
}

// ------------------------------------------------------------------------------ shared body

struct Grid {
  int c, h, w;    // feature map [B, C, H, W]
  int locations;  // B * H * W
};

struct Work {
  int columns, width;    // pooling plan [columns, width]
  int hidden;
  int piece;             // pooled columns resident in shared memory at once, a multiple of kBK;
                         // below round_up(columns, kBK) only where shared memory is short
  int chunks_per_block;  // kBN-wide hidden chunks per block; blockIdx.y picks which
  bool vector_weights;   // every weight row starts on a 16-byte boundary: cp.async 16 bytes
  bool vector_pairs;     // hidden is even and the layer3 term 8-byte aligned: float2 accesses
};

// Pooled columns [col0, col0 + piece) of the block's kBM locations into A (SPEC 4):
// column j = sum_t weight[j, t] * unfolded[index[j, t]], unfolded index u = c*9 + ky*3 + kx at
// offset (ky-1, kx-1), zero outside the map (SPEC 1.3); padding entries have weight 0.
template <typename Feature, typename Tile>
__device__ __forceinline__ void pool_piece(const Feature* __restrict__ feature,     // [B, C, H, W]
                                           const int32_t* __restrict__ pool_index,  // [columns, width]
                                           const float* __restrict__ pool_weight,   // [columns, width]
                                           const Grid& g, const Work& work, int loc0, int col0,
                                           typename Tile::Operand* __restrict__ a) {  // A, see Tile
  // Parallel over (location, group of 8 columns): a warp's lanes take consecutive locations, so
  // the plan entries it reads are warp-uniform (broadcast loads) and its feature reads run along x.
  constexpr int kLocations = Tile::kBM / 32;  // per thread
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int plane = g.h * g.w;
  const Feature* base[kLocations];
  uint32_t inside[kLocations];  // bit ky*3+kx: that neighbour lies on the map
#pragma unroll
  for (int i = 0; i < kLocations; ++i) {
    const int loc = loc0 + lane + 32 * i;
    base[i] = feature;
    inside[i] = 0;
    if (loc < g.locations) {
      const int b = loc / plane, rem = loc - b * plane, y = rem / g.w, x = rem - y * g.w;
      base[i] = feature + static_cast<int64_t>(b) * g.c * plane + y * g.w + x;
#pragma unroll
      for (int ky = 0; ky < 3; ++ky)
#pragma unroll
        for (int kx = 0; kx < 3; ++kx) {
          const bool on_map = y + ky - 1 >= 0 && y + ky - 1 < g.h && x + kx - 1 >= 0 && x + kx - 1 < g.w;
          inside[i] |= static_cast<uint32_t>(on_map) << (ky * 3 + kx);
        }
    }
  }
  const int padded_columns = ceil_div(work.columns, Tile::kBK) * Tile::kBK;
  const int groups = min(work.piece, padded_columns - col0) / 8;
  for (int q = warp; q < groups; q += kWarps) {
    const int j0 = col0 + 8 * q;
    float acc[8][kLocations];
#pragma unroll
    for (int jj = 0; jj < 8; ++jj)
#pragma unroll
      for (int i = 0; i < kLocations; ++i) acc[jj][i] = 0.f;
    for (int t = 0; t < work.width; ++t) {
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        // Columns past the plan (the last group's padding) read entry 0 with weight 0.
        const bool real = j0 + jj < work.columns;
        const unsigned u = real ? static_cast<unsigned>(pool_index[(j0 + jj) * work.width + t]) : 0u;
        const float w = real ? pool_weight[(j0 + jj) * work.width + t] : 0.f;
        const unsigned c = u / 9u, r = u - 9u * c, ky = r / 3u, kx = r - 3u * ky;
        const int offset = static_cast<int>(c) * plane + (static_cast<int>(ky) - 1) * g.w + static_cast<int>(kx) - 1;
#pragma unroll
        for (int i = 0; i < kLocations; ++i) {
          if ((inside[i] >> r) & 1u) acc[jj][i] = fmaf(w, to_float(base[i][offset]), acc[jj][i]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kLocations; ++i) {
      float v[8];
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) v[jj] = acc[jj][i];
      Tile::store_pooled(a, work.piece, lane + 32 * i, 8 * q, v);
    }
  }
}

// The block's GEMM: locations [blockIdx.x * kBM, +kBM) x its hidden chunks, k over the pooled
// columns; calls on_chunk(acc, n0) with the finished accumulators of hidden units [n0, n0 + kBN).
template <typename Feature, typename Tile, typename OnChunk>
__device__ __forceinline__ void pooled_gemm(const Feature* __restrict__ feature,                // [B, C, H, W]
                                            const int32_t* __restrict__ pool_index,             // [columns, width]
                                            const float* __restrict__ pool_weight,              // [columns, width]
                                            const typename Tile::Operand* __restrict__ weight,  // [hidden, columns]
                                            const Grid& g, const Work& work, unsigned char* smem,
                                            OnChunk&& on_chunk) {
  using Op = typename Tile::Operand;
  const int loc0 = blockIdx.x * Tile::kBM;
  const int k_tiles = ceil_div(work.columns, Tile::kBK);
  const int tiles_per_piece = work.piece / Tile::kBK;
  const bool repool = k_tiles > tiles_per_piece;  // A cannot hold every column: pool each piece anew
  const int chunk0 = blockIdx.y * work.chunks_per_block;
  const int chunks = min(work.chunks_per_block, ceil_div(work.hidden, kBN) - chunk0);
  const int total = chunks * k_tiles;  // flat (chunk, k tile) iterations: the pipeline runs across chunks
  Op* a = reinterpret_cast<Op*>(smem);
  Op* b = a + Tile::a_elems(work.piece);
  auto load_b = [&](int it) {
    if (it < total) {
      load_weight_tile<Op, Tile::kBK, Tile::kBStride>(weight, work.hidden, work.columns,
                                                      (chunk0 + it / k_tiles) * kBN, (it % k_tiles) * Tile::kBK,
                                                      work.vector_weights, b + (it % kStages) * b_stage_elems<Tile>());
    }
    cp_async_commit();  // empty groups keep the wait count below uniform
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) load_b(s);

  typename Tile::Acc acc;
  acc.zero();
  for (int it = 0; it < total; ++it) {
    const int kt = it % k_tiles;
    if (kt % tiles_per_piece == 0 && (repool || it == 0)) {
      __syncthreads();  // no warp still reads the previous piece
      pool_piece<Feature, Tile>(feature, pool_index, pool_weight, g, work, loc0, kt * Tile::kBK, a);
    }
    cp_async_wait<kStages - 2>();
    __syncthreads();  // weight tile `it` and the pooled piece are visible; stage (it-1) % kStages is free
    load_b(it + kStages - 1);
    Tile::mma(acc, a, (kt % tiles_per_piece) * Tile::kBK, work.piece, b + (it % kStages) * b_stage_elems<Tile>());
    if (kt == k_tiles - 1) {
      on_chunk(acc, (chunk0 + it / k_tiles) * kBN);
      acc.zero();
    }
  }
}

// ------------------------------------------------------------------------------ kernels

template <typename Feature, typename Tile>
__global__ void __launch_bounds__(kThreads, 1)
    layer3_term_kernel(const Feature* __restrict__ layer3,                      // [B, C3, H3, W3]
                       const int32_t* __restrict__ pool_index,                  // [columns, width]
                       const float* __restrict__ pool_weight,                   // [columns, width]
                       const typename Tile::Operand* __restrict__ weight3,      // [hidden, columns]
                       Grid grid3, Work work,
                       float* __restrict__ layer3_term) {                       // [B, H3, W3, hidden]
  // Parallel over (64 or 128 layer3 locations, blockIdx.y's share of hidden).
  extern __shared__ __align__(16) unsigned char smem[];
  const int loc0 = blockIdx.x * Tile::kBM;
  pooled_gemm<Feature, Tile>(
      layer3, pool_index, pool_weight, weight3, grid3, work, smem, [&](const typename Tile::Acc& acc, int n0) {
#pragma unroll
        for (int r = 0; r < Tile::kRows; ++r) {
          const int loc = loc0 + Tile::row(r);
          if (loc >= grid3.locations) continue;
          float* out = layer3_term + static_cast<int64_t>(loc) * work.hidden;
#pragma unroll
          for (int p = 0; p < Tile::kPairs; ++p) {
            const int n = n0 + Tile::pair_column(p);
            const float2 v = Tile::pair(acc, r, p);
            if (work.vector_pairs && n < work.hidden) {
              *reinterpret_cast<float2*>(out + n) = v;
            } else {
              if (n < work.hidden) out[n] = v.x;
              if (n + 1 < work.hidden) out[n + 1] = v.y;
            }
          }
        }
      });
}

template <typename Feature, typename Tile>
__global__ void __launch_bounds__(kThreads, 1)
    patch_score_kernel(const Feature* __restrict__ layer2,                  // [B, C2, H2, W2]
                       const int32_t* __restrict__ pool_index,              // [columns, width]
                       const float* __restrict__ pool_weight,               // [columns, width]
                       const typename Tile::Operand* __restrict__ weight2,  // [hidden, columns]
                       const float* __restrict__ layer3_term,               // [B, H3, W3, hidden]
                       Resample1d up_y,                                     // [H2] tables (head.h)
                       Resample1d up_x,                                     // [W2] tables (head.h)
                       const float* __restrict__ bias,                      // [hidden]
                       const float* __restrict__ w_out,                     // [hidden]
                       Grid grid2, int h3, int w3, Work work, float negative_slope, bool negate,
                       float* __restrict__ out) {                           // [gridDim.y, B*H2*W2]
  // Parallel over (64 or 128 layer2 locations, blockIdx.y's share of hidden); the block reduces
  // its hidden share to one partial dot per location, in a fixed order (deterministic).
  extern __shared__ __align__(16) unsigned char smem[];
  const int loc0 = blockIdx.x * Tile::kBM;
  const int plane = grid2.h * grid2.w;
  float partial[Tile::kRows];  // this thread's share of w_out . lrelu(h), summed over chunks
#pragma unroll
  for (int r = 0; r < Tile::kRows; ++r) partial[r] = 0.f;

  pooled_gemm<Feature, Tile>(
      layer2, pool_index, pool_weight, weight2, grid2, work, smem, [&](const typename Tile::Acc& acc, int n0) {
        float bias_v[Tile::kPairs][2], w_out_v[Tile::kPairs][2];
#pragma unroll
        for (int p = 0; p < Tile::kPairs; ++p) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int n = n0 + Tile::pair_column(p) + e;
            bias_v[p][e] = n < work.hidden ? bias[n] : 0.f;
            w_out_v[p][e] = n < work.hidden ? w_out[n] : 0.f;
          }
        }
#pragma unroll
        for (int r = 0; r < Tile::kRows; ++r) {
          const int loc = loc0 + Tile::row(r);
          if (loc >= grid2.locations) continue;
          // Bilinear weights of the four layer3 pixels around this location (SPEC 1.4, 4).
          const int b = loc / plane, rem = loc - b * plane, y = rem / grid2.w, x = rem - y * grid2.w;
          const float ly = up_y.lambda1[y], lx = up_x.lambda1[x];
          const int64_t row0 = (static_cast<int64_t>(b) * h3 + up_y.i0[y]) * w3;
          const int64_t row1 = (static_cast<int64_t>(b) * h3 + up_y.i1[y]) * w3;
          const float* t00 = layer3_term + (row0 + up_x.i0[x]) * work.hidden;
          const float* t01 = layer3_term + (row0 + up_x.i1[x]) * work.hidden;
          const float* t10 = layer3_term + (row1 + up_x.i0[x]) * work.hidden;
          const float* t11 = layer3_term + (row1 + up_x.i1[x]) * work.hidden;
          const float w00 = (1.f - ly) * (1.f - lx), w01 = (1.f - ly) * lx, w10 = ly * (1.f - lx), w11 = ly * lx;
          float s = 0.f;
#pragma unroll
          for (int p = 0; p < Tile::kPairs; ++p) {
            const int n = n0 + Tile::pair_column(p);
            if (n >= work.hidden) continue;
            float2 v00, v01, v10, v11;
            if (work.vector_pairs) {
              v00 = *reinterpret_cast<const float2*>(t00 + n);
              v01 = *reinterpret_cast<const float2*>(t01 + n);
              v10 = *reinterpret_cast<const float2*>(t10 + n);
              v11 = *reinterpret_cast<const float2*>(t11 + n);
            } else {
              const bool second = n + 1 < work.hidden;  // else w_out_v[p][1] == 0 drops it
              v00 = make_float2(t00[n], second ? t00[n + 1] : 0.f);
              v01 = make_float2(t01[n], second ? t01[n + 1] : 0.f);
              v10 = make_float2(t10[n], second ? t10[n + 1] : 0.f);
              v11 = make_float2(t11[n], second ? t11[n + 1] : 0.f);
            }
            const float2 g2 = Tile::pair(acc, r, p);
            float h0 = g2.x + bias_v[p][0] + w00 * v00.x + w01 * v01.x + w10 * v10.x + w11 * v11.x;
            float h1 = g2.y + bias_v[p][1] + w00 * v00.y + w01 * v01.y + w10 * v10.y + w11 * v11.y;
            h0 = h0 > 0.f ? h0 : negative_slope * h0;
            h1 = h1 > 0.f ? h1 : negative_slope * h1;
            s = fmaf(w_out_v[p][0], h0, s);
            s = fmaf(w_out_v[p][1], h1, s);
          }
          partial[r] += s;
        }
      });

  // Sum the threads that share a location: lanes by shuffle, warps through shared memory, both
  // in a fixed order. pooled_gemm's shared memory ends with kRowSlots x kBM floats for this.
  float* slots = reinterpret_cast<float*>(smem + shared_bytes<Tile>(work.piece)) - Tile::kRowSlots * Tile::kBM;
#pragma unroll
  for (int r = 0; r < Tile::kRows; ++r) {
    const float s = Tile::reduce_row(partial[r]);
    if (Tile::row_writer()) slots[Tile::row_slot() * Tile::kBM + Tile::row(r)] = s;
  }
  __syncthreads();
  for (int m = threadIdx.x; m < Tile::kBM; m += kThreads) {
    const int loc = loc0 + m;
    if (loc >= grid2.locations) continue;
    float s = 0.f;
    for (int slot = 0; slot < Tile::kRowSlots; ++slot) s += slots[slot * Tile::kBM + m];
    out[static_cast<int64_t>(blockIdx.y) * grid2.locations + loc] = negate ? -s : s;
  }
}

__global__ void sum_partials_kernel(const float* __restrict__ partials,  // [splits, locations]
                                    int splits, int locations,
                                    float* __restrict__ scores) {        // [locations]
  // Parallel over locations; splits are added in index order, so the result is deterministic.
  const int loc = blockIdx.x * blockDim.x + threadIdx.x;
  if (loc >= locations) return;
  float s = 0.f;
  for (int i = 0; i < splits; ++i) s += partials[static_cast<int64_t>(i) * locations + loc];
  scores[loc] = -s;  // SPEC 1.9: the score is minus the discriminator logit
}

// ------------------------------------------------------------------------------ host side

struct Device {
  int sms;          // multiprocessors
  int smem_optin;   // most dynamic shared memory one block may ask for
};

const char* device_properties(Device* device) {
  int id = 0;
  cudaError_t error = cudaGetDevice(&id);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&device->sms, cudaDevAttrMultiProcessorCount, id);
  if (error == cudaSuccess) {
    error = cudaDeviceGetAttribute(&device->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, id);
  }
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

// Largest piece (multiple of kBK, at most every column) whose block fits in shared memory; 0 if
// not even one k tile does.
template <typename Tile>
int resident_piece(int columns, const Device& device) {
  int piece = ceil_div(columns, Tile::kBK) * Tile::kBK;
  while (piece > 0 && shared_bytes<Tile>(piece) > device.smem_optin) piece -= Tile::kBK;
  return piece;
}

// How many blocks share one location tile's hidden range. More blocks fill the GPU at small
// batches, but each pools its locations again; the estimate below counts a block's time in
// chunks (one chunk = kBN x columns MACs per location) plus its pooling, times the waves of blocks.
template <typename Tile>
int choose_splits(int tiles, int chunks, int width, bool repool, int resident_blocks) {
  const double pooling = width * Tile::kTapCost / kBN;  // in chunks
  int best = 1;
  double best_cost = 0.0;
  for (int splits = 1; splits <= kMaxHiddenSplits && splits <= chunks; ++splits) {
    const int per_block = ceil_div(chunks, splits);
    if (ceil_div(chunks, per_block) != splits) continue;  // every block gets at least one chunk
    const int waves = ceil_div(tiles * splits, resident_blocks);
    const double cost = waves * (repool ? per_block * (1.0 + pooling) : per_block + pooling);
    if (splits == 1 || cost < best_cost) {
      best = splits;
      best_cost = cost;
    }
  }
  return best;
}

struct Launch {
  dim3 blocks;
  int smem;
  Work work;
};

bool aligned_to(const void* pointer, int bytes) { return reinterpret_cast<uintptr_t>(pointer) % bytes == 0; }

// Shared memory, pieces and split of one GEMM stage; sets the kernel's shared memory limit.
template <typename Tile, typename Kernel>
const char* plan_launch(Kernel kernel, const PoolPlan& plan, const void* weight, int hidden, int locations,
                        const float* layer3_term, const Device& device, Launch* launch) {
  const int piece = resident_piece<Tile>(plan.columns, device);
  if (piece == 0) return "not enough shared memory for one k tile of the fused head";
  launch->smem = static_cast<int>(shared_bytes<Tile>(piece));
  cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, launch->smem);
  if (error != cudaSuccess) return cudaGetErrorString(error);
  int per_sm = 0;
  error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, launch->smem);
  if (error != cudaSuccess) return cudaGetErrorString(error);
  if (per_sm == 0) return "the fused head kernel cannot be resident on this GPU";
  const int tiles = ceil_div(locations, Tile::kBM);
  const int chunks = ceil_div(hidden, kBN);
  const bool repool = piece < ceil_div(plan.columns, Tile::kBK) * Tile::kBK;
  const int splits = choose_splits<Tile>(tiles, chunks, plan.width, repool, per_sm * device.sms);
  const int per_block = ceil_div(chunks, splits);
  launch->blocks = dim3(tiles, ceil_div(chunks, per_block));
  constexpr int kVector = 16 / sizeof(typename Tile::Operand);
  launch->work = Work{plan.columns, plan.width, hidden, piece, per_block,
                      plan.columns % kVector == 0 && aligned_to(weight, 16),
                      hidden % 2 == 0 && aligned_to(layer3_term, 8)};
  return nullptr;
}

const char* last_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

const char* launch_sum_partials(const float* partials,  // [splits, locations]
                                int splits, int locations,
                                float* scores,          // [locations]
                                cudaStream_t stream) {
  sum_partials_kernel<<<ceil_div(locations, kThreads), kThreads, 0, stream>>>(partials, splits, locations, scores);
  return last_error();
}

template <typename Feature, typename Tile>
const char* launch_layer3_term(const FusedHeadParams& p, const Device& device, cudaStream_t stream) {
  const Grid grid3{p.c3, p.h3, p.w3, p.batch * p.h3 * p.w3};
  auto kernel = layer3_term_kernel<Feature, Tile>;
  Launch launch;
  if (const char* error = plan_launch<Tile>(kernel, p.pool3, p.weight3, p.hidden, grid3.locations, p.workspace, device,
                                              &launch)) return error;
  kernel<<<launch.blocks, kThreads, launch.smem, stream>>>(
      static_cast<const Feature*>(p.layer3), p.pool3.index, p.pool3.weight,
      static_cast<const typename Tile::Operand*>(p.weight3), grid3, launch.work, p.workspace);
  return last_error();
}

template <typename Feature, typename Tile>
const char* launch_patch_score(const FusedHeadParams& p, const Device& device, cudaStream_t stream) {
  const Grid grid2{p.c2, p.h2, p.w2, p.batch * p.h2 * p.w2};
  auto kernel = patch_score_kernel<Feature, Tile>;
  Launch launch;
  if (const char* error = plan_launch<Tile>(kernel, p.pool2, p.weight2, p.hidden, grid2.locations, p.workspace, device,
                                              &launch)) return error;
  const int splits = static_cast<int>(launch.blocks.y);
  // One split writes the scores directly; several write partial dots [splits, B*H2*W2] into the
  // workspace after the layer3 term (head.h sizes it for kMaxHiddenSplits) and a third launch adds them.
  float* partials = p.workspace + static_cast<int64_t>(p.batch) * p.h3 * p.w3 * p.hidden;
  kernel<<<launch.blocks, kThreads, launch.smem, stream>>>(
      static_cast<const Feature*>(p.layer2), p.pool2.index, p.pool2.weight,
      static_cast<const typename Tile::Operand*>(p.weight2), p.workspace, p.up_y, p.up_x, p.bias, p.w_out, grid2,
      p.h3, p.w3, launch.work, p.negative_slope, splits == 1, splits == 1 ? p.scores : partials);
  if (const char* error = last_error()) return error;
  return splits == 1 ? nullptr : launch_sum_partials(partials, splits, grid2.locations, p.scores, stream);
}

template <typename Feature>
const char* run_float32(const FusedHeadParams& p, const Device& device, cudaStream_t stream) {
  if (const char* error = launch_layer3_term<Feature, SimtTile>(p, device, stream)) return error;
  return launch_patch_score<Feature, SimtTile>(p, device, stream);
}

// 128 locations per block where their pooled columns fit in shared memory (sm_90's 227 KB holds
// the paper's 768), else 64: a block that pools its piece anew for every chunk is far slower.
bool fits_128(const PoolPlan& plan, const Device& device) {
  return shared_bytes<MmaTile<128>>(ceil_div(plan.columns, MmaTile<128>::kBK) * MmaTile<128>::kBK) <=
         device.smem_optin;
}

template <typename Feature>
const char* run_bfloat16(const FusedHeadParams& p, const Device& device, cudaStream_t stream) {
  const char* error = fits_128(p.pool3, device) ? launch_layer3_term<Feature, MmaTile<128>>(p, device, stream)
                                                : launch_layer3_term<Feature, MmaTile<64>>(p, device, stream);
  if (error != nullptr) return error;
  return fits_128(p.pool2, device) ? launch_patch_score<Feature, MmaTile<128>>(p, device, stream)
                                   : launch_patch_score<Feature, MmaTile<64>>(p, device, stream);
}

}  // namespace

const char* fused_head_cuda(const FusedHeadParams& params, void* stream) {
  if (params.batch == 0) return nullptr;
  Device device{};
  if (const char* error = device_properties(&device)) return error;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  // The one switch over run-time dtypes (STYLE.md): each pair is its own set of kernels.
  const bool bf16_features = params.feature_dtype == DType::kBFloat16;
  if (!bf16_features && params.feature_dtype != DType::kFloat32) {
    return "layer2 / layer3 features must be float32 or bfloat16 on CUDA";
  }
  switch (params.compute_dtype) {
    case DType::kFloat32:
      return bf16_features ? run_float32<__nv_bfloat16>(params, device, s) : run_float32<float>(params, device, s);
    case DType::kBFloat16:
      return bf16_features ? run_bfloat16<__nv_bfloat16>(params, device, s) : run_bfloat16<float>(params, device, s);
    default:
      return "compute_dtype must be float32 or bfloat16 on CUDA";
  }
}

}  // namespace simplenet_fast
