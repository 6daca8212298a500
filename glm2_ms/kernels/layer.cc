// A whole decoder layer in one call, float32 in and out, for inference against the KV cache: the input RMSNorm, the
// fused q/k/v projection and its bias, attention (attention.cc), the output projection, the residual add, the
// post-attention RMSNorm, the MLP's two projections around SwiGLU, and the second residual add; with GLM-4-0414's
// sandwich norms when given. Each step is the library's own entry point, called in the order model.py's Block runs
// them one operator each, so the result is the same to the bit.
//
// Why: with those steps as one operator each, a decoding step still dispatches a dozen MindSpore operators a layer,
// with the reshapes between them. Op by op each costs a fixed dispatch; compiled, the graph of those calls holds
// compiler memory for every layer for as long as it lives. One operator a layer costs neither, so the step can run
// op by op at the pace of its arithmetic.
//
// Entry points in MindSpore's "aot" custom-operator form, "Layer", and "LayerQ8" (weights in blocks take their input
// quantized to q8_0 blocks first, as LinearQ8). Inputs:
//   0 x [b, s, hidden] float32; 1-6 cos, sin, mask, write, k, v as Attend takes them; 7 eps [1] float32;
//   8 the input norm's weight [hidden]; 9 W_qkv; 10 its bias [rows of W_qkv]; 11 W_dense;
//   12 the post-attention norm's weight [hidden]; 13 W_h_to_4h [2f, hidden]; 14 W_4h_to_h [hidden, f];
//   optionally 15 and 16, the norms on the attention's and the MLP's outputs (GLM-4-0414).
// Norm weights and the bias in float32, float16 or bfloat16; W as Linear takes them. Output: x' [b, s, hidden]. The
// caches k and v are updated in place (Attend given their own memory as the new caches): a step then holds the KV
// cache once, not the old and the new side by side. MindSpore hands an operator a copy of some tensors (a view, a
// tensor a slice assignment covered whole), whose writes would be lost: "Addresses" gives the memory an operator is
// handed for each of its operands, for the caller to compare with the tensors' own (glm2_ms.generation).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <initializer_list>
#include <memory>
#include <vector>

#include "vector_math.h"

#define ENTRY(name) int name(int, void **, int *, int64_t **, const char **, void *, void *)
extern "C" {
ENTRY(Linear);
ENTRY(LinearQ8);
ENTRY(Attend);
ENTRY(RmsNorm);
ENTRY(SwiGlu);
}

namespace {

using Entry = ENTRY((*));

// One operand of a call into another entry point.
struct Operand {
  const void *data;
  std::vector<int64_t> shape;
  const char *dtype = "float32";
};

int call(Entry entry, std::initializer_list<Operand> operands) {
  std::vector<Operand> held(operands);
  std::vector<void *> params;
  std::vector<int> ndims;
  std::vector<int64_t *> shapes;
  std::vector<const char *> dtypes;
  for (Operand &o : held) {
    params.push_back(const_cast<void *>(o.data));
    ndims.push_back(static_cast<int>(o.shape.size()));
    shapes.push_back(o.shape.data());
    dtypes.push_back(o.dtype);
  }
  return entry(static_cast<int>(held.size()), params.data(), ndims.data(), shapes.data(), dtypes.data(), nullptr,
               nullptr);
}

// The operands as MindSpore hands them over.
struct Given {
  void **params;
  int *ndims;
  int64_t **shapes;
  const char **dtypes;

  Operand at(int i) const {
    return {params[i], std::vector<int64_t>(shapes[i], shapes[i] + ndims[i]), dtypes[i]};
  }
};

enum : int { kX, kEps = 7, kNorm1, kQkv, kBias, kDense, kNorm2, kUp, kDown, kAfterAttention, kAfterMlp };

struct Layer {
  Given in;
  bool q8, sandwich;
  int64_t m, hidden;
  float *x_out;

  // y [m, rows of W] = x [m, k] · W(in[w])ᵀ, through LinearQ8 where asked and W is in blocks.
  int project(const float *x, int64_t k, int w, float *y) const {
    const bool blocks = strcmp(in.dtypes[w], "uint8") == 0;
    return call(q8 && blocks ? LinearQ8 : Linear,
                {{x, {m, k}}, in.at(w), {y, {m, in.shapes[w][0]}}});
  }

  int norm(const float *x, int weight, float *y) const {
    return call(RmsNorm, {{x, {m, hidden}}, in.at(weight), in.at(kEps), {y, {m, hidden}}});
  }

  // x_out = x + branch, after the branch's sandwich norm (`weight`) where the layer has them
  int add(const float *x, float *branch, int weight) const {
    if (sandwich)
      if (const int error = norm(branch, weight, branch)) return error;  // a row is read whole before it is written
    for (int64_t i = 0; i < m * hidden; ++i) x_out[i] = x[i] + branch[i];
    return 0;
  }

  // the attention's output projection into `branch`, the new tokens' k and v into the caches; `normed`, `qkv` and
  // `ctx` are its scratch
  int attention(float *branch, float *normed, float *qkv, float *ctx) const {
    const int64_t rows = in.shapes[kQkv][0], b = in.shapes[kX][0], s = in.shapes[kX][1], width = ctx_width();
    const int kind = vm::weight_kind(in.dtypes[kBias]);
    const float *x = static_cast<const float *>(in.params[kX]);
    if (const int error = norm(x, kNorm1, normed)) return error;
    if (const int error = project(normed, hidden, kQkv, qkv)) return error;
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = 0; j < rows; ++j) qkv[r * rows + j] += vm::weight_at(in.params[kBias], kind, j);
    if (const int error = call(Attend, {{qkv, {b, s, rows}}, in.at(1), in.at(2), in.at(3), in.at(4), in.at(5),
                                        in.at(6), {ctx, {b, s, width}}, in.at(5), in.at(6)}))
      return error;
    return project(ctx, width, kDense, branch);
  }

  // the MLP's output into `branch`; `normed`, `up` and `glu` are its scratch
  int mlp(float *branch, float *normed, float *up, float *glu) const {
    const int64_t f = in.shapes[kUp][0] / 2;
    if (const int error = norm(x_out, kNorm2, normed)) return error;
    if (const int error = project(normed, hidden, kUp, up)) return error;
    if (const int error = call(SwiGlu, {{up, {m, 2 * f}}, {glu, {m, f}}})) return error;
    return project(glu, f, kDown, branch);
  }

  int64_t ctx_width() const { return in.shapes[kQkv][0] - 2 * in.shapes[5][1] * in.shapes[5][3]; }  // g·d for k, v

  int run() {
    const int64_t rows = in.shapes[kQkv][0], width = ctx_width(), f = in.shapes[kUp][0] / 2;
    if (width < 1 || in.ndims[kBias] != 1 || in.shapes[kBias][0] != rows || vm::weight_kind(in.dtypes[kBias]) < 0)
      return 4;
    // the branch and the normed input, then the attention's and the MLP's intermediates over the same floats; from
    // malloc, which gives a prompt's block back to the system when freed (glm2_ms.generation.give_back_freed_blocks
    // holds glibc's threshold), checked: no exception crosses the C boundary
    const std::unique_ptr<float, decltype(&free)> scratch(
        static_cast<float *>(malloc(sizeof(float) * m * (2 * hidden + std::max(rows + width, 3 * f)))), free);
    if (!scratch) return 5;
    float *branch = scratch.get(), *normed = branch + m * hidden, *rest = normed + m * hidden;
    if (const int error = attention(branch, normed, rest, rest + m * rows)) return error;
    if (const int error = add(static_cast<const float *>(in.params[kX]), branch, kAfterAttention)) return error;
    if (const int error = mlp(branch, normed, rest, rest + m * 2 * f)) return error;
    return add(x_out, branch, kAfterMlp);
  }
};

int layer_entry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool q8) {
  const bool sandwich = nparam == kAfterMlp + 2;
  if (nparam != kAfterAttention + 1 && !sandwich) return 1;
  const int inputs = nparam - 1;  // the output follows the inputs
  if (ndims[kX] != 3 || ndims[inputs] != 3) return 1;
  if (strcmp(dtypes[kX], "float32") != 0 || strcmp(dtypes[inputs], "float32") != 0) return 2;
  if (ndims[kQkv] != 2 || ndims[5] != 4) return 1;  // read before the calls that check them
  const int64_t hidden = shapes[kX][2];
  for (int a = 0; a < 3; ++a)
    if (shapes[inputs][a] != shapes[kX][a]) return 4;
  // the two projections back to the residual stream must give its width (each checks its own input's)
  for (int w : {kDense, kDown})
    if (ndims[w] != 2 || shapes[w][0] != hidden) return 4;
  if (ndims[kUp] != 2 || shapes[kUp][0] % 2 != 0) return 4;
  Layer layer{{params, ndims, shapes, dtypes}, q8, sandwich, shapes[kX][0] * shapes[kX][1], hidden,
              static_cast<float *>(params[inputs])};
  return layer.run();
}

// Every layer of a model in turn, each as layer_entry computes it, in place on the output (a layer reads each
// element of its input before it writes that element of its output). Operands: 0 x; 1-4 cos, sin, mask, write; 5
// eps; then each layer's own: k, v, the input norm, W_qkv, its bias, W_dense, the post-attention norm, W_h_to_4h,
// W_4h_to_h[, the two sandwich norms]; the output last. A layer's own count is told by its 10th operand: a sandwich
// norm is 1-D, where the next layer's k (or, for one layer, the output) is not.
constexpr int kShared = 6, kOwn = 9;

int layers_entry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool q8) {
  const int inputs = nparam - 1;
  if (inputs < kShared + kOwn || ndims[kX] != 3 || ndims[inputs] != 3) return 1;
  if (strcmp(dtypes[kX], "float32") != 0 || strcmp(dtypes[inputs], "float32") != 0) return 2;
  const int own = ndims[kShared + kOwn] == 1 ? kOwn + 2 : kOwn;
  if ((inputs - kShared) % own != 0) return 1;
  for (int a = 0; a < 3; ++a)
    if (shapes[inputs][a] != shapes[kX][a]) return 4;
  memcpy(params[inputs], params[kX], sizeof(float) * shapes[kX][0] * shapes[kX][1] * shapes[kX][2]);
  for (int first = kShared; first < inputs; first += own) {
    // Layer's operands: x, cos, sin, mask, write, k, v, eps, the layer's weights, the output (x and the output: ours)
    int at[kAfterMlp + 2], n = 0;
    for (int i : {inputs, 1, 2, 3, 4, first, first + 1, 5}) at[n++] = i;
    for (int i = first + 2; i < first + own; ++i) at[n++] = i;
    at[n++] = inputs;
    void *p[kAfterMlp + 2];
    int d[kAfterMlp + 2];
    int64_t *s[kAfterMlp + 2];
    const char *t[kAfterMlp + 2];
    for (int i = 0; i < n; ++i) p[i] = params[at[i]], d[i] = ndims[at[i]], s[i] = shapes[at[i]], t[i] = dtypes[at[i]];
    if (const int error = layer_entry(n, p, d, s, t, q8)) return error;
  }
  return 0;
}

}  // namespace

// Layer and Layers, and their forms over q8_0 activations (LayerQ8, LayersQ8).
#define LAYER_ENTRY(name, fn, q8)                                                                              \
  extern "C" int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, \
                      void *extra) {                                                                           \
    (void)stream, (void)extra;                                                                                 \
    return fn(nparam, params, ndims, shapes, dtypes, q8);                                                      \
  }
LAYER_ENTRY(Layer, layer_entry, false)
LAYER_ENTRY(LayerQ8, layer_entry, true)
LAYER_ENTRY(Layers, layers_entry, false)
LAYER_ENTRY(LayersQ8, layers_entry, true)

// The address of each input's memory as an operator is handed it, int64 [nparam - 1].
extern "C" int Addresses(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                         void *extra) {
  (void)ndims, (void)stream, (void)extra;
  const int inputs = nparam - 1;
  if (inputs < 1 || shapes[inputs][0] != inputs || strcmp(dtypes[inputs], "int64") != 0) return 1;
  int64_t *out = static_cast<int64_t *>(params[inputs]);
  for (int i = 0; i < inputs; ++i) out[i] = static_cast<int64_t>(reinterpret_cast<intptr_t>(params[i]));
  return 0;
}
