// TinyPallas CPU kernels for LLaMA decode and prefill, called from jitted JAX programs through XLA's
// FFI (custom calls on the host). Built per ISA by kernels/cpu/build.py: -DTP_ISA_SCALAR, _AVX2,
// _AVX512VNNI or _NEON selects the integer dot-product body in qdot.h and the f32 one in fdot.h.
// Every knob of a kernel's Config arrives as an FFI attribute, so one library serves every config
// the autotuner tries.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "pool.h"
#include "fdot.h"
#include "qdot.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace tp {

// Scratch that lives as long as the calling thread (no allocation per call once warm).
template <class T> T* scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// ---------------------------------------------------------------------------------------------
// Quantized matmul: out (M, N) = x (M, K) @ W^T, W stored as N rows of K/32 blocks. Two activation
// modes: q8 (x quantized to 8 bits per block, integer block dots: llama.cpp's arithmetic, qdot.h)
// and f32 (x as it is, weights decoded to f32 in registers: the xla path's arithmetic, fdot.h).
// ---------------------------------------------------------------------------------------------

enum Activations : int { kActF32 = 0, kActQ8 = 1 };  // qmatmul.ACTIVATIONS order

// f32 activations: the rows, and each 32-block's sum (the m term of Q4_0 / Q4_1 blocks).
struct FloatRows {
  const float* x = nullptr;
  int64_t m = 0, k = 0;
  float* sums = nullptr;  // (M, K/32)
  int64_t blocks() const { return k / 32; }
};

struct GemmShape {
  const QuantizedRows* xq;  // the activations of the q8 mode
  const FloatRows* xf;      // ... and of the f32 mode
  const uint8_t* w;
  int64_t row_bytes;  // K/32 * block bytes
  int64_t prefetch;   // software prefetch distance ahead of the weight stream, bytes (0: off)
};

using MicroFn = void (*)(const GemmShape&, int64_t m0, int64_t n0, float* out, int64_t ldo);

// Weight rows stream from DRAM once per token, and the hardware prefetcher alone leaves the GEMV
// waiting on memory (4 GB/s measured against 14 GB/s of read bandwidth). The BN rows a micro-kernel
// reads together (contiguous in memory) are one stream, consumed at BN blocks per step: the software
// prefetch walks it linearly, `prefetch` bytes past the end of those rows (so into the next group's),
// one line per block read. nullptr: off.
inline const uint8_t* prefetch_stream(const GemmShape& g, int64_t n0, int bn) {
  return g.prefetch > 0 ? g.w + (n0 + bn - 1) * g.row_bytes + g.prefetch : nullptr;
}

// The accumulator lanes of each activation mode: int32 block dots scaled into f32 lanes (q8), or
// f32 products (f32, the widest float register of the ISA).
template <int A> struct Accumulator;
template <> struct Accumulator<kActQ8> {
  using Lanes = FLanes;
  static Lanes zero() { return fzero(); }
  static float sum(Lanes v) { return hsum(v); }
};
template <> struct Accumulator<kActF32> {
  using Lanes = FVec;
  static Lanes zero() { return fv_zero(); }
  static float sum(Lanes v) { return fv_sum(v); }
};

// A BM x BN block of outputs over the whole K: BN weight blocks are unpacked once per K step and
// multiplied with BM activation blocks (register blocking); U independent accumulator sets break
// the floating-point dependency chain (unrolling K by U blocks). Per block, d * (q . x) accumulates
// in the lanes and m * (the block's sum of x) in a scalar (qdot.h, fdot.h).
template <int A, int F, int BM, int BN, int U>
void micro(const GemmShape& g, int64_t m0, int64_t n0, float* out, int64_t ldo) {
  using Acc = Accumulator<A>;
  const int64_t nb = A == kActQ8 ? g.xq->blocks() : g.xf->blocks();
  typename Acc::Lanes acc[U][BM][BN];
  float mins[BM][BN];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < BM; ++i)
      for (int j = 0; j < BN; ++j) acc[u][i][j] = Acc::zero();
  for (int i = 0; i < BM; ++i)
    for (int j = 0; j < BN; ++j) mins[i][j] = 0.0f;
  const uint8_t* wr[BN];
  for (int j = 0; j < BN; ++j) wr[j] = g.w + (n0 + j) * g.row_bytes;
  constexpr int kBytes = FormatInfo<F>::bytes;
  const uint8_t* ahead = prefetch_stream(g, n0, BN);

  auto step = [&](int64_t b, typename Acc::Lanes (&a)[BM][BN]) {
    float dw[BN], mw[BN];
    if constexpr (A == kActQ8) {
      const QuantizedRows& x = *g.xq;
      WeightBlock<F> wb[BN];
      for (int j = 0; j < BN; ++j) {
        const uint8_t* blk = wr[j] + b * kBytes;
        if (ahead) __builtin_prefetch(ahead + (b * BN + j) * kBytes);
        wb[j] = weight_block<F>(blk);
        dw[j] = load_half(blk);
        if constexpr (F == Q4_1) mw[j] = load_half(blk + 2);
      }
      for (int i = 0; i < BM; ++i) {
        const int64_t row = m0 + i;
        const int8_t* xq = x.qs + row * x.k + b * 32;
        const int32_t* lanes = x.lanes + (row * nb + b) * 8;
        const float dx = x.d[row * nb + b];
        for (int j = 0; j < BN; ++j) {
          a[i][j] = fma_lanes(block_dot<F>(wb[j], xq, lanes), dw[j] * dx, a[i][j]);
          if constexpr (F == Q4_1) mins[i][j] += mw[j] * x.s[row * nb + b];
        }
      }
    } else {
      const FloatRows& x = *g.xf;
      FVec q[BN][kBlockVecs];
      for (int j = 0; j < BN; ++j) {
        const uint8_t* blk = wr[j] + b * kBytes;
        if (ahead) __builtin_prefetch(ahead + (b * BN + j) * kBytes);
        decode_block<F>(blk, q[j]);
        block_scales<F>(blk, &dw[j], &mw[j]);
      }
      for (int i = 0; i < BM; ++i) {
        const int64_t row = m0 + i;
        const float* xr = x.x + row * x.k + b * 32;
        const float sx = x.sums[row * nb + b];
        for (int j = 0; j < BN; ++j) {
          a[i][j] = fv_fma(block_fdot(q[j], xr), fv_set1(dw[j]), a[i][j]);
          if constexpr (F != Q8_0) mins[i][j] += mw[j] * sx;
        }
      }
    }
  };

  int64_t b = 0;
  for (; b + U <= nb; b += U)
    for (int u = 0; u < U; ++u) step(b + u, acc[u]);
  for (; b < nb; ++b) step(b, acc[0]);
  for (int i = 0; i < BM; ++i)
    for (int j = 0; j < BN; ++j) {
      float total = 0.0f;
      for (int u = 0; u < U; ++u) total += Acc::sum(acc[u][i][j]);
      out[i * ldo + j] = total + mins[i][j];
    }
}

constexpr int kSizes[] = {1, 2, 4};
inline int size_index(int v) { return v >= 4 ? 2 : v >= 2 ? 1 : 0; }

template <int A, int F, int BM, int BN> MicroFn pick_u(int unroll) {
  return unroll >= 2 ? &micro<A, F, BM, BN, 2> : &micro<A, F, BM, BN, 1>;
}
template <int A, int F, int BM> MicroFn pick_bn(int bn, int unroll) {
  switch (size_index(bn)) {
    case 2: return pick_u<A, F, BM, 4>(unroll);
    case 1: return pick_u<A, F, BM, 2>(unroll);
    default: return pick_u<A, F, BM, 1>(unroll);
  }
}
template <int A, int F> MicroFn pick_bm(int bm, int bn, int unroll) {
  switch (size_index(bm)) {
    case 2: return pick_bn<A, F, 4>(bn, unroll);
    case 1: return pick_bn<A, F, 2>(bn, unroll);
    default: return pick_bn<A, F, 1>(bn, unroll);
  }
}
template <int A> MicroFn pick_format(int format, int bm, int bn, int unroll) {
  switch (format) {
    case Q4_0: return pick_bm<A, Q4_0>(bm, bn, unroll);
    case Q4_1: return pick_bm<A, Q4_1>(bm, bn, unroll);
    default: return pick_bm<A, Q8_0>(bm, bn, unroll);
  }
}
inline MicroFn pick_micro(int activations, int format, int bm, int bn, int unroll) {
  return activations == kActF32 ? pick_format<kActF32>(format, bm, bn, unroll)
                                : pick_format<kActQ8>(format, bm, bn, unroll);
}

struct GemmConfig {
  int block_m, block_n, tile_m, tile_n, order, unroll, threads, prefetch, activations;
};

// Tiles of at least this many activation rows (prefill) run the f32 mode as a dense product: the
// tile's weight rows are dequantized once into an f32 panel, which every row then reuses.
constexpr int64_t kPanelRows = 4;

// Weight rows [n0, n1) dequantized to f32, (n1 - n0, K) row-major: w = fma(q, d, m), the xla path's
// dequantized value exactly (fdot.h).
template <int F> void dequantize_rows(const GemmShape& g, int64_t n0, int64_t n1, int64_t k, float* panel) {
  constexpr int kBytes = FormatInfo<F>::bytes;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = g.w + n * g.row_bytes;
    float* dst = panel + (n - n0) * k;
    for (int64_t b = 0; b < k / 32; ++b) {
      const uint8_t* blk = row + b * kBytes;
      FVec q[kBlockVecs];
      float d, m;
      decode_block<F>(blk, q);
      block_scales<F>(blk, &d, &m);
      const FVec dv = fv_set1(d), mv = fv_set1(m);
      for (int r = 0; r < kBlockVecs; ++r) fv_store(dst + b * 32 + r * kFLanes, fv_fma(q[r], dv, mv));
    }
  }
}

// out[i][j] = x[m0 + i] . panel[j] for a BM x BN block: BM + BN vector loads feed BM * BN fmas.
template <int BM, int BN>
void dense_micro(const float* x, const float* panel, int64_t k, float* out, int64_t ldo) {
  FVec acc[BM][BN];
  for (int i = 0; i < BM; ++i)
    for (int j = 0; j < BN; ++j) acc[i][j] = fv_zero();
  for (int64_t e = 0; e < k; e += kFLanes) {
    FVec w[BN];
    for (int j = 0; j < BN; ++j) w[j] = fv_load(panel + j * k + e);
    for (int i = 0; i < BM; ++i) {
      const FVec xv = fv_load(x + i * k + e);
      for (int j = 0; j < BN; ++j) acc[i][j] = fv_fma(xv, w[j], acc[i][j]);
    }
  }
  for (int i = 0; i < BM; ++i)
    for (int j = 0; j < BN; ++j) out[i * ldo + j] = fv_sum(acc[i][j]);
}

using DenseFn = void (*)(const float*, const float*, int64_t, float*, int64_t);

template <int BM> DenseFn pick_dense_bn(int bn) {
  switch (size_index(bn)) {
    case 2: return &dense_micro<BM, 4>;
    case 1: return &dense_micro<BM, 2>;
    default: return &dense_micro<BM, 1>;
  }
}
inline DenseFn pick_dense(int bm, int bn) {
  switch (size_index(bm)) {
    case 2: return pick_dense_bn<4>(bn);
    case 1: return pick_dense_bn<2>(bn);
    default: return pick_dense_bn<1>(bn);
  }
}

// Visit the BM x BN blocks of a tile in the config's order. order 0: weight rows outer (each BN-row
// weight panel stays in L1 while the tile's activation rows pass over it); order 1: activation rows outer.
template <class Block>
inline void for_blocks(const GemmConfig& c, int bm, int bn, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                       const Block& block) {
  if (c.order == 0) {
    for (int64_t n = n0; n < n1; n += bn)
      for (int64_t m = m0; m < m1; m += bm) block(m, n);
  } else {
    for (int64_t m = m0; m < m1; m += bm)
      for (int64_t n = n0; n < n1; n += bn) block(m, n);
  }
}

thread_local std::vector<float> t_panel;

inline void f32_panel_tile(int format, const GemmConfig& c, const GemmShape& g, int64_t m0, int64_t m1, int64_t n0,
                           int64_t n1, float* out, int64_t ldo) {
  const int64_t k = g.xf->k;
  float* panel = scratch(t_panel, (size_t)((n1 - n0) * k));
  switch (format) {
    case Q4_0: dequantize_rows<Q4_0>(g, n0, n1, k, panel); break;
    case Q4_1: dequantize_rows<Q4_1>(g, n0, n1, k, panel); break;
    default: dequantize_rows<Q8_0>(g, n0, n1, k, panel); break;
  }
  const int bm = kSizes[size_index(c.block_m)], bn = kSizes[size_index(c.block_n)];
  const DenseFn full = pick_dense(bm, bn), one = &dense_micro<1, 1>;
  const float* x = g.xf->x;
  for_blocks(c, bm, bn, m0, m1, n0, n1, [&](int64_t m, int64_t n) {
    const int rm = (int)std::min<int64_t>(bm, m1 - m), rn = (int)std::min<int64_t>(bn, n1 - n);
    float* o = out + (m - m0) * ldo + (n - n0);
    const float* p = panel + (n - n0) * k;
    if (rm == bm && rn == bn) {
      full(x + m * k, p, k, o, ldo);
    } else {  // tails: one row/column at a time
      for (int i = 0; i < rm; ++i)
        for (int j = 0; j < rn; ++j) one(x + (m + i) * k, p + j * k, k, o + i * ldo + j, ldo);
    }
  });
}

// One (tile_m x tile_n) tile of outputs.
inline void gemm_tile(int format, const GemmConfig& c, const GemmShape& g, int64_t m0, int64_t m1, int64_t n0,
                      int64_t n1, float* out, int64_t ldo) {
  if (c.activations == kActF32 && m1 - m0 >= kPanelRows) {
    f32_panel_tile(format, c, g, m0, m1, n0, n1, out, ldo);
    return;
  }
  const int bm = kSizes[size_index(c.block_m)], bn = kSizes[size_index(c.block_n)];
  const MicroFn full = pick_micro(c.activations, format, bm, bn, c.unroll);
  const MicroFn one = pick_micro(c.activations, format, 1, 1, c.unroll);
  for_blocks(c, bm, bn, m0, m1, n0, n1, [&](int64_t m, int64_t n) {
    const int rm = (int)std::min<int64_t>(bm, m1 - m), rn = (int)std::min<int64_t>(bn, n1 - n);
    float* o = out + (m - m0) * ldo + (n - n0);
    if (rm == bm && rn == bn) {
      full(g, m, n, o, ldo);
    } else {  // tails: one row/column at a time
      for (int i = 0; i < rm; ++i)
        for (int j = 0; j < rn; ++j) one(g, m + i, n + j, o + i * ldo + j, ldo);
    }
  });
}

thread_local std::vector<int8_t> t_xq;
thread_local std::vector<float> t_xd, t_xs;
thread_local std::vector<int32_t> t_lanes;

inline QuantizedRows quantize_rows(const float* x, int64_t m, int64_t k, int threads) {
  QuantizedRows q;
  q.m = m;
  q.k = k;
  q.qs = scratch(t_xq, (size_t)(m * k));
  q.d = scratch(t_xd, (size_t)(m * k / 32));
  q.s = scratch(t_xs, (size_t)(m * k / 32));
  q.lanes = scratch(t_lanes, (size_t)(m * k / 32 * 8));
  const int64_t nb = k / 32;
  parallel_for(m >= 8 ? threads : 1, m, [&](int64_t r) {
    quantize_row(x + r * k, k, q.qs + r * k, q.d + r * nb, q.s + r * nb, q.lanes + r * nb * 8);
  });
  return q;
}

inline FloatRows float_rows(const float* x, int64_t m, int64_t k) {
  FloatRows f;
  f.x = x;
  f.m = m;
  f.k = k;
  f.sums = scratch(t_xs, (size_t)(m * k / 32));
  for (int64_t i = 0; i < m * k / 32; ++i) {
    FVec s = fv_load(x + i * 32);
    for (int r = 1; r < kBlockVecs; ++r) s = fv_add(s, fv_load(x + i * 32 + r * kFLanes));
    f.sums[i] = fv_sum(s);
  }
  return f;
}

// out (M, N): the plain product, or with `up` given, silu(x W_gate^T) * (x W_up^T) (SwiGLU).
void qmatmul(const float* x, int64_t m, int64_t k, const uint8_t* w, int format, const uint8_t* up, int up_format,
             int64_t n, float* out, const GemmConfig& c) {
  QuantizedRows xq;
  FloatRows xf;
  if (c.activations == kActF32) xf = float_rows(x, m, k);
  else xq = quantize_rows(x, m, k, c.threads);
  const GemmShape gw{&xq, &xf, w, k / 32 * block_bytes(format), c.prefetch};
  const GemmShape gu{&xq, &xf, up, k / 32 * block_bytes(up_format), c.prefetch};
  const int64_t tm = std::max<int64_t>(1, c.tile_m), tn = std::max<int64_t>(1, c.tile_n);
  const int64_t m_tiles = (m + tm - 1) / tm, n_tiles = (n + tn - 1) / tn;
  parallel_for(c.threads, m_tiles * n_tiles, [&](int64_t t) {
    const int64_t mt = t / n_tiles, nt = t % n_tiles;
    const int64_t m0 = mt * tm, m1 = std::min(m, m0 + tm), n0 = nt * tn, n1 = std::min(n, n0 + tn);
    if (up == nullptr) {
      gemm_tile(format, c, gw, m0, m1, n0, n1, out + m0 * n + n0, n);
      return;
    }
    thread_local std::vector<float> gate_up;
    const int64_t w = n1 - n0, h = m1 - m0;
    float* gate = scratch(gate_up, (size_t)(2 * w * h));
    float* upv = gate + w * h;
    gemm_tile(format, c, gw, m0, m1, n0, n1, gate, w);
    gemm_tile(up_format, c, gu, m0, m1, n0, n1, upv, w);
    for (int64_t i = 0; i < h; ++i)
      for (int64_t j = 0; j < w; ++j) {
        const float gv = gate[i * w + j];
        out[(m0 + i) * n + n0 + j] = gv / (1.0f + std::exp(-gv)) * upv[i * w + j];
      }
  });
}

// ---------------------------------------------------------------------------------------------
// RMSNorm fused with the residual add: h = x + residual; y = h / sqrt(mean(h^2) + eps) * weight.
// ---------------------------------------------------------------------------------------------

void rmsnorm(const float* x, const float* residual, const float* weight, int64_t rows, int64_t dim, float eps,
             float* y, float* h, int threads) {
  parallel_for(rows >= 16 ? threads : 1, rows, [&](int64_t r) {
    const float* xr = x + r * dim;
    const float* rr = residual + r * dim;
    float* hr = h + r * dim;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < dim; ++i) {
      hr[i] = xr[i] + rr[i];
      ss += hr[i] * hr[i];
    }
    const float scale = 1.0f / std::sqrt(ss / (float)dim + eps);
    float* yr = y + r * dim;
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) yr[i] = hr[i] * scale * weight[i];
  });
}

// ---------------------------------------------------------------------------------------------
// Attention over the KV cache with RoPE applied on the fly (the cache holds keys before RoPE).
// q (B, T, Hq, D) at positions start[b] + t; new k, v (B, T, Hkv, D) are first written into the
// stacked cache (L, B, Hkv, S, D) at [layer, b, :, start[b] + t]; query t attends to keys 0..start+t.
// Work is split over (b, kv head, key chunk); the chunks' partial softmaxes are merged by
// log-sum-exp (flash-decoding), so a few kv heads still keep every thread busy.
// ---------------------------------------------------------------------------------------------

inline void rope_rotate(const float* x, const float* cs, const float* sn, int64_t half, float scale, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    out[i] = (a * cs[i] - b * sn[i]) * scale;
    out[i + half] = (b * cs[i] + a * sn[i]) * scale;
  }
}

struct AttentionArgs {
  const float *q, *cos, *sin;
  float *kc, *vc, *out;
  const int32_t* start;
  int64_t b, t, hq, hkv, s, d, layer, splits;
  int threads;
};

void attention(const AttentionArgs& a) {
  const int64_t g = a.hq / a.hkv, half = a.d / 2, d = a.d;
  const int64_t layer_stride = a.b * a.hkv * a.s * d;
  auto cache_row = [&](float* base, int64_t b, int64_t h, int64_t pos) {
    return base + a.layer * layer_stride + ((b * a.hkv + h) * a.s + pos) * d;
  };
  const float sm_scale = 1.0f / std::sqrt((float)d);
  // partial results: (B, Hkv, splits, T, G) x {m, l, acc[D]}
  const int64_t n_part = a.b * a.hkv * a.splits * a.t * g;
  thread_local std::vector<float> partial_buf;
  float* partial = scratch(partial_buf, (size_t)(n_part * (d + 2)));

  parallel_for(a.threads, a.b * a.hkv * a.splits, [&](int64_t task) {
    const int64_t sp = task % a.splits, bh = task / a.splits, h = bh % a.hkv, b = bh / a.hkv;
    const int64_t len = a.start[b] + a.t;  // keys visible to the last query
    const int64_t chunk = (len + a.splits - 1) / a.splits;
    const int64_t s0 = std::min(len, sp * chunk), s1 = std::min(len, s0 + chunk);
    thread_local std::vector<float> kr_buf, sc_buf, qr_buf;
    float* kr = scratch(kr_buf, (size_t)(std::max<int64_t>(1, s1 - s0) * d));
    float* sc = scratch(sc_buf, (size_t)std::max<int64_t>(1, s1 - s0));
    float* qr = scratch(qr_buf, (size_t)d);
    for (int64_t s = s0; s < s1; ++s)
      rope_rotate(cache_row(a.kc, b, h, s), a.cos + s * half, a.sin + s * half, half, 1.0f, kr + (s - s0) * d);
    for (int64_t t = 0; t < a.t; ++t) {
      const int64_t pos = a.start[b] + t;
      const int64_t e = std::min(s1, pos + 1);  // causal: keys s0..e-1
      for (int64_t gi = 0; gi < g; ++gi) {
        float* part = partial + ((((b * a.hkv + h) * a.splits + sp) * a.t + t) * g + gi) * (d + 2);
        float* acc = part + 2;
        for (int64_t i = 0; i < d; ++i) acc[i] = 0.0f;
        if (e <= s0) {
          part[0] = -std::numeric_limits<float>::infinity();
          part[1] = 0.0f;
          continue;
        }
        const float* qv = a.q + ((b * a.t + t) * a.hq + h * g + gi) * d;
        rope_rotate(qv, a.cos + pos * half, a.sin + pos * half, half, sm_scale, qr);
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t s = s0; s < e; ++s) {
          const float* kv = kr + (s - s0) * d;
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < d; ++i) dot += qr[i] * kv[i];
          sc[s - s0] = dot;
          mx = std::max(mx, dot);
        }
        float l = 0.0f;
        for (int64_t s = s0; s < e; ++s) {
          const float p = std::exp(sc[s - s0] - mx);
          l += p;
          const float* vv = cache_row(a.vc, b, h, s);
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) acc[i] += p * vv[i];
        }
        part[0] = mx;
        part[1] = l;
      }
    }
  });

  // merge the key chunks: weight_i = l_i exp(m_i - max m)
  for (int64_t b = 0; b < a.b; ++b)
    for (int64_t h = 0; h < a.hkv; ++h)
      for (int64_t t = 0; t < a.t; ++t)
        for (int64_t gi = 0; gi < g; ++gi) {
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t sp = 0; sp < a.splits; ++sp)
            mx = std::max(mx, partial[((((b * a.hkv + h) * a.splits + sp) * a.t + t) * g + gi) * (d + 2)]);
          float* o = a.out + ((b * a.t + t) * a.hq + h * g + gi) * d;
          for (int64_t i = 0; i < d; ++i) o[i] = 0.0f;
          float total = 0.0f;
          for (int64_t sp = 0; sp < a.splits; ++sp) {
            const float* part = partial + ((((b * a.hkv + h) * a.splits + sp) * a.t + t) * g + gi) * (d + 2);
            if (part[1] == 0.0f) continue;
            const float wgt = std::exp(part[0] - mx);
            total += part[1] * wgt;
            for (int64_t i = 0; i < d; ++i) o[i] += part[2 + i] * wgt;
          }
          const float inv = total > 0.0f ? 1.0f / total : 0.0f;
          for (int64_t i = 0; i < d; ++i) o[i] *= inv;
        }
}

// ---------------------------------------------------------------------------------------------
// The lecture's f32 matmul, one optimization at a time (notebooks/06_cpu_kernels.ipynb).
// C (M, N) = A (M, K) @ B (K, N), row-major. Variants 0-3 are kept scalar (no auto-vectorization),
// so each step shows what it alone buys.
// ---------------------------------------------------------------------------------------------

#define TP_SCALAR_LOOPS __attribute__((optimize("no-tree-vectorize")))

TP_SCALAR_LOOPS void mm_ijk(const float* A, const float* B, float* C, int64_t M, int64_t N, int64_t K, int64_t i0,
                            int64_t i1) {
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t j = 0; j < N; ++j) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += A[i * K + k] * B[k * N + j];  // B walked down a column
      C[i * N + j] = acc;
    }
}

TP_SCALAR_LOOPS void mm_ikj(const float* A, const float* B, float* C, int64_t M, int64_t N, int64_t K, int64_t i0,
                            int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t j = 0; j < N; ++j) C[i * N + j] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[i * K + k];
      for (int64_t j = 0; j < N; ++j) C[i * N + j] += a * B[k * N + j];  // rows of B and C: unit stride
    }
  }
}

template <int U>
TP_SCALAR_LOOPS void mm_tiled(const float* A, const float* B, float* C, int64_t M, int64_t N, int64_t K, int64_t i0,
                              int64_t i1, int64_t tm, int64_t tn, int64_t tk) {
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t j = 0; j < N; ++j) C[i * N + j] = 0.0f;
  for (int64_t ii = i0; ii < i1; ii += tm)
    for (int64_t kk = 0; kk < K; kk += tk)
      for (int64_t jj = 0; jj < N; jj += tn) {  // a tm x tk block of A and tk x tn of B stay in cache
        const int64_t ie = std::min(i1, ii + tm), ke = std::min(K, kk + tk), je = std::min(N, jj + tn);
        for (int64_t i = ii; i < ie; ++i)
          for (int64_t k = kk; k < ke; ++k) {
            const float a = A[i * K + k];
            const float* b = B + k * N;
            float* c = C + i * N;
            int64_t j = jj;
            for (; j + U <= je; j += U)
#pragma GCC unroll 8
              for (int u = 0; u < U; ++u) c[j + u] += a * b[j + u];
            for (; j < je; ++j) c[j] += a * b[j];
          }
      }
}

// SIMD: a register tile of MR rows x (NV vectors) of C accumulates over a tk-long slice of K,
// broadcasting one A element against a vector of B per multiply-add.
#if defined(TP_ISA_AVX512VNNI)
constexpr int kVecBytes = 64;
#elif defined(TP_ISA_AVX2)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
typedef float vfloat __attribute__((vector_size(kVecBytes), aligned(4)));
constexpr int kLanes = kVecBytes / 4;

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

template <int MR, int NV>
inline void mm_register_tile(const float* A, const float* B, float* C, int64_t N, int64_t K, int64_t i, int64_t j,
                             int64_t k0, int64_t k1) {
  vfloat acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vload(C + (i + r) * N + j + v * kLanes);
  for (int64_t k = k0; k < k1; ++k) {
    vfloat b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload(B + k * N + j + v * kLanes);
    for (int r = 0; r < MR; ++r) {
      const vfloat a = vfloat{} + A[(i + r) * K + k];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) vstore(C + (i + r) * N + j + v * kLanes, acc[r][v]);
}

void mm_simd(const float* A, const float* B, float* C, int64_t M, int64_t N, int64_t K, int64_t i0, int64_t i1,
             int64_t tn, int64_t tk) {
  constexpr int MR = 4, NV = 2, NR = NV * kLanes;
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t j = 0; j < N; ++j) C[i * N + j] = 0.0f;
  for (int64_t kk = 0; kk < K; kk += tk) {
    const int64_t ke = std::min(K, kk + tk);
    for (int64_t jj = 0; jj < N; jj += tn) {
      const int64_t je = std::min(N, jj + tn);
      int64_t i = i0;
      for (; i + MR <= i1; i += MR) {
        int64_t j = jj;
        for (; j + NR <= je; j += NR) mm_register_tile<MR, NV>(A, B, C, N, K, i, j, kk, ke);
        for (; j < je; ++j)
          for (int r = 0; r < MR; ++r)
            for (int64_t k = kk; k < ke; ++k) C[(i + r) * N + j] += A[(i + r) * K + k] * B[k * N + j];
      }
      for (; i < i1; ++i)
        for (int64_t k = kk; k < ke; ++k)
          for (int64_t j = jj; j < je; ++j) C[i * N + j] += A[i * K + k] * B[k * N + j];
    }
  }
}

enum MatmulVariant { kIjk = 0, kIkj = 1, kTiled = 2, kUnrolled = 3, kSimd = 4 };

void matmul_f32(const float* A, const float* B, float* C, int64_t M, int64_t N, int64_t K, int variant,
                int64_t tm, int64_t tn, int64_t tk, int unroll, int threads) {
  tm = std::max<int64_t>(1, tm);
  tn = std::max<int64_t>(1, tn);
  tk = std::max<int64_t>(1, tk);
  const int64_t rows_per_task = variant >= kTiled ? tm : std::max<int64_t>(1, (M + 63) / 64);
  const int64_t tasks = (M + rows_per_task - 1) / rows_per_task;
  parallel_for(threads, tasks, [&](int64_t t) {
    const int64_t i0 = t * rows_per_task, i1 = std::min(M, i0 + rows_per_task);
    switch (variant) {
      case kIjk: mm_ijk(A, B, C, M, N, K, i0, i1); break;
      case kIkj: mm_ikj(A, B, C, M, N, K, i0, i1); break;
      case kTiled: mm_tiled<1>(A, B, C, M, N, K, i0, i1, tm, tn, tk); break;
      case kUnrolled:
        if (unroll >= 8) mm_tiled<8>(A, B, C, M, N, K, i0, i1, tm, tn, tk);
        else if (unroll >= 4) mm_tiled<4>(A, B, C, M, N, K, i0, i1, tm, tn, tk);
        else mm_tiled<2>(A, B, C, M, N, K, i0, i1, tm, tn, tk);
        break;
      default: mm_simd(A, B, C, M, N, K, i0, i1, tn, tk); break;
    }
  });
}

// Peak multiply-add rate: independent FMA chains on vector registers, nothing from memory.
float fma_peak(int64_t iterations, int threads) {
  std::vector<float> partial(std::max(1, threads), 0.0f);
  parallel_for(threads, threads, [&](int64_t t) {
    constexpr int kChains = 12;
    vfloat acc[kChains];
    const vfloat mul = vfloat{} + 0.999999f, add = vfloat{} + 1e-7f;
    for (int c = 0; c < kChains; ++c) acc[c] = vfloat{} + (float)(c + t);
    for (int64_t it = 0; it < iterations; ++it)
      for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * mul + add;
    float s = 0.0f;
    for (int c = 0; c < kChains; ++c)
      for (int l = 0; l < kLanes; ++l) s += acc[c][l];
    partial[t] = s;
  });
  float s = 0.0f;
  for (float p : partial) s += p;
  return s;
}
constexpr int kPeakChains = 12;

}  // namespace tp

// ---------------------------------------------------------------------------------------------
// XLA FFI handlers. Shapes are validated in Python (kernels/cpu/*.py) before a call is built;
// the checks here only keep a malformed call from reading out of bounds.
// ---------------------------------------------------------------------------------------------

static ffi::Error bad(const char* what) { return ffi::Error(ffi::ErrorCode::kInvalidArgument, what); }

// w and up: (N, K/32 * bytes), or stacked (L, N, K/32 * bytes) read at layer[0] in place.
static const uint8_t* layer_rows(ffi::Buffer<ffi::U8>& w, int64_t layer, int64_t* n, int64_t* row_bytes) {
  auto d = w.dimensions();
  if (d.size() == 2) {
    *n = d[0];
    *row_bytes = d[1];
    return w.typed_data();
  }
  if (d.size() != 3 || layer < 0 || layer >= d[0]) return nullptr;
  *n = d[1];
  *row_bytes = d[2];
  return w.typed_data() + layer * d[1] * d[2];
}

static ffi::Error QMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::U8> up,
                              ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> out, int64_t format,
                              int64_t up_format, int64_t swiglu, int64_t block_m, int64_t block_n, int64_t tile_m,
                              int64_t tile_n, int64_t order, int64_t unroll, int64_t threads, int64_t prefetch,
                              int64_t activations) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || xd[1] % 32) return bad("qmatmul: x (M, K) with K % 32 == 0");
  const int64_t m = xd[0], k = xd[1], li = layer.typed_data()[0];
  int64_t n = 0, row = 0, n_up = 0, row_up = 0;
  const uint8_t* wp = layer_rows(w, li, &n, &row);
  const uint8_t* up_p = swiglu ? layer_rows(up, li, &n_up, &row_up) : nullptr;
  if (wp == nullptr || (swiglu && up_p == nullptr)) return bad("qmatmul: weight rank or layer index");
  if (row != k / 32 * tp::block_bytes((int)format)) return bad("qmatmul: weight row bytes do not match K");
  if (swiglu && (n_up != n || row_up != k / 32 * tp::block_bytes((int)up_format)))
    return bad("qmatmul: up weight shape does not match");
  if (out->dimensions().size() != 2 || out->dimensions()[0] != m || out->dimensions()[1] != n)
    return bad("qmatmul: output shape");
  tp::GemmConfig c{(int)block_m, (int)block_n, (int)tile_m, (int)tile_n, (int)order, (int)unroll,
                   (int)std::max<int64_t>(1, threads), (int)std::max<int64_t>(0, prefetch),
                   activations == tp::kActF32 ? tp::kActF32 : tp::kActQ8};
  tp::qmatmul(x.typed_data(), m, k, wp, (int)format, up_p, (int)up_format, n, out->typed_data(), c);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(TpQMatmul, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("format")
                                  .Attr<int64_t>("up_format")
                                  .Attr<int64_t>("swiglu")
                                  .Attr<int64_t>("block_m")
                                  .Attr<int64_t>("block_n")
                                  .Attr<int64_t>("tile_m")
                                  .Attr<int64_t>("tile_n")
                                  .Attr<int64_t>("order")
                                  .Attr<int64_t>("unroll")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("prefetch")
                                  .Attr<int64_t>("activations"));

static ffi::Error RmsnormImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> residual, ffi::Buffer<ffi::F32> weight,
                              ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> h, float eps,
                              int64_t threads) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || residual.element_count() != x.element_count() || (int64_t)weight.element_count() != xd[1])
    return bad("rmsnorm: x (rows, dim), residual like x, weight (dim,)");
  tp::rmsnorm(x.typed_data(), residual.typed_data(), weight.typed_data(), xd[0], xd[1], eps, y->typed_data(),
              h->typed_data(), (int)std::max<int64_t>(1, threads));
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(TpRmsnorm, RmsnormImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("threads"));

static ffi::Error AttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new, ffi::Buffer<ffi::F32> v_new,
                                ffi::Buffer<ffi::F32> k_cache, ffi::Buffer<ffi::F32> v_cache,
                                ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> start, ffi::Buffer<ffi::F32> cos,
                                ffi::Buffer<ffi::F32> sin, ffi::ResultBuffer<ffi::F32> out,
                                ffi::ResultBuffer<ffi::F32> k_out, ffi::ResultBuffer<ffi::F32> v_out, int64_t splits,
                                int64_t threads) {
  auto qd = q.dimensions(), cd = k_cache.dimensions(), kd = k_new.dimensions();
  if (qd.size() != 4 || cd.size() != 5 || kd.size() != 4) return bad("attention: ranks");
  tp::AttentionArgs a;
  a.b = qd[0];
  a.t = qd[1];
  a.hq = qd[2];
  a.d = qd[3];
  a.hkv = cd[2];
  a.s = cd[3];
  const int64_t n_layers = cd[0];
  if (cd[1] != a.b || cd[4] != a.d || kd[0] != a.b || kd[1] != a.t || kd[2] != a.hkv || kd[3] != a.d ||
      a.hq % a.hkv || a.d % 2 || (int64_t)cos.element_count() < a.s * a.d / 2)
    return bad("attention: shapes do not agree");
  a.layer = layer.typed_data()[0];
  if (a.layer < 0 || a.layer >= n_layers) return bad("attention: layer index out of range");
  a.q = q.typed_data();
  a.cos = cos.typed_data();
  a.sin = sin.typed_data();
  a.kc = k_out->typed_data();
  a.vc = v_out->typed_data();
  a.out = out->typed_data();
  a.start = start.typed_data();
  a.splits = std::max<int64_t>(1, splits);
  a.threads = (int)std::max<int64_t>(1, threads);
  // In-place on the aliased cache; copy if XLA handed us distinct buffers.
  if (a.kc != k_cache.typed_data()) std::memcpy(a.kc, k_cache.typed_data(), k_cache.size_bytes());
  if (a.vc != v_cache.typed_data()) std::memcpy(a.vc, v_cache.typed_data(), v_cache.size_bytes());
  const int64_t layer_stride = a.b * a.hkv * a.s * a.d;
  for (int64_t b = 0; b < a.b; ++b) {
    if (a.start[b] < 0 || a.start[b] + a.t > a.s) return bad("attention: position past the end of the cache");
    for (int64_t t = 0; t < a.t; ++t)
      for (int64_t h = 0; h < a.hkv; ++h) {
        const int64_t dst = a.layer * layer_stride + ((b * a.hkv + h) * a.s + a.start[b] + t) * a.d;
        const int64_t src = ((b * a.t + t) * a.hkv + h) * a.d;
        std::memcpy(a.kc + dst, k_new.typed_data() + src, a.d * sizeof(float));
        std::memcpy(a.vc + dst, v_new.typed_data() + src, a.d * sizeof(float));
      }
  }
  tp::attention(a);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(TpAttention, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("splits")
                                  .Attr<int64_t>("threads"));

static ffi::Error MatmulF32Impl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c,
                                int64_t variant, int64_t tile_m, int64_t tile_n, int64_t tile_k, int64_t unroll,
                                int64_t threads) {
  auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2 || ad[1] != bd[0]) return bad("matmul: A (M, K), B (K, N)");
  tp::matmul_f32(a.typed_data(), b.typed_data(), c->typed_data(), ad[0], bd[1], ad[1], (int)variant, tile_m, tile_n,
                 tile_k, (int)unroll, (int)std::max<int64_t>(1, threads));
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(TpMatmulF32, MatmulF32Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("variant")
                                  .Attr<int64_t>("tile_m")
                                  .Attr<int64_t>("tile_n")
                                  .Attr<int64_t>("tile_k")
                                  .Attr<int64_t>("unroll")
                                  .Attr<int64_t>("threads"));

static ffi::Error FmaPeakImpl(ffi::Buffer<ffi::F32> seed, ffi::ResultBuffer<ffi::F32> out, int64_t iterations,
                              int64_t threads) {
  out->typed_data()[0] = tp::fma_peak(iterations, (int)std::max<int64_t>(1, threads)) + seed.typed_data()[0];
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(TpFmaPeak, FmaPeakImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("iterations")
                                  .Attr<int64_t>("threads"));

// Vector width and FMA chains of fma_peak, so Python can count its flops.
extern "C" int tp_vector_lanes() { return tp::kLanes; }
extern "C" int tp_peak_chains() { return tp::kPeakChains; }
