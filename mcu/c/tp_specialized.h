/* TinyPallas specialized int8 kernels: one instance per layer.
 *
 * Every kernel here is a static always-inline function that takes its layer as a pointer to a
 * `static const` descriptor written by the code generator (mcu/specialized.py): shapes,
 * strides, padding, offsets, the tile and unroll of the schedule and the requantization mode
 * are compile-time constants at each call site, so the compiler folds them into immediates,
 * removes the branches that do not apply and fully unrolls the short loops (the TinyEngine
 * idea: code generated per layer instead of one generic interpreter of shapes).
 *
 * Numerics are TFLite Micro's (double-rounding requantization) bit for bit. The weights, biases
 * and requantization constants are rearranged at export time so that the inner loops are
 * Cortex-M DSP dual multiply-accumulates (SMLAD on two 16-bit lanes) and nothing else:
 *  - activations are widened once to 16 bits with the input offset added (SXTAB16), four
 *    values at a time, which yields the lanes in the order (x0, x2), (x1, x3); weights are
 *    stored in that same order, so no lane shuffles are needed;
 *  - int16 weights are stored doubled (2 w) so the accumulator comes out as 2 * acc, which is
 *    what the rounding high multiply of the requantization needs (no shift per output);
 *  - per output channel one 16-byte record {bias, multiplier, rounding, shift} holds the bias
 *    (with the input offset's contribution folded in where the input is not widened first) and
 *    the output offset and rounding term folded together (see tp_sp_requantize).
 * On a core with the DSP extension (Cortex-M4/M7) the ACLE intrinsics of arm_acle.h (and two
 * instructions ACLE lacks, in inline assembly) are used; elsewhere (host builds) each
 * instruction has a portable C form with the same result.
 * Layouts follow TFLite: activations NHWC. */
#ifndef TP_SPECIALIZED_H
#define TP_SPECIALIZED_H

#include <stdint.h>
#include <string.h>

#define TP_SP_INLINE static inline __attribute__((always_inline))

#if defined(__ARM_FEATURE_DSP) && defined(__ARM_FEATURE_SIMD32)
#include <arm_acle.h>
#define TP_SP_DSP 1
#endif

/* ---- the DSP instructions the kernels use, each with a portable C form ---- */

TP_SP_INLINE int32_t tp_sp_ld32(const void *p) { /* LDR; unaligned loads are legal on ARMv7E-M */
  int32_t v;
  memcpy(&v, p, 4);
  return v;
}

TP_SP_INLINE void tp_sp_st32(void *p, int32_t v) { memcpy(p, &v, 4); }

/* A word of an aligned int16/int8 array (widened columns, packed weights): plain word loads
 * that the compiler may pair into LDRD. */
typedef int32_t tp_sp_word __attribute__((may_alias, aligned(4)));
/* Two words at *p, then p += 2 words: one LDRD with writeback (gcc does not pair the loads of
 * an unrolled loop itself). */
#ifdef TP_SP_DSP
TP_SP_INLINE void tp_sp_ld2_ia(const tp_sp_word **p, int32_t *lo, int32_t *hi) {
  __asm__("ldrd %0, %1, [%2], #8" : "=r"(*lo), "=r"(*hi), "+r"(*p) : "m"(*(const int32_t(*)[2]) * p));
}
#else
TP_SP_INLINE void tp_sp_ld2_ia(const tp_sp_word **p, int32_t *lo, int32_t *hi) {
  *lo = (*p)[0];
  *hi = (*p)[1];
  *p += 2;
}
#endif

TP_SP_INLINE int32_t tp_sp_ror8(int32_t x) { return (int32_t)(((uint32_t)x >> 8) | ((uint32_t)x << 24)); }

#ifdef TP_SP_DSP
TP_SP_INLINE int32_t tp_sp_smlad(int32_t a, int32_t b, int32_t acc) { return __smlad(a, b, acc); }
TP_SP_INLINE int32_t tp_sp_smlabb(int32_t a, int32_t b, int32_t acc) { return __smlabb(a, b, acc); }
TP_SP_INLINE int32_t tp_sp_smlatb(int32_t a, int32_t b, int32_t acc) { return __smlatb(a, b, acc); }
TP_SP_INLINE int32_t tp_sp_sxtb16(int32_t x) { return __sxtb16(x); }
/* SXTB16 with its ROR #8 operand (gcc folds the rotate into the instruction) */
TP_SP_INLINE int32_t tp_sp_sxtab16(int32_t a, int32_t x) { return __sxtab16(a, x); }
/* SXTB16 / SXTAB16 with the ROR #8 operand rotation (gcc does not fold the rotate by itself) */
TP_SP_INLINE int32_t tp_sp_sxtb16_ror8(int32_t x) {
  int32_t r;
  __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(x));
  return r;
}
TP_SP_INLINE int32_t tp_sp_sxtab16_ror8(int32_t a, int32_t x) {
  int32_t r;
  __asm__("sxtab16 %0, %1, %2, ror #8" : "=r"(r) : "r"(a), "r"(x));
  return r;
}
TP_SP_INLINE int32_t tp_sp_ssat8(int32_t x) { return __ssat(x, 8); }
/* SMMLAR: acc + (a * b + 2^31) / 2^32, rounded high word of a 64-bit product (not in ACLE). */
TP_SP_INLINE int32_t tp_sp_smmlar(int32_t a, int32_t b, int32_t acc) {
  int32_t r;
  __asm__("smmlar %0, %1, %2, %3" : "=r"(r) : "r"(a), "r"(b), "r"(acc));
  return r;
}
#else
TP_SP_INLINE int32_t tp_sp_lo16(int32_t x) { return (int32_t)(int16_t)(uint16_t)((uint32_t)x & 0xFFFFu); }
TP_SP_INLINE int32_t tp_sp_hi16(int32_t x) { return (int32_t)(int16_t)(uint16_t)((uint32_t)x >> 16); }
TP_SP_INLINE int32_t tp_sp_pack16(int32_t lo, int32_t hi) {
  return (int32_t)(((uint32_t)lo & 0xFFFFu) | ((uint32_t)hi << 16));
}
TP_SP_INLINE int32_t tp_sp_smlad(int32_t a, int32_t b, int32_t acc) {
  return (int32_t)((uint32_t)acc + (uint32_t)(tp_sp_lo16(a) * tp_sp_lo16(b)) + (uint32_t)(tp_sp_hi16(a) * tp_sp_hi16(b)));
}
TP_SP_INLINE int32_t tp_sp_smlabb(int32_t a, int32_t b, int32_t acc) {
  return (int32_t)((uint32_t)acc + (uint32_t)(tp_sp_lo16(a) * tp_sp_lo16(b)));
}
TP_SP_INLINE int32_t tp_sp_smlatb(int32_t a, int32_t b, int32_t acc) {
  return (int32_t)((uint32_t)acc + (uint32_t)(tp_sp_hi16(a) * tp_sp_lo16(b)));
}
TP_SP_INLINE int32_t tp_sp_sxtb16(int32_t x) {
  return tp_sp_pack16((int8_t)(uint8_t)((uint32_t)x & 0xFFu), (int8_t)(uint8_t)(((uint32_t)x >> 16) & 0xFFu));
}
TP_SP_INLINE int32_t tp_sp_sxtb16_ror8(int32_t x) { return tp_sp_sxtb16(tp_sp_ror8(x)); }
TP_SP_INLINE int32_t tp_sp_sxtab16(int32_t a, int32_t x) {
  const int32_t e = tp_sp_sxtb16(x);
  return tp_sp_pack16(tp_sp_lo16(a) + tp_sp_lo16(e), tp_sp_hi16(a) + tp_sp_hi16(e));
}
TP_SP_INLINE int32_t tp_sp_sxtab16_ror8(int32_t a, int32_t x) { return tp_sp_sxtab16(a, tp_sp_ror8(x)); }
TP_SP_INLINE int32_t tp_sp_ssat8(int32_t x) { return x < -128 ? -128 : (x > 127 ? 127 : x); }
TP_SP_INLINE int32_t tp_sp_smmlar(int32_t a, int32_t b, int32_t acc) {
  const int64_t r = (int64_t)acc * 4294967296ll + (int64_t)a * (int64_t)b + 2147483648ll;
  return (int32_t)(r >> 32);
}
#endif

/* ---- requantization ---- */

/* One record per output channel (16 bytes, loaded together). */
typedef struct {
  int32_t bias;       /* initial accumulator, in the accumulator's scale (doubled with int16 weights) */
  int32_t multiplier; /* TFLite's Q31 output multiplier */
  int32_t rounding;   /* TP_SP_RQ_FAST: 2^(right-1) + (output_offset << right); _RIGHT0: output_offset */
  int32_t shift;      /* TP_SP_RQ_FAST: right shift (>= 1); TP_SP_RQ_EXACT: TFLite's signed shift */
} tp_sp_channel;

enum {
  /* TFLite's MultiplyByQuantizedMultiplier(acc, M, -right) + offset, right >= 1 on every channel,
   * |2 acc| < 2^31 proven at export time:
   *   SaturatingRoundingDoublingHighMul(acc, M) = (2 acc * M + 2^31) >> 32 = SMMULR(2 acc, M)
   *   (no saturation: M > 0), and RoundingDivideByPOT rounds halves away from zero:
   *   (a + 2^(right-1) - [a < 0]) >> right, where [a < 0] may be read off acc (M > 0 keeps the
   *   sign, and a = 0 rounds to 0 either way). The offset rides along as offset << right. */
  TP_SP_RQ_FAST = 0,
  TP_SP_RQ_RIGHT0 = 1, /* as FAST with right = 0 on every channel: no rounding term */
  TP_SP_RQ_EXACT = 2,  /* anything else: the reference arithmetic (left shifts, large accumulators) */
};

TP_SP_INLINE int32_t tp_sp_srdhm(int32_t a, int32_t b) {
  if (a == b && a == INT32_MIN) return INT32_MAX;
  return (int32_t)(((int64_t)a * (int64_t)b + (1ll << 30)) >> 31);
}

TP_SP_INLINE int32_t tp_sp_rdbpot(int32_t x, int32_t exponent) {
  const int32_t mask = (int32_t)((1ll << exponent) - 1);
  const int32_t remainder = x & mask;
  const int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
  return (x >> exponent) + (remainder > threshold ? 1 : 0);
}

/* acc: the accumulator, doubled (2 acc) when `doubled`; returns the clamped int8 value. */
TP_SP_INLINE int32_t tp_sp_requantize(int32_t acc, const tp_sp_channel *q, int32_t mode, int32_t doubled,
                                      int32_t act_min, int32_t act_max) {
  int32_t v;
  if (mode == TP_SP_RQ_EXACT) {
    const int32_t x = doubled ? acc >> 1 : acc;
    const int32_t left = q->shift > 0 ? q->shift : 0, right = q->shift > 0 ? 0 : -q->shift;
    v = tp_sp_rdbpot(tp_sp_srdhm((int32_t)((uint32_t)x << left), q->multiplier), right) + q->rounding;
  } else {
    const int32_t acc2 = doubled ? acc : (int32_t)((uint32_t)acc << 1);
    if (mode == TP_SP_RQ_FAST) {
      v = tp_sp_smmlar(acc2, q->multiplier, q->rounding + (acc >> 31)) >> q->shift;
    } else {
      v = tp_sp_smmlar(acc2, q->multiplier, q->rounding);
    }
  }
  v = tp_sp_ssat8(v);
  if (act_min > -128) v = v < act_min ? act_min : v;
  if (act_max < 127) v = v > act_max ? act_max : v;
  return v;
}

/* ---- widening: 4 int8 -> 4 int16 (+ offset), lanes (x0, x2), (x1, x3) ---- */

/* n int8 from src (any alignment) to dst as int16 + offset, in groups of four; a last partial
 * group is completed with zeros (its weights are zero). Returns dst past the written words. */
TP_SP_INLINE int16_t *tp_sp_widen(const int8_t *src, int16_t *dst, int32_t n, int32_t offset2) {
  int32_t i = 0;
  for (; i + 4 <= n; i += 4, dst += 4) {
    const int32_t v = tp_sp_ld32(src + i);
    tp_sp_st32(dst, tp_sp_sxtab16(offset2, v));
    tp_sp_st32(dst + 2, tp_sp_sxtab16_ror8(offset2, v));
  }
  if (n % 4) {
    uint32_t v = 0;
    for (int32_t j = 0; j < n % 4; j++) v |= (uint32_t)(uint8_t)src[i + j] << (8 * j);
    tp_sp_st32(dst, tp_sp_sxtab16(offset2, (int32_t)v));
    tp_sp_st32(dst + 2, tp_sp_sxtab16_ror8(offset2, (int32_t)v));
    dst += 4;
  }
  return dst;
}

/* ---- convolution: im2col into two int16 columns, 2x2 register tiles ---- */

typedef struct {
  int32_t in_h, in_w, in_c, out_h, out_w, out_c;
  int32_t k_h, k_w, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w;
  int32_t input_offset, act_min, act_max;
  /* the column: k_h rows of `segments` segments of `segment` input bytes (k_w * in_c when
   * dil_w == 1, else in_c), each padded to `segment_padded` (a multiple of 4) */
  int32_t segment, segment_padded, segments, column; /* column = k_h * segments * segment_padded */
  int32_t weights_s16;                               /* 1: int16, 0: int8 */
  int32_t acc_doubled;                               /* int16 weights stored as 2 w */
  int32_t requant;                                   /* TP_SP_RQ_* */
  int32_t unroll;                                    /* k groups of 4 per inner iteration: 1 or 2 */
  const void *weights; /* blocks of 2 output channels (a last block of 1): per group of 4 k, the
                          block's rows one after the other (int16: lanes (k0,k2),(k1,k3); int8: k0..k3) */
  const tp_sp_channel *channels;
} tp_sp_conv_layer;

/* The receptive field of output pixel (oy, ox) as one widened column. */
TP_SP_INLINE void tp_sp_im2col(const tp_sp_conv_layer *L, const int8_t *in, int32_t oy, int32_t ox, int16_t *col,
                                int8_t *taps) {
  const int32_t offset2 = (int32_t)(((uint32_t)(uint16_t)L->input_offset << 16) | (uint16_t)L->input_offset);
  const int32_t iy0 = oy * L->stride_h - L->pad_top, ix0 = ox * L->stride_w - L->pad_left;
  for (int32_t ky = 0; ky < L->k_h; ky++) {
    const int32_t iy = iy0 + ky * L->dil_h;
    if (iy < 0 || iy >= L->in_h) {
      memset(col, 0, (size_t)(L->segments * L->segment_padded) * sizeof(int16_t));
      col += L->segments * L->segment_padded;
      continue;
    }
    const int8_t *row = in + iy * L->in_w * L->in_c;
    if (L->dil_w == 1) {
      if (ix0 >= 0 && ix0 + L->k_w <= L->in_w) {
        col = tp_sp_widen(row + ix0 * L->in_c, col, L->segment, offset2);
      } else { /* a segment that crosses the left or right border: taps outside hold the zero point */
        for (int32_t kx = 0; kx < L->k_w; kx++) {
          const int32_t ix = ix0 + kx;
          if (ix < 0 || ix >= L->in_w) {
            memset(taps + kx * L->in_c, (int8_t)(-L->input_offset), (size_t)L->in_c);
          } else {
            memcpy(taps + kx * L->in_c, row + ix * L->in_c, (size_t)L->in_c);
          }
        }
        col = tp_sp_widen(taps, col, L->segment, offset2);
      }
    } else {
      for (int32_t kx = 0; kx < L->k_w; kx++) {
        const int32_t ix = ix0 + kx * L->dil_w;
        if (ix < 0 || ix >= L->in_w) {
          memset(col, 0, (size_t)L->segment_padded * sizeof(int16_t));
          col += L->segment_padded;
        } else {
          col = tp_sp_widen(row + ix * L->in_c, col, L->segment, offset2);
        }
      }
    }
  }
}

/* One group of 4 k of a block of `rows` (1 or 2) weight rows against `cols` (1 or 2) widened
 * columns: the weights of the group are loaded (int16) or loaded and widened (int8) once and
 * used for every column. s[r][c] are the accumulators; x0, x1 walk the columns, w the weights. */
TP_SP_INLINE void tp_sp_mac_group(const tp_sp_conv_layer *L, const tp_sp_word **x0, const tp_sp_word **x1,
                                  const tp_sp_word **w, int32_t rows, int32_t cols, int32_t s[2][2]) {
  int32_t xa, xb, ya = 0, yb = 0;
  tp_sp_ld2_ia(x0, &xa, &xb);
  if (cols == 2) tp_sp_ld2_ia(x1, &ya, &yb);
#pragma GCC unroll 4
  for (int32_t r = 0; r < rows; r++) {
    int32_t wa, wb;
    if (L->weights_s16) {
      tp_sp_ld2_ia(w, &wa, &wb);
    } else {
      const int32_t wv = **w;
      *w += 1;
      wa = tp_sp_sxtb16(wv);
      wb = tp_sp_sxtb16_ror8(wv);
    }
    s[r][0] = tp_sp_smlad(xb, wb, tp_sp_smlad(xa, wa, s[r][0]));
    if (cols == 2) s[r][1] = tp_sp_smlad(yb, wb, tp_sp_smlad(ya, wa, s[r][1]));
  }
}

/* A rows x cols register tile over the whole column; returns the weights past the block. */
TP_SP_INLINE const void *tp_sp_tile(const tp_sp_conv_layer *L, const int16_t *col, const void *w, int32_t rows,
                                    int32_t cols, int32_t s[2][2]) {
  const tp_sp_word *x0 = (const tp_sp_word *)col, *x1 = (const tp_sp_word *)(col + L->column);
  const tp_sp_word *wp = (const tp_sp_word *)w;
  int32_t s00 = s[0][0], s01 = s[0][1], s10 = s[1][0], s11 = s[1][1];
  int32_t acc[2][2];
  if (L->unroll >= 2) {
    int32_t n = L->column / 4;
    for (; n >= 2; n -= 2) {
      acc[0][0] = s00, acc[0][1] = s01, acc[1][0] = s10, acc[1][1] = s11;
      tp_sp_mac_group(L, &x0, &x1, &wp, rows, cols, acc);
      tp_sp_mac_group(L, &x0, &x1, &wp, rows, cols, acc);
      s00 = acc[0][0], s01 = acc[0][1], s10 = acc[1][0], s11 = acc[1][1];
    }
    if (n) {
      acc[0][0] = s00, acc[0][1] = s01, acc[1][0] = s10, acc[1][1] = s11;
      tp_sp_mac_group(L, &x0, &x1, &wp, rows, cols, acc);
      s00 = acc[0][0], s01 = acc[0][1], s10 = acc[1][0], s11 = acc[1][1];
    }
  } else {
    for (int32_t n = L->column / 4; n > 0; n--) {
      acc[0][0] = s00, acc[0][1] = s01, acc[1][0] = s10, acc[1][1] = s11;
      tp_sp_mac_group(L, &x0, &x1, &wp, rows, cols, acc);
      s00 = acc[0][0], s01 = acc[0][1], s10 = acc[1][0], s11 = acc[1][1];
    }
  }
  s[0][0] = s00, s[0][1] = s01, s[1][0] = s10, s[1][1] = s11;
  return wp;
}

/* All output channels of `cols` (1 or 2) output pixels whose columns are in `col`. */
TP_SP_INLINE void tp_sp_conv_pixels(const tp_sp_conv_layer *L, const int16_t *col, int8_t *out, int32_t cols) {
  const void *w = L->weights;
  const tp_sp_channel *q = L->channels;
  const int32_t doubled = L->acc_doubled, oc_n = L->out_c;
  int32_t oc = 0;
  for (; oc + 2 <= oc_n; oc += 2, q += 2) {
    int32_t s[2][2] = {{q[0].bias, q[0].bias}, {q[1].bias, q[1].bias}};
    w = tp_sp_tile(L, col, w, 2, cols, s);
    const tp_sp_channel q0 = q[0], q1 = q[1]; /* read before the int8 stores, which may alias */
    const int32_t y00 = tp_sp_requantize(s[0][0], &q0, L->requant, doubled, L->act_min, L->act_max);
    const int32_t y10 = tp_sp_requantize(s[1][0], &q1, L->requant, doubled, L->act_min, L->act_max);
    if (cols == 2) {
      const int32_t y01 = tp_sp_requantize(s[0][1], &q0, L->requant, doubled, L->act_min, L->act_max);
      const int32_t y11 = tp_sp_requantize(s[1][1], &q1, L->requant, doubled, L->act_min, L->act_max);
      out[oc_n + oc] = (int8_t)y01;
      out[oc_n + oc + 1] = (int8_t)y11;
    }
    out[oc] = (int8_t)y00;
    out[oc + 1] = (int8_t)y10;
  }
  if (oc < oc_n) { /* the last, single-row block */
    int32_t s[2][2] = {{q[0].bias, q[0].bias}, {0, 0}};
    tp_sp_tile(L, col, w, 1, cols, s);
    out[oc] = (int8_t)tp_sp_requantize(s[0][0], &q[0], L->requant, doubled, L->act_min, L->act_max);
    if (cols == 2) out[oc_n + oc] = (int8_t)tp_sp_requantize(s[0][1], &q[0], L->requant, doubled, L->act_min, L->act_max);
  }
}

/* CONV_2D (1x1 pointwise included: its column is the pixel itself). Output pixels are taken two
 * at a time in address order and written after both columns are gathered, so the output may
 * overlap the input's tail as the portable kernels allow (mcu/planner.py overlap_limit).
 * col: scratch of 2 * column int16, then `segment` bytes for segments that cross a border. */
TP_SP_INLINE void tp_sp_conv(const tp_sp_conv_layer *L, const int8_t *in, int8_t *out, int16_t *col) {
  const int32_t pixels = L->out_h * L->out_w;
  int8_t *taps = (int8_t *)(col + 2 * L->column);
  int32_t oy = 0, ox = 0;
  int32_t p = 0;
  for (; p + 2 <= pixels; p += 2, out += 2 * L->out_c) {
    tp_sp_im2col(L, in, oy, ox, col, taps);
    if (++ox == L->out_w) ox = 0, oy++;
    tp_sp_im2col(L, in, oy, ox, col + L->column, taps);
    if (++ox == L->out_w) ox = 0, oy++;
    tp_sp_conv_pixels(L, col, out, 2);
  }
  if (p < pixels) {
    tp_sp_im2col(L, in, oy, ox, col, taps);
    tp_sp_conv_pixels(L, col, out, 1);
  }
}

/* ---- one widened input group against `rows` weight rows; `rows` outputs requantized ---- */

/* a[r] += (xe, xo) . row r's group of 4 weights, for r < rows; w advances past the rows. */
TP_SP_INLINE void tp_sp_mac_rows(const tp_sp_word **w, int32_t weights_s16, int32_t xe, int32_t xo, int32_t rows,
                                 int32_t a[4]) {
#pragma GCC unroll 4
  for (int32_t r = 0; r < rows; r++) {
    int32_t wa, wb;
    if (weights_s16) {
      tp_sp_ld2_ia(w, &wa, &wb);
    } else {
      const int32_t wv = **w;
      *w += 1;
      wa = tp_sp_sxtb16(wv);
      wb = tp_sp_sxtb16_ror8(wv);
    }
    a[r] = tp_sp_smlad(xo, wb, tp_sp_smlad(xe, wa, a[r]));
  }
}

/* out[r] = requantize(a[r]) for r < rows (all computed before the int8 stores, which may alias q). */
TP_SP_INLINE void tp_sp_store_rows(const int32_t a[4], const tp_sp_channel *q, int32_t rows, int32_t mode,
                                   int32_t doubled, int32_t act_min, int32_t act_max, int8_t *out) {
  int32_t y[4];
#pragma GCC unroll 4
  for (int32_t r = 0; r < rows; r++) {
    const tp_sp_channel qr = q[r];
    y[r] = tp_sp_requantize(a[r], &qr, mode, doubled, act_min, act_max);
  }
#pragma GCC unroll 4
  for (int32_t r = 0; r < rows; r++) out[r] = (int8_t)y[r];
}

/* ---- convolution without a widened column: one output pixel at a time, `rows` x 1 tiles ---- */

#define TP_SP_MAX_TAPS 64

enum {
  TP_SP_DIRECT_POINTWISE = 0, /* 1x1: the pixel's channels are the column */
  TP_SP_DIRECT_TAPS = 1,      /* one segment per filter tap, read in place (in_c a multiple of 4) */
  TP_SP_DIRECT_COLUMN = 2,    /* the receptive field gathered into an int8 column first */
};

typedef struct {
  int32_t in_h, in_w, in_c, out_h, out_w, out_c;
  int32_t k_h, k_w, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w;
  int32_t input_offset, act_min, act_max;
  int32_t mode;                                      /* TP_SP_DIRECT_* */
  int32_t taps, tap_len;                             /* segments per pixel, int8 values in each */
  int32_t segment, segment_padded, segments, column; /* TP_SP_DIRECT_COLUMN: as tp_sp_conv_layer */
  int32_t weights_s16, acc_doubled, requant, rows;
  const tp_sp_word *weights; /* blocks of `rows` output channels (the out_c % rows last: 1-row blocks), per
                                group of 4 k the block's rows (int16: (k0,k2),(k1,k3); int8: k0..k3) */
  const tp_sp_channel *channels;
  const int8_t *zero_tap; /* in_c bytes of the input zero point: the taps that fall in the padding */
} tp_sp_conv_direct_layer;

/* `rows` output channels of one pixel whose column is the `taps` segments seg[t]. */
TP_SP_INLINE const tp_sp_word *tp_sp_direct_block(const tp_sp_conv_direct_layer *L, const int8_t *const *seg,
                                                  const tp_sp_word *w, const tp_sp_channel *q, int32_t rows,
                                                  int8_t *out) {
  const int32_t offset2 = (int32_t)(((uint32_t)(uint16_t)L->input_offset << 16) | (uint16_t)L->input_offset);
  int32_t a[4] = {0, 0, 0, 0};
#pragma GCC unroll 4
  for (int32_t r = 0; r < rows; r++) a[r] = q[r].bias;
  for (int32_t t = 0; t < L->taps; t++) {
    const int8_t *x = seg[t];
#pragma GCC unroll 2
    for (int32_t k = 0; k < L->tap_len; k += 4) {
      int32_t v;
      if (k + 4 <= L->tap_len) {
        v = tp_sp_ld32(x + k);
      } else { /* a pointwise input's last partial group: zeros, against zero weights */
        uint32_t u = 0;
        for (int32_t j = 0; k + j < L->tap_len; j++) u |= (uint32_t)(uint8_t)x[k + j] << (8 * j);
        v = (int32_t)u;
      }
      tp_sp_mac_rows(&w, L->weights_s16, tp_sp_sxtab16(offset2, v), tp_sp_sxtab16_ror8(offset2, v), rows, a);
    }
  }
  tp_sp_store_rows(a, q, rows, L->requant, L->acc_doubled, L->act_min, L->act_max, out);
  return w;
}

/* The receptive field of (oy, ox) as an int8 column: segments padded to whole words, the
 * padding taps holding the zero point (the column's pad bytes were set once, their weights are 0). */
TP_SP_INLINE void tp_sp_gather(const tp_sp_conv_direct_layer *L, const int8_t *in, int32_t oy, int32_t ox, int8_t *col) {
  const int8_t zero_point = (int8_t)(-L->input_offset);
  const int32_t iy0 = oy * L->stride_h - L->pad_top, ix0 = ox * L->stride_w - L->pad_left;
  for (int32_t ky = 0; ky < L->k_h; ky++, col += L->segments * L->segment_padded) {
    const int32_t iy = iy0 + ky * L->dil_h;
    const int8_t *row = in + iy * L->in_w * L->in_c;
    for (int32_t s = 0; s < L->segments; s++) {
      int8_t *dst = col + s * L->segment_padded;
      if (iy < 0 || iy >= L->in_h) {
        memset(dst, zero_point, (size_t)L->segment);
        continue;
      }
      /* one segment: k_w taps (dil_w == 1) or tap s alone */
      const int32_t taps = L->segments == 1 ? L->k_w : 1, kx0 = L->segments == 1 ? 0 : s;
      for (int32_t kx = 0; kx < taps; kx++) {
        const int32_t ix = ix0 + (kx0 + kx) * L->dil_w;
        if (ix < 0 || ix >= L->in_w) {
          memset(dst + kx * L->in_c, zero_point, (size_t)L->in_c);
        } else {
          memcpy(dst + kx * L->in_c, row + ix * L->in_c, (size_t)L->in_c);
        }
      }
    }
  }
}

/* CONV_2D one output pixel at a time without widening the input into a buffer: the smallest
 * scratch (none for 1x1 convs and inputs of a multiple of 4 channels, else one int8 column).
 * Output pixel p is written while only pixel p's receptive field is read, as the portable
 * kernels do (mcu/planner.py overlap_limit). */
TP_SP_INLINE void tp_sp_conv_direct(const tp_sp_conv_direct_layer *L, const int8_t *in, int8_t *out, int8_t *col) {
  const int8_t *seg[TP_SP_MAX_TAPS];
  if (L->mode == TP_SP_DIRECT_COLUMN) {
    memset(col, 0, (size_t)L->column);
    seg[0] = col;
  }
  for (int32_t oy = 0; oy < L->out_h; oy++) {
    for (int32_t ox = 0; ox < L->out_w; ox++, out += L->out_c) {
      if (L->mode == TP_SP_DIRECT_POINTWISE) {
        seg[0] = in + (oy * L->in_w + ox) * L->in_c;
      } else if (L->mode == TP_SP_DIRECT_COLUMN) {
        tp_sp_gather(L, in, oy, ox, col);
      } else {
        const int32_t iy0 = oy * L->stride_h - L->pad_top, ix0 = ox * L->stride_w - L->pad_left;
        for (int32_t ky = 0; ky < L->k_h; ky++) {
          const int32_t iy = iy0 + ky * L->dil_h;
          for (int32_t kx = 0; kx < L->k_w; kx++) {
            const int32_t ix = ix0 + kx * L->dil_w;
            seg[ky * L->k_w + kx] = (iy < 0 || iy >= L->in_h || ix < 0 || ix >= L->in_w)
                                        ? L->zero_tap : in + (iy * L->in_w + ix) * L->in_c;
          }
        }
      }
      const tp_sp_word *w = L->weights;
      const tp_sp_channel *q = L->channels;
      int32_t oc = 0;
      for (; oc + L->rows <= L->out_c; oc += L->rows, q += L->rows) w = tp_sp_direct_block(L, seg, w, q, L->rows, out + oc);
      for (; oc < L->out_c; oc++, q++) w = tp_sp_direct_block(L, seg, w, q, 1, out + oc);
    }
  }
}

/* ---- depthwise (depth multiplier 1): channel by channel through a padded plane ---- */

/* The input's group of four values from k: a whole word, or the last partial group zero-filled. */
TP_SP_INLINE int32_t tp_sp_fc_group(const int8_t *x, int32_t k, int32_t n) {
  if (k + 4 <= n) return tp_sp_ld32(x + k);
  uint32_t v = 0;
  for (int32_t j = 0; k + j < n; j++) v |= (uint32_t)(uint8_t)x[k + j] << (8 * j);
  return (int32_t)v;
}


/* A pointwise (1x1, stride 1) conv fused in front of a depthwise: the depthwise's input channels
 * are computed into its planes from the pointwise conv's input, so the pointwise output (the
 * widest tensor of an inverted bottleneck) never exists whole. */
typedef struct {
  int32_t in_c;                                 /* pointwise input channels */
  int32_t groups;                               /* ceil(in_c / 4) */
  int32_t input_offset, act_min, act_max, requant, acc_doubled;
  const tp_sp_word *weights;     /* blocks of `planes` output channels (the channels % planes last: 1-channel
                                    blocks), per group of 4 inputs the block's (w0, w2), (w1, w3) int16 (2 w with acc_doubled) */
  const tp_sp_channel *channels; /* per output channel */
} tp_sp_pw_source;

typedef struct {
  int32_t in_h, in_w, in_c, out_h, out_w, k_h, k_w, stride_h, stride_w, pad_top, pad_left;
  int32_t input_offset, act_min, act_max, requant, acc_doubled;
  int32_t plane_h, plane_w; /* the padded window the filter reads (plane_w: row stride, with slack
                               for whole-word reads past the last tap) */
  int32_t rows_in, cols_in; /* input rows / columns copied into the plane */
  int32_t groups;           /* ceil(k_w / 4) */
  int32_t strip;            /* output rows per pass over the plane (out_h: the whole plane); plane_h
                               = (strip - 1) * stride_h + k_h rows, the rows two passes share kept */
  const tp_sp_word *weights; /* per channel, filter row and group of 4 taps: (w0, w2), (w1, w3), doubled with acc_doubled */
  const tp_sp_channel *channels;
  int32_t planes;                      /* channels per pass (one plane each); 1 unless fused */
  const tp_sp_pw_source *pointwise;    /* 0: the input is stored; else computed from this conv's input */
} tp_sp_dw_layer;

/* Input rows [row_from, row_to) of planes (padded rows) of channels c .. c + n - 1 of a fused
 * depthwise: each plane value is the pointwise conv's output at that pixel and channel, the n
 * channels sharing each widened input word. */
TP_SP_INLINE void tp_sp_pw_fill(const tp_sp_dw_layer *L, const int8_t *in, int32_t c, int32_t n, int32_t row_from,
                                int32_t row_to, int32_t p0, int8_t *plane) {
  const tp_sp_pw_source *P = L->pointwise;
  const int32_t offset2 = (int32_t)(((uint32_t)(uint16_t)P->input_offset << 16) | (uint16_t)P->input_offset);
  const int32_t plane_bytes = L->plane_h * L->plane_w;
  const tp_sp_word *w = P->weights + c * 2 * P->groups;
  const tp_sp_channel *q = P->channels + c;
  for (int32_t row = row_from; row < row_to; row++) {
    const int32_t iy = row - L->pad_top;
    int8_t *dst = plane + (row - p0) * L->plane_w + L->pad_left;
    if (iy < 0 || iy >= L->rows_in) {
      if (L->strip < L->out_h) {
        for (int32_t k = 0; k < n; k++) memset(dst + k * plane_bytes, (int8_t)(-L->input_offset), (size_t)L->cols_in);
      }
      continue;
    }
    const int8_t *px = in + iy * L->in_w * P->in_c;
    for (int32_t ix = 0; ix < L->cols_in; ix++, px += P->in_c) {
      int32_t a[4];
#pragma GCC unroll 4
      for (int32_t k = 0; k < n; k++) a[k] = q[k].bias;
      const tp_sp_word *wk = w;
#pragma GCC unroll 4
      for (int32_t g = 0; g < P->groups; g++) {
        const int32_t v = tp_sp_fc_group(px, 4 * g, P->in_c); /* a last partial group: zeros, against zero weights */
        tp_sp_mac_rows(&wk, 1, tp_sp_sxtab16(offset2, v), tp_sp_sxtab16_ror8(offset2, v), n, a);
      }
#pragma GCC unroll 4
      for (int32_t k = 0; k < n; k++) {
        const tp_sp_channel qk = q[k];
        dst[k * plane_bytes + ix] = (int8_t)tp_sp_requantize(a[k], &qk, P->requant, P->acc_doubled, P->act_min, P->act_max);
      }
    }
  }
}

/* Input rows [row_from, row_to) of the plane of channel c, copied from the stored input. */
TP_SP_INLINE void tp_sp_dw_fill(const tp_sp_dw_layer *L, const int8_t *in, int32_t c, int32_t row_from, int32_t row_to,
                                int32_t p0, int8_t *plane) {
  const int8_t zero_point = (int8_t)(-L->input_offset);
  for (int32_t row = row_from; row < row_to; row++) {
    const int32_t iy = row - L->pad_top;
    int8_t *dst = plane + (row - p0) * L->plane_w + L->pad_left;
    if (iy < 0 || iy >= L->rows_in) {
      if (L->strip < L->out_h) memset(dst, zero_point, (size_t)L->cols_in); /* else still the zero point */
      continue;
    }
    const int8_t *src = in + iy * L->in_w * L->in_c + c;
#pragma GCC unroll 4
    for (int32_t ix = 0; ix < L->cols_in; ix++) dst[ix] = src[ix * L->in_c];
  }
}

/* Output rows [s0, s1) of channel c from its plane, whose first row is padded input row p0. */
TP_SP_INLINE void tp_sp_dw_rows(const tp_sp_dw_layer *L, const int8_t *plane, int32_t c, int32_t s0, int32_t s1,
                                int32_t p0, int8_t *out) {
  const int32_t c_n = L->in_c;
  const int32_t offset2 = (int32_t)(((uint32_t)(uint16_t)L->input_offset << 16) | (uint16_t)L->input_offset);
  const tp_sp_word *w = L->weights + c * 2 * L->k_h * L->groups;
  const tp_sp_channel q = L->channels[c];
  int8_t *o = out + s0 * L->out_w * c_n + c;
  for (int32_t oy = s0; oy < s1; oy++) {
    const int8_t *row = plane + (oy * L->stride_h - p0) * L->plane_w;
    int32_t ox = 0;
    if (L->k_w == 3 && L->stride_w == 1) {
      for (; ox + 2 <= L->out_w; ox += 2, o += 2 * c_n) {
        int32_t a0 = q.bias, a1 = q.bias;
#pragma GCC unroll 7
        for (int32_t ky = 0; ky < L->k_h; ky++) {
          const int32_t v = tp_sp_ld32(row + ky * L->plane_w + ox);
          const int32_t even = tp_sp_sxtab16(offset2, v), odd = tp_sp_sxtab16_ror8(offset2, v);
          const int32_t w02 = w[2 * ky], w1 = w[2 * ky + 1];
          a0 = tp_sp_smlabb(odd, w1, tp_sp_smlad(even, w02, a0));
          a1 = tp_sp_smlatb(even, w1, tp_sp_smlad(odd, w02, a1));
        }
        const int32_t y0 = tp_sp_requantize(a0, &q, L->requant, L->acc_doubled, L->act_min, L->act_max);
        const int32_t y1 = tp_sp_requantize(a1, &q, L->requant, L->acc_doubled, L->act_min, L->act_max);
        o[0] = (int8_t)y0;
        o[c_n] = (int8_t)y1;
      }
    }
    for (; ox < L->out_w; ox++, o += c_n) {
      int32_t a = q.bias;
      const int8_t *p = row + ox * L->stride_w;
#pragma GCC unroll 7
      for (int32_t ky = 0; ky < L->k_h; ky++) {
#pragma GCC unroll 2
        for (int32_t g = 0; g < L->groups; g++) {
          const int32_t v = tp_sp_ld32(p + ky * L->plane_w + 4 * g);
          const tp_sp_word *wg = w + 2 * (ky * L->groups + g);
          a = tp_sp_smlad(tp_sp_sxtab16_ror8(offset2, v), wg[1], tp_sp_smlad(tp_sp_sxtab16(offset2, v), wg[0], a));
        }
      }
      *o = (int8_t)tp_sp_requantize(a, &q, L->requant, L->acc_doubled, L->act_min, L->act_max);
    }
  }
}

/* TinyEngine's in-place depthwise: input channel c is copied into `plane` (int8, padding holding
 * the zero point), then output channel c is computed from the plane and written at channel c of
 * `out`. Only input channel c, already copied, lives at those bytes when out == in, so the
 * output may share the input's buffer. Fused (L->pointwise), `in` is the pointwise conv's input
 * and `planes` channels at a time are computed into their planes; the output may not overlap it.
 * plane: planes * plane_h * plane_w bytes of scratch.
 * Inner loops: four taps per word load widened in two instructions; for 3-wide filters at
 * stride 1, two neighbouring outputs share the loads (taps (x, x+2) and (x+1, x+3) pair up). */
TP_SP_INLINE void tp_sp_depthwise(const tp_sp_dw_layer *L, const int8_t *in, int8_t *out, int8_t *plane) {
  const int32_t c_n = L->in_c, plane_bytes = L->plane_h * L->plane_w;
  memset(plane, (int8_t)(-L->input_offset), (size_t)(L->planes * plane_bytes));
  for (int32_t c = 0; c < c_n; c += L->planes) {
    const int32_t n = c + L->planes <= c_n ? L->planes : c_n - c;
    int32_t loaded_from = 0, loaded_to = 0; /* plane rows (padded input rows) in the buffer */
    for (int32_t s0 = 0; s0 < L->out_h; s0 += L->strip) {
      const int32_t s1 = s0 + L->strip < L->out_h ? s0 + L->strip : L->out_h;
      const int32_t p0 = s0 * L->stride_h, p1 = (s1 - 1) * L->stride_h + L->k_h;
      int32_t row_in = p0;
      if (s0 > 0 && loaded_to > p0) { /* rows this pass shares with the last: already overwritten in place */
        for (int32_t k = 0; k < n; k++) {
          int8_t *pk = plane + k * plane_bytes;
          memmove(pk, pk + (p0 - loaded_from) * L->plane_w, (size_t)((loaded_to - p0) * L->plane_w));
        }
        row_in = loaded_to;
      }
      if (!L->pointwise) {
        tp_sp_dw_fill(L, in, c, row_in, p1, p0, plane);
      } else if (n == L->planes) {
        tp_sp_pw_fill(L, in, c, L->planes, row_in, p1, p0, plane);
      } else {
        for (int32_t k = 0; k < n; k++) tp_sp_pw_fill(L, in, c + k, 1, row_in, p1, p0, plane + k * plane_bytes);
      }
      loaded_from = p0, loaded_to = p1;
      for (int32_t k = 0; k < n; k++) tp_sp_dw_rows(L, plane + k * plane_bytes, c + k, s0, s1, p0, out);
    }
  }
}

/* ---- fully connected ---- */

typedef struct {
  int32_t batches, in_features, out_features, act_min, act_max, requant;
  int32_t weights_s16, acc_doubled; /* int16 weights (stored as 2 w when acc_doubled), or int8 */
  int32_t rows;        /* output rows per block: 1, 2 or 4 (the out_features % rows last rows: 1-row blocks) */
  const tp_sp_word *weights; /* per block, per group of 4 inputs: each row's (w0,w2),(w1,w3) (int16) or w0..w3 */
  const tp_sp_channel *channels; /* bias includes input_offset * sum(w) (the input is not offset) */
} tp_sp_fc_layer;

TP_SP_INLINE const tp_sp_word *tp_sp_fc_block(const tp_sp_fc_layer *L, const int8_t *x, const tp_sp_word *w,
                                              const tp_sp_channel *q, int32_t rows, int8_t *out) {
  int32_t a[4];
#pragma GCC unroll 4
  for (int32_t r = 0; r < rows; r++) a[r] = q[r].bias;
  const int32_t n = L->in_features;
#pragma GCC unroll 2
  for (int32_t k = 0; k < n; k += 4) {
    const int32_t v = tp_sp_fc_group(x, k, n);
    tp_sp_mac_rows(&w, L->weights_s16, tp_sp_sxtb16(v), tp_sp_sxtb16_ror8(v), rows, a);
  }
  tp_sp_store_rows(a, q, rows, L->requant, L->acc_doubled, L->act_min, L->act_max, out);
  return w;
}

/* FULLY_CONNECTED: `rows` output features per pass share each widened input word. The output
 * may not overlap the input. */
TP_SP_INLINE void tp_sp_fully_connected(const tp_sp_fc_layer *L, const int8_t *in, int8_t *out) {
  for (int32_t b = 0; b < L->batches; b++, in += L->in_features, out += L->out_features) {
    const tp_sp_word *w = L->weights;
    const tp_sp_channel *q = L->channels;
    int32_t o = 0;
    for (; o + L->rows <= L->out_features; o += L->rows, q += L->rows) w = tp_sp_fc_block(L, in, w, q, L->rows, out + o);
    for (; o < L->out_features; o++, q++) w = tp_sp_fc_block(L, in, w, q, 1, out + o);
  }
}

/* ---- elementwise ADD: TFLite's input rescaling as two 256-entry tables ---- */

typedef struct {
  int32_t size, act_min, act_max, requant;
  tp_sp_channel output; /* multiplier, rounding (with the output offset) and shift of the sum */
  const int32_t *table1, *table2; /* 256 entries, indexed by the int8 value + 128 */
} tp_sp_add_layer;

/* out = requantize(table1[in1] + table2[in2]), where table_k[x] is TFLite's
 * MultiplyByQuantizedMultiplier((x + offset_k) << left_shift, multiplier_k, shift_k): the same
 * integers as the reference, looked up instead of computed. Element i is read before it is
 * written, so the output may share either input's buffer. */
TP_SP_INLINE void tp_sp_add(const tp_sp_add_layer *L, const int8_t *in1, const int8_t *in2, int8_t *out) {
  const int32_t *t1 = L->table1 + 128, *t2 = L->table2 + 128;
  const tp_sp_channel q = L->output;
#pragma GCC unroll 2
  for (int32_t i = 0; i < L->size; i++) {
    const int32_t sum = t1[in1[i]] + t2[in2[i]];
    out[i] = (int8_t)tp_sp_requantize(sum, &q, L->requant, 0, L->act_min, L->act_max);
  }
}

#endif
