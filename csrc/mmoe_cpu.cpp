// mmoe_fast._C: CPU kernels on raw buffers (no torch headers), bound with pybind11.
// Pointers arrive as integers (tensor.data_ptr()), row-major and contiguous; sizes as int64.
// The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

// G[b, t, :] = softmax(x[b, :] @ wg[t] + bg[t]): x[B, D], wg[T, D, E], bg[T, E] or null, g[B, T, E].
// Accumulates in Acc (float for float inputs, double for double); the softmax is max-subtracted.
template <typename T, typename Acc>
void gate_softmax(const T* x, const T* wg, const T* bg, T* g, int64_t B, int64_t D, int64_t nT, int64_t E) {
#pragma omp parallel
  {
    std::vector<Acc> logits(static_cast<size_t>(E));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T* xb = x + b * D;
      for (int64_t t = 0; t < nT; ++t) {
        const T* w = wg + t * D * E;
        for (int64_t e = 0; e < E; ++e) logits[e] = bg ? static_cast<Acc>(bg[t * E + e]) : Acc(0);
        for (int64_t d = 0; d < D; ++d) {
          const Acc xv = xb[d];
          const T* wrow = w + d * E;
          for (int64_t e = 0; e < E; ++e) logits[e] += xv * static_cast<Acc>(wrow[e]);
        }
        Acc mx = logits[0];
        for (int64_t e = 1; e < E; ++e) mx = std::max(mx, logits[e]);
        Acc sum = 0;
        for (int64_t e = 0; e < E; ++e) {
          logits[e] = std::exp(logits[e] - mx);
          sum += logits[e];
        }
        T* out = g + (b * nT + t) * E;
        for (int64_t e = 0; e < E; ++e) out[e] = static_cast<T>(logits[e] / sum);
      }
    }
  }
}

template <typename T, typename Acc>
void bind_gate_softmax(py::module_& m, const char* name) {
  m.def(
      name,
      [](uintptr_t x, uintptr_t wg, uintptr_t bg, uintptr_t g, int64_t B, int64_t D, int64_t nT, int64_t E) {
        py::gil_scoped_release release;
        gate_softmax<T, Acc>(reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(wg),
                             reinterpret_cast<const T*>(bg), reinterpret_cast<T*>(g), B, D, nT, E);
      },
      py::arg("x"), py::arg("gate_weight"), py::arg("gate_bias"), py::arg("out"), py::arg("B"), py::arg("D"),
      py::arg("T"), py::arg("E"),
      "G[B,T,E] = softmax(x[B,D] @ Wg[T,D,E] + bg[T,E]); pointers as integers, gate_bias 0 for none.");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmoe_fast CPU kernels on raw contiguous buffers";
  bind_gate_softmax<float, float>(m, "gate_softmax_f32");
  bind_gate_softmax<double, double>(m, "gate_softmax_f64");
  m.def("openmp_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 0;
#endif
  }, "OpenMP's thread count, or 0 when the extension was built without OpenMP.");
}
