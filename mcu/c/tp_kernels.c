/* TinyPallas portable int8 kernels (see tp_kernels.h).
 *
 * Every kernel walks its output in address order, one output pixel (all its channels) per
 * step, and reads its input no further back than the first tap of the current step. The
 * memory planner relies on this to let an output overlap the tail of its input
 * (mcu/planner.py, overlap_limit). */
#include "tp_kernels.h"

#include <math.h>
#include <string.h>

#if defined(__ARM_FEATURE_DSP) && defined(__ARM_FEATURE_SIMD32)
#include <arm_acle.h>
#define TP_USE_DSP 1
/* ROR #8 (gcc emits the instruction for this idiom; its arm_acle.h has no __ror). */
static inline int32_t tp_ror8(int32_t x) { return (int32_t)(((uint32_t)x >> 8) | ((uint32_t)x << 24)); }
#endif

/* gemmlowp's SaturatingRoundingDoublingHighMul. Its nudge-then-truncate-toward-zero rounds
 * halves up (toward +inf) for either sign, so it is one 64-bit add and arithmetic shift. */
static inline int32_t tp_srdhm(int32_t a, int32_t b) {
  if (a == b && a == INT32_MIN) return INT32_MAX;
  return (int32_t)(((int64_t)a * (int64_t)b + (1ll << 30)) >> 31);
}

/* gemmlowp's RoundingDivideByPOT (round half away from zero). */
static inline int32_t tp_rdbpot(int32_t x, int32_t exponent) {
  const int32_t mask = (int32_t)((1ll << exponent) - 1);
  const int32_t remainder = x & mask;
  const int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
  return (x >> exponent) + (remainder > threshold ? 1 : 0);
}

/* TFLite's MultiplyByQuantizedMultiplier, double-rounding build (TFLM's default). */
static inline int32_t tp_mbqm(int32_t x, int32_t multiplier, int32_t shift) {
  const int32_t left = shift > 0 ? shift : 0;
  const int32_t right = shift > 0 ? 0 : -shift;
  return tp_rdbpot(tp_srdhm((int32_t)((uint32_t)x << left), multiplier), right);
}

int32_t tp_multiply_by_quantized_multiplier(int32_t x, int32_t multiplier, int32_t shift) {
  return tp_mbqm(x, multiplier, shift);
}

static inline int8_t tp_clamp(int32_t v, int32_t lo, int32_t hi) {
  return (int8_t)(v < lo ? lo : (v > hi ? hi : v));
}

/* sum_i (x[i] + offset) * w[i] added to acc. */
static inline int32_t tp_dot_s8(const int8_t *x, const int8_t *w, int32_t n, int32_t offset, int32_t acc) {
#ifdef TP_USE_DSP
  const int32_t offset2 = (int32_t)(((uint32_t)(uint16_t)offset << 16) | (uint16_t)offset);
  for (; n >= 4; n -= 4, x += 4, w += 4) {
    int32_t xv, wv;
    memcpy(&xv, x, 4);
    memcpy(&wv, w, 4);
    acc = __smlad(__sxtab16(offset2, xv), __sxtb16(wv), acc);
    acc = __smlad(__sxtab16(offset2, tp_ror8(xv)), __sxtb16(tp_ror8(wv)), acc);
  }
#endif
  for (; n > 0; n--) acc += ((int32_t)*x++ + offset) * (int32_t)*w++;
  return acc;
}

static inline int8_t tp_requantize(const tp_conv_params *p, int32_t acc, int32_t oc) {
  acc = tp_mbqm(acc, p->output_multiplier[oc], p->output_shift[oc]);
  return tp_clamp(acc + p->output_offset, p->act_min, p->act_max);
}

/* General convolution: for each output pixel its receptive field is gathered into `column`
 * (k_h * k_w * in_c bytes; taps in the padding hold the input zero point, so they add 0), then
 * every output channel is one contiguous dot product with its OHWI filter row. */
void tp_conv_s8(const tp_conv_params *p, const int8_t *in, int8_t *out, int8_t *column) {
  const int32_t ic = p->in_c, kernel_size = p->k_h * p->k_w * ic;
  const int8_t zero_point = (int8_t)(-p->input_offset);
  for (int32_t oy = 0; oy < p->out_h; oy++) {
    const int32_t iy0 = oy * p->stride_h - p->pad_top;
    for (int32_t ox = 0; ox < p->out_w; ox++) {
      const int32_t ix0 = ox * p->stride_w - p->pad_left;
      int8_t *col = column;
      for (int32_t ky = 0; ky < p->k_h; ky++) {
        const int32_t iy = iy0 + ky * p->dil_h;
        for (int32_t kx = 0; kx < p->k_w; kx++, col += ic) {
          const int32_t ix = ix0 + kx * p->dil_w;
          if (iy < 0 || iy >= p->in_h || ix < 0 || ix >= p->in_w) {
            memset(col, zero_point, (size_t)ic);
          } else {
            memcpy(col, in + (iy * p->in_w + ix) * ic, (size_t)ic);
          }
        }
      }
      for (int32_t oc = 0; oc < p->out_c; oc++) {
        const int32_t acc = tp_dot_s8(column, p->filter + oc * kernel_size, kernel_size, p->input_offset,
                                      p->bias ? p->bias[oc] : 0);
        *out++ = tp_requantize(p, acc, oc);
      }
    }
  }
}

/* 1x1, stride 1, no padding: a (pixels x in_c) by (in_c x out_c) product. */
void tp_conv1x1_s8(const tp_conv_params *p, const int8_t *in, int8_t *out) {
  const int32_t pixels = p->out_h * p->out_w, ic = p->in_c;
  for (int32_t px = 0; px < pixels; px++, in += ic) {
    for (int32_t oc = 0; oc < p->out_c; oc++) {
      const int32_t acc = tp_dot_s8(in, p->filter + oc * ic, ic, p->input_offset, p->bias ? p->bias[oc] : 0);
      *out++ = tp_requantize(p, acc, oc);
    }
  }
}

/* 1x1 with four output channels per pass: each input word is loaded (and sign-extended)
 * once for four filter rows, as TinyEngine's unrolled pointwise kernels do. The filter rows
 * are addressed from one pointer with a fixed stride, which keeps the loop in registers. */
void tp_conv1x1_unroll4_s8(const tp_conv_params *p, const int8_t *in, int8_t *out) {
  const int32_t pixels = p->out_h * p->out_w, ic = p->in_c, off = p->input_offset;
  for (int32_t px = 0; px < pixels; px++, in += ic) {
    int32_t oc = 0;
    for (; oc + 4 <= p->out_c; oc += 4) {
      const int8_t *w = p->filter + oc * ic;
      int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      if (p->bias) {
        a0 = p->bias[oc];
        a1 = p->bias[oc + 1];
        a2 = p->bias[oc + 2];
        a3 = p->bias[oc + 3];
      }
      const int8_t *x = in, *x_end = in + ic;
#ifdef TP_USE_DSP
      const int32_t offset2 = (int32_t)(((uint32_t)(uint16_t)off << 16) | (uint16_t)off);
      for (; x + 4 <= x_end; x += 4, w += 4) {
        int32_t xv, wv;
        memcpy(&xv, x, 4);
        const int32_t x02 = __sxtab16(offset2, xv), x13 = __sxtab16(offset2, tp_ror8(xv));
#define TP_ROW(acc, k)                                                   \
  memcpy(&wv, w + (k) * ic, 4);                                          \
  acc = __smlad(x02, __sxtb16(wv), acc);                                 \
  acc = __smlad(x13, __sxtb16(tp_ror8(wv)), acc);
        TP_ROW(a0, 0)
        TP_ROW(a1, 1)
        TP_ROW(a2, 2)
        TP_ROW(a3, 3)
#undef TP_ROW
      }
#endif
      for (; x < x_end; x++, w++) {
        const int32_t v = (int32_t)*x + off;
        a0 += v * w[0];
        a1 += v * w[ic];
        a2 += v * w[2 * ic];
        a3 += v * w[3 * ic];
      }
      *out++ = tp_requantize(p, a0, oc);
      *out++ = tp_requantize(p, a1, oc + 1);
      *out++ = tp_requantize(p, a2, oc + 2);
      *out++ = tp_requantize(p, a3, oc + 3);
    }
    for (; oc < p->out_c; oc++) {
      const int32_t acc = tp_dot_s8(in, p->filter + oc * ic, ic, off, p->bias ? p->bias[oc] : 0);
      *out++ = tp_requantize(p, acc, oc);
    }
  }
}

/* Depthwise: per output pixel, the taps inside the input are found once; channels are then
 * processed four at a time (one word load of input and filter per tap; SMLABB/SMLATT on the
 * sign-extended halves with DSP), the remainder one by one. */
void tp_depthwise_s8(const tp_conv_params *p, const int8_t *in, int8_t *out) {
  const int32_t ic = p->in_c, oc_n = p->out_c, dm = p->depth_multiplier, off = p->input_offset;
  const int32_t row_step = p->dil_h * p->in_w * ic, tap_step = p->dil_w * ic;
  for (int32_t oy = 0; oy < p->out_h; oy++) {
    const int32_t iy0 = oy * p->stride_h - p->pad_top;
    int32_t ky0 = 0, ky1 = p->k_h;
    while (ky0 < ky1 && iy0 + ky0 * p->dil_h < 0) ky0++;
    while (ky1 > ky0 && iy0 + (ky1 - 1) * p->dil_h >= p->in_h) ky1--;
    for (int32_t ox = 0; ox < p->out_w; ox++) {
      const int32_t ix0 = ox * p->stride_w - p->pad_left;
      int32_t kx0 = 0, kx1 = p->k_w;
      while (kx0 < kx1 && ix0 + kx0 * p->dil_w < 0) kx0++;
      while (kx1 > kx0 && ix0 + (kx1 - 1) * p->dil_w >= p->in_w) kx1--;
      const int8_t *x_pixel = in + ((iy0 + ky0 * p->dil_h) * p->in_w + ix0 + kx0 * p->dil_w) * ic;
      const int8_t *w_pixel = p->filter + (ky0 * p->k_w + kx0) * oc_n;
      int32_t oc = 0;
      if (dm == 1) {
        for (; oc + 4 <= oc_n; oc += 4) {
          int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
          if (p->bias) {
            a0 = p->bias[oc];
            a1 = p->bias[oc + 1];
            a2 = p->bias[oc + 2];
            a3 = p->bias[oc + 3];
          }
          const int8_t *xr = x_pixel + oc, *wr = w_pixel + oc;
          for (int32_t ky = ky0; ky < ky1; ky++, xr += row_step, wr += p->k_w * oc_n) {
            const int8_t *x = xr, *w = wr;
            for (int32_t kx = kx0; kx < kx1; kx++, x += tap_step, w += oc_n) {
#ifdef TP_USE_DSP
              int32_t xv, wv;
              memcpy(&xv, x, 4);
              memcpy(&wv, w, 4);
              const int32_t offset2 = (int32_t)(((uint32_t)(uint16_t)off << 16) | (uint16_t)off);
              const int32_t x02 = __sxtab16(offset2, xv), x13 = __sxtab16(offset2, tp_ror8(xv));
              const int32_t w02 = __sxtb16(wv), w13 = __sxtb16(tp_ror8(wv));
              a0 = __smlabb(x02, w02, a0);
              a2 = __smlatt(x02, w02, a2);
              a1 = __smlabb(x13, w13, a1);
              a3 = __smlatt(x13, w13, a3);
#else
              a0 += ((int32_t)x[0] + off) * w[0];
              a1 += ((int32_t)x[1] + off) * w[1];
              a2 += ((int32_t)x[2] + off) * w[2];
              a3 += ((int32_t)x[3] + off) * w[3];
#endif
            }
          }
          *out++ = tp_requantize(p, a0, oc);
          *out++ = tp_requantize(p, a1, oc + 1);
          *out++ = tp_requantize(p, a2, oc + 2);
          *out++ = tp_requantize(p, a3, oc + 3);
        }
      }
      for (; oc < oc_n; oc++) {
        int32_t acc = p->bias ? p->bias[oc] : 0;
        const int8_t *xr = x_pixel + oc / dm, *wr = w_pixel + oc;
        for (int32_t ky = ky0; ky < ky1; ky++, xr += row_step, wr += p->k_w * oc_n) {
          const int8_t *x = xr, *w = wr;
          for (int32_t kx = kx0; kx < kx1; kx++, x += tap_step, w += oc_n) acc += ((int32_t)*x + off) * (int32_t)*w;
        }
        *out++ = tp_requantize(p, acc, oc);
      }
    }
  }
}

/* TinyEngine's in-place depthwise: output channel c is computed whole into `channel`
 * (out_h * out_w bytes), then written over input channel c, which no later channel reads.
 * The output (same channel count, out_h * out_w <= in_h * in_w) shares the input's buffer. */
void tp_depthwise_inplace_s8(const tp_conv_params *p, int8_t *buf, int8_t *channel) {
  const int32_t c_n = p->in_c, off = p->input_offset, pixels = p->out_h * p->out_w;
  for (int32_t c = 0; c < c_n; c++) {
    int8_t *y = channel;
    for (int32_t oy = 0; oy < p->out_h; oy++) {
      const int32_t iy0 = oy * p->stride_h - p->pad_top;
      for (int32_t ox = 0; ox < p->out_w; ox++) {
        const int32_t ix0 = ox * p->stride_w - p->pad_left;
        int32_t acc = p->bias ? p->bias[c] : 0;
        for (int32_t ky = 0; ky < p->k_h; ky++) {
          const int32_t iy = iy0 + ky * p->dil_h;
          if (iy < 0 || iy >= p->in_h) continue;
          for (int32_t kx = 0; kx < p->k_w; kx++) {
            const int32_t ix = ix0 + kx * p->dil_w;
            if (ix < 0 || ix >= p->in_w) continue;
            acc += ((int32_t)buf[(iy * p->in_w + ix) * c_n + c] + off) * (int32_t)p->filter[(ky * p->k_w + kx) * c_n + c];
          }
        }
        *y++ = tp_requantize(p, acc, c);
      }
    }
    for (int32_t px = 0; px < pixels; px++) buf[px * c_n + c] = channel[px];
  }
}

void tp_fully_connected_s8(const tp_fc_params *p, const int8_t *in, int8_t *out) {
  for (int32_t b = 0; b < p->batches; b++, in += p->in_features) {
    for (int32_t o = 0; o < p->out_features; o++) {
      int32_t acc = tp_dot_s8(in, p->weights + o * p->in_features, p->in_features, p->input_offset,
                              p->bias ? p->bias[o] : 0);
      const int32_t q = p->per_channel ? o : 0;
      acc = tp_mbqm(acc, p->output_multiplier[q], p->output_shift[q]);
      *out++ = tp_clamp(acc + p->output_offset, p->act_min, p->act_max);
    }
  }
}

static void tp_pool_s8(const tp_pool_params *p, const int8_t *in, int8_t *out, int is_max) {
  const int32_t c_n = p->channels;
  for (int32_t oy = 0; oy < p->out_h; oy++) {
    const int32_t iy0 = oy * p->stride_h - p->pad_top;
    const int32_t ky0 = iy0 < 0 ? -iy0 : 0;
    const int32_t ky1 = p->k_h < p->in_h - iy0 ? p->k_h : p->in_h - iy0;
    for (int32_t ox = 0; ox < p->out_w; ox++) {
      const int32_t ix0 = ox * p->stride_w - p->pad_left;
      const int32_t kx0 = ix0 < 0 ? -ix0 : 0;
      const int32_t kx1 = p->k_w < p->in_w - ix0 ? p->k_w : p->in_w - ix0;
      const int32_t count = (ky1 - ky0) * (kx1 - kx0);
      for (int32_t c = 0; c < c_n; c++) {
        int32_t acc = is_max ? -128 : 0;
        for (int32_t ky = ky0; ky < ky1; ky++) {
          const int8_t *x = in + ((iy0 + ky) * p->in_w + ix0) * c_n + c;
          for (int32_t kx = kx0; kx < kx1; kx++) {
            const int32_t v = x[kx * c_n];
            if (is_max) {
              acc = v > acc ? v : acc;
            } else {
              acc += v;
            }
          }
        }
        if (!is_max) /* TFLite rounds the average half away from zero. */
          acc = acc > 0 ? (acc + count / 2) / count : (acc - count / 2) / count;
        *out++ = tp_clamp(acc, p->act_min, p->act_max);
      }
    }
  }
}

void tp_avgpool_s8(const tp_pool_params *p, const int8_t *in, int8_t *out) { tp_pool_s8(p, in, out, 0); }
void tp_maxpool_s8(const tp_pool_params *p, const int8_t *in, int8_t *out) { tp_pool_s8(p, in, out, 1); }

/* Visit every output element in order with the offsets i1, i2 of the two inputs it reads. */
#define TP_BROADCAST(w, BODY)                                                                         \
  do {                                                                                                \
    if ((w)->flat) {                                                                                  \
      for (int32_t i = 0; i < (w)->size; i++) {                                                       \
        const int32_t i1 = i, i2 = i;                                                                 \
        BODY                                                                                          \
      }                                                                                               \
    } else {                                                                                          \
      const int32_t *n_ = (w)->shape, *a_ = (w)->stride1, *b_ = (w)->stride2;                         \
      int32_t i = 0;                                                                                  \
      for (int32_t d0 = 0; d0 < n_[0]; d0++)                                                          \
        for (int32_t d1 = 0; d1 < n_[1]; d1++)                                                        \
          for (int32_t d2 = 0; d2 < n_[2]; d2++)                                                      \
            for (int32_t d3 = 0; d3 < n_[3]; d3++)                                                    \
              for (int32_t d4 = 0; d4 < n_[4]; d4++)                                                  \
                for (int32_t d5 = 0; d5 < n_[5]; d5++, i++) {                                         \
                  const int32_t i1 = d0 * a_[0] + d1 * a_[1] + d2 * a_[2] + d3 * a_[3] + d4 * a_[4] + d5 * a_[5]; \
                  const int32_t i2 = d0 * b_[0] + d1 * b_[1] + d2 * b_[2] + d3 * b_[3] + d4 * b_[4] + d5 * b_[5]; \
                  BODY                                                                                \
                }                                                                                     \
    }                                                                                                 \
  } while (0)

/* TFLite's AddFunc / SubFunc (integer_ops/add.h, reference/sub.h): both inputs rescaled onto a
 * common 2^left_shift-scaled sum, then requantized. */
static inline int32_t tp_scaled_input(int32_t v, int32_t offset, int32_t left_shift, int32_t m, int32_t s) {
  return tp_mbqm((int32_t)((uint32_t)(v + offset) << left_shift), m, s);
}

void tp_add_s8(const tp_add_params *p, const int8_t *in1, const int8_t *in2, int8_t *out) {
  TP_BROADCAST(&p->walk, {
    const int32_t sum = tp_scaled_input(in1[i1], p->input1_offset, p->left_shift, p->input1_multiplier, p->input1_shift) +
                        tp_scaled_input(in2[i2], p->input2_offset, p->left_shift, p->input2_multiplier, p->input2_shift);
    out[i] = tp_clamp(tp_mbqm(sum, p->output_multiplier, p->output_shift) + p->output_offset, p->act_min, p->act_max);
  });
}

void tp_sub_s8(const tp_add_params *p, const int8_t *in1, const int8_t *in2, int8_t *out) {
  TP_BROADCAST(&p->walk, {
    const int32_t diff = tp_scaled_input(in1[i1], p->input1_offset, p->left_shift, p->input1_multiplier, p->input1_shift) -
                         tp_scaled_input(in2[i2], p->input2_offset, p->left_shift, p->input2_multiplier, p->input2_shift);
    out[i] = tp_clamp(tp_mbqm(diff, p->output_multiplier, p->output_shift) + p->output_offset, p->act_min, p->act_max);
  });
}

/* TFLite's MulElementwise / BroadcastMul6DSlow (integer_ops/mul.h). */
void tp_mul_s8(const tp_mul_params *p, const int8_t *in1, const int8_t *in2, int8_t *out) {
  TP_BROADCAST(&p->walk, {
    const int32_t prod = ((int32_t)in1[i1] + p->input1_offset) * ((int32_t)in2[i2] + p->input2_offset);
    out[i] = tp_clamp(tp_mbqm(prod, p->output_multiplier, p->output_shift) + p->output_offset, p->act_min, p->act_max);
  });
}

/* TFLite's BroadcastPrelu4DSlow (reference/prelu.h). */
void tp_prelu_s8(const tp_prelu_params *p, const int8_t *in, const int8_t *alpha, int8_t *out) {
  TP_BROADCAST(&p->walk, {
    const int32_t v = (int32_t)in[i1] + p->input_offset;
    const int32_t y = v >= 0 ? tp_mbqm(v, p->output_multiplier_1, p->output_shift_1)
                             : tp_mbqm(v * ((int32_t)alpha[i2] + p->alpha_offset), p->output_multiplier_2,
                                       p->output_shift_2);
    out[i] = tp_clamp(y + p->output_offset, -128, 127);
  });
}

void tp_lut_s8(const int8_t *table, int32_t size, const int8_t *in, int8_t *out) {
  for (int32_t i = 0; i < size; i++) out[i] = table[(int32_t)in[i] + 128];
}

/* ---- softmax: gemmlowp fixed point, as TFLite's reference int8 softmax ---- */

static inline int32_t tp_sat_shift_left(int32_t x, int32_t exponent) {
  const int32_t threshold = (int32_t)((1u << (31 - exponent)) - 1);
  if (x > threshold) return INT32_MAX;
  if (x < -threshold) return INT32_MIN;
  return (int32_t)((uint32_t)x << exponent);
}

/* exp(x) for x in [-1/4, 0), Q0.31 in and out (Taylor series around -1/8). */
static int32_t tp_exp_quarter(int32_t a) {
  const int32_t constant_term = 1895147668, one_third = 715827883;
  const int32_t x = a + (1 << 28);
  const int32_t x2 = tp_srdhm(x, x), x3 = tp_srdhm(x2, x), x4 = tp_srdhm(x2, x2);
  const int32_t x4_over_4 = tp_rdbpot(x4, 2);
  const int32_t poly = tp_rdbpot(tp_srdhm(x4_over_4 + x3, one_third) + x2, 1);
  return constant_term + tp_srdhm(constant_term, x + poly);
}

/* exp(a) for a <= 0 given in Q5.26; result Q0.31 (gemmlowp exp_on_negative_values). */
static int32_t tp_exp_on_negative_values(int32_t a) {
  const int32_t fractional_bits = 26, one_quarter = 1 << (fractional_bits - 2), mask = one_quarter - 1;
  const int32_t a_mod_quarter_minus_one_quarter = (a & mask) - one_quarter;
  int32_t result = tp_exp_quarter(tp_sat_shift_left(a_mod_quarter_minus_one_quarter, 5));
  const int32_t remainder = a_mod_quarter_minus_one_quarter - a;
  /* exp(-2^k) for k = -2..4 in Q0.31. */
  static const int32_t barrel[7] = {1672461947, 1302514674, 790015084, 290630308, 39332535, 720401, 242};
  for (int32_t k = -2; k <= 4; k++) {
    if (remainder & (1 << (fractional_bits + k))) result = tp_srdhm(result, barrel[k + 2]);
  }
  return a == 0 ? INT32_MAX : result;
}

/* 1 / (1 + x) for x in [0, 1), Q0.31 in and out (Newton-Raphson, gemmlowp). */
static int32_t tp_one_over_one_plus_x(int32_t a) {
  const int64_t sum = (int64_t)a + INT32_MAX;
  const int32_t half_denominator = (int32_t)((sum + (sum >= 0 ? 1 : -1)) / 2);
  const int32_t c48_17 = 1515870810, cneg32_17 = -1010580540; /* Q2.29 */
  int32_t x = c48_17 + tp_srdhm(half_denominator, cneg32_17);
  for (int i = 0; i < 3; i++) {
    const int32_t half_denominator_times_x = tp_srdhm(half_denominator, x);
    const int32_t one_minus = (1 << 29) - half_denominator_times_x;
    x = x + tp_sat_shift_left(tp_srdhm(x, one_minus), 2);
  }
  return tp_sat_shift_left(x, 1);
}

void tp_softmax_s8(const tp_softmax_params *p, const int8_t *in, int8_t *out) {
  const int32_t depth = p->depth;
  for (int32_t r = 0; r < p->rows; r++, in += depth, out += depth) {
    int32_t max_in_row = -128;
    for (int32_t c = 0; c < depth; c++) max_in_row = in[c] > max_in_row ? in[c] : max_in_row;
    int32_t sum_of_exps = 0; /* Q12.19 */
    for (int32_t c = 0; c < depth; c++) {
      const int32_t diff = (int32_t)in[c] - max_in_row;
      if (diff >= p->diff_min) {
        const int32_t rescaled = tp_srdhm((int32_t)((uint32_t)diff << p->input_left_shift), p->input_multiplier);
        sum_of_exps += tp_rdbpot(tp_exp_on_negative_values(rescaled), 12);
      }
    }
    /* GetReciprocal(sum_of_exps, 12 integer bits). */
    const int32_t headroom_plus_one = sum_of_exps == 0 ? 32 : __builtin_clz((uint32_t)sum_of_exps);
    const int32_t num_bits_over_unit = 12 - headroom_plus_one;
    const int32_t shifted_sum_minus_one =
        (int32_t)(((uint32_t)sum_of_exps << headroom_plus_one) - ((uint32_t)1 << 31));
    const int32_t shifted_scale = tp_one_over_one_plus_x(shifted_sum_minus_one);
    const int32_t exponent = num_bits_over_unit + 31 - 8;
    for (int32_t c = 0; c < depth; c++) {
      const int32_t diff = (int32_t)in[c] - max_in_row;
      int32_t y = -128;
      if (diff >= p->diff_min) {
        const int32_t rescaled = tp_srdhm((int32_t)((uint32_t)diff << p->input_left_shift), p->input_multiplier);
        y = tp_rdbpot(tp_srdhm(shifted_scale, tp_exp_on_negative_values(rescaled)), exponent) - 128;
      }
      out[c] = tp_clamp(y, -128, 127);
    }
  }
}

/* ---- data movement ---- */

void tp_pad_s8(const tp_pad_params *p, const int8_t *in, int8_t *out) {
  /* Walk the output row by row (a row = the last dimension); copy the input row in the middle. */
  const int32_t r = p->rank, row_in = p->in_shape[r - 1], row_out = p->out_shape[r - 1];
  int32_t rows = 1;
  for (int32_t d = 0; d < r - 1; d++) rows *= p->out_shape[d];
  int32_t idx[6] = {0, 0, 0, 0, 0, 0};
  for (int32_t row = 0; row < rows; row++, out += row_out) {
    int32_t inside = 1, src = 0;
    for (int32_t d = 0; d < r - 1; d++) {
      const int32_t i = idx[d] - p->pad_before[d];
      if (i < 0 || i >= p->in_shape[d]) inside = 0;
      src = src * p->in_shape[d] + i;
    }
    if (inside) {
      const int32_t before = p->pad_before[r - 1];
      memset(out, p->pad_value, (size_t)before);
      memmove(out + before, in + src * row_in, (size_t)row_in);
      memset(out + before + row_in, p->pad_value, (size_t)(row_out - before - row_in));
    } else {
      memset(out, p->pad_value, (size_t)row_out);
    }
    for (int32_t d = r - 2; d >= 0; d--) {
      if (++idx[d] < p->out_shape[d]) break;
      idx[d] = 0;
    }
  }
}

void tp_transpose_s8(const tp_transpose_params *p, const int8_t *in, int8_t *out) {
  const int32_t *n = p->out_shape, *s = p->in_strides;
  for (int32_t i0 = 0; i0 < n[0]; i0++)
    for (int32_t i1 = 0; i1 < n[1]; i1++)
      for (int32_t i2 = 0; i2 < n[2]; i2++)
        for (int32_t i3 = 0; i3 < n[3]; i3++)
          for (int32_t i4 = 0; i4 < n[4]; i4++) {
            const int8_t *x = in + i0 * s[0] + i1 * s[1] + i2 * s[2] + i3 * s[3] + i4 * s[4];
            for (int32_t i5 = 0; i5 < n[5]; i5++) *out++ = x[i5 * s[5]];
          }
}

void tp_mean_s8(const tp_mean_params *p, const int8_t *in, int8_t *out, int32_t *sum) {
  const int32_t *n = p->in_shape, *s = p->out_strides;
  for (int32_t i = 0; i < p->out_size; i++) sum[i] = 0;
  for (int32_t i0 = 0; i0 < n[0]; i0++)
    for (int32_t i1 = 0; i1 < n[1]; i1++)
      for (int32_t i2 = 0; i2 < n[2]; i2++)
        for (int32_t i3 = 0; i3 < n[3]; i3++)
          for (int32_t i4 = 0; i4 < n[4]; i4++) {
            int32_t *acc = sum + i0 * s[0] + i1 * s[1] + i2 * s[2] + i3 * s[3] + i4 * s[4];
            for (int32_t i5 = 0; i5 < n[5]; i5++) acc[i5 * s[5]] += *in++;
          }
  for (int32_t i = 0; i < p->out_size; i++) {
    const int32_t shifted = sum[i] - p->input_zero_point * p->num_elements;
    const int32_t y = tp_mbqm(shifted, p->multiplier, p->shift);
    out[i] = tp_clamp(y + p->output_zero_point, -128, 127);
  }
}

void tp_resize_nearest_s8(const tp_resize_params *p, const int8_t *in, int8_t *out) {
  const int32_t c = p->channels;
  for (int32_t oy = 0; oy < p->out_h; oy++) {
    const int8_t *row = in + p->rows[oy] * p->in_w * c;
    for (int32_t ox = 0; ox < p->out_w; ox++, out += c) memcpy(out, row + p->cols[ox] * c, (size_t)c);
  }
}

void tp_copy(const void *in, void *out, int32_t bytes) {
  if (in != out) memmove(out, in, (size_t)bytes);
}

void tp_crop(const int8_t *tensor, int32_t row_bytes, int32_t row0, int32_t rows, int32_t col_byte0, int32_t col_bytes,
             int8_t *patch) {
  for (int32_t r = 0; r < rows; r++)
    memcpy(patch + r * col_bytes, tensor + (row0 + r) * row_bytes + col_byte0, (size_t)col_bytes);
}

void tp_paste(int8_t *tensor, int32_t row_bytes, int32_t row0, int32_t rows, int32_t col_byte0, int32_t col_bytes,
              const int8_t *patch) {
  for (int32_t r = 0; r < rows; r++)
    memcpy(tensor + (row0 + r) * row_bytes + col_byte0, patch + r * col_bytes, (size_t)col_bytes);
}

void tp_quantize_f32_s8(const tp_quant_params *p, const float *in, int8_t *out) {
  for (int32_t i = 0; i < p->size; i++) {
    float q = roundf(in[i] / p->scale);
    /* keep the float -> int conversion defined; anything this far out clamps anyway */
    q = q > 1e6f ? 1e6f : (q < -1e6f ? -1e6f : q);
    out[i] = tp_clamp((int32_t)q + p->zero_point, -128, 127);
  }
}

void tp_dequantize_s8_f32(const tp_quant_params *p, const int8_t *in, float *out) {
  /* TFLite multiplies in double; scale * (q - zp) is exact in double (24 + 9 bits), so one
   * float multiply rounds to the same float. */
  for (int32_t i = 0; i < p->size; i++) out[i] = p->scale * (float)((int32_t)in[i] - p->zero_point);
}
