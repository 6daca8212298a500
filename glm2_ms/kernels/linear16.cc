// y[m, n] = sum_k x[m, k] * w[n, k]: float32 activations against float16 or bfloat16 weights, float32 arithmetic.
//
// Why: on CPU, MindSpore computes in float32 over 16-bit weights by casting each weight to a float32 copy and then
// running its MatMul, so every decoding step of ChatGLM2-6B writes and reads 25 GB of casts (and a compiled step
// keeps them all). Here each weight row is widened in cache, a block of rows at a time, and used at once: a step
// reads the 12.5 GB of weights once. Used for a few rows (decoding, a prompt); training keeps MindSpore's MatMul.
//
// Entry point in MindSpore's "aot" custom-operator form (params: x [M, K] float32, w [N, K] 16-bit, y [M, N]).
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <vector>

namespace {

constexpr int64_t kBlock = 512;  // weight elements widened at a time per row: 4 rows of 2 KB float32 stay in L1
constexpr int kCols = 4;         // weight rows (output columns) per pass, each widened once for every row of x
constexpr int kRows = 3;         // rows of x per register tile: 3 x 4 accumulators

inline __m256 widen(const uint16_t *w, bool bf16) {
  __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i *>(w));
  if (!bf16) return _mm256_cvtph_ps(bits);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

inline float widen1(uint16_t w, bool bf16) {
  if (!bf16) return _cvtsh_ss(w);
  uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R rows of x (from `x`, stride k) against the kCols widened rows over `len` elements: sums added to `partial`.
template <int R>
void tile(const float *x, int64_t k, const float (*wide)[kBlock], int64_t len, float *partial) {
  __m256 acc[R][kCols];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kCols; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t vec = len & ~int64_t(7);
  for (int64_t j = 0; j < vec; j += 8) {
    __m256 w[kCols];
    for (int c = 0; c < kCols; ++c) w[c] = _mm256_load_ps(wide[c] + j);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * k + j);
      for (int c = 0; c < kCols; ++c) acc[r][c] = _mm256_fmadd_ps(xv, w[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kCols; ++c) {
      float s = hsum(acc[r][c]);
      for (int64_t j = vec; j < len; ++j) s += x[r * k + j] * wide[c][j];
      partial[r * kCols + c] += s;
    }
}

// Output columns n0 .. n0 + cols - 1 (cols <= kCols) of every row: the weight rows widened a block at a time,
// each block used by all rows of x before the next is read.
void columns(const float *x, const uint16_t *w, float *y, int64_t m, int64_t n, int64_t k, int64_t n0, int cols,
             bool bf16, float *partial) {
  alignas(32) float wide[kCols][kBlock];
  memset(partial, 0, sizeof(float) * m * kCols);
  for (int64_t k0 = 0; k0 < k; k0 += kBlock) {
    const int64_t len = k - k0 < kBlock ? k - k0 : kBlock;
    const int64_t vec = len & ~int64_t(7);
    for (int c = 0; c < kCols; ++c) {
      if (c >= cols) {
        memset(wide[c], 0, sizeof wide[c]);
        continue;
      }
      const uint16_t *row = w + (n0 + c) * k + k0;
      for (int64_t j = 0; j < vec; j += 8) _mm256_store_ps(wide[c] + j, widen(row + j, bf16));
      for (int64_t j = vec; j < len; ++j) wide[c][j] = widen1(row[j], bf16);
    }
    int64_t r = 0;
    for (; r + kRows <= m; r += kRows) tile<kRows>(x + r * k + k0, k, wide, len, partial + r * kCols);
    if (m - r == 2) tile<2>(x + r * k + k0, k, wide, len, partial + r * kCols);
    if (m - r == 1) tile<1>(x + r * k + k0, k, wide, len, partial + r * kCols);
  }
  for (int64_t r = 0; r < m; ++r)
    for (int c = 0; c < cols; ++c) y[r * n + n0 + c] = partial[r * kCols + c];
}

// One or two rows of x (decoding): each weight row is widened straight from memory into the FMAs, with no staging
// in L1 (which costs a store and a load per element where a row of x uses each weight once).
template <int R>
void direct(const float *x, const uint16_t *w, float *y, int64_t n, int64_t k, int64_t n0, int cols, bool bf16) {
  const uint16_t *rows[kCols];
  for (int c = 0; c < kCols; ++c) rows[c] = w + (n0 + (c < cols ? c : 0)) * k;
  __m256 acc[R][kCols];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kCols; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t vec = k & ~int64_t(7);
  for (int64_t j = 0; j < vec; j += 8) {
    __m256 wv[kCols];
    for (int c = 0; c < kCols; ++c) wv[c] = widen(rows[c] + j, bf16);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * k + j);
      for (int c = 0; c < kCols; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < cols; ++c) {
      float s = hsum(acc[r][c]);
      for (int64_t j = vec; j < k; ++j) s += x[r * k + j] * widen1(rows[c][j], bf16);
      y[r * n + n0 + c] = s;
    }
}

}  // namespace

extern "C" void glm2_linear16(const float *x, const uint16_t *w, float *y, int64_t m, int64_t n, int64_t k,
                              int bf16) {
#pragma omp parallel
  {
    std::vector<float> partial(m * kCols);
#pragma omp for schedule(static)
    for (int64_t n0 = 0; n0 < n; n0 += kCols) {
      const int cols = n - n0 < kCols ? static_cast<int>(n - n0) : kCols;
      if (m == 1)
        direct<1>(x, w, y, n, k, n0, cols, bf16 != 0);
      else if (m == 2)
        direct<2>(x, w, y, n, k, n0, cols, bf16 != 0);
      else
        columns(x, w, y, m, n, k, n0, cols, bf16 != 0, partial.data());
    }
  }
}

extern "C" int Linear16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                        void *extra) {
  (void)stream, (void)extra;
  if (nparam != 3 || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2) return 1;
  if (strcmp(dtypes[0], "float32") != 0 || strcmp(dtypes[2], "float32") != 0) return 2;
  const bool bf16 = strcmp(dtypes[1], "bfloat16") == 0;
  if (!bf16 && strcmp(dtypes[1], "float16") != 0) return 3;
  const int64_t m = shapes[0][0], k = shapes[0][1], n = shapes[1][0];
  if (shapes[1][1] != k || shapes[2][0] != m || shapes[2][1] != n) return 4;
  glm2_linear16(static_cast<const float *>(params[0]), static_cast<const uint16_t *>(params[1]),
                static_cast<float *>(params[2]), m, n, k, bf16);
  return 0;
}
