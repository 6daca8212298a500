// Attention of new tokens against the KV cache in one call: RoPE on q and k, the new k and v written into copies of
// the caches (or into the caches themselves), scores, softmax and the weighted sum of v, in float32, for inference.
//
// Why: MindSpore runs its CPU operators one at a time at a fixed cost each. model.py's SelfAttention spells this
// arithmetic in several dozen of them a layer (the split of the fused projection, two rotations, the one-hot cache
// write, scores, softmax, context), and in a decoding step their dispatch costs more than their arithmetic.
//
// Entry point "Attend" in MindSpore's "aot" custom-operator form. Inputs: qkv [b, s, (h + 2g)·d] (the fused
// projection: h query heads, then g keys, then g values, d each), cos and sin [b, s, 1, d/4], mask [b, s, L]
// (added to the scores), write [b, s, L] (one-hot: the cache slot of each new token; a row of zeros writes
// nothing), the k and v caches [b, g, L, d]. Outputs: the context [b, s, h·d] and the new caches [b, g, L, d]; a
// caller that passes the old caches' own memory as the new ones (layer.cc) has them updated in place.
// Query head j reads kv group j / (h/g), as the model's grouped-query attention does.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <vector>

#include "vector_math.h"

namespace {

// A mask value at or below this hides its position: e^(score + mask − max) is then 0 in float32 whenever some
// position of the row is not hidden, so the position is skipped (a row hiding every position computes them all).
constexpr float kHidden = -1e6f;

struct Operands {
  const float *qkv, *cos, *sin, *mask, *write, *k, *v;
  float *ctx, *k_out, *v_out;
  int64_t b, s, h, g, d, L;

  int parse(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
    static const int kRanks[10] = {3, 4, 4, 3, 3, 4, 4, 3, 4, 4};
    if (nparam != 10) return 1;
    for (int i = 0; i < 10; ++i) {
      if (ndims[i] != kRanks[i]) return 1;
      if (strcmp(dtypes[i], "float32") != 0) return 2;
    }
    b = shapes[5][0], g = shapes[5][1], L = shapes[5][2], d = shapes[5][3], s = shapes[0][1];
    if (g < 1 || d < 4 || d % 4 != 0 || shapes[0][2] % d != 0) return 3;
    h = shapes[0][2] / d - 2 * g;
    if (h < g || h % g != 0 || shapes[0][0] != b) return 3;
    for (int i : {1, 2})
      if (shapes[i][0] != b || shapes[i][1] != s || shapes[i][2] != 1 || shapes[i][3] != d / 4) return 4;
    for (int i : {3, 4})
      if (shapes[i][0] != b || shapes[i][1] != s || shapes[i][2] != L) return 4;
    for (int i : {6, 8, 9})
      for (int a = 0; a < 4; ++a)
        if (shapes[i][a] != shapes[5][a]) return 4;
    if (shapes[7][0] != b || shapes[7][1] != s || shapes[7][2] != h * d) return 4;
    const float **in[7] = {&qkv, &cos, &sin, &mask, &write, &k, &v};
    for (int i = 0; i < 7; ++i) *in[i] = static_cast<const float *>(params[i]);
    ctx = static_cast<float *>(params[7]), k_out = static_cast<float *>(params[8]);
    v_out = static_cast<float *>(params[9]);
    return 0;
  }

  const float *token(int64_t bi, int64_t t) const { return qkv + (bi * s + t) * (h + 2 * g) * d; }
  const float *angles(const float *table, int64_t bi, int64_t t) const { return table + (bi * s + t) * (d / 4); }
  int64_t slab(int64_t bi, int64_t gi) const { return (bi * g + gi) * L * d; }  // a group's cache, in floats
};

// RoPE on the first half of a head as interleaved pairs, (x0, x1) -> (x0 c - x1 s, x1 c + x0 s); the rest as is.
void rope(const float *x, const float *c, const float *sn, int64_t d, float *out) {
  for (int64_t p = 0; p < d / 4; ++p) {
    const float x0 = x[2 * p], x1 = x[2 * p + 1];
    out[2 * p] = x0 * c[p] - x1 * sn[p];
    out[2 * p + 1] = x1 * c[p] + x0 * sn[p];
  }
  memcpy(out + d / 2, x + d / 2, (d - d / 2) * sizeof(float));
}

void axpy(float a, const float *x, float *y, int64_t n) {  // y += a x
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// The caches copied (unless updated in place), then each new token's rotated k and its v written to its slot.
void write_caches(const Operands &a) {
  const int64_t d = a.d;
  const bool copy_k = a.k_out != a.k, copy_v = a.v_out != a.v;
  if (copy_k || copy_v) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < a.b * a.g; ++i) {
      if (copy_k) memcpy(a.k_out + i * a.L * d, a.k + i * a.L * d, a.L * d * sizeof(float));
      if (copy_v) memcpy(a.v_out + i * a.L * d, a.v + i * a.L * d, a.L * d * sizeof(float));
    }
  }
  for (int64_t bi = 0; bi < a.b; ++bi)
    for (int64_t t = 0; t < a.s; ++t) {
      const float *slots = a.write + (bi * a.s + t) * a.L, *x = a.token(bi, t) + a.h * d;
      for (int64_t l = 0; l < a.L; ++l) {
        if (slots[l] == 0.0f) continue;
        for (int64_t gi = 0; gi < a.g; ++gi) {
          const int64_t at = a.slab(bi, gi) + l * d;
          rope(x + gi * d, a.angles(a.cos, bi, t), a.angles(a.sin, bi, t), d, a.k_out + at);
          memcpy(a.v_out + at, x + (a.g + gi) * d, d * sizeof(float));
        }
      }
    }
}

// One query (row bi, token t, head j) against its group's cache: softmax(q·k · scale + mask) · v. A hidden
// position's score is −inf, whose e^x is 0.
void attend_one(const Operands &a, int64_t bi, int64_t t, int64_t j, float *q, float *scores) {
  const int64_t d = a.d, L = a.L, gi = j / (a.h / a.g);
  rope(a.token(bi, t) + j * d, a.angles(a.cos, bi, t), a.angles(a.sin, bi, t), d, q);
  const float *mask = a.mask + (bi * a.s + t) * L, *keys = a.k_out + a.slab(bi, gi);
  const float *values = a.v_out + a.slab(bi, gi);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  bool any = false;
  for (int64_t l = 0; l < L && !any; ++l) any = mask[l] > kHidden;
  float top = -INFINITY;
  for (int64_t l = 0; l < L; ++l) {
    scores[l] = any && mask[l] <= kHidden ? -INFINITY : vm::dot(q, keys + l * d, d) * scale + mask[l];
    top = std::fmax(top, scores[l]);
  }
  const __m256 top8 = _mm256_set1_ps(top);
  __m256 sum8 = _mm256_setzero_ps();
  int64_t l = 0;
  for (; l + 8 <= L; l += 8) {
    const __m256 e = vm::exp(_mm256_sub_ps(_mm256_loadu_ps(scores + l), top8));
    _mm256_storeu_ps(scores + l, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float total = vm::hsum(sum8);
  for (; l < L; ++l) total += scores[l] = std::exp(scores[l] - top);
  float *out = a.ctx + (bi * a.s + t) * a.h * d + j * d;
  memset(out, 0, d * sizeof(float));
  for (l = 0; l < L; ++l)
    if (scores[l] != 0.0f) axpy(scores[l] / total, values + l * d, out, d);
}

}  // namespace

extern "C" int Attend(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                      void *extra) {
  (void)stream, (void)extra;
  Operands a;
  if (const int error = a.parse(nparam, params, ndims, shapes, dtypes)) return error;
  write_caches(a);
  const int64_t tasks = a.b * a.s * a.h;
#pragma omp parallel
  {
    std::vector<float> q(a.d), scores(a.L);
#pragma omp for schedule(static, 1)
    for (int64_t i = 0; i < tasks; ++i) attend_one(a, i / (a.s * a.h), i / a.h % a.s, i % a.h, q.data(), scores.data());
  }
  return 0;
}
