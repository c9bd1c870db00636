// Compiles kernels_body.h once per instruction set and picks one at run time, so a wheel built for
// generic x86-64 still runs AVX-512 or AVX2 + FMA code where the CPU has it (no -march=native).
#include "kernels.h"

#include <atomic>
#include <stdexcept>

#ifdef __linux__
#include <sys/mman.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#define MMOE_X86 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,bmi2")
namespace mmoe::avx512 {
constexpr int kVecBytes = 64;
constexpr int kTileRows = 8;  // 8 rows x 2 zmm = 16 accumulators of 32 registers
#include "kernels_body.h"
}  // namespace mmoe::avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace mmoe::avx2 {
constexpr int kVecBytes = 32;
constexpr int kTileRows = 6;  // 6 rows x 2 ymm = 12 accumulators of 16 registers
#include "kernels_body.h"
}  // namespace mmoe::avx2
#pragma GCC pop_options
#endif

namespace mmoe::base {
constexpr int kVecBytes = 16;
constexpr int kTileRows = 6;
#include "kernels_body.h"
}  // namespace mmoe::base

namespace mmoe {

void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (bytes < 2 * kHuge) return;
  const uintptr_t start = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);  // advice only
#else
  (void)p;
  (void)bytes;
#endif
}

int best_isa() {
#ifdef MMOE_X86
  static const int isa = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                                 __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")
                             ? kAvx512
                         : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? kAvx2
                                                                                             : kBase;
  return isa;
#else
  return kBase;
#endif
}

static std::atomic<int> g_isa{-1};

int active_isa() {
  const int isa = g_isa.load(std::memory_order_relaxed);
  return isa < 0 ? best_isa() : isa;
}

void set_isa(int isa) {
  if (isa < kBase || isa > best_isa()) throw std::invalid_argument("this CPU cannot run that instruction set");
  g_isa.store(isa);
}

const char* isa_name(int isa) { return isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "base"; }

#ifdef MMOE_X86
#define MMOE_DISPATCH(isa, call)                  \
  switch (isa) {                                  \
    case kAvx512: return avx512::call;            \
    case kAvx2: return avx2::call;                \
    default: return base::call;                   \
  }
#else
#define MMOE_DISPATCH(isa, call) return base::call;
#endif

template <typename T>
void gate_softmax(const T* x, const T* wg, const T* bg, T* G, int64_t B, int64_t D, int64_t nT, int64_t E) {
  MMOE_DISPATCH(active_isa(), gate_entry<T>(x, wg, bg, G, B, D, nT, E))
}

template <typename T>
void mixture_forward(const T* a, bool shared, const T* w, const T* b, const T* wg, const T* bg, const T* G, T* m,
                     T* save_pre, T* save_G, int64_t B, int64_t E, int64_t K, int64_t N, int64_t nT, int act) {
  MMOE_DISPATCH(active_isa(), mixture_entry<T>(a, shared, w, b, wg, bg, G, m, save_pre, save_G, B, E, K, N, nT, act))
}

template <typename T>
void grouped_forward(const T* a, bool shared, const T* w, const T* b, T* out, T* save_pre, int64_t B, int64_t E,
                     int64_t K, int64_t N, int act) {
  MMOE_DISPATCH(active_isa(), grouped_entry<T>(a, shared, w, b, out, save_pre, B, E, K, N, act))
}

template <typename T>
void backward(const T* a, bool shared, const T* w, const T* b, const T* pre, const T* G, const T* dm, const T* dout,
              const T* wg, const T* bg, T* da, T* dW, T* db, T* dG, T* dWg, T* dbg, int64_t B, int64_t E, int64_t K,
              int64_t N, int64_t nT, int act) {
  MMOE_DISPATCH(active_isa(), backward_entry<T>(a, shared, w, b, pre, G, dm, dout, wg, bg, da, dW, db, dG, dWg, dbg,
                                                B, E, K, N, nT, act))
}

template <typename T>
void from_pre(T* pre, bool rowmajor, const T* bias, const T* G, T* m, T* out, bool out_em, int64_t B, int64_t E,
              int64_t N, int64_t nT, int act) {
  MMOE_DISPATCH(active_isa(), from_pre_entry<T>(pre, rowmajor, bias, G, m, out, out_em, B, E, N, nT, act))
}

template <typename T>
void backward_rows(const T* pre, bool rowmajor, const T* G, const T* dm, const T* dout, bool dout_em, T* dp,
                   T* dlogit, T* dG, T* db, int64_t B, int64_t E, int64_t N, int64_t nT, int act) {
  MMOE_DISPATCH(active_isa(),
                rows_entry<T>(pre, rowmajor, G, dm, dout, dout_em, dp, dlogit, dG, db, B, E, N, nT, act))
}

template <typename T>
void towers_forward(const T* h, bool shared, int64_t B, int64_t nT, int64_t L, const int64_t* widths,
                    const T* const* w, const T* const* bias, T* out, T* save) {
  MMOE_DISPATCH(active_isa(), towers_forward_entry<T>(h, shared, B, nT, L, widths, w, bias, out, save))
}

template <typename T>
void towers_backward(const T* h, bool shared, int64_t B, int64_t nT, int64_t L, const int64_t* widths,
                     const T* const* w, const T* save, const T* dout, T* dh, T* const* dw, T* const* db) {
  MMOE_DISPATCH(active_isa(), towers_backward_entry<T>(h, shared, B, nT, L, widths, w, save, dout, dh, dw, db))
}

template <typename T>
void softmax_rows(const T* logits, T* out, int64_t rows, int64_t E) {
  MMOE_DISPATCH(active_isa(), softmax_entry<T>(logits, out, rows, E))
}

template <typename T>
void replicas_step(const ReplicaStep<T>& step) {
  MMOE_DISPATCH(active_isa(), replicas_entry<T>(step))
}

template <typename T>
void pack_grouped(int isa, const T* w, const T* b, int64_t E, int64_t K, int64_t N, int act, Grouped<T>& out,
                  bool shared) {
  out.E = E;
  out.K = K;
  out.N = N;
  out.act = act;
  MMOE_DISPATCH(isa, pack_entry<T>(w, b, out, shared))
}

template <typename T>
void pack_gate(int isa, const T* wg, const T* bg, int64_t D, int64_t nT, int64_t E, Grouped<T>& out) {
  MMOE_DISPATCH(isa, pack_gate_entry<T>(wg, bg, D, nT, E, out))
}

template <typename T>
bool tower_dot_layer(int isa, int64_t K, int64_t N) {
  MMOE_DISPATCH(isa, Kern<T>::dot_layer(K, N))
}

template <typename T>
void session_run(const Model<T>& model, const T* x, T* out, int64_t B) {
  thread_local Scratch<T> sc;  // per calling thread: concurrent runs share nothing writable
  MMOE_DISPATCH(model.isa, Kern<T>::session_run(model, x, out, B, sc))
}

template <typename T>
void live_run(const LiveModel<T>& model, const T* x, T* out, int64_t B) {
  thread_local Scratch<T> sc;
  MMOE_DISPATCH(active_isa(), Kern<T>::live_run(model, x, out, B, sc))
}

#define MMOE_INSTANTIATE(T)                                                                                      \
  template void gate_softmax<T>(const T*, const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t);            \
  template void mixture_forward<T>(const T*, bool, const T*, const T*, const T*, const T*, const T*, T*, T*, T*, \
                                   int64_t, int64_t, int64_t, int64_t, int64_t, int);                            \
  template void grouped_forward<T>(const T*, bool, const T*, const T*, T*, T*, int64_t, int64_t, int64_t,         \
                                   int64_t, int);                                                                \
  template void backward<T>(const T*, bool, const T*, const T*, const T*, const T*, const T*, const T*, const T*, \
                            const T*, T*, T*, T*, T*, T*, T*, int64_t, int64_t, int64_t, int64_t, int64_t, int);  \
  template void from_pre<T>(T*, bool, const T*, const T*, T*, T*, bool, int64_t, int64_t, int64_t, int64_t, int);   \
  template void backward_rows<T>(const T*, bool, const T*, const T*, const T*, bool, T*, T*, T*, T*, int64_t,        \
                                 int64_t, int64_t, int64_t, int);                                              \
  template void pack_grouped<T>(int, const T*, const T*, int64_t, int64_t, int64_t, int, Grouped<T>&, bool);           \
  template void pack_gate<T>(int, const T*, const T*, int64_t, int64_t, int64_t, Grouped<T>&);                  \
  template void softmax_rows<T>(const T*, T*, int64_t, int64_t);                                                   \
  template void replicas_step<T>(const ReplicaStep<T>&);                                                          \
  template bool tower_dot_layer<T>(int, int64_t, int64_t);                                                        \
  template void session_run<T>(const Model<T>&, const T*, T*, int64_t);                                                 \
  template void live_run<T>(const LiveModel<T>&, const T*, T*, int64_t);                                        \
  template void towers_forward<T>(const T*, bool, int64_t, int64_t, int64_t, const int64_t*, const T* const*,      \
                                  const T* const*, T*, T*);                                                      \
  template void towers_backward<T>(const T*, bool, int64_t, int64_t, int64_t, const int64_t*, const T* const*,     \
                                   const T*, const T*, T*, T* const*, T* const*);

MMOE_INSTANTIATE(float)
MMOE_INSTANTIATE(double)

}  // namespace mmoe
