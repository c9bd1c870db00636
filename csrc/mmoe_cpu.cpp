// mmoe_fast._C: CPU kernels on raw buffers (no torch headers), bound with pybind11.
// Pointers arrive as integers (tensor.data_ptr()), row-major and contiguous, 0 for an absent bias;
// sizes as int64. The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace py = pybind11;

namespace {

template <typename T>
const T* cp(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}
template <typename T>
T* mp(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// Tower layers from widths [K0, N0, ..., 1] and one pointer per (layer, task) in w and bias.
int64_t checked_layers(const std::vector<int64_t>& widths, const std::vector<uintptr_t>& w,
                       const std::vector<uintptr_t>& bias, int64_t nT) {
  const int64_t L = static_cast<int64_t>(widths.size()) - 1;
  if (L < 1 || nT < 1 || static_cast<int64_t>(w.size()) != L * nT || static_cast<int64_t>(bias.size()) != L * nT)
    throw std::invalid_argument("towers: widths must list L + 1 sizes and w, bias L * T pointers");
  for (int64_t v : widths)
    if (v < 1) throw std::invalid_argument("towers: every width must be at least 1");
  return L;
}

void checked_count(const std::vector<uintptr_t>& p, size_t n) {
  if (p.size() != n) throw std::invalid_argument("replicas: expected " + std::to_string(n) + " pointers");
}

template <typename T>
std::vector<T*> pointers(const std::vector<uintptr_t>& p) {
  std::vector<T*> out(p.size());
  for (size_t i = 0; i < p.size(); ++i) out[i] = reinterpret_cast<T*>(p[i]);
  return out;
}

// Whether n values hold a NaN or an infinity: all exponent bits set. Integer compares and adds vectorize (the
// float test x - x != 0 did not: 1 ns a value); a block at a time, so a bad value ends the pass early.
template <typename T>
bool any_non_finite(const T* p, int64_t n) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr U kExp = sizeof(T) == 4 ? U(0x7f800000u) : U(0x7ff0000000000000ull);
  const unsigned char* bytes = reinterpret_cast<const unsigned char*>(p);
  constexpr int64_t kBlock = 4096;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t j1 = std::min(n, j0 + kBlock);
    U hits = 0;
    for (int64_t j = j0; j < j1; ++j) {
      U b;
      std::memcpy(&b, bytes + j * static_cast<int64_t>(sizeof(U)), sizeof(U));
      hits += (b & kExp) == kExp;
    }
    if (hits) return true;
  }
  return false;
}

// The softmax's backward: dlogit = G * (dG - sum_e G dG); dbg[t, e] = sum_b dlogit, summed in row order.
template <typename T>
void gate_backward(const T* G, const T* dG, T* dlogit, T* dbg, int64_t B, int64_t nT, int64_t E) {
  std::fill(dbg, dbg + nT * E, T(0));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < nT; ++t) {
      const int64_t o = (b * nT + t) * E;
      T s = 0;
      for (int64_t e = 0; e < E; ++e) s += G[o + e] * dG[o + e];
      for (int64_t e = 0; e < E; ++e) {
        dlogit[o + e] = G[o + e] * (dG[o + e] - s);
        dbg[t * E + e] += dlogit[o + e];
      }
    }
}

// S replicas of one kernel call (torch.func.vmap's batch, one model per replica): pointer i of replica s is
// p[i] + s * stride[i] elements (stride 0: one tensor all replicas share; p[i] 0: absent). With at least as many
// replicas as threads, one replica per thread, each kernel then single-threaded (its split does not depend on
// the thread count: the same bits as the replica alone); else one after another, each on every thread.
template <typename T, typename F>
void over_replicas(int64_t S, const std::vector<uintptr_t>& p, const std::vector<int64_t>& stride, F&& call) {
  if (p.size() != stride.size() || S < 0) throw std::invalid_argument("replicas: one stride per pointer, S >= 0");
  const size_t n = p.size();
  auto at = [&](int64_t s, std::vector<uintptr_t>& q) {
    for (size_t i = 0; i < n; ++i)
      q[i] = p[i] ? p[i] + static_cast<uintptr_t>(s * stride[i]) * sizeof(T) : 0;
  };
  py::gil_scoped_release release;
  if (S < 2 || S < mmoe::max_threads()) {
    std::vector<uintptr_t> q(n);
    for (int64_t s = 0; s < S; ++s) {
      at(s, q);
      call(q);
    }
    return;
  }
  std::exception_ptr failed;
  std::mutex mu;
#pragma omp parallel
  {
    std::vector<uintptr_t> q(n);
#pragma omp for schedule(dynamic)
    for (int64_t s = 0; s < S; ++s) {
      try {
        at(s, q);
        call(q);
      } catch (...) {  // an exception may not leave the parallel region: kept, rethrown after it
        std::lock_guard<std::mutex> lock(mu);
        if (!failed) failed = std::current_exception();
      }
    }
  }
  if (failed) std::rethrow_exception(failed);
}

// Large outputs (a training step's pre-activations, mixtures, gradients) come from blocks kept across steps:
// a fresh buffer of tens of MB costs its page faults and zeroing on every step (as much as the kernel writing
// it). A Block lends its memory to a tensor (torch.frombuffer keeps the Block alive); when the tensor dies the
// memory goes back to the pool, which keeps at most kKeep blocks and kKeepBytes in all.
class BlockPool {
 public:
  static BlockPool& get() {
    static BlockPool* pool = new BlockPool();  // never destroyed: tensors may outlive module teardown
    return *pool;
  }

  std::pair<void*, size_t> take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= 2 * bytes) {  // reuse, wasting at most half
        auto got = *it;
        free_.erase(it);
        cached_ -= got.first;
        return {got.second, got.first};
      }
    }
    const size_t size = (bytes + kAlign - 1) / kAlign * kAlign;
    void* p = std::aligned_alloc(kAlign, size);
    if (!p) throw std::bad_alloc();
    mmoe::advise_huge_pages(p, size);
    return {p, size};
  }

  void give(void* p, size_t size) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.emplace(size, p);
    cached_ += size;
    while (free_.size() > kKeep || cached_ > kKeepBytes) {  // drop the largest first
      auto last = std::prev(free_.end());
      cached_ -= last->first;
      std::free(last->second);
      free_.erase(last);
    }
  }

  size_t release() {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t freed = cached_;
    for (auto& kv : free_) std::free(kv.second);
    free_.clear();
    cached_ = 0;
    return freed;
  }

  size_t cached() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

 private:
  static constexpr size_t kAlign = size_t(1) << 21;
  static constexpr size_t kKeep = 16;
  static constexpr size_t kKeepBytes = size_t(2) << 30;
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
};

struct Block {
  explicit Block(size_t n) : bytes(n) {
    auto got = BlockPool::get().take(n);
    ptr = got.first;
    size = got.second;
  }
  ~Block() { BlockPool::get().give(ptr, size); }
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;
  void* ptr;
  size_t bytes, size;
};

// A packed model answering run(x) -> out[B, T]; built by the add_* calls (which copy the weights).
template <typename T>
class Session {
 public:
  Session(int64_t in_features, int64_t tasks) {
    model_.isa = mmoe::active_isa();
    model_.in_features = in_features;
    model_.tasks = tasks;
    model_.towers.resize(static_cast<size_t>(tasks));
  }

  void add_hidden(uintptr_t w, uintptr_t b, int64_t E, int64_t K, int64_t N, int act) {
    if (model_.has_mixture) throw std::invalid_argument("add_hidden: hidden layers come before the mixture");
    model_.hidden.emplace_back();
    mmoe::pack_grouped<T>(model_.isa, cp<T>(w), cp<T>(b), E, K, N, act, model_.hidden.back(),
                          model_.hidden.size() == 1);
  }

  void set_mixture(uintptr_t w, uintptr_t b, int64_t E, int64_t K, int64_t N, int act, uintptr_t wg, uintptr_t bg,
                   int64_t gates) {
    // on x itself (no hidden layer before it): narrow experts side by side
    mmoe::pack_grouped<T>(model_.isa, cp<T>(w), cp<T>(b), E, K, N, act, model_.mixture, model_.hidden.empty());
    mmoe::pack_gate<T>(model_.isa, cp<T>(wg), cp<T>(bg), model_.in_features, gates, E, model_.gate);
    model_.gates = gates;
    model_.has_mixture = true;
  }

  // An nn.Linear: weight[out, in], bias[out] or 0; kept as it is where the forward runs it as dot products
  // (mmoe::tower_dot_layer), else packed as a one-expert layer W[1, in, out].
  void add_tower_layer(int64_t task, uintptr_t w, uintptr_t b, int64_t in, int64_t out, bool relu) {
    if (task < 0 || task >= model_.tasks) throw std::invalid_argument("task out of range");
    if (in < 1 || out < 1) throw std::invalid_argument("add_tower_layer: in and out must be at least 1");
    auto& tower = model_.towers[static_cast<size_t>(task)];
    tower.emplace_back();
    mmoe::Linear<T>& l = tower.back();
    l.K = in;
    l.N = out;
    l.act = relu ? mmoe::kRelu : mmoe::kIdentity;
    if (mmoe::tower_dot_layer<T>(model_.isa, in, out)) {
      l.w.assign(cp<T>(w), cp<T>(w) + in * out);
      if (b) l.b.assign(cp<T>(b), cp<T>(b) + out);
      return;
    }
    std::vector<T> wt(static_cast<size_t>(in * out));
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) wt[i * out + o] = cp<T>(w)[o * in + i];
    mmoe::pack_grouped<T>(model_.isa, wt.data(), cp<T>(b), 1, in, out, l.act, l.packed);
  }

  void run(uintptr_t x, uintptr_t out, int64_t B) const {
    py::gil_scoped_release release;
    mmoe::session_run<T>(model_, cp<T>(x), mp<T>(out), B);
  }

  std::string isa() const { return mmoe::isa_name(model_.isa); }

 private:
  mmoe::Model<T> model_;
};

// Each tensor's data_ptr() (None: 0), read here at a fraction of Python's cost.
std::vector<uintptr_t> data_pointers(py::tuple tensors) {
  static PyObject* const name = PyUnicode_InternFromString("data_ptr");
  std::vector<uintptr_t> p(static_cast<size_t>(PyTuple_GET_SIZE(tensors.ptr())), 0);
  for (size_t i = 0; i < p.size(); ++i) {
    PyObject* t = PyTuple_GET_ITEM(tensors.ptr(), static_cast<Py_ssize_t>(i));
    if (t == Py_None) continue;
    PyObject* v = PyObject_CallMethodNoArgs(t, name);
    if (!v) throw py::error_already_set();
    p[i] = static_cast<uintptr_t>(PyLong_AsUnsignedLongLong(v));
    Py_DECREF(v);
    if (PyErr_Occurred()) throw py::error_already_set();
  }
  return p;
}

bool watch_holds(py::tuple watch, bool inference);

// A model's no-grad forward on its own parameters, read in place at every call (mmoe::LiveModel): built once
// with the shapes (layers: (E, K, N, activation code, 1 for an nn.Linear layer [N, K]), the mixture's last
// when gates > 0); run() takes the parameters' current pointers, in the order wg, bg (0 without gates), then
// each layer's w, b, then the towers' layer by layer, every task's weight, then every task's bias (0: none).
template <typename T>
class Live {
 public:
  Live(int64_t in_features, int64_t tasks, int64_t gates, const std::vector<std::vector<int64_t>>& layers,
       const std::vector<int64_t>& tower_widths) {
    model_.in_features = in_features;
    model_.tasks = tasks;
    model_.gates = gates;
    if (in_features < 1 || tasks < 1 || gates < 0 || (gates > 0 && layers.empty()) || tower_widths.size() < 2)
      throw std::invalid_argument("Live: bad model shape");
    for (const auto& l : layers) {
      if (l.size() != 5 || l[0] < 1 || l[1] < 1 || l[2] < 1 || (l[4] && l[0] != 1))
        throw std::invalid_argument("Live: layer (E, K, N, act, linear)");
      mmoe::LiveLayer<T> layer;
      layer.E = l[0];
      layer.K = l[1];
      layer.N = l[2];
      layer.act = static_cast<int>(l[3]);
      layer.linear = l[4] != 0;
      model_.hidden.push_back(layer);
    }
    if (gates > 0) {
      model_.mixture = model_.hidden.back();
      model_.hidden.pop_back();
    }
    for (int64_t v : tower_widths)
      if (v < 1) throw std::invalid_argument("Live: every tower width must be at least 1");
    const size_t L = tower_widths.size() - 1;
    model_.towers.assign(static_cast<size_t>(tasks), std::vector<mmoe::LiveLayer<T>>(L));
    for (auto& tower : model_.towers)
      for (size_t l = 0; l < L; ++l) {
        tower[l].K = tower_widths[l];
        tower[l].N = tower_widths[l + 1];
        tower[l].act = l + 1 < L ? mmoe::kRelu : mmoe::kIdentity;
      }
    count_ = 2 + 2 * layers.size() + 2 * L * static_cast<size_t>(tasks);
  }

  // run() with the parameters as a tuple of tensors (None: absent) where watch_holds(watch, inference), else
  // false (nothing read or written): a no-grad forward's checks and its call in one crossing from Python.
  bool run_watched(uintptr_t x, uintptr_t out, int64_t B, py::tuple tensors, py::tuple watch, bool inference) const {
    if (!watch_holds(watch, inference)) return false;
    run(x, out, B, data_pointers(tensors));
    return true;
  }

  void run(uintptr_t x, uintptr_t out, int64_t B, const std::vector<uintptr_t>& p) const {
    if (p.size() != count_) throw std::invalid_argument("Live.run: expected " + std::to_string(count_) + " pointers");
    mmoe::LiveModel<T> model = model_;
    size_t i = 0;
    model.wg = cp<T>(p[i++]);
    model.bg = cp<T>(p[i++]);
    for (auto& l : model.hidden) {
      l.w = cp<T>(p[i++]);
      l.b = cp<T>(p[i++]);
    }
    if (model.gates > 0) {
      model.mixture.w = cp<T>(p[i++]);
      model.mixture.b = cp<T>(p[i++]);
    }
    const size_t nT = model.towers.size(), L = model.towers[0].size();
    for (size_t l = 0; l < L; ++l) {
      for (size_t t = 0; t < nT; ++t) model.towers[t][l].w = cp<T>(p[i + t]);
      for (size_t t = 0; t < nT; ++t) model.towers[t][l].b = cp<T>(p[i + nT + t]);
      i += 2 * nT;
    }
    py::gil_scoped_release release;
    mmoe::live_run<T>(model, cp<T>(x), mp<T>(out), B);
  }

 private:
  mmoe::LiveModel<T> model_;
  size_t count_ = 0;
};

// One training step of a one-layer MMoE (gates = tasks) or OMoE (one gate) whose towers run in C++, in one
// call: the kernels that models/mmoe.py's _one_node_forward and _one_node_backward run on this path, in their
// order (the gated mixture keeping its pre-activations and gates, the towers, the loss and its gradient, the
// towers' backward, the mixture's and the gates' backward; no input gradient), with the intermediates in
// buffers kept between calls. Built once with the shapes; run() takes the parameters and their gradients'
// buffers as tensors (read in place at every call) and returns the per-task loss sums (as loss_grad).
template <typename T>
class TrainStep {
 public:
  TrainStep(int64_t in_features, int64_t experts, int64_t hidden, int64_t gates, const std::vector<int64_t>& widths,
            int act, const std::vector<uint8_t>& binary)
      : D_(in_features), E_(experts), H_(hidden), gates_(gates), tasks_(static_cast<int64_t>(binary.size())),
        act_(act), widths_(widths), binary_(binary) {
    if (D_ < 1 || E_ < 1 || H_ < 1 || tasks_ < 1 || (gates_ != 1 && gates_ != tasks_) || widths_.size() < 2 ||
        widths_.front() != H_ || widths_.back() != 1)
      throw std::invalid_argument("TrainStep: bad model shape");
    for (int64_t v : widths_)
      if (v < 1) throw std::invalid_argument("TrainStep: every tower width must be at least 1");
    L_ = static_cast<int64_t>(widths_.size()) - 1;
    for (int64_t l = 1; l < L_; ++l) saved_width_ += widths_[static_cast<size_t>(l)];
    count_ = 4 + static_cast<size_t>(2 * L_ * tasks_);
  }

  // params, grads: wg, bg, W, b, then the towers' layer by layer (every task's weight, then every task's bias);
  // None for an absent bias (bg, b) and its gradient. x[B, D], y, w (0: none) [B, tasks], coef[tasks].
  std::vector<double> run(uintptr_t x, uintptr_t y, uintptr_t coef, uintptr_t w, int64_t B, py::tuple params,
                          py::tuple grads) {
    const std::vector<uintptr_t> p = data_pointers(params), g = data_pointers(grads);
    if (p.size() != count_ || g.size() != count_)
      throw std::invalid_argument("TrainStep.run: expected " + std::to_string(count_) + " parameters and gradients");
    for (size_t i = 0; i < count_; ++i)
      if ((i != 1 && i != 3 && (!p[i] || !g[i])) || (!p[i] != !g[i]))
        throw std::invalid_argument("TrainStep.run: a parameter or gradient is missing");
    if (B < 1 || !x || !y || !coef) throw std::invalid_argument("TrainStep.run: B >= 1 and x, y, coef are needed");
    const int64_t nT = tasks_, nG = gates_;
    std::vector<const T*> tw, tb;
    std::vector<T*> dtw, dtb;
    for (int64_t l = 0; l < L_; ++l)
      for (int64_t t = 0; t < nT; ++t) {
        const size_t i = 4 + static_cast<size_t>(2 * nT * l + t), j = i + static_cast<size_t>(nT);
        tw.push_back(cp<T>(p[i]));
        tb.push_back(cp<T>(p[j]));
        dtw.push_back(mp<T>(g[i]));
        dtb.push_back(mp<T>(g[j]));
      }
    std::vector<double> sums(static_cast<size_t>(nT));
    {
      // The GIL first, then the buffers' lock: a second caller waiting on the lock must not hold the GIL
      // that this one needs back when it returns.
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(mu_);
      const size_t b = static_cast<size_t>(B);
      m_.resize(static_cast<size_t>(nG * H_) * b);
      pre_.resize(static_cast<size_t>(E_ * H_) * b);
      G_.resize(static_cast<size_t>(nG * E_) * b);
      out_.resize(static_cast<size_t>(nT) * b);
      dz_.resize(static_cast<size_t>(nT) * b);
      save_.resize(static_cast<size_t>(nT * std::max<int64_t>(saved_width_, 1)) * b);
      dh_.resize(static_cast<size_t>(nT * H_) * b);
      spare_.resize(static_cast<size_t>(E_ * H_ + nG * E_));  // db, dbg without a bias
      const bool shared = nG == 1;  // OMoE: every tower reads the one mixture
      T* const m = m_.data();
      mmoe::mixture_forward<T>(cp<T>(x), true, cp<T>(p[2]), cp<T>(p[3]), cp<T>(p[0]), cp<T>(p[1]), nullptr, m,
                               pre_.data(), G_.data(), B, E_, D_, H_, nG, act_);
      mmoe::towers_forward<T>(m, shared, B, nT, L_, widths_.data(), tw.data(), tb.data(), out_.data(), save_.data());
      mmoe::loss_grad<T>(out_.data(), cp<T>(y), binary_.data(), cp<T>(coef), cp<T>(w), dz_.data(), sums.data(), B,
                         nT);
      mmoe::towers_backward<T>(m, shared, B, nT, L_, widths_.data(), tw.data(), save_.data(), dz_.data(), dh_.data(),
                               dtw.data(), dtb.data());
      T* const dh = dh_.data();
      if (shared) {  // the one mixture's gradient: the tasks' summed in task order
        const int64_t n = B * H_;
        for (int64_t t = 1; t < nT; ++t)
          for (int64_t k = 0; k < n; ++k) dh[k] += dh[t * n + k];
      }
      T* const db = g[3] ? mp<T>(g[3]) : spare_.data();
      T* const dbg = g[1] ? mp<T>(g[1]) : spare_.data() + E_ * H_;
      mmoe::backward<T>(cp<T>(x), true, cp<T>(p[2]), cp<T>(p[3]), pre_.data(), G_.data(), dh, nullptr, cp<T>(p[0]),
                        cp<T>(p[1]), nullptr, mp<T>(g[2]), db, nullptr, mp<T>(g[0]), dbg, B, E_, D_, H_, nG, act_);
    }
    return sums;
  }

 private:
  int64_t D_, E_, H_, gates_, tasks_, L_ = 0, saved_width_ = 0;
  int act_;
  std::vector<int64_t> widths_;
  std::vector<uint8_t> binary_;
  size_t count_ = 0;
  std::mutex mu_;
  std::vector<T> m_, pre_, G_, out_, dz_, save_, dh_, spare_;
};

// Whether a module tree is as a fused path read it (models/common.py's Guard): each module still of its
// type, with no hooks and no instance `forward`, the same children and parameters by identity. The loop
// Python would run, without its attribute lookups (a few microseconds per call at every forward).
// modules, types: tuples; children: (module, tuple of its child modules); params: (module, name, parameter);
// forwards: (class, the forward it had); counts: (module, how many parameters it holds).
bool modules_unchanged(py::tuple modules, py::tuple types, py::tuple children, py::tuple params, py::tuple forwards,
                       py::tuple counts) {
  static PyObject* const hooks[] = {PyUnicode_InternFromString("_forward_hooks"),
                                    PyUnicode_InternFromString("_forward_pre_hooks"),
                                    PyUnicode_InternFromString("_backward_hooks"),
                                    PyUnicode_InternFromString("_backward_pre_hooks")};
  static PyObject* const forward = PyUnicode_InternFromString("forward");
  static PyObject* const kids_name = PyUnicode_InternFromString("_modules");
  static PyObject* const params_name = PyUnicode_InternFromString("_parameters");
  // m's instance __dict__ (borrowed, materialized)
  auto dict_of = [](PyObject* m) -> PyObject* {
    PyObject* d = PyObject_GenericGetDict(m, nullptr);
    if (!d) throw py::error_already_set();
    Py_DECREF(d);  // the object keeps its dict alive
    return d;
  };
  const Py_ssize_t n = PyTuple_GET_SIZE(modules.ptr());
  if (PyTuple_GET_SIZE(types.ptr()) != n) throw std::invalid_argument("modules_unchanged: one type per module");
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* m = PyTuple_GET_ITEM(modules.ptr(), i);
    if (reinterpret_cast<PyObject*>(Py_TYPE(m)) != PyTuple_GET_ITEM(types.ptr(), i)) return false;
    PyObject* dict = dict_of(m);
    for (PyObject* name : hooks) {
      PyObject* h = PyDict_GetItemWithError(dict, name);
      if (!h || !PyDict_Check(h) || PyDict_GET_SIZE(h) != 0) return false;
    }
    const int has = PyDict_Contains(dict, forward);
    if (has < 0) throw py::error_already_set();
    if (has) return false;
  }
  // each entry a tuple of `size` items (these are private to the guard, but a wrong one must not read past it)
  auto entries = [](py::tuple list, Py_ssize_t size, const char* what) {
    for (auto item : list)
      if (!PyTuple_Check(item.ptr()) || PyTuple_GET_SIZE(item.ptr()) != size)
        throw std::invalid_argument(std::string("modules_unchanged: every ") + what);
  };
  entries(children, 2, "child entry is (module, children)");
  entries(params, 3, "parameter entry is (module, name, parameter)");
  entries(forwards, 2, "forward entry is (class, forward)");
  entries(counts, 2, "count entry is (module, count)");
  for (auto item : children) {
    PyObject* m = PyTuple_GET_ITEM(item.ptr(), 0);
    PyObject* kids = PyTuple_GET_ITEM(item.ptr(), 1);
    if (!PyTuple_Check(kids)) throw std::invalid_argument("modules_unchanged: children come as a tuple");
    PyObject* now = PyDict_GetItemWithError(dict_of(m), kids_name);
    if (!now || !PyDict_Check(now) || PyDict_GET_SIZE(now) != PyTuple_GET_SIZE(kids)) return false;
    Py_ssize_t pos = 0, j = 0;
    PyObject *key, *value;
    while (PyDict_Next(now, &pos, &key, &value))
      if (value != PyTuple_GET_ITEM(kids, j++)) return false;
  }
  PyObject *last = nullptr, *slots = nullptr;  // a module's parameters are listed together: its dict read once
  for (auto item : params) {
    PyObject* m = PyTuple_GET_ITEM(item.ptr(), 0);
    if (m != last) {
      slots = PyDict_GetItemWithError(dict_of(m), params_name);
      if (!slots || !PyDict_Check(slots)) return false;
      last = m;
    }
    PyObject* p = PyDict_GetItemWithError(slots, PyTuple_GET_ITEM(item.ptr(), 1));
    if (!p && PyErr_Occurred()) throw py::error_already_set();
    if (p != PyTuple_GET_ITEM(item.ptr(), 2)) return false;  // absent (null) counts as changed
  }
  for (auto item : forwards) {  // (class, the forward it had)
    PyObject* now = PyObject_GetAttr(PyTuple_GET_ITEM(item.ptr(), 0), forward);
    if (!now) throw py::error_already_set();
    const bool same = now == PyTuple_GET_ITEM(item.ptr(), 1);
    Py_DECREF(now);
    if (!same) return false;
  }
  for (auto item : counts) {  // a parameter added (a layer appended to a ParameterList) is a change
    PyObject* slots = PyDict_GetItemWithError(dict_of(PyTuple_GET_ITEM(item.ptr(), 0)), params_name);
    if (!slots || !PyDict_Check(slots)) return false;
    const Py_ssize_t n = PyLong_AsSsize_t(PyTuple_GET_ITEM(item.ptr(), 1));
    if (n == -1 && PyErr_Occurred()) throw py::error_already_set();
    if (PyDict_GET_SIZE(slots) != n) return false;
  }
  return true;
}

// A fused path's watch list (models/common.py's LiveCall): (modules, types, children, params, forwards, counts,
// (metadata check, the same under inference mode), the parameters, attrs): modules_unchanged's six, then the
// parameters' metadata check (a callable of the parameters: torch's TensorGuards.check), and each plain
// attribute (module __dict__, name, the value read) still equal to that value.
bool watch_holds(py::tuple watch, bool inference) {
  PyObject* w = watch.ptr();
  if (PyTuple_GET_SIZE(w) != 9) throw std::invalid_argument("watch_holds: a watch list has 9 items");
  auto item = [w](Py_ssize_t i) {
    PyObject* t = PyTuple_GET_ITEM(w, i);
    if (!PyTuple_Check(t)) throw std::invalid_argument("watch_holds: every item of a watch list is a tuple");
    return py::reinterpret_borrow<py::tuple>(t);
  };
  if (!modules_unchanged(item(0), item(1), item(2), item(3), item(4), item(5))) return false;
  for (auto a : item(8)) {
    PyObject* t = a.ptr();
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3 || !PyDict_Check(PyTuple_GET_ITEM(t, 0)))
      throw std::invalid_argument("watch_holds: an attribute is (dict, name, value)");
    PyObject* now = PyDict_GetItemWithError(PyTuple_GET_ITEM(t, 0), PyTuple_GET_ITEM(t, 1));
    if (!now) {
      if (PyErr_Occurred()) throw py::error_already_set();
      now = Py_None;  // as dict.get reads an absent name
    }
    Py_INCREF(now);  // held across a comparison that may run Python
    const int same = PyObject_RichCompareBool(now, PyTuple_GET_ITEM(t, 2), Py_EQ);
    Py_DECREF(now);
    if (same < 0) throw py::error_already_set();
    if (!same) return false;
  }
  py::tuple checks = item(6);
  if (PyTuple_GET_SIZE(checks.ptr()) != 2) throw std::invalid_argument("watch_holds: two metadata checks");
  PyObject* r = PyObject_Call(PyTuple_GET_ITEM(checks.ptr(), inference ? 1 : 0), item(7).ptr(), nullptr);
  if (!r) throw py::error_already_set();
  const int ok = PyObject_IsTrue(r);
  Py_DECREF(r);
  if (ok < 0) throw py::error_already_set();
  return ok == 1;
}

template <typename T>
void bind(py::module_& m, const std::string& sfx) {
  m.def(("gate_softmax" + sfx).c_str(),
        [](uintptr_t x, uintptr_t wg, uintptr_t bg, uintptr_t g, int64_t B, int64_t D, int64_t nT, int64_t E) {
          py::gil_scoped_release release;
          mmoe::gate_softmax<T>(cp<T>(x), cp<T>(wg), cp<T>(bg), mp<T>(g), B, D, nT, E);
        },
        py::arg("x"), py::arg("gate_weight"), py::arg("gate_bias"), py::arg("out"), py::arg("B"), py::arg("D"),
        py::arg("T"), py::arg("E"),
        "G[B,T,E] = softmax(x[B,D] @ Wg[T,D,E] + bg[T,E]); pointers as integers, gate_bias 0 for none.");
  m.def(("gate_backward" + sfx).c_str(),
        [](uintptr_t G, uintptr_t dG, uintptr_t dlogit, uintptr_t dbg, int64_t B, int64_t nT, int64_t E) {
          py::gil_scoped_release release;
          gate_backward<T>(cp<T>(G), cp<T>(dG), mp<T>(dlogit), mp<T>(dbg), B, nT, E);
        },
        "dlogit[B,T,E] = G * (dG - sum_e G dG); dbg[T,E] = sum_b dlogit.");
  m.def(("mixture_forward" + sfx).c_str(),
        [](uintptr_t a, bool shared, uintptr_t w, uintptr_t b, uintptr_t wg, uintptr_t bg, uintptr_t G,
           uintptr_t out, uintptr_t save_pre, uintptr_t save_G, int64_t B, int64_t E, int64_t K, int64_t N, int64_t nT,
           int act) {
          py::gil_scoped_release release;
          mmoe::mixture_forward<T>(cp<T>(a), shared, cp<T>(w), cp<T>(b), cp<T>(wg), cp<T>(bg), cp<T>(G),
                                   mp<T>(out), mp<T>(save_pre), mp<T>(save_G), B, E, K, N, nT, act);
        },
        "m[T,B,N] = sum_e G[b,t,e] act(a_e @ W[e] + b[e]); a is [B,K] (shared) or [B,E,K]. With wg != 0 "
        "(wg[T,K,E], bg[T,E], a shared) the gates are computed on the way and G is unused. save_pre [E,B,N] and "
        "save_G [B,T,E] (0: not saved) receive the pre-activations and the gates computed.");
  m.def(("grouped_forward" + sfx).c_str(),
        [](uintptr_t a, bool shared, uintptr_t w, uintptr_t b, uintptr_t out, uintptr_t save_pre, int64_t B,
           int64_t E, int64_t K, int64_t N, int act) {
          py::gil_scoped_release release;
          mmoe::grouped_forward<T>(cp<T>(a), shared, cp<T>(w), cp<T>(b), mp<T>(out), mp<T>(save_pre), B, E, K, N,
                                   act);
        },
        "out[B,E,N] = act(a_e @ W[e] + b[e]); save_pre [E,B,N] (0: not saved) receives a_e @ W[e] + b[e].");
  m.def(("backward" + sfx).c_str(),
        [](uintptr_t a, bool shared, uintptr_t w, uintptr_t b, uintptr_t pre, uintptr_t G, uintptr_t dm,
           uintptr_t dout, uintptr_t wg, uintptr_t bg, uintptr_t da, uintptr_t dW, uintptr_t db, uintptr_t dG,
           uintptr_t dWg, uintptr_t dbg, int64_t B, int64_t E, int64_t K, int64_t N, int64_t nT, int act) {
          py::gil_scoped_release release;
          mmoe::backward<T>(cp<T>(a), shared, cp<T>(w), cp<T>(b), cp<T>(pre), cp<T>(G), cp<T>(dm), cp<T>(dout),
                            cp<T>(wg), cp<T>(bg), mp<T>(da), mp<T>(dW), mp<T>(db), mp<T>(dG), mp<T>(dWg), mp<T>(dbg),
                            B, E, K, N, nT, act);
        },
        "da (a's shape; 0: skipped), dW[E,K,N], db[E,N] and, for a mixture (G, dm[T,B,N]; else dout[B,E,N]), "
        "dG[B,T,E], from the saved pre-activations pre[E,B,N] (0: recomputed). With wg != 0 (wg[T,K,E], bg, a "
        "shared) the gates' backward is fused: dWg[T,K,E], dbg[T,E] instead of dG (G 0: recomputed).");
  m.def(("from_pre" + sfx).c_str(),
        [](uintptr_t pre, bool rowmajor, uintptr_t bias, uintptr_t G, uintptr_t m, uintptr_t out, bool out_em,
           int64_t B, int64_t E, int64_t N, int64_t nT, int act) {
          py::gil_scoped_release release;
          mmoe::from_pre<T>(mp<T>(pre), rowmajor, cp<T>(bias), cp<T>(G), mp<T>(m), mp<T>(out), out_em, B, E, N, nT,
                            act);
        },
        "From pre[E,B,N] (rowmajor: pre[B,E,N]), bias[E,N] added to it in place first when bias != 0: "
        "m[T,B,N] = sum_e G[b,t,e] act(pre[e,b]) when m != 0, else out[B,E,N] = act(pre) (out_em: out[E,B,N]).");
  m.def(("backward_rows" + sfx).c_str(),
        [](uintptr_t pre, bool rowmajor, uintptr_t G, uintptr_t dm, uintptr_t dout, bool dout_em, uintptr_t dp,
           uintptr_t dlogit, uintptr_t dG, uintptr_t db, int64_t B, int64_t E, int64_t N, int64_t nT, int act) {
          py::gil_scoped_release release;
          mmoe::backward_rows<T>(cp<T>(pre), rowmajor, cp<T>(G), cp<T>(dm), cp<T>(dout), dout_em, mp<T>(dp),
                                 mp<T>(dlogit), mp<T>(dG), mp<T>(db), B, E, N, nT, act);
        },
        "dp[E,B,N] = df * act'(pre[E,B,N]) (rowmajor: both [B,E,N]), df = sum_t G dm[T,B,N] (G != 0) or "
        "dout[B,E,N] (dout_em: dout[E,B,N]); with G, dlogit[B,T,E] of the gates' softmax when dlogit != 0, else "
        "dG[B,T,E]; db[E,N] = dp summed over rows when db != 0.");
  m.def(("loss_grad" + sfx).c_str(),
        [](uintptr_t out, uintptr_t y, const std::vector<uint8_t>& binary, uintptr_t coef, uintptr_t w, uintptr_t dz,
           int64_t B) {
          const int64_t nT = static_cast<int64_t>(binary.size());
          std::vector<double> sums(static_cast<size_t>(nT));
          {
            py::gil_scoped_release release;
            mmoe::loss_grad<T>(cp<T>(out), cp<T>(y), binary.data(), cp<T>(coef), cp<T>(w), mp<T>(dz), sums.data(), B, nT);
          }
          return sums;
        },
        "Per-task loss sums (list) of out[B,T] against y[B,T] (binary[t]: BCE with logits, else squared error), "
        "rows weighted by w[B,T] (0: none; a weight <= 0 skips the row), and dz[B,T] = coef[t] w dloss/dz.");
  m.def(("first_non_finite" + sfx).c_str(),
        [](const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& sizes) -> int64_t {
          if (ptrs.size() != sizes.size()) throw std::invalid_argument("first_non_finite: one size per pointer");
          py::gil_scoped_release release;
          for (size_t i = 0; i < ptrs.size(); ++i) {
            if (any_non_finite(cp<T>(ptrs[i]), sizes[i])) return static_cast<int64_t>(i);
          }
          return -1;
        },
        "The index of the first buffer (pointers, element counts) holding a NaN or an infinity, or -1.");
  m.def(("softmax_rows" + sfx).c_str(),
        [](uintptr_t logits, uintptr_t out, int64_t rows, int64_t E) {
          py::gil_scoped_release release;
          mmoe::softmax_rows<T>(cp<T>(logits), mp<T>(out), rows, E);
        },
        "out[r,:] = softmax(logits[r,:]) over E values per row (max-subtracted).");
  m.def(("towers_forward" + sfx).c_str(),
        [](uintptr_t h, bool shared, int64_t B, int64_t nT, const std::vector<int64_t>& widths,
           const std::vector<uintptr_t>& w, const std::vector<uintptr_t>& bias, uintptr_t out, uintptr_t save) {
          const int64_t L = checked_layers(widths, w, bias, nT);
          const auto wp = pointers<const T>(w), bp = pointers<const T>(bias);
          py::gil_scoped_release release;
          mmoe::towers_forward<T>(cp<T>(h), shared, B, nT, L, widths.data(), wp.data(), bp.data(), mp<T>(out),
                                  mp<T>(save));
        },
        "Every task's tower (Linear, ReLU, ..., Linear -> 1) on h[T,B,K0] (or shared h[B,K0]): out[B,T], and "
        "save[T,B,sum of hidden widths] for the backward. widths = [K0, N0, ..., 1]; w, bias: layer by layer, "
        "task by task, nn.Linear's [N,K] and [N].");
  m.def(("towers_backward" + sfx).c_str(),
        [](uintptr_t h, bool shared, int64_t B, int64_t nT, const std::vector<int64_t>& widths,
           const std::vector<uintptr_t>& w, uintptr_t save, uintptr_t dout, uintptr_t dh,
           const std::vector<uintptr_t>& dw, const std::vector<uintptr_t>& db) {
          const int64_t L = checked_layers(widths, w, db, nT);
          checked_layers(widths, dw, db, nT);
          const auto wp = pointers<const T>(w);
          const auto dwp = pointers<T>(dw), dbp = pointers<T>(db);
          py::gil_scoped_release release;
          mmoe::towers_backward<T>(cp<T>(h), shared, B, nT, L, widths.data(), wp.data(), cp<T>(save), cp<T>(dout),
                                   mp<T>(dh), dwp.data(), dbp.data());
        },
        "towers_forward's backward from dout[B,T]: dw, db (as w and bias) and, dh != 0, dh[T,B,K0].");
  m.def(("replicas_step" + sfx).c_str(),
        [](int64_t S, int64_t B, int64_t D, int64_t E, int64_t H, int64_t nG, int64_t nT,
           const std::vector<int64_t>& widths, int act, uintptr_t x, int64_t xs, uintptr_t xrow, uintptr_t yrow,
           int64_t nx, int64_t ny, uintptr_t W, uintptr_t bias,
           const std::vector<uintptr_t>& tw, const std::vector<uintptr_t>& tb, uintptr_t out, uintptr_t active,
           uintptr_t y, const std::vector<uint8_t>& binary, uintptr_t coef, uintptr_t weight, uintptr_t sums,
           uintptr_t dW, uintptr_t dbias, const std::vector<uintptr_t>& dtw, const std::vector<uintptr_t>& dtb,
           const std::vector<uintptr_t>& params, const std::vector<uintptr_t>& adam_m,
           const std::vector<uintptr_t>& adam_v, uintptr_t lr, const std::vector<double>& hyper, bool adamw,
           uintptr_t ok) {
          mmoe::ReplicaStep<T> st;
          st.L = checked_layers(widths, tw, tb, nT);
          if (S < 0 || B < 0 || D < 1 || E < 1 || H < 1 || widths[0] != H || !(nG == 0 || nG == 1 || nG == nT) ||
              (nG == 0 && E != 1 && E != nT))
            throw std::invalid_argument("replicas_step: needs D, E, H >= 1, widths[0] == H, nG in {0, 1, T}, E in "
                                        "{1, T} without gates");
          const bool adam = !adam_m.empty();
          if (y && (static_cast<int64_t>(binary.size()) != nT || !coef || !sums || (!dW && !adam) || !dbias))
            throw std::invalid_argument("replicas_step: training needs binary[T], coef, sums, dW (or Adam) and dbias");
          const size_t np = static_cast<size_t>(2 + 2 * st.L * nT);
          if (adam && (!y || !bias || params.size() != np || adam_m.size() != np || adam_v.size() != np || !lr ||
                       hyper.size() != 6 || !ok))
            throw std::invalid_argument("replicas_step: Adam needs y, a bias, params/adam_m/adam_v of " +
                                        std::to_string(np) + " pointers, lr, 6 hyper-parameters and ok");
          if (y) checked_layers(widths, dtw, dtb, nT);
          const auto twp = pointers<const T>(tw), tbp = pointers<const T>(tb);
          const auto dtwp = pointers<T>(dtw), dtbp = pointers<T>(dtb);
          const auto pp = pointers<T>(params), mp_ = pointers<T>(adam_m), vp = pointers<T>(adam_v);
          if (adam) {
            st.params = pp.data(), st.adam_m = mp_.data(), st.adam_v = vp.data();
            st.lr = reinterpret_cast<const double*>(lr), st.ok = reinterpret_cast<uint8_t*>(ok), st.adamw = adamw;
            st.beta1 = hyper[0], st.beta2 = hyper[1], st.eps = hyper[2], st.wd = hyper[3], st.bc1 = hyper[4];
            st.bc2sqrt = hyper[5];
          }
          st.S = S, st.B = B, st.D = D, st.E = E, st.H = H, st.nG = nG, st.nT = nT, st.xs = xs;
          st.widths = widths.data(), st.act = act;
          st.x = cp<T>(x), st.xrow = reinterpret_cast<const int64_t*>(xrow);
          st.yrow = reinterpret_cast<const int64_t*>(yrow), st.W = cp<T>(W), st.bias = cp<T>(bias);
          st.tw = twp.data(), st.tb = tbp.data();
          // Row indices are read as addresses: every one checked against its data's rows (nx, ny).
          for (const auto& [rowid, n, name] : {std::tuple{st.xrow, nx, "x"}, std::tuple{st.yrow, ny, "y"}})
            if (rowid)
              for (int64_t i = 0; i < S * B; ++i)
                if (rowid[i] < 0 || rowid[i] >= n)
                  throw std::invalid_argument(std::string("replicas_step: a row of ") + name + " out of range [0, " +
                                              std::to_string(n) + ")");
          if (st.yrow && !y) throw std::invalid_argument("replicas_step: yrow needs y");
          if (adam) std::fill_n(reinterpret_cast<uint8_t*>(ok), S, uint8_t(0));
          st.out = mp<T>(out), st.active = reinterpret_cast<const uint8_t*>(active);
          st.y = cp<T>(y), st.binary = binary.data(), st.coef = cp<T>(coef), st.weight = cp<T>(weight);
          st.sums = reinterpret_cast<double*>(sums), st.dW = mp<T>(dW), st.dbias = mp<T>(dbias);
          st.dtw = dtwp.data(), st.dtb = dtbp.data();
          {
            py::gil_scoped_release release;
            mmoe::replicas_step<T>(st);
          }
          int64_t failed = 0;  // with Adam: the replicas run but not updated (a loss or gradient not finite), or
                               // updated to a non-finite weight (ok 2)
          for (int64_t i = 0; adam && i < S; ++i) failed += (!st.active || st.active[i]) && st.ok[i] != 1;
          return failed;
        },
        "S replicas of a one-layer MMoE/OMoE/Shared-Bottom/Single-Task with towers (see ReplicaStep in "
        "kernels.h): from x[S,B,D] (or one x[B,D], xs = 0; or xrow[S,B] picking rows of x, yrow those of y) and "
        "W[S,D,C], out[S,B,T]; with y (else 0), loss "
        "sums[S,T] (float64) and gradients, or with adam_m the Adam update (hyper: beta1, beta2, eps, weight "
        "decay, 1 - beta1^step, sqrt(1 - beta2^step); lr[S] float64; ok[S] uint8 out: 1 updated, 0 not (a "
        "loss or gradient not finite), 2 updated to a non-finite weight; returns the number of replicas run with "
        "ok != 1).");
  // The ops' kernels over S replicas (see over_replicas): pointers and strides (elements) in the order named.
  m.def(("gate_softmax_replicas" + sfx).c_str(),
        [](int64_t S, const std::vector<uintptr_t>& p, const std::vector<int64_t>& st, int64_t B, int64_t D,
           int64_t nT, int64_t E) {
          checked_count(p, 4);
          over_replicas<T>(S, p, st, [&](const std::vector<uintptr_t>& q) {
            mmoe::gate_softmax<T>(cp<T>(q[0]), cp<T>(q[1]), cp<T>(q[2]), mp<T>(q[3]), B, D, nT, E);
          });
        },
        "gate_softmax per replica; p = x, gate_weight, gate_bias, out.");
  m.def(("gate_backward_replicas" + sfx).c_str(),
        [](int64_t S, const std::vector<uintptr_t>& p, const std::vector<int64_t>& st, int64_t B, int64_t nT,
           int64_t E) {
          checked_count(p, 4);
          over_replicas<T>(S, p, st, [&](const std::vector<uintptr_t>& q) {
            gate_backward<T>(cp<T>(q[0]), cp<T>(q[1]), mp<T>(q[2]), mp<T>(q[3]), B, nT, E);
          });
        },
        "gate_backward per replica; p = G, dG, dlogit, dbg.");
  m.def(("mixture_forward_replicas" + sfx).c_str(),
        [](int64_t S, const std::vector<uintptr_t>& p, const std::vector<int64_t>& st, bool shared, int64_t B,
           int64_t E, int64_t K, int64_t N, int64_t nT, int act) {
          checked_count(p, 7);
          over_replicas<T>(S, p, st, [&](const std::vector<uintptr_t>& q) {
            mmoe::mixture_forward<T>(cp<T>(q[0]), shared, cp<T>(q[1]), cp<T>(q[2]), cp<T>(q[3]), cp<T>(q[4]),
                                     cp<T>(q[5]), mp<T>(q[6]), nullptr, nullptr, B, E, K, N, nT, act);
          });
        },
        "mixture_forward per replica (nothing saved); p = a, w, b, wg, bg, G, out.");
  m.def(("grouped_forward_replicas" + sfx).c_str(),
        [](int64_t S, const std::vector<uintptr_t>& p, const std::vector<int64_t>& st, bool shared, int64_t B,
           int64_t E, int64_t K, int64_t N, int act) {
          checked_count(p, 4);
          over_replicas<T>(S, p, st, [&](const std::vector<uintptr_t>& q) {
            mmoe::grouped_forward<T>(cp<T>(q[0]), shared, cp<T>(q[1]), cp<T>(q[2]), mp<T>(q[3]), nullptr, B, E, K,
                                     N, act);
          });
        },
        "grouped_forward per replica (nothing saved); p = a, w, b, out.");
  m.def(("backward_replicas" + sfx).c_str(),
        [](int64_t S, const std::vector<uintptr_t>& p, const std::vector<int64_t>& st, bool shared, int64_t B,
           int64_t E, int64_t K, int64_t N, int64_t nT, int act) {
          checked_count(p, 14);
          over_replicas<T>(S, p, st, [&](const std::vector<uintptr_t>& q) {
            mmoe::backward<T>(cp<T>(q[0]), shared, cp<T>(q[1]), cp<T>(q[2]), nullptr, cp<T>(q[3]), cp<T>(q[4]),
                              cp<T>(q[5]), cp<T>(q[6]), cp<T>(q[7]), mp<T>(q[8]), mp<T>(q[9]), mp<T>(q[10]),
                              mp<T>(q[11]), mp<T>(q[12]), mp<T>(q[13]), B, E, K, N, nT, act);
          });
        },
        "backward per replica (pre-activations recomputed); p = a, w, b, G, dm, dout, wg, bg, da, dW, db, dG, dWg, "
        "dbg.");
  py::class_<Session<T>>(m, ("Session" + sfx).c_str())
      .def(py::init<int64_t, int64_t>(), py::arg("in_features"), py::arg("tasks"))
      .def("add_hidden", &Session<T>::add_hidden)
      .def("set_mixture", &Session<T>::set_mixture)
      .def("add_tower_layer", &Session<T>::add_tower_layer)
      .def("run", &Session<T>::run, "out[B,T] from x[B,D]; releases the GIL; safe from many threads at once.")
      .def_property_readonly("isa", &Session<T>::isa);
  py::class_<Live<T>>(m, ("Live" + sfx).c_str())
      .def(py::init<int64_t, int64_t, int64_t, const std::vector<std::vector<int64_t>>&, const std::vector<int64_t>&>(),
           py::arg("in_features"), py::arg("tasks"), py::arg("gates"), py::arg("layers"), py::arg("tower_widths"))
      .def("run", &Live<T>::run, "out[B,T] from x[B,D] and the parameters' pointers; releases the GIL.")
      .def("run_watched", &Live<T>::run_watched, py::arg("x"), py::arg("out"), py::arg("B"), py::arg("tensors"),
           py::arg("watch"), py::arg("inference"),
           "run() on the tensors' pointers where watch_holds(watch, inference); False (nothing written) "
           "where it does not.");
  py::class_<TrainStep<T>>(m, ("TrainStep" + sfx).c_str())
      .def(py::init<int64_t, int64_t, int64_t, int64_t, const std::vector<int64_t>&, int, const std::vector<uint8_t>&>(),
           py::arg("in_features"), py::arg("experts"), py::arg("hidden"), py::arg("gates"), py::arg("tower_widths"),
           py::arg("activation"), py::arg("binary"))
      .def("run", &TrainStep<T>::run, py::arg("x"), py::arg("y"), py::arg("coef"), py::arg("weight"), py::arg("B"),
           py::arg("params"), py::arg("grads"),
           "Per-task loss sums of one training step; every gradient written into grads' buffers; releases the GIL.");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmoe_fast CPU kernels on raw contiguous buffers";
  bind<float>(m, "_f32");
  bind<double>(m, "_f64");
  // The integers the kernels take for activations; mmoe_fast.contract.ACTIVATION_CODES must equal them.
  m.attr("activation_codes") = py::dict(py::arg("identity") = static_cast<int>(mmoe::kIdentity),
                                        py::arg("relu") = static_cast<int>(mmoe::kRelu),
                                        py::arg("silu") = static_cast<int>(mmoe::kSilu),
                                        py::arg("gelu") = static_cast<int>(mmoe::kGelu));
  py::class_<Block>(m, "Block", py::buffer_protocol(),
                    "Memory for one tensor from the kept pool (torch.frombuffer(Block(n), dtype=...)); it returns to "
                    "the pool when the last tensor over it dies.")
      .def(py::init<size_t>(), py::arg("bytes"))
      .def_buffer([](Block& b) {
        return py::buffer_info(b.ptr, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.bytes)}, {static_cast<py::ssize_t>(1)});
      });
  m.def("modules_unchanged", &modules_unchanged, py::arg("modules"), py::arg("types"), py::arg("children"),
        py::arg("params"), py::arg("forwards") = py::tuple(), py::arg("counts") = py::tuple(),
        "Whether a module tree is as read: types, no hooks or instance forward, children and parameters by "
        "identity, each (class, forward) pair's class still has that forward, each (module, n) still holds n "
        "parameters (see models/common.py's Guard).");
  m.def("watch_holds", &watch_holds, py::arg("watch"), py::arg("inference"),
        "Whether a fused path's watch list holds: modules_unchanged's, each plain attribute's value and the "
        "parameters' metadata check (see models/common.py's LiveCall).");
  m.def("release_blocks", []() { return BlockPool::get().release(); },
        "Free the pool's kept blocks (those no tensor uses); returns the bytes freed.");
  m.def("cached_block_bytes", []() { return BlockPool::get().cached(); });
  m.def("isa", []() { return std::string(mmoe::isa_name(mmoe::active_isa())); },
        "The instruction set new calls use: avx512, avx2 or base.");
  m.def("best_isa", []() { return std::string(mmoe::isa_name(mmoe::best_isa())); });
  m.def("set_isa", [](const std::string& name) {
    const int isa = name == "avx512" ? mmoe::kAvx512 : name == "avx2" ? mmoe::kAvx2 : name == "base" ? mmoe::kBase : -1;
    if (isa < 0) throw std::invalid_argument("isa must be avx512, avx2 or base");
    mmoe::set_isa(isa);
  }, "Lower the instruction set (tests run every path); sessions keep the one they were packed for.");
}
