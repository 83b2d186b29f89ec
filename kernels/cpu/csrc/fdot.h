// Block-quantized weights x f32 activations (the exact mode): each 32-element weight block is decoded
// to f32 vectors in registers and multiplied with the activations as they are. Per block, in
// llama.cpp's formats (qdot.h): Q4_0 w = d (q - 8), Q4_1 w = d q + m, Q8_0 w = d q, so
//   sum_i w_i x_i = d (sum_i q_i x_i) + m (sum_i x_i)        (Q4_0: m = -8 d; Q8_0: m = 0)
// which is the xla path's arithmetic (kernels/llm/w4a16.py, xla_matmul). q has at most 8 bits and d
// is an f16 (11 bits), so every d q is exact in f32, and a dequantized weight fma(q, d, m) is the
// xla path's q * d + m: the two paths differ only in the order of their f32 sums.
// The vector type is the widest f32 register of the ISA (16 lanes on AVX-512, 8 on AVX2, 4 on NEON);
// the portable body uses 4-float structs of plain loops (mul and add, not fused).
#pragma once

#include "qdot.h"

namespace tp {

#if defined(TP_ISA_AVX512VNNI)
using FVec = __m512;
constexpr int kFLanes = 16;
inline FVec fv_zero() { return _mm512_setzero_ps(); }
inline FVec fv_load(const float* p) { return _mm512_loadu_ps(p); }
inline void fv_store(float* p, FVec v) { _mm512_storeu_ps(p, v); }
inline FVec fv_set1(float v) { return _mm512_set1_ps(v); }
inline FVec fv_mul(FVec a, FVec b) { return _mm512_mul_ps(a, b); }
inline FVec fv_add(FVec a, FVec b) { return _mm512_add_ps(a, b); }
inline FVec fv_fma(FVec a, FVec b, FVec c) { return _mm512_fmadd_ps(a, b, c); }
inline float fv_sum(FVec v) { return _mm512_reduce_add_ps(v); }

// The block's 32 integers as floats in element order (q[0]: elements 0..15, q[1]: 16..31). A Q4
// byte i holds element i (low nibble) and i + 16 (high): widened to 32-bit lanes, `& 15` gives the
// first half and `>> 4` the second, with no shuffle across lanes.
template <int F> inline void decode_block(const uint8_t* blk, FVec* q) {
  if constexpr (F == Q8_0) {
    q[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 2))));
    q[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 18))));
  } else {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(blk + FormatInfo<F>::qs)));
    q[0] = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    q[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
  }
}

#elif defined(TP_ISA_AVX2)
using FVec = __m256;
constexpr int kFLanes = 8;
inline FVec fv_zero() { return _mm256_setzero_ps(); }
inline FVec fv_load(const float* p) { return _mm256_loadu_ps(p); }
inline void fv_store(float* p, FVec v) { _mm256_storeu_ps(p, v); }
inline FVec fv_set1(float v) { return _mm256_set1_ps(v); }
inline FVec fv_mul(FVec a, FVec b) { return _mm256_mul_ps(a, b); }
inline FVec fv_add(FVec a, FVec b) { return _mm256_add_ps(a, b); }
inline FVec fv_fma(FVec a, FVec b, FVec c) { return _mm256_fmadd_ps(a, b, c); }
inline float fv_sum(FVec v) { return hsum(v); }

template <int F> inline void decode_block(const uint8_t* blk, FVec* q) {
  if constexpr (F == Q8_0) {
    for (int r = 0; r < 4; ++r)
      q[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(blk + 2 + 8 * r))));
  } else {
    const __m128i raw = _mm_loadu_si128((const __m128i*)(blk + FormatInfo<F>::qs));
    const __m256i b0 = _mm256_cvtepu8_epi32(raw), b1 = _mm256_cvtepu8_epi32(_mm_srli_si128(raw, 8));
    const __m256i low = _mm256_set1_epi32(15);
    q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(b0, low));  // elements 0..7
    q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b1, low));  // 8..15
    q[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));   // 16..23
    q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));   // 24..31
  }
}

#elif defined(TP_ISA_NEON)
using FVec = float32x4_t;
constexpr int kFLanes = 4;
inline FVec fv_zero() { return vdupq_n_f32(0.0f); }
inline FVec fv_load(const float* p) { return vld1q_f32(p); }
inline void fv_store(float* p, FVec v) { vst1q_f32(p, v); }
inline FVec fv_set1(float v) { return vdupq_n_f32(v); }
inline FVec fv_mul(FVec a, FVec b) { return vmulq_f32(a, b); }
inline FVec fv_add(FVec a, FVec b) { return vaddq_f32(a, b); }
inline FVec fv_fma(FVec a, FVec b, FVec c) { return vfmaq_f32(c, a, b); }
inline float fv_sum(FVec v) { return vaddvq_f32(v); }

template <int F> inline void decode_block(const uint8_t* blk, FVec* q) {
  if constexpr (F == Q8_0) {
    for (int h = 0; h < 2; ++h) {
      const int8x16_t b = vld1q_s8((const int8_t*)(blk + 2 + 16 * h));
      const int16x8_t lo = vmovl_s8(vget_low_s8(b)), hi = vmovl_high_s8(b);
      q[4 * h + 0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
      q[4 * h + 1] = vcvtq_f32_s32(vmovl_high_s16(lo));
      q[4 * h + 2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
      q[4 * h + 3] = vcvtq_f32_s32(vmovl_high_s16(hi));
    }
  } else {
    const uint8x16_t raw = vld1q_u8(blk + FormatInfo<F>::qs);
    const uint8x16_t halves[2] = {vandq_u8(raw, vdupq_n_u8(0x0f)), vshrq_n_u8(raw, 4)};
    for (int h = 0; h < 2; ++h) {
      const uint16x8_t lo = vmovl_u8(vget_low_u8(halves[h])), hi = vmovl_high_u8(halves[h]);
      q[4 * h + 0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo)));
      q[4 * h + 1] = vcvtq_f32_u32(vmovl_high_u16(lo));
      q[4 * h + 2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi)));
      q[4 * h + 3] = vcvtq_f32_u32(vmovl_high_u16(hi));
    }
  }
}

#else  // portable body
struct FVec { float v[4]; };
constexpr int kFLanes = 4;
inline FVec fv_zero() { return {{0.0f, 0.0f, 0.0f, 0.0f}}; }
inline FVec fv_load(const float* p) { FVec r; std::memcpy(r.v, p, sizeof(r.v)); return r; }
inline void fv_store(float* p, FVec v) { std::memcpy(p, v.v, sizeof(v.v)); }
inline FVec fv_set1(float s) { return {{s, s, s, s}}; }
inline FVec fv_mul(FVec a, FVec b) {
  for (int l = 0; l < 4; ++l) a.v[l] *= b.v[l];
  return a;
}
inline FVec fv_add(FVec a, FVec b) {
  for (int l = 0; l < 4; ++l) a.v[l] += b.v[l];
  return a;
}
inline FVec fv_fma(FVec a, FVec b, FVec c) {
  for (int l = 0; l < 4; ++l) c.v[l] += a.v[l] * b.v[l];
  return c;
}
inline float fv_sum(FVec v) { return (v.v[0] + v.v[1]) + (v.v[2] + v.v[3]); }

template <int F> inline void decode_block(const uint8_t* blk, FVec* q) {
  for (int i = 0; i < 32; ++i) {
    float value;
    if constexpr (F == Q8_0) {
      value = (float)(int8_t)blk[2 + i];
    } else {
      const uint8_t byte = blk[FormatInfo<F>::qs + (i & 15)];
      value = (float)(i < 16 ? byte & 0x0f : byte >> 4);
    }
    q[i / 4].v[i % 4] = value;
  }
}
#endif

constexpr int kBlockVecs = 32 / kFLanes;  // f32 vectors per 32-element block

// A block's scale d and offset m (the m of sum_i w_i x_i = d sum_i q_i x_i + m sum_i x_i).
template <int F> inline void block_scales(const uint8_t* blk, float* d, float* m) {
  *d = load_half(blk);
  if constexpr (F == Q4_1) *m = load_half(blk + 2);
  else if constexpr (F == Q4_0) *m = -8.0f * *d;  // exact: the xla path's min of a Q4_0 block
  else *m = 0.0f;
}

// sum_i q_i x_i over one block, as kFLanes partial sums.
inline FVec block_fdot(const FVec* q, const float* x) {
  FVec v = fv_mul(q[0], fv_load(x));
  for (int r = 1; r < kBlockVecs; ++r) v = fv_fma(q[r], fv_load(x + r * kFLanes), v);
  return v;
}

}  // namespace tp
