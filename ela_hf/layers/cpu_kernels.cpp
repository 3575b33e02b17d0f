// CPU kernels for the attention layers (fast_ops.py compiles this file once per machine and calls it
// through ctypes; without a C++ compiler the pure-PyTorch paths run instead).
//
// 1. The tail of a layer, batch norm fused with what surrounds it.
// For NCHW-contiguous tensors, plane p = n * C + c holds HW contiguous elements. The layer's pre-norm
// value is   x = a[p] * v + l[c] * sc   (MRLA-L: a = gate, l = lambda; MRLA-B: a = 1, no sc),
// its batch norm  z = A[p] * (v - cv[c]) + B[c] * (sc - cs[c]) + S[p]  (the affine map folded into
// per-plane coefficients, around per-channel centres cv, cs: values of the data, so that v - cv is exact
// where the data sit far from zero; folding without them, z = A * v + S, as PyTorch's CPU batch norm
// does, cancels two large terms when mean^2 / var is large: 4e-5 off at mean 30, std 0.05 in float32
// without FMA, and only somewhat better with it), and the layer's output  out = act(z) + y  (act:
// identity or ReLU, y: the residual stream, optional). x and z are recomputed from v and sc in every pass instead of
// being stored, so forward is two passes over the data and backward is two passes.
//
// Every plane's part of a reduction is done by one thread, and the planes' parts are added in a fixed
// order (per channel in sample order, here or by the caller), so results do not depend on the number
// of threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <limits>
#include <type_traits>
#include <vector>

namespace {

template <typename T, bool HAS_SC>
inline T pre(const T* v, const T* sc, int64_t i, T a, T l) {
  if (HAS_SC) return a * v[i] + l * sc[i];
  return a * v[i];
}

// The batch norm's output z at element i (see above): the forward's output and the backward's ReLU mask
// come from this one expression, so they agree to the bit
template <typename T, bool HAS_SC>
inline T folded(const T* v, const T* sc, int64_t i, T A, T B, T cv, T cs, T S) {
  if (HAS_SC) return A * (v[i] - cv) + B * (sc[i] - cs) + S;
  return A * (v[i] - cv) + S;
}

// Backward, at one element of plane p: xhat = (x - mean) * invstd and g' = g where the ReLU let z
// through (all of g without ReLU), both recomputed from v and sc.
template <typename T, bool HAS_SC, bool RELU>
struct TailPoint {
  const T *g, *v, *sc;
  T a, l, m, is, A, b, cv, cs, s;

  TailPoint(const T* g_, const T* v_, const T* sc_, const T* a_, const T* l_, const T* mean, const T* invstd,
            const T* A_, const T* B_, const T* S_, const T* ctr, int64_t C, int64_t HW, int64_t p) {
    const int64_t c = p % C, off = p * HW;
    g = g_ + off;
    v = v_ + off;
    sc = HAS_SC ? sc_ + off : nullptr;
    a = a_ ? a_[p] : T(1);
    l = HAS_SC ? l_[c] : T(0);
    m = mean[c];
    is = invstd[c];
    A = RELU ? A_[p] : T(0);
    b = (RELU && HAS_SC) ? B_[c] : T(0);
    cv = RELU ? ctr[c] : T(0);
    cs = (RELU && HAS_SC) ? ctr[C + c] : T(0);
    s = RELU ? S_[p] : T(0);
  }

  inline void at(int64_t i, T& xhat, T& gi) const {
    xhat = (pre<T, HAS_SC>(v, sc, i, a, l) - m) * is;
    const T z = RELU ? folded<T, HAS_SC>(v, sc, i, A, b, cv, cs, s) : T(1);
    // a select of a value loaded unconditionally, as PyTorch's threshold_backward: 0 where z <= 0
    // (whatever g is there), g elsewhere, a NaN z included. The product g * (z > 0) that stood here
    // made gcc load g under a mask: branchy scalar code without AVX-512 (10-12 ms for a
    // [64, 64, 32, 32] reduction, where this takes 0.9) and masked 512-bit loads with it (1.5-1.8 ms
    // against 0.74 at 256 bits).
    const T gi_all = g[i];
    gi = z <= T(0) ? T(0) : gi_all;
  }
};

// Reductions keep one vector of lane sums per quantity and add the lanes once at the end: a horizontal
// sum at the end of every plane of 16 to 256 elements cost about as much as the plane's own work. The
// order of the additions depends only on the shape, never on the number of threads.
template <typename T, int K>
inline double lane_total(const T (&s)[K]) {
  double t = 0;
  for (int k = 0; k < K; ++k) t += (double)s[k];
  return t;
}

// Per-channel sums of two quantities over all planes of a channel. The planes are visited in memory
// order, one thread per plane, each summed in VL lanes of T (one 512-bit vector: 4 to 64 terms per lane
// on the planes here), and the planes' lane sums are then added in double per channel, over the batch
// in sample order. Two things made the per-channel loops slow (~10 GB/s): a channel's planes are 1-4 KiB
// runs C * HW elements apart, which the hardware prefetcher does not follow, and double accumulators
// halve the vector width and chain every element's add.
// plane(p, s1, s2) adds plane p's terms to the zeroed lane sums s1[VL] and s2[VL].
template <typename T>
constexpr int VL = 64 / sizeof(T);

template <typename T, typename F>
void channel_sums(int64_t N, int64_t C, int nt, double* out1, double* out2, F&& plane) {
  constexpr int L = VL<T>;
  std::vector<double> part(N * C * 2 * L);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t p = 0; p < N * C; ++p) {
    T s1[L] = {}, s2[L] = {};
    plane(p, s1, s2);
    double* dst = part.data() + p * 2 * L;
    for (int k = 0; k < L; ++k) {
      dst[k] = s1[k];
      dst[L + k] = s2[k];
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    double s1[L] = {}, s2[L] = {};
    for (int64_t n = 0; n < N; ++n) {
      const double* src = part.data() + (n * C + c) * 2 * L;
      for (int k = 0; k < L; ++k) {
        s1[k] += src[k];
        s2[k] += src[L + k];
      }
    }
    out1[c] = lane_total(s1);
    out2[c] = lane_total(s2);
  }
}

// Calls lane(i, i % VL<T>) for the elements i of a plane's full vector blocks, then rest(i) for the
// remainder. Reductions whose lane sums live in the caller's frame and whose remainder goes to separate
// scalars keep those sums in registers (bwd_reduce, bwd_apply); a remainder that indexes the same lane
// array made gcc store and reload the lane sums at every vector.
template <typename T, typename F, typename R>
inline void for_lanes_then_rest(int64_t HW, F&& lane, R&& rest) {
  constexpr int L = VL<T>;
  int64_t i = 0;
  for (; i + L <= HW; i += L) {
#pragma omp simd
    for (int k = 0; k < L; ++k) lane(i + k, k);
  }
  for (; i < HW; ++i) rest(i);
}

// Calls f(i, lane) for every element i of a plane: the lane is i % VL<T> over the full blocks, 0 after.
template <typename T, typename F>
inline void for_vector_lanes(int64_t HW, F&& f) {
  for_lanes_then_rest<T>(HW, f, [&](int64_t i) { f(i, 0); });
}

// Per-channel mean and biased variance of x, shifted by the channel's first element for conditioning.
template <typename T, bool HAS_SC>
void stats(const T* v, const T* sc, const T* a, const T* l, int64_t N, int64_t C, int64_t HW, double* mean,
           double* var, int nt) {
  std::vector<double> shift(C), s1(C), s2(C);  // shift: the channel's first element, exact in T
  for (int64_t c = 0; c < C; ++c)
    shift[c] = (double)pre<T, HAS_SC>(v + c * HW, sc + (HAS_SC ? c * HW : 0), 0, a ? a[c] : T(1),
                                      HAS_SC ? l[c] : T(0));
  channel_sums<T>(N, C, nt, s1.data(), s2.data(), [&](int64_t p, T* t1, T* t2) {
    const int64_t c = p % C, off = p * HW;
    const T lc = HAS_SC ? l[c] : T(0), ac = a ? a[p] : T(1);
    const T k = (T)shift[c];
    const T* pv = v + off;
    const T* ps = HAS_SC ? sc + off : nullptr;
    for_vector_lanes<T>(HW, [&](int64_t i, int j) {
      const T d = pre<T, HAS_SC>(pv, ps, i, ac, lc) - k;
      t1[j] += d;
      t2[j] += d * d;
    });
  });
  for (int64_t c = 0; c < C; ++c) {
    const double m = s1[c] / (double)(N * HW);
    const double vr = s2[c] / (double)(N * HW) - m * m;
    mean[c] = m + shift[c];
    var[c] = vr < 0 ? 0 : vr;  // (a NaN stays NaN, as in nn.BatchNorm2d)
  }
}

// out = act(A[p] * (v - cv[c]) + B[c] * (sc - cs[c]) + S[p]) (+ y); ctr = [cv (C), cs (C, with sc)]
template <typename T, bool HAS_SC, bool RELU, bool HAS_Y>
void apply(const T* v, const T* sc, const T* y, const T* A, const T* B, const T* S, const T* ctr, T* out,
           int64_t N, int64_t C, int64_t HW, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t p = 0; p < N * C; ++p) {
    const int64_t c = p % C, off = p * HW;
    const T ap = A[p], bc = HAS_SC ? B[c] : T(0), sp = S[p], cv = ctr[c], cs = HAS_SC ? ctr[C + c] : T(0);
    const T* pv = v + off;
    const T* ps = HAS_SC ? sc + off : nullptr;
    const T* py = HAS_Y ? y + off : nullptr;
    T* po = out + off;
#pragma omp simd
    for (int64_t i = 0; i < HW; ++i) {
      T z = folded<T, HAS_SC>(pv, ps, i, ap, bc, cv, cs, sp);
      if (RELU) z = z <= T(0) ? T(0) : z;  // a NaN stays NaN, as in PyTorch's relu
      if (HAS_Y) z += py[i];
      po[i] = z;
    }
  }
}

// Per channel: sum(g') and sum(g' * xhat), g' = g where the ReLU let z through (all of g without ReLU).
template <typename T, bool HAS_SC, bool RELU>
void bwd_reduce(const T* g, const T* v, const T* sc, const T* a, const T* l, const T* mean, const T* invstd,
                const T* A, const T* B, const T* S, const T* ctr, int64_t N, int64_t C, int64_t HW, double* sum_g,
                double* sum_gx, int nt) {
  channel_sums<T>(N, C, nt, sum_g, sum_gx, [&](int64_t p, T* t1, T* t2) {
    const TailPoint<T, HAS_SC, RELU> pt(g, v, sc, a, l, mean, invstd, A, B, S, ctr, C, HW, p);
    // lane sums in this frame, the remainder in scalars (see for_lanes_then_rest): with the ReLU's
    // select, lane sums reached through t1 / t2 were stored and reloaded at every vector
    constexpr int L = VL<T>;
    T u1[L] = {}, u2[L] = {}, r1 = 0, r2 = 0;
    auto point = [&](int64_t i, T& e1, T& e2) {
      T xhat, gi;
      pt.at(i, xhat, gi);
      e1 += gi;
      e2 += gi * xhat;
    };
    for_lanes_then_rest<T>(HW, [&](int64_t i, int k) { point(i, u1[k], u2[k]); },
                           [&](int64_t i) { point(i, r1, r2); });
    for (int k = 0; k < L; ++k) {
      t1[k] += u1[k];
      t2[k] += u2[k];
    }
    t1[0] += r1;
    t2[0] += r2;
  });
}

// go = k[c] * (g' - mg[c] - xhat * mgx[c]) (the batch norm's input gradient; mg = mgx = 0 in eval mode),
// gv = a[p] * go, gsc = l[c] * go, dv[p] = sum(go * v), dsc[p] = sum(go * sc). gv is always written,
// dv where given (HAS_DV: the gate's gradient), gsc and dsc whenever there is a shortcut term.
template <typename T, bool HAS_SC, bool RELU, bool HAS_DV>
void bwd_apply(const T* g, const T* v, const T* sc, const T* a, const T* l, const T* mean, const T* invstd,
               const T* A, const T* B, const T* S, const T* ctr, const T* k, const T* mg, const T* mgx, T* gv, T* gsc,
               double* dv, double* dsc, int64_t N, int64_t C, int64_t HW, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t p = 0; p < N * C; ++p) {
    const TailPoint<T, HAS_SC, RELU> pt(g, v, sc, a, l, mean, invstd, A, B, S, ctr, C, HW, p);
    const int64_t c = p % C, off = p * HW;
    const T kc = k[c], mgc = mg[c], mgxc = mgx[c];
    T* pgv = gv + off;
    T* pgs = HAS_SC ? gsc + off : nullptr;
    // the plane's dot products in vector lanes, added in double; the shortcut's in double lanes: a
    // shortcut with a large mean against a gradient that sums to ~0 cancels. The remainder goes to
    // scalars (see for_lanes_then_rest).
    constexpr int L = VL<T>;
    T d1[L] = {}, r1 = 0;
    double d2[L] = {}, r2 = 0;
    auto point = [&](int64_t i, T& e1, double& e2) {
      T xhat, gi;
      pt.at(i, xhat, gi);
      const T go = kc * (gi - mgc - xhat * mgxc);
      pgv[i] = pt.a * go;
      if (HAS_SC) {
        pgs[i] = pt.l * go;
        e2 += (double)go * (double)pt.sc[i];
      }
      if (HAS_DV) e1 += go * pt.v[i];
    };
    for_lanes_then_rest<T>(HW, [&](int64_t i, int k) { point(i, d1[k], d2[k]); },
                           [&](int64_t i) { point(i, r1, r2); });
    if (HAS_DV) dv[p] = lane_total(d1) + (double)r1;
    if (HAS_SC) dsc[p] = lane_total(d2) + r2;
  }
}

// 2. ---- depthwise 3x3 convolution, stride 1, padding 1 (the layers' value projection wv) ----------------
// out[i, j] = sum_{a, b < 3} w[a, b] * in[i + a - 1, j + b - 1], zero outside the plane. A plane is small
// (a few KiB in the ResNets here), so each is done by one thread while it sits in L1: it is copied into a
// zero-bordered buffer of row length Wp = W + 2, and then every tap is one long flat loop over that
// buffer (rows of 8 or 32 elements alone would leave the vector units mostly idle). Float planes of width
// 8, 16 and 32 take the row path (2b) instead where the CPU has AVX-512; conv_input, dw_conv,
// dw_weight_grad and dw_input_grad choose, so the kernels below are written once for both.

// Fills the zero-bordered buffer with the plane's elements at(k), k = i * W + j; with SUM, returns
// their sum (else 0), taken in one flat loop over the buffer once it is in L1 (its borders are zero):
// a sum per row would end every row of 8 to 32 elements in a chain of scalar adds, which cost as much
// as the copy itself
template <typename T, bool SUM, int WC, typename F>
double pad_plane_of(F&& at, T* dst, int64_t H, int64_t W_) {
  const int64_t W = WC ? WC : W_;
  const int64_t Wp = W + 2, n = (H + 2) * Wp;
  for (int64_t k = 0; k < Wp; ++k) dst[k] = dst[(H + 1) * Wp + k] = T(0);
  for (int64_t i = 0; i < H; ++i) {
    T* row = dst + (i + 1) * Wp;
    row[0] = row[W + 1] = T(0);
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) row[j + 1] = at(i * W + j);
  }
  dst[n] = dst[n + 1] = T(0);  // read (and discarded) by the flat loops' last taps
  double total = 0;
  if (SUM) {
#pragma omp simd reduction(+ : total)
    for (int64_t k = 0; k < n; ++k) total += (double)dst[k];
  }
  return total;
}

// Copies the plane src into the zero-bordered buffer (with SUM, returns its sum)
template <typename T, bool SUM, int WC = 0>
double pad_plane(const T* src, T* dst, int64_t H, int64_t W_) {
  return pad_plane_of<T, SUM, WC>([src](int64_t k) { return src[k]; }, dst, H, W_);
}

// One element of the block's output y = relu(pre + sc) (the residual sum and ReLU that precede the
// attention layer); relu keeps NaN, as PyTorch's does
template <typename T>
inline T relu_sum(T pre, T sc) {
  const T s = pre + sc;
  return s < T(0) ? T(0) : s;
}

// y = relu(pre + sc), written to y and into the zero-bordered buffer in the same loop; returns the
// plane's sum of y
template <typename T, int WC = 0>
double pad_relu_plane(const T* pre, const T* sc, T* y, T* dst, int64_t H, int64_t W_) {
  return pad_plane_of<T, true, WC>([=](int64_t k) { return y[k] = relu_sum(pre[k], sc[k]); }, dst, H, W_);
}

// out = correlation of the padded plane with w (+ add, + plus[i, j] where given), through tmp (H * Wp,
// two columns discarded)
template <typename T, int WC = 0>
void dw_plane(const T* pad, const T* w, T* tmp, T* out, int64_t H, int64_t W_, T add = T(0),
              const T* plus = nullptr) {
  const int64_t W = WC ? WC : W_;
  const int64_t Wp = W + 2, n = H * Wp;
  const T* r0 = pad;
  const T* r1 = pad + Wp;
  const T* r2 = pad + 2 * Wp;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    tmp[k] = w[0] * r0[k] + w[1] * r0[k + 1] + w[2] * r0[k + 2] + w[3] * r1[k] + w[4] * r1[k + 1] +
             w[5] * r1[k + 2] + w[6] * r2[k] + w[7] * r2[k + 1] + w[8] * r2[k + 2];
  }
  if (plus) {
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) out[i * W + j] = tmp[i * Wp + j] + add + plus[i * W + j];
  } else {
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) out[i * W + j] = tmp[i * Wp + j] + add;
  }
}

// 2b. ---- the row path: float planes of width 8, 16 or 32 with AVX-512 -------------------------------
// Every row of such a plane is one 256-bit vector (width 8) or one or two 512-bit vectors, so the conv
// reads the plane itself: a row's neighbours at j - 1 and j + 1 are its vectors shifted by one lane
// (valignd, a zero shifted in at the row's ends) and rows outside the plane add nothing. There is then
// no zero-bordered copy and no H x Wp result to copy out, and every load is a whole vector at a multiple
// of the vector's size into the plane, where the flat loop's taps at k + 1 and k + 2 straddle cache
// lines. Each input row is loaded and shifted once and its three taps go to the three output rows it
// touches (a window of two accumulating rows). Per plane in L1 this made the conv 1.7x and the weight
// gradient 2.5x faster than the flat loops at width 32.
#if defined(__AVX512F__) && defined(__AVX512VL__)
constexpr bool kRowPath = true;

// One vector of L floats (B bits): the operations the row path needs, the same intrinsics at both widths
#define ELA_ROW_VECTOR(NAME, B, L_)                                                                            \
  struct NAME {                                                                                               \
    using R = __m##B;                                                                                         \
    static constexpr int L = L_;                                                                              \
    static R load(const float* p) { return _mm##B##_loadu_ps(p); }                                            \
    static void store(float* p, R a) { _mm##B##_storeu_ps(p, a); }                                            \
    static R set1(float a) { return _mm##B##_set1_ps(a); }                                                    \
    static R zero() { return _mm##B##_setzero_ps(); }                                                         \
    static R add(R a, R b) { return _mm##B##_add_ps(a, b); }                                                  \
    static R mul(R a, R b) { return _mm##B##_mul_ps(a, b); }                                                  \
    static R fma(R a, R b, R c) { return _mm##B##_fmadd_ps(a, b, c); }                                        \
    /* [prev[L - 1], cur[0 .. L - 2]] and [cur[1 .. L - 1], next[0]] */                                       \
    static R left(R cur, R prev) {                                                                            \
      return _mm##B##_castsi##B##_ps(                                                                         \
          _mm##B##_alignr_epi32(_mm##B##_castps_si##B(cur), _mm##B##_castps_si##B(prev), L - 1));             \
    }                                                                                                         \
    static R right(R cur, R next) {                                                                           \
      return _mm##B##_castsi##B##_ps(_mm##B##_alignr_epi32(_mm##B##_castps_si##B(next), _mm##B##_castps_si##B(cur), 1)); \
    }                                                                                                         \
    /* s unless y <= 0 (a NaN y passes, as in PyTorch's threshold_backward), else +0, as the flat path */     \
    static R where_pos(R y, R s) { return _mm##B##_maskz_mov_ps(_mm##B##_cmp_ps_mask(y, zero(), _CMP_NLE_UQ), s); } \
    static double sum(R a);                                                                                   \
  };
ELA_ROW_VECTOR(V16, 512, 16)
ELA_ROW_VECTOR(V8, 256, 8)
#undef ELA_ROW_VECTOR
inline double V16::sum(__m512 a) { return _mm512_reduce_add_ps(a); }
inline double V8::sum(__m256 a) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

// The vector type and count for rows of width WC
template <int WC>
struct RowOf {
  using V = typename std::conditional<WC == 8, V8, V16>::type;
  static constexpr int NV = WC / V::L;
};

// The row of NV vectors at src and its copies shifted by one lane: lt[v] holds x[j - 1], rt[v] x[j + 1]
template <typename V, int NV>
inline void row_taps(const float* src, typename V::R* cur, typename V::R* lt, typename V::R* rt) {
  for (int v = 0; v < NV; ++v) cur[v] = V::load(src + V::L * v);
  for (int v = 0; v < NV; ++v) {
    lt[v] = V::left(cur[v], v ? cur[v - 1] : V::zero());
    rt[v] = V::right(cur[v], v + 1 < NV ? cur[v + 1] : V::zero());
  }
}

// The correlation of the H x WC plane in with w (zero outside the plane); store(k, s) receives the
// output vector at element k. Output row i is (tap row 0 of input row i - 1 + tap row 1 of row i) + tap
// row 2 of row i + 1, each tap row w[3a] * x[j - 1] + w[3a + 1] * x[j] + w[3a + 2] * x[j + 1] in fused
// multiply-adds, so the result depends on the shape only.
template <int WC, typename F>
inline void conv_rows(const float* in, const float* w, int64_t H, F&& store) {
  using V = typename RowOf<WC>::V;
  constexpr int NV = RowOf<WC>::NV;
  if (H <= 0) return;  // (the callers never pass an empty plane; the last store below would be outside)
  typename V::R wv[9], up[NV], mid[NV];  // up, mid: output rows r - 1 and r, accumulating
  for (int k = 0; k < 9; ++k) wv[k] = V::set1(w[k]);
  for (int64_t r = 0; r < H; ++r) {
    typename V::R cur[NV], lt[NV], rt[NV];
    row_taps<V, NV>(in + r * WC, cur, lt, rt);
    for (int v = 0; v < NV; ++v) {
      const auto t0 = V::fma(wv[2], rt[v], V::fma(wv[1], cur[v], V::mul(wv[0], lt[v])));
      const auto t1 = V::fma(wv[5], rt[v], V::fma(wv[4], cur[v], V::mul(wv[3], lt[v])));
      const auto t2 = V::fma(wv[8], rt[v], V::fma(wv[7], cur[v], V::mul(wv[6], lt[v])));
      if (r > 0) store((r - 1) * WC + V::L * v, V::add(up[v], t2));  // row r - 1 is complete
      up[v] = r > 0 ? V::add(mid[v], t1) : t1;                       // row r lacks row r + 1's taps
      mid[v] = t0;                                                   // row r + 1 has row r's
    }
  }
  for (int v = 0; v < NV; ++v) store((H - 1) * WC + V::L * v, up[v]);
}

// The per-plane weight gradient gw[a, b] = sum_{i, j} g[i, j] * x[i + a - 1, j + b - 1]: every input
// row's taps meet the three gradient rows they pair with, in one accumulator per tap and vector.
template <int WC>
inline void weight_grad_rows(const float* g, const float* x, double* o, int64_t H) {
  using V = typename RowOf<WC>::V;
  constexpr int NV = RowOf<WC>::NV;
  typename V::R acc[9][NV];
  for (int k = 0; k < 9; ++k)
    for (int v = 0; v < NV; ++v) acc[k][v] = V::zero();
  for (int64_t r = 0; r < H; ++r) {
    typename V::R cur[NV], lt[NV], rt[NV];
    row_taps<V, NV>(x + r * WC, cur, lt, rt);
    for (int a = 0; a < 3; ++a) {
      const int64_t i = r + 1 - a;  // x's row r is row i + a - 1 for gradient row i
      if (i < 0 || i >= H) continue;
      for (int v = 0; v < NV; ++v) {
        const auto gv = V::load(g + i * WC + V::L * v);
        acc[3 * a][v] = V::fma(gv, lt[v], acc[3 * a][v]);
        acc[3 * a + 1][v] = V::fma(gv, cur[v], acc[3 * a + 1][v]);
        acc[3 * a + 2][v] = V::fma(gv, rt[v], acc[3 * a + 2][v]);
      }
    }
  }
  for (int k = 0; k < 9; ++k) {
    auto t = acc[k][0];
    for (int v = 1; v < NV; ++v) t = V::add(t, acc[k][v]);
    o[k] = V::sum(t);
  }
}

// out = conv(in) + add (+ plus), as dw_plane; with PRE (dw_input_grad's mask) then masked by y > 0 and
// added to add_to where given, each as the vector is stored
template <int WC, bool PRE = false>
void rows_conv(const float* in, const float* w, float* out, int64_t H, float add, const float* plus,
               const float* y = nullptr, float* add_to = nullptr) {
  using V = typename RowOf<WC>::V;
  const auto ad = V::set1(add);
  conv_rows<WC>(in, w, H, [&](int64_t k, typename V::R s) {
    s = V::add(s, ad);
    if (plus) s = V::add(s, V::load(plus + k));
    if (PRE) {
      s = V::where_pos(V::load(y + k), s);
      if (add_to) V::store(add_to + k, V::add(V::load(add_to + k), s));
    }
    V::store(out + k, s);
  });
}
#else
constexpr bool kRowPath = false;
// declared for the branches that row_path() discards; never called
template <int WC>
void weight_grad_rows(const float* g, const float* x, double* o, int64_t H);
template <int WC, bool PRE = false>
void rows_conv(const float* in, const float* w, float* out, int64_t H, float add, const float* plus,
               const float* y = nullptr, float* add_to = nullptr);
#endif

// Whether planes of T and width WC take the row path
template <typename T, int WC>
constexpr bool row_path() {
  return kRowPath && std::is_same<T, float>::value && (WC == 8 || WC == 16 || WC == 32);
}

// A plane as the conv reads it: the plane itself on the row path, else its zero-bordered copy in buf.
// With SUM, *total receives the plane's sum (in double).
template <typename T, int WC, bool SUM = false>
const T* conv_input(const T* src, T* buf, int64_t H, int64_t W, double* total = nullptr) {
  if constexpr (row_path<T, WC>()) {
    if (SUM) {
      double t = 0;
#pragma omp simd reduction(+ : t)
      for (int64_t k = 0; k < H * W; ++k) t += (double)src[k];
      *total = t;
    }
    return src;
  }
  const double t = pad_plane<T, SUM, WC>(src, buf, H, W);
  if (SUM) *total = t;
  return buf;
}

// y = relu(pre + sc) written to y (pad_relu_plane); returns y as the conv reads it, its sum in *total
template <typename T, int WC>
const T* relu_input(const T* pre, const T* sc, T* y, T* buf, int64_t H, int64_t W, double* total) {
  if constexpr (row_path<T, WC>()) {
#pragma omp simd
    for (int64_t k = 0; k < H * W; ++k) y[k] = relu_sum(pre[k], sc[k]);
    return conv_input<T, WC, true>(y, buf, H, W, total);  // the sum from L1, as pad_plane_of takes it
  }
  *total = pad_relu_plane<T, WC>(pre, sc, y, buf, H, W);
  return buf;
}

// out = conv(in) + add (+ plus) of a plane staged by conv_input
template <typename T, int WC>
void dw_conv(const T* in, const T* w, T* tmp, T* out, int64_t H, int64_t W, T add = T(0), const T* plus = nullptr) {
  if constexpr (row_path<T, WC>()) rows_conv<WC>(in, w, out, H, add, plus);
  else dw_plane<T, WC>(in, w, tmp, out, H, W, add, plus);
}

// Per-plane weight gradient gw[a, b] = sum_{i, j} g[i, j] * in[i + a - 1, j + b - 1] from the planes as
// conv_input staged them. Padded: g sits at pg[k + Wp + 1] for k over the H x Wp window (zero in the two
// extra columns), so gw[a, b] = sum_k pg[k + Wp + 1] * px[k + a * Wp + b]
template <typename T, int WC = 0>
void dw_weight_grad(const T* pg, const T* px, double* o, int64_t H, int64_t W_) {
  if constexpr (row_path<T, WC>()) return weight_grad_rows<WC>(pg, px, o, H);
  const int64_t W = WC ? WC : W_;
  const int64_t Wp = W + 2, n = H * Wp;
  const T* gg = pg + Wp + 1;
  const T* r0 = px;
  const T* r1 = px + Wp;
  const T* r2 = px + 2 * Wp;
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0, s8 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7, s8)
  for (int64_t k = 0; k < n; ++k) {
    const T gk = gg[k];
    s0 += gk * r0[k];
    s1 += gk * r0[k + 1];
    s2 += gk * r0[k + 2];
    s3 += gk * r1[k];
    s4 += gk * r1[k + 1];
    s5 += gk * r1[k + 2];
    s6 += gk * r2[k];
    s7 += gk * r2[k + 1];
    s8 += gk * r2[k + 2];
  }
  o[0] = s0, o[1] = s1, o[2] = s2, o[3] = s3, o[4] = s4, o[5] = s5, o[6] = s6, o[7] = s7, o[8] = s8;
}

// The conv's input gradient into t: the correlation of the output gradient pd (as conv_input staged it)
// with w rotated by 180 degrees, + add + plus[i, j] (where given). PRE (the conv's input y formed as
// relu(pre + sc)): t is then 0 where y <= 0 (a select, as PyTorch's ReLU backward: a NaN y passes), and
// added to add_to where given (the residual sum's shortcut branch).
template <typename T, int WC, bool PRE>
void dw_input_grad(const T* pd, const T* w, T* tmp, T* t, int64_t H, int64_t W_, T add, const T* plus, const T* y,
                   T* add_to) {
  T wf[9];
  for (int k = 0; k < 9; ++k) wf[k] = w[8 - k];
  if constexpr (row_path<T, WC>()) return rows_conv<WC, PRE>(pd, wf, t, H, add, plus, y, add_to);
  const int64_t HW = H * (WC ? WC : W_);
  dw_plane<T, WC>(pd, wf, tmp, t, H, W_, add, plus);
  if (!PRE) return;
  if (add_to) {
#pragma omp simd
    for (int64_t i = 0; i < HW; ++i) {
      const T m = y[i] <= T(0) ? T(0) : t[i];
      t[i] = m;
      add_to[i] += m;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < HW; ++i) t[i] = y[i] <= T(0) ? T(0) : t[i];
  }
}

// Thread-private plane buffers: two zero-bordered planes (py, pd), the conv's H x Wp result, V and two
// scratch planes.
template <typename T>
struct PlaneBuffers {
  T *py, *tmp, *v, *x, *s, *pd;
  PlaneBuffers(int64_t H, int64_t W) {
    const int64_t Wp = W + 2;
    py = new T[(H + 2) * Wp + 2];
    pd = new T[(H + 2) * Wp + 2];
    tmp = new T[H * Wp];
    v = new T[H * W];
    x = new T[H * W];
    s = new T[H * W];
  }
  ~PlaneBuffers() {
    delete[] py;
    delete[] pd;
    delete[] tmp;
    delete[] v;
    delete[] x;
    delete[] s;
  }
  // computes V from plane p of y; returns that plane as the conv read it (conv_input, into py)
  template <int WC>
  const T* value(const T* y, const T* w, int64_t H, int64_t W) {
    const T* in = conv_input<T, WC>(y, py, H, W);
    dw_conv<T, WC>(in, w, tmp, v, H, W);
    return in;
  }
};

// Runs f(planes, p, c, offset) for every plane p = n * C + c, one thread per plane, each thread with its
// own plane buffers.
template <typename T, typename F>
void for_planes(int64_t N, int64_t C, int64_t H, int64_t W, int nt, F&& f) {
#pragma omp parallel num_threads(nt)
  {
    PlaneBuffers<T> b(H, W);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < N * C; ++p) f(b, p, p % C, p * H * W);
  }
}

// plane_mean (optional): the mean of each input plane, the layer's pooled descriptor, in the same read.
// pre (optional, with sc): the block's conv branch before its residual sum and ReLU; the input
// in = relu(pre + sc) is then formed here and written to in.
template <typename T, int WC>
void dw_forward(const T* pre, const T* sc, T* in, const T* weight, T* out, double* plane_mean, int64_t N,
                int64_t C, int64_t H, int64_t W_, int nt) {
  const int64_t W = WC ? WC : W_;
  for_planes<T>(N, C, H, W, nt, [&](PlaneBuffers<T>& b, int64_t p, int64_t c, int64_t off) {
    double total = 0;
    const T* x = pre          ? relu_input<T, WC>(pre + off, sc + off, in + off, b.py, H, W, &total)
                 : plane_mean ? conv_input<T, WC, true>(in + off, b.py, H, W, &total)
                              : conv_input<T, WC>(in + off, b.py, H, W);
    if (plane_mean) plane_mean[p] = total / (double)(H * W);
    dw_conv<T, WC>(x, weight + c * 9, b.tmp, out + off, H, W);
  });
}

// Backward, one pass over (g, in) per plane: the input gradient (the same correlation of g with the
// kernel rotated by 180 degrees) and the per-plane weight gradient
//   gw[p, a, b] = sum_{i, j} g[i, j] * in[i + a - 1, j + b - 1],
// summed over the batch by the caller, so the result does not depend on the number of threads.
// gin_add (optional): a constant per plane added to the input gradient (the pooled mean's gradient / HW).
// gin_res (optional): the input's gradient from its other uses (MRLA-B's residual), added in the same write.
// PRE (the input formed as relu(pre + sc) by dw_forward): gin is then the gradient of pre (and of sc),
// masked by [in > 0] with a select, as PyTorch's ReLU backward.
template <typename T, int WC, bool PRE>
void dw_backward(const T* g, const T* in, const T* weight, const T* gin_add, const T* gin_res, T* gin, double* gw,
                 int64_t N, int64_t C, int64_t H, int64_t W_, int nt) {
  const int64_t W = WC ? WC : W_;
  for_planes<T>(N, C, H, W, nt, [&](PlaneBuffers<T>& b, int64_t p, int64_t c, int64_t off) {
    const T* gs = conv_input<T, WC>(g + off, b.pd, H, W);
    if (gin)
      dw_input_grad<T, WC, PRE>(gs, weight + c * 9, b.tmp, gin + off, H, W, gin_add ? gin_add[p] : T(0),
                                gin_res ? gin_res + off : nullptr, in + off, nullptr);
    if (gw) dw_weight_grad<T, WC>(gs, conv_input<T, WC>(in + off, b.py, H, W), gw + p * 9, H, W);
  });
}

// 3. ---- MRLA-L's whole value path, the depthwise conv folded in --------------------------------------
// out = y + BN(a[p] * V + l[c] * sc) with V = wv(y) the depthwise conv. V is never stored: each pass
// recomputes a plane of it from y while the plane is in L1 (9 multiply-adds per element, cheaper than
// writing V and reading it back twice forward and twice backward). The batch-norm statistics and every
// reduction the backward needs come from per-plane moments; the caller combines them.

// Forward moments per plane p (mom[p * 6 + ...]): sum y, sum V, sum V^2, sum V sc, sum sc, sum sc^2;
// with full == false only sum y (eval mode: the running statistics are used).
// pre (optional): the block's conv branch before its residual sum and ReLU; y = relu(pre + sc) is then
// formed here and written to y (the PyTorch add and ReLU, and their backward, are not run).
template <typename T, int WC>
void light_fwd_moments(const T* pre, T* y, const T* sc, const T* weight, double* mom, int64_t N, int64_t C,
                       int64_t H, int64_t W_, bool full, int nt) {
  const int64_t W = WC ? WC : W_;
  const int64_t HW = H * W;
  for_planes<T>(N, C, H, W, nt, [&](PlaneBuffers<T>& b, int64_t p, int64_t c, int64_t off) {
    double* m = mom + p * 6;
    const T* x = pre ? relu_input<T, WC>(pre + off, sc + off, y + off, b.py, H, W, &m[0])
                     : conv_input<T, WC, true>(y + off, b.py, H, W, &m[0]);
    if (!full) return;
    dw_conv<T, WC>(x, weight + c * 9, b.tmp, b.v, H, W);
    const T* ps = sc + off;
    const T* v = b.v;
    double s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0;
#pragma omp simd reduction(+ : s1, s2, s3, s4, s5)
    for (int64_t i = 0; i < HW; ++i) {
      const double vi = v[i], si = ps[i];
      s1 += vi;
      s2 += vi * vi;
      s3 += vi * si;
      s4 += si;
      s5 += si * si;
    }
    m[1] = s1, m[2] = s2, m[3] = s3, m[4] = s4, m[5] = s5;
  });
}

// out = y + A[p] * V + B[c] * sc + S[c]
template <typename T, int WC>
void light_fwd_apply(const T* y, const T* sc, const T* weight, const T* A, const T* B, const T* S, T* out,
                     int64_t N, int64_t C, int64_t H, int64_t W_, int nt) {
  const int64_t W = WC ? WC : W_;
  const int64_t HW = H * W;
  for_planes<T>(N, C, H, W, nt, [&](PlaneBuffers<T>& b, int64_t p, int64_t c, int64_t off) {
    b.template value<WC>(y + off, weight + c * 9, H, W);
    const T ap = A[p], bc = B[c], sc_ = S[c];
    const T* py = y + off;
    const T* ps = sc + off;
    const T* v = b.v;
    T* po = out + off;
#pragma omp simd
    for (int64_t i = 0; i < HW; ++i) po[i] = py[i] + ap * v[i] + bc * ps[i] + sc_;
  });
}

// Backward moments per plane p (red[p * 3 + ...]): sum g, sum g V, sum g sc
template <typename T, int WC>
void light_bwd_reduce(const T* g, const T* y, const T* sc, const T* weight, double* red, int64_t N, int64_t C,
                      int64_t H, int64_t W_, int nt) {
  const int64_t W = WC ? WC : W_;
  const int64_t HW = H * W;
  for_planes<T>(N, C, H, W, nt, [&](PlaneBuffers<T>& b, int64_t p, int64_t c, int64_t off) {
    b.template value<WC>(y + off, weight + c * 9, H, W);
    const T* pg = g + off;
    const T* ps = sc + off;
    const T* v = b.v;
    double s0 = 0, s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s0, s1, s2)
    for (int64_t i = 0; i < HW; ++i) {
      const double gi = pg[i];
      s0 += gi;
      s1 += gi * (double)v[i];
      s2 += gi * (double)ps[i];
    }
    double* r = red + p * 3;
    r[0] = s0, r[1] = s1, r[2] = s2;
  });
}

// The batch norm's input gradient gx = al[c] * g + be[p] * V + de[c] * sc + ep[c] (the caller folds
// the statistics' gradients into these coefficients), then
//   gsc = l[c] * gx (optional),
//   gy  = g + wv^T(a[p] * gx) + gy_add[p] (optional; g: the residual, gy_add: the pooled mean's gradient / HW),
//   gw[p] = the conv's per-plane weight gradient (optional), as in dw_backward.
// PRE (y = relu(pre + sc) formed by light_fwd_moments): gy is then the gradient of pre,
// gy = [not y <= 0] * (g + wv^T(a[p] * gx) + gy_add[p]) (a select, as PyTorch's ReLU backward), and gsc gets
// it added (the residual sum's shortcut branch).
template <typename T, int WC, bool PRE>
void light_bwd_apply(const T* g, const T* y, const T* sc, const T* weight, const T* al, const T* be, const T* de,
                     const T* ep, const T* a, const T* l, const T* gy_add, T* gy, T* gsc, double* gw, int64_t N,
                     int64_t C, int64_t H, int64_t W_, int nt) {
  const int64_t W = WC ? WC : W_;
  const int64_t HW = H * W;
  for_planes<T>(N, C, H, W, nt, [&](PlaneBuffers<T>& b, int64_t p, int64_t c, int64_t off) {
    const T* wc = weight + c * 9;
    const T* ys = b.template value<WC>(y + off, wc, H, W);
    const T alc = al[c], bep = be[p], dec = de[c], epc = ep[c], ap = a[p], lc = l[c];
    const T* pg = g + off;
    const T* ps = sc + off;
    const T* v = b.v;
    T* dv = b.x;
    if (gsc) {
      T* pgs = gsc + off;
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) {
        const T gx = alc * pg[i] + bep * v[i] + dec * ps[i] + epc;
        pgs[i] = lc * gx;
        dv[i] = ap * gx;
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) dv[i] = ap * (alc * pg[i] + bep * v[i] + dec * ps[i] + epc);
    }
    const T* dvs = conv_input<T, WC>(dv, b.pd, H, W);
    if (gy || (PRE && gsc))  // with PRE, sc's gradient needs y's (in scratch where y's is not wanted)
      dw_input_grad<T, WC, PRE>(dvs, wc, b.tmp, gy ? gy + off : b.s, H, W, gy_add ? gy_add[p] : T(0), pg, y + off,
                                gsc ? gsc + off : nullptr);
    if (gw) dw_weight_grad<T, WC>(dvs, ys, gw + p * 9, H, W);
  });
}

// 4. ---- MRLA-B's slot contractions --------------------------------------------------------------------
// The stage buffer holds S slots of B rows (one per (sample, head)) of n contiguous elements, slot s at
// slots + s * sstride. Layer t's output is a weighted sum over its slots, and backward needs the dot
// products of an output gradient with each slot: O(t) full reads per layer, the largest memory traffic
// of MRLA-B. Both read several slots at once (a single stream reads slower than several here), one
// thread per row, each output element in a fixed order (no dependence on the number of threads).

// out[b, :] = sum_s w[b * S + s] * slot_s[b, :], accumulated in chunks that stay in registers
template <typename T>
void slot_wsum(const T* slots, int64_t sstride, const T* w, T* out, int64_t S, int64_t B, int64_t n, int nt) {
  constexpr int CH = 4 * VL<T>;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    const T* wb = w + b * S;
    const T* row = slots + b * n;
    T* o = out + b * n;
    int64_t i = 0;
    for (; i + CH <= n; i += CH) {
      T acc[CH];
      const T w0 = wb[0];
#pragma omp simd
      for (int k = 0; k < CH; ++k) acc[k] = w0 * row[i + k];
      for (int64_t s = 1; s < S; ++s) {
        const T* ps = row + s * sstride + i;
        const T ws = wb[s];
#pragma omp simd
        for (int k = 0; k < CH; ++k) acc[k] += ws * ps[k];
      }
#pragma omp simd
      for (int k = 0; k < CH; ++k) o[i + k] = acc[k];
    }
    for (; i < n; ++i) {
      T a = wb[0] * row[i];
      for (int64_t s = 1; s < S; ++s) a += wb[s] * row[s * sstride + i];
      o[i] = a;
    }
  }
}

// K slots' dot products with one gradient row, in vector lanes that stay in registers; the lanes and
// the remainder are added in double at the end
template <typename T, int K>
inline void slot_dots_block(const T* g, const T* p, int64_t sstride, int64_t n, T* out) {
  constexpr int L = VL<T>;
  T acc[K][L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int q = 0; q < K; ++q) {
      const T* ps = p + q * sstride + i;
#pragma omp simd
      for (int k = 0; k < L; ++k) acc[q][k] += g[i + k] * ps[k];
    }
  }
  for (int q = 0; q < K; ++q) {
    double t = lane_total(acc[q]);
    for (int64_t j = i; j < n; ++j) t += (double)g[j] * (double)p[q * sstride + j];
    out[q] = (T)t;
  }
}

// dots[b * S + s] = <g[b, :], slot_s[b, :]>, four slots per read of the gradient row
template <typename T>
void slot_dots(const T* slots, int64_t sstride, const T* g, T* dots, int64_t S, int64_t B, int64_t n, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    const T* gb = g + b * n;
    const T* row = slots + b * n;
    T* d = dots + b * S;
    int64_t s = 0;
    for (; s + 4 <= S; s += 4) slot_dots_block<T, 4>(gb, row + s * sstride, sstride, n, d + s);
    switch (S - s) {
      case 3: slot_dots_block<T, 3>(gb, row + s * sstride, sstride, n, d + s); break;
      case 2: slot_dots_block<T, 2>(gb, row + s * sstride, sstride, n, d + s); break;
      case 1: slot_dots_block<T, 1>(gb, row + s * sstride, sstride, n, d + s); break;
      default: break;
    }
  }
}

// 5. ---- MRLA-B's attention weights ----------------------------------------------------------------------
// From layer t's pooled descriptor g [B, C] (C = H heads of d channels): q = conv1d(g, wq) and
// k = conv1d(g, wk) along the channel axis (ks taps, zero padding), then for every (sample, head)
// A[b, h, :] = softmax(scale * <q_h, K_s,h>) over the P earlier layers' keys K_0..K_{P-1} ([B, C] each,
// given by pointer) and k. The tensors are tiny; as some twenty PyTorch ops and their autograd nodes per
// layer this cost 0.3-2 ms (most of it the fixed cost of torch.bmm on 1 x d x t matrices), here a few
// microseconds. One thread: nothing here is worth a team's start-up.

// out[b, c] = sum_j w[j] in[b, c + j - pad] for two weights at once (a and b, into oa and ob): per tap,
// one loop over the channels in which the padding is never touched, so that it vectorises; every element
// still adds its taps in order j = 0, 1, ...
template <typename T>
void conv_taps(const T* in, const T* wa, const T* wb, T* oa, T* ob, int64_t B, int64_t C, int64_t ks) {
  const int64_t pad = (ks - 1) / 2;
  std::fill(oa, oa + B * C, T(0));
  std::fill(ob, ob + B * C, T(0));
  for (int64_t r = 0; r < B; ++r) {
    const T* x = in + r * C;
    T* pa = oa + r * C;
    T* pb = ob + r * C;
    for (int64_t j = 0; j < ks; ++j) {
      const T a = wa[j], b = wb[j];
      const int64_t lo = std::max<int64_t>(0, pad - j), hi = std::min<int64_t>(C, C + pad - j);
      const T* xs = x + j - pad;
#pragma omp simd
      for (int64_t c = lo; c < hi; ++c) {
        pa[c] += a * xs[c];
        pb[c] += b * xs[c];
      }
    }
  }
}

// The transpose of conv_taps for the two weights' outputs' gradients da and db ([B, C]): din[b, m] gets
// wa[j] da[b, m - j + pad] + wb[j] db[b, m - j + pad] (per tap, a loop over the channels it reaches),
// and wa[j] gets sum_{b, c} da[b, c] in[b, c + j - pad] (summed in double), wb[j] likewise
template <typename T>
void conv_taps_backward(const T* in, const T* wa, const T* wb, const T* da, const T* db, T* din, T* dwa, T* dwb,
                        int64_t B, int64_t C, int64_t ks) {
  const int64_t pad = (ks - 1) / 2;
  std::fill(din, din + B * C, T(0));
  std::vector<double> sa(ks, 0.0), sb(ks, 0.0);
  for (int64_t r = 0; r < B; ++r) {
    const T* x = in + r * C;
    const T* dar = da + r * C;
    const T* dbr = db + r * C;
    T* dx = din + r * C;
    for (int64_t j = 0; j < ks; ++j) {
      const T a = wa[j], b = wb[j];
      const int64_t lo = std::max<int64_t>(0, pad - j), hi = std::min<int64_t>(C, C + pad - j);
      const T* xs = x + j - pad;
      T* dxs = dx + j - pad;
      double acc_a = 0, acc_b = 0;
#pragma omp simd reduction(+ : acc_a, acc_b)
      for (int64_t c = lo; c < hi; ++c) {
        dxs[c] += a * dar[c] + b * dbr[c];
        acc_a += (double)dar[c] * (double)xs[c];
        acc_b += (double)dbr[c] * (double)xs[c];
      }
      sa[j] += acc_a;
      sb[j] += acc_b;
    }
  }
  for (int64_t j = 0; j < ks; ++j) {
    dwa[j] = (T)sa[j];
    dwb[j] = (T)sb[j];
  }
}

// The key of slot s (s < P: an earlier layer's, s == P: this layer's k)
template <typename T>
inline const T* key_of(const T* const* keys, const T* k, int64_t P, int64_t s) {
  return s < P ? keys[s] : k;
}

// <a, b> over one head's d channels (attention logits and the gate)
template <typename T>
inline T head_dot(const T* a, const T* b, int64_t d) {
  T dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < d; ++i) dot += a[i] * b[i];
  return dot;
}

// q, k ([B, C]) and attn ([B, H, P + 1])
template <typename T>
void attn_weights_fwd(const T* g, const T* wq, const T* wk, const T* const* keys, T* q, T* k, T* attn,
                      int64_t B, int64_t C, int64_t H, int64_t ks, int64_t P, double scale) {
  const int64_t d = C / H, S = P + 1;
  conv_taps(g, wq, wk, q, k, B, C, ks);
  std::vector<double> logit(S);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t off = b * C + h * d;
      const T* qh = q + off;
      double top = -std::numeric_limits<double>::infinity();
      for (int64_t s = 0; s < S; ++s) {
        logit[s] = (double)head_dot(qh, key_of(keys, k, P, s) + off, d) * scale;
        top = std::max(top, logit[s]);
      }
      double total = 0;
      for (int64_t s = 0; s < S; ++s) total += (logit[s] = std::exp(logit[s] - top));
      T* a = attn + (b * H + h) * S;
      for (int64_t s = 0; s < S; ++s) a[s] = (T)(logit[s] / total);
    }
  }
}

// Backward of attn_weights_fwd from dattn ([B, H, P + 1]) and dk_in (the gradient k got from later
// layers, [B, C]; nullptr: none): dg ([B, C]), dwq and dwk ([ks], summed in double) and the earlier
// keys' gradients dkeys ([P, B, C]). With the logits' gradient dl = A * (dA - <A, dA>) * scale:
// dq = sum_s dl_s K_s, dK_s = dl_s q, dk = dk_in + dl_P q; then the conv's transposes.
template <typename T>
void attn_weights_bwd(const T* g, const T* wq, const T* wk, const T* const* keys, const T* q, const T* k,
                      const T* attn, const T* dattn, const T* dk_in, T* dg, T* dwq, T* dwk, T* dkeys, int64_t B,
                      int64_t C, int64_t H, int64_t ks, int64_t P, double scale) {
  const int64_t d = C / H, S = P + 1;
  std::vector<T> dq(B * C, T(0)), dk(B * C), dl(S);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t off = b * C + h * d, row = (b * H + h) * S;
      double r = 0;
      for (int64_t s = 0; s < S; ++s) r += (double)attn[row + s] * (double)dattn[row + s];
      for (int64_t s = 0; s < S; ++s) dl[s] = (T)((double)attn[row + s] * ((double)dattn[row + s] - r) * scale);
      const T* qh = q + off;
      T* dqh = dq.data() + off;
      for (int64_t s = 0; s < S; ++s) {
        const T* kh = key_of(keys, k, P, s) + off;
        const T w = dl[s];
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) dqh[i] += w * kh[i];
      }
      T* dkh = dk.data() + off;
      const T wk_own = dl[P];
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) dkh[i] = (dk_in ? dk_in[off + i] : T(0)) + wk_own * qh[i];
      for (int64_t s = 0; s < P; ++s) {
        T* out = dkeys + s * B * C + off;
        const T w = dl[s];
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) out[i] = w * qh[i];
      }
    }
  }
  conv_taps_backward(g, wq, wk, dq.data(), dk.data(), dg, dwq, dwk, B, C, ks);
}

// MRLA-L's gate: gate[b, h] = sigmoid(scale * <q_h, k_h>) with q and k as above ([B, H]); its backward
// recomputes q and k: with s = dgate * gate * (1 - gate) * scale, dq = s k and dk = s q, then the conv's
// transposes
template <typename T>
void light_gate_fwd(const T* g, const T* wq, const T* wk, T* gate, int64_t B, int64_t C, int64_t H, int64_t ks,
                    double scale) {
  const int64_t d = C / H;
  std::vector<T> q(B * C), k(B * C);
  conv_taps(g, wq, wk, q.data(), k.data(), B, C, ks);
  for (int64_t r = 0; r < B * H; ++r) {
    const T dot = head_dot(q.data() + r * d, k.data() + r * d, d);
    gate[r] = (T)(1.0 / (1.0 + std::exp(-(double)dot * scale)));
  }
}

template <typename T>
void light_gate_bwd(const T* g, const T* wq, const T* wk, const T* gate, const T* dgate, T* dg, T* dwq, T* dwk,
                    int64_t B, int64_t C, int64_t H, int64_t ks, double scale) {
  const int64_t d = C / H;
  std::vector<T> q(B * C), k(B * C), dq(B * C), dk(B * C);
  conv_taps(g, wq, wk, q.data(), k.data(), B, C, ks);
  for (int64_t r = 0; r < B * H; ++r) {
    const T s = (T)((double)dgate[r] * (double)gate[r] * (1.0 - (double)gate[r]) * scale);
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      dq[r * d + i] = s * k[r * d + i];
      dk[r * d + i] = s * q[r * d + i];
    }
  }
  conv_taps_backward(g, wq, wk, dq.data(), dk.data(), dg, dwq, dwk, B, C, ks);
}

}  // namespace

// Calls f(std::true_type) or f(std::false_type): runtime flags to template parameters.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}
#define ELA_FLAG(x) decltype(x)::value

// Calls f with the plane width as a compile-time constant for the common widths (the plane loops then
// have known trip counts and no remainders), 0 (read at run time) for the rest.
template <typename F>
void with_width(int64_t W, F&& f) {
  switch (W) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    default: f(std::integral_constant<int, 0>{});
  }
}

// C entry points: ela_<kernel>_<f32|f64>. sc == nullptr selects the MRLA-B form (no shortcut term).
#define ELA_DEFINE(T, SUF)                                                                                     \
  extern "C" void ela_stats_##SUF(const T* v, const T* sc, const T* a, const T* l, int64_t N, int64_t C,       \
                                  int64_t HW, double* mean, double* var, int nt) {                           \
    with_flag(sc, [&](auto hs) { stats<T, ELA_FLAG(hs)>(v, sc, a, l, N, C, HW, mean, var, nt); });            \
  }                                                                                                           \
  extern "C" void ela_apply_##SUF(const T* v, const T* sc, const T* y, const T* A, const T* B, const T* S,     \
                                  const T* ctr, T* out, int64_t N, int64_t C, int64_t HW, int relu, int nt) { \
    with_flag(sc, [&](auto hs) {                                                                              \
      with_flag(relu, [&](auto r) {                                                                           \
        with_flag(y, [&](auto hy) {                                                                           \
          apply<T, ELA_FLAG(hs), ELA_FLAG(r), ELA_FLAG(hy)>(v, sc, y, A, B, S, ctr, out, N, C, HW, nt);       \
        });                                                                                                   \
      });                                                                                                     \
    });                                                                                                       \
  }                                                                                                           \
  extern "C" void ela_bwd_reduce_##SUF(const T* g, const T* v, const T* sc, const T* a, const T* l,           \
                                       const T* mean, const T* invstd, const T* A, const T* B, const T* S,     \
                                       const T* ctr, int64_t N, int64_t C, int64_t HW, double* sum_g,         \
                                       double* sum_gx,                                                        \
                                       int relu, int nt) {                                                    \
    with_flag(sc, [&](auto hs) {                                                                              \
      with_flag(relu, [&](auto r) {                                                                           \
        bwd_reduce<T, ELA_FLAG(hs), ELA_FLAG(r)>(g, v, sc, a, l, mean, invstd, A, B, S, ctr, N, C, HW,       \
                                                 sum_g, sum_gx, nt);                                          \
      });                                                                                                     \
    });                                                                                                       \
  }                                                                                                           \
  extern "C" void ela_bwd_apply_##SUF(const T* g, const T* v, const T* sc, const T* a, const T* l,            \
                                      const T* mean, const T* invstd, const T* A, const T* B, const T* S,      \
                                      const T* ctr, const T* k, const T* mg, const T* mgx, T* gv, T* gsc,      \
                                      double* dv,                                                              \
                                      double* dsc, int64_t N, int64_t C, int64_t HW, int relu, int nt) {       \
    with_flag(sc, [&](auto hs) {                                                                              \
      with_flag(relu, [&](auto r) {                                                                           \
        with_flag(dv, [&](auto hd) {                                                                          \
          bwd_apply<T, ELA_FLAG(hs), ELA_FLAG(r), ELA_FLAG(hd)>(g, v, sc, a, l, mean, invstd, A, B, S, ctr, k, \
                                                               mg, mgx, gv, gsc, dv, dsc, N, C, HW, nt);      \
        });                                                                                                   \
      });                                                                                                     \
    });                                                                                                       \
  }

#define ELA_DEFINE_DW(T, SUF)                                                                                  \
  extern "C" void ela_dw_forward_##SUF(const T* pre, const T* sc, T* in, const T* w, T* out, double* plane_mean, \
                                       int64_t N, int64_t C, int64_t H, int64_t W, int nt) {                  \
    with_width(W, [&](auto wc) { dw_forward<T, ELA_FLAG(wc)>(pre, sc, in, w, out, plane_mean, N, C, H, W, nt); }); \
  }                                                                                                           \
  extern "C" void ela_dw_backward_##SUF(const T* g, const T* in, const T* w, const T* gin_add,                 \
                                        const T* gin_res, T* gin, double* gw, int64_t N, int64_t C, int64_t H, \
                                        int64_t W, int pre, int nt) {                                         \
    with_width(W, [&](auto wc) {                                                                              \
      with_flag(pre, [&](auto pr) {                                                                           \
        dw_backward<T, ELA_FLAG(wc), ELA_FLAG(pr)>(g, in, w, gin_add, gin_res, gin, gw, N, C, H, W, nt);      \
      });                                                                                                     \
    });                                                                                                       \
  }

#define ELA_DEFINE_LIGHT(T, SUF)                                                                               \
  extern "C" void ela_light_fwd_moments_##SUF(const T* pre, T* y, const T* sc, const T* w, double* mom,       \
                                              int64_t N, int64_t C, int64_t H, int64_t W, int full, int nt) { \
    with_width(W, [&](auto wc) {                                                                              \
      light_fwd_moments<T, ELA_FLAG(wc)>(pre, y, sc, w, mom, N, C, H, W, full != 0, nt);                      \
    });                                                                                                       \
  }                                                                                                           \
  extern "C" void ela_light_fwd_apply_##SUF(const T* y, const T* sc, const T* w, const T* A, const T* B,       \
                                            const T* S, T* out, int64_t N, int64_t C, int64_t H, int64_t W,    \
                                            int nt) {                                                         \
    with_width(W, [&](auto wc) { light_fwd_apply<T, ELA_FLAG(wc)>(y, sc, w, A, B, S, out, N, C, H, W, nt); }); \
  }                                                                                                           \
  extern "C" void ela_light_bwd_reduce_##SUF(const T* g, const T* y, const T* sc, const T* w, double* red,     \
                                             int64_t N, int64_t C, int64_t H, int64_t W, int nt) {            \
    with_width(W, [&](auto wc) { light_bwd_reduce<T, ELA_FLAG(wc)>(g, y, sc, w, red, N, C, H, W, nt); });     \
  }                                                                                                           \
  extern "C" void ela_light_bwd_apply_##SUF(const T* g, const T* y, const T* sc, const T* w, const T* al,      \
                                            const T* be, const T* de, const T* ep, const T* a, const T* l,     \
                                            const T* gy_add, T* gy, T* gsc, double* gw, int64_t N, int64_t C,  \
                                            int64_t H, int64_t W, int pre, int nt) {                          \
    with_width(W, [&](auto wc) {                                                                              \
      with_flag(pre, [&](auto pr) {                                                                           \
        light_bwd_apply<T, ELA_FLAG(wc), ELA_FLAG(pr)>(g, y, sc, w, al, be, de, ep, a, l, gy_add, gy, gsc, gw, \
                                                      N, C, H, W, nt);                                        \
      });                                                                                                     \
    });                                                                                                       \
  }

#define ELA_DEFINE_SLOTS(T, SUF)                                                                               \
  extern "C" void ela_slot_wsum_##SUF(const T* slots, int64_t sstride, const T* w, T* out, int64_t S, int64_t B, \
                                      int64_t n, int nt) {                                                    \
    slot_wsum<T>(slots, sstride, w, out, S, B, n, nt);                                                        \
  }                                                                                                           \
  extern "C" void ela_slot_dots_##SUF(const T* slots, int64_t sstride, const T* g, T* dots, int64_t S,         \
                                      int64_t B, int64_t n, int nt) {                                         \
    slot_dots<T>(slots, sstride, g, dots, S, B, n, nt);                                                       \
  }

#define ELA_DEFINE_ATTN(T, SUF)                                                                                \
  extern "C" void ela_attn_weights_fwd_##SUF(const T* g, const T* wq, const T* wk, const T* const* keys, T* q,  \
                                             T* k, T* attn, int64_t B, int64_t C, int64_t H, int64_t ks,       \
                                             int64_t P, double scale) {                                        \
    attn_weights_fwd<T>(g, wq, wk, keys, q, k, attn, B, C, H, ks, P, scale);                                   \
  }                                                                                                           \
  extern "C" void ela_attn_weights_bwd_##SUF(const T* g, const T* wq, const T* wk, const T* const* keys,        \
                                             const T* q, const T* k, const T* attn, const T* dattn,            \
                                             const T* dk_in, T* dg, T* dwq, T* dwk, T* dkeys, int64_t B,       \
                                             int64_t C, int64_t H, int64_t ks, int64_t P, double scale) {      \
    attn_weights_bwd<T>(g, wq, wk, keys, q, k, attn, dattn, dk_in, dg, dwq, dwk, dkeys, B, C, H, ks, P, scale); \
  }                                                                                                           \
  extern "C" void ela_light_gate_fwd_##SUF(const T* g, const T* wq, const T* wk, T* gate, int64_t B, int64_t C,  \
                                           int64_t H, int64_t ks, double scale) {                              \
    light_gate_fwd<T>(g, wq, wk, gate, B, C, H, ks, scale);                                                    \
  }                                                                                                           \
  extern "C" void ela_light_gate_bwd_##SUF(const T* g, const T* wq, const T* wk, const T* gate, const T* dgate,  \
                                           T* dg, T* dwq, T* dwk, int64_t B, int64_t C, int64_t H, int64_t ks, \
                                           double scale) {                                                     \
    light_gate_bwd<T>(g, wq, wk, gate, dgate, dg, dwq, dwk, B, C, H, ks, scale);                               \
  }

ELA_DEFINE(float, f32)
ELA_DEFINE(double, f64)
ELA_DEFINE_SLOTS(float, f32)
ELA_DEFINE_SLOTS(double, f64)
ELA_DEFINE_ATTN(float, f32)
ELA_DEFINE_ATTN(double, f64)
ELA_DEFINE_DW(float, f32)
ELA_DEFINE_DW(double, f64)
ELA_DEFINE_LIGHT(float, f32)
ELA_DEFINE_LIGHT(double, f64)

// What this build was compiled with, for diagnostics and tests: bit 0 the AVX-512 row path (2b), bit 1
// fused multiply-add instructions, bit 2 OpenMP
extern "C" int ela_features() {
  int f = kRowPath ? 1 : 0;
#if defined(__FMA__) || defined(__aarch64__)
  f |= 2;
#endif
#if defined(_OPENMP)
  f |= 4;
#endif
  return f;
}
