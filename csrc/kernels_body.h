// The CPU kernels, written once and compiled once per instruction set: kernels.cpp includes this file
// inside a namespace under `#pragma GCC target(...)`, after defining kVecBytes (vector width) and kTileRows
// (rows of the register tile). No include guard and no includes here, on purpose.
//
// The expert GEMM runs on a register tile of kTileRows rows x NR = 2 vectors of columns (a "panel"),
// K accumulated in registers; everything after it (bias, activation, gated mixture, or the backward's
// dpre and dG) is an epilogue on that tile, so [B, E, H] is never written in the forward pass.
// Work is split into fixed row blocks (RB rows) x panels: the split does not depend on the thread count,
// so every reduction runs in the same order whatever OMP_NUM_THREADS is (deterministic results).

template <typename T>
struct Kern {
  typedef T V __attribute__((vector_size(kVecBytes)));
  static constexpr int L = kVecBytes / static_cast<int>(sizeof(T));  // lanes per vector
  static constexpr int NR = 2 * L;                                     // panel width (columns)
  static constexpr int MR = kTileRows;                                 // rows per register tile
  static constexpr int64_t RB = 8 * MR;                                // rows per work block
  static constexpr int64_t BB = 4 * RB;  // rows per backward block: longer reductions for dW, fewer partial sums
  static constexpr int64_t kChunks = 8;  // most partial sums of dW the backward keeps (memory: kChunks x |W|)

  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }

  // out[M][NR] = a[M rows, stride lda][K] @ w[K rows, stride ldw][NR]. Short tiles run S independent
  // chains over k so FMA latency does not serialize them.
  template <int M>
  static void tile(const T* a, int64_t lda, const T* w, int64_t ldw, int64_t Kd, T* out) {
    constexpr int S = M <= 2 ? 4 / M : 1;
    V acc[S][M][2] = {};
    int64_t k = 0;
    for (; k + S <= Kd; k += S) {
      for (int s = 0; s < S; ++s) {
        const T* wk = w + (k + s) * ldw;
        const V w0 = load(wk), w1 = load(wk + L);
        for (int i = 0; i < M; ++i) {
          const T ai = a[i * lda + k + s];
          acc[s][i][0] += ai * w0;
          acc[s][i][1] += ai * w1;
        }
      }
    }
    for (; k < Kd; ++k) {
      const T* wk = w + k * ldw;
      const V w0 = load(wk), w1 = load(wk + L);
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
  static void tile_rows(int m, const T* a, int64_t lda, const T* w, int64_t ldw, int64_t Kd, T* out) {
    if constexpr (M > 1) {
      if (m < M) return tile_rows<M - 1>(m, a, lda, w, ldw, Kd, out);
    }
    tile<M>(a, lda, w, ldw, Kd, out);
  }

  // ---- activations on one panel row: f = act(z), d = act'(z) -------------------------------------
  static void act_fwd(int act, const T* z, T* f) {
    switch (act) {
      case kRelu:
        for (int j = 0; j < NR; ++j) f[j] = z[j] < T(0) ? T(0) : z[j];  // NaN stays NaN
        break;
      case kSilu:
        for (int j = 0; j < NR; ++j) f[j] = z[j] / (T(1) + std::exp(-z[j]));
        break;
      case kGelu:
        for (int j = 0; j < NR; ++j)
          f[j] = T(0.5) * z[j] * (T(1) + std::tanh(T(kGeluC) * (z[j] + T(kGeluA) * z[j] * z[j] * z[j])));
        break;
      default:
        for (int j = 0; j < NR; ++j) f[j] = z[j];
    }
  }

  static void act_both(int act, const T* z, T* f, T* d) {
    switch (act) {
      case kRelu:
        for (int j = 0; j < NR; ++j) {
          f[j] = z[j] < T(0) ? T(0) : z[j];
          d[j] = z[j] > T(0) ? T(1) : T(0);
        }
        break;
      case kSilu:
        for (int j = 0; j < NR; ++j) {
          const T s = T(1) / (T(1) + std::exp(-z[j]));
          f[j] = z[j] * s;
          d[j] = s * (T(1) + z[j] * (T(1) - s));
        }
        break;
      case kGelu:
        for (int j = 0; j < NR; ++j) {
          const T x = z[j], th = std::tanh(T(kGeluC) * (x + T(kGeluA) * x * x * x));
          f[j] = T(0.5) * x * (T(1) + th);
          d[j] = T(0.5) * (T(1) + th) +
                 T(0.5) * x * (T(1) - th * th) * T(kGeluC) * (T(1) + T(3) * T(kGeluA) * x * x);
        }
        break;
      default:
        for (int j = 0; j < NR; ++j) {
          f[j] = z[j];
          d[j] = T(1);
        }
    }
  }

  // ---- weights as panels ------------------------------------------------------------------------
  // Expert weights W[E, K, N] seen as panels of NR columns. Packed (an InferenceSession, packed once):
  // [E][P][K][NR], zero-padded. Unpacked (the ops): full panels read in place with stride N; the last,
  // partial panel of each expert is copied once per call into a zero-padded buffer.
  struct Panels {
    const T* w;
    const T* tail;  // [E][K][NR] or null
    const T* bias;  // [E][P*NR] zero-padded, or null
    int64_t E, Kd, N, P;
    bool packed;

    const T* get(int64_t e, int64_t p, int64_t* ldw) const {
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

  // Unpacked panels for one call; `buf` owns the tail panels and the padded bias.
  static Panels view(const T* w, const T* b, int64_t E, int64_t Kd, int64_t N, std::vector<T>& buf) {
    const int64_t P = panels(N), rem = N % NR;
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

  // a's rows for expert e: a[B, K] shared (stride K) or a[B, E, K] (stride E*K, offset e*K).
  static const T* rows_of(const T* a, bool shared, int64_t e, int64_t Kd) { return shared ? a : a + e * Kd; }
  static int64_t lda_of(bool shared, int64_t E, int64_t Kd) { return shared ? Kd : E * Kd; }

  // ---- forward ------------------------------------------------------------------------------------
  // m[t, b, :] = sum_e G[b, t, e] act(a_e[b] @ W[e] + bias[e]) for rows [r0, r1) and panel p;
  // G points at row r0's gates.
  static void mixture_item(const T* a, bool shared, const Panels& w, const T* G, T* m, int64_t B, int64_t nT,
                           int act, int64_t r0, int64_t r1, int64_t p) {
    alignas(64) T pre[MR * NR];
    alignas(64) T f[NR];
    const int64_t E = w.E, Kd = w.Kd, H = w.N, h0 = p * NR, nh = std::min<int64_t>(NR, H - h0);
    const int64_t lda = lda_of(shared, E, Kd);
    for (int64_t e = 0; e < E; ++e) {
      int64_t ldw;
      const T* wp = w.get(e, p, &ldw);
      const T* bp = w.bias + e * w.P * NR + h0;
      for (int64_t r = r0; r < r1; r += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, r1 - r));
        tile_rows(mr, rows_of(a, shared, e, Kd) + r * lda, lda, wp, ldw, Kd, pre);
        for (int i = 0; i < mr; ++i) {
          T* z = pre + i * NR;
          for (int j = 0; j < NR; ++j) z[j] += bp[j];
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
  static void grouped_item(const T* a, bool shared, const Panels& w, T* out, int act, int64_t r0, int64_t r1,
                           int64_t p) {
    alignas(64) T pre[MR * NR];
    alignas(64) T f[NR];
    const int64_t E = w.E, Kd = w.Kd, N = w.N, h0 = p * NR, nh = std::min<int64_t>(NR, N - h0);
    const int64_t lda = lda_of(shared, E, Kd);
    for (int64_t e = 0; e < E; ++e) {
      int64_t ldw;
      const T* wp = w.get(e, p, &ldw);
      const T* bp = w.bias + e * w.P * NR + h0;
      for (int64_t r = r0; r < r1; r += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, r1 - r));
        tile_rows(mr, rows_of(a, shared, e, Kd) + r * lda, lda, wp, ldw, Kd, pre);
        for (int i = 0; i < mr; ++i) {
          T* z = pre + i * NR;
          for (int j = 0; j < NR; ++j) z[j] += bp[j];
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
    for (int64_t p = 0; p < P; ++p)
      for (int64_t d = 0; d < D; ++d)
        for (int64_t j = 0; j < NR; ++j) {
          const int64_t c = p * NR + j;
          w[(p * D + d) * NR + j] = c < N ? wg[((c / E) * D + d) * E + c % E] : T(0);
        }
    for (int64_t c = 0; c < P * NR; ++c) b[c] = (bg && c < N) ? bg[c] : T(0);
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
        tile_rows(mr, x + r * D, D, gw.w + p * D * NR, NR, D, pre);
        for (int i = 0; i < mr; ++i)
          for (int j = 0; j < NR; ++j) logits[i * W + p * NR + j] = pre[i * NR + j] + gw.bias[p * NR + j];
      }
      for (int i = 0; i < mr; ++i)
        for (int64_t t = 0; t < nT; ++t) {
          T* z = logits + i * W + t * E;
          T mx = z[0];
          for (int64_t e = 1; e < E; ++e) mx = z[e] > mx ? z[e] : mx;
          if (mx != mx) mx = T(0);  // a NaN logit: let it propagate through exp, not through the max
          T sum = 0;
          for (int64_t e = 0; e < E; ++e) {
            z[e] = std::exp(z[e] - mx);
            sum += z[e];
          }
          T* out = G + ((r - r0 + i) * nT + t) * E;
          for (int64_t e = 0; e < E; ++e) out[e] = z[e] / sum;
        }
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

  // The mixture over items (row block, panel). With gates (gw, on x) every thread computes the gates of
  // the row blocks it works on into its own buffer, once per block: no barrier, no shared write.
  static void mixture_items(const T* a, bool shared, const Panels& w, const T* x, const Panels* gw, const T* G, T* m,
                            int64_t B, int64_t nT, int act) {
    const int64_t items = ((B + RB - 1) / RB) * w.P, GE = nT * w.E;
    T* local = gw ? scratch<T>(1, static_cast<size_t>(RB * GE)) : nullptr;
    int64_t cached = -1;
    for_items(items, B > RB, [&](int64_t it) {
      const int64_t rb = it / w.P, r0 = rb * RB, r1 = std::min(B, r0 + RB);
      if (gw && rb != cached) {
        gate_block(x, *gw, local, nT, w.E, r0, r1);
        cached = rb;
      }
      mixture_item(a, shared, w, gw ? local : G + r0 * GE, m, B, nT, act, r0, r1, it % w.P);
    });
  }

  static int threads_for(int64_t items) {
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_threads(), items)));
  }

  // The forward of one layer: m from a, W and the gates G, or from gates computed here (gw, on a = x).
  static void mixture_forward(const T* a, bool shared, const Panels& w, const Panels* gw, const T* G, T* m, int64_t B,
                              int64_t nT, int act) {
#pragma omp parallel num_threads(threads_for(((B + RB - 1) / RB) * w.P))
    mixture_items(a, shared, w, a, gw, G, m, B, nT, act);
  }

  static void grouped_forward(const T* a, bool shared, const Panels& w, T* out, int64_t B, int act) {
    const int64_t nblocks = (B + RB - 1) / RB, items = nblocks * w.P;
#pragma omp parallel num_threads(threads_for(items))
    for_items(items, nblocks > 1, [&](int64_t it) {
      const int64_t r0 = (it / w.P) * RB;
      grouped_item(a, shared, w, out, act, r0, std::min(B, r0 + RB), it % w.P);
    });
  }

  // ---- backward -----------------------------------------------------------------------------------
  // Per-row epilogue pieces on whole panels (NR columns, a compile-time count, restrict: vectorized);
  // a partial panel goes through a zero-padded copy.
  static const T* padded(const T* src, int64_t n, T* tmp) {
    if (n == NR) return src;
    std::memcpy(tmp, src, static_cast<size_t>(n) * sizeof(T));
    std::fill(tmp + n, tmp + NR, T(0));
    return tmp;
  }

  // df += g_te * dm_t;  lanes_t += dm_t * f  (dG's partial sums, one per lane)
  static void mix_back_row(const T* __restrict g, T gte, const T* __restrict f, T* __restrict df,
                           T* __restrict ln) {
    for (int j = 0; j < NR; ++j) {
      df[j] += gte * g[j];
      ln[j] += g[j] * f[j];
    }
  }

  // dpre = df * act'(pre); db's partial += dpre
  static void dpre_row(const T* __restrict df, const T* __restrict d, T* __restrict o, T* __restrict dbe) {
    for (int j = 0; j < NR; ++j) {
      const T v = df[j] * d[j];
      o[j] = v;
      dbe[j] += v;
    }
  }

  // ---- backward (one pass) ------------------------------------------------------------------------
  // For each row block and expert e, on the block's rows only:
  //   pre = a_e W[e] + b[e] (recomputed on the register tile), f = act(pre), d = act'(pre);
  //   df = sum_t G[b,t,e] dm[t,b,:] (mixture) or dout[b,e,:] (grouped linear, G null);
  //   dp = df * d, kept in a block buffer [rows, N] (dpre is never written to memory);
  //   dG[b,t,e] = <dm[t,b,:], f> (lane-wise partial sums, then across lanes);
  //   dW[e] += a_e^T dp and db[e] += column sums of dp, into the partial sums of the block's chunk;
  //   da += dp W[e]^T (shared a: one [rows, K] buffer over all experts; else written per expert), skipped
  //   when da is null (an input nothing needs the gradient of: a third of the GEMM work saved).
  // Blocks form at most kChunks fixed chunks, handed out on demand; the chunks' partial sums are added
  // in chunk order at the end: bitwise the same result whatever the thread count or timing.
  static void backward(const T* a, bool shared, const Panels& w, const T* G, const T* dm, const T* dout, T* da,
                       T* dW, T* db, T* dG, int64_t B, int64_t nT, int act) {
    const int64_t E = w.E, Kd = w.Kd, N = w.N, P = w.P, NP = P * NR, lda = lda_of(shared, E, Kd);
    const int64_t KP = panels(Kd), KW = KP * NR, nblocks = (B + BB - 1) / BB;
    const int64_t per = (nblocks + kChunks - 1) / kChunks, nchunks = (nblocks + per - 1) / per;
    // W[e]^T, zero-padded: wt[e][h][k] for h < NP, k < KW (the dx GEMM's panels)
    std::vector<T> wt(static_cast<size_t>(E * NP * KW));
    // per chunk: dW partial [E][Kd][NP], db partial [E][NP] (zeroed by the chunk's thread)
    const int64_t part = E * Kd * NP + E * NP;
    std::vector<T> partial(static_cast<size_t>(nchunks * part));
#pragma omp parallel num_threads(threads_for(nchunks))
    {
#pragma omp for schedule(static)
      for (int64_t e = 0; e < (da ? E : 0); ++e) {
        std::fill(wt.begin() + e * NP * KW, wt.begin() + (e + 1) * NP * KW, T(0));
        for (int64_t p = 0; p < P; ++p) {
          int64_t ldw;
          const T* wp = w.get(e, p, &ldw);
          for (int64_t k = 0; k < Kd; ++k)
            for (int64_t j = 0; j < NR; ++j) wt[(e * NP + p * NR + j) * KW + k] = wp[k * ldw + j];
        }
      }
      std::vector<T> lanes(static_cast<size_t>(G ? BB * nT * NR : 0)), dp(static_cast<size_t>(BB * NP)),
          xt(static_cast<size_t>(Kd * BB)), dxb(static_cast<size_t>(BB * KW));
      alignas(64) T pre[MR * NR];
      alignas(64) T f[NR];
      alignas(64) T d[NR];
      alignas(64) T df[NR];
      alignas(64) T gt[NR];
#pragma omp for schedule(dynamic)
      for (int64_t ch = 0; ch < nchunks; ++ch) {
        T* mine = partial.data() + ch * part;
        std::fill(mine, mine + part, T(0));
        for (int64_t blk = ch * per; blk < std::min(nblocks, (ch + 1) * per); ++blk) {
          const int64_t r0 = blk * BB, r1 = std::min(B, r0 + BB), rn = r1 - r0;
          for (int64_t e = 0; e < E; ++e) {
            const T* ae = rows_of(a, shared, e, Kd) + r0 * lda;
            if (e == 0 || !shared) {  // a_e's rows transposed (the dW GEMM's left operand); a fresh da block
              for (int64_t i = 0; i < rn; ++i)
                for (int64_t k = 0; k < Kd; ++k) xt[k * BB + i] = ae[i * lda + k];
              std::fill(dxb.begin(), dxb.end(), T(0));
            }
            std::fill(lanes.begin(), lanes.end(), T(0));
            for (int64_t p = 0; p < P; ++p) {
              int64_t ldw;
              const T* wp = w.get(e, p, &ldw);
              const int64_t h0 = p * NR, nh = std::min<int64_t>(NR, N - h0);
              const T* bp = w.bias + e * NP + h0;
              for (int64_t r = 0; r < rn; r += MR) {
                const int mr = static_cast<int>(std::min<int64_t>(MR, rn - r));
                tile_rows(mr, ae + r * lda, lda, wp, ldw, Kd, pre);
                for (int i = 0; i < mr; ++i) {
                  const int64_t b = r0 + r + i;
                  T* z = pre + i * NR;
                  for (int j = 0; j < NR; ++j) z[j] += bp[j];
                  act_both(act, z, f, d);
                  std::fill(df, df + NR, T(0));
                  if (G) {
                    for (int64_t t = 0; t < nT; ++t) {
                      const T* g = padded(dm + (t * B + b) * N + h0, nh, gt);
                      mix_back_row(g, G[(b * nT + t) * E + e], f, df, lanes.data() + ((r + i) * nT + t) * NR);
                    }
                  } else {
                    std::memcpy(df, dout + (b * E + e) * N + h0, static_cast<size_t>(nh) * sizeof(T));
                  }
                  dpre_row(df, d, dp.data() + (r + i) * NP + h0, mine + E * Kd * NP + e * NP + h0);
                }
              }
            }
            // dW[e] += a_e^T dp: rows of dW are a's features k, the reduction runs over the block's rows
            for (int64_t k = 0; k < Kd; k += MR) {
              const int mk = static_cast<int>(std::min<int64_t>(MR, Kd - k));
              for (int64_t p = 0; p < P; ++p) {
                tile_rows(mk, xt.data() + k * BB, BB, dp.data() + p * NR, NP, rn, pre);
                for (int i = 0; i < mk; ++i) {
                  T* o = mine + (e * Kd + k + i) * NP + p * NR;
                  for (int j = 0; j < NR; ++j) o[j] += pre[i * NR + j];
                }
              }
            }
            // da += dp W[e]^T: the reduction runs over the expert's N outputs
            for (int64_t r = 0; r < (da ? rn : 0); r += MR) {
              const int mr = static_cast<int>(std::min<int64_t>(MR, rn - r));
              for (int64_t q = 0; q < KP; ++q) {
                tile_rows(mr, dp.data() + r * NP, NP, wt.data() + e * NP * KW + q * NR, KW, NP, pre);
                for (int i = 0; i < mr; ++i) {
                  T* o = dxb.data() + (r + i) * KW + q * NR;
                  for (int j = 0; j < NR; ++j) o[j] += pre[i * NR + j];
                }
              }
            }
            if (da && !shared)
              for (int64_t i = 0; i < rn; ++i)
                std::memcpy(da + ((r0 + i) * E + e) * Kd, dxb.data() + i * KW, static_cast<size_t>(Kd) * sizeof(T));
            if (G)
              for (int64_t i = 0; i < rn; ++i)
                for (int64_t t = 0; t < nT; ++t) {
                  const T* ln = lanes.data() + (i * nT + t) * NR;
                  T s = 0;
                  for (int j = 0; j < NR; ++j) s += ln[j];
                  dG[((r0 + i) * nT + t) * E + e] = s;
                }
          }
          if (da && shared)
            for (int64_t i = 0; i < rn; ++i)
              std::memcpy(da + (r0 + i) * Kd, dxb.data() + i * KW, static_cast<size_t>(Kd) * sizeof(T));
        }
      }
      // the partial sums, added in chunk order, columns split over the threads
#pragma omp for schedule(static)
      for (int64_t c = 0; c < E * Kd * N + E * N; ++c) {
        const bool is_db = c >= E * Kd * N;
        const int64_t cc = is_db ? c - E * Kd * N : c;
        const int64_t off = (is_db ? E * Kd * NP : 0) + (cc / N) * NP + cc % N;
        T s = 0;
        for (int64_t ch = 0; ch < nchunks; ++ch) s += partial[ch * part + off];
        (is_db ? db[cc] : dW[c]) = s;
      }
    }
  }

  // ---- an InferenceSession's whole model ----------------------------------------------------------
  // Task t's tower on rows [r0, r1) of its input (stride lda): each nn.Linear on the register tile,
  // through two buffers of RB rows x the widest padded layer; out[b, t] is the last layer's column 0.
  static void tower_block(const std::vector<Grouped<T>>& tower, const T* in, int64_t lda, int64_t r0, int64_t r1,
                          int64_t tasks, int64_t t, T* out, T* buf0, T* buf1) {
    alignas(64) T pre[MR * NR];
    alignas(64) T f[NR];
    const int64_t rn = r1 - r0;
    for (const Grouped<T>& l : tower) {
      const Panels w = session_panels(l);
      const int64_t ldo = w.P * NR;
      for (int64_t r = 0; r < rn; r += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, rn - r));
        for (int64_t p = 0; p < w.P; ++p) {
          tile_rows(mr, in + r * lda, lda, w.w + p * l.K * NR, NR, l.K, pre);
          for (int i = 0; i < mr; ++i) {
            T* z = pre + i * NR;
            for (int j = 0; j < NR; ++j) z[j] += w.bias[p * NR + j];
            act_fwd(l.act, z, f);
            std::memcpy(buf0 + (r + i) * ldo + p * NR, f, sizeof f);
          }
        }
      }
      in = buf0;
      lda = ldo;
      std::swap(buf0, buf1);
    }
    for (int64_t i = 0; i < rn; ++i) out[(r0 + i) * tasks + t] = in[i * lda];
  }

  static Panels session_panels(const Grouped<T>& g) {
    return Panels{g.w.data(), nullptr, g.b.data(), g.E, g.K, g.N, panels(g.N), true};
  }

  // x[B, D] -> out[B, T]; scratch: hidden outputs, G and m, owned by the calling thread.
  static void session_run(const Model<T>& s, const T* x, T* out, int64_t B, Scratch<T>& sc) {
    const size_t nh = s.hidden.size();
    sc.h.resize(nh);
    for (size_t l = 0; l < nh; ++l) sc.h[l].resize(static_cast<size_t>(B * s.hidden[l].E * s.hidden[l].N));
    const bool mix = s.has_mixture;
    if (mix) {
      sc.m.resize(static_cast<size_t>(s.gates * B * s.mixture.N));
    }
    const int64_t nblocks = (B + RB - 1) / RB;
    int64_t most = nblocks;
    for (const auto& g : s.hidden) most = std::max(most, nblocks * panels(g.N));
    if (mix) most = std::max(most, nblocks * panels(s.mixture.N));
#pragma omp parallel num_threads(threads_for(most))
    {
      const T* a = x;
      bool shared = true;
      for (size_t l = 0; l < nh; ++l) {
        const Panels w = session_panels(s.hidden[l]);
        for_items(nblocks * w.P, nblocks > 1, [&](int64_t it) {
          const int64_t r0 = (it / w.P) * RB;
          grouped_item(a, shared, w, sc.h[l].data(), s.hidden[l].act, r0, std::min(B, r0 + RB), it % w.P);
        });
        a = sc.h[l].data();
        shared = false;
      }
      const T* feat = a;  // shared bottom: the last hidden layer (one "expert"), [B, N]
      int64_t width = nh ? s.hidden.back().N : s.in_features;
      if (mix) {
        const Panels w = session_panels(s.mixture), gw = session_panels(s.gate);
        mixture_items(a, shared, w, x, &gw, nullptr, sc.m.data(), B, s.gates, s.mixture.act);
        feat = sc.m.data();
        width = s.mixture.N;
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

// ---- entry points on unpacked weights (the ops) ---------------------------------------------------
template <typename T>
void mixture_entry(const T* a, bool shared, const T* w, const T* b, const T* wg, const T* bg, const T* G, T* m,
                   int64_t B, int64_t E, int64_t Kd, int64_t H, int64_t nT, int act) {
  using Kt = Kern<T>;
  std::vector<T> buf, gbuf;
  const auto pw = Kt::view(w, b, E, Kd, H, buf);
  if (!wg) return Kt::mixture_forward(a, shared, pw, nullptr, G, m, B, nT, act);
  const int64_t P = Kt::panels(nT * E);
  gbuf.resize(static_cast<size_t>(P * Kd * Kt::NR + P * Kt::NR));
  Kt::pack_gate(wg, bg, Kd, nT, E, gbuf.data(), gbuf.data() + P * Kd * Kt::NR);
  const typename Kt::Panels gw{gbuf.data(), nullptr, gbuf.data() + P * Kd * Kt::NR, 1, Kd, nT * E, P, true};
  Kt::mixture_forward(a, shared, pw, &gw, nullptr, m, B, nT, act);
}

template <typename T>
void gate_entry(const T* x, const T* wg, const T* bg, T* G, int64_t B, int64_t D, int64_t nT, int64_t E) {
  using Kt = Kern<T>;
  const int64_t P = Kt::panels(nT * E), nblocks = (B + Kt::RB - 1) / Kt::RB;
  std::vector<T> buf(static_cast<size_t>(P * D * Kt::NR + P * Kt::NR));
  Kt::pack_gate(wg, bg, D, nT, E, buf.data(), buf.data() + P * D * Kt::NR);
  const typename Kt::Panels gw{buf.data(), nullptr, buf.data() + P * D * Kt::NR, 1, D, nT * E, P, true};
#pragma omp parallel num_threads(Kt::threads_for(nblocks))
  Kt::for_items(nblocks, true, [&](int64_t rb) {
    const int64_t r0 = rb * Kt::RB;
    Kt::gate_block(x, gw, G + r0 * nT * E, nT, E, r0, std::min(B, r0 + Kt::RB));
  });
}

template <typename T>
void grouped_entry(const T* a, bool shared, const T* w, const T* b, T* out, int64_t B, int64_t E, int64_t Kd,
                   int64_t N, int act) {
  std::vector<T> buf;
  const auto pw = Kern<T>::view(w, b, E, Kd, N, buf);
  Kern<T>::grouped_forward(a, shared, pw, out, B, act);
}

template <typename T>
void backward_entry(const T* a, bool shared, const T* w, const T* b, const T* G, const T* dm, const T* dout, T* da,
                    T* dW, T* db, T* dG, int64_t B, int64_t E, int64_t Kd, int64_t N, int64_t nT, int act) {
  std::vector<T> buf;
  const auto pw = Kern<T>::view(w, b, E, Kd, N, buf);
  Kern<T>::backward(a, shared, pw, G, dm, dout, da, dW, db, dG, B, nT, act);
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
void pack_entry(const T* w, const T* b, Grouped<T>& out) {
  using Kt = Kern<T>;
  out.w.assign(static_cast<size_t>(out.E * Kt::panels(out.N) * out.K * Kt::NR), T(0));
  out.b.assign(static_cast<size_t>(out.E * Kt::panels(out.N) * Kt::NR), T(0));
  Kt::pack(w, out.E, out.K, out.N, out.w.data());
  Kt::pack_bias(b, out.E, out.N, out.b.data());
}
