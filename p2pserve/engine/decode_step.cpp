// A decode step of a stage's decoder layers in one call from Python (kernels.DecodeStep),
// and the Python bindings of this extension (gemv.cpp's GEMVs come first in the same unit).
//
// In a decode step every sequence of the batch adds one token. Its arithmetic is a few
// GEMVs a layer plus loops over a few hundred values, so in eager PyTorch the cost of its
// ~40 ops a layer (Python, the dispatcher, allocations, a parallel region each) is a large
// part of the step on a CPU. Here a layer is its GEMVs (gemv.cpp, one parallel region
// each), one parallel region for the attention, and plain loops for the rest.
//
// The arithmetic is model.py's, which is transformers': RMSNorm as w * (x * rsqrt(mean(x^2)
// + eps)), Hugging Face's rotate-half RoPE from the stage's cos and signed-sin tables,
// softmax(q k^T / sqrt(d)) v over the sequence's cached positions and the new one, and
// SiLU(gate) * up, or a mixture of such MLPs (model.MoE). Activations are fp32; the
// weights are gemv.cpp's fp32, int8, int4 or bf16. A bf16 stage's step takes and returns
// bf16 hidden states, but computes in fp32 in between: only what the modules store in bf16
// (weights, the hidden state between stages) is rounded to it, and each GEMV rounds its
// input. The KV cache is fp32, bf16, fp16 or int8 (the stage's kv_dtype): keys and values
// are rounded to it as they are stored, as the modules store them.
#include <pybind11/stl.h>
#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <type_traits>

namespace py = pybind11;

// A linear weight as model.py and quant.py hold it, multiplied by gemv.cpp's loops.
struct Linear {
  enum Kind { F32, BF16, INT8, INT8_SPLIT, INT4_F16, INT4_F32 };
  Kind kind = F32;
  torch::Tensor w, scales, mins;
  int64_t in = 0, out = 0, groups = 1;

  // fp32 or bf16 [out, in]; int8 [out, in] with fp32 scales [out, G] (or uint8 [out, in] in
  // gemv.cpp's split layout, pack_int8's, and no mins); int4 uint8 [out, in / 2] in
  // gemv.cpp's blocks with scales and mins [out, G], both fp16 or both fp32
  Linear(torch::Tensor w_, c10::optional<torch::Tensor> s, c10::optional<torch::Tensor> m)
      : w(w_.contiguous()), out(w_.size(0)) {
    TORCH_CHECK(w.dim() == 2 && w.device().is_cpu(), "a weight is [out, in] on the CPU");
    switch (w.scalar_type()) {
      case at::kFloat:
        kind = F32, in = w.size(1);
        return;
      case at::kBFloat16:
        kind = BF16, in = w.size(1);
        return;
      case at::kChar:
        TORCH_CHECK(s.has_value(), "an int8 weight has scales");
        check_int8(w, *s);
        kind = INT8, in = w.size(1), scales = s->contiguous(), groups = scales.size(1);
        return;
      case at::kByte: {
        if (!m.has_value()) {  // int8 in the split layout
          TORCH_CHECK(s.has_value() && check_int8(w, *s), "an int8 weight in the split layout has scales");
          kind = INT8_SPLIT, in = w.size(1), scales = s->contiguous(), groups = scales.size(1);
          return;
        }
        TORCH_CHECK(s.has_value() && m.has_value() && s->dim() == 2 && s->size(0) == out &&
                    m->sizes() == s->sizes() && m->scalar_type() == s->scalar_type() &&
                    (s->scalar_type() == at::kHalf || s->scalar_type() == at::kFloat),
                    "int4 scales and mins: [out, groups], both fp16 or both fp32");
        kind = s->scalar_type() == at::kHalf ? INT4_F16 : INT4_F32;
        in = w.size(1) * 2, scales = s->contiguous(), mins = m->contiguous(), groups = scales.size(1);
        TORCH_CHECK(in % groups == 0 && (in / groups) % 32 == 0 && in / groups <= 1024,
                    "int4 groups of a multiple of 32 inputs, at most 1024");
        return;
      }
      default:
        TORCH_CHECK(false, "a weight is fp32, bf16, int8 or packed int4");
    }
  }

  // Y [M, out] = X [M, in] @ W^T
  void apply(const float* X, int64_t M, float* Y) const {
    switch (kind) {
      case F32: f32_rows(X, w.data_ptr<float>(), Y, M, in, out); break;
      case BF16: bf16_rows(X, w.data_ptr<c10::BFloat16>(), Y, M, in, out); break;
      case INT8: int8_rows(X, w.data_ptr<int8_t>(), scales.data_ptr<float>(), Y, M, in, out, groups); break;
      case INT8_SPLIT:  // only built where the layout is (check_int8)
#if defined(P2P_INT8_SPLIT)
        int8_split(X, w.data_ptr<uint8_t>(), scales.data_ptr<float>(), Y, M, in, out, groups);
#endif
        break;
      case INT4_F16:
        int4_rows(X, w.data_ptr<uint8_t>(), scales.data_ptr<c10::Half>(), mins.data_ptr<c10::Half>(), Y, M, in,
                  out, groups);
        break;
      case INT4_F32:
        int4_rows(X, w.data_ptr<uint8_t>(), scales.data_ptr<float>(), mins.data_ptr<float>(), Y, M, in, out,
                  groups);
        break;
    }
  }
};

#if defined(P2P_AVX2)
static inline __m256 load8(const int8_t* p) {  // an int8 cache's: times its row's scale after
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#endif

// a cached key or value: fp32, bf16, fp16 or int8 (model.KVCache)
template <class T>
static float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(P2P_AVX2)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc);
  s = hsum(acc);
#endif
  for (; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

// out[h * d + e] = sum_j p[h * n + j] * values[j * d + e] for e < d and H query heads h of
// one KV group, the sums in the order of j. Each value row is loaded once for the H heads,
// and 32 of out's values a head are summed in registers over all of j, then the next 32:
// adding one value row at a time into out in memory made each row's FMAs wait on the last
// row's stores, most of a long context's attention.
template <int H, class T>
static void weighted_sum(const float* p, const T* values, int64_t d, int64_t n, float* out) {
  int64_t e0 = 0;
#if defined(P2P_AVX2)
  while (e0 + 8 <= d) {
    const int64_t vectors = std::min<int64_t>(4, (d - e0) / 8);  // whole vectors of 8 in this pass
    with_rows<4>(vectors, [&](auto R) {
      constexpr int K = decltype(R)::value;
      __m256 acc[H][K];
      for (int h = 0; h < H; ++h)
        for (int k = 0; k < K; ++k) acc[h][k] = _mm256_setzero_ps();
      for (int64_t j = 0; j < n; ++j) {
        __m256 w[H];
        for (int h = 0; h < H; ++h) w[h] = _mm256_set1_ps(p[h * n + j]);
        const T* v = values + j * d + e0;
        for (int k = 0; k < K; ++k) {
          const __m256 x = load8(v + 8 * k);
          for (int h = 0; h < H; ++h) acc[h][k] = _mm256_fmadd_ps(w[h], x, acc[h][k]);
        }
      }
      for (int h = 0; h < H; ++h)
        for (int k = 0; k < K; ++k) _mm256_storeu_ps(out + h * d + e0 + 8 * k, acc[h][k]);
    });
    e0 += 8 * vectors;
  }
#endif
  for (int h = 0; h < H; ++h)
    for (int64_t e = e0; e < d; ++e) {
      float s = 0.f;
      for (int64_t j = 0; j < n; ++j) s += p[h * n + j] * static_cast<float>(values[j * d + e]);
      out[h * d + e] = s;
    }
}

#if defined(P2P_AVX2)
// e^x for 8 floats: Cephes' expf (x = n ln 2 + r, a degree-6 polynomial in r, times 2^n),
// within 2 ulp of std::exp, which called one value at a time was most of a long context's
// attention (an exp per cached position, head and layer) and of the MLP's SiLU
static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.37626f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}
#endif

// Fetches n values from p on into L2. A chunk's keys and values stream from memory
// once for a whole KV group; the hardware prefetchers alone ran too few lines ahead of
// that stream (the loads of each row's first lines waited on memory), so the scores' loop
// fetches the keys KEYS_AHEAD rows on, and the values its weighted sum will read next.
// Prefetches past the end of the cache do not fault.
constexpr int64_t KEYS_AHEAD = 16;
template <class T>
static inline void prefetch_l2(const T* p, int64_t n) {
#if defined(P2P_AVX2)
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(c + b, _MM_HINT_T1);
#endif
}

// p[h * n + j] = (q[h * d ..] . keys[j * d ..]) * scale for j < n and H query heads h of one
// KV group (keys of d values); top[h] = the largest of head h's. Four keys at a time, each
// key loaded once for the H heads, each (head, key) its own chain of FMAs, summed across
// lanes together at the end. `values`: the same rows' values, fetched for weighted_sum.
// An int8 cache's keys are integers times their row's scale (`key_scales`, else null).
template <int H, class T>
static void scores(const float* q, const T* keys, const float* key_scales, int64_t d, int64_t n, float scale,
                   float* p, float* top, const T* values) {
  constexpr bool scaled = std::is_same_v<T, int8_t>;
  int64_t j = 0;
  for (int h = 0; h < H; ++h) top[h] = -INFINITY;
#if defined(P2P_AVX2)
  if (d % 8 == 0) {
    __m128 most[H];
    for (int h = 0; h < H; ++h) most[h] = _mm_set1_ps(-INFINITY);
    for (; j + 4 <= n; j += 4) {
      __m256 acc[H][4];
      for (int h = 0; h < H; ++h)
        for (int k = 0; k < 4; ++k) acc[h][k] = _mm256_setzero_ps();
      prefetch_l2(keys + (j + KEYS_AHEAD) * d, 4 * d);
      prefetch_l2(values + j * d, 4 * d);
      for (int64_t e = 0; e < d; e += 8) {
        __m256 qv[H];
        for (int h = 0; h < H; ++h) qv[h] = _mm256_loadu_ps(q + h * d + e);
        for (int k = 0; k < 4; ++k) {
          const __m256 x = load8(keys + (j + k) * d + e);
          for (int h = 0; h < H; ++h) acc[h][k] = _mm256_fmadd_ps(qv[h], x, acc[h][k]);
        }
      }
      for (int h = 0; h < H; ++h) {
        // lanes k and 4 + k: halves of key j + k's dot product
        const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(acc[h][0], acc[h][1]), _mm256_hadd_ps(acc[h][2], acc[h][3]));
        __m128 sc = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)),
                               _mm_set1_ps(scale));
        if constexpr (scaled) sc = _mm_mul_ps(sc, _mm_loadu_ps(key_scales + j));
        _mm_storeu_ps(p + h * n + j, sc);
        most[h] = _mm_max_ps(most[h], sc);
      }
    }
    for (int h = 0; h < H; ++h) {
      alignas(16) float m[4];
      _mm_store_ps(m, most[h]);
      for (const float v : m) top[h] = std::max(top[h], v);
    }
  }
#endif
  for (; j < n; ++j)
    for (int h = 0; h < H; ++h) {
      float sc = dot(q + h * d, keys + j * d, d) * scale;
      if constexpr (scaled) sc *= key_scales[j];
      top[h] = std::max(top[h], p[h * n + j] = sc);
    }
}

// p[j] = e^(p[j] - top) for j < n; returns their sum
static float exp_shifted(float* p, int64_t n, float top) {
  int64_t j = 0;
  float sum = 0.f;
#if defined(P2P_AVX2)
  __m256 acc = _mm256_setzero_ps();
  const __m256 t = _mm256_set1_ps(top);
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), t));
    _mm256_storeu_ps(p + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; j < n; ++j) sum += p[j] = std::exp(p[j] - top);
  return sum;
}

// out[j] = SiLU(gate[j]) * up[j] = gate / (1 + e^-gate) * up, for j < n
static void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  int64_t j = 0;
#if defined(P2P_AVX2)
  for (; j + 8 <= n; j += 8) {
    const __m256 g = _mm256_loadu_ps(gate + j);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)),
                                            _mm256_loadu_ps(up + j)));
  }
#endif
  for (; j < n; ++j) out[j] = gate[j] / (1.f + std::exp(-gate[j])) * up[j];
}

// y = w * (x * rsqrt(mean(x^2) + eps)); y may be x
static void rms_norm(const float* x, const float* w, float eps, float* y, int64_t n) {
  double ss = 0.0;  // the mean of squares as accurately as torch's cascaded sum, or more
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float r = 1.f / std::sqrt(static_cast<float>(ss / n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

struct Layer {
  torch::Tensor attn_norm, mlp_norm;  // [hidden]
  float eps;
  Linear qkv, o;                      // qkv: q, k, v rows stacked
  std::vector<Linear> gate_up, down;  // the MLP's (gate_up: gate then up), or each expert's
  std::optional<Linear> router;       // a mixture's [experts, hidden], or none (a dense MLP)
  int64_t top_k;                      // experts a token uses
  bool norm_topk;                     // their probabilities renormalised to sum to 1
  torch::Tensor bqkv;                 // [(n_q + 2 n_kv) d], or undefined
  torch::Tensor q_norm, k_norm;       // [d] each (Qwen3), or undefined
  float qk_eps;
  torch::Tensor k_cache, v_cache;     // [slots, n_kv, max_len, d], fp32, bf16, fp16 or int8
  torch::Tensor k_scales, v_scales;   // an int8 cache's [slots, n_kv, max_len] fp32, else undefined
};

// dst[j] = src[j] for j < n, rounded to nearest even into a bf16 or fp16 cache
template <class T>
static void store(const float* src, int64_t n, T* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = T(src[j]);
}
// into an int8 cache: src / s rounded to nearest even, s = max |src| / 127 (model.KVCache's
// arithmetic, so that both paths store the same integers)
static void store(const float* src, int64_t n, int8_t* dst, float* scale) {
  float most = 0.f;
  for (int64_t j = 0; j < n; ++j) most = std::max(most, std::fabs(src[j]));
  const float s = most / 127.f;
  *scale = s;
  for (int64_t j = 0; j < n; ++j) dst[j] = s > 0.f ? static_cast<int8_t>(std::nearbyint(src[j] / s)) : 0;
}

class DecodeStep {
 public:
  // cos, sin: [max_len, d], sin signed as model.rope_tables makes it, in the stage's dtype
  DecodeStep(int64_t hidden, int64_t n_q, int64_t n_kv, int64_t head_dim, torch::Tensor cos, torch::Tensor sin)
      : hidden_(hidden), n_q_(n_q), n_kv_(n_kv), d_(head_dim) {
    TORCH_CHECK(n_kv >= 1 && n_q % n_kv == 0 && head_dim % 2 == 0, "heads: n_q a multiple of n_kv, d even");
    TORCH_CHECK(cos.is_floating_point() && cos.dim() == 2 && cos.size(1) == head_dim && sin.sizes() == cos.sizes() &&
                sin.is_floating_point(), "cos, sin: [max_len, d] floats");
    cos_ = cos.to(at::kFloat).contiguous(), sin_ = sin.to(at::kFloat).contiguous();
  }

  // gate_up and down: one each for a dense MLP; for a mixture of experts one an expert,
  // with its router, the experts a token uses (top_k) and whether their weights are
  // renormalised over them (norm_topk)
  void add_layer(torch::Tensor attn_norm, torch::Tensor mlp_norm, double eps, Linear qkv, Linear o,
                 std::vector<Linear> gate_up, std::vector<Linear> down, std::optional<Linear> router,
                 int64_t top_k, bool norm_topk, c10::optional<torch::Tensor> bqkv,
                 c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm, double qk_eps,
                 torch::Tensor k_cache, torch::Tensor v_cache, c10::optional<torch::Tensor> k_scales,
                 c10::optional<torch::Tensor> v_scales) {
    const int64_t width = (n_q_ + 2 * n_kv_) * d_;
    auto vec = [](const torch::Tensor& t, int64_t n) {  // held as fp32 (a bf16 stage's: a copy)
      TORCH_CHECK(t.is_floating_point() && t.numel() == n, "a norm weight or bias: [", n, "] floats");
      return t.to(at::kFloat).contiguous();
    };
    TORCH_CHECK(qkv.in == hidden_ && qkv.out == width && o.in == n_q_ * d_ && o.out == hidden_,
                "the layer's attention weights do not have the stage's shapes");
    const int64_t experts = static_cast<int64_t>(gate_up.size());
    TORCH_CHECK(experts >= 1 && static_cast<int64_t>(down.size()) == experts &&
                (router ? router->in == hidden_ && router->out == experts && 1 <= top_k && top_k <= experts
                        : experts == 1), "an MLP, or a router over its experts and 1 <= top_k <= experts");
    for (int64_t e = 0; e < experts; ++e)
      TORCH_CHECK(gate_up[e].in == hidden_ && gate_up[e].out == gate_up[0].out && gate_up[e].out % 2 == 0 &&
                  down[e].in == gate_up[e].out / 2 && down[e].out == hidden_,
                  "the layer's MLP weights do not have the stage's shapes");
    const auto cache_type = k_cache.scalar_type();
    TORCH_CHECK(k_cache.is_contiguous() &&
                (cache_type == at::kFloat || cache_type == at::kBFloat16 || cache_type == at::kHalf ||
                 cache_type == at::kChar) &&
                k_cache.dim() == 4 && k_cache.size(1) == n_kv_ && k_cache.size(2) == cos_.size(0) &&
                k_cache.size(3) == d_ && v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous() &&
                v_cache.scalar_type() == cache_type,
                "k/v cache: [slots, n_kv, max_len, d] fp32, bf16, fp16 or int8 contiguous");
    const bool int8 = cache_type == at::kChar;
    TORCH_CHECK(k_scales.has_value() == int8 && v_scales.has_value() == int8 &&
                (!int8 || (k_scales->scalar_type() == at::kFloat && k_scales->is_contiguous() &&
                           k_scales->sizes() == k_cache.sizes().slice(0, 3) && v_scales->sizes() == k_scales->sizes() &&
                           v_scales->scalar_type() == at::kFloat && v_scales->is_contiguous())),
                "an int8 cache's scales, and only its: [slots, n_kv, max_len] fp32 contiguous");
    TORCH_CHECK(layers_.empty() || layers_[0].k_cache.scalar_type() == cache_type, "every layer's cache one dtype");
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "q and k norms come together");
    Layer l{vec(attn_norm, hidden_), vec(mlp_norm, hidden_), static_cast<float>(eps), std::move(qkv),
            std::move(o), std::move(gate_up), std::move(down), std::move(router), top_k, norm_topk,
            bqkv ? vec(*bqkv, width) : torch::Tensor(),
            q_norm ? vec(*q_norm, d_) : torch::Tensor(), k_norm ? vec(*k_norm, d_) : torch::Tensor(),
            static_cast<float>(qk_eps), k_cache, v_cache, int8 ? *k_scales : torch::Tensor(),
            int8 ? *v_scales : torch::Tensor()};
    layers_.push_back(std::move(l));
  }

  // The last stage's final norm and LM head, for forward_logits: run straight after the
  // layers, the head's GEMV finds the OpenMP threads still awake, and no Python op (a norm
  // costs more there than the GEMV of a layer) comes between
  void set_head(torch::Tensor norm, double eps, Linear head) {
    TORCH_CHECK(norm.is_floating_point() && norm.numel() == hidden_, "the final norm: [", hidden_, "] floats");
    TORCH_CHECK(head.in == hidden_, "the head's rows are not [", hidden_, "] long");
    head_norm_ = norm.to(at::kFloat).contiguous(), head_eps_ = static_cast<float>(eps), head_.emplace(std::move(head));
  }

  int64_t n_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x [B, hidden] entering the first layer -> leaving the last, in x's dtype; sequence b is
  // in cache slot slots[b] and holds starts[b] tokens before this one
  torch::Tensor forward(torch::Tensor input, std::vector<int64_t> slots, std::vector<int64_t> starts) const {
    Awake awake;
    return forward_(input, slots, starts);
  }

  // forward, then the final norm and the head (set_head): the logits [B, vocab] fp32
  torch::Tensor forward_logits(torch::Tensor input, std::vector<int64_t> slots, std::vector<int64_t> starts) const {
    TORCH_CHECK(head_.has_value(), "the step holds no head");
    Awake awake;
    torch::Tensor x = forward_(input.to(at::kFloat), slots, starts);
    const int64_t B = x.size(0);
    float* X = x.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) rms_norm(X + b * hidden_, head_norm_.data_ptr<float>(), head_eps_, X + b * hidden_, hidden_);
    auto y = torch::empty({B, head_->out}, x.options());
    head_->apply(X, B, y.data_ptr<float>());
    return y;
  }

  // Layer i's two halves, each returning what its residual adds (fp32), for a TP rank, which
  // sums each over its group between them
  torch::Tensor attention(int64_t i, torch::Tensor x, std::vector<int64_t> slots, std::vector<int64_t> starts) const {
    TORCH_CHECK(0 <= i && i < n_layers(), "no layer ", i);
    return attention_(i, checked(x, slots, starts), slots, starts);
  }
  torch::Tensor mlp(int64_t i, torch::Tensor x) const {
    TORCH_CHECK(0 <= i && i < n_layers(), "no layer ", i);
    TORCH_CHECK(x.dim() == 2 && x.size(1) == hidden_ && x.is_floating_point() && x.device().is_cpu(),
                "x: [B, hidden] floats");
    return mlp_(i, x.to(at::kFloat).contiguous());
  }

 private:
  int64_t hidden_, n_q_, n_kv_, d_;
  torch::Tensor cos_, sin_;
  std::vector<Layer> layers_;
  torch::Tensor head_norm_;
  float head_eps_ = 0.f;
  std::optional<Linear> head_;

  // The team's threads spin from a step's start, rather than sleep through the first
  // loop's wake-up, and sleep from its end: the cores are another stage's until the next
  // step (team.cpp)
  struct Awake {
    Awake() { team::wake(); }
    ~Awake() { team::park(); }
  };

  torch::Tensor forward_(const torch::Tensor& input, const std::vector<int64_t>& slots,
                         const std::vector<int64_t>& starts) const {
    torch::Tensor x = checked(input, slots, starts);
    if (x.data_ptr() == input.data_ptr()) x = x.clone();  // the residual adds in place: not into the caller's
    float* X = x.data_ptr<float>();
    const int64_t n = x.numel();
    for (int64_t i = 0; i < n_layers(); ++i) {
      torch::Tensor h = attention_(i, x, slots, starts);
      add(X, h.data_ptr<float>(), n);
      h = mlp_(i, x);
      add(X, h.data_ptr<float>(), n);
    }
    return x.to(input.scalar_type());
  }

  torch::Tensor checked(const torch::Tensor& x, const std::vector<int64_t>& slots,
                        const std::vector<int64_t>& starts) const {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == hidden_ && x.is_floating_point() && x.device().is_cpu(),
                "x: [B, hidden] floats");
    TORCH_CHECK(static_cast<int64_t>(slots.size()) == x.size(0) && slots.size() == starts.size(),
                "a slot and a start per row of x");
    if (!layers_.empty()) {
      const auto& k = layers_[0].k_cache;
      for (size_t b = 0; b < slots.size(); ++b)
        TORCH_CHECK(0 <= slots[b] && slots[b] < k.size(0) && 0 <= starts[b] && starts[b] < k.size(2),
                    "slot ", slots[b], " position ", starts[b], " is outside the cache");
    }
    return x.to(at::kFloat).contiguous();
  }

  static void add(float* x, const float* h, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] += h[i];
  }

  torch::Tensor attention_(int64_t i, const torch::Tensor& x, const std::vector<int64_t>& slots,
                           const std::vector<int64_t>& starts) const {
    const Layer& l = layers_[i];
    const int64_t B = x.size(0), width = (n_q_ + 2 * n_kv_) * d_;
    auto xn = torch::empty_like(x);
    float* XN = xn.data_ptr<float>();
    const float* X = x.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      rms_norm(X + b * hidden_, l.attn_norm.data_ptr<float>(), l.eps, XN + b * hidden_, hidden_);
    auto qkv = torch::empty({B, width}, x.options());
    float* QKV = qkv.data_ptr<float>();
    l.qkv.apply(XN, B, QKV);

    auto attn = torch::empty({B, n_q_ * d_}, x.options());
    if (l.k_cache.scalar_type() == at::kBFloat16)
      attend(l, QKV, slots, starts, l.k_cache.data_ptr<c10::BFloat16>(), l.v_cache.data_ptr<c10::BFloat16>(),
             attn.data_ptr<float>());
    else if (l.k_cache.scalar_type() == at::kHalf)
      attend(l, QKV, slots, starts, l.k_cache.data_ptr<c10::Half>(), l.v_cache.data_ptr<c10::Half>(),
             attn.data_ptr<float>());
    else if (l.k_cache.scalar_type() == at::kChar)
      attend(l, QKV, slots, starts, l.k_cache.data_ptr<int8_t>(), l.v_cache.data_ptr<int8_t>(),
             attn.data_ptr<float>());
    else
      attend(l, QKV, slots, starts, l.k_cache.data_ptr<float>(), l.v_cache.data_ptr<float>(), attn.data_ptr<float>());
    auto y = torch::empty_like(x);
    l.o.apply(attn.data_ptr<float>(), B, y.data_ptr<float>());
    return y;
  }

  // RoPE, the cache write and softmax(q k^T / sqrt(d)) v for every (sequence, query head),
  // from QKV [B, (n_q + 2 n_kv) d] into A [B, n_q d]; a KV group's query heads read the
  // same cached keys and values
  template <class T>
  void attend(const Layer& l, float* QKV, const std::vector<int64_t>& slots, const std::vector<int64_t>& starts,
              T* KC, T* VC, float* A) const {
    const int64_t B = static_cast<int64_t>(slots.size()), d = d_, half = d / 2, width = (n_q_ + 2 * n_kv_) * d;
    const int64_t max_len = l.k_cache.size(2);
    constexpr bool scaled = std::is_same_v<T, int8_t>;  // an int8 cache: a scale a row of d
    float* KS = scaled ? l.k_scales.data_ptr<float>() : nullptr;
    float* VS = scaled ? l.v_scales.data_ptr<float>() : nullptr;
    std::vector<float> swapped(d);
    for (int64_t b = 0; b < B; ++b) {
      float* row = QKV + b * width;
      if (l.bqkv.defined()) add(row, l.bqkv.data_ptr<float>(), width);
      if (l.q_norm.defined()) {
        for (int64_t h = 0; h < n_q_; ++h) rms_norm(row + h * d, l.q_norm.data_ptr<float>(), l.qk_eps, row + h * d, d);
        for (int64_t h = n_q_; h < n_q_ + n_kv_; ++h)
          rms_norm(row + h * d, l.k_norm.data_ptr<float>(), l.qk_eps, row + h * d, d);
      }
      // RoPE on the q and k heads: x * cos + [x2, x1] * signed_sin
      const float* c = cos_.data_ptr<float>() + starts[b] * d;
      const float* s = sin_.data_ptr<float>() + starts[b] * d;
      for (int64_t h = 0; h < n_q_ + n_kv_; ++h) {
        float* v = row + h * d;
        for (int64_t j = 0; j < half; ++j) swapped[j] = v[j + half], swapped[j + half] = v[j];
        for (int64_t j = 0; j < d; ++j) v[j] = v[j] * c[j] + swapped[j] * s[j];
      }
      for (int64_t g = 0; g < n_kv_; ++g) {
        const int64_t at = (slots[b] * n_kv_ + g) * max_len + starts[b];
        if constexpr (scaled) {
          store(row + (n_q_ + g) * d, d, KC + at * d, KS + at);
          store(row + (n_q_ + n_kv_ + g) * d, d, VC + at * d, VS + at);
        } else {
          store(row + (n_q_ + g) * d, d, KC + at * d);
          store(row + (n_q_ + n_kv_ + g) * d, d, VC + at * d);
        }
      }
    }
    // Work items: (sequence, chunk of CHUNK cached positions, KV group), in that order. An
    // item reads its chunk of the group's keys and values (each one stream in the cache)
    // once for the group's query heads, up to 3 at a time (their sums fill the registers),
    // and a long context's chunks spread over the threads, as a few groups a sequence do not.
    // Each (chunk, head) keeps its largest score, sum of exponentials and unnormalised output;
    // the softmax over every chunk rescales them to the largest score (flash-decoding). A
    // context of up to CHUNK positions is one chunk, computed exactly as a whole row.
    constexpr int64_t CHUNK = 256;
    const int64_t group = n_q_ / n_kv_;
    const float scale = 1.f / std::sqrt(static_cast<float>(d));
    // sequence b's (chunk, head)s: [first[b], first[b + 1]), each chunk's n_q heads in order
    std::vector<int64_t> chunks(B), first(B + 1, 0);
    for (int64_t b = 0; b < B; ++b) chunks[b] = (starts[b] + CHUNK) / CHUNK, first[b + 1] = first[b] + n_q_ * chunks[b];
    const int64_t n_heads = first[B];
    std::vector<float> tops(n_heads), sums(n_heads), outs(n_heads * d);
    team::parallel_for(0, n_heads / group, 1, [&](int64_t u0, int64_t u1) {
      std::vector<float> p;
      int64_t b = std::upper_bound(first.begin(), first.end(), u0 * group) - first.begin() - 1;
      for (int64_t t = u0 * group; t < u1 * group; t += group) {  // the item's first (chunk, head)
        while (t >= first[b + 1]) ++b;
        const int64_t r = t - first[b], c = r / n_q_, h0 = r % n_q_, g = h0 / group;
        const int64_t j0 = c * CHUNK, n = std::min(CHUNK, starts[b] + 1 - j0);
        const int64_t row0 = (slots[b] * n_kv_ + g) * max_len + j0;  // the chunk's first cached row
        const T* keys = KC + row0 * d;
        const T* values = VC + row0 * d;
        p.resize(std::min<int64_t>(group, 3) * n);
        for (int64_t i = 0; i < group;) {
          with_rows<3>(group - i, [&](auto H_) {
            constexpr int H = decltype(H_)::value;
            const int64_t u = t + i;
            scores<H>(QKV + b * width + (h0 + i) * d, keys, scaled ? KS + row0 : nullptr, d, n, scale, p.data(),
                      &tops[u], values);
            for (int h = 0; h < H; ++h) sums[u + h] = exp_shifted(p.data() + h * n, n, tops[u + h]);
            if constexpr (scaled)  // each value row's scale into its weights, after their sum
              for (int h = 0; h < H; ++h)
                for (int64_t j = 0; j < n; ++j) p[h * n + j] *= VS[row0 + j];
            weighted_sum<H>(p.data(), values, d, n, outs.data() + u * d);
            i += H;
          });
        }
      }
    });
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < n_q_; ++h) {
        auto item = [&](int64_t c) { return first[b] + c * n_q_ + h; };
        float top = -INFINITY, total = 0.f;
        for (int64_t c = 0; c < chunks[b]; ++c) top = std::max(top, tops[item(c)]);
        float* out = A + b * n_q_ * d + h * d;
        std::fill(out, out + d, 0.f);
        for (int64_t c = 0; c < chunks[b]; ++c) {
          const float w = std::exp(tops[item(c)] - top);
          const float* o = outs.data() + item(c) * d;
          total += sums[item(c)] * w;
          for (int64_t e = 0; e < d; ++e) out[e] += o[e] * w;
        }
        const float inv = 1.f / total;
        for (int64_t e = 0; e < d; ++e) out[e] *= inv;
      }
  }

  torch::Tensor mlp_(int64_t i, const torch::Tensor& x) const {
    const Layer& l = layers_[i];
    const int64_t B = x.size(0);
    auto xn = torch::empty_like(x);
    float* XN = xn.data_ptr<float>();
    const float* X = x.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      rms_norm(X + b * hidden_, l.mlp_norm.data_ptr<float>(), l.eps, XN + b * hidden_, hidden_);
    if (!l.router) {
      auto y = torch::empty_like(x);
      swiglu(l.gate_up[0], l.down[0], XN, B, y.data_ptr<float>());
      return y;
    }
    return mixture(l, XN, B);
  }

  // Y [M, hidden] = down(SiLU(gate X) * up X) for X [M, hidden]
  static void swiglu(const Linear& gate_up, const Linear& down, const float* X, int64_t M, float* Y) {
    const int64_t inter = down.in;
    auto gu = torch::empty({M, 2 * inter}, torch::kFloat), act = torch::empty({M, inter}, torch::kFloat);
    float *GU = gu.data_ptr<float>(), *ACT = act.data_ptr<float>();
    gate_up.apply(X, M, GU);
    for (int64_t m = 0; m < M; ++m) silu_mul(GU + m * 2 * inter, GU + m * 2 * inter + inter, ACT + m * inter, inter);
    down.apply(ACT, M, Y);
  }

  // model.MoE for XN [B, hidden]: each row's top_k experts by the softmax of the router's
  // scores, each expert run once on the rows that chose it, its outputs weighted by their
  // probabilities (renormalised over the chosen ones where norm_topk) and added in the
  // experts' order
  torch::Tensor mixture(const Layer& l, const float* XN, int64_t B) const {
    const int64_t E = l.router->out, K = l.top_k, H = hidden_;
    std::vector<float> p(B * E);
    l.router->apply(XN, B, p.data());
    std::vector<std::vector<std::pair<int64_t, float>>> chosen(E);  // expert e's rows and weights
    std::vector<int64_t> order(E);
    for (int64_t b = 0; b < B; ++b) {
      float* row = p.data() + b * E;
      const float top = *std::max_element(row, row + E);
      float total = 0.f;
      for (int64_t e = 0; e < E; ++e) row[e] = std::exp(row[e] - top), total += row[e];
      for (int64_t e = 0; e < E; ++e) row[e] /= total;
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + K, order.end(),
                        [&](int64_t a, int64_t c) { return row[a] > row[c] || (row[a] == row[c] && a < c); });
      float kept = 0.f;
      for (int64_t k = 0; k < K; ++k) kept += row[order[k]];
      if (!l.norm_topk) kept = 1.f;
      for (int64_t k = 0; k < K; ++k) chosen[order[k]].emplace_back(b, row[order[k]] / kept);
    }
    auto y = torch::zeros({B, H}, torch::dtype(torch::kFloat));
    float* Y = y.data_ptr<float>();
    std::vector<float> xs, ys;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = static_cast<int64_t>(chosen[e].size());
      if (n == 0) continue;
      xs.resize(n * H), ys.resize(n * H);
      for (int64_t j = 0; j < n; ++j) {
        const float* x = XN + chosen[e][j].first * H;
        std::copy(x, x + H, xs.data() + j * H);
      }
      swiglu(l.gate_up[e], l.down[e], xs.data(), n, ys.data());
      for (int64_t j = 0; j < n; ++j) {
        const auto [b, w] = chosen[e][j];
        for (int64_t h = 0; h < H; ++h) Y[b * H + h] += ys[j * H + h] * w;
      }
    }
    return y;
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", &isa);
  m.def("gemv", &gemv);
  m.def("gemv_int8", &gemv_int8);
  m.def("gemv_int4", &gemv_int4);
  m.def("gemv_bf16", &gemv_bf16);
  m.def("dequantize_int4", &dequantize_int4);
  m.def("dequantize_int8", &dequantize_int8);
  m.def("pack_int8", &pack_int8);
  m.def("int8_split_layout", &int8_split_layout);
  m.def("int8_splits", &int8_splits);
  // module_local: tests load builds for other instruction sets beside this CPU's own
  py::class_<Linear>(m, "Linear", py::module_local())
      .def(py::init<torch::Tensor, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>>(),
           py::arg("w"), py::arg("scales") = py::none(), py::arg("mins") = py::none());
  py::class_<DecodeStep>(m, "DecodeStep", py::module_local())
      .def(py::init<int64_t, int64_t, int64_t, int64_t, torch::Tensor, torch::Tensor>())
      .def("add_layer", &DecodeStep::add_layer)
      .def("set_head", &DecodeStep::set_head)
      .def("forward", &DecodeStep::forward, py::call_guard<py::gil_scoped_release>())
      .def("forward_logits", &DecodeStep::forward_logits, py::call_guard<py::gil_scoped_release>())
      .def("attention", &DecodeStep::attention, py::call_guard<py::gil_scoped_release>())
      .def("mlp", &DecodeStep::mlp, py::call_guard<py::gil_scoped_release>());
}
