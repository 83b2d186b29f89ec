/* TinyPallas portable int8 kernels: plain C99, TFLite Micro's integer arithmetic
 * (double-rounding requantization), Cortex-M DSP intrinsics when __ARM_FEATURE_DSP is set.
 * Layouts follow TFLite: activations NHWC, conv filters OHWI, depthwise (1,kh,kw,C*m). */
#ifndef TP_KERNELS_H
#define TP_KERNELS_H

#include <stdint.h>

typedef struct {
  int32_t in_h, in_w, in_c, out_h, out_w, out_c;
  int32_t k_h, k_w, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w;
  int32_t depth_multiplier; /* depthwise only */
  int32_t input_offset, output_offset, act_min, act_max;
  const int8_t *filter;
  const int32_t *bias; /* may be 0 */
  const int32_t *output_multiplier;
  const int32_t *output_shift;
} tp_conv_params;

typedef struct {
  int32_t batches, in_features, out_features;
  int32_t input_offset, output_offset, act_min, act_max;
  int32_t per_channel; /* 0: output_multiplier[0] / output_shift[0] serve every output feature */
  const int8_t *weights;
  const int32_t *bias; /* may be 0 */
  const int32_t *output_multiplier;
  const int32_t *output_shift;
} tp_fc_params;

typedef struct {
  int32_t in_h, in_w, channels, out_h, out_w;
  int32_t k_h, k_w, stride_h, stride_w, pad_top, pad_left;
  int32_t act_min, act_max;
} tp_pool_params;

/* The walk of a binary elementwise op over an output of up to 6 dimensions (unused leading ones
 * are 1); each input is read at its own strides, 0 along the dimensions it broadcasts. flat: both
 * inputs have the output's shape, element i reads element i. */
typedef struct {
  int32_t size, flat;
  int32_t shape[6];
  int32_t stride1[6], stride2[6];
} tp_broadcast;

typedef struct {
  int32_t input1_offset, input2_offset, output_offset, left_shift;
  int32_t input1_multiplier, input1_shift, input2_multiplier, input2_shift;
  int32_t output_multiplier, output_shift, act_min, act_max;
  tp_broadcast walk;
} tp_add_params;

typedef struct {
  int32_t input1_offset, input2_offset, output_offset;
  int32_t output_multiplier, output_shift, act_min, act_max;
  tp_broadcast walk;
} tp_mul_params;

typedef struct {
  int32_t input_offset, alpha_offset, output_offset;
  int32_t output_multiplier_1, output_shift_1, output_multiplier_2, output_shift_2;
  tp_broadcast walk;
} tp_prelu_params;

typedef struct {
  int32_t rows, depth;
  int32_t input_multiplier, input_left_shift, diff_min;
} tp_softmax_params;

/* Up to 6 dimensions; unused leading dimensions are 1. */
typedef struct {
  int32_t rank;
  int32_t in_shape[6];
  int32_t out_shape[6];
  int32_t pad_before[6];
  int32_t pad_value;
} tp_pad_params;

typedef struct {
  int32_t rank;
  int32_t out_shape[6];
  int32_t in_strides[6]; /* stride in the input of each output dimension */
} tp_transpose_params;

typedef struct {
  int32_t rank;
  int32_t in_shape[6];
  int32_t out_strides[6]; /* output stride of each input dimension, 0 for reduced axes */
  int32_t out_size;
  int32_t input_zero_point, output_zero_point, num_elements;
  int32_t multiplier, shift;
} tp_mean_params;

typedef struct {
  int32_t in_h, in_w, channels, out_h, out_w;
  const int32_t *rows, *cols; /* source index of each output row / column */
} tp_resize_params;

typedef struct {
  int32_t size;
  float scale;
  int32_t zero_point;
} tp_quant_params;

/* Per-layer profiling: model.c calls TP_LAYER() before each layer; with -DTP_PROFILE_LAYERS it
 * calls a marker function whose executions the QEMU plugin timestamps. */
#ifdef TP_PROFILE_LAYERS
void tp_layer_marker(void);
#define TP_LAYER() tp_layer_marker()
#else
#define TP_LAYER() ((void)0)
#endif

int32_t tp_multiply_by_quantized_multiplier(int32_t x, int32_t multiplier, int32_t shift);

/* column: k_h * k_w * in_c bytes of scratch (one receptive field). */
void tp_conv_s8(const tp_conv_params *p, const int8_t *in, int8_t *out, int8_t *column);
void tp_conv1x1_s8(const tp_conv_params *p, const int8_t *in, int8_t *out);
void tp_conv1x1_unroll4_s8(const tp_conv_params *p, const int8_t *in, int8_t *out);
void tp_depthwise_s8(const tp_conv_params *p, const int8_t *in, int8_t *out);

/* depth_multiplier 1; output written over the input in `buf`; channel: out_h * out_w bytes. */
void tp_depthwise_inplace_s8(const tp_conv_params *p, int8_t *buf, int8_t *channel);
void tp_fully_connected_s8(const tp_fc_params *p, const int8_t *in, int8_t *out);
void tp_avgpool_s8(const tp_pool_params *p, const int8_t *in, int8_t *out);
void tp_maxpool_s8(const tp_pool_params *p, const int8_t *in, int8_t *out);
void tp_add_s8(const tp_add_params *p, const int8_t *in1, const int8_t *in2, int8_t *out);
void tp_sub_s8(const tp_add_params *p, const int8_t *in1, const int8_t *in2, int8_t *out);
void tp_mul_s8(const tp_mul_params *p, const int8_t *in1, const int8_t *in2, int8_t *out);
void tp_prelu_s8(const tp_prelu_params *p, const int8_t *in, const int8_t *alpha, int8_t *out);
/* out[i] = table[in[i] + 128]: the unary int8 ops (activations, requantization) as 256-entry
 * tables computed at export with TFLite's integer arithmetic (kernels/quant.py). */
void tp_lut_s8(const int8_t *table, int32_t size, const int8_t *in, int8_t *out);
void tp_softmax_s8(const tp_softmax_params *p, const int8_t *in, int8_t *out);
void tp_pad_s8(const tp_pad_params *p, const int8_t *in, int8_t *out);
void tp_transpose_s8(const tp_transpose_params *p, const int8_t *in, int8_t *out);
void tp_mean_s8(const tp_mean_params *p, const int8_t *in, int8_t *out, int32_t *scratch);
void tp_resize_nearest_s8(const tp_resize_params *p, const int8_t *in, int8_t *out);
void tp_copy(const void *in, void *out, int32_t bytes);
/* Copy a rows x col_bytes window at (row0, col_byte0) of a tensor with row_bytes per row into a
 * dense patch buffer (crop), or back (paste). */
void tp_crop(const int8_t *tensor, int32_t row_bytes, int32_t row0, int32_t rows, int32_t col_byte0, int32_t col_bytes,
             int8_t *patch);
void tp_paste(int8_t *tensor, int32_t row_bytes, int32_t row0, int32_t rows, int32_t col_byte0, int32_t col_bytes,
              const int8_t *patch);
void tp_quantize_f32_s8(const tp_quant_params *p, const float *in, int8_t *out);
void tp_dequantize_s8_f32(const tp_quant_params *p, const int8_t *in, float *out);

#endif
