// ONNX Runtime custom-op library: com.sfa::FlashSFA on the CPU execution provider.
//
// Contract: sfa_compile/exporters/onnx_function.py (the ONNX function body computes the same thing with
// standard ops). float32 tensors: query (B, H, L, E), key (B, Hk, S, E), value (B, Hk, S, Ev), attn_mask
// additive, broadcasting to (B, H, L, S); outputs (B, H, L, Ev) and the float32 lse (B, H, L) (written only
// when the node binds it; ONNX Runtime accepts a node without it).
//
// Sparse algorithm, exact (no approximation beyond float32 rounding):
//   1. every key row keeps its top-k features (largest |x|, ties to the lower index); the kept values are
//      scattered into a feature-major table kt[b, hk][feature][s] that is zero elsewhere;
//   2. per query row: its own top-k (value, feature) pairs; score[s] = sum over those k pairs of
//      q_val * kt[feature][s], i.e. k contiguous axpy passes over S instead of E (only the rows of the
//      query's kept features are read, and key sparsity is already in the zeros);
//   3. exact softmax over the masked, scaled scores (causal rows stop at their own position; rows whose
//      keys are all hidden give zeros and lse = +inf), then P @ V for a block of query rows with a
//      register-blocked micro-kernel (4 rows x 16 columns), so each V load serves four rows.
// Work is split over (batch, head, block of query rows) on ONNX Runtime's intra-op thread pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

namespace {

constexpr int64_t kRowBlock = 16;  // query rows per task (four 4-row register tiles in P @ V)

// Top-k of |x[0..n)| as (feature, value) pairs; the lower index wins ties. k is small (<= n <= 256 typically).
void TopK(const float* x, int64_t n, int64_t k, int64_t* idx, float* val) {
  int64_t count = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float mag = std::fabs(x[j]);
    if (count == k && !(mag > std::fabs(val[k - 1]))) continue;  // equal magnitude: the earlier index stays
    int64_t pos = count < k ? count++ : k - 1;
    while (pos > 0 && mag > std::fabs(val[pos - 1])) {
      idx[pos] = idx[pos - 1];
      val[pos] = val[pos - 1];
      --pos;
    }
    idx[pos] = j;
    val[pos] = x[j];
  }
}

// exp(x) for the shifted scores (x <= 0, -inf for hidden keys), written so that compilers vectorize it
// (std::exp stays a scalar libm call): Cody-Waite range reduction and Cephes' degree-6 polynomial, within
// 2 ulp of expf; exactly 0 below -87.3 (where expf underflows anyway) and for -inf; NaN stays NaN.
inline float VectorExp(float x) {
  const float c = x < -87.3f ? -87.3f : x;  // keeps NaN
  const float n = std::floor(c * 1.44269504088896341f + 0.5f);
  const float r = c - n * 0.693359375f + n * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < -87.3f ? 0.0f : poly * two_n;
}

// Eight floats as one value (GCC/Clang vector extension): AVX registers on x86, pairs of NEON ones on ARM.
typedef float Vec8 __attribute__((vector_size(32)));
constexpr int64_t kTileCols = 16;  // output columns per PVTile pass: two Vec8 per row

inline Vec8 Load8(const float* p) {
  Vec8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// out[r][0, 16) = sum over s < n of probs[r][s] * v[s][0, 16) for R rows: a register-blocked micro-kernel (2 * R
// accumulators stay in registers; each V load serves R rows).
template <int R>
void PVTile(const float* probs, int64_t ldp, const float* v, int64_t ldv, int64_t n, float* out, int64_t ldo) {
  Vec8 acc[R][2] = {};
  for (int64_t s = 0; s < n; ++s) {
    const Vec8 v0 = Load8(v + s * ldv), v1 = Load8(v + s * ldv + 8);
    for (int r = 0; r < R; ++r) {
      const float w = probs[r * ldp + s];
      acc[r][0] += w * v0;
      acc[r][1] += w * v1;
    }
  }
  for (int r = 0; r < R; ++r) {
    std::memcpy(out + r * ldo, &acc[r][0], sizeof(Vec8));
    std::memcpy(out + r * ldo + 8, &acc[r][1], sizeof(Vec8));
  }
}

// Strides (in elements) of a mask of any rank <= 4 broadcast to (B, H, L, S): 0 on broadcast dims.
struct MaskView {
  const float* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};

  MaskView(const float* d, const std::vector<int64_t>& shape, const int64_t target[4]) : data(d) {
    const int64_t rank = static_cast<int64_t>(shape.size());
    if (rank > 4) throw std::runtime_error("FlashSFA: attn_mask has more than 4 dims");
    int64_t step = 1;
    for (int64_t i = rank - 1; i >= 0; --i) {
      const int64_t dim = 4 - rank + i;
      if (shape[i] != 1 && shape[i] != target[dim]) {
        throw std::runtime_error("FlashSFA: attn_mask dim " + std::to_string(i) + " of size " +
                                 std::to_string(shape[i]) + " does not broadcast to " + std::to_string(target[dim]));
      }
      stride[dim] = shape[i] == 1 ? 0 : step;
      step *= shape[i];
    }
  }
  const float* Row(int64_t b, int64_t h, int64_t i) const {
    return data + b * stride[0] + h * stride[1] + i * stride[2];
  }
};

struct Problem {
  int64_t B, H, Hk, L, S, E, Ev, topk;
  float scale;
  bool causal;
  const float* q;
  const float* v;
  const float* kt;  // (B, Hk, E, S) feature-major sparsified keys
  const MaskView* mask;
  float* out;
  float* lse;  // may be null
};

// Key head ``head`` (S rows of E features) -> its zero-filled feature-major table kt[head][feature][s].
void CompressKeys(const float* k, int64_t S, int64_t E, int64_t topk, int64_t head, float* kt) {
  std::vector<int64_t> idx(topk);
  std::vector<float> val(topk);
  float* table = kt + head * E * S;
  std::fill(table, table + E * S, 0.0f);
  for (int64_t s = 0; s < S; ++s) {
    TopK(k + (head * S + s) * E, E, topk, idx.data(), val.data());
    for (int64_t j = 0; j < topk; ++j) table[idx[j] * S + s] = val[j];
  }
}

// One task: query rows [i0, i1) of head h in batch b.
void AttendBlock(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t i1) {
  const int64_t hk = h / (p.H / p.Hk);
  const float* kt = p.kt + (b * p.Hk + hk) * p.E * p.S;
  const float* v = p.v + (b * p.Hk + hk) * p.S * p.Ev;
  const int64_t rows = i1 - i0;
  std::vector<float> probs(rows * p.S);
  std::vector<float> acc(rows * p.Ev, 0.0f);
  std::vector<int64_t> span(rows);
  std::vector<float> norm(rows);
  std::vector<int64_t> idx(p.topk);
  std::vector<float> val(p.topk);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    const int64_t n = p.causal ? std::min(p.S, i + 1) : p.S;  // keys after n are hidden (probability 0)
    span[r] = n;
    float* score = probs.data() + r * p.S;
    std::fill(score, score + p.S, 0.0f);  // zeros past n too: the P @ V tiles read up to the block's longest row
    TopK(p.q + ((b * p.H + h) * p.L + i) * p.E, p.E, p.topk, idx.data(), val.data());
    for (int64_t j = 0; j < p.topk; ++j) {
      const float qv = val[j];
      const float* krow = kt + idx[j] * p.S;
      for (int64_t s = 0; s < n; ++s) score[s] += qv * krow[s];
    }
    const float* mask = p.mask->Row(b, h, i);
    if (p.mask->stride[3] == 0) {  // one mask value for the whole row
      for (int64_t s = 0; s < n; ++s) score[s] = score[s] * p.scale + mask[0];
    } else {
      for (int64_t s = 0; s < n; ++s) score[s] = score[s] * p.scale + mask[s];
    }
    float row_max = neg_inf;
    for (int64_t s = 0; s < n; ++s) row_max = std::max(row_max, score[s]);
    const float shift = row_max == neg_inf ? 0.0f : row_max;
    for (int64_t s = 0; s < n; ++s) score[s] = VectorExp(score[s] - shift);
    float lanes[8] = {};  // eight partial sums: independent chains the compiler can vectorize
    int64_t s = 0;
    for (; s + 8 <= n; s += 8) {
      for (int l = 0; l < 8; ++l) lanes[l] += score[s + l];
    }
    float sum = 0.0f;
    for (; s < n; ++s) sum += score[s];
    for (int l = 0; l < 8; ++l) sum += lanes[l];
    norm[r] = sum;
    if (p.lse) p.lse[(b * p.H + h) * p.L + i] = sum == 0.0f ? std::numeric_limits<float>::infinity()
                                                             : shift + std::log(sum);
  }

  // P @ V: 4-row x 16-column register tiles, then the leftover columns.
  const int64_t longest = *std::max_element(span.begin(), span.end());
  const int64_t tiled = p.Ev - p.Ev % kTileCols;
  for (int64_t r = 0; r < rows; r += 4) {
    const int64_t group = std::min<int64_t>(4, rows - r);
    const float* pr = probs.data() + r * p.S;
    float* ar = acc.data() + r * p.Ev;
    for (int64_t e = 0; e < tiled; e += kTileCols) {
      switch (group) {
        case 4: PVTile<4>(pr, p.S, v + e, p.Ev, longest, ar + e, p.Ev); break;
        case 3: PVTile<3>(pr, p.S, v + e, p.Ev, longest, ar + e, p.Ev); break;
        case 2: PVTile<2>(pr, p.S, v + e, p.Ev, longest, ar + e, p.Ev); break;
        default: PVTile<1>(pr, p.S, v + e, p.Ev, longest, ar + e, p.Ev); break;
      }
    }
  }
  for (int64_t s = 0; s < longest && tiled < p.Ev; ++s) {
    const float* vrow = v + s * p.Ev;
    for (int64_t r = 0; r < rows; ++r) {
      const float w = probs[r * p.S + s];
      float* a = acc.data() + r * p.Ev;
      for (int64_t e = tiled; e < p.Ev; ++e) a[e] += w * vrow[e];
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* o = p.out + ((b * p.H + h) * p.L + i0 + r) * p.Ev;
    const float inv = norm[r] == 0.0f ? 0.0f : 1.0f / norm[r];
    for (int64_t e = 0; e < p.Ev; ++e) o[e] = acc[r * p.Ev + e] * inv;
  }
}

struct FlashSFAKernel {
  int64_t topk;
  float scale;
  bool causal;

  FlashSFAKernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    topk = ki.GetAttribute<int64_t>("topk");
    scale = ki.GetAttribute<float>("scale");
    causal = ki.GetAttribute<int64_t>("causal") != 0;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(Ort::KernelContext(context));
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_INVALID_ARGUMENT).release();
    }
    return nullptr;
  }

  void Compute(Ort::KernelContext ctx) {
    auto query = ctx.GetInput(0), key = ctx.GetInput(1), value = ctx.GetInput(2), mask = ctx.GetInput(3);
    const auto qs = query.GetTensorTypeAndShapeInfo().GetShape();
    const auto ks = key.GetTensorTypeAndShapeInfo().GetShape();
    const auto vs = value.GetTensorTypeAndShapeInfo().GetShape();
    if (qs.size() != 4 || ks.size() != 4 || vs.size() != 4) {
      throw std::runtime_error("FlashSFA: query, key and value must be 4-D (batch, heads, length, dim)");
    }
    Problem p{};
    p.B = qs[0], p.H = qs[1], p.L = qs[2], p.E = qs[3];
    p.Hk = ks[1], p.S = ks[2], p.Ev = vs[3];
    if (ks[0] != p.B || vs[0] != p.B || ks[3] != p.E || vs[1] != p.Hk || vs[2] != p.S) {
      throw std::runtime_error("FlashSFA: key/value shapes do not match the query's");
    }
    if (p.Hk == 0 || p.H % p.Hk != 0) {
      throw std::runtime_error("FlashSFA: query heads must be a multiple of key heads");
    }
    if (topk < 1 || topk > p.E) {
      throw std::runtime_error("FlashSFA: topk " + std::to_string(topk) + " outside [1, head dim " +
                               std::to_string(p.E) + "]");
    }
    p.topk = topk, p.scale = scale, p.causal = causal;
    const int64_t target[4] = {p.B, p.H, p.L, p.S};
    MaskView mask_view(mask.GetTensorData<float>(), mask.GetTensorTypeAndShapeInfo().GetShape(), target);
    p.mask = &mask_view;
    p.q = query.GetTensorData<float>();
    p.v = value.GetTensorData<float>();
    p.out = ctx.GetOutput(0, {p.B, p.H, p.L, p.Ev}).GetTensorMutableData<float>();
    p.lse = ctx.GetOutputCount() > 1 ? ctx.GetOutput(1, {p.B, p.H, p.L}).GetTensorMutableData<float>() : nullptr;
    if (p.B * p.H * p.L * p.Ev == 0) return;

    std::vector<float> kt(static_cast<size_t>(p.B * p.Hk * p.E * p.S));
    p.kt = kt.data();
    struct Keys { const float* k; float* kt; const Problem* p; } keys{key.GetTensorData<float>(), kt.data(), &p};
    ctx.ParallelFor([](void* data, size_t head) {
      auto* w = static_cast<Keys*>(data);
      CompressKeys(w->k, w->p->S, w->p->E, w->p->topk, static_cast<int64_t>(head), w->kt);
    }, static_cast<size_t>(p.B * p.Hk), 0, &keys);

    const int64_t blocks = (p.L + kRowBlock - 1) / kRowBlock;
    ctx.ParallelFor([](void* data, size_t task) {
      const Problem& q = *static_cast<const Problem*>(data);
      const int64_t blocks_per_head = (q.L + kRowBlock - 1) / kRowBlock;
      const int64_t t = static_cast<int64_t>(task);
      const int64_t bh = t / blocks_per_head, block = t % blocks_per_head;
      const int64_t i0 = block * kRowBlock;
      AttendBlock(q, bh / q.H, bh % q.H, i0, std::min(q.L, i0 + kRowBlock));
    }, static_cast<size_t>(p.B * p.H * blocks), 0, &p);
  }
};

struct FlashSFAOp : Ort::CustomOpBase<FlashSFAOp, FlashSFAKernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new FlashSFAKernel(api, info);
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_INVALID_ARGUMENT).release();
    }
    return nullptr;
  }
  const char* GetName() const { return "FlashSFA"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return index == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
};

}  // namespace

extern "C" ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                 const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // an older runtime than these headers: nothing registered, ORT reports it
  Ort::InitApi(api);
  static FlashSFAOp op;
  static Ort::CustomOpDomain domain{"com.sfa"};
  static bool added = [] { domain.Add(&op); return true; }();
  (void)added;
  try {
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
