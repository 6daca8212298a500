// Two of a layer's small steps as one operator each, float32 in and out, for inference: RMSNorm and SwiGLU.
//
// Why: MindSpore runs its CPU operators one at a time at a fixed cost each; model.py spells RMSNorm in seven of them
// and SwiGLU in three, which in a decoding step cost more to dispatch than to compute.
//
// Entry points in MindSpore's "aot" custom-operator form:
//   RmsNorm: x [m, k] float32, weight [k] float32|float16|bfloat16, eps [1] float32 -> x · rsqrt(mean(x²) + eps) · weight
//   SwiGlu: x [m, 2f] float32 -> silu(x[:, :f]) · x[:, f:], [m, f]
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <cmath>

#include "vector_math.h"

namespace {

void rms_norm(const float *x, const void *w, int kind, float eps, int64_t m, int64_t k, float *y) {
#pragma omp parallel for schedule(static) if (m > 1)
  for (int64_t r = 0; r < m; ++r) {
    const float *row = x + r * k;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
      const __m256 a = _mm256_loadu_ps(row + i), b = _mm256_loadu_ps(row + i + 8);
      s0 = _mm256_fmadd_ps(a, a, s0), s1 = _mm256_fmadd_ps(b, b, s1);
    }
    float squares = vm::hsum(_mm256_add_ps(s0, s1));
    for (; i < k; ++i) squares += row[i] * row[i];
    const float scale = 1.0f / std::sqrt(squares / static_cast<float>(k) + eps);
    for (int64_t j = 0; j < k; ++j) y[r * k + j] = row[j] * scale * vm::weight_at(w, kind, j);
  }
}

void swiglu(const float *x, int64_t m, int64_t f, float *y) {
#pragma omp parallel for schedule(static) if (m * f > (1 << 16))
  for (int64_t r = 0; r < m; ++r) {
    const float *gate = x + r * 2 * f, *up = gate + f;
    float *out = y + r * f;
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= f; i += 8) {
      const __m256 g = _mm256_loadu_ps(gate + i);
      const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, vm::exp(_mm256_sub_ps(_mm256_setzero_ps(), g))));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + i)));
    }
    for (; i < f; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  }
}

}  // namespace

extern "C" int RmsNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                       void *extra) {
  (void)stream, (void)extra;
  if (nparam != 4 || ndims[0] != 2 || ndims[1] != 1 || ndims[2] != 1 || ndims[3] != 2) return 1;
  const int kind = vm::weight_kind(dtypes[1]);
  if (strcmp(dtypes[0], "float32") != 0 || kind < 0 || strcmp(dtypes[2], "float32") != 0 ||
      strcmp(dtypes[3], "float32") != 0)
    return 2;
  const int64_t m = shapes[0][0], k = shapes[0][1];
  if (shapes[1][0] != k || shapes[2][0] != 1 || shapes[3][0] != m || shapes[3][1] != k) return 4;
  rms_norm(static_cast<const float *>(params[0]), params[1], kind, *static_cast<const float *>(params[2]), m, k,
           static_cast<float *>(params[3]));
  return 0;
}

extern "C" int SwiGlu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                      void *extra) {
  (void)stream, (void)extra;
  if (nparam != 2 || ndims[0] != 2 || ndims[1] != 2) return 1;
  if (strcmp(dtypes[0], "float32") != 0 || strcmp(dtypes[1], "float32") != 0) return 2;
  const int64_t m = shapes[0][0], f = shapes[0][1] / 2;
  if (shapes[0][1] % 2 != 0 || shapes[1][0] != m || shapes[1][1] != f) return 4;
  swiglu(static_cast<const float *>(params[0]), m, f, static_cast<float *>(params[1]));
  return 0;
}
