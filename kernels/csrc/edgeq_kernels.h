/* edgeq low-bit CPU kernels: a plain C ABI (the TVM FFI wrappers in edgeq_ffi.cc and the
 * ctypes tests both call it).
 *
 * Tensors are NHWC. Activations between quantized layers are unsigned codes, one per byte
 * (a 4-bit code occupies the low nibble); weights arrive bit-packed (see the layout below)
 * and are unpacked into an L1/L2-sized int8 panel per block of output channels, so the
 * packed form is what is stored and streamed from memory.
 *
 * Weight panel (what the microkernel reads), for one block of NB output channels and
 * groups of G consecutive reduction indices k:
 *
 *     panel[block][k / G][n % NB][k % G]        int8, zero for padding
 *
 *   layout id   NB  G   target                         inner instruction
 *   LAYOUT_AVX2 32  2   x86-64 AVX2                    vpmaddubsw (u8 x s8 pairs -> s16)
 *   LAYOUT_SDOT 16  4   AArch64 with dot product       sdot (s8 quads -> s32)
 *   LAYOUT_NEON  8  8   AArch64 NEON (no dot product)  smlal (s8 x s8 -> s16 lanes over k)
 *   LAYOUT_PORTABLE 16 1  any other CPU (plain C)      scalar
 *   LAYOUT_AVX2_WIDE 16 2   x86-64 AVX2, 8-bit inputs   vpmaddwd (s16 pairs -> s32)
 *   LAYOUT_AVX2_LUT  (see below) x86-64 AVX2, 2-bit weights  vpshufb table lookups
 *   LAYOUT_NEON_LUT  (see below) AArch64 NEON, 2-bit weights tbl table lookups
 *   LAYOUT_VNNI     32  4   x86-64 AVX-512 VNNI            vpdpbusd (u8 x s8 quads -> s32), 2-8 bit inputs
 *
 * LAYOUT_AVX2_LUT (T-MAC style, 2-bit weights in [-2, 1], 4-bit inputs): weights are
 * bit planes, w = b0 - 2 * b1; for each output channel n and group g of 4 reduction
 * indices, i0 = sum_i b0[n][4g+i] << i and i1 likewise index a 16-entry table of the
 * subset sums of the group's 4 activations. Stored per block of 16 channels, per pair of
 * groups (2gp, 2gp+1), per half-block of 8 channels: 16 bytes, byte j = i0 | i1 << 4 of
 * channel j in group 2gp, byte 8 + j the same in group 2gp+1 (still 2 bits per weight).
 * LAYOUT_NEON_LUT stores the same bytes; only the kernel that reads them differs.
 *
 *   stored, one group pair of one 16-channel block (32 bytes):
 *     half 0: | g=2gp: ch 0..7 | g=2gp+1: ch 0..7 |   half 1: | g=2gp: ch 8..15 | g=2gp+1: ch 8..15 |
 *     each byte: | i1 (bits 7..4) | i0 (bits 3..0) |
 *
 * Stored (packed) weights: the panel's int8 values v are offset to codes c = v - low
 * (0 <= c < 2^bits) and packed `bits` per field in groups of 32 bytes:
 *
 *   2 bits: byte i of a 32-byte group = | c[96+i] 7..6 | c[64+i] 5..4 | c[32+i] 3..2 | c[i] 1..0 |
 *   4 bits: byte i of a 32-byte group = | c[32+i] 7..4 | c[i] 3..0 |
 *   8 bits: byte i = c[i]    (low = 0: the two's complement byte of v, read in place as the panel)
 *
 * so unpacking a group is `bits`-wide shifts and masks over 32 contiguous bytes (one
 * AVX2 register, two NEON registers), with no shuffles.
 */
#ifndef EDGEQ_KERNELS_H_
#define EDGEQ_KERNELS_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { EDGEQ_LAYOUT_NEON = 0, EDGEQ_LAYOUT_AVX2 = 1, EDGEQ_LAYOUT_SDOT = 2, EDGEQ_LAYOUT_AVX2_WIDE = 3, EDGEQ_LAYOUT_PORTABLE = 4, EDGEQ_LAYOUT_AVX2_LUT = 5, EDGEQ_LAYOUT_NEON_LUT = 6, EDGEQ_LAYOUT_VNNI = 7 };

/* Threads the kernels called from this thread use from now on (n >= 1), and how many they use now:
 * timing one layer on one thread keeps other work on the machine from stretching every parallel region. */
void edgeq_set_threads(int n);
int edgeq_threads(void);
/* Which panel layout this build's microkernel reads (VNNI builds: LAYOUT_VNNI, also where the CPU lacks it). */
int edgeq_layout(void);
/* VNNI builds on CPUs with AMX-INT8 (and Linux granting tile state) run layers of 64 rows or more
 * on AMX tiles, with the same stored weights. edgeq_amx says whether they do now; edgeq_set_amx(0)
 * keeps every layer on the VNNI kernel (the tests and benchmarks compare the two). */
void edgeq_set_amx(int enabled);
int edgeq_amx(void);
/* Convolutions whose kernel rows are whole 16-code groups (in_c % 16 == 0) read their input in
 * place, kernel row by kernel row (implicit GEMM), instead of copying it into im2col rows;
 * edgeq_set_in_place(0) makes them copy (the tests and benchmarks compare the two). */
void edgeq_set_in_place(int enabled);
/* 1 when this build runs weights packed for `layout` (its own, or a variant) on this CPU. */
int edgeq_supports_layout(int32_t layout);

/* Quantized convolution (groups == 1; dense layers are 1x1 convolutions over rows):
 *   acc[m, n] = sum_k (x[m, k] - x_zero) * (w[n, k] - w_zero[n])        (exact int32)
 * w_zero[n] = 0 unless w_zeros, when wsum holds 2 * out_c values: sum_k w[n, k], then w_zero[n].
 * The kernels multiply the stored codes w as they are (2-bit codes stay 2-bit) and subtract
 * w_zero[n] * sum_k (x[m, k] - x_zero) in the epilogue (the window sum, once per output pixel).
 *   y = acc * multiplier[n] + bias[n] (+ residual[m, n]); y = clamp(y, clamp_min, clamp_max)
 *   out_float[m, n] = y (when given); out_codes[m, n] = clamp(rint(y / out_scale) + out_zero, out_qmin, out_qmax) (when given)
 */
typedef struct {
  int32_t in_h, in_w, in_c, out_h, out_w, out_c;
  int32_t kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left;
  int32_t x_zero, x_max;           /* activation zero point and largest code */
  int32_t w_bits, w_low, w_absmax; /* stored field width, code offset, max |w| */
  int32_t k_padded;                /* kernel_h * kernel_w * in_c rounded up to 16 */
  int32_t w_layout;                /* EDGEQ_LAYOUT_* the weights were packed for (the build must run it) */
  int32_t out_zero, out_qmin, out_qmax;
  float out_scale, clamp_min, clamp_max;
  int32_t w_zeros; /* 1: weights have per-output-channel zero points, in wsum[out_c + n] (edgeq_conv2d only) */
  /* 1: codes-only layer whose requantization the plan proved equal, for every reachable acc, to
   * out_codes = clamp(floor(acc * multiplier[out_c + n] + bias[out_c + n]), fast_lo, fast_hi)
   * (kernels/reference.py fast_requantization): one multiply, one add, one floor per output. */
  int32_t fast_codes, fast_lo, fast_hi;
  /* > 0: a 3x3 stride-1 layer of 4-bit codes as Winograd F(2x2, 3x3) (AVX2 builds), int16 sums over chunks of
   * this many codes (the plan proved they cannot wrap); packed_weights holds
   * 16 panels of U = (2G) w (2G)^T, one per tile position (8-bit, the build's layout), and wsum after its out_c
   * sums the input offset's share of each output of a 2x2 block, offsets[q * out_c + n] (kernels/plan.py
   * winograd_weights). */
  int32_t winograd;
} edgeq_conv_params;

/* sizeof(edgeq_conv_params): edgeq/kernels/native.py ConvParams must match it (tested). */
int32_t edgeq_conv_params_size(void);

/* 0 on success, a negative number when the arguments are inconsistent. wsum[n] = sum_k w[n, k]
 * (then the zero points when w_zeros). */
int edgeq_conv2d(const edgeq_conv_params* p, const uint8_t* x, const uint8_t* packed_weights, const int32_t* wsum, const float* multiplier,
                 const float* bias, const float* residual, float* out_float, uint8_t* out_codes);

/* The raw integer product sum_k a[m, k] * w[n, k] over rows of codes (a: m x k_padded,
 * padded with zeros), for the bit-exact tests of the microkernel. */
int edgeq_gemm_raw(const uint8_t* a, int32_t m, int32_t n, int32_t k_padded, const uint8_t* packed_weights, int32_t w_bits, int32_t w_low, int32_t w_absmax,
                   int32_t a_max, int32_t w_layout, int32_t* out);

/* Depthwise convolution: weights [kernel_h][kernel_w][channels] as int8 values (w_low/w_bits
 * describe their packed form, padded to a multiple of 128 values). Same epilogue as above. */
int edgeq_depthwise_conv2d(const edgeq_conv_params* p, const uint8_t* x, const uint8_t* packed_weights, const float* multiplier, const float* bias,
                           const float* residual, float* out_float, uint8_t* out_codes);

/* Float NCHW or NHWC input to NHWC codes: clamp(rint(x / scale) + zero, qmin, qmax). */
void edgeq_quantize(const float* x, int32_t channels, int32_t pixels, int32_t nchw_input, float scale, int32_t zero, int32_t qmin, int32_t qmax, uint8_t* out);

void edgeq_max_pool(const float* x, int32_t in_h, int32_t in_w, int32_t c, int32_t out_h, int32_t out_w, int32_t kernel_h, int32_t kernel_w,
                    int32_t stride_h, int32_t stride_w, int32_t pad_top, int32_t pad_left, float* out);
/* The same over codes (the pool of a convolution that writes codes: quantization is monotone). */
void edgeq_max_pool_codes(const uint8_t* x, int32_t in_h, int32_t in_w, int32_t c, int32_t out_h, int32_t out_w, int32_t kernel_h, int32_t kernel_w,
                          int32_t stride_h, int32_t stride_w, int32_t pad_top, int32_t pad_left, uint8_t* out);
void edgeq_global_average_pool(const float* x, int32_t pixels, int32_t c, float* out);
/* out = clamp(a + b, lo, hi) elementwise (b may be NULL). */
void edgeq_add_clamp(const float* a, const float* b, int64_t count, float lo, float hi, float* out);

/* Multiply-adds of a register-only int8 dot-product loop (0 where none is written), for peak figures. */
int64_t edgeq_int8_peak_loop(int64_t iterations);
/* The same for AMX tiles (0 where the build or the CPU has none). */
int64_t edgeq_amx_peak_loop(int64_t iterations);

/* Unpack `count` (a multiple of 32 * 8 / bits) stored codes into int8 values c + low. */
void edgeq_unpack(const uint8_t* packed, int64_t count, int32_t bits, int32_t low, int8_t* out);

/* Float operators (edgeq_float.c), one signature: a, b (second operand or NULL), integer
 * and float constants, out. What each reads from ints/floats is written above it there. */
#define EDGEQ_FLOAT_OP(name) void name(const float* a, const float* b, const int32_t* ints, const float* floats, float* out)
EDGEQ_FLOAT_OP(edgeq_strided_copy);
EDGEQ_FLOAT_OP(edgeq_concat);
EDGEQ_FLOAT_OP(edgeq_dequantize);
EDGEQ_FLOAT_OP(edgeq_binary);
EDGEQ_FLOAT_OP(edgeq_layer_norm);
EDGEQ_FLOAT_OP(edgeq_softmax);
EDGEQ_FLOAT_OP(edgeq_gelu);
EDGEQ_FLOAT_OP(edgeq_activation);
EDGEQ_FLOAT_OP(edgeq_matmul);
EDGEQ_FLOAT_OP(edgeq_matmul_codes); /* a and b hold uint8 codes */

#ifdef __cplusplus
}
#endif

#endif
