/* One convolution layer of the edgeq kernels, for edgeq.kernels.estimate (whole-layer cycle estimates).
 *
 *   layer_harness CASE REPEATS [int8]
 *                                  runs the layer in CASE REPEATS times between two calls of
 *                                  edgeq_profile_mark (so an emulator's trace can cut out the
 *                                  layer) and prints the thread CPU seconds per run; with
 *                                  int8 (Arm builds), through the int8 baseline below instead
 *   layer_harness --clock          prints the core clock in Hz, measured with a chain of
 *                                  dependent adds (one cycle each on every x86 core)
 *
 * CASE (written by edgeq.kernels.estimate.case_bytes, native byte order):
 *   int32 depthwise | int32 params size | edgeq_conv_params | int64 x bytes | x |
 *   int64 packed bytes | packed | int64 channels | wsum int32[n] | multiplier float[n] | bias float[n]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* One translation unit with the kernels, so that the int8 baseline shares their im2col,
 * tiling and epilogue and differs only in its product loop. */
#include "edgeq_kernels.c"

#if defined(__aarch64__)
/* The int8 baseline: what an int8 runtime's kernel does on the same core, in edgeq's tiling.
 * Activations become signed (x ^ 0x80 = x - 128, the correction folded into the epilogue's
 * zero-point term) and weights are prepacked once at load, as int8 runtimes do.
 *
 * Without dot product (Cortex-A72): 2 rows x 8 channels like edgeq's NEON tile, weights
 * [n/8][k/16][8 channels][16 k]; per channel and 16 k, smull + smlal2 (two s8 x s8 products
 * per int16 lane, at most 2 * 128 * 127) and sadalp into int32: 16 multiply-adds in three
 * instructions, the sequence int8 GEMMs use on such cores.
 * With dot product (Cortex-A76): edgeq's own sdot kernel over its panel [k/4][16][4]; at
 * 8-bit inputs edgeq splits codes into nibble planes (two passes), which an int8 kernel of
 * signed codes does not need. */
#if !defined(__ARM_FEATURE_DOTPROD)
enum { BASELINE_NB = 8 };
static void baseline_micro(const uint8_t* const* a, const int8_t* w, int32_t k_padded, int32_t* c) {
  int32x4_t acc0[8], acc1[8];
  for (int j = 0; j < 8; ++j) acc0[j] = acc1[j] = vdupq_n_s32(0);
  for (int32_t k = 0; k < k_padded; k += 16) {
    const int8x16_t x0 = vreinterpretq_s8_u8(vld1q_u8(a[0] + k)), x1 = vreinterpretq_s8_u8(vld1q_u8(a[1] + k));
    const int8_t* wk = w + (int64_t)k * 8;
    for (int j = 0; j < 8; ++j) {
      const int8x16_t wj = vld1q_s8(wk + 16 * j);
      int16x8_t p0 = vmull_s8(vget_low_s8(x0), vget_low_s8(wj));
      int16x8_t p1 = vmull_s8(vget_low_s8(x1), vget_low_s8(wj));
      p0 = vmlal_high_s8(p0, x0, wj);
      p1 = vmlal_high_s8(p1, x1, wj);
      acc0[j] = vpadalq_s16(acc0[j], p0);
      acc1[j] = vpadalq_s16(acc1[j], p1);
    }
  }
  for (int j = 0; j < 8; ++j) {
    c[j] = vaddvq_s32(acc0[j]);
    c[NB + j] = vaddvq_s32(acc1[j]);
  }
}
/* edgeq's panel [k/8][8][8] of one block -> [k/16][8][16] */
static void baseline_relayout(const int8_t* panel, int32_t k_padded, int8_t* out) {
  for (int32_t k = 0; k < k_padded; ++k)
    for (int j = 0; j < 8; ++j) out[(k / 16) * 128 + j * 16 + k % 16] = panel[(k / 8) * 64 + j * 8 + k % 8];
}
#else
enum { BASELINE_NB = NB };
static void baseline_micro(const uint8_t* const* a, const int8_t* w, int32_t k_padded, int32_t* c) { micro(a, w, k_padded, 0, c); }
static void baseline_relayout(const int8_t* panel, int32_t k_padded, int8_t* out) { memcpy(out, panel, (size_t)NB * k_padded); }
#endif

/* 8-bit weights as stored (edgeq's NEON or sdot layout) -> the baseline's prepacked panels. */
static int8_t* baseline_prepack(const edgeq_conv_params* p, const uint8_t* packed) {
  const int32_t blocks = (p->out_c + BASELINE_NB - 1) / BASELINE_NB;
  int8_t* out = malloc((size_t)blocks * BASELINE_NB * p->k_padded);
  for (int32_t b = 0; b < blocks; ++b)
    baseline_relayout(block_panel(packed, b, BASELINE_NB, p->k_padded, p->w_bits, p->w_low), p->k_padded,
                      out + (int64_t)b * BASELINE_NB * p->k_padded);
  return out;
}

static int baseline_conv2d(const edgeq_conv_params* p, const uint8_t* x, const int8_t* prepacked, const int32_t* wsum,
                           const float* multiplier, const float* bias, uint8_t* out_codes) {
  const int64_t m_count = (int64_t)p->out_h * p->out_w;
  uint8_t* rows = (uint8_t*)scratch(SCRATCH_ROWS, (size_t)(m_count * p->k_padded));
  int32_t* correction = (int32_t*)scratch(SCRATCH_CORRECTION, sizeof(int32_t) * (size_t)p->out_c);
  if (!rows || !correction) return -2;
  im2col(p, x, 0, rows);
  const int64_t row_bytes = m_count * p->k_padded;
  for (int64_t i = 0; i < row_bytes; ++i) rows[i] ^= 0x80;
  for (int32_t n = 0; n < p->out_c; ++n) correction[n] = (p->x_zero - 128) * wsum[n];
  const epilogue_args e = {multiplier, bias, NULL, NULL, p->clamp_min, p->clamp_max, p->out_scale, out_codes, p->out_c, p->out_zero,
                           p->out_qmin, p->out_qmax, correction, NULL, NULL, p->fast_codes ? multiplier + p->out_c : NULL,
                           p->fast_codes ? bias + p->out_c : NULL, p->fast_lo, p->fast_hi};
  const int32_t blocks = (p->out_c + BASELINE_NB - 1) / BASELINE_NB;
  for (int32_t b = 0; b < blocks; ++b) {
    const int32_t n0 = b * BASELINE_NB, count = p->out_c - n0 < BASELINE_NB ? p->out_c - n0 : BASELINE_NB;
    for (int64_t m = 0; m < m_count; m += MR) {
      int32_t tile[MR * NB];
      const uint8_t* a[MR];
      for (int r = 0; r < MR; ++r) a[r] = rows + (m + r < m_count ? m + r : m_count - 1) * p->k_padded;
      baseline_micro(a, prepacked + (int64_t)b * BASELINE_NB * p->k_padded, p->k_padded, tile);
      for (int r = 0; r < MR && m + r < m_count; ++r) epilogue(&e, m + r, n0, count, tile + r * NB, NULL);
    }
  }
  return 0;
}
#endif

__attribute__((noinline)) void edgeq_profile_mark(int which) { __asm__ volatile("" : : "r"(which) : "memory"); }

static double thread_seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void* read_block(FILE* f, int64_t* bytes) {
  if (fread(bytes, sizeof(*bytes), 1, f) != 1) return NULL;
  // 64-byte aligned, as TVM allocates a module's constants
  void* data = aligned_alloc(64, (size_t)((*bytes > 0 ? *bytes : 1) + 63) / 64 * 64);
  if (*bytes > 0 && fread(data, 1, (size_t)*bytes, f) != (size_t)*bytes) return NULL;
  return data;
}

#if defined(__x86_64__)
static double clock_hz(void) {
  const int64_t iterations = 100000000;
  uint64_t x = 0;
  const double start = thread_seconds();
  for (int64_t i = 0; i < iterations; ++i)
    __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
                     "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0"
                     : "+r"(x));
  return 10.0 * (double)iterations / (thread_seconds() - start);
}
#else
static double clock_hz(void) { return 0.0; }
#endif

int main(int argc, char** argv) {
  if (argc == 2 && strcmp(argv[1], "--clock") == 0) {
    printf("%.0f\n", clock_hz());
    return 0;
  }
  if (argc != 3 && argc != 4) {
    fprintf(stderr, "usage: layer_harness CASE REPEATS [int8] | layer_harness --clock\n");
    return 2;
  }
  FILE* f = fopen(argv[1], "rb");
  if (f == NULL) {
    fprintf(stderr, "cannot open %s\n", argv[1]);
    return 2;
  }
  int32_t depthwise = 0, size = 0;
  edgeq_conv_params p;
  if (fread(&depthwise, 4, 1, f) != 1 || fread(&size, 4, 1, f) != 1 || size != (int32_t)sizeof(p) ||
      fread(&p, sizeof(p), 1, f) != 1) {
    fprintf(stderr, "%s: not a layer case of this build\n", argv[1]);
    return 2;
  }
  int64_t x_bytes, w_bytes, channels, wsum_bytes;
  const uint8_t* x = read_block(f, &x_bytes);
  const uint8_t* packed = read_block(f, &w_bytes);
  const int32_t* wsum = read_block(f, &wsum_bytes);
  if (x == NULL || packed == NULL || wsum == NULL) {
    fprintf(stderr, "%s: truncated\n", argv[1]);
    return 2;
  }
  channels = p.out_c;  // wsum holds the zero points after the sums when w_zeros
  if (p.fast_codes) channels *= 2;  // the fast requantization's m' and b' follow the exact arrays
  float* multiplier = malloc((size_t)channels * 4);
  float* bias = malloc((size_t)channels * 4);
  if (fread(multiplier, 4, (size_t)channels, f) != (size_t)channels || fread(bias, 4, (size_t)channels, f) != (size_t)channels) {
    fprintf(stderr, "%s: truncated\n", argv[1]);
    return 2;
  }
  fclose(f);
  uint8_t* out = malloc((size_t)p.out_h * p.out_w * p.out_c);
  const int repeats = atoi(argv[2]);
  const int int8 = argc == 4 && strcmp(argv[3], "int8") == 0;
#if defined(__aarch64__)
  const int8_t* prepacked = int8 && !depthwise ? baseline_prepack(&p, packed) : NULL;
#else
  if (int8) {
    fprintf(stderr, "the int8 baseline is written for Arm builds\n");
    return 2;
  }
#endif
  int status = 0;
  const double start = thread_seconds();
  edgeq_profile_mark(0);
  for (int r = 0; r < repeats; ++r) {
#if defined(__aarch64__)
    if (prepacked) {
      status |= baseline_conv2d(&p, x, prepacked, wsum, multiplier, bias, out);
      continue;
    }
#endif
    status |= depthwise ? edgeq_depthwise_conv2d(&p, x, packed, multiplier, bias, NULL, NULL, out)
                        : edgeq_conv2d(&p, x, packed, wsum, multiplier, bias, NULL, NULL, out);
  }
  edgeq_profile_mark(1);
  const double seconds = thread_seconds() - start;
  if (status != 0) {
    fprintf(stderr, "the kernel rejected the layer (%d)\n", status);
    return 1;
  }
  unsigned checksum = 0;
  for (int64_t i = 0; i < (int64_t)p.out_h * p.out_w * p.out_c; ++i) checksum = checksum * 31u + out[i];
  printf("%.9f %u\n", seconds / repeats, checksum);
  return 0;
}
