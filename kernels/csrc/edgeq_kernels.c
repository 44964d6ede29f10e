/* edgeq low-bit CPU kernels. See edgeq_kernels.h for the data layouts.
 *
 * Why int16 accumulation: a 4-bit activation code times a 2-bit weight is at most 30 in
 * magnitude, so sums of hundreds of products fit in 16 bits. On AVX2 that makes the inner
 * step one vpmaddubsw plus one vpaddw per 32 multiply-adds, where an 8-bit kernel needs a
 * third instruction (vpmaddwd) to widen every product pair before it can saturate. The
 * int16 sums are widened to int32 once per chunk of k, with the chunk sized from the
 * actual bound 15 * max|w| so no partial sum can overflow. Activations wider than 4 bits
 * (first and last layers kept at 8 bits) are split into two nibble planes,
 * x = 16 * hi + lo, and the same kernel runs on both.
 *
 * Each microkernel has a scalar reference (micro_scalar) in this file and a NumPy
 * reference in edgeq/kernels/reference.py; the tests compare all three bit for bit.
 */
#if defined(__linux__)
#define _GNU_SOURCE /* syscall(), for the AMX permission request */
#endif
#include "edgeq_kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__AVX2__)
#include <immintrin.h>
#define EDGEQ_THIS_LAYOUT EDGEQ_LAYOUT_AVX2
#define NB 32
#define KG 2
#define MR 4
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#define EDGEQ_THIS_LAYOUT EDGEQ_LAYOUT_SDOT
#define NB 16
#define KG 4
#define MR 4
#elif defined(__aarch64__)
#include <arm_neon.h>
#define EDGEQ_THIS_LAYOUT EDGEQ_LAYOUT_NEON
#define NB 8
#define KG 8
#define MR 2
#else
#define EDGEQ_THIS_LAYOUT EDGEQ_LAYOUT_PORTABLE
#define NB 16
#define KG 1
#define MR 6
#endif

#define K_ALIGN 16
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define TILE_ROWS_MAX 32 /* MR_AMX */
#else
#define TILE_ROWS_MAX MR
#endif
#if defined(__AVX2__)
#define NB_WIDE_OR_NB 16
#else
#define NB_WIDE_OR_NB NB
#endif
#define NIBBLE_MAX 15

void edgeq_set_threads(int n) {
#if defined(_OPENMP)
  omp_set_num_threads(n < 1 ? 1 : n);
#else
  (void)n;
#endif
}

int edgeq_threads(void) {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int edgeq_layout(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return EDGEQ_LAYOUT_VNNI;
#else
  return EDGEQ_THIS_LAYOUT;
#endif
}

/* The field width is a compile-time constant in each instance, so the loops vectorize
 * (shift, mask, add over 32 contiguous bytes) on every target. */
#define EDGEQ_UNPACK_FIXED(BITS)                                                        \
  static void unpack_##BITS(const uint8_t* packed, int64_t groups, int8_t low, int8_t* out) { \
    for (int64_t g = 0; g < groups; ++g) {                                              \
      const uint8_t* src = packed + g * 32;                                             \
      int8_t* dst = out + g * 32 * (8 / BITS);                                          \
      for (int field = 0; field < 8 / BITS; ++field)                                    \
        for (int i = 0; i < 32; ++i)                                                    \
          dst[field * 32 + i] = (int8_t)((uint8_t)((src[i] >> (field * BITS)) & ((1 << BITS) - 1)) + (uint8_t)low); \
    }                                                                                   \
  }
EDGEQ_UNPACK_FIXED(2)
EDGEQ_UNPACK_FIXED(4)
EDGEQ_UNPACK_FIXED(8)

void edgeq_unpack(const uint8_t* packed, int64_t count, int32_t bits, int32_t low, int8_t* out) {
  const int64_t groups = count / (32 * (8 / bits));
  if (bits == 2) unpack_2(packed, groups, (int8_t)low, out);
  else if (bits == 4) unpack_4(packed, groups, (int8_t)low, out);
  else unpack_8(packed, groups, (int8_t)low, out);
}

/* Grow-only scratch memory per thread and purpose: a fresh malloc of a few MB per layer
 * would be mapped anew and page-faulted in on every call. */
enum { SCRATCH_ROWS = 0, SCRATCH_WIDE = 1, SCRATCH_LUT_INDEX = 2, SCRATCH_LUT_TABLES = 3, SCRATCH_PANEL = 4, SCRATCH_CORRECTION = 5, SCRATCH_AMX_ROWS = 6,
       SCRATCH_WINDOW_SUMS = 7, SCRATCH_PIXEL_SUMS = 8, SCRATCH_EIGHT_SUMS = 9, SCRATCH_WIDE_PANEL = 10, SCRATCH_WINOGRAD_V = 11,
       SCRATCH_WINOGRAD_M = 12, SCRATCH_TAIL = 13, SCRATCH_COUNT = 14 };
static _Thread_local struct {
  void* data;
  size_t size;
} scratch_slots[SCRATCH_COUNT];

static int in_place_allowed = 1;

/* Work items are (channel block, part of the rows): with fewer blocks than four per core (64
 * channels are two) each block's rows are split too, so every core of a 4- or 6-core board has
 * work; never into more parts than there are tiles of rows. */
static int64_t row_parts(int64_t blocks, int64_t tiles) {
#if defined(_OPENMP)
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  const int64_t parts = threads > 1 && blocks < 4 * threads ? (4 * threads + blocks - 1) / blocks : 1;
  return parts > tiles ? tiles : parts;
}

static void* scratch(int slot, size_t size) {
  if (scratch_slots[slot].size < size) {
    free(scratch_slots[slot].data);
    scratch_slots[slot].data = aligned_alloc(64, (size + 63) / 64 * 64);  // aligned vector loads
    scratch_slots[slot].size = scratch_slots[slot].data ? size : 0;
  }
  return scratch_slots[slot].data;
}

/* Largest multiple of K_ALIGN such that chunk * NIBBLE_MAX * w_absmax fits int16. */
static int32_t int16_chunk(int32_t w_absmax) {
  int32_t chunk = 32767 / (NIBBLE_MAX * (w_absmax > 0 ? w_absmax : 1));
  chunk -= chunk % K_ALIGN;
  return chunk < K_ALIGN ? K_ALIGN : chunk;
}

/* c[r][n] = sum_k a_r[k] * panel(k, n) for one block of NB channels, k in [0, k_padded). */
__attribute__((unused)) static void micro_scalar(const uint8_t* const* a, const int8_t* panel, int32_t k_padded, int32_t* c) {
  for (int r = 0; r < MR; ++r) {
    for (int n = 0; n < NB; ++n) {
      int32_t sum = 0;
      for (int32_t k = 0; k < k_padded; ++k) sum += (int32_t)a[r][k] * panel[(k / KG) * NB * KG + n * KG + k % KG];
      c[r * NB + n] = sum;
    }
  }
}

#if defined(__AVX2__)
/* int16 sums of a 4-row x 32-channel tile into int32 c (added to it after the first chunk). */
static inline void widen_tile(const __m256i rows[MR][2], int accumulate, int32_t* c) {
  for (int r = 0; r < MR; ++r) {
    for (int h = 0; h < 2; ++h) {
      int32_t* out = c + r * NB + 16 * h;
      __m256i low = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(rows[r][h]));
      __m256i high = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(rows[r][h], 1));
      if (accumulate) {
        low = _mm256_add_epi32(_mm256_loadu_si256((const __m256i*)out), low);
        high = _mm256_add_epi32(_mm256_loadu_si256((const __m256i*)(out + 8)), high);
      }
      _mm256_storeu_si256((__m256i*)out, low);
      _mm256_storeu_si256((__m256i*)(out + 8), high);
    }
  }
}

/* Chunks of k: 4 rows x 32 channels of int16 sums in 8 registers (with the two weight
 * vectors and the broadcast, 11 of 16: a 6-row tile makes GCC spill), widened into c. */
/* int16 sums of one chunk of k, [k0, k1), for 4 rows x 32 channels, into rows[r][h] (channels 16h..16h+15). */
static inline __attribute__((always_inline)) void chunk_sums(const uint8_t* const* a, const int8_t* panel, int32_t k0, int32_t k1, __m256i rows[MR][2]) {
  const uint8_t *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  const int8_t* w = panel + (int64_t)k0 * NB;
  for (int32_t k = k0; k < k1; k += 2, w += 2 * NB) {
    const __m256i w0 = _mm256_load_si256((const __m256i*)w);
    const __m256i w1 = _mm256_load_si256((const __m256i*)(w + 32));
    __m256i x;
#define EDGEQ_ROW(r)                                                                 \
  x = _mm256_set1_epi16(*(const int16_t*)(a##r + k));                               \
  c##r##0 = _mm256_add_epi16(c##r##0, _mm256_maddubs_epi16(x, w0));                 \
  c##r##1 = _mm256_add_epi16(c##r##1, _mm256_maddubs_epi16(x, w1));
    EDGEQ_ROW(0) EDGEQ_ROW(1) EDGEQ_ROW(2) EDGEQ_ROW(3)
#undef EDGEQ_ROW
  }
  rows[0][0] = c00, rows[0][1] = c01, rows[1][0] = c10, rows[1][1] = c11;
  rows[2][0] = c20, rows[2][1] = c21, rows[3][0] = c30, rows[3][1] = c31;
}

static void micro(const uint8_t* const* a, const int8_t* panel, int32_t k_padded, int32_t chunk, int32_t* c) {
  for (int32_t k0 = 0; k0 < k_padded; k0 += chunk) {
    __m256i rows[MR][2];
    chunk_sums(a, panel, k0, k0 + chunk < k_padded ? k0 + chunk : k_padded, rows);
    widen_tile(rows, k0 > 0, c);
  }
}
/* Few rows (matrix-vector products, classifiers): unpacking a whole panel to memory would
 * cost as much as the product, so 2-bit weights are unpacked in registers instead. One
 * 32-byte group holds k-pairs kp and kp+1 of the block: field 0 = pair kp, channels 0-15;
 * field 1 = pair kp, channels 16-31; fields 2, 3 = pair kp+1 (see edgeq_kernels.h). */
#define EDGEQ_HAS_PACKED2 1
static void micro_packed2(const uint8_t* const* a, const uint8_t* packed, int32_t k_padded, int32_t chunk, int8_t low, int32_t* c) {
  const uint8_t *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
  const __m256i mask = _mm256_set1_epi8(3), offset = _mm256_set1_epi8(low);
  for (int32_t k0 = 0; k0 < k_padded; k0 += chunk) {
    const int32_t k1 = k0 + chunk < k_padded ? k0 + chunk : k_padded;
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
    for (int32_t k = k0; k < k1; k += 4) {
      const __m256i b = _mm256_loadu_si256((const __m256i*)(packed + (int64_t)k * NB / 4));
      const __m256i w0 = _mm256_add_epi8(_mm256_and_si256(b, mask), offset);
      const __m256i w1 = _mm256_add_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 2), mask), offset);
      const __m256i w2 = _mm256_add_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 4), mask), offset);
      const __m256i w3 = _mm256_add_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 6), mask), offset);
      __m256i x, y;
#define EDGEQ_ROW(r)                                                                                      \
  x = _mm256_set1_epi16(*(const int16_t*)(a##r + k));                                                    \
  y = _mm256_set1_epi16(*(const int16_t*)(a##r + k + 2));                                                \
  c##r##0 = _mm256_add_epi16(c##r##0, _mm256_add_epi16(_mm256_maddubs_epi16(x, w0), _mm256_maddubs_epi16(y, w2))); \
  c##r##1 = _mm256_add_epi16(c##r##1, _mm256_add_epi16(_mm256_maddubs_epi16(x, w1), _mm256_maddubs_epi16(y, w3)));
      EDGEQ_ROW(0) EDGEQ_ROW(1) EDGEQ_ROW(2) EDGEQ_ROW(3)
#undef EDGEQ_ROW
    }
    const __m256i rows[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
    widen_tile(rows, k0 > 0, c);
  }
}

/* Table lookup (LAYOUT_AVX2_LUT, see edgeq_kernels.h): for 2-bit weights and 4-bit
 * inputs, one vpshufb looks up 32 table entries, each the sum over 4 activations selected
 * by one bit plane of a channel's weights; vpmaddubsw with (1, -2) combines the two
 * planes (w = b0 - 2 * b1) into int16, vpaddw accumulates: 64 multiply-adds per three
 * instructions, against 32 per two for vpmaddubsw on unpacked weights. The tables are
 * built once per row and reused by every output channel. */
#define EDGEQ_HAS_LUT 1
#define EDGEQ_LUT_LAYOUT EDGEQ_LAYOUT_AVX2_LUT
#define NB_LUT 16
#define MR_LUT 4
#define LUT_CHUNK_PAIRS 256 /* 256 group pairs: each int16 lane adds at most 120 per pair */

/* Stored [pair][half][16] (byte = i0 | i1 << 4) -> [pair][half][32] (i0, i1 byte pairs). */
static void lut_expand(const uint8_t* stored, int32_t pairs, uint8_t* out) {
  const __m256i low = _mm256_set1_epi16(0x000F), high = _mm256_set1_epi16(0x0F00);
  for (int32_t i = 0; i < pairs * 2; ++i) {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(stored + 16 * i)));
    _mm256_store_si256((__m256i*)(out + 32 * i), _mm256_or_si256(_mm256_and_si256(v, low), _mm256_and_si256(_mm256_slli_epi16(v, 4), high)));
  }
}

/* Per group pair: lane 0 = the 16 subset sums of a[8gp..8gp+3], lane 1 of a[8gp+4..8gp+7].
 * T[p] = L[p & 3] + H[p >> 2], L = (0, a0, a1, a0+a1), H = (0, a2, a3, a2+a3). */
static void lut_tables(const uint8_t* row, int32_t pairs, uint8_t* out) {
  const char z = (char)0x80;  // vpshufb writes 0
  const __m256i s1 = _mm256_setr_epi8(z, 0, 1, 0, z, 2, 3, 2, z, z, z, z, z, z, z, z, z, 4, 5, 4, z, 6, 7, 6, z, z, z, z, z, z, z, z);
  const __m256i s2 = _mm256_setr_epi8(z, z, z, 1, z, z, z, 3, z, z, z, z, z, z, z, z, z, z, z, 5, z, z, z, 7, z, z, z, z, z, z, z, z);
  const __m256i ilo = _mm256_setr_epi8(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
  const __m256i ihi = _mm256_setr_epi8(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7, 4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7);
  for (int32_t gp = 0; gp < pairs; ++gp) {
    int64_t bytes;
    memcpy(&bytes, row + 8 * gp, 8);
    const __m256i v = _mm256_set1_epi64x(bytes);
    const __m256i lh = _mm256_add_epi8(_mm256_shuffle_epi8(v, s1), _mm256_shuffle_epi8(v, s2));
    _mm256_store_si256((__m256i*)(out + 32 * gp), _mm256_add_epi8(_mm256_shuffle_epi8(lh, ilo), _mm256_shuffle_epi8(lh, ihi)));
  }
}

/* c[r][n] = sum_k a_r[k] * w[n][k] for 4 rows (their tables) and one 16-channel block. */
static void micro_lut(const uint8_t* const* tables, const uint8_t* index, int32_t pairs, int32_t* c) {
  const __m256i coeff = _mm256_set1_epi16((int16_t)0xFE01);  // bytes (1, -2): b0 - 2 * b1
  const uint8_t *t0 = tables[0], *t1 = tables[1], *t2 = tables[2], *t3 = tables[3];
  for (int32_t g0 = 0; g0 < pairs; g0 += LUT_CHUNK_PAIRS) {
    const int32_t g1 = g0 + LUT_CHUNK_PAIRS < pairs ? g0 + LUT_CHUNK_PAIRS : pairs;
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
    for (int32_t gp = g0; gp < g1; ++gp) {
      const __m256i x0 = _mm256_load_si256((const __m256i*)(index + 64 * gp));
      const __m256i x1 = _mm256_load_si256((const __m256i*)(index + 64 * gp + 32));
      __m256i t;
#define EDGEQ_ROW(r)                                                                           \
  t = _mm256_load_si256((const __m256i*)(t##r + 32 * gp));                                     \
  c##r##0 = _mm256_add_epi16(c##r##0, _mm256_maddubs_epi16(_mm256_shuffle_epi8(t, x0), coeff)); \
  c##r##1 = _mm256_add_epi16(c##r##1, _mm256_maddubs_epi16(_mm256_shuffle_epi8(t, x1), coeff));
      EDGEQ_ROW(0) EDGEQ_ROW(1) EDGEQ_ROW(2) EDGEQ_ROW(3)
#undef EDGEQ_ROW
    }
    // lanes 0-7: even groups of channels 0-7 (or 8-15); lanes 8-15: odd groups, same channels
    const __m256i rows[MR_LUT][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
    for (int r = 0; r < MR_LUT; ++r) {
      for (int h = 0; h < 2; ++h) {
        int32_t* out = c + r * NB_LUT + 8 * h;
        __m256i sum = _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(rows[r][h])), _mm256_cvtepi16_epi32(_mm256_extracti128_si256(rows[r][h], 1)));
        if (g0 > 0) sum = _mm256_add_epi32(sum, _mm256_loadu_si256((const __m256i*)out));
        _mm256_storeu_si256((__m256i*)out, sum);
      }
    }
  }
}

/* 8-bit activations (first and last layers): u8 x s8 pairs could saturate vpmaddubsw, so
 * both sides are widened to int16 and vpmaddwd sums each pair into int32 (4 rows x 16
 * channels; activation rows widened to uint16 once; the panel [k/2][16][2] of int8 sign-extended
 * once per block). */
#define EDGEQ_HAS_WIDE 1
#define NB_WIDE 16
/* Kernel row t of a tile's rows starts at a[r] + t * row_stride, tap_k codes (an even count:
 * the taps' kernel_w * in_c, rounded up against zero weights), and the panel is int16,
 * [t][tap_k/2][16][2] (wide_conv_in_place); im2col rows are one tap of k_padded codes. */
static void micro_wide_taps(const uint16_t* const* a, int64_t row_stride, int32_t taps, int32_t tap_k, const int16_t* panel, int32_t* c) {
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  const int16_t* w = panel;
  for (int32_t t = 0; t < taps; ++t) {
    const uint16_t *a0 = a[0] + t * row_stride, *a1 = a[1] + t * row_stride, *a2 = a[2] + t * row_stride, *a3 = a[3] + t * row_stride;
    for (int32_t k = 0; k < tap_k; k += 2, w += 2 * NB_WIDE) {
      const __m256i w0 = _mm256_load_si256((const __m256i*)w);
      const __m256i w1 = _mm256_load_si256((const __m256i*)(w + 16));
      __m256i x;
#define EDGEQ_ROW(r)                                                                  \
  x = _mm256_set1_epi32(*(const int32_t*)(a##r + k));                                \
  c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(x, w0));                     \
  c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(x, w1));
      EDGEQ_ROW(0) EDGEQ_ROW(1) EDGEQ_ROW(2) EDGEQ_ROW(3)
#undef EDGEQ_ROW
    }
  }
  const __m256i rows[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
  for (int r = 0; r < 4; ++r) {
    _mm256_storeu_si256((__m256i*)(c + r * NB_WIDE), rows[r][0]);
    _mm256_storeu_si256((__m256i*)(c + r * NB_WIDE + 8), rows[r][1]);
  }
}

/* One row (a classifier on one image): the 8-bit panel sign-extended as it is read, where the 4-row tile would
 * need the whole panel widened to int16 first and compute the row four times (1280 -> 1000: 0.18 ms against
 * onnxruntime's 0.10). */
static void micro_wide_row(const uint16_t* a0, const int8_t* panel, int32_t k_padded, int32_t* c) {
  __m256i c0 = _mm256_setzero_si256(), c1 = c0;
  for (int32_t k = 0; k < k_padded; k += 2) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(panel + (int64_t)k * NB_WIDE)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(panel + (int64_t)k * NB_WIDE + 16)));
    const __m256i x = _mm256_set1_epi32(*(const int32_t*)(a0 + k));
    c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(x, w0));
    c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(x, w1));
  }
  _mm256_storeu_si256((__m256i*)c, c0);
  _mm256_storeu_si256((__m256i*)(c + 8), c1);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* AVX-512 VNNI (LAYOUT_VNNI, panel [k/4][32][4]): one vpdpbusd multiplies a row's 4
 * activation codes (broadcast) by 16 channels' 4 weights and adds the four products into
 * int32 lanes: 64 multiply-adds per instruction with no intermediate saturation, so 8-bit
 * inputs need neither nibble planes nor a widening kernel. 8 rows x 32 channels: 16
 * accumulators, two weight registers and a broadcast of the 32 zmm registers. */
#define EDGEQ_HAS_VNNI 1
#define MR_VNNI 8
/* The 8 x 32 tile over k, with WEIGHTS(k) setting w0 (channels 0-15) and w1 (16-31) of quad k/4. */
#define EDGEQ_VNNI_TILE(WEIGHTS)                                                                                            \
  const uint8_t *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5], *a6 = a[6], *a7 = a[7];            \
  __m512i c00 = _mm512_setzero_si512(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;        \
  __m512i c40 = c00, c41 = c00, c50 = c00, c51 = c00, c60 = c00, c61 = c00, c70 = c00, c71 = c00;                           \
  for (int32_t k = 0; k < k_padded; k += 4) {                                                                              \
    __m512i w0, w1, x;                                                                                                     \
    int32_t quad;                                                                                                          \
    WEIGHTS(k)                                                                                                             \
    EDGEQ_VNNI_ROW(0) EDGEQ_VNNI_ROW(1) EDGEQ_VNNI_ROW(2) EDGEQ_VNNI_ROW(3)                                                 \
    EDGEQ_VNNI_ROW(4) EDGEQ_VNNI_ROW(5) EDGEQ_VNNI_ROW(6) EDGEQ_VNNI_ROW(7)                                                 \
  }                                                                                                                        \
  const __m512i rows[MR_VNNI][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}, {c60, c61}, {c70, c71}}; \
  for (int r = 0; r < MR_VNNI; ++r) {                                                                                      \
    _mm512_storeu_si512((void*)(c + r * NB), rows[r][0]);                                                                  \
    _mm512_storeu_si512((void*)(c + r * NB + 16), rows[r][1]);                                                             \
  }
#define EDGEQ_VNNI_ROW(r)                        \
  memcpy(&quad, a##r + k, sizeof quad);          \
  x = _mm512_set1_epi32(quad);                   \
  c##r##0 = _mm512_dpbusd_epi32(c##r##0, x, w0); \
  c##r##1 = _mm512_dpbusd_epi32(c##r##1, x, w1);

/* Named accumulators throughout: GCC keeps an array of them in memory, storing all 16 every iteration. */
static void micro_vnni(const uint8_t* const* a, const int8_t* panel, int32_t k_padded, int32_t* c) {
#define EDGEQ_PANEL_WEIGHTS(k)                                              \
  w0 = _mm512_loadu_si512((const void*)(panel + (int64_t)(k) * NB));      \
  w1 = _mm512_loadu_si512((const void*)(panel + (int64_t)(k) * NB + 64));
  EDGEQ_VNNI_TILE(EDGEQ_PANEL_WEIGHTS)
#undef EDGEQ_PANEL_WEIGHTS
}

/* 2-bit weights unpacked in registers (no panel in memory: a quarter of the bytes to stream).
 * The 32 stored bytes of quad k/4 hold its 128 codes in four 2-bit fields (edgeq_kernels.h):
 * fields 0 and 1 are channels 0-15 (w0), fields 2 and 3 channels 16-31 (w1). Both 256-bit
 * halves of a register get the 32 bytes, vpsrlvw shifts each half by its field's offset. */
static void micro_vnni_packed2(const uint8_t* const* a, const uint8_t* packed, int32_t k_padded, int8_t low, int32_t* c) {
  const __m512i shift01 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
  const __m512i shift23 = _mm512_add_epi16(shift01, _mm512_set1_epi16(4));
  const __m512i mask = _mm512_set1_epi8(3), offset = _mm512_set1_epi8(low);
#define EDGEQ_PACKED2_WEIGHTS(k)                                                                           \
  {                                                                                                        \
    const __m512i bytes = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(packed + (int64_t)(k) * 8))); \
    w0 = _mm512_add_epi8(_mm512_and_si512(_mm512_srlv_epi16(bytes, shift01), mask), offset);             \
    w1 = _mm512_add_epi8(_mm512_and_si512(_mm512_srlv_epi16(bytes, shift23), mask), offset);             \
  }
  EDGEQ_VNNI_TILE(EDGEQ_PACKED2_WEIGHTS)
#undef EDGEQ_PACKED2_WEIGHTS
}

#if defined(__linux__) && defined(__x86_64__) && ((defined(__GNUC__) && __GNUC__ >= 11) || (defined(__clang__) && __clang_major__ >= 12))
/* Intel AMX (Sapphire Rapids and later), chosen at run time inside VNNI builds: one tdpbusd
 * multiplies a 16 x 64 tile of u8 codes by a 64 x 16 tile of s8 weights into 16 x 16 int32
 * sums, 16,384 multiply-adds per instruction. A weight tile is 16 quads of the VNNI panel
 * [k/4][32][4] as they lie (rows of 128 bytes), so AMX and VNNI share the stored weights:
 *
 *   panel quad q:  | ch0 k0..k3 | ch1 k0..k3 | ... | ch15 k0..k3 | ch16 k0..k3 | ... | ch31 k0..k3 |
 *                   '----------- tile 6, row q % 16 -------------' '------- tile 7, row q % 16 ------'
 *
 * A 32 x 32 block of outputs: C tiles 0-3 (rows 0-15 / 16-31 x channels 0-15 / 16-31), A
 * tiles 4 and 5 (rows 0-15, 16-31; 64 codes of k each), B tiles 6 and 7. The reduction runs
 * in steps of 64 over a panel zero-padded to a multiple of 64, so an A tile may read past a
 * row's k_padded codes (into the next row's) where the weights are zero: the sums stay exact.
 * Linux grants tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM), once per process. */
#define EDGEQ_HAS_AMX 1
#define MR_AMX 32
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} amx_tile_config;

static int amx_allowed = 1;

static int amx_usable(void) {
  static int state = -1;  // -1: not asked yet; racing first calls ask twice and agree
  int known = __atomic_load_n(&state, __ATOMIC_ACQUIRE);
  if (known < 0) {
    unsigned eax, ebx, ecx, edx;
    known = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx >> 24 & 1) && (edx >> 25 & 1);  // AMX-TILE, AMX-INT8
    if (known) known = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    __atomic_store_n(&state, known, __ATOMIC_RELEASE);
  }
  return known && __atomic_load_n(&amx_allowed, __ATOMIC_RELAXED);
}

/* Every thread loads the configuration before its tiles and releases them after: another
 * library in the process (oneDNN under torch) may leave other tile shapes configured. */
__attribute__((target("amx-tile"))) static void amx_begin(void) {
  amx_tile_config config;
  memset(&config, 0, sizeof config);
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  // GCC's _tile_loadconfig names only the first 8 bytes as read, so the stores of the shapes could be dropped
  __asm__ volatile("ldtilecfg %0" ::"m"(config));
}

__attribute__((target("amx-tile"))) static void amx_end(void) { _tile_release(); }

/* c[32][NB] = the raw sums of 32 rows of codes (row r at a + r * lda, readable for k64 codes)
 * by one block's panel (k64 / 4 quads of 128 bytes, zero past k_padded). */
__attribute__((target("amx-tile,amx-int8"))) static void micro_amx(const uint8_t* a, int64_t lda, const int8_t* panel, int32_t k64, int32_t* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int32_t k = 0; k < k64; k += 64) {
    _tile_loadd(4, a + k, lda);
    _tile_loadd(5, a + 16 * lda + k, lda);
    _tile_loadd(6, panel + (int64_t)k * NB, NB * 4);
    _tile_loadd(7, panel + (int64_t)k * NB + 64, NB * 4);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  _tile_stored(0, c, NB * 4);
  _tile_stored(1, c + 16, NB * 4);
  _tile_stored(2, c + 16 * NB, NB * 4);
  _tile_stored(3, c + 16 * NB + 16, NB * 4);
}

/* The same 32 x 32 block without im2col (implicit GEMM), for stride-1 convolutions with a
 * multiple of 64 input channels over an input copied once with its padding, wp pixels wide.
 * Output pixels are taken as "virtual rows" j = oh * wp + ow over the padded width, so row j
 * of tap (dy, dx) is the padded pixel j + dy * wp + dx: every tap's activation tile is 16
 * pixels at a stride of in_c bytes, 64 channels of each. The wp - out_w virtual rows per output
 * row that run off the right edge are computed and dropped.
 *
 *   padded input (wp = out_w + kw - 1):   row j of tap (dy, dx) = pixel j + dy * wp + dx
 *   k of the panel = (dy * kw + dx) * in_c + channel: im2col's order, so the weights are the same */
__attribute__((target("amx-tile,amx-int8"))) static void micro_amx_taps(const uint8_t* a, int32_t in_c, int32_t wp, int32_t kernel_h, int32_t kernel_w,
                                                                      const int8_t* panel, int32_t* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  int64_t k = 0;
  for (int32_t dy = 0; dy < kernel_h; ++dy)
    for (int32_t dx = 0; dx < kernel_w; ++dx) {
      const uint8_t* tap = a + ((int64_t)dy * wp + dx) * in_c;
      for (int32_t c0 = 0; c0 < in_c; c0 += 64, k += 64) {
        _tile_loadd(4, tap + c0, in_c);
        _tile_loadd(5, tap + (int64_t)16 * in_c + c0, in_c);
        _tile_loadd(6, panel + k * NB, NB * 4);
        _tile_loadd(7, panel + k * NB + 64, NB * 4);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
      }
    }
  _tile_stored(0, c, NB * 4);
  _tile_stored(1, c + 16, NB * 4);
  _tile_stored(2, c + 16 * NB, NB * 4);
  _tile_stored(3, c + 16 * NB + 16, NB * 4);
}
#endif
#endif
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
static void micro(const uint8_t* const* a, const int8_t* panel, int32_t k_padded, int32_t chunk, int32_t* c) {
  (void)chunk;
  int32x4_t acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = vdupq_n_s32(0);
  for (int32_t k = 0; k < k_padded; k += 16) {
    int8x16_t x[MR];
    for (int r = 0; r < MR; ++r) x[r] = vreinterpretq_s8_u8(vld1q_u8(a[r] + k));
#define EDGEQ_SDOT_LANE(lane)                                                        \
  {                                                                                  \
    const int8_t* w = panel + (k + 4 * (lane)) * NB;                                 \
    const int8x16_t w0 = vld1q_s8(w), w1 = vld1q_s8(w + 16), w2 = vld1q_s8(w + 32), \
                    w3 = vld1q_s8(w + 48);                                           \
    for (int r = 0; r < MR; ++r) {                                                   \
      acc[r][0] = vdotq_laneq_s32(acc[r][0], w0, x[r], lane);                        \
      acc[r][1] = vdotq_laneq_s32(acc[r][1], w1, x[r], lane);                        \
      acc[r][2] = vdotq_laneq_s32(acc[r][2], w2, x[r], lane);                        \
      acc[r][3] = vdotq_laneq_s32(acc[r][3], w3, x[r], lane);                        \
    }                                                                                \
  }
    EDGEQ_SDOT_LANE(0) EDGEQ_SDOT_LANE(1) EDGEQ_SDOT_LANE(2) EDGEQ_SDOT_LANE(3)
#undef EDGEQ_SDOT_LANE
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) vst1q_s32(c + r * NB + 4 * j, acc[r][j]);
}
/* 8-bit inputs as signed codes (x ^ 0x80 = x - 128, corrected in the epilogue's zero-point
 * term): sdot takes them as they are, one pass instead of two nibble planes. */
#define EDGEQ_HAS_SIGNED8 1
static void micro_s8(const uint8_t* const* a, const int8_t* panel, int32_t k_padded, int32_t* c) { micro(a, panel, k_padded, 0, c); }
#elif defined(__aarch64__)
/* 2 rows x 8 channels without dot product. Each row's 8 codes at k..k+7 are loaded once
 * (replicated into both halves) and multiplied lane by lane with a channel's 8 weights
 * (smlal / smlal2, 8 multiply-adds per instruction, no broadcast from a general
 * register): int16 lane j holds the partial sum over k = j mod 8, and the 8 lanes are
 * reduced once per chunk. An int8 kernel needs smull + smlal2 + sadalp for 16. */
static void micro(const uint8_t* const* a, const int8_t* panel, int32_t k_padded, int32_t chunk, int32_t* c) {
  memset(c, 0, sizeof(int32_t) * MR * NB);
  for (int32_t k0 = 0; k0 < k_padded; k0 += chunk) {
    const int32_t k1 = k0 + chunk < k_padded ? k0 + chunk : k_padded;
    int16x8_t r0[8], r1[8];
    for (int j = 0; j < 8; ++j) r0[j] = r1[j] = vdupq_n_s16(0);
    for (int32_t k = k0; k < k1; k += 8) {
      const int8_t* w = panel + (int64_t)k * NB;
      const int8x16_t w01 = vld1q_s8(w), w23 = vld1q_s8(w + 16), w45 = vld1q_s8(w + 32), w67 = vld1q_s8(w + 48);
      // a row's 8 codes in both halves, loaded straight into vector registers (a dup from a
      // general register is slow on A72)
#define EDGEQ_ROW(sums, row)                                                                        \
  {                                                                                                 \
    const int8x16_t x = vreinterpretq_s8_u8(vcombine_u8(vld1_u8(a[row] + k), vld1_u8(a[row] + k))); \
    const int8x8_t xl = vget_low_s8(x);                                                             \
    sums[0] = vmlal_s8(sums[0], xl, vget_low_s8(w01));                                              \
    sums[1] = vmlal_high_s8(sums[1], x, w01);                                                       \
    sums[2] = vmlal_s8(sums[2], xl, vget_low_s8(w23));                                              \
    sums[3] = vmlal_high_s8(sums[3], x, w23);                                                       \
    sums[4] = vmlal_s8(sums[4], xl, vget_low_s8(w45));                                              \
    sums[5] = vmlal_high_s8(sums[5], x, w45);                                                       \
    sums[6] = vmlal_s8(sums[6], xl, vget_low_s8(w67));                                              \
    sums[7] = vmlal_high_s8(sums[7], x, w67);                                                       \
  }
      EDGEQ_ROW(r0, 0) EDGEQ_ROW(r1, 1)
#undef EDGEQ_ROW
    }
    for (int j = 0; j < 8; ++j) {
      c[j] += vaddlvq_s16(r0[j]);
      c[NB + j] += vaddlvq_s16(r1[j]);
    }
  }
}

/* 8-bit inputs as signed codes (x ^ 0x80 = x - 128, corrected in the epilogue's zero-point
 * term) over the same panel [k/8][8 channels][8 k], 2 rows x 8 channels: per channel and 16 k,
 * smull + smlal (two products per int16 lane, |sum| <= 2 * 128 * 127 while |w| <= 127) and
 * sadalp into int32, the int8 sequence of cores without dot product, in one pass where the
 * nibble planes took two. A 16-byte load holds channels j and j+1 of one group of 8 k, so
 * channel j+1 takes the high halves (smull2 / smlal2) of the rows' codes loaded twice. */
#define EDGEQ_HAS_SIGNED8 1
static void micro_s8(const uint8_t* const* a, const int8_t* panel, int32_t k_padded, int32_t* c) {
  int32x4_t acc0[8], acc1[8];
  for (int j = 0; j < 8; ++j) acc0[j] = acc1[j] = vdupq_n_s32(0);
  for (int32_t k = 0; k < k_padded; k += 16) {
    const int8x16_t l0 = vreinterpretq_s8_u8(vcombine_u8(vld1_u8(a[0] + k), vld1_u8(a[0] + k)));
    const int8x16_t h0 = vreinterpretq_s8_u8(vcombine_u8(vld1_u8(a[0] + k + 8), vld1_u8(a[0] + k + 8)));
    const int8x16_t l1 = vreinterpretq_s8_u8(vcombine_u8(vld1_u8(a[1] + k), vld1_u8(a[1] + k)));
    const int8x16_t h1 = vreinterpretq_s8_u8(vcombine_u8(vld1_u8(a[1] + k + 8), vld1_u8(a[1] + k + 8)));
    const int8_t* g = panel + (int64_t)k * NB;  // group k/8; group k/8 + 1 follows at 8 * NB
    for (int j = 0; j < 8; j += 2) {
      const int8x16_t g0 = vld1q_s8(g + 8 * j), g1 = vld1q_s8(g + 8 * NB + 8 * j);
      acc0[j] = vpadalq_s16(acc0[j], vmlal_s8(vmull_s8(vget_low_s8(l0), vget_low_s8(g0)), vget_low_s8(h0), vget_low_s8(g1)));
      acc0[j + 1] = vpadalq_s16(acc0[j + 1], vmlal_high_s8(vmull_high_s8(l0, g0), h0, g1));
      acc1[j] = vpadalq_s16(acc1[j], vmlal_s8(vmull_s8(vget_low_s8(l1), vget_low_s8(g0)), vget_low_s8(h1), vget_low_s8(g1)));
      acc1[j + 1] = vpadalq_s16(acc1[j + 1], vmlal_high_s8(vmull_high_s8(l1, g0), h1, g1));
    }
  }
  for (int j = 0; j < 8; ++j) {
    c[j] = vaddvq_s32(acc0[j]);
    c[NB + j] = vaddvq_s32(acc1[j]);
  }
}

/* Table lookup (LAYOUT_NEON_LUT, see edgeq_kernels.h), for cores without a dot product
 * (Cortex-A72): the same tables and indices as the AVX2 kernel. One tbl looks up one bit
 * plane of 16 channels' weights against the subset sums of 4 activations (32 multiply-adds'
 * worth); four lookups add up in bytes, uaddw widens them into uint16 lanes, and the planes
 * are combined (b0 - 2 * b1) once per chunk. llvm-mca's A72 model puts this loop at 14
 * multiply-adds per cycle, an int8 smull/smlal2/sadalp loop at 10.6 and smlal over unpacked
 * weights (micro above) at 7.9 (benchmarks/arm_estimate.py); the 16-byte tbl, 1.5 cycles
 * there, is what limits it. */
#define EDGEQ_HAS_LUT 1
#define EDGEQ_LUT_LAYOUT EDGEQ_LAYOUT_NEON_LUT
#define NB_LUT 16
#define MR_LUT 4
#define LUT_CHUNK_PAIRS 256 /* each uint16 lane adds at most 120 per pair: 256 pairs stay below 2^15 */

/* Stored [pair][half][16] (byte = i0 | i1 << 4) -> [pair][parity][plane][16 channels]. */
static void lut_expand(const uint8_t* stored, int32_t pairs, uint8_t* out) {
  const uint8x16_t nibble = vdupq_n_u8(0x0F);
  for (int32_t gp = 0; gp < pairs; ++gp) {
    const uint8x16_t half0 = vld1q_u8(stored + 32 * gp), half1 = vld1q_u8(stored + 32 * gp + 16);
    const uint8x16_t even = vcombine_u8(vget_low_u8(half0), vget_low_u8(half1));
    const uint8x16_t odd = vcombine_u8(vget_high_u8(half0), vget_high_u8(half1));
    vst1q_u8(out + 64 * gp, vandq_u8(even, nibble));
    vst1q_u8(out + 64 * gp + 16, vshrq_n_u8(even, 4));
    vst1q_u8(out + 64 * gp + 32, vandq_u8(odd, nibble));
    vst1q_u8(out + 64 * gp + 48, vshrq_n_u8(odd, 4));
  }
}

/* Per group pair: the 16 subset sums of a[8gp..8gp+3], then those of a[8gp+4..8gp+7].
 * T[p] = L[p & 3] + H[p >> 2], L = (0, a0, a1, a0+a1), H = (0, a2, a3, a2+a3); index 0xFF
 * makes tbl write 0. */
static void lut_tables(const uint8_t* row, int32_t pairs, uint8_t* out) {
  static const uint8_t s1_bytes[16] = {0xFF, 0, 1, 0, 0xFF, 2, 3, 2, 0xFF, 4, 5, 4, 0xFF, 6, 7, 6};
  static const uint8_t s2_bytes[16] = {0xFF, 0xFF, 0xFF, 1, 0xFF, 0xFF, 0xFF, 3, 0xFF, 0xFF, 0xFF, 5, 0xFF, 0xFF, 0xFF, 7};
  static const uint8_t low_bytes[16] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3};
  static const uint8_t high_bytes[16] = {4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7};
  const uint8x16_t s1 = vld1q_u8(s1_bytes), s2 = vld1q_u8(s2_bytes);
  const uint8x16_t even_low = vld1q_u8(low_bytes), even_high = vld1q_u8(high_bytes), eight = vdupq_n_u8(8);
  const uint8x16_t odd_low = vaddq_u8(even_low, eight), odd_high = vaddq_u8(even_high, eight);
  for (int32_t gp = 0; gp < pairs; ++gp) {
    const uint8x16_t v = vcombine_u8(vld1_u8(row + 8 * gp), vdup_n_u8(0));
    const uint8x16_t lh = vaddq_u8(vqtbl1q_u8(v, s1), vqtbl1q_u8(v, s2));  // L, H of the even group, then of the odd
    vst1q_u8(out + 32 * gp, vaddq_u8(vqtbl1q_u8(lh, even_low), vqtbl1q_u8(lh, even_high)));
    vst1q_u8(out + 32 * gp + 16, vaddq_u8(vqtbl1q_u8(lh, odd_low), vqtbl1q_u8(lh, odd_high)));
  }
}

/* c[r][n] = sum_k a_r[k] * w[n][k] for 4 rows (their tables) and one 16-channel block. */
static void micro_lut(const uint8_t* const* tables, const uint8_t* index, int32_t pairs, int32_t* c) {
  for (int32_t g0 = 0; g0 < pairs; g0 += LUT_CHUNK_PAIRS) {
    const int32_t g1 = g0 + LUT_CHUNK_PAIRS < pairs ? g0 + LUT_CHUNK_PAIRS : pairs;
    uint16x8_t acc[MR_LUT][4];  // per row: plane 0 channels 0-7, 8-15; plane 1 channels 0-7, 8-15 (at most 240 per step)
    for (int r = 0; r < MR_LUT; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = vdupq_n_u16(0);
    // two group pairs per step (k_padded is a multiple of 16, so pairs and chunks are even):
    // four lookups of at most 60 stay within a byte before they are widened
    for (int32_t gp = g0; gp < g1; gp += 2) {
      const uint8_t* ix = index + 64 * gp;
      for (int plane = 0; plane < 2; ++plane) {  // one plane at a time: 4 index registers live, not 8
        const uint8x16_t e = vld1q_u8(ix + 16 * plane), o = vld1q_u8(ix + 32 + 16 * plane);
        const uint8x16_t f = vld1q_u8(ix + 64 + 16 * plane), q = vld1q_u8(ix + 96 + 16 * plane);
        for (int r = 0; r < MR_LUT; ++r) {
          const uint8_t* t = tables[r] + 32 * gp;
          const uint8x16_t sum = vaddq_u8(vaddq_u8(vqtbl1q_u8(vld1q_u8(t), e), vqtbl1q_u8(vld1q_u8(t + 16), o)),
                                          vaddq_u8(vqtbl1q_u8(vld1q_u8(t + 32), f), vqtbl1q_u8(vld1q_u8(t + 48), q)));
          acc[r][2 * plane] = vaddw_u8(acc[r][2 * plane], vget_low_u8(sum));
          acc[r][2 * plane + 1] = vaddw_high_u8(acc[r][2 * plane + 1], sum);
        }
      }
    }
    for (int r = 0; r < MR_LUT; ++r) {
      for (int h = 0; h < 2; ++h) {
        int32_t* out = c + r * NB_LUT + 8 * h;
        const uint16x8_t b0 = acc[r][h], b1 = acc[r][2 + h];
        int32x4_t lo = vsubq_s32(vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(b0))), vreinterpretq_s32_u32(vshll_n_u16(vget_low_u16(b1), 1)));
        int32x4_t hi = vsubq_s32(vreinterpretq_s32_u32(vmovl_high_u16(b0)), vreinterpretq_s32_u32(vshll_high_n_u16(b1, 1)));
        if (g0 > 0) {
          lo = vaddq_s32(lo, vld1q_s32(out));
          hi = vaddq_s32(hi, vld1q_s32(out + 4));
        }
        vst1q_s32(out, lo);
        vst1q_s32(out + 4, hi);
      }
    }
  }
}
#else
static void micro(const uint8_t* const* a, const int8_t* panel, int32_t k_padded, int32_t chunk, int32_t* c) {
  (void)chunk;
  micro_scalar(a, panel, k_padded, c);
}
#endif

/* Unpack one block's panel (nb * k_padded values) from the stored form, into this
 * thread's scratch memory (reused by the next block: no allocation per call). */
static int8_t* block_panel(const uint8_t* packed, int32_t block, int32_t nb, int32_t k_padded, int32_t bits, int32_t low) {
  const int64_t values = (int64_t)nb * k_padded;
  // 8-bit weights stored as two's complement bytes (low 0) are the panel already: no copy per call,
  // where they are aligned as the scratch panel is (the kernels use aligned vector loads)
  const uint8_t* stored = packed + block * values * bits / 8;
  if (bits == 8 && low == 0 && (uintptr_t)stored % 64 == 0) return (int8_t*)stored;
  int8_t* panel = (int8_t*)scratch(SCRATCH_PANEL, (size_t)values);
  if (panel) edgeq_unpack(stored, values, bits, low, panel);
  return panel;
}

#if defined(EDGEQ_HAS_AMX)
/* Below this many rows the 32-row tiles are partly padding and unpacking each block's panel costs more than the
 * products save (measured on Sapphire Rapids: 49 rows x 4608 x 512 ran 8% slower than VNNI, 196 rows 40% faster). */
#define AMX_MIN_ROWS 64

/* One block's panel for the AMX tiles: unpacked, zero-padded from k_padded to k64 along k. */
static const int8_t* amx_panel(const uint8_t* packed, int32_t block, int32_t k_padded, int32_t k64, int32_t bits, int32_t low) {
  const int64_t values = (int64_t)NB * k_padded;
  const uint8_t* stored = packed + block * values * bits / 8;
  if (bits == 8 && low == 0 && k64 == k_padded) return (const int8_t*)stored;  // tile loads need no alignment
  int8_t* panel = (int8_t*)scratch(SCRATCH_PANEL, (size_t)NB * k64);
  if (!panel) return NULL;
  edgeq_unpack(stored, values, bits, low, panel);
  memset(panel + values, 0, (size_t)NB * (size_t)(k64 - k_padded));
  return panel;
}

/* The A rows of the tile at row m: in place where the tiles' reads stay inside the m_count rows,
 * else copied with zero padding into this thread's scratch (the last tile or two of a layer). */
static const uint8_t* amx_rows(const uint8_t* rows, int64_t m, int64_t m_count, int32_t k_padded, int32_t k64, int64_t* lda) {
  if ((m + MR_AMX - 1) * k_padded + k64 <= m_count * k_padded) {
    *lda = k_padded;
    return rows + m * k_padded;
  }
  uint8_t* copy = (uint8_t*)scratch(SCRATCH_AMX_ROWS, (size_t)MR_AMX * k64);
  if (!copy) return NULL;
  memset(copy, 0, (size_t)MR_AMX * k64);
  for (int64_t r = 0; r < MR_AMX && m + r < m_count; ++r) memcpy(copy + r * k64, rows + (m + r) * k_padded, (size_t)k_padded);
  *lda = k64;
  return copy;
}
#endif

typedef struct {
  const float *multiplier, *bias, *residual;
  float *out_float, clamp_min, clamp_max, out_scale;
  uint8_t* out_codes;
  int32_t out_c, out_zero, out_qmin, out_qmax;
  const int32_t* correction; /* acc -= correction[n] (x_zero * sum_k w[n, k]); NULL: none */
  const int32_t *w_zero, *window_sums; /* acc -= w_zero[n] * window_sums[m]; NULL: symmetric weights */
  const float *fast_mult, *fast_bias;  /* codes = clamp(floor(acc * fast_mult[n] + fast_bias[n]), fast_lo, fast_hi); NULL: exact */
  int32_t fast_lo, fast_hi;
} epilogue_args;

/* The next layer's codes need rint(y / scale): QuantizeLinear divides. A vector division costs
 * more than the rest of the epilogue together (vdivps: one per 5 cycles for 8 lanes, 10 for
 * 16), so the vector loops multiply by the reciprocal and keep its rounding only where it must
 * agree with the division's: t = y * (1 / scale) and fl(y / scale) are both within
 * |y / scale| * 2^-23 of the true quotient, so they round alike unless it lies that close to a
 * half-integer. A lane of t within |t| * 2^-20 of one makes the vector divide (about one
 * vector in a thousand); the codes stay bit-exact. */
#define EDGEQ_TIE_SLACK 9.5367431640625e-07f /* 2^-20 */

#if defined(__AVX2__)
static inline __m256 rint_quotient8(__m256 y, __m256 scale, __m256 inverse) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 t = _mm256_mul_ps(y, inverse);
  const __m256 q = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 from_tie = _mm256_and_ps(_mm256_sub_ps(_mm256_and_ps(_mm256_sub_ps(t, q), magnitude), _mm256_set1_ps(0.5f)), magnitude);
  const __m256 near = _mm256_cmp_ps(from_tie, _mm256_mul_ps(_mm256_and_ps(t, magnitude), _mm256_set1_ps(EDGEQ_TIE_SLACK)), _CMP_LE_OQ);
  return _mm256_testz_ps(near, near) ? q : _mm256_round_ps(_mm256_div_ps(y, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#endif
#if defined(__AVX512F__)
static inline __m512 rint_quotient16(__m512 y, __m512 scale, __m512 inverse) {
  const __m512 t = _mm512_mul_ps(y, inverse);
  const __m512 q = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 from_tie = _mm512_abs_ps(_mm512_sub_ps(_mm512_abs_ps(_mm512_sub_ps(t, q)), _mm512_set1_ps(0.5f)));
  const __mmask16 near = _mm512_cmp_ps_mask(from_tie, _mm512_mul_ps(_mm512_abs_ps(t), _mm512_set1_ps(EDGEQ_TIE_SLACK)), _CMP_LE_OQ);
  return near ? _mm512_roundscale_ps(_mm512_div_ps(y, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC) : q;
}
#endif

/* codes[i] = clamp(rint(y[i] / scale) + zero, qmin, qmax), vectorized (QuantizeLinear's arithmetic). */
static void quantize_run(const float* y, int64_t len, float scale, float zero, float qmin, float qmax, uint8_t* codes) {
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 zscale = _mm512_set1_ps(scale), zinverse = _mm512_set1_ps(1.0f / scale), zzero = _mm512_set1_ps(zero);
  const __m512 zmin = _mm512_set1_ps(qmin), zmax = _mm512_set1_ps(qmax);
  for (; j + 16 <= len; j += 16) {
    __m512 q = rint_quotient16(_mm512_loadu_ps(y + j), zscale, zinverse);
    q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(q, zzero), zmin), zmax);
    _mm_storeu_si128((__m128i*)(codes + j), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)));
  }
#endif
#if defined(__AVX2__)
  const __m256 vscale = _mm256_set1_ps(scale), vinverse = _mm256_set1_ps(1.0f / scale), vzero = _mm256_set1_ps(zero);
  const __m256 vmin = _mm256_set1_ps(qmin), vmax = _mm256_set1_ps(qmax);
  for (; j + 8 <= len; j += 8) {
    __m256 q = rint_quotient8(_mm256_loadu_ps(y + j), vscale, vinverse);
    q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, vzero), vmin), vmax);
    const __m256i q32 = _mm256_cvtps_epi32(q);
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q32), _mm256_extracti128_si256(q32, 1));
    _mm_storel_epi64((__m128i*)(codes + j), _mm_packus_epi16(q16, q16));
  }
#elif defined(__aarch64__)
  const float32x4_t vscale = vdupq_n_f32(scale), vzero = vdupq_n_f32(zero), vmin = vdupq_n_f32(qmin), vmax = vdupq_n_f32(qmax);
  for (; j + 8 <= len; j += 8) {
    float32x4_t q0 = vaddq_f32(vrndnq_f32(vdivq_f32(vld1q_f32(y + j), vscale)), vzero);
    float32x4_t q1 = vaddq_f32(vrndnq_f32(vdivq_f32(vld1q_f32(y + j + 4), vscale)), vzero);
    q0 = vminq_f32(vmaxq_f32(q0, vmin), vmax);
    q1 = vminq_f32(vmaxq_f32(q1, vmin), vmax);
    const uint16x8_t q16 = vcombine_u16(vmovn_u32(vcvtq_u32_f32(q0)), vmovn_u32(vcvtq_u32_f32(q1)));
    vst1_u8(codes + j, vmovn_u16(q16));
  }
#endif
  for (; j < len; ++j) {
    float q = rintf(y[j] / scale) + zero;
    q = q < qmin ? qmin : (q > qmax ? qmax : q);
    codes[j] = (uint8_t)(int32_t)q;
  }
}


/* The requantization of a codes-only layer that the plan proved equal to the exact one below for
 * every accumulator the layer can produce (kernels/reference.py fast_requantization): one multiply,
 * one add and a rounding toward minus infinity, against the exact form's division-checked rounding. */
static inline __attribute__((always_inline)) void epilogue_fast(const epilogue_args* e, int64_t m, int32_t n0, int32_t count, const int32_t* raw,
                                                                 const int32_t* high) {
  const int64_t base = m * e->out_c + n0;
  const float* mult = e->fast_mult + n0;
  const float* bias = e->fast_bias + n0;
  uint8_t* codes = e->out_codes + base;
  const int32_t* correction = e->correction ? e->correction + n0 : NULL;
  int32_t j = 0;
#if defined(__AVX512F__)
  const __m512i zlo = _mm512_set1_epi32(e->fast_lo), zhi = _mm512_set1_epi32(e->fast_hi);
  for (; j + 16 <= count; j += 16) {
    __m512i acc = _mm512_loadu_si512((const void*)(raw + j));
    if (high) acc = _mm512_add_epi32(acc, _mm512_slli_epi32(_mm512_loadu_si512((const void*)(high + j)), 4));
    if (correction) acc = _mm512_sub_epi32(acc, _mm512_loadu_si512((const void*)(correction + j)));
    const __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_loadu_ps(mult + j)), _mm512_loadu_ps(bias + j));
    const __m512i q = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvt_roundps_epi32(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), zlo), zhi);
    _mm_storeu_si128((__m128i*)(codes + j), _mm512_cvtepi32_epi8(q));
  }
#endif
#if defined(__AVX2__)
  const __m256i vlo = _mm256_set1_epi32(e->fast_lo), vhi = _mm256_set1_epi32(e->fast_hi);
  for (; j + 8 <= count; j += 8) {
    __m256i acc = _mm256_loadu_si256((const __m256i*)(raw + j));
    if (high) acc = _mm256_add_epi32(acc, _mm256_slli_epi32(_mm256_loadu_si256((const __m256i*)(high + j)), 4));
    if (correction) acc = _mm256_sub_epi32(acc, _mm256_loadu_si256((const __m256i*)(correction + j)));
    const __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_loadu_ps(mult + j)), _mm256_loadu_ps(bias + j));
    const __m256i q = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_floor_ps(y)), vlo), vhi);
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64((__m128i*)(codes + j), _mm_packus_epi16(q16, q16));
  }
#elif defined(__aarch64__)
  const int32x4_t vlo = vdupq_n_s32(e->fast_lo), vhi = vdupq_n_s32(e->fast_hi);
  for (; j + 8 <= count; j += 8) {
    int32x4_t q[2];
    for (int h = 0; h < 2; ++h) {
      int32x4_t acc = vld1q_s32(raw + j + 4 * h);
      if (high) acc = vaddq_s32(acc, vshlq_n_s32(vld1q_s32(high + j + 4 * h), 4));
      if (correction) acc = vsubq_s32(acc, vld1q_s32(correction + j + 4 * h));
      const float32x4_t y = vaddq_f32(vmulq_f32(vcvtq_f32_s32(acc), vld1q_f32(mult + j + 4 * h)), vld1q_f32(bias + j + 4 * h));
      q[h] = vminq_s32(vmaxq_s32(vcvtmq_s32_f32(y), vlo), vhi);  // fcvtms: toward minus infinity
    }
    vst1_u8(codes + j, vmovn_u16(vcombine_u16(vmovn_u32(vreinterpretq_u32_s32(q[0])), vmovn_u32(vreinterpretq_u32_s32(q[1])))));
  }
#endif
  for (; j < count; ++j) {
    const int32_t acc = raw[j] + (high ? 16 * high[j] : 0) - (correction ? correction[j] : 0);
    int32_t q = (int32_t)floorf((float)acc * mult[j] + bias[j]);
    q = q < e->fast_lo ? e->fast_lo : (q > e->fast_hi ? e->fast_hi : q);
    codes[j] = (uint8_t)q;
  }
}

#if defined(__AVX2__)
/* Eight int32 sums to unclamped codes: floor((sum - correction) * m + b). */
static inline __attribute__((always_inline)) __m256i fast_code_lanes(__m256i sums, const int32_t* correction, const float* mult, const float* bias) {
  const __m256i acc = _mm256_sub_epi32(sums, _mm256_loadu_si256((const __m256i*)correction));
  const __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_loadu_ps(mult)), _mm256_loadu_ps(bias));
  return _mm256_cvtps_epi32(_mm256_floor_ps(y));
}

/* 32 channels' int32 sums (four vectors of 8, in channel order) to clamped codes with the fast
 * requantization, the same arithmetic as epilogue_fast (acc = sum - correction, floor(acc * m + b), clamp,
 * bytes) with four vectors packed to bytes at once. The int32 -> int16 -> uint8 saturations keep order and
 * the bounds are codes (0 <= lo <= hi <= 255), so the clamp on bytes equals epilogue_fast's on int32. */
static inline __attribute__((always_inline)) __m256i fast_codes32(const __m256i sums[4], const int32_t* correction, const float* mult,
                                                                  const float* bias, __m256i lo, __m256i hi) {
  __m256i q[4];
  for (int v = 0; v < 4; ++v) q[v] = fast_code_lanes(sums[v], correction + 8 * v, mult + 8 * v, bias + 8 * v);
  const __m256i bytes = _mm256_packus_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  const __m256i in_order = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  return _mm256_min_epu8(_mm256_max_epu8(in_order, lo), hi);
}

/* The same for 16 channels (two vectors of 8). */
static inline __attribute__((always_inline)) __m128i fast_codes16(const __m256i sums[2], const int32_t* correction, const float* mult,
                                                                  const float* bias, __m128i lo, __m128i hi) {
  __m256i q[2];
  for (int v = 0; v < 2; ++v) q[v] = fast_code_lanes(sums[v], correction + 8 * v, mult + 8 * v, bias + 8 * v);
  const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);  // 16 int16 in channel order
  const __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
  return _mm_min_epu8(_mm_max_epu8(bytes, lo), hi);
}

/* A whole 4-row x 32-channel tile of a codes-only layer with the fast requantization whose k fits one int16
 * chunk: the epilogue straight from the sum registers, without the int32 tile stored and read back. Where k
 * is short (MobileNetV2's 16- and 24-channel expansions) the epilogue was as much of the layer as the
 * products: 0.62 -> 0.45 ms for the 112x112 16 -> 96 one. */
#define EDGEQ_HAS_FUSED_FAST 1
static void micro_fast_codes(const uint8_t* const* a, const int8_t* panel, int32_t k_padded, const epilogue_args* e, int64_t m, int32_t n0) {
  __m256i rows[MR][2];
  chunk_sums(a, panel, 0, k_padded, rows);
  const __m256i blo = _mm256_set1_epi8((char)e->fast_lo), bhi = _mm256_set1_epi8((char)e->fast_hi);
  for (int r = 0; r < MR; ++r) {
    const __m256i sums[4] = {_mm256_cvtepi16_epi32(_mm256_castsi256_si128(rows[r][0])), _mm256_cvtepi16_epi32(_mm256_extracti128_si256(rows[r][0], 1)),
                             _mm256_cvtepi16_epi32(_mm256_castsi256_si128(rows[r][1])), _mm256_cvtepi16_epi32(_mm256_extracti128_si256(rows[r][1], 1))};
    _mm256_storeu_si256((__m256i*)(e->out_codes + (m + r) * e->out_c + n0),
                        fast_codes32(sums, e->correction + n0, e->fast_mult + n0, e->fast_bias + n0, blo, bhi));
  }
}
/* A block's last 16 channels or fewer (MobileNetV2's 32 -> 16 projection; a 32-wide tile would be half
 * zeros): 8 rows x 16 channels, the panel's first 16 channels of each k-pair (its other 16 are zero
 * padding), same fused requantization. A tile of fewer than 16 channels writes only its `count` bytes. */
enum { MR_HALF = 8 };
static void micro_fast_codes_half(const uint8_t* const* a, const int8_t* panel, int32_t k_padded, const epilogue_args* e, int64_t m, int32_t n0,
                                  int32_t count) {
  __m256i sum[MR_HALF];
  for (int r = 0; r < MR_HALF; ++r) sum[r] = _mm256_setzero_si256();
  for (int32_t k = 0; k < k_padded; k += 2) {
    const __m256i w0 = _mm256_load_si256((const __m256i*)(panel + (int64_t)k * NB));
    for (int r = 0; r < MR_HALF; ++r) sum[r] = _mm256_add_epi16(sum[r], _mm256_maddubs_epi16(_mm256_set1_epi16(*(const int16_t*)(a[r] + k)), w0));
  }
  const __m128i blo = _mm_set1_epi8((char)e->fast_lo), bhi = _mm_set1_epi8((char)e->fast_hi);
  for (int r = 0; r < MR_HALF; ++r) {
    const __m256i sums[2] = {_mm256_cvtepi16_epi32(_mm256_castsi256_si128(sum[r])), _mm256_cvtepi16_epi32(_mm256_extracti128_si256(sum[r], 1))};
    const __m128i codes = fast_codes16(sums, e->correction + n0, e->fast_mult + n0, e->fast_bias + n0, blo, bhi);
    uint8_t* out = e->out_codes + (m + r) * e->out_c + n0;
    if (count == 16) {
      _mm_storeu_si128((__m128i*)out, codes);
    } else {
      uint8_t bytes[16];
      _mm_storeu_si128((__m128i*)bytes, codes);
      memcpy(out, bytes, (size_t)count);
    }
  }
}
#endif

/* From raw products to outputs, for `count` channels from n0 of output pixel m:
 * acc = raw + 16 * high (nibble planes) - x_zero * wsum[n] (precomputed), then the float epilogue of
 * edgeq_kernels.h. On AVX2 eight channels go through it in registers; the scalar loop
 * (also the tail) is the same arithmetic, multiply and add rounded separately as the QDQ
 * graph does (no FMA contraction under -std=c11). */
static inline void epilogue_exact(const epilogue_args* e, int64_t m, int32_t n0, int32_t count, const int32_t* raw, const int32_t* high);

/* Weight zero points: acc -= w_zero[n] * window_sums[m], applied to the raw sums in a pass of their own
 * (the epilogues' vector loops stay as they are without zero points). */
static __attribute__((noinline)) void epilogue_zero_points(const epilogue_args* e, int64_t m, int32_t n0, int32_t count, const int32_t* raw,
                                                           const int32_t* high) {
  enum { CHUNK = 64 };
  int32_t adjusted[CHUNK];
  const int32_t window = e->window_sums[m];
  for (int32_t c0 = 0; c0 < count; c0 += CHUNK) {
    const int32_t len = count - c0 < CHUNK ? count - c0 : CHUNK;
    for (int32_t j = 0; j < len; ++j) adjusted[j] = raw[c0 + j] - e->w_zero[n0 + c0 + j] * window;
    if (e->fast_mult)
      epilogue_fast(e, m, n0 + c0, len, adjusted, high ? high + c0 : NULL);
    else
      epilogue_exact(e, m, n0 + c0, len, adjusted, high ? high + c0 : NULL);
  }
}

/* The fast requantization inline in the product loops (a call per row and block of channels cost as
 * much as its few instructions), the exact one as before. */
static inline void epilogue(const epilogue_args* e, int64_t m, int32_t n0, int32_t count, const int32_t* raw, const int32_t* high) {
  if (e->w_zero)
    epilogue_zero_points(e, m, n0, count, raw, high);
  else if (e->fast_mult)
    epilogue_fast(e, m, n0, count, raw, high);
  else
    epilogue_exact(e, m, n0, count, raw, high);
}

static inline void epilogue_exact(const epilogue_args* e, int64_t m, int32_t n0, int32_t count, const int32_t* raw, const int32_t* high) {
  const int64_t base = m * e->out_c + n0;
  const float* mult = e->multiplier + n0;
  const float* bias = e->bias + n0;
  const float* res = e->residual ? e->residual + base : NULL;
  float* out_float = e->out_float ? e->out_float + base : NULL;
  uint8_t* codes = e->out_codes ? e->out_codes + base : NULL;
  const int32_t* correction = e->correction ? e->correction + n0 : NULL;
  const float lo = e->clamp_min, hi = e->clamp_max, scale = e->out_scale;
  const float zero = (float)e->out_zero, qmin = (float)e->out_qmin, qmax = (float)e->out_qmax;
  int32_t j = 0;
#if defined(__AVX512F__)
  /* sixteen channels at a time where the build has AVX-512: the same operations in the same order */
  const __m512 zlo = _mm512_set1_ps(lo), zhi = _mm512_set1_ps(hi), zscale = _mm512_set1_ps(scale), zzero = _mm512_set1_ps(zero);
  const __m512 zqmin = _mm512_set1_ps(qmin), zqmax = _mm512_set1_ps(qmax);
  const __m512 zinverse = _mm512_set1_ps(1.0f / scale);
  for (; j + 16 <= count; j += 16) {
    __m512i acc = _mm512_loadu_si512((const void*)(raw + j));
    if (high) acc = _mm512_add_epi32(acc, _mm512_slli_epi32(_mm512_loadu_si512((const void*)(high + j)), 4));
    if (correction) acc = _mm512_sub_epi32(acc, _mm512_loadu_si512((const void*)(correction + j)));
    __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_loadu_ps(mult + j)), _mm512_loadu_ps(bias + j));
    if (res) y = _mm512_add_ps(y, _mm512_loadu_ps(res + j));
    y = _mm512_min_ps(_mm512_max_ps(y, zlo), zhi);
    if (out_float) _mm512_storeu_ps(out_float + j, y);
    if (codes) {
      __m512 q = rint_quotient16(y, zscale, zinverse);
      q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(q, zzero), zqmin), zqmax);
      _mm_storeu_si128((__m128i*)(codes + j), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)));  // in [0, 255]: no saturation
    }
  }
#endif
#if defined(__AVX2__)
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi), vscale = _mm256_set1_ps(scale), vzero = _mm256_set1_ps(zero);
  const __m256 vqmin = _mm256_set1_ps(qmin), vqmax = _mm256_set1_ps(qmax);
  const __m256 vinverse = _mm256_set1_ps(1.0f / scale);
  for (; j + 8 <= count; j += 8) {
    __m256i acc = _mm256_loadu_si256((const __m256i*)(raw + j));
    if (high) acc = _mm256_add_epi32(acc, _mm256_slli_epi32(_mm256_loadu_si256((const __m256i*)(high + j)), 4));
    if (correction) acc = _mm256_sub_epi32(acc, _mm256_loadu_si256((const __m256i*)(correction + j)));
    __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_loadu_ps(mult + j)), _mm256_loadu_ps(bias + j));
    if (res) y = _mm256_add_ps(y, _mm256_loadu_ps(res + j));
    y = _mm256_min_ps(_mm256_max_ps(y, vlo), vhi);
    if (out_float) _mm256_storeu_ps(out_float + j, y);
    if (codes) {
      __m256 q = rint_quotient8(y, vscale, vinverse);
      q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, vzero), vqmin), vqmax);
      const __m256i q32 = _mm256_cvtps_epi32(q);
      const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q32), _mm256_extracti128_si256(q32, 1));
      _mm_storel_epi64((__m128i*)(codes + j), _mm_packus_epi16(q16, q16));
    }
  }
#elif defined(__aarch64__)
  /* the scalar loop's operations in its order, four lanes at a time (vrndnq: half to even, as rintf) */
  const float32x4_t vlo = vdupq_n_f32(lo), vhi = vdupq_n_f32(hi), vscale = vdupq_n_f32(scale), vzero = vdupq_n_f32(zero);
  const float32x4_t vqmin = vdupq_n_f32(qmin), vqmax = vdupq_n_f32(qmax);
  for (; j + 8 <= count; j += 8) {
    float32x4_t y[2];
    for (int h = 0; h < 2; ++h) {
      int32x4_t acc = vld1q_s32(raw + j + 4 * h);
      if (high) acc = vaddq_s32(acc, vshlq_n_s32(vld1q_s32(high + j + 4 * h), 4));
      if (correction) acc = vsubq_s32(acc, vld1q_s32(correction + j + 4 * h));
      float32x4_t v = vaddq_f32(vmulq_f32(vcvtq_f32_s32(acc), vld1q_f32(mult + j + 4 * h)), vld1q_f32(bias + j + 4 * h));
      if (res) v = vaddq_f32(v, vld1q_f32(res + j + 4 * h));
      v = vminq_f32(vmaxq_f32(v, vlo), vhi);
      if (out_float) vst1q_f32(out_float + j + 4 * h, v);
      y[h] = v;
    }
    if (codes) {
      const float32x4_t q0 = vminq_f32(vmaxq_f32(vaddq_f32(vrndnq_f32(vdivq_f32(y[0], vscale)), vzero), vqmin), vqmax);
      const float32x4_t q1 = vminq_f32(vmaxq_f32(vaddq_f32(vrndnq_f32(vdivq_f32(y[1], vscale)), vzero), vqmin), vqmax);
      vst1_u8(codes + j, vmovn_u16(vcombine_u16(vmovn_u32(vcvtq_u32_f32(q0)), vmovn_u32(vcvtq_u32_f32(q1)))));
    }
  }
#endif
  for (; j < count; ++j) {
    int32_t acc = raw[j] + (high ? 16 * high[j] : 0) - (correction ? correction[j] : 0);
    float y = (float)acc * mult[j] + bias[j];
    if (res) y += res[j];
    y = y < lo ? lo : (y > hi ? hi : y);
    if (out_float) out_float[j] = y;
    if (codes) {
      float q = rintf(y / scale) + zero;
      q = q < qmin ? qmin : (q > qmax ? qmax : q);
      codes[j] = (uint8_t)(int32_t)q;
    }
  }
}

/* The epilogue of a layer whose only output is the next layer's codes (no residual, no float
 * tensor, no nibble planes), the most common case: the same function with those arguments
 * constant, so the compiler drops their branches from the vector loop. */
static inline void epilogue_codes(const epilogue_args* e, int64_t m, int32_t n0, int32_t count, const int32_t* raw) {
  if (e->w_zero || e->fast_mult) {
    epilogue(e, m, n0, count, raw, NULL);
    return;
  }
  const epilogue_args codes_only = {e->multiplier, e->bias, NULL, NULL, e->clamp_min, e->clamp_max, e->out_scale, e->out_codes, e->out_c,
                                    e->out_zero, e->out_qmin, e->out_qmax, e->correction};
  epilogue_exact(&codes_only, m, n0, count, raw, NULL);
}

/* Rows of codes, k_padded wide: the receptive field of each output pixel (im2col), padded
 * spatially with the zero point and along k with zeros; one plane per nibble when split. */
static void im2col(const edgeq_conv_params* p, const uint8_t* x, int split, uint8_t* rows) {
  const int32_t in_h = p->in_h, in_w = p->in_w, in_c = p->in_c, out_w = p->out_w, kernel_h = p->kernel_h, kernel_w = p->kernel_w;
  const int32_t stride_h = p->stride_h, stride_w = p->stride_w, pad_top = p->pad_top, pad_left = p->pad_left, k_padded = p->k_padded;
  const uint8_t x_zero = (uint8_t)p->x_zero;
  const int64_t m_count = (int64_t)p->out_h * out_w;
  const int64_t plane = m_count * k_padded;
  const int32_t k = kernel_h * kernel_w * in_c, span = kernel_w * in_c;
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < m_count; ++m) {
    const int32_t oh = (int32_t)(m / out_w), ow = (int32_t)(m % out_w);
    const int32_t iw0 = ow * stride_w - pad_left;
    uint8_t* row = rows + m * k_padded;
    for (int32_t kh = 0; kh < kernel_h; ++kh) {
      const int32_t ih = oh * stride_h - pad_top + kh;
      uint8_t* dst = row + kh * span;
      if (ih < 0 || ih >= in_h) {
        memset(dst, x_zero, (size_t)span);
      } else if (iw0 >= 0 && iw0 + kernel_w <= in_w) {
        memcpy(dst, x + ((int64_t)ih * in_w + iw0) * in_c, (size_t)span);  // NHWC: a kernel row is contiguous
      } else {
        for (int32_t kw = 0; kw < kernel_w; ++kw) {
          const int32_t iw = iw0 + kw;
          if (iw < 0 || iw >= in_w)
            memset(dst + kw * in_c, x_zero, (size_t)in_c);
          else
            memcpy(dst + kw * in_c, x + ((int64_t)ih * in_w + iw) * in_c, (size_t)in_c);
        }
      }
    }
    memset(row + k, 0, (size_t)(k_padded - k));
    if (split) {
      uint8_t* high = rows + plane + m * k_padded;
      for (int32_t i = 0; i < k_padded; ++i) {
        high[i] = row[i] >> 4;
        row[i] &= 15;
      }
    }
  }
}

/* The input with its border: hp rows of wp pixels, input pixel (ph - pad_top, pw - pad_left)
 * where it exists and the zero point elsewhere (the padding, and past the input's edge where the
 * tiles reach further). */
static void pad_input(const edgeq_conv_params* p, const uint8_t* x, int32_t hp, int32_t wp, uint8_t* padded) {
  const int32_t c = p->in_c;
  for (int32_t ph = 0; ph < hp; ++ph) {
    uint8_t* row = padded + (int64_t)ph * wp * c;
    const int32_t ih = ph - p->pad_top;
    const int32_t left = ih < 0 || ih >= p->in_h ? wp : (p->pad_left < wp ? p->pad_left : wp);
    const int32_t inside = left == wp ? 0 : (p->in_w < wp - left ? p->in_w : wp - left);
    memset(row, p->x_zero, (size_t)left * c);
    if (inside) memcpy(row + (int64_t)left * c, x + (int64_t)ih * p->in_w * c, (size_t)inside * c);
    memset(row + (int64_t)(left + inside) * c, p->x_zero, (size_t)(wp - left - inside) * c);
  }
}

/* Implicit GEMM (no im2col): a convolution row's receptive field is kernel_h runs of
 * kernel_w * in_c contiguous codes in NHWC, so the microkernels read them in place through
 * their row pointers, kernel row by kernel row, against the matching slice of the panel:
 *
 *   padded input (wp pixels a row, in_c codes a pixel), output pixel (oh, ow), tap row kh:
 *     base = ((oh * stride_h + kh) * wp + ow * stride_w) * in_c
 *     codes base .. base + kernel_w * in_c  <->  panel k = kh * kernel_w * in_c ...
 *
 * Where the convolution pads, the input is copied once with its border (the zero point),
 * about its own size, where im2col writes kernel_h * kernel_w / stride^2 times it. */
typedef struct {
  const uint8_t* x; /* the input, or its padded copy */
  int64_t row_stride; /* codes from one padded input row to the next */
  int32_t out_w, stride_h, stride_w, in_c, kernel_h, span;
} implicit_input;

static int implicit_prepare(const edgeq_conv_params* p, const uint8_t* x, implicit_input* g) {
  const int32_t c = p->in_c;
  const int32_t hp = (p->out_h - 1) * p->stride_h + p->kernel_h, wp = (p->out_w - 1) * p->stride_w + p->kernel_w;
  g->out_w = p->out_w, g->stride_h = p->stride_h, g->stride_w = p->stride_w, g->in_c = c, g->kernel_h = p->kernel_h;
  g->span = p->kernel_w * c;
  if (p->pad_top == 0 && p->pad_left == 0 && hp <= p->in_h && wp <= p->in_w) {
    g->x = x;
    g->row_stride = (int64_t)p->in_w * c;
    return 0;
  }
  uint8_t* padded = (uint8_t*)scratch(SCRATCH_ROWS, (size_t)hp * (size_t)wp * (size_t)c);
  if (!padded) return -2;
  pad_input(p, x, hp, wp, padded);
  g->x = padded;
  g->row_stride = (int64_t)wp * c;
  return 0;
}

/* Where output pixel m's receptive field starts in the (padded) input. */
static inline const uint8_t* implicit_row(const implicit_input* g, int64_t m) {
  const int64_t oh = m / g->out_w, ow = m - oh * g->out_w;
  return g->x + oh * g->stride_h * g->row_stride + ow * g->stride_w * g->in_c;
}

/* sum_k rows[m] * w for all m and one block: raw int32 products, MR rows at a time. */
static void block_product(const uint8_t* rows, int64_t m_count, int32_t lda, const int8_t* panel, int32_t k_padded, int32_t chunk, int64_t m,
                          int32_t* tile) {
  const uint8_t* a[MR];
  for (int r = 0; r < MR; ++r) a[r] = rows + (m + r < m_count ? m + r : m_count - 1) * lda;
  micro(a, panel, k_padded, chunk, tile);
}

#if defined(EDGEQ_HAS_LUT)
/* Products through the table-lookup kernel for all rows and channels: to the epilogue
 * when `e` is given, else raw sums into out (m x n). Rows are 4-bit codes, k_padded wide. */
static int lut_products(const uint8_t* rows, int64_t m_count, int32_t k_padded, const uint8_t* packed, int32_t n, const epilogue_args* e, int32_t* out) {
  const int32_t pairs = k_padded / 8, blocks = (n + NB_LUT - 1) / NB_LUT;
  uint8_t* index = (uint8_t*)scratch(SCRATCH_LUT_INDEX, (size_t)blocks * (size_t)pairs * 64);
  if (!index) return -2;
  for (int32_t b = 0; b < blocks; ++b) lut_expand(packed + (int64_t)b * pairs * 32, pairs, index + (int64_t)b * pairs * 64);
  // channel groups whose indices stay in L2 while every row tile runs over them (tables rebuilt per group)
  int32_t group_blocks = (int32_t)((256 * 1024) / ((int64_t)pairs * 64));
  group_blocks = group_blocks < 1 ? 1 : (group_blocks > blocks ? blocks : group_blocks);
  int status = 0;
  for (int32_t b0 = 0; b0 < blocks; b0 += group_blocks) {
    const int32_t b1 = b0 + group_blocks < blocks ? b0 + group_blocks : blocks;
#pragma omp parallel for schedule(dynamic, 4) reduction(min : status)
    for (int64_t m = 0; m < m_count; m += MR_LUT) {
      uint8_t* tables = (uint8_t*)scratch(SCRATCH_LUT_TABLES, (size_t)MR_LUT * (size_t)pairs * 32);
      if (!tables) {
        status = -2;
        continue;
      }
      const uint8_t* t[MR_LUT];
      for (int r = 0; r < MR_LUT; ++r) {
        t[r] = tables + (int64_t)r * pairs * 32;
        lut_tables(rows + (m + r < m_count ? m + r : m_count - 1) * k_padded, pairs, tables + (int64_t)r * pairs * 32);
      }
      for (int32_t b = b0; b < b1; ++b) {
        int32_t tile[MR_LUT * NB_LUT];
        micro_lut(t, index + (int64_t)b * pairs * 64, pairs, tile);
        const int32_t n0 = b * NB_LUT, count = n - n0 < NB_LUT ? n - n0 : NB_LUT;
        for (int r = 0; r < MR_LUT && m + r < m_count; ++r) {
          if (e)
            epilogue(e, m + r, n0, count, tile + r * NB_LUT, NULL);
          else
            memcpy(out + (m + r) * n + n0, tile + r * NB_LUT, sizeof(int32_t) * (size_t)count);
        }
      }
    }
  }
  return status;
}
#endif

#if defined(EDGEQ_HAS_AMX)
/* A stride-1 convolution with a multiple of 64 input channels on AMX tiles, without im2col
 * (micro_amx_taps): the input is copied once with its padding (the zero point), 1.x times its
 * size where im2col writes kernel_h * kernel_w times it. */
static int amx_implicit_conv(const edgeq_conv_params* p, const uint8_t* x, const uint8_t* packed_weights, const epilogue_args* e, int codes_only) {
  const int32_t c = p->in_c, wp = p->out_w + p->kernel_w - 1, hp = p->out_h + p->kernel_h - 1;
  const int64_t virtual_rows = (int64_t)p->out_h * wp;
  // every tile's reads, the last one's 31 rows past the end and the taps' reach included
  const int64_t padded_pixels = virtual_rows + (int64_t)(p->kernel_h - 1) * wp + p->kernel_w - 1 + MR_AMX;
  uint8_t* padded = (uint8_t*)scratch(SCRATCH_ROWS, (size_t)(padded_pixels * c));
  if (!padded) return -2;
  pad_input(p, x, hp, wp, padded);
  memset(padded + (int64_t)hp * wp * c, p->x_zero, (size_t)((padded_pixels - (int64_t)hp * wp) * c));
  const int32_t blocks = (p->out_c + NB - 1) / NB;
  const int64_t tiles = (virtual_rows + MR_AMX - 1) / MR_AMX;
  const int64_t parts = row_parts(blocks, tiles);
  const int64_t tiles_per_part = (tiles + parts - 1) / parts;
  int status = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(min : status)
  for (int64_t item = 0; item < (int64_t)blocks * parts; ++item) {
    const int32_t b = (int32_t)(item / parts);
    const int64_t j_begin = (item % parts) * tiles_per_part * MR_AMX;
    const int64_t j_end = j_begin + tiles_per_part * MR_AMX < virtual_rows ? j_begin + tiles_per_part * MR_AMX : virtual_rows;
    const int8_t* panel = amx_panel(packed_weights, b, p->k_padded, p->k_padded, p->w_bits, p->w_low);
    if (!panel) {
      status = -2;
      continue;
    }
    const int32_t n0 = b * NB, count = p->out_c - n0 < NB ? p->out_c - n0 : NB;
    amx_begin();
    for (int64_t j0 = j_begin; j0 < j_end; j0 += MR_AMX) {
      int32_t tile[MR_AMX * NB];
      micro_amx_taps(padded + j0 * c, c, wp, p->kernel_h, p->kernel_w, panel, tile);
      for (int r = 0; r < MR_AMX && j0 + r < j_end; ++r) {
        const int64_t oh = (j0 + r) / wp, ow = (j0 + r) - oh * wp;
        if (ow >= p->out_w) continue;  // a virtual row off the right edge
        if (codes_only)
          epilogue_codes(e, oh * p->out_w + ow, n0, count, tile + r * NB);
        else
          epilogue(e, oh * p->out_w + ow, n0, count, tile + r * NB, NULL);
      }
    }
    amx_end();
  }
  return status;
}
#endif

#if defined(EDGEQ_HAS_WIDE)
/* 8-bit inputs on AVX2 (first layers: 3 input channels, 7x7 or 16x16 kernels) without im2col:
 * the input is widened to uint16 once, with its padding, and each tile reads its kernel rows
 * in place (micro_wide_taps). A kernel row's kernel_w * in_c codes (21 for RGB 7x7) are read
 * as tap_k = that rounded up to even, the extra code meeting a zero weight; the panel is
 * rebuilt per block in that order, sign-extended to int16 once instead of per tile:
 *
 *   panel16 [t][j/2][16 channels][2]  =  weight k = t * kernel_w * in_c + j  (0 for j >= kernel_w * in_c)
 */
static int wide_conv_in_place(const edgeq_conv_params* p, const uint8_t* x, const uint8_t* packed_weights, const epilogue_args* e, int codes_only) {
  const int32_t c = p->in_c, span = p->kernel_w * c, tap_k = (span + 1) / 2 * 2;
  const int32_t hp = (p->out_h - 1) * p->stride_h + p->kernel_h, wp = (p->out_w - 1) * p->stride_w + p->kernel_w;
  const int64_t padded_count = (int64_t)hp * wp * c + (tap_k - span);
  uint16_t* padded = (uint16_t*)scratch(SCRATCH_WIDE, sizeof(uint16_t) * (size_t)padded_count);
  if (!padded) return -2;
  const uint16_t zero = (uint16_t)p->x_zero;
#pragma omp parallel for schedule(static)
  for (int32_t ph = 0; ph < hp; ++ph) {
    uint16_t* row = padded + (int64_t)ph * wp * c;
    const int32_t ih = ph - p->pad_top;
    const int32_t left = ih < 0 || ih >= p->in_h ? wp : (p->pad_left < wp ? p->pad_left : wp);
    const int32_t inside = left == wp ? 0 : (p->in_w < wp - left ? p->in_w : wp - left);
    const uint8_t* source = inside ? x + (int64_t)ih * p->in_w * c : x;
    for (int64_t i = 0; i < (int64_t)left * c; ++i) row[i] = zero;
    for (int64_t i = 0; i < (int64_t)inside * c; ++i) row[(int64_t)left * c + i] = source[i];
    for (int64_t i = (int64_t)(left + inside) * c; i < (int64_t)wp * c; ++i) row[i] = zero;
  }
  for (int64_t i = (int64_t)hp * wp * c; i < padded_count; ++i) padded[i] = zero;
  const int64_t m_count = (int64_t)p->out_h * p->out_w, row_stride = (int64_t)wp * c;
  const int32_t blocks = (p->out_c + NB_WIDE - 1) / NB_WIDE;
  const int64_t tiles = (m_count + 3) / 4;
  const int64_t parts = row_parts(blocks, tiles);
  const int64_t tiles_per_part = (tiles + parts - 1) / parts;
  int status = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(min : status)
  for (int64_t item = 0; item < (int64_t)blocks * parts; ++item) {
    const int32_t b = (int32_t)(item / parts);
    const int64_t m_begin = (item % parts) * tiles_per_part * 4;
    const int64_t m_end = m_begin + tiles_per_part * 4 < m_count ? m_begin + tiles_per_part * 4 : m_count;
    const int8_t* panel = block_panel(packed_weights, b, NB_WIDE, p->k_padded, p->w_bits, p->w_low);
    int16_t* panel16 = (int16_t*)scratch(SCRATCH_WIDE_PANEL, sizeof(int16_t) * (size_t)p->kernel_h * (size_t)tap_k * NB_WIDE);
    if (!panel || !panel16) {
      status = -2;
      continue;
    }
    if (tap_k == span) {  // k pairs never straddle kernel rows: the panel's own order, sign-extended
      const int64_t values = (int64_t)p->kernel_h * span * NB_WIDE;
      for (int64_t i = 0; i < values; ++i) panel16[i] = panel[i];
    } else
      for (int32_t t = 0; t < p->kernel_h; ++t)
        for (int32_t j = 0; j < tap_k; ++j) {
          const int64_t k = (int64_t)t * span + j, to = ((int64_t)t * tap_k + j) / 2 * 2 * NB_WIDE + j % 2;
          for (int32_t n = 0; n < NB_WIDE; ++n) panel16[to + 2 * n] = j < span ? panel[k / 2 * 2 * NB_WIDE + 2 * n + k % 2] : 0;
        }
    const int32_t n0 = b * NB_WIDE, count = p->out_c - n0 < NB_WIDE ? p->out_c - n0 : NB_WIDE;
    for (int64_t m = m_begin; m < m_end; m += 4) {
      int32_t tile[4 * NB_WIDE];
      const uint16_t* a[4];
      for (int r = 0; r < 4; ++r) {
        const int64_t row = m + r < m_count ? m + r : m_count - 1, oh = row / p->out_w, ow = row - oh * p->out_w;
        a[r] = padded + oh * p->stride_h * row_stride + ow * p->stride_w * c;
      }
      micro_wide_taps(a, row_stride, p->kernel_h, tap_k, panel16, tile);
      for (int r = 0; r < 4 && m + r < m_end; ++r) {
        if (codes_only)
          epilogue_codes(e, m + r, n0, count, tile + r * NB_WIDE);
        else
          epilogue(e, m + r, n0, count, tile + r * NB_WIDE, NULL);
      }
    }
  }
  return status;
}
#endif

/* Winograd F(2x2, 3x3) over 4-bit codes, exact in integers (Lavin & Gray 2016): a 2x2 block of
 * outputs from a 4x4 tile d of the (padded) input in 16 products instead of 36,
 *
 *   4 Y = A^T [ U  (.)  V ] A,   U = (2G) w (2G)^T (the plan's, per position and channel pair),
 *                                V = B^T d B,
 *
 *   B^T = | 1  0 -1  0 |   2G = | 2  0  0 |   A^T = | 1  1  1  0 |
 *         | 0  1  1  0 |        | 1  1  1 |         | 0  1 -1 -1 |
 *         | 0 -1  1  0 |        | 1 -1  1 |
 *         | 0  1 -1  0 |  (row 3: 0 1 0 -1)  | 0  0  2 |
 *
 * Every step is an integer sum, so 4 Y is exactly four times the convolution and the shift by
 * 2 is exact. With codes in [0, 15], V lies in [-30, 60]; V + 30 in [0, 90] is the u8 operand of
 * vpmaddubsw, and what the offset adds, A^T (30 sum_c U) A per output of the 2x2 block and channel,
 * is the plan's (offsets[q * out_c + n]), subtracted before the shift. Per position the
 * products are a GEMM over tiles x channels with U's panel (8-bit, the build's own layout),
 * run by micro() with int16 sums over chunks of p->winograd codes, which the plan proved cannot
 * wrap (90 * sum |U| <= 32767 over every chunk, position and channel). Tiles go in blocks of
 * WINOGRAD_TILES: their V (16 x tiles x k_padded bytes) and M (16 x tiles x 32 int32) stay in L2. */
#define EDGEQ_HAS_WINOGRAD 1
#define WINOGRAD_TILES (MR * (32 / MR)) /* whole microkernel tiles: 32 rows, 30 on the portable build */

/* GCC's generic vectors where the build has no AVX2 code for the transforms: NEON registers on Arm */
typedef int16_t winograd_i16x8 __attribute__((vector_size(16)));
typedef uint8_t winograd_u8x8 __attribute__((vector_size(8)));
typedef int32_t winograd_i32x4 __attribute__((vector_size(16)));
#define WINOGRAD_OFFSET 30

static void winograd_input(const uint8_t* d, int64_t wp, int32_t c, int32_t k_padded, uint8_t* v, int64_t position_stride) {
  const int64_t row = wp * c;
  int32_t ch = 0;
#if defined(__AVX2__)
  const __m256i offset = _mm256_set1_epi16(WINOGRAD_OFFSET);
  for (; ch + 16 <= c; ch += 16) {  // sixteen channels in int16 lanes
    __m256i t[4][4];
    for (int j = 0; j < 4; ++j) {
#define EDGEQ_LOAD(i) _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(d + (i) * row + j * c + ch)))
      const __m256i d0 = EDGEQ_LOAD(0), d1 = EDGEQ_LOAD(1), d2 = EDGEQ_LOAD(2), d3 = EDGEQ_LOAD(3);
#undef EDGEQ_LOAD
      t[0][j] = _mm256_sub_epi16(d0, d2), t[1][j] = _mm256_add_epi16(d1, d2);
      t[2][j] = _mm256_sub_epi16(d2, d1), t[3][j] = _mm256_sub_epi16(d1, d3);
    }
    for (int i = 0; i < 4; ++i) {
      const __m256i out[4] = {_mm256_sub_epi16(t[i][0], t[i][2]), _mm256_add_epi16(t[i][1], t[i][2]), _mm256_sub_epi16(t[i][2], t[i][1]),
                              _mm256_sub_epi16(t[i][1], t[i][3])};
      for (int j = 0; j < 4; ++j) {
        const __m256i q = _mm256_add_epi16(out[j], offset);
        _mm_storeu_si128((__m128i*)(v + (4 * i + j) * position_stride + ch),
                         _mm_packus_epi16(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
      }
    }
  }
#else
  for (; ch + 8 <= c; ch += 8) {  // eight channels in int16 lanes
    winograd_i16x8 t[4][4];
    for (int j = 0; j < 4; ++j) {
      winograd_i16x8 rows[4];
      for (int i = 0; i < 4; ++i) {
        winograd_u8x8 bytes;
        memcpy(&bytes, d + i * row + j * c + ch, sizeof bytes);
        rows[i] = __builtin_convertvector(bytes, winograd_i16x8);
      }
      t[0][j] = rows[0] - rows[2], t[1][j] = rows[1] + rows[2], t[2][j] = rows[2] - rows[1], t[3][j] = rows[1] - rows[3];
    }
    for (int i = 0; i < 4; ++i) {
      const winograd_i16x8 out[4] = {t[i][0] - t[i][2], t[i][1] + t[i][2], t[i][2] - t[i][1], t[i][1] - t[i][3]};
      for (int j = 0; j < 4; ++j) {
        const winograd_u8x8 q = __builtin_convertvector(out[j] + WINOGRAD_OFFSET, winograd_u8x8);  // in [0, 90]
        memcpy(v + (4 * i + j) * position_stride + ch, &q, sizeof q);
      }
    }
  }
#endif
  for (; ch < c; ++ch) {
    int16_t t[4][4];
    for (int j = 0; j < 4; ++j) {  // B^T d, column by column
      const int16_t d0 = d[0 * row + j * c + ch], d1 = d[1 * row + j * c + ch], d2 = d[2 * row + j * c + ch], d3 = d[3 * row + j * c + ch];
      t[0][j] = d0 - d2, t[1][j] = d1 + d2, t[2][j] = d2 - d1, t[3][j] = d1 - d3;
    }
    for (int i = 0; i < 4; ++i) {  // (B^T d) B, row by row
      v[(4 * i + 0) * position_stride + ch] = (uint8_t)(t[i][0] - t[i][2] + WINOGRAD_OFFSET);
      v[(4 * i + 1) * position_stride + ch] = (uint8_t)(t[i][1] + t[i][2] + WINOGRAD_OFFSET);
      v[(4 * i + 2) * position_stride + ch] = (uint8_t)(t[i][2] - t[i][1] + WINOGRAD_OFFSET);
      v[(4 * i + 3) * position_stride + ch] = (uint8_t)(t[i][1] - t[i][3] + WINOGRAD_OFFSET);
    }
  }
  for (int pos = 0; pos < 16; ++pos) memset(v + pos * position_stride + c, 0, (size_t)(k_padded - c));  // zero weights there
}

static int winograd_conv(const edgeq_conv_params* p, const uint8_t* x, const uint8_t* packed, const int32_t* offsets, const epilogue_args* e, int codes_only) {
  const int32_t c = p->in_c, kp = p->k_padded, out_h = p->out_h, out_w = p->out_w;
  const int32_t tiles_h = (out_h + 1) / 2, tiles_w = (out_w + 1) / 2;
  const int64_t tiles = (int64_t)tiles_h * tiles_w;
  const int32_t hp = 2 * tiles_h + 2, wp = 2 * tiles_w + 2;
  uint8_t* padded = (uint8_t*)scratch(SCRATCH_ROWS, (size_t)hp * (size_t)wp * (size_t)c);
  if (!padded) return -2;
  pad_input(p, x, hp, wp, padded);  // past an odd edge too
  const int32_t blocks = (p->out_c + NB - 1) / NB;
  const int64_t panel_bytes = (int64_t)blocks * NB * kp;  // one position's panel: 8-bit weights, a byte each
  const int32_t chunk = p->winograd;  // proven by the plan: no int16 sum of a chunk wraps
  if (chunk < 2 || chunk % 2) return -1;
  const int64_t tile_blocks = (tiles + WINOGRAD_TILES - 1) / WINOGRAD_TILES;
  const int64_t position_stride = (int64_t)WINOGRAD_TILES * kp;
  // Work items are (tile block, group of output blocks): with few tiles (7x7 maps have 16) the output
  // channels are split too, each item transforming its tiles' input again (a few percent of a product)
  const int64_t groups = row_parts(tile_blocks, blocks);
  const int32_t blocks_per_group = (int32_t)((blocks + groups - 1) / groups);
  int status = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(min : status)
  for (int64_t item = 0; item < tile_blocks * groups; ++item) {
    const int64_t tb = item / groups;
    const int32_t b_begin = (int32_t)(item % groups) * blocks_per_group;
    const int32_t b_end = b_begin + blocks_per_group < blocks ? b_begin + blocks_per_group : blocks;
    const int64_t t0 = tb * WINOGRAD_TILES;
    const int32_t count_t = (int32_t)(tiles - t0 < WINOGRAD_TILES ? tiles - t0 : WINOGRAD_TILES);
    uint8_t* v = (uint8_t*)scratch(SCRATCH_WINOGRAD_V, (size_t)(16 * position_stride));
    int32_t* mm = (int32_t*)scratch(SCRATCH_WINOGRAD_M, sizeof(int32_t) * 16 * WINOGRAD_TILES * NB);
    if (!v || !mm) {
      status = -2;
      continue;
    }
    for (int32_t t = 0; t < WINOGRAD_TILES; ++t) {  // a whole block: the last micro tile's rows are read
      const int64_t tile = t0 + (t < count_t ? t : count_t - 1), th = tile / tiles_w, tw = tile - th * tiles_w;
      winograd_input(padded + (2 * th * wp + 2 * tw) * c, wp, c, kp, v + (int64_t)t * kp, position_stride);
    }
    int failed = 0;  // (status is this thread's reduction copy: INT_MAX until set)
    for (int32_t b = b_begin; b < b_end && !failed; ++b) {
      const int32_t n0 = b * NB, count = p->out_c - n0 < NB ? p->out_c - n0 : NB;
      for (int pos = 0; pos < 16; ++pos) {
        const int8_t* panel = block_panel(packed + pos * panel_bytes, b, NB, kp, 8, p->w_low);
        if (!panel) {
          status = -2;
          failed = 1;
          break;
        }
        for (int32_t t = 0; t < count_t; t += MR) {
          const uint8_t* a[MR];
          for (int r = 0; r < MR; ++r) a[r] = v + pos * position_stride + (int64_t)(t + r) * kp;
          micro(a, panel, kp, chunk, mm + ((int64_t)pos * WINOGRAD_TILES + t) * NB);
        }
      }
      if (failed) break;
      for (int32_t t = 0; t < count_t; ++t) {
        const int64_t tile = t0 + t, th = tile / tiles_w, tw = tile - th * tiles_w;
        int32_t y[4][NB];
        const int32_t* m = mm + (int64_t)t * NB;  // position pos at m + pos * WINOGRAD_TILES * NB
        const int64_t at = (int64_t)WINOGRAD_TILES * NB;
        int32_t n = 0;
#if defined(__AVX2__)
        for (; n + 8 <= count; n += 8) {  // eight channels in int32 lanes: A^T M column by column, then A
          __m256i s0[4], s1[4];
          for (int j = 0; j < 4; ++j) {
#define EDGEQ_M(i) _mm256_loadu_si256((const __m256i*)(m + (4 * (i) + j) * at + n))
            const __m256i m1 = EDGEQ_M(1), m2 = EDGEQ_M(2);
            s0[j] = _mm256_add_epi32(_mm256_add_epi32(EDGEQ_M(0), m1), m2);
            s1[j] = _mm256_sub_epi32(_mm256_sub_epi32(m1, m2), EDGEQ_M(3));
#undef EDGEQ_M
          }
#define EDGEQ_Y(q, value) \
  _mm256_storeu_si256((__m256i*)(y[q] + n), _mm256_srai_epi32(_mm256_sub_epi32(value, _mm256_loadu_si256((const __m256i*)(offsets + (int64_t)(q) * p->out_c + n0 + n))), 2))
          EDGEQ_Y(0, _mm256_add_epi32(_mm256_add_epi32(s0[0], s0[1]), s0[2]));
          EDGEQ_Y(1, _mm256_sub_epi32(_mm256_sub_epi32(s0[1], s0[2]), s0[3]));
          EDGEQ_Y(2, _mm256_add_epi32(_mm256_add_epi32(s1[0], s1[1]), s1[2]));
          EDGEQ_Y(3, _mm256_sub_epi32(_mm256_sub_epi32(s1[1], s1[2]), s1[3]));
#undef EDGEQ_Y
        }
#else
        for (; n + 4 <= count; n += 4) {  // four channels in int32 lanes
          winograd_i32x4 s0[4], s1[4];
          for (int j = 0; j < 4; ++j) {
            winograd_i32x4 mi[4];
            for (int i = 0; i < 4; ++i) memcpy(&mi[i], m + (4 * i + j) * at + n, sizeof mi[i]);
            s0[j] = mi[0] + mi[1] + mi[2], s1[j] = mi[1] - mi[2] - mi[3];
          }
          const winograd_i32x4 out[4] = {s0[0] + s0[1] + s0[2], s0[1] - s0[2] - s0[3], s1[0] + s1[1] + s1[2], s1[1] - s1[2] - s1[3]};
          for (int q = 0; q < 4; ++q) {
            winograd_i32x4 offset;
            memcpy(&offset, offsets + (int64_t)q * p->out_c + n0 + n, sizeof offset);
            const winograd_i32x4 value = (out[q] - offset) >> 2;
            memcpy(y[q] + n, &value, sizeof value);
          }
        }
#endif
        for (; n < count; ++n) {
          int32_t s0[4], s1[4];
          for (int j = 0; j < 4; ++j) {
            const int32_t m0 = m[j * at + n], m1 = m[(4 + j) * at + n], m2 = m[(8 + j) * at + n], m3 = m[(12 + j) * at + n];
            s0[j] = m0 + m1 + m2, s1[j] = m1 - m2 - m3;
          }
          const int32_t* o = offsets + n0 + n;
          y[0][n] = (s0[0] + s0[1] + s0[2] - o[0]) >> 2, y[1][n] = (s0[1] - s0[2] - s0[3] - o[p->out_c]) >> 2;
          y[2][n] = (s1[0] + s1[1] + s1[2] - o[2 * p->out_c]) >> 2, y[3][n] = (s1[1] - s1[2] - s1[3] - o[3 * p->out_c]) >> 2;
        }
        for (int q = 0; q < 4; ++q) {
          const int64_t oh = 2 * th + q / 2, ow = 2 * tw + q % 2;
          if (oh >= out_h || ow >= out_w) continue;
          if (codes_only)
            epilogue_codes(e, oh * out_w + ow, n0, count, y[q]);
          else
            epilogue(e, oh * out_w + ow, n0, count, y[q], NULL);
        }
      }
    }
  }
  return status;
}

/* Benchmarks and tests compare the in-place (implicit GEMM) convolution with im2col. */
void edgeq_set_in_place(int enabled) { __atomic_store_n(&in_place_allowed, enabled != 0, __ATOMIC_RELAXED); }

void edgeq_set_amx(int enabled) {
#if defined(EDGEQ_HAS_AMX)
  __atomic_store_n(&amx_allowed, enabled != 0, __ATOMIC_RELAXED);
#else
  (void)enabled;
#endif
}

int edgeq_amx(void) {
#if defined(EDGEQ_HAS_AMX)
  return amx_usable();
#else
  return 0;
#endif
}

int edgeq_supports_layout(int32_t layout) {
  if (layout == EDGEQ_THIS_LAYOUT) return 1;
#if defined(EDGEQ_HAS_WIDE)
  if (layout == EDGEQ_LAYOUT_AVX2_WIDE) return 1;
#endif
#if defined(EDGEQ_HAS_LUT)
  if (layout == EDGEQ_LUT_LAYOUT) return 1;
#endif
#if defined(EDGEQ_HAS_VNNI)
  // the build has the instruction; the CPU running it must too (a module moved to an older machine)
  if (layout == EDGEQ_LAYOUT_VNNI) return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
#endif
  return 0;
}

int edgeq_gemm_raw(const uint8_t* a, int32_t m, int32_t n, int32_t k_padded, const uint8_t* packed_weights, int32_t w_bits, int32_t w_low, int32_t w_absmax,
                   int32_t a_max, int32_t w_layout, int32_t* out) {
  if (k_padded % K_ALIGN || a_max > NIBBLE_MAX || !edgeq_supports_layout(w_layout) || w_layout == EDGEQ_LAYOUT_AVX2_WIDE) return -1;
#if defined(EDGEQ_HAS_LUT)
  if (w_layout == EDGEQ_LUT_LAYOUT) return lut_products(a, m, k_padded, packed_weights, n, NULL, out);
#endif
#if defined(EDGEQ_HAS_AMX)
  if (w_layout == EDGEQ_LAYOUT_VNNI && m >= AMX_MIN_ROWS && amx_usable()) {  // the same choice as edgeq_conv2d
    const int32_t k64 = (k_padded + 63) / 64 * 64;
    int status = 0;
    amx_begin();
    for (int32_t b = 0; b < (n + NB - 1) / NB && !status; ++b) {
      const int8_t* panel = amx_panel(packed_weights, b, k_padded, k64, w_bits, w_low);
      if (!panel) status = -2;
      for (int64_t i = 0; i < m && !status; i += MR_AMX) {
        int32_t tile[MR_AMX * NB];
        int64_t lda;
        const uint8_t* rows = amx_rows(a, i, m, k_padded, k64, &lda);
        if (!rows) {
          status = -2;
          break;
        }
        micro_amx(rows, lda, panel, k64, tile);
        for (int r = 0; r < MR_AMX && i + r < m; ++r)
          for (int j = 0; j < NB && b * NB + j < n; ++j) out[(i + r) * n + b * NB + j] = tile[r * NB + j];
      }
    }
    amx_end();
    return status;
  }
#endif
#if defined(EDGEQ_HAS_VNNI)
  if (w_layout == EDGEQ_LAYOUT_VNNI) {
    for (int32_t b = 0; b < (n + NB - 1) / NB; ++b) {
      const int8_t* panel = w_bits == 2 ? NULL : block_panel(packed_weights, b, NB, k_padded, w_bits, w_low);
      if (w_bits != 2 && !panel) return -2;
      for (int64_t i = 0; i < m; i += MR_VNNI) {
        int32_t tile[MR_VNNI * NB];
        const uint8_t* rows[MR_VNNI];
        for (int r = 0; r < MR_VNNI; ++r) rows[r] = a + (i + r < m ? i + r : m - 1) * k_padded;
        if (w_bits == 2)  // the same choice as edgeq_conv2d
          micro_vnni_packed2(rows, packed_weights + (int64_t)b * NB * k_padded / 4, k_padded, (int8_t)w_low, tile);
        else
          micro_vnni(rows, panel, k_padded, tile);
        for (int r = 0; r < MR_VNNI && i + r < m; ++r)
          for (int j = 0; j < NB && b * NB + j < n; ++j) out[(i + r) * n + b * NB + j] = tile[r * NB + j];
      }
    }
    return 0;
  }
#endif
  const int32_t chunk = int16_chunk(w_absmax);
  const int32_t blocks = (n + NB - 1) / NB;
#if defined(EDGEQ_HAS_PACKED2)
  const int in_registers = w_bits == 2 && m <= 2 * MR;  // the same choice as edgeq_conv2d
#else
  const int in_registers = 0;
#endif
  for (int32_t b = 0; b < blocks; ++b) {
    int8_t* panel = in_registers ? NULL : block_panel(packed_weights, b, NB, k_padded, w_bits, w_low);
    if (!in_registers && !panel) return -2;
    for (int64_t i = 0; i < m; i += MR) {
      int32_t tile[MR * NB];
#if defined(EDGEQ_HAS_PACKED2)
      if (in_registers) {
        const uint8_t* rows[MR];
        for (int r = 0; r < MR; ++r) rows[r] = a + (i + r < m ? i + r : m - 1) * k_padded;
        micro_packed2(rows, packed_weights + (int64_t)b * NB * k_padded / 4, k_padded, chunk, (int8_t)w_low, tile);
      } else
#endif
        block_product(a, m, k_padded, panel, k_padded, chunk, i, tile);
      for (int r = 0; r < MR && i + r < m; ++r)
        for (int j = 0; j < NB && b * NB + j < n; ++j) out[(i + r) * n + b * NB + j] = tile[r * NB + j];
    }
  }
  return 0;
}

/* sums[m] = the sum over output pixel m's receptive field of (x - x_zero); spatial padding
 * (x_zero) adds 0. A layer with weight zero points subtracts w_zero[n] * sums[m] in the
 * epilogue, so its codes keep their width: per-pixel channel sums first (H*W*C adds), then
 * kernel_h * kernel_w of them per output pixel, small beside the layer's K * N per pixel. */
/* pixel[i] = sum of x[i * in_c .. (i + 1) * in_c) - offset. Sums of eight consecutive bytes first,
 * over the whole map at once (vpsadbw against zero on x86, pairwise widening adds on NEON: no
 * per-pixel horizontal reduction, which cost more than the sums on 16-channel maps), then
 * in_c / 8 of them per pixel. */
static int pixel_sums(const uint8_t* x, int64_t pixels, int32_t in_c, int32_t offset, int32_t* pixel) {
  if (in_c % 8) {
    for (int64_t i = 0; i < pixels; ++i) {
      const uint8_t* c = x + i * in_c;
      int32_t s = 0;
      for (int32_t j = 0; j < in_c; ++j) s += c[j];
      pixel[i] = s - offset;
    }
    return 0;
  }
  const int64_t count = pixels * (in_c / 8);
  int32_t* eights = (int32_t*)scratch(SCRATCH_EIGHT_SUMS, sizeof(int32_t) * (size_t)count);
  if (!eights) return -2;
  int64_t g = 0;
#if defined(__AVX2__)
  const __m256i zero = _mm256_setzero_si256(), pick = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (; g + 8 <= count; g += 8) {  // 64 bytes: two vpsadbw, four 64-bit sums each, packed to eight int32
    const __m256i a = _mm256_sad_epu8(_mm256_loadu_si256((const __m256i*)(x + 8 * g)), zero);
    const __m256i b = _mm256_sad_epu8(_mm256_loadu_si256((const __m256i*)(x + 8 * g + 32)), zero);
    const __m256i low = _mm256_permutevar8x32_epi32(a, pick), high = _mm256_permutevar8x32_epi32(b, pick);
    _mm256_storeu_si256((__m256i*)(eights + g), _mm256_permute2x128_si256(low, high, 0x20));
  }
#elif defined(__aarch64__)
  for (; g + 2 <= count; g += 2) {  // 16 bytes: widening pairwise adds down to two 8-byte sums
    const uint64x2_t sums = vpaddlq_u32(vpaddlq_u16(vpaddlq_u8(vld1q_u8(x + 8 * g))));
    eights[g] = (int32_t)vgetq_lane_u64(sums, 0);
    eights[g + 1] = (int32_t)vgetq_lane_u64(sums, 1);
  }
#endif
  for (; g < count; ++g) {
    const uint8_t* c = x + 8 * g;
    eights[g] = c[0] + c[1] + c[2] + c[3] + c[4] + c[5] + c[6] + c[7];
  }
  const int32_t per_pixel = in_c / 8;
  for (int64_t i = 0; i < pixels; ++i) {
    const int32_t* e = eights + i * per_pixel;
    int32_t s = 0;
    for (int32_t j = 0; j < per_pixel; ++j) s += e[j];
    pixel[i] = s - offset;
  }
  return 0;
}

static int window_sums(const edgeq_conv_params* p, const uint8_t* x, int32_t* sums) {
  const int64_t pixels = (int64_t)p->in_h * p->in_w;
  const int32_t offset = p->in_c * p->x_zero, in_c = p->in_c;
  if (p->kernel_h == 1 && p->kernel_w == 1 && p->stride_h == 1 && p->stride_w == 1 && p->pad_top == 0 && p->pad_left == 0 &&
      p->out_h == p->in_h && p->out_w == p->in_w)
    return pixel_sums(x, pixels, in_c, offset, sums);  // a window is one pixel
  // separable box sums: along each input row over kernel_w (in_h x out_w), then down the columns over kernel_h
  const int32_t in_h = p->in_h, in_w = p->in_w, out_h = p->out_h, out_w = p->out_w;
  int32_t* pixel = (int32_t*)scratch(SCRATCH_PIXEL_SUMS, sizeof(int32_t) * (size_t)(pixels + (int64_t)in_h * out_w));
  if (!pixel) return -2;
  int32_t* across = pixel + pixels;
  if (pixel_sums(x, pixels, in_c, offset, pixel)) return -2;
  for (int32_t ih = 0; ih < in_h; ++ih) {
    const int32_t* row = pixel + (int64_t)ih * in_w;
    for (int32_t ow = 0; ow < out_w; ++ow) {
      const int32_t iw0 = ow * p->stride_w - p->pad_left;
      const int32_t begin = iw0 < 0 ? 0 : iw0, end = iw0 + p->kernel_w > in_w ? in_w : iw0 + p->kernel_w;
      int32_t s = 0;
      for (int32_t iw = begin; iw < end; ++iw) s += row[iw];
      across[(int64_t)ih * out_w + ow] = s;
    }
  }
  for (int32_t oh = 0; oh < out_h; ++oh) {
    const int32_t ih0 = oh * p->stride_h - p->pad_top;
    const int32_t begin = ih0 < 0 ? 0 : ih0, end = ih0 + p->kernel_h > in_h ? in_h : ih0 + p->kernel_h;
    int32_t* out = sums + (int64_t)oh * out_w;
    for (int32_t ow = 0; ow < out_w; ++ow) out[ow] = 0;
    for (int32_t ih = begin; ih < end; ++ih) {
      const int32_t* in = across + (int64_t)ih * out_w;
      for (int32_t ow = 0; ow < out_w; ++ow) out[ow] += in[ow];
    }
  }
  return 0;
}

int edgeq_conv2d(const edgeq_conv_params* p, const uint8_t* x, const uint8_t* packed_weights, const int32_t* wsum, const float* multiplier,
                 const float* bias, const float* residual, float* out_float, uint8_t* out_codes) {
  // Winograd's panels reduce over the input channels alone (one panel per tile position)
  const int32_t k = p->winograd ? p->in_c : p->kernel_h * p->kernel_w * p->in_c;
  if (p->k_padded % K_ALIGN || p->k_padded < k || p->x_max > 255 || !edgeq_supports_layout(p->w_layout)) return -1;
  const int wide = p->w_layout == EDGEQ_LAYOUT_AVX2_WIDE;
  const int lut = p->w_layout == EDGEQ_LAYOUT_AVX2_LUT || p->w_layout == EDGEQ_LAYOUT_NEON_LUT;
  const int vnni = p->w_layout == EDGEQ_LAYOUT_VNNI;
  if ((wide && p->x_max <= NIBBLE_MAX) || (lut && (p->x_max > NIBBLE_MAX || p->w_bits != 2))) return -1;
#if defined(EDGEQ_HAS_SIGNED8)
  // 8-bit inputs as signed codes in one pass (Arm); int16 pair sums need |w| <= 127 without dot product
  const int signed8 = !lut && p->x_max > NIBBLE_MAX && p->w_absmax <= 127;
#else
  const int signed8 = 0;
#endif
  const int split = !wide && !vnni && !signed8 && p->x_max > NIBBLE_MAX;
  const int32_t nb = wide ? NB_WIDE_OR_NB : NB;
  const int64_t m_count = (int64_t)p->out_h * p->out_w;
  const int direct = !split && !signed8 && p->kernel_h == 1 && p->kernel_w == 1 && p->stride_h == 1 && p->stride_w == 1 && p->pad_top == 0 && p->pad_left == 0 &&
                     p->in_c == p->k_padded && p->in_h == p->out_h && p->in_w == p->out_w;
#if defined(EDGEQ_HAS_AMX)
  // stride 1, whole 64-channel chunks per tap: AMX tiles read the padded input in place (no im2col)
  const int implicit = vnni && !direct && p->stride_h == 1 && p->stride_w == 1 && p->in_c % 64 == 0 && p->k_padded == k &&
                       (int64_t)p->out_h * p->out_w >= AMX_MIN_ROWS && amx_usable();
#else
  const int implicit = 0;
#endif
#if defined(EDGEQ_HAS_AMX)
  const int amx_rows_product = vnni && m_count >= AMX_MIN_ROWS && amx_usable();
#else
  const int amx_rows_product = 0;
#endif
#if defined(EDGEQ_HAS_PACKED2)
  const int in_registers = !wide && !vnni && !split && p->w_bits == 2 && m_count <= 2 * MR;
#else
  const int in_registers = 0;
#endif
  // kernel rows read in place where every tap row is a whole number of 16-code groups
  // where windows overlap: im2col would copy each input code kernel^2 / stride^2 times (RGB 7x7 stride 2: 12x)
  const int overlapping = p->kernel_h > p->stride_h || p->kernel_w > p->stride_w;
  const int wide_in_place = wide && !direct && overlapping && __atomic_load_n(&in_place_allowed, __ATOMIC_RELAXED);
  const int winograd = p->winograd;
#if !defined(EDGEQ_HAS_WINOGRAD)
  if (winograd) return -1;
#endif
  if (winograd && (p->kernel_h != 3 || p->kernel_w != 3 || p->stride_h != 1 || p->stride_w != 1 || p->x_max > NIBBLE_MAX || p->w_bits != 8 ||
                   p->w_zeros || wide || lut || vnni))
    return -1;
  const int in_place = !winograd && !direct && !implicit && !split && !signed8 && !wide && !lut && !amx_rows_product && !in_registers && p->in_c % 16 == 0 &&
                       p->k_padded == k && __atomic_load_n(&in_place_allowed, __ATOMIC_RELAXED);
  implicit_input geometry;
  if (in_place && implicit_prepare(p, x, &geometry)) return -2;
#if defined(EDGEQ_HAS_FUSED_FAST)
  /* The plain AVX2 microkernel steps k in pairs: it stops at k rounded up to 2, not at k_padded (the
   * panel's rows past k are zero weights). A 1x1 layer whose channels are not a whole number of 16
   * (MobileNetV2's 24) reads its input rows in place at their own stride: a row's reads past its
   * channels take the next pixel's codes against those zero weights, and the last rows, whose reads
   * would leave the input, are copied with zero padding. */
  const int pairs_only = !in_place && !implicit && !amx_rows_product && !vnni && !wide && !in_registers && !signed8 && !split && !lut && !winograd;
#else
  const int pairs_only = 0;
#endif
  const int32_t k_used = pairs_only ? (k + 1) / 2 * 2 : p->k_padded;
  const int direct_short = pairs_only && !direct && p->kernel_h == 1 && p->kernel_w == 1 && p->stride_h == 1 && p->stride_w == 1 && p->pad_top == 0 &&
                           p->pad_left == 0 && p->in_h == p->out_h && p->in_w == p->out_w && p->in_c < p->k_padded;
  const int64_t row_stride = direct_short ? p->in_c : p->k_padded;
  // rows from tail_from on read from `tail`, k_padded apart: with an odd number of channels the last row's
  // last pair reads one code past the input's end
  int64_t tail_from = m_count;
  uint8_t* tail = NULL;
  if (direct_short && k_used > p->in_c) {
    tail_from = m_count - 1;
    tail = (uint8_t*)scratch(SCRATCH_TAIL, (size_t)p->k_padded);
    if (!tail) return -2;
    memset(tail, 0, (size_t)p->k_padded);
    memcpy(tail, x + tail_from * p->in_c, (size_t)p->in_c);
  }
  uint8_t* rows = NULL;
  if (!direct && !direct_short && !implicit && !in_place && !wide_in_place && !winograd) {
    rows = (uint8_t*)scratch(SCRATCH_ROWS, (size_t)(m_count * p->k_padded * (split ? 2 : 1)));
    if (!rows) return -2;
    im2col(p, x, split, rows);
    const int64_t row_bytes = m_count * p->k_padded;  // a local bound: rows may alias *p, which would stop vectorizing
    if (signed8)
      for (int64_t i = 0; i < row_bytes; ++i) rows[i] ^= 0x80;
  }
  const uint8_t* low_rows = direct || direct_short ? x : rows;
  uint16_t* wide_rows = NULL;
  if (wide && !wide_in_place) {
    wide_rows = (uint16_t*)scratch(SCRATCH_WIDE, (size_t)(m_count * p->k_padded) * sizeof(uint16_t));
    if (!wide_rows) return -2;
    for (int64_t i = 0; i < m_count * p->k_padded; ++i) wide_rows[i] = low_rows[i];
  }
  const int32_t chunk = int16_chunk(p->w_absmax);
  int32_t* correction = (int32_t*)scratch(SCRATCH_CORRECTION, sizeof(int32_t) * (size_t)p->out_c);
  if (!correction) return -2;
  const int32_t x_offset = p->x_zero - (signed8 ? 128 : 0);  // the rows hold x - 128 when signed8
  for (int32_t n = 0; n < p->out_c; ++n) correction[n] = x_offset * wsum[n];
  // the proven fast requantization writes codes only: no float output, no residual
  const int fast = p->fast_codes && out_codes && !out_float && !residual;
  if (p->fast_codes && !fast) return -1;
  int32_t* sums = NULL;
  if (p->w_zeros) {
    sums = (int32_t*)scratch(SCRATCH_WINDOW_SUMS, sizeof(int32_t) * (size_t)m_count);
    if (!sums || window_sums(p, x, sums)) return -2;
  }
  const epilogue_args e = {multiplier, bias, residual, out_float, p->clamp_min, p->clamp_max, p->out_scale, out_codes, p->out_c, p->out_zero, p->out_qmin, p->out_qmax,
                           correction, p->w_zeros ? wsum + p->out_c : NULL, sums,
                           fast ? multiplier + p->out_c : NULL, fast ? bias + p->out_c : NULL, p->fast_lo, p->fast_hi};
#if defined(EDGEQ_HAS_LUT)
  if (lut) {
    return lut_products(low_rows, m_count, p->k_padded, packed_weights, p->out_c, &e, NULL);
  }
#endif
  const int32_t blocks = (p->out_c + nb - 1) / nb;
  const int codes_only = !split && !residual && !out_float && out_codes;
#if defined(EDGEQ_HAS_FUSED_FAST)
  // the plain microkernel's tiles whose k fits one int16 chunk: the fast requantization from its registers
  const int fused_fast = codes_only && fast && !sums && !wide && !vnni && !signed8 && !in_registers && !in_place && !amx_rows_product &&
                         k_used <= chunk;
#endif
#if defined(EDGEQ_HAS_WIDE)
  if (wide_in_place) return wide_conv_in_place(p, x, packed_weights, &e, codes_only);
#endif
#if defined(EDGEQ_HAS_WINOGRAD)
  if (winograd) return winograd_conv(p, x, packed_weights, wsum + p->out_c, &e, codes_only);
#endif
#if defined(EDGEQ_HAS_AMX)
  if (implicit) return amx_implicit_conv(p, x, packed_weights, &e, codes_only);
  const int amx = amx_rows_product;
  const int32_t k64 = (p->k_padded + 63) / 64 * 64;
  const int rows_per_tile = amx ? MR_AMX : (vnni ? MR_VNNI : (wide ? 4 : MR));
#elif defined(EDGEQ_HAS_VNNI)
  const int rows_per_tile = vnni ? MR_VNNI : (wide ? 4 : MR);
#else
  const int rows_per_tile = wide ? 4 : MR;
#endif
  const int64_t tiles = (m_count + rows_per_tile - 1) / rows_per_tile;
  const int64_t parts = row_parts(blocks, tiles);
  const int64_t tiles_per_part = (tiles + parts - 1) / parts;
  int status = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(min : status)
  for (int64_t item = 0; item < (int64_t)blocks * parts; ++item) {
    const int32_t b = (int32_t)(item / parts);
    const int64_t m_begin = (item % parts) * tiles_per_part * rows_per_tile;
    const int64_t m_end = m_begin + tiles_per_part * rows_per_tile < m_count ? m_begin + tiles_per_part * rows_per_tile : m_count;
#if defined(EDGEQ_HAS_AMX)
    const int unpacked_in_registers = !amx && (in_registers || (vnni && p->w_bits == 2));
    const int8_t* panel = amx                     ? amx_panel(packed_weights, b, p->k_padded, k64, p->w_bits, p->w_low)
                          : unpacked_in_registers ? NULL
                                                  : block_panel(packed_weights, b, nb, p->k_padded, p->w_bits, p->w_low);
#else
    const int unpacked_in_registers = in_registers || (vnni && p->w_bits == 2);
    const int8_t* panel = unpacked_in_registers ? NULL : block_panel(packed_weights, b, nb, p->k_padded, p->w_bits, p->w_low);
#endif
    if (!unpacked_in_registers && !panel) {
      status = -2;
      continue;
    }
#if defined(EDGEQ_HAS_WIDE)
    int16_t* wide_panel = wide ? (int16_t*)scratch(SCRATCH_WIDE_PANEL, sizeof(int16_t) * (size_t)p->k_padded * NB_WIDE) : NULL;
    if (wide && !wide_panel) {
      status = -2;
      continue;
    }
    if (wide && m_count > 1)  // sign-extended once per block, not per tile
      for (int64_t i = 0; i < (int64_t)p->k_padded * NB_WIDE; ++i) wide_panel[i] = panel[i];
#endif
#if defined(EDGEQ_HAS_AMX)
    if (amx) amx_begin();
#endif
    const int32_t n0 = b * nb, count = p->out_c - n0 < nb ? p->out_c - n0 : nb;
    int64_t m = m_begin;
#if defined(EDGEQ_HAS_FUSED_FAST)
    if (fused_fast && count <= 16)
      for (; m + MR_HALF <= m_end; m += MR_HALF) {
        const uint8_t* a[MR_HALF];
        for (int r = 0; r < MR_HALF; ++r) a[r] = m + r < tail_from ? low_rows + (m + r) * row_stride : tail + (m + r - tail_from) * p->k_padded;
        micro_fast_codes_half(a, panel, k_used, &e, m, n0, count);
      }
#endif
    for (; m < m_end; m += rows_per_tile) {
      int32_t tile[TILE_ROWS_MAX * NB], high[MR * NB];
      const uint8_t* a[TILE_ROWS_MAX];
      if (!in_place)
        for (int r = 0; r < TILE_ROWS_MAX; ++r) {
          const int64_t row = m + r < m_count ? m + r : m_count - 1;
          a[r] = row < tail_from ? low_rows + row * row_stride : tail + (row - tail_from) * p->k_padded;
        }
      if (in_place) {
        const uint8_t* base[TILE_ROWS_MAX];
        for (int r = 0; r < rows_per_tile; ++r) base[r] = implicit_row(&geometry, m + r < m_count ? m + r : m_count - 1);
        for (int32_t kh = 0; kh < p->kernel_h; ++kh) {
          int32_t part[TILE_ROWS_MAX * NB];
          int32_t* into = kh ? part : tile;
          const int32_t k0 = kh * geometry.span;
          for (int r = 0; r < rows_per_tile; ++r) a[r] = base[r] + kh * geometry.row_stride;
#if defined(EDGEQ_HAS_VNNI)
          if (vnni && p->w_bits == 2)
            micro_vnni_packed2(a, packed_weights + (int64_t)b * NB * p->k_padded / 4 + (int64_t)k0 * 8, geometry.span, (int8_t)p->w_low, into);
          else if (vnni)
            micro_vnni(a, panel + (int64_t)k0 * NB, geometry.span, into);
          else
#endif
            micro(a, panel + (int64_t)k0 * NB, geometry.span, chunk, into);
          if (kh)
            for (int i = 0; i < rows_per_tile * NB; ++i) tile[i] += part[i];
        }
      } else
#if defined(EDGEQ_HAS_AMX)
      if (amx) {
        int64_t lda;
        const uint8_t* tile_rows = amx_rows(low_rows, m, m_count, p->k_padded, k64, &lda);
        if (!tile_rows) {
          status = -2;
          break;
        }
        micro_amx(tile_rows, lda, panel, k64, tile);
      } else
#endif
#if defined(EDGEQ_HAS_VNNI)
      if (vnni && p->w_bits == 2)
        micro_vnni_packed2(a, packed_weights + (int64_t)b * NB * p->k_padded / 4, p->k_padded, (int8_t)p->w_low, tile);
      else if (vnni)
        micro_vnni(a, panel, p->k_padded, tile);
      else
#endif
#if defined(EDGEQ_HAS_WIDE)
      if (wide && m_count == 1) {
        micro_wide_row(wide_rows, panel, p->k_padded, tile);
      } else if (wide) {
        const uint16_t* a16[4];
        for (int r = 0; r < 4; ++r) a16[r] = wide_rows + (m + r < m_count ? m + r : m_count - 1) * p->k_padded;
        micro_wide_taps(a16, 0, 1, p->k_padded, wide_panel, tile);
      } else
#endif
#if defined(EDGEQ_HAS_PACKED2)
      if (in_registers)
        micro_packed2(a, packed_weights + (int64_t)b * NB * p->k_padded / 4, p->k_padded, chunk, (int8_t)p->w_low, tile);
      else
#endif
#if defined(EDGEQ_HAS_SIGNED8)
      if (signed8)
        micro_s8(a, panel, p->k_padded, tile);
      else
#endif
#if defined(EDGEQ_HAS_FUSED_FAST)
      if (fused_fast && count == NB && m + MR <= m_count) {
        micro_fast_codes(a, panel, k_used, &e, m, n0);
        continue;
      } else
#endif
        micro(a, panel, k_used, chunk, tile);
      if (split) block_product(rows + m_count * p->k_padded, m_count, p->k_padded, panel, p->k_padded, chunk, m, high);
      if (codes_only)
        for (int r = 0; r < rows_per_tile && m + r < m_count; ++r) epilogue_codes(&e, m + r, n0, count, tile + r * nb);
      else
        for (int r = 0; r < rows_per_tile && m + r < m_count; ++r) epilogue(&e, m + r, n0, count, tile + r * nb, split ? high + r * nb : NULL);
    }
#if defined(EDGEQ_HAS_AMX)
    if (amx) amx_end();
#endif
  }
  return status;
}

#if defined(__AVX2__)
/* Depthwise products with two taps per instruction. vpmaddubsw multiplies unsigned bytes by signed
 * bytes and adds adjacent pairs into int16, so the codes of two taps interleave per channel and one
 * instruction does 32 channels' pairs; the 16-lane multiply-add it replaces took a widening, a
 * subtraction, a multiply and an add per tap. Codes are not centred per tap: padding reads a row of
 * zero-point codes (no bounds tests in the tap loop), which makes the centring one constant per
 * channel, x_zero * (sum of its weights), subtracted in int32 by the epilogue (its `correction`).
 * The sums stay exact in int16 under the caller's bound, taps * max(x_max, x_zero) * max|w| <= 32767,
 * which also holds for each pair (no saturation).
 *
 *   codes of taps t, u at 32 channels  t: c0 c1 .. c31          u: c0 c1 .. c31
 *   unpacklo_epi8(t, u)   lane 0: c0t c0u c1t c1u .. c7t c7u    lane 1: c16t c16u .. c23t c23u
 *   unpackhi_epi8(t, u)   lane 0: c8t c8u .. c15t c15u          lane 1: c24t c24u .. c31t c31u
 * (AVX2 unpacks work within 128-bit lanes); the weights are interleaved the same way once per call, and
 * the int16 sums are widened back to channel order. A block of 16 channels interleaves two 128-bit loads
 * into one register in channel order. An odd last tap is paired with a zero weight. */
enum { DW_PIXELS = 4, DW_MAX_TAPS = 64, DW_CHUNK = 256 };

/* Output pixels q0 .. q0 + n - 1 of a group (n is DW_PIXELS, or 1 for a row's last pixels) over every
 * channel: at[t][q] is where tap t of pixel q reads its channels, m the output index of pixel q0. */
static inline __attribute__((always_inline)) void dw_pixels(const uint8_t* const (*at)[DW_PIXELS], const int q0, const int n, const int32_t pairs,
                                                            const int8_t* wp, const int32_t c, const epilogue_args* e, const int fused, const int64_t m) {
  const int64_t pair_stride = 2 * (int64_t)c;
  const __m256i blo = _mm256_set1_epi8((char)e->fast_lo), bhi = _mm256_set1_epi8((char)e->fast_hi);
  for (int32_t c0 = 0; c0 < c; c0 += DW_CHUNK) {
    const int32_t len = c - c0 < DW_CHUNK ? c - c0 : DW_CHUNK;
    int32_t acc[DW_PIXELS][DW_CHUNK];
    int32_t j = 0;
    for (; j + 32 <= len; j += 32) {
      const int64_t ch = c0 + j;
      __m256i lo[DW_PIXELS], hi[DW_PIXELS];
      for (int q = 0; q < n; ++q) lo[q] = hi[q] = _mm256_setzero_si256();
      for (int32_t pp = 0; pp < pairs; ++pp) {
        const __m256i wlo = _mm256_loadu_si256((const __m256i*)(wp + pp * pair_stride + 2 * ch));
        const __m256i whi = _mm256_loadu_si256((const __m256i*)(wp + pp * pair_stride + 2 * ch + 32));
        for (int q = 0; q < n; ++q) {
          const __m256i xt = _mm256_loadu_si256((const __m256i*)(at[2 * pp][q0 + q] + ch));
          const __m256i xu = _mm256_loadu_si256((const __m256i*)(at[2 * pp + 1][q0 + q] + ch));
          lo[q] = _mm256_add_epi16(lo[q], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(xt, xu), wlo));
          hi[q] = _mm256_add_epi16(hi[q], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(xt, xu), whi));
        }
      }
      for (int q = 0; q < n; ++q) {
        const __m256i sums[4] = {_mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo[q])), _mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi[q])),
                                 _mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo[q], 1)), _mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi[q], 1))};
        if (fused)
          _mm256_storeu_si256((__m256i*)(e->out_codes + (m + q) * c + ch), fast_codes32(sums, e->correction + ch, e->fast_mult + ch, e->fast_bias + ch, blo, bhi));
        else
          for (int v = 0; v < 4; ++v) _mm256_storeu_si256((__m256i*)(acc[q] + j + 8 * v), sums[v]);
      }
    }
    for (; j < len; j += 16) {
      const int64_t ch = c0 + j;
      __m256i sum[DW_PIXELS];
      for (int q = 0; q < n; ++q) sum[q] = _mm256_setzero_si256();
      for (int32_t pp = 0; pp < pairs; ++pp) {
        const __m256i ws = _mm256_loadu_si256((const __m256i*)(wp + pp * pair_stride + 2 * ch));
        for (int q = 0; q < n; ++q) {
          const __m128i xt = _mm_loadu_si128((const __m128i*)(at[2 * pp][q0 + q] + ch));
          const __m128i xu = _mm_loadu_si128((const __m128i*)(at[2 * pp + 1][q0 + q] + ch));
          const __m256i in_order = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(xt, xu)), _mm_unpackhi_epi8(xt, xu), 1);
          sum[q] = _mm256_add_epi16(sum[q], _mm256_maddubs_epi16(in_order, ws));
        }
      }
      for (int q = 0; q < n; ++q) {
        const __m256i sums[2] = {_mm256_cvtepi16_epi32(_mm256_castsi256_si128(sum[q])), _mm256_cvtepi16_epi32(_mm256_extracti128_si256(sum[q], 1))};
        if (fused)
          _mm_storeu_si128((__m128i*)(e->out_codes + (m + q) * c + ch),
                           fast_codes16(sums, e->correction + ch, e->fast_mult + ch, e->fast_bias + ch, _mm256_castsi256_si128(blo), _mm256_castsi256_si128(bhi)));
        else
          for (int v = 0; v < 2; ++v) _mm256_storeu_si256((__m256i*)(acc[q] + j + 8 * v), sums[v]);
      }
    }
    if (!fused)
      for (int q = 0; q < n; ++q) epilogue(e, m + q, c0, len, acc[q], NULL);
  }
}

static int depthwise_tap_pairs(const edgeq_conv_params* p, const uint8_t* x, const int8_t* w, const epilogue_args* e_in) {
  const int32_t c = p->in_c, taps = p->kernel_h * p->kernel_w, pairs = (taps + 1) / 2;
  const int64_t pair_stride = 2 * (int64_t)c;  // bytes of interleaved weights per tap pair
  int8_t* wp = (int8_t*)malloc((size_t)(pairs * pair_stride));
  int32_t* correction = (int32_t*)malloc(sizeof(int32_t) * (size_t)c);
  uint8_t* pad = (uint8_t*)malloc((size_t)p->in_w * (size_t)c);  // a row of zero-point codes
  if (!wp || !correction || !pad) {
    free(wp);
    free(correction);
    free(pad);
    return -2;
  }
  memset(pad, p->x_zero, (size_t)p->in_w * (size_t)c);
  for (int32_t ch = 0; ch < c; ++ch) {
    int32_t total = 0;
    for (int32_t t = 0; t < taps; ++t) total += w[(int64_t)t * c + ch];
    correction[ch] = p->x_zero * total;
  }
  for (int32_t pp = 0; pp < pairs; ++pp) {
    const int8_t* wt = w + (int64_t)(2 * pp) * c;
    const int8_t* wu = 2 * pp + 1 < taps ? wt + c : NULL;
    int8_t* out = wp + pp * pair_stride;
    int32_t j = 0;
    for (; j + 32 <= c; j += 32) {
      const __m256i vt = _mm256_loadu_si256((const __m256i*)(wt + j));
      const __m256i vu = wu ? _mm256_loadu_si256((const __m256i*)(wu + j)) : _mm256_setzero_si256();
      _mm256_storeu_si256((__m256i*)(out + 2 * j), _mm256_unpacklo_epi8(vt, vu));
      _mm256_storeu_si256((__m256i*)(out + 2 * j + 32), _mm256_unpackhi_epi8(vt, vu));
    }
    for (; j < c; j += 16) {
      const __m128i vt = _mm_loadu_si128((const __m128i*)(wt + j));
      const __m128i vu = wu ? _mm_loadu_si128((const __m128i*)(wu + j)) : _mm_setzero_si128();
      _mm_storeu_si128((__m128i*)(out + 2 * j), _mm_unpacklo_epi8(vt, vu));
      _mm_storeu_si128((__m128i*)(out + 2 * j + 16), _mm_unpackhi_epi8(vt, vu));
    }
  }
  epilogue_args e = *e_in;
  e.correction = correction;
  // codes straight from the sum registers where the plan proved the one-multiply requantization exact
  const int fused = e.fast_mult != NULL && e.w_zero == NULL;
  const int32_t kernel_w = p->kernel_w, in_w = p->in_w, out_w = p->out_w, stride_w = p->stride_w, pad_left = p->pad_left;
  const int64_t step = (int64_t)DW_PIXELS * stride_w * c;  // how far a group's reads move to the next group
#pragma omp parallel for schedule(static)
  for (int32_t oh = 0; oh < p->out_h; ++oh) {
    const uint8_t* row[DW_MAX_TAPS];  // rows of padding read the zero-point row
    for (int32_t kh = 0; kh < p->kernel_h; ++kh) {
      const int32_t ih = oh * p->stride_h - p->pad_top + kh;
      row[kh] = ih >= 0 && ih < p->in_h ? x + (int64_t)ih * in_w * c : pad;
    }
    const uint8_t* at[DW_MAX_TAPS + 1][DW_PIXELS];
    int inside_before = 0;
    for (int32_t ow0 = 0; ow0 < out_w; ow0 += DW_PIXELS) {
      const int32_t pixels = out_w - ow0 < DW_PIXELS ? out_w - ow0 : DW_PIXELS;
      const int inside = pixels == DW_PIXELS && ow0 * stride_w - pad_left >= 0 &&
                         (ow0 + DW_PIXELS - 1) * stride_w - pad_left + kernel_w <= in_w;
      if (inside && inside_before) {  // the previous group's reads, moved along the row
        for (int32_t t = 0; t < taps; ++t)
          for (int q = 0; q < DW_PIXELS; ++q) at[t][q] += step;
      } else {
        for (int32_t t = 0; t < taps; ++t) {
          const int32_t kh = t / kernel_w, kw = t % kernel_w;
          for (int q = 0; q < DW_PIXELS; ++q) {
            const int32_t iw = (ow0 + q) * stride_w - pad_left + kw;
            at[t][q] = q < pixels && iw >= 0 && iw < in_w ? row[kh] + (int64_t)iw * c : pad;
          }
        }
      }
      inside_before = inside;
      if (taps % 2)
        for (int q = 0; q < DW_PIXELS; ++q) at[taps][q] = at[taps - 1][q];  // against the zero weight
      const int64_t m = (int64_t)oh * out_w + ow0;
      if (pixels == DW_PIXELS)
        dw_pixels((const uint8_t* const (*)[DW_PIXELS])at, 0, DW_PIXELS, pairs, wp, c, &e, fused, m);
      else
        for (int q = 0; q < pixels; ++q) dw_pixels((const uint8_t* const (*)[DW_PIXELS])at, q, 1, pairs, wp, c, &e, fused, m + q);
    }
  }
  free(wp);
  free(correction);
  free(pad);
  return 0;
}
#endif

int edgeq_depthwise_conv2d(const edgeq_conv_params* p, const uint8_t* x, const uint8_t* packed_weights, const float* multiplier, const float* bias,
                           const float* residual, float* out_float, uint8_t* out_codes) {
  const int32_t c = p->in_c, taps = p->kernel_h * p->kernel_w;
  if (p->out_c != c || p->w_zeros) return -1;  // depthwise weights arrive with their zero points subtracted
  const int fast = p->fast_codes && out_codes && !out_float && !residual;
  if (p->fast_codes && !fast) return -1;
  const int64_t stored = ((int64_t)taps * c + 127) / 128 * 128;
  int8_t* w = (int8_t*)malloc((size_t)stored);
  if (!w) return -2;
  edgeq_unpack(packed_weights, stored, p->w_bits, p->w_low, w);
  const epilogue_args e = {multiplier, bias, residual, out_float, p->clamp_min, p->clamp_max, p->out_scale, out_codes, p->out_c, p->out_zero, p->out_qmin, p->out_qmax,
                           NULL, NULL, NULL, fast ? multiplier + c : NULL, fast ? bias + c : NULL, p->fast_lo, p->fast_hi};
  const int64_t m_count = (int64_t)p->out_h * p->out_w;
  const int32_t x_zero = p->x_zero;
  enum { CHUNK = 256 };  // channels per pass: the sums stay on the stack
  // int16 sums when no sum of taps can leave int16 (always at 4 bits): AVX2 pairs taps (depthwise_tap_pairs)
  const int32_t x_span = p->x_max > x_zero ? p->x_max : x_zero;
  const int narrow = (int64_t)p->kernel_h * p->kernel_w * x_span * (p->w_absmax > 0 ? p->w_absmax : 1) <= 32767;
#if defined(__AVX2__)
  if (narrow && c % 16 == 0 && taps <= DW_MAX_TAPS) {
    const int status = depthwise_tap_pairs(p, x, w, &e);
    free(w);
    return status;
  }
#endif
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < m_count; ++m) {
    const int32_t oh = (int32_t)(m / p->out_w), ow = (int32_t)(m % p->out_w);
    for (int32_t c0 = 0; c0 < c; c0 += CHUNK) {
      const int32_t len = c - c0 < CHUNK ? c - c0 : CHUNK;
      int32_t acc[CHUNK];
      int16_t acc16[CHUNK];
      if (narrow)
        for (int32_t ch = 0; ch < len; ++ch) acc16[ch] = 0;
      else
        for (int32_t ch = 0; ch < len; ++ch) acc[ch] = 0;
      for (int32_t kh = 0; kh < p->kernel_h; ++kh) {
        const int32_t ih = oh * p->stride_h - p->pad_top + kh;
        if (ih < 0 || ih >= p->in_h) continue;
        for (int32_t kw = 0; kw < p->kernel_w; ++kw) {
          const int32_t iw = ow * p->stride_w - p->pad_left + kw;
          if (iw < 0 || iw >= p->in_w) continue;
          const uint8_t* xs = x + ((int64_t)ih * p->in_w + iw) * c + c0;
          const int8_t* ws = w + (kh * p->kernel_w + kw) * c + c0;
          if (narrow)
            for (int32_t ch = 0; ch < len; ++ch) acc16[ch] = (int16_t)(acc16[ch] + ((int16_t)xs[ch] - (int16_t)x_zero) * (int16_t)ws[ch]);
          else
            for (int32_t ch = 0; ch < len; ++ch) acc[ch] += ((int32_t)xs[ch] - x_zero) * (int32_t)ws[ch];
        }
      }
      if (narrow)
        for (int32_t ch = 0; ch < len; ++ch) acc[ch] = acc16[ch];
      epilogue(&e, m, c0, len, acc, NULL);
    }
  }
  free(w);
  return 0;
}

void edgeq_quantize(const float* x, int32_t channels, int32_t pixels, int32_t nchw_input, float scale, int32_t zero, int32_t qmin, int32_t qmax, uint8_t* out) {
  if (nchw_input && channels > 1) {
    // quantize each channel plane contiguously, then interleave the bytes into NHWC
    uint8_t* planes = (uint8_t*)scratch(SCRATCH_ROWS, (size_t)pixels * (size_t)channels);
    if (planes) {
#pragma omp parallel for schedule(static)
      for (int32_t ch = 0; ch < channels; ++ch)
        quantize_run(x + (int64_t)ch * pixels, pixels, scale, (float)zero, (float)qmin, (float)qmax, planes + (int64_t)ch * pixels);
#pragma omp parallel for schedule(static)
      for (int64_t m = 0; m < pixels; ++m)
        for (int32_t ch = 0; ch < channels; ++ch) out[m * channels + ch] = planes[(int64_t)ch * pixels + m];
      return;
    }
  }
  quantize_run(x, (int64_t)pixels * channels, scale, (float)zero, (float)qmin, (float)qmax, out);
}

/* Max pooling over NHWC, padding below every value: -inf for floats; for codes 0. Quantization is
 * monotone, so the max of codes is the code of the max: a convolution followed by pooling and
 * quantization writes codes before the pool (a quarter of the bytes, pooled with byte maxima). */
#define EDGEQ_MAX_POOL(name, type, lowest)                                                                                   \
  void name(const type* x, int32_t in_h, int32_t in_w, int32_t c, int32_t out_h, int32_t out_w, int32_t kernel_h, int32_t kernel_w, \
            int32_t stride_h, int32_t stride_w, int32_t pad_top, int32_t pad_left, type* out) {                                   \
    _Pragma("omp parallel for schedule(static)") for (int32_t oh = 0; oh < out_h; ++oh) {                                      \
      for (int32_t ow = 0; ow < out_w; ++ow) {                                                                                 \
        type* o = out + ((int64_t)oh * out_w + ow) * c;                                                                        \
        for (int32_t ch = 0; ch < c; ++ch) o[ch] = (lowest);                                                                   \
        for (int32_t kh = 0; kh < kernel_h; ++kh) {                                                                            \
          const int32_t ih = oh * stride_h - pad_top + kh;                                                                     \
          if (ih < 0 || ih >= in_h) continue;                                                                                  \
          for (int32_t kw = 0; kw < kernel_w; ++kw) {                                                                          \
            const int32_t iw = ow * stride_w - pad_left + kw;                                                                  \
            if (iw < 0 || iw >= in_w) continue;                                                                                \
            const type* xs = x + ((int64_t)ih * in_w + iw) * c;                                                                \
            for (int32_t ch = 0; ch < c; ++ch) o[ch] = xs[ch] > o[ch] ? xs[ch] : o[ch];                                        \
          }                                                                                                                    \
        }                                                                                                                      \
      }                                                                                                                        \
    }                                                                                                                          \
  }
EDGEQ_MAX_POOL(edgeq_max_pool, float, -INFINITY)
EDGEQ_MAX_POOL(edgeq_max_pool_codes, uint8_t, 0)
#undef EDGEQ_MAX_POOL

void edgeq_global_average_pool(const float* x, int32_t pixels, int32_t c, float* out) {
  for (int32_t ch = 0; ch < c; ++ch) out[ch] = 0.0f;
  for (int64_t m = 0; m < pixels; ++m)
    for (int32_t ch = 0; ch < c; ++ch) out[ch] += x[m * c + ch];
  for (int32_t ch = 0; ch < c; ++ch) out[ch] /= (float)pixels;
}

void edgeq_add_clamp(const float* a, const float* b, int64_t count, float lo, float hi, float* out) {
  if (b) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; ++i) {
      const float y = a[i] + b[i];
      out[i] = y < lo ? lo : (y > hi ? hi : y);
    }
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; ++i) out[i] = a[i] < lo ? lo : (a[i] > hi ? hi : a[i]);
  }
}

/* The int8 peak of one core, for the benchmark's "share of peak": a register-only loop of
 * the exact u8 x s8 dot-product sequence this build's CPU offers, on 8 independent
 * accumulators. Returns the multiply-adds executed (0 where no such loop is written). */
int64_t edgeq_int8_peak_loop(int64_t iterations) {
#if defined(EDGEQ_HAS_VNNI)
  __m512i a0 = _mm512_set1_epi8(1), a1 = _mm512_set1_epi8(2), a2 = _mm512_set1_epi8(3), a3 = _mm512_set1_epi8(4);
  const __m512i b = _mm512_set1_epi8(1);
  __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
  for (int64_t i = 0; i < iterations; ++i) {
    __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3));
    c0 = _mm512_dpbusd_epi32(c0, a0, b); c1 = _mm512_dpbusd_epi32(c1, a1, b); c2 = _mm512_dpbusd_epi32(c2, a2, b); c3 = _mm512_dpbusd_epi32(c3, a3, b);
    c4 = _mm512_dpbusd_epi32(c4, a0, b); c5 = _mm512_dpbusd_epi32(c5, a1, b); c6 = _mm512_dpbusd_epi32(c6, a2, b); c7 = _mm512_dpbusd_epi32(c7, a3, b);
  }
  const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3)),
                                       _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7)));
  __asm__ volatile("" ::"v"(sum));
  return iterations * 8 * 64;
#elif defined(__AVX2__)
  __m256i a0 = _mm256_set1_epi8(1), a1 = _mm256_set1_epi8(2), a2 = _mm256_set1_epi8(3), a3 = _mm256_set1_epi8(4);
  const __m256i b = _mm256_set1_epi8(1), ones = _mm256_set1_epi16(1);
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
  for (int64_t i = 0; i < iterations; ++i) {
    __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3));  // keep the products inside the loop
    c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(_mm256_maddubs_epi16(a0, b), ones));
    c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(_mm256_maddubs_epi16(a1, b), ones));
    c2 = _mm256_add_epi32(c2, _mm256_madd_epi16(_mm256_maddubs_epi16(a2, b), ones));
    c3 = _mm256_add_epi32(c3, _mm256_madd_epi16(_mm256_maddubs_epi16(a3, b), ones));
    c4 = _mm256_add_epi32(c4, _mm256_madd_epi16(_mm256_maddubs_epi16(a0, b), ones));
    c5 = _mm256_add_epi32(c5, _mm256_madd_epi16(_mm256_maddubs_epi16(a1, b), ones));
    c6 = _mm256_add_epi32(c6, _mm256_madd_epi16(_mm256_maddubs_epi16(a2, b), ones));
    c7 = _mm256_add_epi32(c7, _mm256_madd_epi16(_mm256_maddubs_epi16(a3, b), ones));
  }
  const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3)),
                                       _mm256_add_epi32(_mm256_add_epi32(c4, c5), _mm256_add_epi32(c6, c7)));
  __asm__ volatile("" ::"x"(sum));
  return iterations * 8 * 32;
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
  int8x16_t a0 = vdupq_n_s8(1), a1 = vdupq_n_s8(2), a2 = vdupq_n_s8(3), a3 = vdupq_n_s8(4);
  const int8x16_t b = vdupq_n_s8(1);
  int32x4_t c[8];
  for (int j = 0; j < 8; ++j) c[j] = vdupq_n_s32(0);
  for (int64_t i = 0; i < iterations; ++i) {
    __asm__ volatile("" : "+w"(a0), "+w"(a1), "+w"(a2), "+w"(a3));
    c[0] = vdotq_s32(c[0], a0, b); c[1] = vdotq_s32(c[1], a1, b); c[2] = vdotq_s32(c[2], a2, b); c[3] = vdotq_s32(c[3], a3, b);
    c[4] = vdotq_s32(c[4], a0, b); c[5] = vdotq_s32(c[5], a1, b); c[6] = vdotq_s32(c[6], a2, b); c[7] = vdotq_s32(c[7], a3, b);
  }
  int32x4_t sum = c[0];
  for (int j = 1; j < 8; ++j) sum = vaddq_s32(sum, c[j]);
  __asm__ volatile("" ::"w"(sum));
  return iterations * 8 * 16;
#elif defined(__aarch64__)
  /* without dot product: smull + smlal2 (two int8 products summed in int16) + sadalp (into int32) */
  int8x16_t a0 = vdupq_n_s8(1), a1 = vdupq_n_s8(2), a2 = vdupq_n_s8(3), a3 = vdupq_n_s8(4);
  const int8x16_t b = vdupq_n_s8(1);
  int32x4_t c[4];
  for (int j = 0; j < 4; ++j) c[j] = vdupq_n_s32(0);
  for (int64_t i = 0; i < iterations; ++i) {
    __asm__ volatile("" : "+w"(a0), "+w"(a1), "+w"(a2), "+w"(a3));
    c[0] = vpadalq_s16(c[0], vmlal_high_s8(vmull_s8(vget_low_s8(a0), vget_low_s8(b)), a0, b));
    c[1] = vpadalq_s16(c[1], vmlal_high_s8(vmull_s8(vget_low_s8(a1), vget_low_s8(b)), a1, b));
    c[2] = vpadalq_s16(c[2], vmlal_high_s8(vmull_s8(vget_low_s8(a2), vget_low_s8(b)), a2, b));
    c[3] = vpadalq_s16(c[3], vmlal_high_s8(vmull_s8(vget_low_s8(a3), vget_low_s8(b)), a3, b));
  }
  const int32x4_t sum = vaddq_s32(vaddq_s32(c[0], c[1]), vaddq_s32(c[2], c[3]));
  __asm__ volatile("" ::"w"(sum));
  return iterations * 4 * 16;
#else
  (void)iterations;
  return 0;
#endif
}

#if defined(EDGEQ_HAS_AMX)
__attribute__((target("amx-tile,amx-int8"))) static void amx_peak_tiles(int64_t iterations) {
  static const uint8_t a[16 * 64];
  static const int8_t b[16 * 64];
  _tile_loadd(4, a, 64);
  _tile_loadd(5, a, 64);
  _tile_loadd(6, b, 64);
  _tile_loadd(7, b, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t i = 0; i < iterations; ++i) {
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
}
#endif

/* The same for AMX tiles (tdpbusd on four independent accumulator tiles); 0 where the build or CPU has none. */
int64_t edgeq_amx_peak_loop(int64_t iterations) {
#if defined(EDGEQ_HAS_AMX)
  if (!amx_usable()) return 0;
  amx_begin();
  amx_peak_tiles(iterations);
  amx_end();
  return iterations * 4 * 16 * 16 * 64;
#else
  (void)iterations;
  return 0;
#endif
}

/* sizeof(edgeq_conv_params), for the Python side's check of its one copy of the struct. */
int32_t edgeq_conv_params_size(void) { return (int32_t)sizeof(edgeq_conv_params); }
