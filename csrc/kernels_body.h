// The CPU kernels, written once and compiled once per instruction set: kernels.cpp includes this file
// inside a namespace under `#pragma GCC target(...)`, after defining kVecBytes (vector width) and kTileRows
// (rows of the register tile). No include guard and no includes here, on purpose.
//
// The expert GEMM runs on a register tile of kTileRows rows x NR = 2 vectors of columns (a "panel"),
// K accumulated in registers; everything after it (bias, activation, gated mixture) is an epilogue on that
// tile, so [B, E, H] is never written by an inference forward (a training forward may save the pre-activations
// there for its backward, which then needs no second GEMM to recompute them).
// Work is split into fixed row blocks (RB rows) x panels: the split does not depend on the thread count,
// so every reduction runs in the same order whatever OMP_NUM_THREADS is (deterministic results).

template <typename T>
struct Kern {
  typedef T V __attribute__((vector_size(kVecBytes)));
  static constexpr int L = kVecBytes / static_cast<int>(sizeof(T));  // lanes per vector
  static constexpr int NR = 2 * L;                                     // panel width (columns)
  static constexpr int MR = kTileRows;                                 // rows per register tile
  static constexpr int64_t RB = 8 * MR;                                // rows per work block

  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }

  // The sum of v's lanes, as a tree (a serial chain of scalar adds, what `omp simd reduction` compiles to,
  // costs a dependent add per lane: at H = 16 the dot products of the mixture's backward took most of its time).
  template <int W, size_t... I>
  static V rotate(V v, std::index_sequence<I...>) {
    return __builtin_shufflevector(v, v, ((I + W) & (L - 1))...);
  }
  static T hsum(V v) {
    if constexpr (L >= 16) v += rotate<8>(v, std::make_index_sequence<L>{});
    if constexpr (L >= 8) v += rotate<4>(v, std::make_index_sequence<L>{});
    if constexpr (L >= 4) v += rotate<2>(v, std::make_index_sequence<L>{});
    if constexpr (L >= 2) v += rotate<1>(v, std::make_index_sequence<L>{});
    return v[0];
  }

  // out[M][NR] = a[M rows, stride lda][K] @ w[K rows, stride ldw][NR]. Short tiles run S independent
  // chains over k so FMA latency does not serialize them. A row's second vector is at w + hi (L: in a row of
  // NR; elsewhere for two experts side by side read in place).
  template <int M>
  static void tile(const T* a, int64_t lda, const T* w, int64_t ldw, int64_t Kd, T* out, int64_t hi = L) {
    constexpr int S = M <= 2 ? 4 / M : 1;
    V acc[S][M][2] = {};
    int64_t k = 0;
    for (; k + S <= Kd; k += S) {
      for (int s = 0; s < S; ++s) {
        const T* wk = w + (k + s) * ldw;
        const V w0 = load(wk), w1 = load(wk + hi);
        for (int i = 0; i < M; ++i) {
          const T ai = a[i * lda + k + s];
          acc[s][i][0] += ai * w0;
          acc[s][i][1] += ai * w1;
        }
      }
    }
    for (; k < Kd; ++k) {
      const T* wk = w + k * ldw;
      const V w0 = load(wk), w1 = load(wk + hi);
      for (int i = 0; i < M; ++i) {
        const T ai = a[i * lda + k];
        acc[0][i][0] += ai * w0;
        acc[0][i][1] += ai * w1;
      }
    }
    for (int s = 1; s < S; ++s)
      for (int i = 0; i < M; ++i) {
        acc[0][i][0] += acc[s][i][0];
        acc[0][i][1] += acc[s][i][1];
      }
    for (int i = 0; i < M; ++i) {
      std::memcpy(out + i * NR, &acc[0][i][0], sizeof(V));
      std::memcpy(out + i * NR + L, &acc[0][i][1], sizeof(V));
    }
  }

  template <int M = MR>
  static void tile_rows(int m, const T* a, int64_t lda, const T* w, int64_t ldw, int64_t Kd, T* out,
                        int64_t hi = L) {
    if constexpr (M > 1) {
      if (m < M) return tile_rows<M - 1>(m, a, lda, w, ldw, Kd, out, hi);
    }
    tile<M>(a, lda, w, ldw, Kd, out, hi);
  }

  // out[M rows, stride ldo][NV * L] = sum_k a[k * lda + i] * w[k * ldw + 0:NV * L], the M values of A's column k
  // side by side: the replicas' own GEMMs, W^T x^T (W packed in slivers, x^T a panel) and x^T dY (x read in
  // place). NV = 1: a half panel (C = 144 is 4.5 panels: its last costs half).
  template <int NV, int M>
  static void tile_in_place(const T* a, int64_t lda, const T* w, int64_t ldw, int64_t Kd, T* out, int64_t ldo) {
    V acc[M][NV] = {};
    for (int64_t k = 0; k < Kd; ++k) {
      const T* wk = w + k * ldw;
      V wv[NV];
      for (int j = 0; j < NV; ++j) wv[j] = load(wk + j * L);
      for (int i = 0; i < M; ++i) {
        const T ai = a[k * lda + i];
        for (int j = 0; j < NV; ++j) acc[i][j] += ai * wv[j];
      }
    }
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < NV; ++j) std::memcpy(out + i * ldo + j * L, &acc[i][j], sizeof(V));
  }

  template <int NV, int M = MR>
  static void tile_in_place_rows(int m, const T* a, int64_t lda, const T* w, int64_t ldw, int64_t Kd, T* out,
                                 int64_t ldo) {
    if constexpr (M > 1) {
      if (m < M) return tile_in_place_rows<NV, M - 1>(m, a, lda, w, ldw, Kd, out, ldo);
    }
    tile_in_place<NV, M>(a, lda, w, ldw, Kd, out, ldo);
  }

  // The same over n <= NR columns: one vector's worth or two.
  static void tile_in_place_cols(int m, int64_t n, const T* a, int64_t lda, const T* w, int64_t ldw, int64_t Kd,
                                 T* out, int64_t ldo) {
    if (n <= L) return tile_in_place_rows<1>(m, a, lda, w, ldw, Kd, out, ldo);
    tile_in_place_rows<2>(m, a, lda, w, ldw, Kd, out, ldo);
  }

  // ---- exp on a vector: x = n ln2 + r (|r| <= ln2 / 2), e^r by its Taylor series to r^7 (float) or r^13
  // (double), whose remainder is under half an ulp there, times 2^n put into the exponent bits: within one ulp
  // (0.66 ulp measured with AVX-512, 0.85 with SSE). Below the smallest normal result it gives 0 (std::exp
  // would give a subnormal: an absolute difference under 1.2e-38), above the largest finite one +inf (from
  // 88.37 for float, 709.43 for double: slightly early, unreachable for softmax's x <= 0); NaN stays NaN. Softmax's exps (tens of thousands a call) cost ~10 ns each through
  // std::exp, one element at a time: the gates' whole time at the paper's sizes.
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> IT;
  typedef IT VI __attribute__((vector_size(kVecBytes)));

  static V vexp(V x) {
    constexpr bool f32 = sizeof(T) == 4;
    // lo: the smallest normal result (exp(-87.336), exp(-708.396)); hi: n at most 127 (1023) after rounding.
    constexpr T lo = f32 ? T(-87.33) : T(-708.39), hi = f32 ? T(88.37) : T(709.43);
    constexpr T log2e = T(1.4426950408889634), ln2_hi = f32 ? T(0.693359375) : T(0.6931471803691238);
    constexpr T ln2_lo = f32 ? T(-2.12194440e-4) : T(1.9082149292705877e-10);
    constexpr T magic = f32 ? T(12582912.0) : T(6755399441055744.0);  // 1.5 * 2^23 (2^52): rounds to an integer
    const V under = x < lo ? V{} + T(1) : V{}, over = x > hi ? V{} + T(1) : V{};
    V xc = x < lo ? V{} + lo : x;
    xc = xc > hi ? V{} + hi : xc;
    const V n = (xc * log2e + magic) - magic;
    const V r = (xc - n * ln2_hi) - n * ln2_lo;
    constexpr int terms = f32 ? 7 : 13;
    V p = V{} + T(1);
    for (int k = terms; k >= 1; --k) p = p * (r * (T(1) / T(k))) + T(1);  // Horner: 1 + r (1 + r/2 (1 + ...))
    const VI e = __builtin_convertvector(n, VI) + (f32 ? 127 : 1023);
    const VI bits = e << (f32 ? 23 : 52);
    V scale;
    std::memcpy(&scale, &bits, sizeof scale);
    V y = p * scale;
    y = under != T(0) ? V{} : y;
    y = over != T(0) ? V{} + std::numeric_limits<T>::infinity() : y;
    return x != x ? x : y;  // NaN in, NaN out
  }

  // ---- activations: the formulas once; kernels are instantiated per activation through with_act -------
  template <int A>
  static T fval(T z) {
    if constexpr (A == kRelu) return z < T(0) ? T(0) : z;  // NaN stays NaN
    else if constexpr (A == kSilu) return z / (T(1) + std::exp(-z));
    else if constexpr (A == kGelu) return T(0.5) * z * (T(1) + std::tanh(T(kGeluC) * (z + T(kGeluA) * z * z * z)));
    else return z;
  }

  template <int A>
  static T fder(T z) {
    if constexpr (A == kRelu) {
      return z > T(0) ? T(1) : T(0);
    } else if constexpr (A == kSilu) {
      const T s = T(1) / (T(1) + std::exp(-z));
      return s * (T(1) + z * (T(1) - s));
    } else if constexpr (A == kGelu) {
      const T th = std::tanh(T(kGeluC) * (z + T(kGeluA) * z * z * z));
      return T(0.5) * (T(1) + th) + T(0.5) * z * (T(1) - th * th) * T(kGeluC) * (T(1) + T(3) * T(kGeluA) * z * z);
    } else {
      return T(1);
    }
  }

  // fn(std::integral_constant<int, act>{}): one instantiation per activation, the switch outside the loops.
  template <typename F>
  static void with_act(int act, F&& fn) {
    switch (act) {
      case kRelu: return fn(std::integral_constant<int, kRelu>{});
      case kSilu: return fn(std::integral_constant<int, kSilu>{});
      case kGelu: return fn(std::integral_constant<int, kGelu>{});
      default: return fn(std::integral_constant<int, kIdentity>{});
    }
  }

  // f = act(z) on one panel row
  static void act_fwd(int act, const T* z, T* f) {
    with_act(act, [&](auto A) {
      for (int j = 0; j < NR; ++j) f[j] = fval<A>(z[j]);
    });
  }

  // ---- weights as panels ------------------------------------------------------------------------
  // Expert weights W[E, K, N] seen as panels of NR columns. Packed (an InferenceSession, packed once):
  // [E][P][K][NR], zero-padded. Unpacked (the ops): full panels read in place with stride N; the last,
  // partial panel of each expert is copied once per call into a zero-padded buffer.
  // Side by side (`side`: a shared input and experts narrower than a panel, see side_by_side): the E experts'
  // columns in a row, E * N of them, packed as one matrix [P][K][NR] with P = panels(E * N), bias [P*NR]; a
  // panel then holds several experts (at the paper's N = 16 half of each per-expert panel was padding).
  // `direct` (the ops, N = L): no copy, panel p is experts 2p and 2p + 1 read in place, one vector each (the
  // tail: the last expert of an odd E, beside zeros).
  // `ld` (a one-expert layer, packed): 0, panels [P][K][NR]; else the rows [K][ld] (ld >= N) with NR values to
  // spare after the last, panel p at column p * NR (a no-grad forward's small layers, copied per call: a
  // quarter of the values for a tower of 8; the columns past N are other values, computed and never used).
  struct Panels {
    const T* w;
    const T* tail;  // [E][K][NR] or null
    const T* bias;  // [E][P*NR] zero-padded, or null
    int64_t E, Kd, N, P;
    bool packed;
    bool side = false, direct = false;
    int64_t ld = 0;

    // Side by side: panel p's weights, their row stride and the offset of a row's second vector.
    const T* side_panel(int64_t p, int64_t* ldw, int64_t* hi) const {
      if (direct && 2 * p + 1 < E) {
        *ldw = N;
        *hi = Kd * N;
        return w + 2 * p * Kd * N;
      }
      *ldw = NR;
      *hi = L;
      return direct ? tail : w + p * Kd * NR;
    }

    const T* get(int64_t e, int64_t p, int64_t* ldw) const {
      if (packed && ld) {
        *ldw = ld;
        return w + p * NR;
      }
      if (packed) {
        *ldw = NR;
        return w + (e * P + p) * Kd * NR;
      }
      if ((p + 1) * NR > N) {
        *ldw = NR;
        return tail + e * Kd * NR;
      }
      *ldw = N;
      return w + e * Kd * N + p * NR;
    }
  };

  static int64_t panels(int64_t n) { return (n + NR - 1) / NR; }

  // Whether E experts of N columns on a shared input go side by side: a per-expert panel would pad them.
  // Either way every output has the same bits (the same multiply-adds in the same order per column).
  static bool side_by_side(bool shared, int64_t E, int64_t N) { return shared && E > 1 && N < NR; }

  // W[E, K, N] (and b[E, N] or null) side by side: out[P][K][NR], bias[P*NR], P = panels(E * N), zero-padded.
  static void pack_side(const T* w, const T* b, int64_t E, int64_t Kd, int64_t N, T* out, T* bias) {
    const int64_t C = E * N, P = panels(C);
    std::fill(out + (P - 1) * Kd * NR, out + P * Kd * NR, T(0));  // the last panel's padding columns
    for (int64_t e = 0; e < E; ++e)  // NR a power of two: no division per element
      for (int64_t k = 0; k < Kd; ++k) {
        const T* src = w + (e * Kd + k) * N;
        for (int64_t h = 0, c = e * N; h < N; ++h, ++c) out[((c / NR) * Kd + k) * NR + c % NR] = src[h];
      }
    for (int64_t c = 0; c < P * NR; ++c) bias[c] = (b && c < C) ? b[c] : T(0);
  }

  // fn(j, e, h, n) for each run of one expert's columns in side-by-side panel p: n columns from the panel's
  // column j, expert e's columns h .. h + n.
  template <typename F>
  static void segments(int64_t p, int64_t E, int64_t N, F&& fn) {
    const int64_t c0 = p * NR, end = std::min<int64_t>(c0 + NR, E * N);
    for (int64_t c = c0; c < end;) {
      const int64_t e = c / N, h = c % N, n = std::min<int64_t>(N - h, end - c);
      fn(c - c0, e, h, n);
      c += n;
    }
  }

  // An nn.Linear weight W[N, K] transposed into panels [P][K][NR], P = panels(N), zero-padded; W read in order.
  static void pack_linear(const T* W, int64_t N, int64_t K, T* q) {
    const int64_t P = panels(N);
    std::fill(q + (P - 1) * K * NR, q + P * K * NR, T(0));  // the last panel's padding columns
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) q[((n / NR) * K + k) * NR + n % NR] = W[n * K + k];
  }

  static void pack(const T* w, int64_t E, int64_t Kd, int64_t N, T* out) {
    const int64_t P = panels(N);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t p = 0; p < P; ++p)
        for (int64_t k = 0; k < Kd; ++k) {
          T* o = out + ((e * P + p) * Kd + k) * NR;
          const T* src = w + (e * Kd + k) * N + p * NR;
          const int64_t n = std::min<int64_t>(NR, N - p * NR);
          for (int64_t j = 0; j < NR; ++j) o[j] = j < n ? src[j] : T(0);
        }
  }

  static void pack_bias(const T* b, int64_t E, int64_t N, T* out) {
    const int64_t W = panels(N) * NR;
    for (int64_t e = 0; e < E; ++e)
      for (int64_t j = 0; j < W; ++j) out[e * W + j] = (b && j < N) ? b[e * N + j] : T(0);
  }

  // Unpacked panels for one call; `buf` owns the tail panels and the padded bias (side by side: all of them).
  static Panels view(const T* w, const T* b, int64_t E, int64_t Kd, int64_t N, std::vector<T>& buf,
                     bool shared = false) {
    if (side_by_side(shared, E, N) && N == L) {
      const int64_t P = panels(E * N), odd = E % 2;
      buf.assign(static_cast<size_t>(odd * Kd * NR + P * NR), T(0));
      T* tail = buf.data();
      for (int64_t k = 0; k < odd * Kd; ++k) std::memcpy(tail + k * NR, w + ((E - 1) * Kd + k) * N, sizeof(T) * N);
      T* bias = buf.data() + odd * Kd * NR;
      if (b) std::memcpy(bias, b, static_cast<size_t>(E * N) * sizeof(T));
      Panels out{w, odd ? tail : nullptr, bias, E, Kd, N, P, false, true};
      out.direct = true;
      return out;
    }
    if (side_by_side(shared, E, N)) {
      const int64_t P = panels(E * N);
      buf.resize(static_cast<size_t>(P * Kd * NR + P * NR));
      pack_side(w, b, E, Kd, N, buf.data(), buf.data() + P * Kd * NR);
      return Panels{buf.data(), nullptr, buf.data() + P * Kd * NR, E, Kd, N, P, true, true};
    }
    const int64_t P = panels(N), rem = N % NR;
    if (!rem && b) return Panels{w, nullptr, b, E, Kd, N, P, false};  // whole panels: b is [E][P*NR] already
    buf.assign(static_cast<size_t>(E * (rem ? Kd * NR : 0) + E * P * NR), T(0));
    T* tail = buf.data();
    if (rem)
      for (int64_t e = 0; e < E; ++e)
        for (int64_t k = 0; k < Kd; ++k)
          for (int64_t j = 0; j < rem; ++j) tail[(e * Kd + k) * NR + j] = w[(e * Kd + k) * N + (P - 1) * NR + j];
    T* bias = buf.data() + E * (rem ? Kd * NR : 0);
    pack_bias(b, E, N, bias);
    return Panels{w, rem ? tail : nullptr, bias, E, Kd, N, P, false};
  }

  // A panel read in place (row stride ldw = N) that several register tiles of rows [r0, r0 + rows) will read:
  // copied once into a contiguous [K][NR] buffer of this thread. Read in place, its rows N values apart alias
  // in L1 (at N = 256 every fourth row maps to the same sets: a 128-row panel does not stay there); a packed
  // Session's panels are contiguous already. The same values in the same order: the same bits.
  static const T* reused_panel(const T* wp, int64_t* ldw, int64_t Kd, int64_t rows) {
    if (*ldw == NR || rows <= MR) return wp;
    T* buf = scratch<T>(8, static_cast<size_t>(Kd * NR));
    for (int64_t k = 0; k < Kd; ++k) std::memcpy(buf + k * NR, wp + k * *ldw, sizeof(T) * NR);
    *ldw = NR;
    return buf;
  }

  // a's rows for expert e: a[B, K] shared (stride K) or a[B, E, K] (stride E*K, offset e*K).
  static const T* rows_of(const T* a, bool shared, int64_t e, int64_t Kd) { return shared ? a : a + e * Kd; }
  static int64_t lda_of(bool shared, int64_t E, int64_t Kd) { return shared ? Kd : E * Kd; }

  // ---- forward ------------------------------------------------------------------------------------
  // pre[e, b, :] = a_e[b] @ W[e] + bias[e] (expert-major: a row block's rows are near each other in memory),
  // when the forward saves it for the backward.
  static void save_row(T* save, const T* z, int64_t b, int64_t B, int64_t e, int64_t N, int64_t h0, int64_t nh) {
    if (!save) return;
    T* o = save + (e * B + b) * N + h0;
    if (nh == NR) {  // a whole panel: two vector stores, not a library call per row
      const V z0 = load(z), z1 = load(z + L);
      std::memcpy(o, &z0, sizeof(V));
      std::memcpy(o + L, &z1, sizeof(V));
    } else {
      for (int64_t j = 0; j < nh; ++j) o[j] = z[j];
    }
  }

  // m[t, b, :] = sum_e G[b, t, e] act(a_e[b] @ W[e] + bias[e]) for rows [r0, r1) and panel p;
  // G points at row r0's gates; save: pre[E, B, H] or null.
  static void mixture_item(const T* a, bool shared, const Panels& w, const T* G, T* m, T* save, int64_t B,
                           int64_t nT, int act, int64_t r0, int64_t r1, int64_t p) {
    alignas(64) T pre[MR * NR];
    alignas(64) T f[NR];
    const int64_t E = w.E, Kd = w.Kd, H = w.N, h0 = p * NR, nh = std::min<int64_t>(NR, H - h0);
    const int64_t lda = lda_of(shared, E, Kd);
    if (w.side) {  // every panel here (the item is the row block): m summed over experts from zero
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t t = 0; t < nT; ++t) std::fill(m + (t * B + r) * H, m + (t * B + r + 1) * H, T(0));
      for (int64_t q = 0; q < w.P; ++q)
        for (int64_t r = r0; r < r1; r += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, r1 - r));
          int64_t ldw, hi;
          const T* wq = w.side_panel(q, &ldw, &hi);
          tile_rows(mr, a + r * lda, lda, wq, ldw, Kd, pre, hi);
          for (int i = 0; i < mr; ++i) {
            T* z = pre + i * NR;
            for (int j = 0; j < NR; ++j) z[j] += w.bias[q * NR + j];
            act_fwd(act, z, f);
            segments(q, E, H, [&](int64_t j, int64_t e, int64_t h, int64_t n) {
              if (save)
                for (int64_t c = 0; c < n; ++c) save[(e * B + r + i) * H + h + c] = z[j + c];
              for (int64_t t = 0; t < nT; ++t) {
                const T g = G[((r - r0 + i) * nT + t) * E + e];
                T* o = m + (t * B + r + i) * H + h;
                for (int64_t c = 0; c < n; ++c) o[c] += g * f[j + c];
              }
            });
          }
        }
      return;
    }
    for (int64_t e = 0; e < E; ++e) {
      int64_t ldw;
      const T* wp = reused_panel(w.get(e, p, &ldw), &ldw, Kd, r1 - r0);
      const T* bp = w.bias + e * w.P * NR + h0;
      for (int64_t r = r0; r < r1; r += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, r1 - r));
        tile_rows(mr, rows_of(a, shared, e, Kd) + r * lda, lda, wp, ldw, Kd, pre);
        for (int i = 0; i < mr; ++i) {
          T* z = pre + i * NR;
          for (int j = 0; j < NR; ++j) z[j] += bp[j];
          save_row(save, z, r + i, B, e, H, h0, nh);
          act_fwd(act, z, f);
          for (int64_t t = 0; t < nT; ++t) {
            const T g = G[((r - r0 + i) * nT + t) * E + e];
            T* o = m + (t * B + r + i) * H + h0;
            if (e == 0)
              for (int64_t j = 0; j < nh; ++j) o[j] = g * f[j];
            else
              for (int64_t j = 0; j < nh; ++j) o[j] += g * f[j];
          }
        }
      }
    }
  }

  // out[b, e, :] = act(a_e[b] @ W[e] + bias[e]) for rows [r0, r1) and panel p.
  // out null: only the pre-activations are saved.
  static void grouped_item(const T* a, bool shared, const Panels& w, T* out, T* save, int64_t B, int act,
                           int64_t r0, int64_t r1, int64_t p) {
    alignas(64) T pre[MR * NR];
    alignas(64) T f[NR];
    const int64_t E = w.E, Kd = w.Kd, N = w.N, h0 = p * NR, nh = std::min<int64_t>(NR, N - h0);
    const int64_t lda = lda_of(shared, E, Kd);
    if (w.side) {  // side-by-side panel p: its experts' columns
      int64_t ldw, hi;
      const T* wp = w.side_panel(p, &ldw, &hi);
      for (int64_t r = r0; r < r1; r += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, r1 - r));
        tile_rows(mr, a + r * lda, lda, wp, ldw, Kd, pre, hi);
        for (int i = 0; i < mr; ++i) {
          T* z = pre + i * NR;
          for (int j = 0; j < NR; ++j) z[j] += w.bias[p * NR + j];
          if (out) act_fwd(act, z, f);
          segments(p, E, N, [&](int64_t j, int64_t e, int64_t h, int64_t n) {
            if (save)
              for (int64_t c = 0; c < n; ++c) save[(e * B + r + i) * N + h + c] = z[j + c];
            if (out)
              for (int64_t c = 0; c < n; ++c) out[((r + i) * E + e) * N + h + c] = f[j + c];
          });
        }
      }
      return;
    }
    for (int64_t e = 0; e < E; ++e) {
      int64_t ldw;
      const T* wp = reused_panel(w.get(e, p, &ldw), &ldw, Kd, r1 - r0);
      const T* bp = w.bias + e * w.P * NR + h0;
      for (int64_t r = r0; r < r1; r += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, r1 - r));
        tile_rows(mr, rows_of(a, shared, e, Kd) + r * lda, lda, wp, ldw, Kd, pre);
        for (int i = 0; i < mr; ++i) {
          T* z = pre + i * NR;
          for (int j = 0; j < NR; ++j) z[j] += bp[j];
          save_row(save, z, r + i, B, e, N, h0, nh);
          if (!out) continue;
          act_fwd(act, z, f);
          T* o = out + ((r + i) * E + e) * N + h0;
          for (int64_t j = 0; j < nh; ++j) o[j] = f[j];
        }
      }
    }
  }

  // The gates' weights Wg[T, D, E] as one layer of N = T*E columns (all tasks' logits in one tile),
  // packed into panels like an expert: w[P][D][NR], b[P*NR], zero-padded.
  static void pack_gate(const T* wg, const T* bg, int64_t D, int64_t nT, int64_t E, T* w, T* b) {
    const int64_t N = nT * E, P = panels(N);
    for (int64_t c = 0; c < P * NR; ++c) {  // column by column: one division per column, not per value
      T* o = w + (c / NR) * D * NR + c % NR;
      if (c >= N) {
        for (int64_t d = 0; d < D; ++d) o[d * NR] = T(0);
        continue;
      }
      const T* src = wg + (c / E) * D * E + c % E;
      for (int64_t d = 0; d < D; ++d) o[d * NR] = src[d * E];
    }
    for (int64_t c = 0; c < P * NR; ++c) b[c] = (bg && c < N) ? bg[c] : T(0);
  }

  // out[g, :] = softmax(z[g, :]) for nG groups of E values, z[nG * E] in a buffer of W >= nG * E values, W a
  // whole number of vectors (overwritten: less each group's max, then exp). Max-subtracted; exps by vexp.
  static void softmax_groups(T* z, int64_t W, T* out, int64_t nG, int64_t E) {
    // Usually one max for the whole row will do: every group's exps stay normal numbers (their max within 80 of
    // it) and nothing is stored element by element before vexp's vector loads (a vector load of scalar stores
    // waits for them: that stall was 40% of this function).
    T top = -std::numeric_limits<T>::infinity(), low = std::numeric_limits<T>::infinity();
    for (int64_t g = 0; g < nG; ++g) {
      const T* zg = z + g * E;
      T mx = zg[0];
      for (int64_t e = 1; e < E; ++e) mx = zg[e] > mx ? zg[e] : mx;
      top = mx > top ? mx : top;
      low = mx < low ? mx : low;
    }
    const bool one_max = std::isfinite(top) && low >= top - T(80);
    if (!one_max) {  // each group less its own max
      for (int64_t g = 0; g < nG; ++g) {
        T* zg = z + g * E;
        T mx = zg[0];
        for (int64_t e = 1; e < E; ++e) mx = zg[e] > mx ? zg[e] : mx;
        if (mx != mx) mx = T(0);  // a NaN logit: let it propagate through exp, not through the max
        for (int64_t e = 0; e < E; ++e) zg[e] -= mx;
      }
    }
    const V m = V{} + (one_max ? top : T(0));
    for (int64_t c = 0; c < W; c += L) {
      const V v = vexp(load(z + c) - m);
      std::memcpy(z + c, &v, sizeof v);
    }
    for (int64_t g = 0; g < nG; ++g) {
      const T* zg = z + g * E;
      T sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += zg[e];
      for (int64_t e = 0; e < E; ++e) out[g * E + e] = zg[e] / sum;
    }
  }

  // out[r, :] = softmax(logits[r, :]) for `rows` rows of E values (logits computed elsewhere, a BLAS GEMM's).
  static void softmax_rows(const T* logits, T* out, int64_t rows, int64_t E) {
    constexpr int64_t kChunk = 64;  // rows per buffer
    const int64_t W = (kChunk * E + L - 1) / L * L;
    T* buf = scratch<T>(0, static_cast<size_t>(W));
    for (int64_t r = 0; r < rows; r += kChunk) {
      const int64_t n = std::min(kChunk, rows - r);
      std::memcpy(buf, logits + r * E, static_cast<size_t>(n * E) * sizeof(T));
      std::fill(buf + n * E, buf + W, T(0));
      softmax_groups(buf, W, out + r * E, n, E);
    }
  }

  // G[b, t, :] = softmax(x[b] @ Wg[t] + bg[t]) for rows [r0, r1), written from G's row r0 on;
  // max-subtracted. gw: pack_gate's panels.
  static void gate_block(const T* x, const Panels& gw, T* G, int64_t nT, int64_t E, int64_t r0, int64_t r1) {
    alignas(64) T pre[MR * NR];
    const int64_t D = gw.Kd, W = gw.P * NR;
    T* logits = scratch<T>(0, static_cast<size_t>(MR * W));
    for (int64_t r = r0; r < r1; r += MR) {
      const int mr = static_cast<int>(std::min<int64_t>(MR, r1 - r));
      for (int64_t p = 0; p < gw.P; ++p) {
        int64_t ldw;
        const T* wp = gw.get(0, p, &ldw);
        tile_rows(mr, x + r * D, D, wp, ldw, D, pre);
        for (int i = 0; i < mr; ++i)
          for (int j = 0; j < NR; ++j) logits[i * W + p * NR + j] = pre[i * NR + j] + gw.bias[p * NR + j];
      }
      for (int i = 0; i < mr; ++i) softmax_groups(logits + i * W, W, G + (r - r0 + i) * nT * E, nT, E);
    }
  }

  // Work items over the team (inside a parallel region; a barrier at the end). A single row block's
  // items go to fixed threads, so its weights stay in their caches from call to call; several blocks
  // are handed out on demand, so a thread the OS preempts on a busy machine holds nobody up.
  template <typename F>
  static void for_items(int64_t n, bool dynamic, F&& fn) {
    if (dynamic) {
#pragma omp for schedule(dynamic)
      for (int64_t i = 0; i < n; ++i) fn(i);
    } else {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i) fn(i);
    }
  }

  // A mixture's work items per row block: its panels, or one (side by side: panels share outputs).
  static int64_t item_panels(const Panels& w) { return w.side ? 1 : w.P; }
  // The padded columns a layer's GEMM computes.
  static int64_t columns(const Panels& w) { return (w.side ? 1 : w.E) * w.P * NR; }

  // The mixture over items (row block, panel). With gates (gw, on x) every thread computes the gates of
  // the row blocks it works on into its own buffer, once per block: no barrier, no shared write.
  // save_pre / save_G (or null): pre[B, E, H] and the gates G[B, nT, E] computed here, for the backward.
  static void mixture_items(const T* a, bool shared, const Panels& w, const T* x, const Panels* gw, const T* G, T* m,
                            int64_t B, int64_t nT, int act, T* save_pre = nullptr, T* save_G = nullptr) {
    const int64_t per = item_panels(w), items = ((B + RB - 1) / RB) * per, GE = nT * w.E;
    T* local = gw ? scratch<T>(1, static_cast<size_t>(RB * GE)) : nullptr;
    int64_t cached = -1;
    for_items(items, B > RB, [&](int64_t it) {
      const int64_t rb = it / per, r0 = rb * RB, r1 = std::min(B, r0 + RB);
      if (gw && rb != cached) {
        gate_block(x, *gw, local, nT, w.E, r0, r1);
        cached = rb;
        if (save_G && it % per == 0)  // one item per row block writes its gates
          std::memcpy(save_G + r0 * GE, local, static_cast<size_t>((r1 - r0) * GE) * sizeof(T));
      }
      mixture_item(a, shared, w, gw ? local : G + r0 * GE, m, save_pre, B, nT, act, r0, r1, it % per);
    });
  }

  // Threads for `items` work items of `work` multiply-adds in all (elementwise passes count 8 per element: their
  // short loops run that much slower than a GEMM's): at most one per kWorkPerThread, since waking
  // a sleeping OpenMP thread costs tens of microseconds (25-60 us measured on a 2-core VM), as much as
  // ~2M multiply-adds on one core: a training step's small calls, between which the team goes to sleep, run
  // faster on the calling thread alone.
  static constexpr int64_t kWorkPerThread = int64_t(1) << 21;
  // Inside a parallel region (replicas_step's, one replica per thread) a call runs on its thread alone.
  static int threads_for(int64_t items, int64_t work = INT64_MAX) {
#ifdef _OPENMP
    if (omp_in_parallel()) return 1;
#endif
    const int64_t by_work = std::max<int64_t>(1, work / kWorkPerThread);
    return static_cast<int>(std::max<int64_t>(1, std::min({static_cast<int64_t>(max_threads()), items, by_work})));
  }

  // The forward of one layer: m from a, W and the gates G, or from gates computed here (gw, on a = x).
  static void mixture_forward(const T* a, bool shared, const Panels& w, const Panels* gw, const T* G, T* m, int64_t B,
                              int64_t nT, int act, T* save_pre, T* save_G) {
#pragma omp parallel num_threads(threads_for(((B + RB - 1) / RB) * item_panels(w), B * w.Kd * columns(w)))
    mixture_items(a, shared, w, a, gw, G, m, B, nT, act, save_pre, save_G);
  }

  static void grouped_forward(const T* a, bool shared, const Panels& w, T* out, int64_t B, int act,
                              T* save = nullptr) {
    const int64_t nblocks = (B + RB - 1) / RB, items = nblocks * w.P;
#pragma omp parallel num_threads(threads_for(items, B * w.Kd * columns(w)))
    for_items(items, nblocks > 1, [&](int64_t it) {
      const int64_t r0 = (it / w.P) * RB;
      grouped_item(a, shared, w, out, save, B, act, r0, std::min(B, r0 + RB), it % w.P);
    });
  }

  // ---- backward -----------------------------------------------------------------------------------
  // From the pre-activations pre[B, E, N] (saved by the forward, or recomputed into a buffer first):
  //  1. rows (parallel over row blocks; pre is [E, B, N]): f = act(pre), d = act'(pre); df = sum_t G[b,t,e] dm[t,b,:] (a mixture)
  //     or dout[b,e,:]; dpre = df * d; dG[b,t,e] = <dm[t,b,:], f>; with the gates fused (mmoe: wg given),
  //     dlogit = G * (dG - sum_e G dG) joins dpre as nT*E more columns. Each row goes into `dp`, stored as
  //     panels [group][panel][Bp][NR], the layout the GEMMs below stream through.
  //  2. weight gradients as one GEMM per group: [a_g^T; 1] @ dp_g, the appended row of ones giving the column
  //     sums (db, dbg). A group is all experts (and gates) at once for a shared input x: E*N (+ nT*E) columns,
  //     so narrow experts share panels; per-expert inputs a[B, E, K] make one group per expert. Rows are
  //     reduced in fixed chunks, each output tile by one thread at a time: the same bits for any thread count.
  //  3. da = dp @ [W | Wg]^T when an input gradient is wanted (skipped otherwise: a third of the GEMM work).
  struct Layout {
    int64_t groups, cols, P, Bp, KS;  // groups, columns per group, panels per group, padded rows, A slivers
    T* at(T* dp, int64_t g, int64_t p) const { return dp + (g * P + p) * Bp * NR; }
  };

  // One step of a register tile: acc[i][:] += a[i * as] * w[0:NR] for the MR rows.
  static void fma_step(V (&acc)[MR][2], const T* __restrict a, int64_t as, const T* __restrict w) {
    const V w0 = load(w), w1 = load(w + L);
    for (int i = 0; i < MR; ++i) {
      const T ai = a[i * as];
      acc[i][0] += ai * w0;
      acc[i][1] += ai * w1;
    }
  }

  // out[MR][NR] (row stride ldo) = acc, or += acc when `add`.
  static void store_tile(V (&acc)[MR][2], T* out, int64_t ldo, bool add) {
    for (int i = 0; i < MR; ++i) {
      V o0 = acc[i][0], o1 = acc[i][1];
      if (add) {
        o0 += load(out + i * ldo);
        o1 += load(out + i * ldo + L);
      }
      std::memcpy(out + i * ldo, &o0, sizeof(V));
      std::memcpy(out + i * ldo + L, &o1, sizeof(V));
    }
  }

  // out (+)= sum_k ap[k][MR] (x) bp[k][NR]: both operands packed, k contiguous.
  static void tile_packed(const T* ap, const T* bp, int64_t n, T* out, int64_t ldo, bool add) {
    V acc[MR][2] = {};
    for (int64_t k = 0; k < n; ++k) fma_step(acc, ap + k * MR, 1, bp + k * NR);
    store_tile(acc, out, ldo, add);
  }

  // out[MR rows][NR] = sum over panels p and their columns j of rows[p][i][j] * wt[p*NR + j][NR] (da's GEMM:
  // dp's row panels against W^T's packed rows).
  static void tile_rows_panels(const T* rows, int64_t pstride, int64_t P, const T* wt, T* out) {
    V acc[MR][2] = {};
    for (int64_t p = 0; p < P; ++p)
      for (int j = 0; j < NR; ++j) fma_step(acc, rows + p * pstride + j, NR, wt + (p * NR + j) * NR);
    store_tile(acc, out, NR, false);
  }

  // Step 1 for row b: expert e's dpre columns to out + e * oe; with G, dG[b] (dG given) or, gates fused,
  // dlogit[b] = G * (dG - sum_e G dG). dgrow: nT * E scratch values.
  // pre's layout: expert-major [E, B, N] (rowmajor false) or [B, E, N]; dout[B, E, N], or (dout_em) expert-major
  // dout[E, B, N].
  template <int A>
  static void backward_row(int64_t b, const T* pre, bool rowmajor, const T* G, const T* dm, const T* dout,
                           bool dout_em, T* dG, T* dlogit, int64_t B, int64_t E, int64_t N, int64_t nT, T* out,
                           int64_t oe, T* dgrow) {
    for (int64_t e = 0; e < E; ++e) {
      const T* __restrict z = pre + (rowmajor ? (b * E + e) * N : (e * B + b) * N);
      T* __restrict o = out + e * oe;
      if (!G) {
        const T* __restrict dt = dout + (dout_em ? e * B + b : b * E + e) * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) o[j] = dt[j] * fder<A>(z[j]);
        continue;
      }
      const T* __restrict dmb = dm + b * N;
      const int64_t ts = B * N;  // dm's task stride
      for (int64_t t = 0; t < nT; ++t) {  // df = sum_t G dm_t, and dG's dot products
        const T g = G[(b * nT + t) * E + e];
        const T* __restrict dmt = dmb + t * ts;
        if (t == 0) {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) o[j] = g * dmt[j];
        } else {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) o[j] += g * dmt[j];
        }
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < N; ++j) s += dmt[j] * fval<A>(z[j]);
        dgrow[t * E + e] = s;
      }
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) o[j] *= fder<A>(z[j]);
    }
    if (!G) return;
    if (!dlogit) {
      std::memcpy(dG + b * nT * E, dgrow, static_cast<size_t>(nT * E) * sizeof(T));
      return;
    }
    for (int64_t t = 0; t < nT; ++t) {
      const T* g = G + (b * nT + t) * E;
      T s = 0;
      for (int64_t e = 0; e < E; ++e) s += g[e] * dgrow[t * E + e];
      for (int64_t e = 0; e < E; ++e) dlogit[t * E + e] = g[e] * (dgrow[t * E + e] - s);
    }
  }

  static constexpr int64_t kRowChunk = 2048;  // rows per step of the weight-gradient GEMM: long reductions in registers

  // wg: gates fused (a shared x, G the gates): dWg[nT, K, E] and dbg[nT, E] come out, dG does not.
  static void backward(const T* a, bool shared, const T* w, const T* pre, const T* G, const T* dm, const T* dout,
                       const T* wg, T* da, T* dW, T* db, T* dG, T* dWg, T* dbg, int64_t B, int64_t E, int64_t Kd,
                       int64_t N, int64_t nT, int act) {
    const bool fused = wg != nullptr;
    Layout lay;
    lay.groups = shared ? 1 : E;
    lay.cols = shared ? E * N + (fused ? nT * E : 0) : N;
    lay.P = panels(lay.cols);
    lay.Bp = (B + MR - 1) / MR * MR;
    lay.KS = (Kd + 1 + MR - 1) / MR;  // features and the ones row, in slivers of MR
    const int64_t lda = lda_of(shared, E, Kd), width = lay.P * NR, KW = lay.KS * MR;
    // the calling thread's kept buffers (every element is written below before it is read)
    T* dp = scratch<T>(4, static_cast<size_t>(lay.groups * width * lay.Bp));
    T* ap = scratch<T>(5, static_cast<size_t>(lay.groups * lay.KS * lay.Bp * MR));
    T* gw = scratch<T>(6, static_cast<size_t>(lay.groups * KW * width));  // [g][KS*MR][width]: the GEMM's output
    const int64_t KP = panels(Kd);
    T* wt = scratch<T>(7, static_cast<size_t>(da ? lay.groups * KP * width * NR : 1));  // [g][q][width][NR]
    const int64_t nblocks = lay.Bp / MR, items = lay.groups * lay.P * lay.KS;
#pragma omp parallel num_threads(threads_for(std::max(nblocks, items), lay.Bp * lay.groups * width * KW * (da ? 2 : 1)))
    {
      T* row = scratch<T>(0, static_cast<size_t>(lay.groups * width));
      T* dgrow = scratch<T>(1, static_cast<size_t>(nT * E + 1));
      // A: [a_g^T; 1] in slivers ap[g][s][Bp][MR] (rows past B are zero)
#pragma omp for schedule(static)
      for (int64_t gs = 0; gs < lay.groups * lay.KS; ++gs) {
        const int64_t g = gs / lay.KS, s = gs % lay.KS;
        const T* ag = rows_of(a, shared, g, Kd);
        T* o = ap + gs * lay.Bp * MR;
        for (int64_t bb = 0; bb < lay.Bp; ++bb)
          for (int i = 0; i < MR; ++i) {
            const int64_t k = s * MR + i;
            o[bb * MR + i] = bb >= B ? T(0) : k < Kd ? ag[bb * lda + k] : k == Kd ? T(1) : T(0);
          }
      }
      // W^T (and Wg^T) packed for da: wt[g][q][c][j] = Waug[q*NR + j][c]
#pragma omp for schedule(static)
      for (int64_t g = 0; g < (da ? lay.groups : 0); ++g) {
        T* o = wt + g * KP * width * NR;
        std::fill(o, o + KP * width * NR, T(0));  // padding columns and rows stay zero
        for (int64_t c = 0; c < lay.cols; ++c) {
          const int64_t e = shared ? (c < E * N ? c / N : -1) : g;
          for (int64_t k = 0; k < Kd; ++k) {
            T v;
            if (e >= 0) {
              v = w[(e * Kd + k) * N + (shared ? c % N : c)];
            } else {
              const int64_t ge = c - E * N;  // a gate column: task ge / E, expert ge % E
              v = wg[((ge / E) * Kd + k) * E + ge % E];
            }
            o[((k / NR) * width + c) * NR + k % NR] = v;
          }
        }
      }
      // 1. rows
#pragma omp for schedule(dynamic, 4)
      for (int64_t rb = 0; rb < nblocks; ++rb)
        for (int64_t bb = rb * MR; bb < (rb + 1) * MR; ++bb) {
          std::fill(row, row + lay.groups * width, T(0));
          if (bb < B)
            with_act(act, [&](auto A) {
              backward_row<A>(bb, pre, false, G, dm, dout, false, dG, fused ? row + E * N : nullptr, B, E, N, nT, row,
                              lay.groups == 1 ? N : width, dgrow);
            });
          for (int64_t g = 0; g < lay.groups; ++g)
            for (int64_t p = 0; p < lay.P; ++p)
              std::memcpy(lay.at(dp, g, p) + bb * NR, row + g * width + p * NR, sizeof(T) * NR);
        }
      // 2. [a^T; 1] @ dp, chunk by chunk of rows (an implicit barrier after each)
      for (int64_t r0 = 0; r0 < lay.Bp; r0 += kRowChunk) {
        const int64_t n = std::min(kRowChunk, lay.Bp - r0);
#pragma omp for schedule(dynamic, 2)
        for (int64_t it = 0; it < items; ++it) {
          const int64_t g = it / (lay.P * lay.KS), p = (it / lay.KS) % lay.P, s = it % lay.KS;
          tile_packed(ap + ((g * lay.KS + s) * lay.Bp + r0) * MR, lay.at(dp, g, p) + r0 * NR, n,
                      gw + (g * KW + s * MR) * width + p * NR, width, r0 > 0);
        }
      }
      // 3. da = dp @ Waug^T on row tiles
#pragma omp for schedule(dynamic, 4)
      for (int64_t it = 0; it < (da ? lay.groups * nblocks : 0); ++it) {
        const int64_t g = it / nblocks, r = (it % nblocks) * MR;
        alignas(64) T tile[MR * NR];
        for (int64_t q = 0; q < KP; ++q) {
          tile_rows_panels(lay.at(dp, g, 0) + r * NR, lay.Bp * NR, lay.P,
                           wt + (g * KP + q) * width * NR, tile);
          const int64_t nk = std::min<int64_t>(NR, Kd - q * NR);
          for (int i = 0; i < MR && r + i < B; ++i)
            std::memcpy(da + (r + i) * lda + (shared ? 0 : g * Kd) + q * NR, tile + i * NR,
                        static_cast<size_t>(nk) * sizeof(T));
        }
      }
      // the GEMM's rows to dW[E, K, N], db[E, N] (row Kd: the ones), dWg[nT, K, E], dbg[nT, E]
#pragma omp for schedule(static)
      for (int64_t gk = 0; gk < lay.groups * (Kd + 1); ++gk) {
        const int64_t g = gk / (Kd + 1), k = gk % (Kd + 1);
        const T* src = gw + (g * KW + k) * width;
        for (int64_t e = (shared ? 0 : g); e < (shared ? E : g + 1); ++e) {
          const T* from = src + (shared ? e * N : 0);
          std::memcpy(k < Kd ? dW + (e * Kd + k) * N : db + e * N, from, static_cast<size_t>(N) * sizeof(T));
        }
        if (fused)
          for (int64_t t = 0; t < nT; ++t)
            for (int64_t e = 0; e < E; ++e) {
              const T v = src[E * N + t * E + e];
              (k < Kd ? dWg[(t * Kd + k) * E + e] : dbg[t * E + e]) = v;
            }
      }
    }
  }

  // ---- passes around a GEMM done elsewhere (BLAS): pre[E, B, N] in, pre[E, B, N]-shaped dp out -----------
  // m[t, b, :] = sum_e G[b, t, e] act(pre[e, b, :]) (G given), or out[b, e, :] = act(pre[e, b, :]) (m null;
  // out_em: expert-major, out[e, b, :]). bias[E, N] (or null): first added to pre in place (the GEMM before ran
  // without it: a broadcast copy of the bias into its output and a second read of it saved), so that pre is
  // the pre-activations the backward reads.
  static void from_pre(T* pre, bool rowmajor, const T* bias, const T* G, T* m, T* out, bool out_em, int64_t B,
                       int64_t E, int64_t N, int64_t nT, int act) {
    const int64_t pe = rowmajor ? N : B * N, pb = rowmajor ? E * N : N;  // pre's expert and row strides
    const int64_t nblocks = (B + RB - 1) / RB;
    with_act(act, [&](auto A) {
#pragma omp parallel for schedule(static) num_threads(threads_for(nblocks, 8 * B * E * N * (nT + 1)))
      for (int64_t rb = 0; rb < nblocks; ++rb)
        for (int64_t b = rb * RB; b < std::min(B, (rb + 1) * RB); ++b) {
          if (bias)  // the row's E * N values, then read again below from L1
            for (int64_t e = 0; e < E; ++e) {
              T* __restrict z = pre + e * pe + b * pb;
              const T* __restrict be = bias + e * N;
#pragma omp simd
              for (int64_t j = 0; j < N; ++j) z[j] += be[j];
            }
          if (!m) {
            for (int64_t e = 0; e < E; ++e) {
              const T* __restrict z = pre + e * pe + b * pb;
              T* __restrict o = out + (out_em ? e * B + b : b * E + e) * N;
#pragma omp simd
              for (int64_t j = 0; j < N; ++j) o[j] = fval<A>(z[j]);
            }
            continue;
          }
          for (int64_t t = 0; t < nT; ++t) {
            T* __restrict o = m + (t * B + b) * N;
            const T* g = G + (b * nT + t) * E;
            for (int64_t e = 0; e < E; ++e) {
              const T* __restrict z = pre + e * pe + b * pb;
              const T ge = g[e];
              if (e == 0) {
#pragma omp simd
                for (int64_t j = 0; j < N; ++j) o[j] = ge * fval<A>(z[j]);
              } else {
#pragma omp simd
                for (int64_t j = 0; j < N; ++j) o[j] += ge * fval<A>(z[j]);
              }
            }
          }
        }
    });
  }

  // Step 1 of the backward alone: dp in pre's layout (dp[e, b, :] expert-major, or dp[b, e, :]), and
  // dlogit[B, nT, E] (gates fused) or dG; db[E, N] = sum_b dp[e, b, :] where db is given: each block of RB rows
  // sums its rows in order while they are in L1, then the blocks' sums add up in block order (the same bits for
  // any thread count).
  static void rows(const T* pre, bool rowmajor, const T* G, const T* dm, const T* dout, bool dout_em, T* dp,
                   T* dlogit, T* dG, T* db, int64_t B, int64_t E, int64_t N, int64_t nT, int act) {
    const int64_t nblocks = (B + RB - 1) / RB, EN = E * N;
    if (db && nblocks == 0) std::fill(db, db + EN, T(0));
    // every block writes its whole row of partial sums before the reduction reads it: left uninitialized
    std::unique_ptr<T[]> part(db && nblocks ? new T[static_cast<size_t>(nblocks * EN)] : nullptr);
    with_act(act, [&](auto A) {
#pragma omp parallel num_threads(threads_for(nblocks, 8 * B * E * N * (nT + 2)))
      {
        T* dgrow = scratch<T>(1, static_cast<size_t>(nT * E + 1));
#pragma omp for schedule(static)
        for (int64_t rb = 0; rb < nblocks; ++rb) {
          T* __restrict sum = db ? part.get() + rb * EN : nullptr;
          for (int64_t b = rb * RB; b < std::min(B, (rb + 1) * RB); ++b) {
            T* row = rowmajor ? dp + b * E * N : dp + b * N;
            const int64_t oe = rowmajor ? N : B * N;
            backward_row<A>(b, pre, rowmajor, G, dm, dout, dout_em, dG, dlogit ? dlogit + b * nT * E : nullptr, B, E,
                            N, nT, row, oe, dgrow);
            if (!sum) continue;
            for (int64_t e = 0; e < E; ++e) {
              const T* __restrict o = row + e * oe;
              T* __restrict s = sum + e * N;
              if (b == rb * RB) {
#pragma omp simd
                for (int64_t j = 0; j < N; ++j) s[j] = o[j];
              } else {
#pragma omp simd
                for (int64_t j = 0; j < N; ++j) s[j] += o[j];
              }
            }
          }
        }
        if (db && nblocks) {
#pragma omp for schedule(static)
          for (int64_t c = 0; c < EN; c += 16) {
            const int64_t n = std::min<int64_t>(16, EN - c);
            for (int64_t j = 0; j < n; ++j) db[c + j] = part[c + j];
            for (int64_t rb = 1; rb < nblocks; ++rb)
              for (int64_t j = 0; j < n; ++j) db[c + j] += part[rb * EN + c + j];
          }
        }
      }
    });
  }

  // ---- a whole model's forward: an InferenceSession's (packed) or a no-grad forward's (read in place) --------
  // One layer as the whole-model forward runs it.
  struct NetLayer {
    Panels w;
    int act;
  };
  // A tower's nn.Linear layer as the forward runs it: dot products over the weight's rows as they are (`dot`,
  // dot_layer), or the register tile on panels `p` ([P][K][NR] or rows, bias [P*NR]).
  struct TowerLayer {
    LiveLayer<T> l;  // nn.Linear's weight [N, K] and bias [N] (or null), K, N, act
    Panels p;
    bool dot;
  };
  // Hidden expert layers (the first on x), a gated mixture (gates > 0) or none (Shared-Bottom), then per task
  // its tower's layers. widest: a tower layer's output row (dot: N, else P * NR).
  struct Net {
    std::vector<NetLayer> hidden;
    NetLayer mixture{};
    Panels gate{};
    int64_t gates = 0, in_features = 0, tasks = 0, widest = 1;
    std::vector<std::vector<TowerLayer>> towers;
  };

  // Whether a tower layer of K inputs and N outputs runs as dot products over its weight's rows (dot_rows) rather
  // than on the register tile: narrow (a panel of NR columns would be mostly padding: 8 outputs is common) and
  // long enough for the vector sums to pay off. Every path that runs a tower forward (a Session, a no-grad
  // forward, training) decides alike, so they all give the same bits on one instruction set (NR, L and the
  // sums' order are the instruction set's: a Session keeps the one it was built with).
  static bool dot_layer(int64_t K, int64_t N) { return 2 * N <= NR && K >= 4 * L; }

  // out[i * ldo + j] = in[i] . w[j] for RI rows of in (stride lda) and NJ rows of w[.., K]: RI * NJ dot
  // products at once, over k in vectors (then a tree sum and the k tail one at a time). A tower layer is
  // narrow (8 outputs is common, a panel's NR would be mostly padding) and its nn.Linear weight rows are
  // the dot products' operands as they are: nothing is packed, for a Session or a forward read in place.
  template <int RI, int NJ>
  static void dot_tile(const T* in, int64_t lda, const T* w, int64_t K, T* out, int64_t ldo) {
    V acc[RI][NJ] = {};
    int64_t k = 0;
    for (; k + L <= K; k += L) {
      V a[RI];
      for (int i = 0; i < RI; ++i) a[i] = load(in + i * lda + k);
      for (int j = 0; j < NJ; ++j) {
        const V wj = load(w + j * K + k);
        for (int i = 0; i < RI; ++i) acc[i][j] += a[i] * wj;
      }
    }
    for (int i = 0; i < RI; ++i)
      for (int j = 0; j < NJ; ++j) {
        T s = hsum(acc[i][j]);
        for (int64_t q = k; q < K; ++q) s += in[i * lda + q] * w[j * K + q];
        out[i * ldo + j] = s;
      }
  }

  // dot_tile for ri <= RI rows and nj <= NJ outputs, both at least 1.
  static constexpr int kDotRows = kVecBytes == 64 ? 4 : 2, kDotCols = 4;  // accumulators: 16 of 32 zmm, 8 of 16
  template <int RI>
  static void dot_tile_cols(int nj, const T* in, int64_t lda, const T* w, int64_t K, T* out, int64_t ldo) {
    switch (nj) {
      case 4: return dot_tile<RI, 4>(in, lda, w, K, out, ldo);
      case 3: return dot_tile<RI, 3>(in, lda, w, K, out, ldo);
      case 2: return dot_tile<RI, 2>(in, lda, w, K, out, ldo);
      default: return dot_tile<RI, 1>(in, lda, w, K, out, ldo);
    }
  }
  static void dot_tile_any(int ri, int nj, const T* in, int64_t lda, const T* w, int64_t K, T* out, int64_t ldo) {
    static_assert(kDotCols == 4 && (kDotRows == 4 || kDotRows == 2));
    if constexpr (kDotRows == 4) {
      if (ri == 4) return dot_tile_cols<4>(nj, in, lda, w, K, out, ldo);
      if (ri == 3) return dot_tile_cols<3>(nj, in, lda, w, K, out, ldo);
    }
    if (ri > 2) throw std::logic_error("dot_tile_any: more rows than kDotRows");  // callers step by kDotRows
    if (ri == 2) return dot_tile_cols<2>(nj, in, lda, w, K, out, ldo);
    return dot_tile_cols<1>(nj, in, lda, w, K, out, ldo);
  }

  // out[i * ldo + n] = act(in[i] . w[n] + b[n]) for rn rows of in (stride lda): an nn.Linear layer (weight
  // w[N, K], bias b[N] or null) as dot products.
  static void dot_rows(const T* in, int64_t lda, int64_t rn, const T* w, const T* b, int64_t K, int64_t N, int act,
                       T* out, int64_t ldo) {
    for (int64_t r = 0; r < rn; r += kDotRows) {
      const int ri = static_cast<int>(std::min<int64_t>(kDotRows, rn - r));
      for (int64_t n = 0; n < N; n += kDotCols)
        dot_tile_any(ri, static_cast<int>(std::min<int64_t>(kDotCols, N - n)), in + r * lda, lda, w + n * K, K,
                     out + r * ldo + n, ldo);
    }
    with_act(act, [&](auto A) {
      for (int64_t i = 0; i < rn; ++i)
        for (int64_t n = 0; n < N; ++n) {
          T& z = out[i * ldo + n];
          z = fval<A>(b ? z + b[n] : z);
        }
    });
  }

  // Task t's tower on rows [r0, r1) of its input (stride lda), layer by layer through two buffers of RB rows
  // x the widest layer; out[b, t] is the last layer's column 0.
  static void tower_block(const std::vector<TowerLayer>& tower, const T* in, int64_t lda, int64_t r0, int64_t r1,
                          int64_t tasks, int64_t t, T* out, T* buf0, T* buf1) {
    alignas(64) T pre[MR * NR];
    alignas(64) T f[NR];
    const int64_t rn = r1 - r0;
    for (const TowerLayer& tl : tower) {
      const LiveLayer<T>& l = tl.l;
      int64_t ldo = l.N;
      if (tl.dot) {
        dot_rows(in, lda, rn, l.w, l.b, l.K, l.N, l.act, buf0, ldo);
      } else {
        const Panels& w = tl.p;
        ldo = w.P * NR;
        for (int64_t r = 0; r < rn; r += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, rn - r));
          for (int64_t p = 0; p < w.P; ++p) {
            int64_t ldw;
            const T* wp = w.get(0, p, &ldw);
            tile_rows(mr, in + r * lda, lda, wp, ldw, w.Kd, pre);
            for (int i = 0; i < mr; ++i) {
              T* z = pre + i * NR;
              for (int j = 0; j < NR; ++j) z[j] += w.bias[p * NR + j];
              act_fwd(l.act, z, f);
              std::memcpy(buf0 + (r + i) * ldo + p * NR, f, sizeof f);
            }
          }
        }
      }
      in = buf0;
      lda = ldo;
      std::swap(buf0, buf1);
    }
    for (int64_t i = 0; i < rn; ++i) out[(r0 + i) * tasks + t] = in[i * lda];
  }

  // A tower layer's output row in tower_block's buffers.
  static int64_t tower_row(const TowerLayer& tl) { return tl.dot ? tl.l.N : tl.p.P * NR; }

  static Panels session_panels(const Grouped<T>& g) {
    return Panels{g.w.data(), nullptr, g.b.data(), g.E, g.K, g.N, g.side ? panels(g.E * g.N) : panels(g.N), true,
                  g.side};
  }

  // x[B, D] -> out[B, T] with a Session's packed weights.
  static void session_run(const Model<T>& s, const T* x, T* out, int64_t B, Scratch<T>& sc) {
    Net net;
    for (const auto& g : s.hidden) net.hidden.push_back({session_panels(g), g.act});
    if (s.has_mixture) {
      net.mixture = {session_panels(s.mixture), s.mixture.act};
      net.gate = session_panels(s.gate);
      net.gates = s.gates;
    }
    net.in_features = s.in_features;
    net.tasks = s.tasks;
    for (const auto& tower : s.towers) {
      net.towers.emplace_back();
      for (const Linear<T>& l : tower) {
        TowerLayer tl{};
        tl.l.w = l.w.data();
        tl.l.b = l.b.empty() ? nullptr : l.b.data();
        tl.l.K = l.K;
        tl.l.N = l.N;
        tl.l.act = l.act;
        tl.dot = dot_layer(l.K, l.N);  // (add_tower_layer's choice: this is the Session's instruction set)
        if (!tl.dot) tl.p = session_panels(l.packed);
        net.widest = std::max(net.widest, tower_row(tl));
        net.towers.back().push_back(tl);
      }
    }
    run_net(net, x, out, B, sc);
  }

  // The values of linear_panels' buffer for an nn.Linear layer of this shape.
  static size_t linear_size(const LiveLayer<T>& l) {
    return static_cast<size_t>(l.K * l.N + NR + panels(l.N) * NR);
  }

  // An nn.Linear layer (weight [N, K], bias [N] or null) as one-expert rows [K][N] (Panels::ld = N) and bias
  // [P*NR] in q (linear_size values): the transpose a Session packs into [P][K][NR], without its padding.
  static Panels linear_panels(const LiveLayer<T>& l, T* q) {
    const int64_t N = l.N, K = l.K, P = panels(N);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) q[k * N + n] = l.w[n * K + k];
    T* bias = q + K * N + NR;
    std::fill(q + K * N, bias, T(0));
    for (int64_t c = 0; c < P * NR; ++c) bias[c] = (l.b && c < N) ? l.b[c] : T(0);
    Panels out{q, nullptr, bias, 1, K, N, P, true};
    out.ld = N;
    return out;
  }

  // The gates' weights wg[gates, D, E] (bg[gates, E] or null) as the rows [D][gates * E] (Panels::ld) of one
  // layer, all tasks' logits in one tile, and bias [P*NR], in q (D * GE + NR + P * NR values).
  static Panels gate_rows(const T* wg, const T* bg, int64_t D, int64_t gates, int64_t E, T* q) {
    const int64_t GE = gates * E, P = panels(GE);
    for (int64_t d = 0; d < D; ++d)
      for (int64_t t = 0; t < gates; ++t)
        std::memcpy(q + d * GE + t * E, wg + (t * D + d) * E, static_cast<size_t>(E) * sizeof(T));
    T* bias = q + D * GE + NR;
    std::fill(q + D * GE, bias, T(0));
    for (int64_t c = 0; c < P * NR; ++c) bias[c] = (bg && c < GE) ? bg[c] : T(0);
    Panels out{q, nullptr, bias, 1, D, GE, P, true};
    out.ld = GE;
    return out;
  }

  // x[B, D] -> out[B, T] from weights in the ops' layout, read in place (the experts' partial panels, the gates
  // and the tower layers on the register tile are copied per call, into buffers this thread keeps; dot_layer
  // tower layers are read as they are): the Session's arithmetic in the same order, so the same bits as a
  // Session of these weights built on this instruction set.
  static void live_run(const LiveModel<T>& s, const T* x, T* out, int64_t B, Scratch<T>& sc) {
    Net net;
    thread_local std::vector<std::vector<T>> bufs;
    if (bufs.size() < s.hidden.size() + 2) bufs.resize(s.hidden.size() + 2);
    size_t nb = 0;
    for (size_t l = 0; l < s.hidden.size(); ++l) {
      const LiveLayer<T>& h = s.hidden[l];
      if (h.linear) {
        bufs[nb].resize(linear_size(h));
        net.hidden.push_back({linear_panels(h, bufs[nb++].data()), h.act});
        continue;
      }
      net.hidden.push_back({view(h.w, h.b, h.E, h.K, h.N, bufs[nb++], l == 0), h.act});
    }
    if (s.gates > 0) {
      const LiveLayer<T>& m = s.mixture;
      net.mixture = {view(m.w, m.b, m.E, m.K, m.N, bufs[nb++], s.hidden.empty()), m.act};
      const int64_t D = s.in_features, GE = s.gates * m.E;
      std::vector<T>& g = bufs[nb++];
      constexpr size_t kAlign = 64 / sizeof(T);  // rows of 16 floats: one cache line each, not two halves
      g.resize(static_cast<size_t>(D * GE + NR + panels(GE) * NR) + kAlign);
      const uintptr_t at = (reinterpret_cast<uintptr_t>(g.data()) + 63) & ~uintptr_t(63);
      net.gate = gate_rows(s.wg, s.bg, D, s.gates, m.E, reinterpret_cast<T*>(at));
      net.gates = s.gates;
    }
    net.in_features = s.in_features;
    net.tasks = s.tasks;
    for (const auto& tower : s.towers) {
      net.towers.emplace_back();
      for (const LiveLayer<T>& l : tower) {
        TowerLayer tl{l, Panels{}, dot_layer(l.K, l.N)};
        if (!tl.dot) {  // the register tile's panels (small: K < 4 L, or N wide enough to fill them)
          if (nb == bufs.size()) bufs.emplace_back();
          bufs[nb].resize(linear_size(l));
          tl.p = linear_panels(l, bufs[nb++].data());
        }
        net.widest = std::max(net.widest, tower_row(tl));
        net.towers.back().push_back(tl);
      }
    }
    run_net(net, x, out, B, sc);
  }

  // n values from v, at a 2 MB boundary once they span several huge pages (asked for: at large B the
  // mixture's tens of MB on 4 KB pages miss the TLB all the time); v grows and is kept.
  static T* grow(std::vector<T>& v, size_t n) {
    constexpr size_t kHuge = size_t(2) << 20, kPad = kHuge / sizeof(T);
    const bool big = n * sizeof(T) >= 2 * kHuge;
    const size_t want = big ? n + kPad : n;
    if (v.size() < want) {
      std::vector<T>().swap(v);
      v.reserve(want);
      advise_huge_pages(v.data(), want * sizeof(T));
      v.resize(want);
    }
    if (!big) return v.data();
    const uintptr_t p = reinterpret_cast<uintptr_t>(v.data());
    return reinterpret_cast<T*>((p + kHuge - 1) & ~(uintptr_t(kHuge) - 1));
  }

  // scratch: hidden outputs and m, owned by the calling thread.
  static void run_net(const Net& s, const T* x, T* out, int64_t B, Scratch<T>& sc) {
    const size_t nh = s.hidden.size();
    sc.h.resize(nh);
    std::vector<T*> hbuf(nh);
    for (size_t l = 0; l < nh; ++l)
      hbuf[l] = grow(sc.h[l], static_cast<size_t>(B * s.hidden[l].w.E * s.hidden[l].w.N));
    const bool mix = s.gates > 0;
    T* mbuf = mix ? grow(sc.m, static_cast<size_t>(s.gates * B * s.mixture.w.N)) : nullptr;
    const int64_t nblocks = (B + RB - 1) / RB;
    int64_t most = nblocks;
    for (const auto& g : s.hidden) most = std::max(most, nblocks * g.w.P);
    if (mix) most = std::max(most, nblocks * item_panels(s.mixture.w));
#pragma omp parallel num_threads(threads_for(most))
    {
      const T* a = x;
      bool shared = true;
      for (size_t l = 0; l < nh; ++l) {
        const Panels& w = s.hidden[l].w;
        for_items(nblocks * w.P, nblocks > 1, [&](int64_t it) {
          const int64_t r0 = (it / w.P) * RB;
          grouped_item(a, shared, w, hbuf[l], nullptr, B, s.hidden[l].act, r0, std::min(B, r0 + RB),
                       it % w.P);
        });
        a = hbuf[l];
        shared = false;
      }
      const T* feat = a;  // shared bottom: the last hidden layer (one "expert"), [B, N]
      int64_t width = nh ? s.hidden.back().w.N : s.in_features;
      if (mix) {
        mixture_items(a, shared, s.mixture.w, x, &s.gate, nullptr, mbuf, B, s.gates, s.mixture.act);
        feat = mbuf;
        width = s.mixture.w.N;
      }
      T* buf0 = scratch<T>(2, static_cast<size_t>(RB * s.widest));
      T* buf1 = scratch<T>(3, static_cast<size_t>(RB * s.widest));
      for_items(nblocks, true, [&](int64_t rb) {
        const int64_t r0 = rb * RB, r1 = std::min(B, r0 + RB);
        for (int64_t t = 0; t < s.tasks; ++t) {
          const int64_t src = (mix && s.gates > 1) ? t : 0;
          const T* in = mix ? feat + (src * B + r0) * width : feat + r0 * width;
          tower_block(s.towers[t], in, width, r0, r1, s.tasks, t, out, buf0, buf1);
        }
      });
    }
  }
};

// ---- training towers: every task's small MLP, forward and backward -------------------------------
// Task t's tower is L layers (Linear, ReLU, ..., Linear -> 1); layer l of task t has the nn.Linear weight
// w[l * nT + t] ([N_l, K_l], row-major) and bias bias[l * nT + t]; widths = K_0, N_0 (= K_1), ..., N_{L-1} = 1.
// The input is h[nT, B, K_0], or one h[B, K_0] shared by the tasks. For towers this small the training step
// is a few thousand multiply-adds per row: one call for all tasks and layers, row by row (each layer a dot
// product per output, vectorized over K), saves the tens of tensor ops a batched formulation costs.
// Work is split by task only, each task's rows in order: the same bits for any thread count.
template <typename T>
int64_t tower_hidden_width(int64_t L, const int64_t* widths) {
  int64_t hid = 0;
  for (int64_t l = 1; l < L; ++l) hid += widths[l];
  return hid;
}

// One thread per task, as the work allows (see Kern::threads_for).
template <typename T>
int tower_threads(int64_t B, int64_t nT, int64_t L, const int64_t* widths) {
  int64_t macs = 0;
  for (int64_t l = 0; l < L; ++l) macs += widths[l] * widths[l + 1];
  return Kern<T>::threads_for(nT, B * nT * macs);
}

// out[b, t] (out is [B, nT]); save[nT, B, hid]: each hidden layer's output after ReLU, layer by layer. A layer
// runs on the GEMM's register tiles (MR rows x NR outputs, the task's weights transposed into panels first: per
// row a few vector FMAs, where a dot product per output paid a horizontal sum each), or, narrow and long
// (Kern::dot_layer: 256 -> 8, say, where a panel would be three quarters padding), as dot products over the
// weight's rows as they are: a Session's and the no-grad forward's choice too, so the same bits.
// Task t's tower (towers_forward_entry's loop body; on the calling thread alone).
template <typename T>
void tower_forward_task(int64_t t, const T* h, bool shared, int64_t B, int64_t nT, int64_t L, const int64_t* widths,
                        const T* const* w, const T* const* bias, T* out, T* save) {
  using Kt = Kern<T>;
  constexpr int NR = Kt::NR, MR = Kt::MR;
  const int64_t hid = tower_hidden_width<T>(L, widths), K0 = widths[0];
  int64_t packed = 0;  // the register tile's layers (Kern::dot_layer: the others run as dot products)
  for (int64_t l = 0; l < L; ++l)
    if (!Kt::dot_layer(widths[l], widths[l + 1])) packed += Kt::panels(widths[l + 1]) * widths[l] * NR;
  T* wp = scratch<T>(1, static_cast<size_t>(packed + MR * NR));
  T* tile = wp + packed;
  T* q = wp;  // layer l: [P][K][NR], panel p's column j = output p * NR + j (zero past N)
  for (int64_t l = 0; l < L; ++l) {
    const int64_t K = widths[l], N = widths[l + 1], P = Kt::panels(N);
    if (Kt::dot_layer(K, N)) continue;
    Kt::pack_linear(w[l * nT + t], N, K, q);
    q += P * K * NR;
  }
  for (int64_t r = 0; r < B; r += MR) {
    const int mr = static_cast<int>(std::min<int64_t>(MR, B - r));
    const T* a = shared ? h + r * K0 : h + (t * B + r) * K0;
    int64_t lda = K0, off = 0;
    T* rows = save + (t * B + r) * hid;
    q = wp;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t K = widths[l], N = widths[l + 1], P = Kt::panels(N);
      const T* bl = bias[l * nT + t];
      if (Kt::dot_layer(K, N)) {
        if (l == L - 1)  // the last layer has one output
          Kt::dot_rows(a, lda, mr, w[l * nT + t], bl, K, N, kIdentity, out + r * nT + t, nT);
        else
          Kt::dot_rows(a, lda, mr, w[l * nT + t], bl, K, N, kRelu, rows + off, hid);
      } else {
        for (int64_t p = 0; p < P; ++p) {
          Kt::tile_rows(mr, a, lda, q + p * K * NR, NR, K, tile);
          const int64_t n1 = std::min<int64_t>(NR, N - p * NR);
          for (int i = 0; i < mr; ++i)
            for (int64_t j = 0; j < n1; ++j) {
              const T z = tile[i * NR + j] + bl[p * NR + j];
              if (l == L - 1)
                out[(r + i) * nT + t] = z;  // the last layer has one output
              else
                rows[i * hid + off + p * NR + j] = z < T(0) ? T(0) : z;  // NaN stays NaN
            }
        }
        q += P * K * NR;
      }
      a = rows + off;
      lda = hid;
      off += N;
    }
  }
}

template <typename T>
void towers_forward_entry(const T* h, bool shared, int64_t B, int64_t nT, int64_t L, const int64_t* widths,
                          const T* const* w, const T* const* bias, T* out, T* save) {
#pragma omp parallel for schedule(static) num_threads(tower_threads<T>(B, nT, L, widths))
  for (int64_t t = 0; t < nT; ++t) tower_forward_task<T>(t, h, shared, B, nT, L, widths, w, bias, out, save);
}

// From dout[B, nT]: dw, db (per layer and task, as w and bias; overwritten) and, dh given, dh[nT, B, K_0]
// (each task's own input gradient; a shared input's is their sum, taken by the caller). Rows go in blocks of
// kRows, layer by layer: a weight-gradient row stays in registers across a block's rows, an input-gradient row
// across the layer's outputs (row by row, each multiply-add paid a load and a store). The sums keep the
// row-by-row order: rows ascending into dw and db, outputs ascending into each row's da.
template <typename T>
void tower_backward_task(int64_t t, const T* h, bool shared, int64_t B, int64_t nT, int64_t L, const int64_t* widths,
                         const T* const* w, const T* save, const T* dout, T* dh, T* const* dw, T* const* db) {
  using Kt = Kern<T>;
  using V = typename Kt::V;
  constexpr int Lw = Kt::L;
  constexpr int64_t kRows = 32;
  const int64_t hid = tower_hidden_width<T>(L, widths), K0 = widths[0];
  int64_t widest = 0;
  for (int64_t l = 0; l <= L; ++l) widest = std::max(widest, widths[l]);
  T* dz = scratch<T>(0, static_cast<size_t>(2 * kRows * widest));  // this layer's output gradient [rows, N]
  T* dnext = dz + kRows * widest;                                   // its input's [rows, K]
  for (int64_t l = 0; l < L; ++l) {
    std::fill(dw[l * nT + t], dw[l * nT + t] + widths[l] * widths[l + 1], T(0));
    std::fill(db[l * nT + t], db[l * nT + t] + widths[l + 1], T(0));
  }
  for (int64_t r0 = 0; r0 < B; r0 += kRows) {
    const int64_t rows = std::min(kRows, B - r0);
    T* g = dz;
    T* gn = dnext;
    for (int64_t r = 0; r < rows; ++r) g[r] = dout[(r0 + r) * nT + t];
    int64_t off = hid;  // layer l's input starts at column off - K_l of a saved row (for l > 0)
    for (int64_t l = L - 1; l >= 0; --l) {
      const int64_t K = widths[l], N = widths[l + 1];
      off -= (l > 0 ? K : 0);
      // Row r of the layer's input: a + r * lda.
      const T* a = l > 0 ? save + (t * B + r0) * hid + off : (shared ? h + r0 * K0 : h + (t * B + r0) * K0);
      const int64_t lda = l > 0 ? hid : K0;
      const T* W = w[l * nT + t];
      T* dW = dw[l * nT + t];
      T* dbl = db[l * nT + t];
      // Sums over the block's rows in 4 interleaved chains (one chain: an FMA's latency per row, the towers'
      // backward's whole time at widths 16-8-1).
      const int64_t r4 = rows / 4 * 4;
      for (int64_t n = 0; n < N; ++n) {
        T sb[4] = {dbl[n], 0, 0, 0};
        for (int64_t r = 0; r < r4; r += 4)
          for (int u = 0; u < 4; ++u) sb[u] += g[(r + u) * N + n];
        for (int64_t r = r4; r < rows; ++r) sb[0] += g[r * N + n];
        dbl[n] = (sb[0] + sb[1]) + (sb[2] + sb[3]);
        T* dWn = dW + n * K;
        int64_t k = 0;
        for (; k + Lw <= K; k += Lw) {
          V acc[4] = {Kt::load(dWn + k), V{}, V{}, V{}};
          for (int64_t r = 0; r < r4; r += 4)
            for (int u = 0; u < 4; ++u) acc[u] += g[(r + u) * N + n] * Kt::load(a + (r + u) * lda + k);
          for (int64_t r = r4; r < rows; ++r) acc[0] += g[r * N + n] * Kt::load(a + r * lda + k);
          const V sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
          std::memcpy(dWn + k, &sum, sizeof sum);
        }
        for (; k < K; ++k) {
          T acc[4] = {dWn[k], 0, 0, 0};
          for (int64_t r = 0; r < r4; r += 4)
            for (int u = 0; u < 4; ++u) acc[u] += g[(r + u) * N + n] * a[(r + u) * lda + k];
          for (int64_t r = r4; r < rows; ++r) acc[0] += g[r * N + n] * a[r * lda + k];
          dWn[k] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        }
      }
      if (l == 0 && dh == nullptr) break;
      // da = g @ W, then through the ReLU below (its output a: relu'(z) = [relu(z) > 0]) or into dh.
      T* into = l > 0 ? gn : dh + (t * B + r0) * K0;
      for (int64_t r = 0; r < rows; ++r) {
        const T* gr = g + r * N;
        const T* ar = a + r * lda;
        T* dr = into + r * K;
        int64_t k = 0;
        for (; k + Lw <= K; k += Lw) {
          V acc = {};
          for (int64_t n = 0; n < N; ++n) acc += gr[n] * Kt::load(W + n * K + k);
          if (l > 0) acc = Kt::load(ar + k) > T(0) ? acc : V{};
          std::memcpy(dr + k, &acc, sizeof acc);
        }
        // the rest without a branch on the ReLU's mask (a misprediction every other unit)
        const bool first = l == 0;
#pragma omp simd
        for (int64_t kk = k; kk < K; ++kk) {
          T acc = 0;
          for (int64_t n = 0; n < N; ++n) acc += gr[n] * W[n * K + kk];
          dr[kk] = (first | (ar[kk] > T(0))) ? acc : T(0);
        }
      }
      std::swap(g, gn);
    }
  }
}

template <typename T>
void towers_backward_entry(const T* h, bool shared, int64_t B, int64_t nT, int64_t L, const int64_t* widths,
                           const T* const* w, const T* save, const T* dout, T* dh, T* const* dw, T* const* db) {
#pragma omp parallel for schedule(static) num_threads(tower_threads<T>(B, nT, L, widths))
  for (int64_t t = 0; t < nT; ++t) tower_backward_task<T>(t, h, shared, B, nT, L, widths, w, save, dout, dh, dw, db);
}

// ---- entry points on unpacked weights (the ops) ---------------------------------------------------
template <typename T>
void mixture_entry(const T* a, bool shared, const T* w, const T* b, const T* wg, const T* bg, const T* G, T* m,
                   T* save_pre, T* save_G, int64_t B, int64_t E, int64_t Kd, int64_t H, int64_t nT, int act) {
  using Kt = Kern<T>;
  std::vector<T> buf, gbuf;
  const auto pw = Kt::view(w, b, E, Kd, H, buf, shared);
  if (!wg) return Kt::mixture_forward(a, shared, pw, nullptr, G, m, B, nT, act, save_pre, nullptr);
  const int64_t P = Kt::panels(nT * E);
  gbuf.resize(static_cast<size_t>(P * Kd * Kt::NR + P * Kt::NR));
  Kt::pack_gate(wg, bg, Kd, nT, E, gbuf.data(), gbuf.data() + P * Kd * Kt::NR);
  const typename Kt::Panels gw{gbuf.data(), nullptr, gbuf.data() + P * Kd * Kt::NR, 1, Kd, nT * E, P, true};
  Kt::mixture_forward(a, shared, pw, &gw, nullptr, m, B, nT, act, save_pre, save_G);
}

template <typename T>
void gate_entry(const T* x, const T* wg, const T* bg, T* G, int64_t B, int64_t D, int64_t nT, int64_t E) {
  using Kt = Kern<T>;
  const int64_t P = Kt::panels(nT * E), nblocks = (B + Kt::RB - 1) / Kt::RB;
  std::vector<T> buf(static_cast<size_t>(P * D * Kt::NR + P * Kt::NR));
  Kt::pack_gate(wg, bg, D, nT, E, buf.data(), buf.data() + P * D * Kt::NR);
  const typename Kt::Panels gw{buf.data(), nullptr, buf.data() + P * D * Kt::NR, 1, D, nT * E, P, true};
#pragma omp parallel num_threads(Kt::threads_for(nblocks, B * D * nT * E))
  Kt::for_items(nblocks, true, [&](int64_t rb) {
    const int64_t r0 = rb * Kt::RB;
    Kt::gate_block(x, gw, G + r0 * nT * E, nT, E, r0, std::min(B, r0 + Kt::RB));
  });
}

template <typename T>
void grouped_entry(const T* a, bool shared, const T* w, const T* b, T* out, T* save, int64_t B, int64_t E,
                   int64_t Kd, int64_t N, int act) {
  std::vector<T> buf;
  const auto pw = Kern<T>::view(w, b, E, Kd, N, buf, shared);
  Kern<T>::grouped_forward(a, shared, pw, out, B, act, save);
}

// pre null: recomputed here (one more GEMM) into a buffer; G null with wg given: the gates recomputed too.
template <typename T>
void backward_entry(const T* a, bool shared, const T* w, const T* b, const T* pre, const T* G, const T* dm,
                    const T* dout, const T* wg, const T* bg, T* da, T* dW, T* db, T* dG, T* dWg, T* dbg, int64_t B,
                    int64_t E, int64_t Kd, int64_t N, int64_t nT, int act) {
  using Kt = Kern<T>;
  std::vector<T> prebuf, gbuf;
  if (!pre) {
    std::vector<T> buf;
    const auto pw = Kt::view(w, b, E, Kd, N, buf, shared);
    prebuf.reserve(static_cast<size_t>(B * E * N));
    advise_huge_pages(prebuf.data(), static_cast<size_t>(B * E * N) * sizeof(T));
    prebuf.resize(static_cast<size_t>(B * E * N));
    Kt::grouped_forward(a, shared, pw, nullptr, B, kIdentity, prebuf.data());
    pre = prebuf.data();
  }
  if (wg && !G) {
    gbuf.resize(static_cast<size_t>(B * nT * E));
    gate_entry<T>(a, wg, bg, gbuf.data(), B, Kd, nT, E);
    G = gbuf.data();
  }
  Kt::backward(a, shared, w, pre, G, dm, dout, wg, da, dW, db, dG, dWg, dbg, B, E, Kd, N, nT, act);
}

template <typename T>
void from_pre_entry(T* pre, bool rowmajor, const T* bias, const T* G, T* m, T* out, bool out_em, int64_t B,
                    int64_t E, int64_t N, int64_t nT, int act) {
  Kern<T>::from_pre(pre, rowmajor, bias, G, m, out, out_em, B, E, N, nT, act);
}

template <typename T>
void rows_entry(const T* pre, bool rowmajor, const T* G, const T* dm, const T* dout, bool dout_em, T* dp, T* dlogit,
                T* dG, T* db, int64_t B, int64_t E, int64_t N, int64_t nT, int act) {
  Kern<T>::rows(pre, rowmajor, G, dm, dout, dout_em, dp, dlogit, dG, db, B, E, N, nT, act);
}

template <typename T>
void softmax_entry(const T* logits, T* out, int64_t rows, int64_t E) {
  Kern<T>::softmax_rows(logits, out, rows, E);
}

template <typename T>
void pack_gate_entry(const T* wg, const T* bg, int64_t D, int64_t nT, int64_t E, Grouped<T>& out) {
  using Kt = Kern<T>;
  out.E = 1;
  out.K = D;
  out.N = nT * E;
  out.w.assign(static_cast<size_t>(Kt::panels(out.N) * D * Kt::NR), T(0));
  out.b.assign(static_cast<size_t>(Kt::panels(out.N) * Kt::NR), T(0));
  Kt::pack_gate(wg, bg, D, nT, E, out.w.data(), out.b.data());
}

template <typename T>
void pack_entry(const T* w, const T* b, Grouped<T>& out, bool shared) {
  using Kt = Kern<T>;
  out.side = Kt::side_by_side(shared, out.E, out.N);
  if (out.side) {
    const int64_t P = Kt::panels(out.E * out.N);
    out.w.assign(static_cast<size_t>(P * out.K * Kt::NR), T(0));
    out.b.assign(static_cast<size_t>(P * Kt::NR), T(0));
    Kt::pack_side(w, b, out.E, out.K, out.N, out.w.data(), out.b.data());
    return;
  }
  out.w.assign(static_cast<size_t>(out.E * Kt::panels(out.N) * out.K * Kt::NR), T(0));
  out.b.assign(static_cast<size_t>(out.E * Kt::panels(out.N) * Kt::NR), T(0));
  Kt::pack(w, out.E, out.K, out.N, out.w.data());
  Kt::pack_bias(b, out.E, out.N, out.b.data());
}

// ---- replicas (fit_many): see ReplicaStep in kernels.h --------------------------------------------
// Adam (AdamW: decoupled weight decay) on n parameters p with moments m, v and gradient g, as torch's fused Adam;
// whether every updated parameter is finite (p - p is NaN exactly where p is not finite: a sum of them, beside
// a loop bound by its divisions and square roots, costs nothing).
template <typename T>
bool adam_update(T* __restrict p, T* __restrict m, T* __restrict v, const T* __restrict g, int64_t n,
                 const ReplicaStep<T>& a, double lr) {
  const T b1 = static_cast<T>(a.beta1), b2 = static_cast<T>(a.beta2), c1 = static_cast<T>(1 - a.beta1);
  // 1 / sqrt(1 - beta2^step) as a factor: a division per element fewer than torch's (within an ulp of it), on
  // a loop whose divisions and square roots are its whole cost
  const T c2 = static_cast<T>(1 - a.beta2), step = static_cast<T>(lr / a.bc1), rbc2 = static_cast<T>(1 / a.bc2sqrt);
  const T eps = static_cast<T>(a.eps), wd = static_cast<T>(a.adamw ? 0 : a.wd);
  const T keep = static_cast<T>(a.adamw ? 1 - lr * a.wd : 1);
  T bad = 0;
#pragma omp simd reduction(+ : bad)
  for (int64_t i = 0; i < n; ++i) {
    const T pi = p[i] * keep, gi = g[i] + wd * p[i];
    const T mi = b1 * m[i] + c1 * gi, vi = b2 * v[i] + c2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const T pn = pi - step * mi / (std::sqrt(vi) * rbc2 + eps);
    p[i] = pn;
    bad += pn - pn;
  }
  return bad == bad;
}

// A replica's work between its two GEMMs runs with the batch in the vector lanes: arrays [rows][Bp] (Bp = B
// rounded up to whole vectors, the lanes past B zero or unused), one row per feature. The softmax over experts,
// the mixture, its gradient and the towers (8 to 16 units wide at the paper's size, where a row-major layout
// left panels three quarters empty and paid a horizontal sum per dot product) are then whole-vector
// multiply-adds with no horizontal step, except the towers' weight gradients (a sum over the batch each).
template <typename T>
struct Lanes {
  using Kt = Kern<T>;
  using V = typename Kt::V;
  static constexpr int L = Kt::L;

  static void store(T* p, V v) { std::memcpy(p, &v, sizeof v); }

  // One butterfly stage of an L x L transpose: rows i and i + W swap bit W of the row with bit W of the lane.
  // Every index a constant (the pairs unrolled by fold expressions), so the L rows stay in registers.
  template <int W, size_t... I>
  static V lo(V a, V b, std::index_sequence<I...>) {
    return __builtin_shufflevector(a, b, ((I & W) ? L + I - W : I)...);
  }
  template <int W, size_t... I>
  static V hi(V a, V b, std::index_sequence<I...>) {
    return __builtin_shufflevector(a, b, ((I & W) ? L + I : I + W)...);
  }
  template <int W, size_t P>
  __attribute__((always_inline)) static void pair(V* r) {
    constexpr size_t i = (P / W) * 2 * W + P % W;  // the P-th row with bit W clear
    const V a = r[i], b = r[i + W];
    r[i] = lo<W>(a, b, std::make_index_sequence<L>{});
    r[i + W] = hi<W>(a, b, std::make_index_sequence<L>{});
  }
  template <int W, size_t... P>
  __attribute__((always_inline)) static void pairs(V* r, std::index_sequence<P...>) {
    (pair<W, P>(r), ...);
  }
  template <int W>
  __attribute__((always_inline)) static void stage(V* r) {
    if constexpr (W >= 1) {
      pairs<W>(r, std::make_index_sequence<L / 2>{});
      stage<W / 2>(r);
    }
  }

  // L = 16 (float, AVX-512): the same transpose from shuffles with immediate operands (the butterfly's stages 4
  // and 1 took two-source permutes whose index vectors, four of them beside the 16 rows, spilled): within
  // 128-bit lanes an unpack then a shufps, then two shuffles of 128-bit lanes. Row i then holds column
  // swap01(i), its bits 0 and 1 exchanged (stored there).
  template <int K, size_t... I>
  static V sel(V a, V b, std::index_sequence<I...>) {  // K: 0, 1 unpack lo, hi; 2, 3 shufps 0x44, 0xee; 4, 5 lanes
    if constexpr (K < 2)
      return __builtin_shufflevector(a, b, ((I & 1 ? L : 0) + (I & ~3) + 2 * K + ((I & 3) >> 1))...);
    else if constexpr (K < 4)
      return __builtin_shufflevector(a, b, ((I & 2 ? L : 0) + (I & ~3) + 2 * (K - 2) + (I & 1))...);
    else
      return __builtin_shufflevector(a, b, ((I & 8 ? L : 0) + 8 * ((I >> 2) & 1) + 4 * (K - 4) + (I & 3))...);
  }
  template <int K, int W, size_t P>
  __attribute__((always_inline)) static void pair16(V* r) {
    constexpr size_t i = (P / W) * 2 * W + P % W;
    const V a = r[i], b = r[i + W];
    r[i] = sel<K>(a, b, std::make_index_sequence<L>{});
    r[i + W] = sel<K + 1>(a, b, std::make_index_sequence<L>{});
  }
  template <int K, int W, size_t... P>
  __attribute__((always_inline)) static void stage16(V* r, std::index_sequence<P...>) {
    (pair16<K, W, P>(r), ...);
  }
  __attribute__((always_inline)) static void transpose_block(V* v) {
    if constexpr (L == 16) {
      stage16<0, 1>(v, std::make_index_sequence<8>{});
      stage16<2, 2>(v, std::make_index_sequence<8>{});
      stage16<4, 4>(v, std::make_index_sequence<8>{});
      stage16<4, 8>(v, std::make_index_sequence<8>{});
    } else {
      stage<L / 2>(v);
    }
  }
  static constexpr int column_of(int i) { return L == 16 ? (i & ~3) | ((i & 1) << 1) | ((i >> 1) & 1) : i; }

  // dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols: L x L blocks in registers, the edges by element.
  static void transpose(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst, int64_t ldd) {
    const int64_t R = rows / L * L, Cc = cols / L * L;
    for (int64_t r0 = 0; r0 < R; r0 += L)
      for (int64_t c0 = 0; c0 < Cc; c0 += L) {
        V v[L];
        for (int i = 0; i < L; ++i) v[i] = Kt::load(src + (r0 + i) * lds + c0);
        transpose_block(v);
        for (int i = 0; i < L; ++i) store(dst + (c0 + column_of(i)) * ldd + r0, v[i]);
      }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = (r < R ? Cc : 0); c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }

  // fn(i, b0, acc) for every row i < n_out and vector b0 of Bp lanes, acc = sum_j w[i * si + j * sj] * a[j][b0:]
  // (j ascending): a layer's outputs from its inputs (si = K, sj = 1), or its inputs' gradient from its outputs'
  // (si = 1, sj = K). Up to NV vectors of a row at a time, each weight read once for them.
  template <int NV = 4, typename F>
  static void combine(const T* w, int64_t si, int64_t sj, int64_t n_out, int64_t n_in, const T* a, int64_t Bp,
                      F&& fn) {
    for (int64_t i = 0; i < n_out; ++i) {
      int64_t b0 = 0;
      for (; b0 + NV * L <= Bp; b0 += NV * L) {
        V acc[NV] = {};
        for (int64_t j = 0; j < n_in; ++j) {
          const T wij = w[i * si + j * sj];
          for (int u = 0; u < NV; ++u) acc[u] += wij * Kt::load(a + j * Bp + b0 + u * L);
        }
        for (int u = 0; u < NV; ++u) fn(i, b0 + u * L, acc[u]);
      }
      for (; b0 < Bp; b0 += L) {
        V acc = {};
        for (int64_t j = 0; j < n_in; ++j) acc += w[i * si + j * sj] * Kt::load(a + j * Bp + b0);
        fn(i, b0, acc);
      }
    }
  }

  // out[b0:] = sum_{j < n} p[j][b0:] q[j][b0:] (j ascending), every vector of Bp lanes.
  static void dots(const T* p, const T* q, int64_t n, int64_t Bp, T* out) {
    constexpr int NV = 4;
    int64_t b0 = 0;
    for (; b0 + NV * L <= Bp; b0 += NV * L) {
      V acc[NV] = {};
      for (int64_t j = 0; j < n; ++j)
        for (int u = 0; u < NV; ++u) acc[u] += Kt::load(p + j * Bp + b0 + u * L) * Kt::load(q + j * Bp + b0 + u * L);
      for (int u = 0; u < NV; ++u) store(out + b0 + u * L, acc[u]);
    }
    for (; b0 < Bp; b0 += L) {
      V acc = {};
      for (int64_t j = 0; j < n; ++j) acc += Kt::load(p + j * Bp + b0) * Kt::load(q + j * Bp + b0);
      store(out + b0, acc);
    }
  }

  // A layer's weight and bias gradients from its output gradient g[N][Bp] (zero past the batch) and its input
  // a[K][Bp]: dw[n, k] = sum_b g[n][b] a[k][b], db[n] = sum_b g[n][b] (overwritten).
  static void weight_grads(const T* g, const T* a, int64_t N, int64_t K, int64_t Bp, T* dw, T* db) {
    for (int64_t n = 0; n < N; ++n) {
      const T* gn = g + n * Bp;
      V sb = {};
      for (int64_t b0 = 0; b0 < Bp; b0 += L) sb += Kt::load(gn + b0);
      db[n] = Kt::hsum(sb);
      int64_t k = 0;
      for (; k + 4 <= K; k += 4) {  // four sums at once: a load of g serves four inputs
        V acc[4] = {};
        for (int64_t b0 = 0; b0 < Bp; b0 += L) {
          const V gv = Kt::load(gn + b0);
          for (int u = 0; u < 4; ++u) acc[u] += gv * Kt::load(a + (k + u) * Bp + b0);
        }
        for (int u = 0; u < 4; ++u) dw[n * K + k + u] = Kt::hsum(acc[u]);
      }
      for (; k < K; ++k) {
        V acc = {};
        for (int64_t b0 = 0; b0 < Bp; b0 += L) acc += Kt::load(gn + b0) * Kt::load(a + k * Bp + b0);
        dw[n * K + k] = Kt::hsum(acc);
      }
    }
  }
};

template <typename T>
void replica_one(const ReplicaStep<T>& a, int64_t s) {
  using Kt = Kern<T>;
  using Ln = Lanes<T>;
  using V = typename Kt::V;
  constexpr int Lv = Kt::L;
  const int64_t B = a.B, D = a.D, E = a.E, H = a.H, nG = a.nG, nT = a.nT, nL = a.L, EH = E * H, GE = nG * E;
  const int64_t C = EH + GE, P = Kt::panels(C), full = C / Kt::NR;  // full: panels read in place
  const bool own = nG == 0 && E > 1;  // E == nT: task t's tower reads expert t alone (per-task networks)
  const bool shared = nG <= 1 && !own;  // one input for every tower
  const int64_t nm = nG > 0 ? (shared ? 1 : nT) : 0;  // the mixtures made: one per task, or one shared
  const int64_t hid = tower_hidden_width<T>(nL, a.widths);
  int64_t widest = 1;
  for (int64_t l = 1; l <= nL; ++l) widest = std::max(widest, a.widths[l]);
  const int64_t Bp = (B + Lv - 1) / Lv * Lv;  // the batch in lanes, whole vectors
  const bool adam = a.adam_m != nullptr, train = a.y != nullptr;
  // Per thread, kept. Lanes layout ([rows][Bp]): zT, fT, hm, save, GT; row-major: x, y gathered, dW; panels of
  // NR lanes or columns, each transposed right before its GEMM reads it from L1: xTp, dYp.
  const int64_t C8 = (C + Kt::MR - 1) / Kt::MR * Kt::MR;
  T* xTp = scratch<T>(5, static_cast<size_t>(D * Kt::NR + C8 * D + C * Bp + EH * Bp + nm * H * Bp + nT * hid * Bp +
                                             GE * Bp + (a.xrow ? B * D : 0) + (a.yrow ? B * nT : 0) + C));
  T* wp = xTp + D * Kt::NR;  // W in slivers of MR columns, [C8 / MR][D][MR]: a tile's operands side by side
  T* zT = wp + C8 * D;  // x @ W + bias, transposed [C][Bp]
  T* fT = zT + C * Bp;   // act(pre) [EH][Bp]
  T* hm = fT + EH * Bp;  // the mixtures [nm][H][Bp]
  T* save = hm + nm * H * Bp;  // the towers' hidden outputs [nT][hid][Bp]
  T* GT = save + nT * hid * Bp;  // the gates [nG][E][Bp]
  T* xg = GT + GE * Bp;  // with xrow: the replica's rows of x [B, D], gathered
  T* yg = xg + (a.xrow ? B * D : 0);  // with yrow: its targets [B, nT]
  T* zeros = yg + (a.yrow ? B * nT : 0);  // [C]: the bias where there is none
  // Task t's tower input [H][Bp]: its mixture, the shared one, or (no gates) its expert's activations.
  auto tower_in = [&](int64_t t) -> const T* {
    if (nG > 0) return hm + (shared ? 0 : t) * H * Bp;
    return own ? fT + t * H * Bp : fT;
  };
  std::vector<const T*> tw(static_cast<size_t>(nL * nT)), tb(tw.size());
  std::vector<T*> dtw(tw.size()), dtb(tw.size());
  for (int64_t l = 0; l < nL; ++l)
    for (int64_t t = 0; t < nT; ++t) {
      const size_t i = static_cast<size_t>(l * nT + t);
      const int64_t nw = a.widths[l] * a.widths[l + 1], nb = a.widths[l + 1];
      tw[i] = a.tw[i] + s * nw;
      tb[i] = a.tb[i] + s * nb;
      if (train) {
        dtw[i] = a.dtw[i] + s * nw;
        dtb[i] = a.dtb[i] + s * nb;
      }
    }
  const T* xs = a.x + s * a.xs;
  if (a.xrow) {  // rows at random: each fetched a few rows ahead of its copy
    constexpr int64_t ahead = 4;
    const int64_t* rowid = a.xrow + s * B;
    for (int64_t b = 0; b < std::min(ahead, B); ++b)
      for (int64_t k = 0; k < D; k += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(a.x + rowid[b] * D + k);
    for (int64_t b = 0; b < B; ++b) {
      if (b + ahead < B)
        for (int64_t k = 0; k < D; k += 64 / static_cast<int64_t>(sizeof(T)))
          __builtin_prefetch(a.x + rowid[b + ahead] * D + k);
      std::copy_n(a.x + rowid[b] * D, D, xg + b * D);
    }
    xs = xg;
  }
  // The GEMM zT = W^T x^T, a tile of MR first-layer columns x NR batch lanes at a time: x's rows b0 .. b0 + NR
  // transposed into a panel xTp [D][NR] (zero past the batch) that stays in L1 while W's slivers stream past
  // it; on each tile (in L1) the bias, the activation.
  const T* Ws = a.W + s * D * C;
  for (int64_t c0 = 0; c0 < C; c0 += Kt::MR) {
    const int64_t n = std::min<int64_t>(Kt::MR, C - c0);
    T* o = wp + c0 * D;
    if (n == Kt::MR)
      for (int64_t k = 0; k < D; ++k) std::memcpy(o + k * Kt::MR, Ws + k * C + c0, sizeof(T) * Kt::MR);
    else
      for (int64_t k = 0; k < D; ++k) std::copy_n(Ws + k * C + c0, n, o + k * Kt::MR);
  }
  const T* bs = a.bias ? a.bias + s * C : zeros;
  if (!a.bias) std::fill(zeros, zeros + C, T(0));
  Kt::with_act(a.act, [&](auto A) {
    alignas(64) T tile[Kt::MR * Kt::NR];
    for (int64_t b0 = 0; b0 < Bp; b0 += Kt::NR) {
      const int64_t nb = std::min<int64_t>(Kt::NR, Bp - b0), nx = std::min(nb, B - b0);  // NR or L lanes; rows
      Ln::transpose(xs + b0 * D, D, nx, D, xTp, Kt::NR);
      if (nx < nb)
        for (int64_t k = 0; k < D; ++k) std::fill(xTp + k * Kt::NR + nx, xTp + k * Kt::NR + nb, T(0));
      for (int64_t c0 = 0; c0 < C; c0 += Kt::MR) {
        const int rows = static_cast<int>(std::min<int64_t>(Kt::MR, C - c0));
        Kt::tile_in_place_cols(rows, nb, wp + c0 * D, Kt::MR, xTp, Kt::NR, D, tile, Kt::NR);
        for (int i = 0; i < rows; ++i) {
          const int64_t c = c0 + i;
          const T bc = bs[c];
          const T* ti = tile + i * Kt::NR;
          T* zc = zT + c * Bp + b0;
          if (c < EH) {
            T* fc = fT + c * Bp + b0;
#pragma omp simd
            for (int64_t j = 0; j < nb; ++j) {
              const T v = ti[j] + bc;
              zc[j] = v;
              fc[j] = Kt::template fval<A>(v);
            }
          } else {
#pragma omp simd
            for (int64_t j = 0; j < nb; ++j) zc[j] = ti[j] + bc;
          }
        }
      }
    }
  });
  // The gates' softmax over each task's E logits (less their max; a NaN logit propagates through exp, not the
  // max), then the mixtures: sums over the experts in the lanes.
  for (int64_t t = 0; t < nG; ++t)
    for (int64_t b0 = 0; b0 < Bp; b0 += Lv) {
      const T* lg = zT + (EH + t * E) * Bp + b0;
      T* g = GT + t * E * Bp + b0;
      V mx = Kt::load(lg);
      for (int64_t e = 1; e < E; ++e) {
        const V v = Kt::load(lg + e * Bp);
        mx = v > mx ? v : mx;
      }
      mx = mx != mx ? V{} : mx;
      V sum = {};
      for (int64_t e = 0; e < E; ++e) {
        const V ex = Kt::vexp(Kt::load(lg + e * Bp) - mx);
        Ln::store(g + e * Bp, ex);
        sum += ex;
      }
      for (int64_t e = 0; e < E; ++e) Ln::store(g + e * Bp, Kt::load(g + e * Bp) / sum);
    }
  for (int64_t t = 0; t < nm; ++t)  // hm[t][j] = sum_e G[t][e] f[e][j]
    for (int64_t j = 0; j < H; ++j)
      for (int64_t b0 = 0; b0 < Bp; b0 += Lv) {
        V acc = {};
        for (int64_t e = 0; e < E; ++e)
          acc += Kt::load(GT + (t * E + e) * Bp + b0) * Kt::load(fT + (e * H + j) * Bp + b0);
        Ln::store(hm + (t * H + j) * Bp + b0, acc);
      }
  // The towers: each layer's outputs from its inputs, then its bias and ReLU (NaN stays NaN); the last layer's
  // one output into out[s, b, t].
  T* out = a.out + s * B * nT;
  for (int64_t t = 0; t < nT; ++t) {
    const T* in = tower_in(t);
    T* st = save + t * hid * Bp;
    for (int64_t l = 0, off = 0; l < nL; ++l) {
      const int64_t K = a.widths[l], N = a.widths[l + 1];
      const T* bl = tb[l * nT + t];
      if (l == nL - 1) {
        Ln::combine(tw[l * nT + t], K, 1, N, K, in, Bp, [&](int64_t, int64_t b0, V acc) {
          for (int64_t j = 0; j < Lv && b0 + j < B; ++j) out[(b0 + j) * nT + t] = acc[j] + bl[0];
        });
      } else {
        T* o = st + off * Bp;
        Ln::combine(tw[l * nT + t], K, 1, N, K, in, Bp, [&](int64_t n, int64_t b0, V acc) {
          const V z = acc + bl[n];
          Ln::store(o + n * Bp + b0, z < T(0) ? V{} : z);
        });
        in = o;
        off += N;
      }
    }
  }
  if (!train) return;
  const T* ys = a.y + s * B * nT;
  if (a.yrow) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < nT; ++t) yg[b * nT + t] = a.y[a.yrow[s * B + b] * nT + t];
    ys = yg;
  }
  // Backward: lanes buffers, then dY's panels [B][NR] (row-major) for the weight-gradient GEMM.
  T* dz = scratch<T>(6, static_cast<size_t>(B * nT + 2 * widest * Bp + nT * H * Bp + H * Bp + C * Bp + GE * Bp +
                                            B * Kt::NR + (adam ? D * C : 0)));
  T* g0 = dz + B * nT;  // a tower layer's output gradient [N][Bp], then its input's
  T* g1 = g0 + widest * Bp;
  T* dhT = g1 + widest * Bp;  // each tower's input gradient [nT][H][Bp]
  T* dsum = dhT + nT * H * Bp;  // a shared input's: the tasks' sum [H][Bp]
  T* dYT = dsum + H * Bp;  // the first layer's output gradient [C][Bp]
  T* dGT = dYT + C * Bp;  // the gates' gradient [nG][E][Bp]
  T* dYp = dGT + GE * Bp;  // dYT's rows c0 .. c0 + NR transposed: [B][NR], zero past C
  T* dWb = dYp + B * Kt::NR;  // with Adam: dW [D, C], then the update in one pass (a stream the prefetcher follows)
  loss_grad<T>(out, ys, a.binary, a.coef, a.weight ? a.weight + s * B * nT : nullptr, dz, a.sums + s * nT, B, nT);
  for (int64_t t = 0; t < nT; ++t) {  // layer by layer from the last: weight gradients, then the input's
    T* g = g0;
    T* gn = g1;
    for (int64_t b = 0; b < Bp; ++b) g[b] = b < B ? dz[b * nT + t] : T(0);
    int64_t off = hid;  // layer l's input: rows off - K_l .. off of the task's saved outputs (l > 0)
    for (int64_t l = nL - 1; l >= 0; --l) {
      const int64_t K = a.widths[l], N = a.widths[l + 1];
      off -= l > 0 ? K : 0;
      const T* in = l > 0 ? save + (t * hid + off) * Bp : tower_in(t);
      const T* Wl = tw[l * nT + t];
      Ln::weight_grads(g, in, N, K, Bp, dtw[l * nT + t], dtb[l * nT + t]);
      T* into = l > 0 ? gn : dhT + t * H * Bp;
      Ln::combine(Wl, 1, K, K, N, g, Bp, [&](int64_t k, int64_t b0, V acc) {
        if (l > 0) acc = Kt::load(in + k * Bp + b0) > T(0) ? acc : V{};  // through the ReLU below
        Ln::store(into + k * Bp + b0, acc);
      });
      std::swap(g, gn);
    }
  }
  if (shared && nT > 1)
    for (int64_t i = 0; i < H * Bp; ++i) {
      T acc = 0;
      for (int64_t t = 0; t < nT; ++t) acc += dhT[t * H * Bp + i];
      dsum[i] = acc;
    }
  const T* dtop = shared && nT > 1 ? dsum : dhT;  // the mixtures' gradients [nm or nT][H][Bp]
  // The first layer's output gradient: per expert column, sum_t G[t][e] dm_t times act'(pre); the gates'
  // gradient dG[t][e] = <dm_t, act(pre_e)> over the expert's H columns, in the lanes.
  Kt::with_act(a.act, [&](auto A) {
    for (int64_t e = 0; e < E; ++e)
      for (int64_t j = 0; j < H; ++j) {
        const int64_t c = e * H + j;
        const T* zc = zT + c * Bp;
        T* dy = dYT + c * Bp;
        if (nG == 0) {
          const T* de = dtop + (own ? e * H + j : j) * Bp;
#pragma omp simd
          for (int64_t b = 0; b < Bp; ++b) dy[b] = de[b] * Kt::template fder<A>(zc[b]);
          continue;
        }
        const T* ge = GT + e * Bp;
        const T* d0 = dtop + j * Bp;
        if (nm == 1) {
#pragma omp simd
          for (int64_t b = 0; b < Bp; ++b) dy[b] = ge[b] * d0[b] * Kt::template fder<A>(zc[b]);
        } else {
          const T* ge1 = GT + (E + e) * Bp;
          const T* d1 = dtop + (H + j) * Bp;
#pragma omp simd
          for (int64_t b = 0; b < Bp; ++b) dy[b] = ge[b] * d0[b] + ge1[b] * d1[b];
          for (int64_t t = 2; t < nm; ++t) {
            const T* gt = GT + (t * E + e) * Bp;
            const T* dt = dtop + (t * H + j) * Bp;
#pragma omp simd
            for (int64_t b = 0; b < Bp; ++b) dy[b] += gt[b] * dt[b];
          }
#pragma omp simd
          for (int64_t b = 0; b < Bp; ++b) dy[b] *= Kt::template fder<A>(zc[b]);
        }
      }
  });
  for (int64_t t = 0; t < nm; ++t)
    for (int64_t e = 0; e < E; ++e) Ln::dots(dtop + t * H * Bp, fT + e * H * Bp, H, Bp, dGT + (t * E + e) * Bp);
  // dlogit = G (dG - sum_e G dG); one gate shared by the tasks: its gradient is the one mixture's.
  for (int64_t t = 0; t < nG; ++t)
    for (int64_t b0 = 0; b0 < Bp; b0 += Lv) {
      const T* g = GT + t * E * Bp + b0;
      const T* dg = dGT + t * E * Bp + b0;
      V sg = {};
      for (int64_t e = 0; e < E; ++e) sg += Kt::load(g + e * Bp) * Kt::load(dg + e * Bp);
      for (int64_t e = 0; e < E; ++e)
        Ln::store(dYT + (EH + t * E + e) * Bp + b0, Kt::load(g + e * Bp) * (Kt::load(dg + e * Bp) - sg));
    }
  // Panel by panel of NR columns: dYT's rows transposed into dYp (in L1), the bias gradient as its column sums
  // (rows ascending, in registers), dW = x^T dY a tile of MR rows at a time (whole panels straight into place,
  // the last through a tile of its own).
  T* db = a.dbias + s * C;
  const int64_t wo = s * D * C;
  T* dWs = adam ? dWb : a.dW + wo;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t c0 = p * Kt::NR, nc = std::min<int64_t>(Kt::NR, C - c0);
    Ln::transpose(dYT + c0 * Bp, Bp, nc, B, dYp, Kt::NR);
    if (nc < Kt::NR)  // the padding columns: read by the GEMM (their products discarded)
      for (int64_t b = 0; b < B; ++b) std::fill(dYp + b * Kt::NR + nc, dYp + (b + 1) * Kt::NR, T(0));
    V acc[2] = {};
    for (int64_t b = 0; b < B; ++b) {
      acc[0] += Kt::load(dYp + b * Kt::NR);
      acc[1] += Kt::load(dYp + b * Kt::NR + Lv);
    }
    for (int64_t j = 0; j < nc; ++j) db[c0 + j] = acc[j / Lv][j % Lv];
    for (int64_t m = 0; m < D; m += Kt::MR) {
      const int rows = static_cast<int>(std::min<int64_t>(Kt::MR, D - m));
      if (p < full) {
        Kt::template tile_in_place_rows<2>(rows, xs + m, D, dYp, Kt::NR, B, dWs + m * C + c0, C);
        continue;
      }
      alignas(64) T tile[Kt::MR * Kt::NR];
      Kt::tile_in_place_cols(rows, nc, xs + m, D, dYp, Kt::NR, B, tile, Kt::NR);
      for (int i = 0; i < rows; ++i)
        for (int64_t j = 0; j < nc; ++j) dWs[(m + i) * C + c0 + j] = tile[i * Kt::NR + j];
    }
  }
  // With the optimizer: this replica's update, where its loss and bias gradient are finite (fit_many's check).
  if (adam) {
    double total = 0;
    for (int64_t t = 0; t < nT; ++t) total += a.sums[s * nT + t];
    for (int64_t c = 0; c < C; ++c) total += db[c];
    a.ok[s] = std::isfinite(total);
    if (!a.ok[s]) return;
  }
  const double lr = adam ? a.lr[s] : 0;
  if (!adam) return;
  bool finite = adam_update<T>(a.params[0] + wo, a.adam_m[0] + wo, a.adam_v[0] + wo, dWb, D * C, a, lr);
  finite &= adam_update<T>(a.params[1] + s * C, a.adam_m[1] + s * C, a.adam_v[1] + s * C, db, C, a, lr);
  for (int64_t l = 0; l < nL; ++l)
    for (int64_t t = 0; t < nT; ++t) {
      const int64_t i = l * nT + t, nw = a.widths[l] * a.widths[l + 1], nb = a.widths[l + 1];
      const int64_t iw = 2 + i, ib = 2 + nL * nT + i;
      T* const* pm[3] = {a.params, a.adam_m, a.adam_v};
      finite &= adam_update<T>(pm[0][iw] + s * nw, pm[1][iw] + s * nw, pm[2][iw] + s * nw, dtw[i], nw, a, lr);
      finite &= adam_update<T>(pm[0][ib] + s * nb, pm[1][ib] + s * nb, pm[2][ib] + s * nb, dtb[i], nb, a, lr);
    }
  if (!finite) a.ok[s] = 2;  // updated, and the update made a weight non-finite
}

template <typename T>
void replicas_entry(const ReplicaStep<T>& a) {
  const int64_t C = a.E * a.H + a.nG * a.E;
  int64_t macs = a.E * a.H * (a.nT + 3) * 8 + (a.y ? 2 : 1) * a.D * C;  // 8 per element passed (see threads_for)
  for (int64_t l = 0; l < a.L; ++l) macs += 3 * a.nT * a.widths[l] * a.widths[l + 1];
#pragma omp parallel for schedule(dynamic) num_threads(Kern<T>::threads_for(a.S, a.S * a.B * macs))
  for (int64_t s = 0; s < a.S; ++s)
    if (!a.active || a.active[s]) replica_one<T>(a, s);
}
