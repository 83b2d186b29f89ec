// Block-quantized weights x 8-bit activations: the integer dot product of one 32-element block,
// per ISA. Formats and the activation quantization follow llama.cpp's (ggml-common.h):
//   Q4_0  {f16 d; u8 qs[16]}        w = d * (q - 8)      q = nibble; qs[i] holds elements i (low), i+16 (high)
//   Q4_1  {f16 d; f16 m; u8 qs[16]} w = d * q + m
//   Q8_0  {f16 d; s8 qs[32]}        w = d * q
// Activations are quantized per 32-block like ggml's quantize_row_q8_0/q8_1 on x86: d = amax/127
// (stored as f16), q = round-half-even(x * 127/amax), s = f16(d * sum(q)) (Q8_1, for Q4_1's m).
// A block dot is an exact int32 per SIMD lane; the float combination is
//   Q4_0/Q8_0: sum_b d_w d_x (sum_i q_w q_x)     Q4_1: sum_b d_w d_x (sum_i q_w q_x) + m_w s_x
// Each ISA body returns the block's int32 partial sums as 8 lanes (lane l covers elements 4l..4l+3),
// the layout of vpdpbusd, of vpmaddubsw+vpmaddwd and of sdot, so activations carry per-lane sums
// for the offset corrections (Q4_0's -8; Q8_0's +128 on the unsigned-operand ISAs).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(TP_ISA_AVX2) || defined(TP_ISA_AVX512VNNI)
#include <immintrin.h>
#define TP_X86 1
#elif defined(TP_ISA_NEON)
#include <arm_neon.h>
#endif

namespace tp {

enum Format : int { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };

template <int F> struct FormatInfo;
template <> struct FormatInfo<Q4_0> { static constexpr int bytes = 18, qs = 2; };
template <> struct FormatInfo<Q4_1> { static constexpr int bytes = 20, qs = 4; };
template <> struct FormatInfo<Q8_0> { static constexpr int bytes = 34, qs = 2; };

inline int block_bytes(int format) { return format == Q4_0 ? 18 : format == Q4_1 ? 20 : 34; }

// ---- IEEE half precision <-> float ------------------------------------------------------------
inline float half_to_float(uint16_t h) {
#if defined(TP_X86)
  return _cvtsh_ss(h);
#else
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      do { ++e; mant <<= 1; } while (!(mant & 0x400u));
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

inline uint16_t float_to_half(float f) {  // round to nearest even, as F16C's vcvtps2ph
#if defined(TP_X86)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));  // inf/nan
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520: overflow to inf
  if (ax < 0x38800000u) {  // result is subnormal (or zero): add the magic 0.5 to round in float
    float magic, af;
    uint32_t m = 0x3f000000u;  // 0.5f
    std::memcpy(&magic, &m, 4);
    std::memcpy(&af, &ax, 4);
    af += magic;
    uint32_t r;
    std::memcpy(&r, &af, 4);
    return (uint16_t)(sign | (r - m));
  }
  uint32_t mant_odd = (ax >> 13) & 1u;
  ax += ((uint32_t)(15 - 127) << 23) + 0xfffu + mant_odd;
  return (uint16_t)(sign | (ax >> 13));
#endif
}

inline float round_half(float f) { return half_to_float(float_to_half(f)); }

inline float load_half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return half_to_float(h);
}

// ---- Activations quantized to 8 bits per 32-block --------------------------------------------
// Row-major over M rows of K elements: qs (M, K) int8; d, s (M, K/32) float; lanes (M, K/32, 8) int32.
struct QuantizedRows {
  int64_t m = 0, k = 0;
  int8_t* qs = nullptr;
  float* d = nullptr;
  float* s = nullptr;
  int32_t* lanes = nullptr;
  int64_t blocks() const { return k / 32; }
};

inline void quantize_row(const float* x, int64_t k, int8_t* qs, float* d, float* s, int32_t* lanes) {
  for (int64_t b = 0; b < k / 32; ++b) {
    const float* xb = x + b * 32;
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
    const float dd = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int sum = 0;
    int lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < 32; ++i) {
      int q = (int)std::nearbyint(xb[i] * id);  // round half to even (default rounding mode)
      q = q > 127 ? 127 : q < -127 ? -127 : q;
      qs[b * 32 + i] = (int8_t)q;
      sum += q;
      lane[i / 4] += q;
    }
    d[b] = round_half(dd);
    s[b] = round_half(dd * (float)sum);
    for (int l = 0; l < 8; ++l) lanes[b * 8 + l] = lane[l];
  }
}

// ---- One block's integer partial sums, per ISA ------------------------------------------------
#if defined(TP_X86)
using Lanes = __m256i;   // 8 x int32
using FLanes = __m256;   // 8 x float

inline FLanes fzero() { return _mm256_setzero_ps(); }
inline FLanes fma_lanes(Lanes v, float scale, FLanes acc) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(scale), acc);
}
inline float hsum(FLanes v) {
  __m128 r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

// unsigned bytes x signed bytes -> 8 int32 lanes of 4-products sums
inline Lanes dot_us(__m256i u, __m256i s) {
#if defined(TP_ISA_AVX512VNNI)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  // u <= 255 only for Q8_0's offset form, which the AVX2 body never uses (see weight_block)
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// The weight operand of one block, as the body will multiply it.
template <int F> struct WeightBlock { __m256i q; };

template <int F> inline WeightBlock<F> weight_block(const uint8_t* blk) {
  if constexpr (F == Q8_0) {
    __m256i q = _mm256_loadu_si256((const __m256i*)(blk + 2));
#if defined(TP_ISA_AVX512VNNI)
    return {_mm256_xor_si256(q, _mm256_set1_epi8((char)0x80))};  // q + 128 as unsigned; corrected below
#else
    return {q};  // signed: the sign trick in block_dot
#endif
  } else {
    const __m128i raw = _mm_loadu_si128((const __m128i*)(blk + FormatInfo<F>::qs));
    const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4), 1);
    return {_mm256_and_si256(both, _mm256_set1_epi8(0x0f))};
  }
}

template <int F> inline Lanes block_dot(const WeightBlock<F>& w, const int8_t* xq, const int32_t* lanes) {
  const __m256i x = _mm256_loadu_si256((const __m256i*)xq);
  if constexpr (F == Q8_0) {
#if defined(TP_ISA_AVX512VNNI)
    const __m256i corr = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i*)lanes), 7);  // 128 * lane sums
    return _mm256_sub_epi32(dot_us(w.q, x), corr);
#else
    return dot_us(_mm256_sign_epi8(w.q, w.q), _mm256_sign_epi8(x, w.q));
#endif
  } else if constexpr (F == Q4_0) {
    const __m256i corr = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i*)lanes), 3);  // 8 * lane sums
    return _mm256_sub_epi32(dot_us(w.q, x), corr);
  } else {
    return dot_us(w.q, x);
  }
}

#elif defined(TP_ISA_NEON)
struct Lanes { int32x4_t lo, hi; };
struct FLanes { float32x4_t lo, hi; };

inline FLanes fzero() { return {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)}; }
inline FLanes fma_lanes(Lanes v, float scale, FLanes acc) {
  return {vfmaq_n_f32(acc.lo, vcvtq_f32_s32(v.lo), scale), vfmaq_n_f32(acc.hi, vcvtq_f32_s32(v.hi), scale)};
}
inline float hsum(FLanes v) { return vaddvq_f32(vaddq_f32(v.lo, v.hi)); }

template <int F> struct WeightBlock { int8x16_t lo, hi; };  // elements 0..15 and 16..31, signed

template <int F> inline WeightBlock<F> weight_block(const uint8_t* blk) {
  if constexpr (F == Q8_0) {
    return {vld1q_s8((const int8_t*)(blk + 2)), vld1q_s8((const int8_t*)(blk + 18))};
  } else {
    const uint8x16_t raw = vld1q_u8(blk + FormatInfo<F>::qs);
    int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(0x0f)));
    int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
    if constexpr (F == Q4_0) {
      lo = vsubq_s8(lo, vdupq_n_s8(8));
      hi = vsubq_s8(hi, vdupq_n_s8(8));
    }
    return {lo, hi};
  }
}

inline int32x4_t dot16(int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
  return vdotq_s32(vdupq_n_s32(0), a, b);
#else
  const int16x8_t lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
  const int16x8_t hi = vmull_high_s8(a, b);
  return vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi));  // 4 lanes of 4-product sums (any order: summed later)
#endif
}

template <int F> inline Lanes block_dot(const WeightBlock<F>& w, const int8_t* xq, const int32_t*) {
  return {dot16(w.lo, vld1q_s8(xq)), dot16(w.hi, vld1q_s8(xq + 16))};
}

#else  // portable scalar body
struct Lanes { int32_t v[8]; };
struct FLanes { float v; };

inline FLanes fzero() { return {0.0f}; }
inline FLanes fma_lanes(Lanes l, float scale, FLanes acc) {
  int32_t sum = 0;
  for (int i = 0; i < 8; ++i) sum += l.v[i];
  return {acc.v + (float)sum * scale};
}
inline float hsum(FLanes v) { return v.v; }

template <int F> struct WeightBlock { int8_t q[32]; };

template <int F> inline WeightBlock<F> weight_block(const uint8_t* blk) {
  WeightBlock<F> w;
  if constexpr (F == Q8_0) {
    std::memcpy(w.q, blk + 2, 32);
  } else {
    const int off = F == Q4_0 ? 8 : 0;
    for (int i = 0; i < 16; ++i) {
      const uint8_t byte = blk[FormatInfo<F>::qs + i];
      w.q[i] = (int8_t)((byte & 0x0f) - off);
      w.q[i + 16] = (int8_t)((byte >> 4) - off);
    }
  }
  return w;
}

template <int F> inline Lanes block_dot(const WeightBlock<F>& w, const int8_t* xq, const int32_t*) {
  Lanes out;
  for (int l = 0; l < 8; ++l) {
    int32_t s = 0;
    for (int i = 0; i < 4; ++i) s += (int32_t)w.q[4 * l + i] * (int32_t)xq[4 * l + i];
    out.v[l] = s;
  }
  return out;
}
#endif

}  // namespace tp
