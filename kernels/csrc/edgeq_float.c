/* Float operators around the low-bit layers of a transformer (and the tensor moves that
 * exporters write between them): layer norm, softmax, GELU, attention matmuls, broadcast
 * add/multiply, strided copies (transpose, slice, gather, expand) and concatenation.
 *
 * They share one signature so that the planner, the TVM FFI wrappers and the ctypes
 * executor treat them alike:
 *
 *   void edgeq_<op>(const float* a, const float* b, const int32_t* ints, const float* floats, float* out)
 *
 * `b` is the second operand (NULL or unused for unary operators); `ints` and `floats` hold
 * the operator's constants in the order written above each function (and by
 * edgeq/kernels/graph.py). Loops are plain C that GCC vectorizes; the exp and erf used by
 * softmax and GELU are branch-free polynomials for that reason (libm's calls are scalar
 * and would cost more than every integer layer of a ViT together).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "edgeq_kernels.h"

/* Every operator here computes each output with one fixed sequence of float32 operations,
 * the same in every build (AVX2 intrinsics, NEON or plain C, any thread count), so that
 * x86 and Arm modules produce the same bits and kernels/reference.py can reproduce them:
 * no fused multiply-add (the sources build with -ffp-contract=off), and every reduction
 * runs in EDGEQ_LANES strided partial sums combined by combine_lanes(), then the tail in
 * order. */
#define EDGEQ_LANES 8

/* ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)): the order of the AVX2 horizontal sum. */
static inline float combine_lanes(const float l[EDGEQ_LANES]) {
  return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

/* sum of x[0..count) in the canonical order (see above). */
static inline float lane_sum(const float* x, int64_t count) {
  float lanes[EDGEQ_LANES] = {0};
  int64_t c = 0;
  for (; c + EDGEQ_LANES <= count; c += EDGEQ_LANES)
    for (int l = 0; l < EDGEQ_LANES; ++l) lanes[l] += x[c + l];
  float sum = combine_lanes(lanes);
  for (; c < count; ++c) sum += x[c];
  return sum;
}

/* Comparisons rather than fminf/fmaxf: those must honour NaN operands, which keeps GCC
 * from using vector min/max instructions. */
static inline float clamp_float(float x, float lo, float hi) {
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

/* e^x for x <= 88 (Cephes' expf polynomial after reducing by ln 2; about 2 ulp). */
static inline float exp_poly(float x) {
  x = clamp_float(x, -87.0f, 88.0f);
  const float n = floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  union {
    int32_t i;
    float f;
  } scale;
  scale.i = ((int32_t)n + 127) << 23;
  return p * scale.f;
}

/* erf(x): a rational approximation on [-4, 4] (outside, erf is +-1 in float); a few ulp. */
static inline float erf_poly(float x) {
  x = clamp_float(x, -4.0f, 4.0f);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  p = p * x;
  float q = -1.45660718464996e-05f;
  q = q * x2 + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return p / q;
}

#if defined(__AVX2__) && defined(__FMA__)
/* exp_poly and erf_poly on eight lanes: the same operations in the same order. */
static inline __m256 exp_poly8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _mm256_set1_ps(0.5f)),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), _mm256_set1_ps(1.0f));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

static inline __m256 erf_poly8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-4.0f)), _mm256_set1_ps(4.0f));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-2.72614225801306e-10f);
  p = _mm256_add_ps(_mm256_mul_ps(p, x2), _mm256_set1_ps(2.77068142495902e-08f));
  p = _mm256_add_ps(_mm256_mul_ps(p, x2), _mm256_set1_ps(-2.10102402082508e-06f));
  p = _mm256_add_ps(_mm256_mul_ps(p, x2), _mm256_set1_ps(-5.69250639462346e-05f));
  p = _mm256_add_ps(_mm256_mul_ps(p, x2), _mm256_set1_ps(-7.34990630326855e-04f));
  p = _mm256_add_ps(_mm256_mul_ps(p, x2), _mm256_set1_ps(-2.95459980854025e-03f));
  p = _mm256_add_ps(_mm256_mul_ps(p, x2), _mm256_set1_ps(-1.60960333262415e-02f));
  p = _mm256_mul_ps(p, x);
  __m256 q = _mm256_set1_ps(-1.45660718464996e-05f);
  q = _mm256_add_ps(_mm256_mul_ps(q, x2), _mm256_set1_ps(-2.13374055278905e-04f));
  q = _mm256_add_ps(_mm256_mul_ps(q, x2), _mm256_set1_ps(-1.68282697438203e-03f));
  q = _mm256_add_ps(_mm256_mul_ps(q, x2), _mm256_set1_ps(-7.37332916720468e-03f));
  q = _mm256_add_ps(_mm256_mul_ps(q, x2), _mm256_set1_ps(-1.42647390514189e-02f));
  return _mm256_div_ps(p, q);
}

static inline float horizontal_max(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

/* ints: shape[6], strides[6] (input elements; 0 broadcasts), offset. out[i0..i5] = a[offset + sum ik * stride_k] */
void edgeq_strided_copy(const float* a, const float* b, const int32_t* ints, const float* floats, float* out) {
  (void)b;
  (void)floats;
  const int32_t* shape = ints;
  const int32_t* stride = ints + 6;
  const int64_t offset = ints[12];
  int64_t outer = 1;
  for (int d = 0; d < 5; ++d) outer *= shape[d];
  const int64_t inner = shape[5];
  const int64_t inner_stride = stride[5];
#pragma omp parallel for schedule(static) if (outer * inner > 65536)
  for (int64_t o = 0; o < outer; ++o) {
    int64_t rest = o, source = offset;
    for (int d = 4; d >= 0; --d) {
      source += (rest % shape[d]) * stride[d];
      rest /= shape[d];
    }
    float* dst = out + o * inner;
    if (inner_stride == 1) {
      memcpy(dst, a + source, (size_t)inner * sizeof(float));
    } else {
      for (int64_t i = 0; i < inner; ++i) dst[i] = a[source + i * inner_stride];
    }
  }
}

/* ints: count, zero; floats: scale. `a` holds uint8 codes (the one operator whose input is
 * not float): out = (code - zero) * scale, as DequantizeLinear defines it. */
void edgeq_dequantize(const float* a, const float* b, const int32_t* ints, const float* floats, float* out) {
  (void)b;
  const uint8_t* codes = (const uint8_t*)a;
  const int64_t count = ints[0];
  const int32_t zero = ints[1];
  const float scale = floats[0];
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) out[i] = (float)((int32_t)codes[i] - zero) * scale;
}

/* ints: outer, a_inner, b_inner. Each of `outer` output rows is a's row followed by b's. */
void edgeq_concat(const float* a, const float* b, const int32_t* ints, const float* floats, float* out) {
  (void)floats;
  const int64_t outer = ints[0], a_inner = ints[1], b_inner = ints[2];
  for (int64_t o = 0; o < outer; ++o) {
    memcpy(out + o * (a_inner + b_inner), a + o * a_inner, (size_t)a_inner * sizeof(float));
    memcpy(out + o * (a_inner + b_inner) + a_inner, b + o * b_inner, (size_t)b_inner * sizeof(float));
  }
}

/* ints: count, b_count, op (0 add, 1 multiply); floats: lo, hi.
 * out[i] = clamp(a[i] op b[i % b_count], lo, hi): b repeats over a's leading dimensions. */
void edgeq_binary(const float* a, const float* b, const int32_t* ints, const float* floats, float* out) {
  const int64_t count = ints[0], period = ints[1];
  const int multiply = ints[2];
  const float lo = floats[0], hi = floats[1];
  const int64_t blocks = count / period;
#pragma omp parallel for schedule(static) if (count > 65536)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* x = a + blk * period;
    float* y = out + blk * period;
    if (multiply) {
#pragma omp simd
      for (int64_t i = 0; i < period; ++i) y[i] = clamp_float(x[i] * b[i], lo, hi);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < period; ++i) y[i] = clamp_float(x[i] + b[i], lo, hi);
    }
  }
}

/* ints: rows, cols; floats: epsilon; b: gamma[cols] then beta[cols]. Normalizes each row. */
void edgeq_layer_norm(const float* a, const float* b, const int32_t* ints, const float* floats, float* out) {
  const int64_t rows = ints[0], cols = ints[1];
  const float epsilon = floats[0];
  const float* gamma = b;
  const float* beta = b + cols;
#pragma omp parallel for schedule(static) if (rows * cols > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = a + r * cols;
    float* y = out + r * cols;
    const float mean = lane_sum(x, cols) / (float)cols;
    /* the squared deviations go through y, which the last loop overwrites */
    for (int64_t c = 0; c < cols; ++c) y[c] = (x[c] - mean) * (x[c] - mean);
    const float squares = lane_sum(y, cols);
    const float inv = 1.0f / sqrtf(squares / (float)cols + epsilon);
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) y[c] = (x[c] - mean) * inv * gamma[c] + beta[c];
  }
}

/* ints: rows, cols. Softmax of each row. */
void edgeq_softmax(const float* a, const float* b, const int32_t* ints, const float* floats, float* out) {
  (void)b;
  (void)floats;
  const int64_t rows = ints[0], cols = ints[1];
#pragma omp parallel for schedule(static) if (rows * cols > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = a + r * cols;
    float* y = out + r * cols;
    float top = x[0], sum = 0.0f;
    int64_t c = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 top8 = _mm256_set1_ps(x[0]);
    for (; c + 8 <= cols; c += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(x + c));
    top = horizontal_max(top8);
#endif
    for (; c < cols; ++c) top = x[c] > top ? x[c] : top;
    c = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; c + 8 <= cols; c += 8) _mm256_storeu_ps(y + c, exp_poly8(_mm256_sub_ps(_mm256_loadu_ps(x + c), _mm256_set1_ps(top))));
#endif
    for (; c < cols; ++c) y[c] = exp_poly(x[c] - top);
    sum = lane_sum(y, cols);
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) y[c] *= inv;
  }
}

/* ints: count. GELU with the exact erf form, x/2 * (1 + erf(x / sqrt 2)). */
void edgeq_gelu(const float* a, const float* b, const int32_t* ints, const float* floats, float* out) {
  (void)b;
  (void)floats;
  const int64_t count = ints[0];
  const int64_t chunk = 4096;
#pragma omp parallel for schedule(static) if (count > 65536)
  for (int64_t start = 0; start < count; start += chunk) {
    const int64_t end = start + chunk < count ? start + chunk : count;
    int64_t i = start;
#if defined(__AVX2__) && defined(__FMA__)
    for (; i + 8 <= end; i += 8) {
      const __m256 v = _mm256_loadu_ps(a + i);
      const __m256 e = erf_poly8(_mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f)));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
    }
#endif
    for (; i < end; ++i) out[i] = 0.5f * a[i] * (1.0f + erf_poly(a[i] * 0.70710678118654752f));
  }
}

/* ints: count, kind (0 sigmoid, 1 hard sigmoid, 2 hard swish); floats: alpha, beta (the hard ones').
 *   sigmoid:      1 / (1 + e^-x)                    (exp_poly)
 *   hard sigmoid: clamp(alpha * x + beta, 0, 1)
 *   hard swish:   x * clamp(alpha * x + beta, 0, 1)  (ONNX HardSwish: alpha 1/6, beta 1/2)
 * Elementwise, so a feature map keeps its NHWC layout through them. */
void edgeq_activation(const float* a, const float* b, const int32_t* ints, const float* floats, float* out) {
  (void)b;
  const int64_t count = ints[0];
  const int kind = ints[1];
  const float alpha = floats[0], beta = floats[1];
  if (kind == 0) {
    const int64_t chunk = 4096;
#pragma omp parallel for schedule(static) if (count > 65536)
    for (int64_t start = 0; start < count; start += chunk) {
      const int64_t end = start + chunk < count ? start + chunk : count;
      int64_t i = start;
#if defined(__AVX2__) && defined(__FMA__)
      for (; i + 8 <= end; i += 8) {
        const __m256 e = exp_poly8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_loadu_ps(a + i)));
        _mm256_storeu_ps(out + i, _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
      }
#endif
      for (; i < end; ++i) out[i] = 1.0f / (1.0f + exp_poly(-a[i]));
    }
    return;
  }
  const int swish = kind == 2;
#pragma omp parallel for simd schedule(static) if (count > 65536)
  for (int64_t i = 0; i < count; ++i) {
    const float gate = clamp_float(alpha * a[i] + beta, 0.0f, 1.0f);
    out[i] = swish ? a[i] * gate : gate;
  }
}

#if defined(__AVX2__) && defined(__FMA__)
/* 4 rows x 16 columns of out, all of k: eight accumulators, b streamed two registers per step. Each output sums
 * its k products in order, multiply and add rounded separately, as matmul_rows does. */
static void matmul_tile_4x16(const float* a, const float* b, int64_t k, int64_t n, float alpha, float* out) {
  __m256 acc[4][2];
  for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    const __m256 b0 = _mm256_loadu_ps(b + p * n);
    const __m256 b1 = _mm256_loadu_ps(b + p * n + 8);
    for (int r = 0; r < 4; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r * k + p);
      acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_mul_ps(x, b0));
      acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_mul_ps(x, b1));
    }
  }
  const __m256 scale = _mm256_set1_ps(alpha);
  for (int r = 0; r < 4; ++r) {
    _mm256_storeu_ps(out + r * n, _mm256_mul_ps(acc[r][0], scale));
    _mm256_storeu_ps(out + r * n + 8, _mm256_mul_ps(acc[r][1], scale));
  }
}
#endif

#if defined(__AVX512F__)
/* The 4 x 16 tile twice as wide where the build has AVX-512: each output is still one lane summing
 * its products in k order, so the results are the 4 x 16 tile's and matmul_rows' to the bit. */
static void matmul_tile_4x32(const float* a, const float* b, int64_t k, int64_t n, float alpha, float* out) {
  __m512 acc[4][2];
  for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    const __m512 b0 = _mm512_loadu_ps(b + p * n);
    const __m512 b1 = _mm512_loadu_ps(b + p * n + 16);
    for (int r = 0; r < 4; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * k + p]);
      acc[r][0] = _mm512_add_ps(acc[r][0], _mm512_mul_ps(x, b0));
      acc[r][1] = _mm512_add_ps(acc[r][1], _mm512_mul_ps(x, b1));
    }
  }
  const __m512 scale = _mm512_set1_ps(alpha);
  for (int r = 0; r < 4; ++r) {
    _mm512_storeu_ps(out + r * n, _mm512_mul_ps(acc[r][0], scale));
    _mm512_storeu_ps(out + r * n + 16, _mm512_mul_ps(acc[r][1], scale));
  }
}
#endif

/* Rows [row_begin, row_end) and columns [col_begin, n) of one matrix product, any size. */
static void matmul_rows(const float* a, const float* b, int64_t row_begin, int64_t row_end, int64_t col_begin, int64_t k, int64_t n, float alpha,
                        float* out) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    float* y = out + i * n;
    for (int64_t j = col_begin; j < n; ++j) y[j] = 0.0f;
    for (int64_t p = 0; p < k; ++p) {
      const float x = a[i * k + p];
      const float* w = b + p * n;
#pragma omp simd
      for (int64_t j = col_begin; j < n; ++j) y[j] += x * w[j];
    }
    for (int64_t j = col_begin; j < n; ++j) y[j] *= alpha;
  }
}

/* ints: batch, m, k, n; floats: alpha. out[t] = alpha * a[t] (m x k) . b[t] (k x n), row-major. */
void edgeq_matmul(const float* a, const float* b, const int32_t* ints, const float* floats, float* out) {
  const int64_t batch = ints[0], m = ints[1], k = ints[2], n = ints[3];
  const float alpha = floats[0];
  const int64_t row_blocks = (m + 3) / 4;
#pragma omp parallel for schedule(static) collapse(2)
  for (int64_t t = 0; t < batch; ++t) {
    for (int64_t rb = 0; rb < row_blocks; ++rb) {
      const float* at = a + t * m * k;
      const float* bt = b + t * k * n;
      float* ot = out + t * m * n;
      const int64_t i = rb * 4;
      int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
      if (i + 4 <= m) {
#if defined(__AVX512F__)
        for (; j + 32 <= n; j += 32) matmul_tile_4x32(at + i * k, bt + j, k, n, alpha, ot + i * n + j);
#endif
        for (; j + 16 <= n; j += 16) matmul_tile_4x16(at + i * k, bt + j, k, n, alpha, ot + i * n + j);
      }
#endif
      matmul_rows(at, bt, i, i + 4 <= m ? i + 4 : m, j, k, n, alpha, ot);
    }
  }
}

/* ints: batch, m, k, n, a_zero, b_zero; floats: alpha. `a` (batch x m x k) and `b` (batch x k x n) hold uint8
 * codes, as for edgeq_dequantize: out[t] = alpha * (float)(sum_p (a[t][i][p] - a_zero) * (b[t][p][j] - b_zero)),
 * a matrix product of two quantized activations (attention's scores and context) in exact integers: each
 * factor is within +-255, so the sum fits int32 for k <= 32768 (the planner's bound), and the one rounding
 * is the int32 -> float conversion times alpha (the two scales' product).
 *
 * AVX2: vpmaddwd on int16 (code - zero) pairs along k, 4 rows x 16 columns of int32 sums per tile. b is
 * widened once per call into 16-column panels, two int16 per column per k-pair:
 *
 *   panel[q] = | b[2q][j0] b[2q+1][j0] | b[2q][j0+1] b[2q+1][j0+1] | ... 16 columns (two __m256i)
 *
 * and a's rows into int16 with k padded to even, so one 32-bit broadcast is a row's k-pair. (vpmaddubsw
 * would take twice the products per instruction, but its int16 pair sums saturate at 8-bit codes.) */
#define MATMUL_CODES_COLS 16
void edgeq_matmul_codes(const float* a_codes, const float* b_codes, const int32_t* ints, const float* floats, float* out) {
  const uint8_t* a = (const uint8_t*)a_codes;
  const uint8_t* b = (const uint8_t*)b_codes;
  const int64_t batch = ints[0], m = ints[1], k = ints[2], n = ints[3];
  const int32_t a_zero = ints[4], b_zero = ints[5];
  const float alpha = floats[0];
  const int64_t k_even = (k + 1) & ~(int64_t)1;
  const int64_t col_blocks = (n + MATMUL_CODES_COLS - 1) / MATMUL_CODES_COLS;
  int16_t* a_wide = (int16_t*)malloc(sizeof(int16_t) * (size_t)(batch * m * k_even));
  int16_t* b_wide = (int16_t*)malloc(sizeof(int16_t) * (size_t)(batch * col_blocks * k_even * MATMUL_CODES_COLS));
  if (!a_wide || !b_wide) {
    free(a_wide);
    free(b_wide);
    for (int64_t i = 0; i < batch * m * n; ++i) out[i] = NAN; /* never silently wrong */
    return;
  }
  for (int64_t row = 0; row < batch * m; ++row) {
    int16_t* dst = a_wide + row * k_even;
    for (int64_t p = 0; p < k; ++p) dst[p] = (int16_t)((int32_t)a[row * k + p] - a_zero);
    if (k_even > k) dst[k] = 0;
  }
  for (int64_t t = 0; t < batch; ++t) {
    for (int64_t cb = 0; cb < col_blocks; ++cb) {
      int16_t* panel = b_wide + (t * col_blocks + cb) * k_even * MATMUL_CODES_COLS;
      for (int64_t p = 0; p < k_even; ++p) {
        for (int64_t c = 0; c < MATMUL_CODES_COLS; ++c) {
          const int64_t j = cb * MATMUL_CODES_COLS + c;
          const int16_t value = p < k && j < n ? (int16_t)((int32_t)b[(t * k + p) * n + j] - b_zero) : 0;
          /* k-pair p/2, column c: the pair's two entries side by side */
          panel[(p / 2) * 2 * MATMUL_CODES_COLS + 2 * c + (p % 2)] = value;
        }
      }
    }
  }
  const int64_t row_blocks = (m + 3) / 4;
#pragma omp parallel for schedule(static) collapse(2)
  for (int64_t t = 0; t < batch; ++t) {
    for (int64_t rb = 0; rb < row_blocks; ++rb) {
      const int64_t i0 = rb * 4;
      const int rows = m - i0 < 4 ? (int)(m - i0) : 4;
      const int16_t* arow[4];
      for (int r = 0; r < 4; ++r) arow[r] = a_wide + (t * m + i0 + (r < rows ? r : rows - 1)) * k_even;
      for (int64_t cb = 0; cb < col_blocks; ++cb) {
        const int16_t* panel = b_wide + (t * col_blocks + cb) * k_even * MATMUL_CODES_COLS;
        int32_t tile[4][MATMUL_CODES_COLS];
#if defined(__AVX2__)
        __m256i acc[4][2];
        for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
        for (int64_t q = 0; q < k_even / 2; ++q) {
          const __m256i w0 = _mm256_loadu_si256((const __m256i*)(panel + q * 2 * MATMUL_CODES_COLS));
          const __m256i w1 = _mm256_loadu_si256((const __m256i*)(panel + q * 2 * MATMUL_CODES_COLS + 16));
          for (int r = 0; r < 4; ++r) {
            int32_t pair;
            memcpy(&pair, arow[r] + 2 * q, sizeof pair);
            const __m256i x = _mm256_set1_epi32(pair);
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(x, w0));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(x, w1));
          }
        }
        /* the panel's columns are pairs: lanes of w0 are columns 0-7, of w1 8-15 */
        for (int r = 0; r < 4; ++r) {
          _mm256_storeu_si256((__m256i*)tile[r], acc[r][0]);
          _mm256_storeu_si256((__m256i*)(tile[r] + 8), acc[r][1]);
        }
#else
        for (int r = 0; r < 4; ++r)
          for (int c = 0; c < MATMUL_CODES_COLS; ++c) tile[r][c] = 0;
        for (int64_t q = 0; q < k_even / 2; ++q) {
          const int16_t* w = panel + q * 2 * MATMUL_CODES_COLS;
          for (int r = 0; r < 4; ++r) {
            const int32_t x0 = arow[r][2 * q], x1 = arow[r][2 * q + 1];
            for (int c = 0; c < MATMUL_CODES_COLS; ++c) tile[r][c] += x0 * w[2 * c] + x1 * w[2 * c + 1];
          }
        }
#endif
        const int64_t j0 = cb * MATMUL_CODES_COLS;
        const int cols = n - j0 < MATMUL_CODES_COLS ? (int)(n - j0) : MATMUL_CODES_COLS;
        for (int r = 0; r < rows; ++r) {
          float* y = out + (t * m + i0 + r) * n + j0;
          for (int c = 0; c < cols; ++c) y[c] = (float)tile[r][c] * alpha;
        }
      }
    }
  }
  free(a_wide);
  free(b_wide);
}
