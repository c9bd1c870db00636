// Shared declarations of the CPU kernels: the model an InferenceSession packs, and the entry points,
// each dispatched at run time to the widest instruction set this CPU has (kernels.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace mmoe {

enum Act { kIdentity = 0, kRelu = 1, kSilu = 2, kGelu = 3 };
constexpr double kGeluC = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kGeluA = 0.044715;

enum Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };
int best_isa();               // what this CPU runs
int active_isa();             // what new calls use (best_isa unless set_isa lowered it)
void set_isa(int isa);        // tests run every path; raises std::invalid_argument above best_isa
const char* isa_name(int isa);

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Large buffers: ask for transparent huge pages (where the kernel offers them only on request), so that
// first touching tens of MB costs tens of page faults, not tens of thousands.
void advise_huge_pages(void* p, size_t bytes);

// Per-thread buffers that grow and are kept: a call allocates nothing once a thread has warmed up.
// Slots 0-3 serve the work inside a parallel region (every thread its own), 4-7 the calling thread's
// whole-call buffers shared with its team, 8 a weight panel copied for reuse (Kern::reused_panel).
template <typename T>
T* scratch(int slot, size_t n) {
  thread_local std::vector<T> bufs[9];
  if (bufs[slot].size() < n) {
    bufs[slot] = std::vector<T>();
    bufs[slot].reserve(n);
    advise_huge_pages(bufs[slot].data(), n * sizeof(T));
    bufs[slot].resize(n);
  }
  return bufs[slot].data();
}

// One layer of every expert, packed into panels for the session's instruction set.
template <typename T>
struct Grouped {
  int64_t E = 0, K = 0, N = 0;
  int act = kRelu;
  bool side = false;    // the experts side by side (a shared input, narrow experts): [P][K][NR], [P*NR]
  std::vector<T> w, b;  // [E][P][K][NR], [E][P*NR]
};

// A tower's nn.Linear layer: weight w[N, K] row-major and bias b[N] (empty: none) as they are, or packed as a
// one-expert layer where the forward runs it on the register tile (tower_dot_layer false); act after it.
template <typename T>
struct Linear {
  int64_t K = 0, N = 0;
  int act = kIdentity;
  std::vector<T> w, b;
  Grouped<T> packed;
};

// A whole model: hidden expert layers (first one on x, shared), then a gated mixture (MMoE/OMoE),
// then one tower per task. Shared-Bottom is hidden layers with E = 1 and no mixture.
template <typename T>
struct Model {
  int isa = kBase;
  int64_t in_features = 0, tasks = 0, gates = 0;
  bool has_mixture = false;
  std::vector<Grouped<T>> hidden;
  Grouped<T> mixture;
  Grouped<T> gate;  // every gate's weights as one layer of gates * E columns
  std::vector<std::vector<Linear<T>>> towers;  // per task: its nn.Linear layers
};

// A model read in place, in the ops' layout, for a no-grad forward: expert layers W[E, K, N] and b[E, N] (or
// null), gates wg[gates, D, E] and bg[gates, E] (or null), tower layers as nn.Linear's weight [N, K] and bias
// [N] (or null). act: the activation after the layer (towers: relu, the last identity).
template <typename T>
struct LiveLayer {
  const T* w = nullptr;
  const T* b = nullptr;
  int64_t E = 1, K = 0, N = 0;
  int act = kRelu;
  bool linear = false;  // a hidden layer given as nn.Linear's weight [N, K] (E = 1; towers always are)
};

// Hidden expert layers (the first on x), then a gated mixture (gates > 0; none: Shared-Bottom, the last hidden
// layer with E = 1, or x itself, feeds the towers), then one tower per task.
template <typename T>
struct LiveModel {
  int64_t in_features = 0, tasks = 0, gates = 0;
  std::vector<LiveLayer<T>> hidden;
  LiveLayer<T> mixture;
  const T* wg = nullptr;
  const T* bg = nullptr;
  std::vector<std::vector<LiveLayer<T>>> towers;
};

template <typename T>
struct Scratch {
  std::vector<std::vector<T>> h;
  std::vector<T> m;
};

// Entry points (T = float or double). Pointers are row-major contiguous; b, bg may be null.
// a is x[B, K] when shared, else a[B, E, K]; W[E, K, N]; G[B, nT, E]; m[nT, B, N].
// G[B, nT, E] = softmax_e(x[B, D] @ wg[t] + bg[t]) (wg[nT, D, E], bg[nT, E] or null), max-subtracted.
template <typename T>
void gate_softmax(const T* x, const T* wg, const T* bg, T* G, int64_t B, int64_t D, int64_t nT, int64_t E);
// With wg (gate weights [nT, D, E], a = x shared) the gates are computed on the way; else G is given.
// save_pre / save_G (or null): the pre-activations pre[E, B, N] and the gates computed here, for the backward.
template <typename T>
void mixture_forward(const T* a, bool shared, const T* w, const T* b, const T* wg, const T* bg, const T* G, T* m,
                     T* save_pre, T* save_G, int64_t B, int64_t E, int64_t K, int64_t N, int64_t nT, int act);
template <typename T>
void grouped_forward(const T* a, bool shared, const T* w, const T* b, T* out, T* save_pre, int64_t B, int64_t E,
                     int64_t K, int64_t N, int act);
// The backward of a mixture (G, dm[nT, B, N]) or of a grouped linear (dout[B, E, N], G null) from the saved
// pre-activations pre[E, B, N] (pre null: recomputed): da (a's shape; null: skipped), dW[E, K, N], db[E, N] and, for a
// mixture, dG[B, nT, E]. With wg (the gates' weights [nT, K, E], a = x shared) the gates' backward is fused:
// dWg, dbg come out instead of dG, and da includes the gates' part (G null: recomputed from wg, bg).
template <typename T>
void backward(const T* a, bool shared, const T* w, const T* b, const T* pre, const T* G, const T* dm, const T* dout,
              const T* wg, const T* bg, T* da, T* dW, T* db, T* dG, T* dWg, T* dbg, int64_t B, int64_t E, int64_t K,
              int64_t N, int64_t nT, int act);
// Around a GEMM done elsewhere, on pre[E, B, N] (or pre[B, E, N]: rowmajor): m[nT, B, N] = sum_e G act(pre[e]) (m given), else
// out[B, E, N] = act(pre) (out_em: expert-major out[E, B, N]), bias[E, N] (non-null) first added to pre in place;
// and the backward's elementwise step:
// dp[E, B, N] = df * act'(pre) with df = sum_t G dm (a mixture) or dout[B, E, N] (dout_em: dout[E, B, N]);
// dlogit[B, nT, E] (gates fused: given) or dG[B, nT, E]; db[E, N] = dp summed over rows (given: non-null).
template <typename T>
void from_pre(T* pre, bool rowmajor, const T* bias, const T* G, T* m, T* out, bool out_em, int64_t B, int64_t E,
              int64_t N, int64_t nT, int act);
template <typename T>
void backward_rows(const T* pre, bool rowmajor, const T* G, const T* dm, const T* dout, bool dout_em, T* dp,
                   T* dlogit, T* dG, T* db, int64_t B, int64_t E, int64_t N, int64_t nT, int act);
// Every task's training tower (Linear, ReLU, ..., Linear -> 1) on h[nT, B, K0] or a shared h[B, K0]:
// layer l of task t has w[l * nT + t] ([N, K], nn.Linear's layout) and bias[l * nT + t]; widths: K0, N0, ...,
// 1. Forward: out[B, nT] and save[nT, B, sum of hidden widths] (after ReLU). Backward from dout[B, nT]:
// dw, db (overwritten) and, dh given, dh[nT, B, K0].
template <typename T>
void towers_forward(const T* h, bool shared, int64_t B, int64_t nT, int64_t L, const int64_t* widths,
                    const T* const* w, const T* const* bias, T* out, T* save);
template <typename T>
void towers_backward(const T* h, bool shared, int64_t B, int64_t nT, int64_t L, const int64_t* widths,
                     const T* const* w, const T* save, const T* dout, T* dh, T* const* dw, T* const* db);
// out[r, :] = softmax(logits[r, :]) for rows of E values (max-subtracted; vectorized exp).
template <typename T>
void softmax_rows(const T* logits, T* out, int64_t rows, int64_t E);
// fit's loss and its gradient in one pass over out[B, nT]: task t's loss is BCE with logits (binary[t] != 0) or
// the squared error; a row with weight w[b, t] <= 0 (w given) adds nothing and its target is not read.
// sums[t] = sum_b w * loss (double accumulation), dz[b, t] = coef[t] * w * dloss/dz (BCE: sigmoid(z) - y;
// squared error: 2 (z - y)). BCE's loss is max(z, 0) - z y + log1p(exp(-|z|)), exact for every z.
template <typename T>
void loss_grad(const T* out, const T* y, const uint8_t* binary, const T* coef, const T* w, T* dz, double* sums,
               int64_t B, int64_t nT) {
  std::fill(sums, sums + nT, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < nT; ++t) {
      const int64_t i = b * nT + t;
      const T wt = w ? w[i] : T(1);
      if (w && !(wt > T(0))) {
        dz[i] = T(0);
        continue;
      }
      const T z = out[i], yv = y[i];
      T loss, g;
      if (binary[t]) {
        loss = std::max(z, T(0)) - z * yv + std::log1p(std::exp(-std::abs(z)));
        g = T(1) / (T(1) + std::exp(-z)) - yv;
      } else {
        const T d = z - yv;
        loss = d * d;
        g = T(2) * d;
      }
      sums[t] += static_cast<double>(wt * loss);
      dz[i] = g * (coef[t] * wt);
    }
}

// S replicas of one small model trained at once (fit_many), each on its own rows: replica s's first layer is
// Y[s] = x[s] @ W[s] + bias[s] ([B, C], C = E * H + nG * E: every expert's columns side by side, then the gates'
// logits), x[s] at x + s * xs (xs = 0: every replica reads the same rows) or, with xrow, its rows x + xrow[s, b] * D
// (y's likewise with yrow: y + yrow[s, b] * nT; the rows are gathered in the thread), W[S, D, C], bias[S, C] or null. One
// replica per thread, everything of a replica in its thread, its buffers in its cache: the GEMM, the gates'
// softmax, the mixture (nG == nT: task t mixes with gate t; nG == 1: one gate, a mixture shared by the tasks;
// nG == 0 and E == 1: act(pre) is shared, a Shared-Bottom; nG == 0 and E == nT > 1: task t's tower reads expert t
// alone, per-task networks as Single-Task's), the towers (as towers_forward: widths[0] == H; tw, tb: replica 0's
// weight and bias of layer l, task t at [l * nT + t], replica s's at + s * size), out[s, B, nT]. With y: loss_grad's
// sums[s, nT] and gradients: dW[S, D, C] = x[s]^T dY[s] (dY: the pre-activations' and the logits' gradients, kept
// in the thread), dbias[s, C], dtw, dtb (laid out as tw, tb). A replica with active[s] == 0 (active given) is
// skipped: its outputs and gradients are left as they were.
template <typename T>
struct ReplicaStep {
  int64_t S = 0, B = 0, D = 0, E = 0, H = 0, nG = 0, nT = 0, L = 0, xs = 0;
  const int64_t* widths = nullptr;
  int act = kRelu;
  const T* x = nullptr;
  const int64_t* xrow = nullptr;  // [S, B] or null
  const int64_t* yrow = nullptr;  // [S, B] or null
  const T* W = nullptr;
  const T* bias = nullptr;
  const T* const* tw = nullptr;
  const T* const* tb = nullptr;
  T* out = nullptr;
  const uint8_t* active = nullptr;
  const T* y = nullptr;  // [S, B, nT]; null: forward only
  const uint8_t* binary = nullptr;
  const T* coef = nullptr;    // [nT]
  const T* weight = nullptr;  // [S, B, nT] label weights or null
  double* sums = nullptr;
  T* dW = nullptr;
  T* dbias = nullptr;
  T* const* dtw = nullptr;
  T* const* dtb = nullptr;
  // Adam/AdamW in the thread (adam_m given): right after a replica's gradients, where its loss sums and bias
  // gradient add up to a finite number (ok[s] = 1; else ok[s] = 0 and nothing of it changes), every parameter is
  // updated in place, as torch's fused Adam would; ok[s] = 2 where that update made a parameter non-finite.
  // params, adam_m, adam_v: [W, bias, the tower weights (l * nT + t), their biases], replica 0's (replica s's at
  // + s * size). dW is then not written (null).
  T* const* params = nullptr;
  T* const* adam_m = nullptr;
  T* const* adam_v = nullptr;
  const double* lr = nullptr;  // [S]
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = 0, bc1 = 1, bc2sqrt = 1;  // bc: 1 - beta^step, sqrt(..)
  bool adamw = false;
  uint8_t* ok = nullptr;
};
template <typename T>
void replicas_step(const ReplicaStep<T>& step);

template <typename T>
// shared: the layer's input is one x for every expert (then narrow experts are packed side by side).
void pack_grouped(int isa, const T* w, const T* b, int64_t E, int64_t K, int64_t N, int act, Grouped<T>& out,
                  bool shared = false);
template <typename T>
void pack_gate(int isa, const T* wg, const T* bg, int64_t D, int64_t nT, int64_t E, Grouped<T>& out);
// Whether a tower layer of K inputs and N outputs runs as dot products on this instruction set (Kern::dot_layer).
template <typename T>
bool tower_dot_layer(int isa, int64_t K, int64_t N);
template <typename T>
void session_run(const Model<T>& model, const T* x, T* out, int64_t B);
// The same forward on weights read in place (see LiveModel): a Session's bits without packing them first.
template <typename T>
void live_run(const LiveModel<T>& model, const T* x, T* out, int64_t B);

}  // namespace mmoe
