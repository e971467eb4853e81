// Fused head on the CPU (SPEC.md section 4). Compiled once per ISA (CMakeLists.txt) into
// namespace isa_<name>; csrc/cpu/head.cpp picks one at run time. Everything below is shared by the
// three builds except `Simd`, the vector type and its few operations (AVX-512, AVX2 or plain
// floats), and the micro-tile shape that goes with it.
//
// Shape of the computation, per layer (layer3 first, then layer2):
//   hidden[n, :] = W @ pooled[:, n]      W: [hidden, d] (d = plan.columns), n: a grid location
// is a GEMM of M = hidden, K = d, N = B*H*W locations. The locations are cut into tiles; per tile
// a thread
//   1. builds the pooled columns of the tile straight from the NCHW map (the unfolded tensors of
//      SPEC 1.3 are never materialised), as "panels" of kNr locations, [K][kNr] each;
//   2. multiplies them with W, packed once per weight state (pack_weight) into panels of kMr
//      hidden rows, [K][kMr] each, with a register-blocked micro-kernel (kMr x kNr
//      accumulators, full K);
//   3. hands every kMr x kNr result straight to an epilogue while it is hot in L1: layer3
//      stores it into `workspace`; layer2 adds the bilinearly upsampled layer3 term, the bias,
//      applies the LeakyReLU and reduces against w_out, so nothing of size [B*H2*W2, hidden]
//      is ever written to memory.
// Loop order inside a tile: hidden panels outer, location panels inner. The tile's pooled
// panels (K x tile floats, sized to stay in L2) are reused by every hidden panel; one packed
// hidden panel (K x kMr floats) is reused by every location panel of the tile. Both stream
// sequentially from L2; what comes from L3 (the next weight panel, the map rows a tile pools,
// the layer3 corners the epilogue reads) is prefetched in software.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/head_kernel.h"

#define SIMPLENET_FAST_CAT_(a, b) a##b
#define SIMPLENET_FAST_CAT(a, b) SIMPLENET_FAST_CAT_(a, b)

namespace simplenet_fast {
namespace SIMPLENET_FAST_CAT(isa_, SIMPLENET_FAST_ISA) {
namespace {

// ------------------------------------------------------------------------------- vector type
// kLanes floats per vector; the micro-tile is kMv vectors of hidden rows (kMr = kMv * kLanes)
// by kNr locations, i.e. kMv * kNr accumulator registers.
#if defined(__AVX512F__)
struct Simd {
  static constexpr int kLanes = 16;
  // 2 x 14 = 28 of the 32 zmm registers hold accumulators; per k step 2 vector loads of W and
  // 14 broadcasts of pooled values. Measured on the paper shapes (GEMM alone, this 2-core
  // Xeon): 2x14, 3x9, 4x6, 4x7, 2x12 and 3x8 all within the 5% noise of each other; 2x14 was
  // never behind, and leaves no padding rows when hidden is a multiple of 32.
  static constexpr int kMv = 2;
  static constexpr int kNr = 14;
  using V = __m512;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static __mmask16 first(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  // p[0..n) into the first n lanes, zeros elsewhere; nothing past p[n-1] is read.
  static V load_first(const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static void store_first(float* p, V v, int n) { _mm512_mask_storeu_ps(p, first(n), v); }
  // A lane mask as stored in memory; load_masked(p, m) reads the lanes of p that m allows
  // (the others are neither read nor faulted on) and zeros the rest.
  using Mask = uint16_t;
  static Mask mask(const bool* lanes) {
    unsigned bits = 0;
    for (int l = 0; l < kLanes; ++l) bits |= static_cast<unsigned>(lanes[l]) << l;
    return static_cast<Mask>(bits);
  }
  static V load_masked(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V leaky_relu(V h, V slope) {
    return _mm512_mask_mul_ps(h, _mm512_cmp_ps_mask(h, zero(), _CMP_LT_OQ), h, slope);
  }
  static float sum(V v) {
    const __m256 s8 = _mm256_add_ps(_mm512_extractf32x8_ps(v, 0), _mm512_extractf32x8_ps(v, 1));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
};
#elif defined(__AVX2__)
struct Simd {
  static constexpr int kLanes = 8;
  // 16 ymm registers: 2 x 6 = 12 accumulators, 2 loads of W, 1 broadcast (AVX2 has no
  // broadcast memory operand on FMA), the classic Haswell sgemm shape.
  static constexpr int kMv = 2;
  static constexpr int kNr = 6;
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static __m256i first(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V load_first(const float* p, int n) { return _mm256_maskload_ps(p, first(n)); }
  static void store_first(float* p, V v, int n) { _mm256_maskstore_ps(p, first(n), v); }
  struct Mask {
    int32_t lane[kLanes];  // -1: read, 0: skip
  };
  static Mask mask(const bool* lanes) {
    Mask m;
    for (int l = 0; l < kLanes; ++l) m.lane[l] = lanes[l] ? -1 : 0;
    return m;
  }
  static V load_masked(const float* p, const Mask& m) {
    return _mm256_maskload_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m.lane)));
  }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V leaky_relu(V h, V slope) {
    return _mm256_blendv_ps(h, _mm256_mul_ps(h, slope), _mm256_cmp_ps(h, zero(), _CMP_LT_OQ));
  }
  static float sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
};
#else
// Plain floats: the same blocking in plain loops, left to the compiler (SSE2 at most).
struct Simd {
  static constexpr int kLanes = 1;
  static constexpr int kMv = 4;
  static constexpr int kNr = 4;
  using V = float;
  static V zero() { return 0.f; }
  static V set1(float x) { return x; }
  static V load(const float* p) { return *p; }
  static void store(float* p, V v) { *p = v; }
  static V load_first(const float* p, int) { return *p; }
  static void store_first(float* p, V v, int) { *p = v; }
  using Mask = uint8_t;
  static Mask mask(const bool* lanes) { return lanes[0]; }
  static V load_masked(const float* p, Mask m) { return m ? *p : 0.f; }
  static V add(V a, V b) { return a + b; }
  static V mul(V a, V b) { return a * b; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V leaky_relu(V h, V slope) { return h < 0.f ? h * slope : h; }
  static float sum(V v) { return v; }
};
#endif

using V = Simd::V;
constexpr int kLanes = Simd::kLanes;
constexpr int kMv = Simd::kMv;
constexpr int kMr = kMv * kLanes;  // hidden rows per micro-tile
constexpr int kNr = Simd::kNr;     // locations per micro-tile

// Pooled panels of one tile are kept under this many bytes so that they stay in the 2 MB L2
// next to the packed hidden panels being streamed: 8 location panels at K = 768. Measured on
// the paper shapes (GEMM alone, with tile_gemm's weight prefetch): tiles of 8 and 16 panels
// within 2% of each other, 4 panels 4% slower; the smaller tile balances 2 threads better at
// batch 1.
constexpr int64_t kTileBytes = 384 * 1024;

// Work per thread below which fused_head does not add a thread. Measured, median of 300 calls
// on this 2-core machine under load: 1.3 MFLOP (case_odd of the fixtures) 36 us on one thread,
// 31 us on two; 7.9 MFLOP 90 us / 73 us; 71 MFLOP 700 us / 443 us. But two threads put the
// 90th percentile at ~25 ms (a preempted thread holds the other at a barrier for a time
// slice), so tiny heads stay on one thread.
constexpr double kFlopsPerThread = 4e6;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// 64-byte aligned, uninitialised float buffer (std::vector's own alignment is 16, and its zero
// fill would be one more pass over memory that is written before it is read anyway): packed
// operands are read with full-vector loads, which should not straddle cache lines.
class Buffer {
 public:
  explicit Buffer(int64_t floats) : storage_(new float[static_cast<size_t>(floats) + 16]) {}
  float* data() {
    const auto address = reinterpret_cast<uintptr_t>(storage_.get());
    return reinterpret_cast<float*>((address + 63) & ~static_cast<uintptr_t>(63));
  }

 private:
  std::unique_ptr<float[]> storage_;
};

// -------------------------------------------------------------------------------- micro-kernel
// c[i][r] = sum_k a[k][r] * b[k][i]: kMr hidden rows by kNr locations, full K. Not inlined on
// purpose: inlined into the tile loops (with the accumulators handed to the epilogue by
// reference), GCC kept them in memory, stores in the inner loop, and the head ran 2x slower;
// on its own the kMv x kNr array stays in registers. Each k step also prefetches the line at
// `prefetch`, then moves it on by `step` floats (the weight panel used next, see tile_gemm).
__attribute__((noinline)) void micro_kernel(int64_t depth,
                                            const float* __restrict__ a,  // [depth, kMr] packed weights
                                            const float* __restrict__ b,  // [depth, kNr] pooled panel
                                            float* __restrict__ c,        // [kNr, kMr] out
                                            const float* prefetch,        // [depth * step] to prefetch
                                            int64_t step) {
  // Serial: one kMr x kNr block.
  V acc[kNr][kMv];
#pragma GCC unroll 16
  for (int i = 0; i < kNr; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kMv; ++v) acc[i][v] = Simd::zero();
  }
  // Unrolled twice: the loop's own pointer updates otherwise take FMA-port slots now and then
  // (measured: 0.83-0.84 of the peak FMA rate at K = 768 with weights in L1/L2, 0.86-0.89
  // unrolled twice, 0.86 four times).
#pragma GCC unroll 2
  for (int64_t k = 0; k < depth; ++k, a += kMr, b += kNr, prefetch += step) {
    __builtin_prefetch(prefetch, 0, 3);
    V av[kMv];
#pragma GCC unroll 4
    for (int v = 0; v < kMv; ++v) av[v] = Simd::load(a + v * kLanes);
#pragma GCC unroll 16
    for (int i = 0; i < kNr; ++i) {
      const V bi = Simd::set1(b[i]);
#pragma GCC unroll 4
      for (int v = 0; v < kMv; ++v) acc[i][v] = Simd::fma(av[v], bi, acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kNr; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kMv; ++v) Simd::store(c + i * kMr + v * kLanes, acc[i][v]);
  }
}

// ------------------------------------------------------------------------------------ packing
// Packs W [rows, depth] (row-major, as in head.h) into panels of kMr rows, [panels, depth, kMr],
// zero rows past `rows`: the micro-kernel then reads kMr consecutive floats per k step. One
// panel per call; pack_weight parallelises over panels. Through a kMr x 16 block in L1: rows are
// read 16 floats at a time and the block is written out transposed. Measured for a 1024 x 768
// weight: 0.30 ms (1.2 ms walking W column by column; 0.24 ms with register transposes, not
// worth their code: at that point the copy is bound by memory bandwidth).
void pack_panel(const float* __restrict__ weight,  // [rows, depth] row-major
                int64_t rows, int64_t depth, int64_t panel,
                float* __restrict__ packed) {      // [depth, kMr] this panel
  // Serial: one panel.
  const int64_t valid = std::min<int64_t>(kMr, rows - panel * kMr);
  const float* src = weight + panel * kMr * depth;
  constexpr int kBlock = 16;
  float block[kMr][kBlock];
  for (int64_t k0 = 0; k0 < depth; k0 += kBlock) {
    const int64_t n = std::min<int64_t>(kBlock, depth - k0);
    for (int64_t r = 0; r < kMr; ++r) {
      if (r < valid && n == kBlock) {
        std::memcpy(block[r], src + r * depth + k0, sizeof(block[r]));
      } else {
        for (int64_t k = 0; k < kBlock; ++k) block[r][k] = r < valid && k < n ? src[r * depth + k0 + k] : 0.f;
      }
    }
    for (int64_t k = 0; k < n; ++k) {
      for (int64_t r = 0; r < kMr; ++r) packed[(k0 + k) * kMr + r] = block[r][k];
    }
  }
}

// ------------------------------------------------------------------------------------- tiling
// A tile is a run of whole location panels of one image. Tiles hold at most kTileBytes of
// pooled panels, and an image gets enough of them that batch * tiles_per_image is a multiple of
// the thread count when that costs at most threads-1 extra tiles: the threads' shares then
// differ by at most a panel per tile. (Tiles are handed out dynamically all the same, so that
// a thread the OS preempts on this shared machine does not hold the others at the barrier.)
struct Tiling {
  int64_t area = 0;           // locations per image, H * W
  int64_t panels = 0;         // location panels per image, ceil(area / kNr)
  int64_t per_image = 0;      // tiles per image
  int64_t count = 0;          // tiles in all, batch * per_image
  int64_t max_locations = 0;  // locations of the largest tile

  struct Tile {
    int64_t image, first, count;  // locations [first, first + count) of one image's H*W grid
  };
  Tile tile(int64_t t) const {
    const int64_t q = t % per_image;
    const int64_t p0 = q * panels / per_image, p1 = (q + 1) * panels / per_image;
    return {t / per_image, p0 * kNr, std::min(p1 * kNr, area) - p0 * kNr};
  }
};

Tiling plan_tiles(int64_t batch, int64_t area, int64_t depth, int threads) {
  Tiling t;
  t.area = area;
  t.panels = (t.area + kNr - 1) / kNr;
  const int64_t largest = std::max<int64_t>(1, kTileBytes / (4 * kNr * std::max<int64_t>(depth, 1)));
  int64_t per_image = (t.panels + largest - 1) / largest;
  for (int extra = 0; extra < threads; ++extra) {
    if (batch * (per_image + extra) % threads == 0) {
      per_image += extra;
      break;
    }
  }
  t.per_image = std::min(per_image, t.panels);
  t.count = batch * t.per_image;
  t.max_locations = std::min(t.area, (t.panels + t.per_image - 1) / t.per_image * kNr);
  return t;
}

// ------------------------------------------------------------------------------------ pooling
// Pooled columns are read straight from the NCHW map. A tile's locations are consecutive in the
// flattened H*W grid, so for every plan entry u = c*9 + ky*3 + kx (SPEC 1.3) the tile reads one
// run of consecutive floats, map[c, :, :] shifted by (ky-1)*W + (kx-1): a pooled column is a
// sum of full-vector loads along the tile, vectorised over locations. The zero padding is a
// lane mask per vector chunk and neighbour (ky, kx), computed once per tile: it drops the
// lanes whose neighbour is off the grid (across a row end, above the first row, below the
// last) and the lanes past the tile. Masked lanes are never read (AVX-512 / AVX2 masked loads
// suppress faults; the scalar path branches), so no float outside the map is touched.
// Measured on the paper shapes, one layer2 tile of 112 locations with its data in L2: 41 us,
// against 80 us pooling run by run (runs cut at panel ends and at the first / last column, 40%
// of the lanes used) and 40-46 us through a zero-padded copy of the tile's rows (17 us of it
// the copy, plus a 0.5 MB buffer per thread); with the map in L3 the prefetch below is what
// matters.
//
// The pooling plan keeps its ELL form: every column has `taps` entries, padding entries have
// weight 0 (and read a valid float). Each entry's offset into the map and its neighbour come
// as tables (head.h's PoolPlan: built by the caller once per weight state and grid).
struct Layer {
  const float* map;               // [B, C, H, W]
  int64_t channels, height, width;
  int64_t depth;                  // pooled columns = GEMM depth K
  int64_t taps;                   // entries per column (the plan's ELL width)
  Tiling tiling;
  const int64_t* offset;          // [depth, taps] c*H*W + (ky-1)*W + (kx-1)
  const int32_t* neighbour;       // [depth, taps] ky*3 + kx
  const float* weight;            // [depth, taps] the plan's weights
};

Layer make_layer(const void* map,  // [B, C, H, W] float32
                 int64_t channels, int64_t height, int64_t width,
                 const PoolPlan& plan, int64_t batch, int threads) {
  return {static_cast<const float*>(map), channels, height, width, plan.columns, plan.width,
          plan_tiles(batch, height * width, plan.columns, threads), plan.offset, plan.neighbour,
          plan.weight};
}

// masks[chunk * 9 + ky*3 + kx]: the lanes of vector chunk `chunk` of the tile (locations
// first + chunk*kLanes + lane) that are in the tile and whose neighbour (ky, kx) is on the grid.
void tile_masks(const Layer& layer, const Tiling::Tile& tile, std::vector<Simd::Mask>& masks) {
  const int64_t chunks = (tile.count + kLanes - 1) / kLanes;
  masks.resize(chunks * 9);
  int64_t y = tile.first / layer.width, x = tile.first % layer.width;  // of location i
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    bool lanes[9][kLanes];
    for (int lane = 0; lane < kLanes; ++lane) {
      const bool in_tile = chunk * kLanes + lane < tile.count;
      const bool rows[3] = {in_tile && y > 0, in_tile, in_tile && y + 1 < layer.height};
      const bool cols[3] = {x > 0, true, x + 1 < layer.width};
      for (int n = 0; n < 9; ++n) lanes[n][lane] = rows[n / 3] && cols[n % 3];
      if (++x == layer.width) {
        x = 0;
        ++y;
      }
    }
    for (int n = 0; n < 9; ++n) masks[chunk * 9 + n] = Simd::mask(lanes[n]);
  }
}

// One pooled column at kChunks vector chunks of the tile, positions s0 .. s0 + kChunks*kLanes:
// out[s] = sum_t weight[t] * first[offset[t] + s0 + s] on the lanes that masks allow, 0
// elsewhere. The chunks are the independent accumulators (they share each entry's weight and
// offset), which hides the FMA latency.
template <int kChunks>
inline void pool_chunks(const int64_t* __restrict__ offset,   // [taps]
                        const int32_t* __restrict__ neighbour,  // [taps]
                        const float* __restrict__ weight,    // [taps]
                        int64_t taps,
                        const float* first,                  // &map[b, 0, 0, 0] + tile.first
                        int64_t s0,
                        const Simd::Mask* __restrict__ masks,  // [kChunks, 9]
                        float* __restrict__ out) {           // [kChunks * kLanes]
  V acc[kChunks];
#pragma GCC unroll 8
  for (int c = 0; c < kChunks; ++c) acc[c] = Simd::zero();
  for (int64_t t = 0; t < taps; ++t) {
    const V w = Simd::set1(weight[t]);
    // Masked lanes may lie outside the map: form the address without pointer arithmetic.
    const uintptr_t src = reinterpret_cast<uintptr_t>(first) + static_cast<uintptr_t>(offset[t] + s0) * sizeof(float);
    const Simd::Mask* m = masks + neighbour[t];
#pragma GCC unroll 8
    for (int c = 0; c < kChunks; ++c) {
      const float* p = reinterpret_cast<const float*>(src + c * kLanes * sizeof(float));
      acc[c] = Simd::fma(w, Simd::load_masked(p, m[c * 9]), acc[c]);
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < kChunks; ++c) Simd::store(out + c * kLanes, acc[c]);
}

// Pooled column j at the `count` locations of a tile from `first` = &map[b, 0, 0, 0] + tile.first.
void pool_column(const Layer& layer, int64_t j,
                 const float* first,                    // &map[b, 0, 0, 0] + tile.first
                 int64_t count,
                 const Simd::Mask* __restrict__ masks,  // [chunks, 9] of the tile
                 float* __restrict__ out) {             // [round_up(count, kLanes)]
  const int64_t* offset = layer.offset + j * layer.taps;
  const int32_t* neighbour = layer.neighbour + j * layer.taps;
  const float* weight = layer.weight + j * layer.taps;
  constexpr int kMax = 8;
  int64_t c = 0;
  const int64_t chunks = (count + kLanes - 1) / kLanes;
  for (; c + kMax <= chunks; c += kMax) {
    pool_chunks<kMax>(offset, neighbour, weight, layer.taps, first, c * kLanes, masks + c * 9, out + c * kLanes);
  }
  const int64_t s = c * kLanes;
  const Simd::Mask* m = masks + c * 9;
  switch (chunks - c) {
    case 1: pool_chunks<1>(offset, neighbour, weight, layer.taps, first, s, m, out + s); break;
    case 2: pool_chunks<2>(offset, neighbour, weight, layer.taps, first, s, m, out + s); break;
    case 3: pool_chunks<3>(offset, neighbour, weight, layer.taps, first, s, m, out + s); break;
    case 4: pool_chunks<4>(offset, neighbour, weight, layer.taps, first, s, m, out + s); break;
    case 5: pool_chunks<5>(offset, neighbour, weight, layer.taps, first, s, m, out + s); break;
    case 6: pool_chunks<6>(offset, neighbour, weight, layer.taps, first, s, m, out + s); break;
    case 7: pool_chunks<7>(offset, neighbour, weight, layer.taps, first, s, m, out + s); break;
    default: break;
  }
}

// The map rows a column reads come from L3 (the weights streaming through L2 between tiles
// evict them), in short runs a channel apart that the hardware prefetcher does not follow: a
// tile's pooling was bound by L3 latency. Prefetching the rows of the column kPrefetchColumns
// ahead cut pooling from 11% to 6% of the single-thread time (paper shapes; 4 and 8 columns
// ahead gave 7%, 32 and 64 no better than 16).
constexpr int64_t kPrefetchColumns = 16;

void prefetch_column(const Layer& layer, int64_t j,
                     const float* first,  // &map[b, 0, 0, 0] + tile.first
                     int64_t count) {
  const int64_t* offset = layer.offset + j * layer.taps;
  for (int64_t t = 0; t < layer.taps; ++t) {
    // Prefetches do not fault: the runs of masked lanes may lie outside the map.
    const uintptr_t src = reinterpret_cast<uintptr_t>(first) + static_cast<uintptr_t>(offset[t]) * sizeof(float);
    for (int64_t i = 0; i < count + 16; i += 16) {
      __builtin_prefetch(reinterpret_cast<const float*>(src + i * sizeof(float)), 0, 3);
    }
  }
}

// Pooled panels of one tile: panels[p][j][i] is column j of location tile.first + p*kNr + i.
// Unused slots of the last panel are zeroed so that the micro-kernel never multiplies garbage.
void build_panels(const Layer& layer, const Tiling::Tile& tile,
                  std::vector<Simd::Mask>& masks,  // scratch
                  float* __restrict__ scratch,     // [round_up(max_locations, kLanes)]
                  float* __restrict__ panels) {    // [ceil(tile.count / kNr), depth, kNr]
  // Serial: one tile, columns outer (a column's rows are read once, along the whole tile).
  const int64_t panel_floats = layer.depth * kNr;
  if (tile.count % kNr != 0) {
    std::memset(panels + tile.count / kNr * panel_floats, 0, sizeof(float) * panel_floats);
  }
  tile_masks(layer, tile, masks);
  const float* first = layer.map + tile.image * layer.channels * layer.tiling.area + tile.first;
  for (int64_t j = 0; j < layer.depth; ++j) {
    if (j + kPrefetchColumns < layer.depth) prefetch_column(layer, j + kPrefetchColumns, first, tile.count);
    pool_column(layer, j, first, tile.count, masks.data(), scratch);
    for (int64_t i = 0; i < tile.count; i += kNr) {  // the column's slice of every panel
      float* dst = panels + i / kNr * panel_floats + j * kNr;
      const int count = static_cast<int>(std::min<int64_t>(kNr, tile.count - i));
      for (int x = 0; x < count; x += kLanes) {
        const int n = std::min(kLanes, count - x);
        Simd::store_first(dst + x, Simd::load_first(scratch + i + x, n), n);
      }
    }
  }
}

// ------------------------------------------------------------------------------- tile driver
// Multiplies the tile's pooled panels by every packed hidden panel and passes each kMr x kNr
// result to `epilogue(hidden_panel, location_panel, valid_locations, c)`, c: [kNr, kMr].
// Hidden panels outer: a packed panel (96 KB in the paper shapes) comes from L3 once per tile
// and is reused from L2 by every location panel, the tile's pooled panels stay in L2 all along.
// While hidden panel hp is multiplied, each micro-kernel call prefetches its share of panel
// hp+1 (of panel 0, for the next tile, after the last one), so that the first call on a panel
// does not wait on L3. Measured, GEMM alone on the paper shapes, tiles of 8 location panels:
// 0.70-0.74 of the peak FMA rate without that prefetch, 0.75-0.82 with it (0.84-0.87 with the
// weights already in L2).
template <typename Epilogue>
void tile_gemm(int64_t depth, int64_t hidden_panels,
               const float* __restrict__ packed,  // [hidden_panels, depth, kMr]
               const float* __restrict__ panels,  // [ceil(count / kNr), depth, kNr]
               int64_t count, Epilogue&& epilogue) {
  // Serial: one tile.
  const int64_t location_panels = (count + kNr - 1) / kNr;
  const int64_t share = (kMr + location_panels - 1) / location_panels;  // floats per k step
  for (int64_t hp = 0; hp < hidden_panels; ++hp) {
    const float* a = packed + hp * depth * kMr;
    const float* next = packed + (hp + 1) % hidden_panels * depth * kMr;
    for (int64_t lp = 0; lp < location_panels; ++lp) {
      const int64_t begin = std::min(lp * share, int64_t{kMr});
      alignas(64) float c[kNr * kMr];
      micro_kernel(depth, a, panels + lp * depth * kNr, c, next + begin * depth,
                   std::min(share, kMr - begin));
      epilogue(hp, lp, static_cast<int>(std::min<int64_t>(kNr, count - lp * kNr)), c);
    }
  }
}

// Per-location addressing of the layer3 term for the layer2 epilogue (SPEC 1.4 / 4): the four
// corners in `workspace` and the two bilinear weights.
struct Upsample {
  const float* corner[4];  // rows i0y / i1y by columns i0x / i1x, each [hidden]
  float ly, lx;
};

}  // namespace

int64_t packed_weight_floats(int64_t rows, int64_t depth) { return round_up(rows, kMr) * depth; }

void pack_weight(const float* weight, int64_t rows, int64_t depth, float* packed) {
  // Parallel over hidden panels.
  const int64_t panels = (rows + kMr - 1) / kMr;
#pragma omp parallel for schedule(static)
  for (int64_t hp = 0; hp < panels; ++hp) pack_panel(weight, rows, depth, hp, packed + hp * depth * kMr);
}

void fused_head(const FusedHeadParams& p) {
  // Parallel over tiles of grid locations (image, run of location panels), one phase per
  // layer. The weights come packed and the pooling tables built (head.h: once per weight state
  // and grid, by the caller).
  const int64_t hidden = p.hidden;
#ifdef _OPENMP
  const double flops = 2.0 * hidden *
      (static_cast<double>(p.pool2.columns) * p.h2 * p.w2 + static_cast<double>(p.pool3.columns) * p.h3 * p.w3) * p.batch;
  // Small heads run on fewer threads (see kFlopsPerThread).
  const int threads = static_cast<int>(std::clamp<double>(flops / kFlopsPerThread, 1, omp_get_max_threads()));
#else
  const int threads = 1;
#endif
  const int64_t hidden_panels = (hidden + kMr - 1) / kMr;
  const int64_t hidden_padded = hidden_panels * kMr;
  const Layer l2 = make_layer(p.layer2, p.c2, p.h2, p.w2, p.pool2, p.batch, threads);
  const Layer l3 = make_layer(p.layer3, p.c3, p.h3, p.w3, p.pool3, p.batch, threads);
  const float* packed2 = static_cast<const float*>(p.weight2);  // [hidden_panels, depth2, kMr]
  const float* packed3 = static_cast<const float*>(p.weight3);  // [hidden_panels, depth3, kMr]

  // bias and w_out padded with zeros to whole hidden panels: padded rows then contribute
  // w_out * leaky_relu(0 + 0 + 0) = 0 to the score.
  std::vector<float> bias(hidden_padded, 0.f), w_out(hidden_padded, 0.f);
  std::copy(p.bias, p.bias + hidden, bias.begin());
  std::copy(p.w_out, p.w_out + hidden, w_out.begin());
  const V slope = Simd::set1(p.negative_slope);

#pragma omp parallel num_threads(threads)
  {
    Buffer panels(std::max(round_up(l2.tiling.max_locations, kNr) * l2.depth,
                           round_up(l3.tiling.max_locations, kNr) * l3.depth));
    std::vector<Simd::Mask> masks;
    Buffer scratch(round_up(std::max(l2.tiling.max_locations, l3.tiling.max_locations), kLanes));
    Buffer tile_scores(l2.tiling.max_locations * kLanes);  // [locations, kLanes] partial sums
    std::vector<Upsample> up(l2.tiling.max_locations);

    // Layer3 term at the layer3 grid (a quarter of the locations, SPEC 4) into workspace
    // [B, H3, W3, hidden]; the implicit barrier at the end of the loop publishes it.
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < l3.tiling.count; ++t) {
      const Tiling::Tile tile = l3.tiling.tile(t);
      float* out = p.workspace + (tile.image * l3.tiling.area + tile.first) * hidden;
      build_panels(l3, tile, masks, scratch.data(), panels.data());
      tile_gemm(l3.depth, hidden_panels, packed3, panels.data(), tile.count,
                [&](int64_t hp, int64_t lp, int valid, const float* __restrict__ c) {  // [kNr, kMr]
                  for (int i = 0; i < valid; ++i) {
                    for (int v = 0; v < kMv; ++v) {
                      const int64_t k = hp * kMr + v * kLanes;
                      const V h = Simd::load(c + i * kMr + v * kLanes);
                      float* dst = out + (lp * kNr + i) * hidden + k;
                      if (k + kLanes <= hidden) {
                        Simd::store(dst, h);
                      } else if (k < hidden) {
                        Simd::store_first(dst, h, static_cast<int>(hidden - k));
                      }
                    }
                  }
                });
    }

    // Layer2 term + upsampled layer3 term + bias, LeakyReLU, dot with w_out, negated.
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < l2.tiling.count; ++t) {
      const Tiling::Tile tile = l2.tiling.tile(t);
      const float* image3 = p.workspace + tile.image * l3.tiling.area * hidden;
      for (int64_t i = 0; i < tile.count; ++i) {
        const int64_t y = (tile.first + i) / p.w2, x = (tile.first + i) % p.w2;
        const int64_t r0 = p.up_y.i0[y] * static_cast<int64_t>(p.w3), r1 = p.up_y.i1[y] * static_cast<int64_t>(p.w3);
        const int64_t c0 = p.up_x.i0[x], c1 = p.up_x.i1[x];
        up[i] = {{image3 + (r0 + c0) * hidden, image3 + (r0 + c1) * hidden,
                  image3 + (r1 + c0) * hidden, image3 + (r1 + c1) * hidden},
                 p.up_y.lambda1[y], p.up_x.lambda1[x]};
        Simd::store(tile_scores.data() + i * kLanes, Simd::zero());
      }
      build_panels(l2, tile, masks, scratch.data(), panels.data());
      tile_gemm(l2.depth, hidden_panels, packed2, panels.data(), tile.count,
                [&](int64_t hp, int64_t lp, int valid, const float* __restrict__ c) {  // [kNr, kMr]
                  for (int i = 0; i < valid; ++i) {
                    const Upsample& u = up[lp * kNr + i];
                    // The corners' next kMr floats are this location's next reads: they sit in
                    // L3 (the packed weights streaming through L2 evict them), and this
                    // location comes back only after the other location panels.
                    for (int64_t k = (hp + 1) * kMr; k < std::min((hp + 2) * kMr, hidden); k += 16) {
                      for (int q = 0; q < 4; ++q) __builtin_prefetch(u.corner[q] + k, 0, 3);
                    }
                    const V ly1 = Simd::set1(u.ly), ly0 = Simd::set1(1.f - u.ly);
                    const V lx1 = Simd::set1(u.lx), lx0 = Simd::set1(1.f - u.lx);
                    // Per-lane partial sums, reduced once per location after the last panel.
                    float* partial = tile_scores.data() + (lp * kNr + i) * kLanes;
                    V score = Simd::load(partial);
                    for (int v = 0; v < kMv; ++v) {
                      const int64_t k = hp * kMr + v * kLanes;
                      if (k >= hidden) break;  // a whole vector of padding rows
                      V g[4];  // the layer3 term at the four corners
                      if (k + kLanes <= hidden) {
                        for (int q = 0; q < 4; ++q) g[q] = Simd::load(u.corner[q] + k);
                      } else {
                        for (int q = 0; q < 4; ++q) g[q] = Simd::load_first(u.corner[q] + k, static_cast<int>(hidden - k));
                      }
                      // Same association as torch's upsample_bilinear2d: rows of columns.
                      const V top = Simd::fma(lx0, g[0], Simd::mul(lx1, g[1]));
                      const V bottom = Simd::fma(lx0, g[2], Simd::mul(lx1, g[3]));
                      V h = Simd::add(Simd::load(c + i * kMr + v * kLanes), Simd::load(bias.data() + k));
                      h = Simd::add(h, Simd::fma(ly0, top, Simd::mul(ly1, bottom)));
                      score = Simd::fma(Simd::leaky_relu(h, slope), Simd::load(w_out.data() + k), score);
                    }
                    Simd::store(partial, score);
                  }
                });
      float* scores = p.scores + tile.image * l2.tiling.area + tile.first;
      for (int64_t i = 0; i < tile.count; ++i) scores[i] = -Simd::sum(Simd::load(tile_scores.data() + i * kLanes));
    }
  }
}

}  // namespace SIMPLENET_FAST_CAT(isa_, SIMPLENET_FAST_ISA)
}  // namespace simplenet_fast
