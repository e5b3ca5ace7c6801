// The logistic log-likelihood and its gradient in one pass over the data (cmcflow.fused:
// built per CPU type on first use, called from JAX through the XLA FFI).
//
// Three precisions, as the workflow's jax.precision, each a pair of handlers: mixed (Logistic,
// LogisticValues: data float32, coefficients and results float64), float32 (…F32: all float32)
// and float64 (…F64: all float64). Below, F is the data's type and C the coefficients'.
// Logistic: inputs XT F, y, offset F (R), mask bool (R), coef C (P + 1: beta, then the
// intercept). XT holds the features one row per feature, (P, R), or in tiles
// (R_t, P, T): tile t the rows [t T, t T + T) of every feature, feature after feature, the last
// one zero-padded (cmcflow.fused.feature_tiles: 512 bytes of each feature, a step with
// AVX-512), so that a step's rows of all P features are one stretch of memory. Outputs:
// value C () = sum_j mask_j (y_j eta_j - softplus(eta_j)) and its gradient C (P + 1),
// eta = beta . XT + intercept + offset.
// LogisticValues: the same data and coefs C (B, P + 1), B sets of coefficients; output the
// B values C (B): each step of rows is read from memory once for all B of them.
// Per-row arithmetic, and sums over at most 512 rows, in F; the sums of those sums in float64
// (in every precision: float32's too). exp and log1p are polynomials inline in the loops over
// rows (ExpNonpositive, Log1pUnit), within a few ulp of F.
// The rows are cut into chunks of kChunk rows, taken one at a time from a shared counter by
// the calling thread and by helpers scheduled on XLA's own intra-op thread pool (no thread
// started per call; a pool busy with other devices' calls only means fewer helpers, never
// a wait on a task that has not started). Each chunk is read in steps of kStep rows: a
// step's eta summed in vector registers over the P feature rows, then its residuals, then
// XT r from the same rows while they are still in the L1 cache, so XT is read from memory
// once and eta is never stored between features. A step never crosses a tile: (P, R) is one
// tile of R rows, and tiles of T rows have T a multiple of kStep. The chunks' partial sums
// are added in chunk order: the result does not depend on which thread took which chunk.
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;

constexpr int64_t kChunk = 16384;
// bytes of a vector register (AVX-512's, else AVX2's), and of a feature's rows in a step, whose
// eta stay in 8 vector registers (of AVX-512's 32, AVX2's 16); kStep<F> rows
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#else
constexpr int kVectorBytes = 32;
#endif
constexpr int64_t kStepBytes = 8 * kVectorBytes;
template <typename F>
constexpr int64_t kStep = kStepBytes / sizeof(F);
// the gradient asks for the rows this far ahead of its step into L2 (prefetcht2) as it reads each
// feature row, so that memory streams the next steps while this one computes its exp and log.
// float: every line in the eta pass, so that all are in flight before the step's exp and log
// (twice double's rows a step); double: half in the eta pass, half in the XT r pass. Each the
// faster of the two in its precision (the gradient at 10^6 rows on AMD EPYC, AVX-512: float's
// choice 5-10% faster than the split, double's 3% faster than all in the eta pass).
constexpr int64_t kAheadSteps = 4;
template <typename F>
constexpr int kAheadPasses = sizeof(F) == 4 ? 1 : 2;
constexpr int64_t kFlush = 512;  // rows a gradient lane sums in F before the float64 sum

// one vector register of F, L lanes (a vector type wider than the registers spills: with AVX2,
// 64-byte vectors made the gradient 1.6x slower, float64 and mixed)
template <typename F>
struct Lanes {
  typedef F V __attribute__((vector_size(kVectorBytes)));
  static constexpr int L = kVectorBytes / sizeof(F);
  static inline V Load(const F* p) { V v; __builtin_memcpy(&v, p, sizeof v); return v; }
  static inline void Store(F* p, V v) { __builtin_memcpy(p, &v, sizeof v); }
  static inline double Sum(V v) { double s = 0.0; for (int k = 0; k < L; ++k) s += v[k]; return s; }
};

// feature p of row j in XT laid out in tiles of T rows
template <typename F>
static inline const F* RowAt(const F* xt, int64_t P, int64_t T, int64_t p, int64_t j) {
  return xt + (j / T) * P * T + p * T + j % T;
}

// ask for the 64-byte lines of feature p's kStep rows from j on into L2: pass 0 of
// kAheadPasses<F> (the eta pass) every kAheadPasses<F>-th line from the first, pass 1 (the XT r
// pass) from the second
template <typename F>
static inline void Ahead(const F* xt, int64_t P, int64_t T, int64_t p, int64_t j, int pass) {
  const F* later = RowAt(xt, P, T, p, j);
  constexpr int line = 64 / sizeof(F);
#pragma GCC unroll 16
  for (int64_t k = pass; k < kStep<F> / line; k += kAheadPasses<F>) __builtin_prefetch(later + line * k, 0, 1);
}

// eta of rows [j0, j0 + n), n <= kStep (n == kStep when kFull), into eta; kPrefetch: ask for
// the eta pass's lines (Ahead) of the feature rows kAheadSteps steps on (within XT) as each is read
template <bool kFull, bool kPrefetch, typename F, typename C>
static inline void Eta(const F* xt, const F* off, const C* coef, int64_t P, int64_t R, int64_t T, int64_t j0,
                       int64_t n, F* eta) {
  using W = Lanes<F>;
  const F b0 = (F)coef[P];
  if (kFull) {
    constexpr int NV = kStep<F> / W::L;  // vectors per step
    constexpr int64_t ahead_rows = kAheadSteps * kStep<F>;
    const bool ahead = kPrefetch && j0 + ahead_rows + kStep<F> <= R;
    typename W::V e[NV];
#pragma GCC unroll 16
    for (int k = 0; k < NV; ++k) e[k] = W::Load(off + j0 + W::L * k) + b0;
    for (int64_t p = 0; p < P; ++p) {
      const F* row = RowAt(xt, P, T, p, j0);
      const F bp = (F)coef[p];
      if (ahead) Ahead(xt, P, T, p, j0 + ahead_rows, 0);
#pragma GCC unroll 16
      for (int k = 0; k < NV; ++k) e[k] += bp * W::Load(row + W::L * k);
    }
#pragma GCC unroll 16
    for (int k = 0; k < NV; ++k) W::Store(eta + W::L * k, e[k]);
  } else {
    for (int64_t j = 0; j < n; ++j) eta[j] = b0 + off[j0 + j];
    for (int64_t p = 0; p < P; ++p) {
      const F* row = RowAt(xt, P, T, p, j0);
      const F bp = (F)coef[p];
      for (int64_t j = 0; j < n; ++j) eta[j] += bp * row[j];
    }
  }
}

// exp(x) for x <= 0, inline so that it vectorises with the loop around it (a libmvec call does
// not): Cody and Waite's reduction x = n ln 2 + r, |r| <= ln 2 / 2, a polynomial for e^r, times
// 2^n. float: Cephes' expf polynomial, x clamped at -87 (e^-87 = 1.6e-38, the smallest normal
// float's order); relative error below 3e-7 (2.5 float32 epsilons) on [-87, 0] against float64.
static inline float ExpNonpositive(float x) {
  x = std::fmax(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n >= -126
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// double: fdlibm's split of ln 2, e^r's Taylor polynomial of degree 13 (truncation below
// |r|^14 / 14! = 4e-18), x clamped at -708 (e^-708 = 3.3e-308, the smallest normal double's
// order); relative error below 2e-16 (one float64 epsilon) on [-708, 0] against long double.
static inline double ExpNonpositive(double x) {
  x = std::fmax(x, -708.0);
  const double n = std::nearbyint(x * 1.4426950408889634);
  // fused multiply-adds, which -ffast-math does not reassociate into one product by a rounded ln 2
  const double r = std::fma(-n, 1.90821492927058770002e-10, std::fma(-n, 6.93147180369123816490e-01, x));
  double p = 1.0 / 6227020800.0;  // 1 / 13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r * r + r + 1.0;
  // 2^n, n >= -1022, n through int32: AVX2 has no vector conversion of doubles to int64
  const int64_t bits = (static_cast<int64_t>(static_cast<int32_t>(n)) + 1023) << 52;
  double scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// log(1 + t) for 0 <= t <= 1 (softplus' only range: t = exp(-|eta|)). float: t q(t), q of
// degree 9 the least-squares fit to log(1 + t) / t on [0, 1] in Chebyshev polynomials; relative
// error below 2e-7 against float64, so also where t is far below float32's epsilon
// (log(1.0f + t) is 0).
static inline float Log1pUnit(float t) {
  float q = -0.0032140363621216018f;
  q = q * t + 0.019649167341639788f;
  q = q * t - 0.056435029537139206f;
  q = q * t + 0.105332283208215f;
  q = q * t - 0.15251451251430537f;
  q = q * t + 0.196514917316016f;
  q = q * t - 0.24947808763796736f;
  q = q * t + 0.33329099047603317f;
  q = q * t - 0.499998508034556f;
  q = q * t + 0.9999999869643136f;
  return t * q;
}

// double: 1 + t = 2^k (1 + f), k = 0 or 1, f in [sqrt(2)/2 - 1, sqrt(2) - 1] computed without
// rounding 1 + t (so tiny t keep their accuracy), then fdlibm's log(1 + f) = f - f^2/2 +
// s (f^2/2 + R(s^2)), s = f / (2 + f); relative error below 3e-16 against long double.
static inline double Log1pUnit(double t) {
  const bool k = t > 0.41421356237309503;
  const double f = k ? (t - 1.0) * 0.5 : t;
  const double s = f / (2.0 + f), z = s * s, w = z * z;
  const double odd = w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01));
  const double even = z * (6.666666666666735130e-01 +
                           w * (2.857142874366239149e-01 + w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)));
  const double half_square = 0.5 * f * f;
  return (k ? 0.6931471805599453 : 0.0) + (f - (half_square - s * (half_square + odd + even)));
}

// y eta - softplus(eta), softplus(eta) = max(eta, 0) + log(1 + t), t = exp(-|eta|)
template <typename F>
static inline F LogLikelihood(F yy, F e, F t) { return yy * e - (std::fmax(e, F(0)) + Log1pUnit(t)); }

// value of rows [j0, j0 + n), n <= kStep, at one set of coefficients, summed in F
template <bool kFull, typename F, typename C>
static inline F StepValue(const F* xt, const F* y, const F* off, const uint8_t* mask, const C* coef, int64_t P,
                          int64_t R, int64_t T, int64_t j0, int64_t n) {
  alignas(64) F eta[kStep<F>];
  Eta<kFull, false>(xt, off, coef, P, R, T, j0, n, eta);
  F v = 0;
#pragma omp simd reduction(+ : v)
  for (int64_t j = 0; j < n; ++j) {
    const F e = eta[j], m = static_cast<F>(mask[j0 + j]);
    v += m * LogLikelihood(y[j0 + j], e, ExpNonpositive(-std::fabs(e)));
  }
  return v;
}

// value and gradient of rows [j0, j0 + n), n <= kStep, added to val, gi and gv (kFull) or g
template <bool kFull, typename F, typename C>
static inline void Step(const F* xt, const F* y, const F* off, const uint8_t* mask, const C* coef, int64_t P,
                        int64_t R, int64_t T, int64_t j0, int64_t n, double& val, double& gi,
                        typename Lanes<F>::V* gv, double* g) {
  using W = Lanes<F>;
  alignas(64) F eta[kStep<F>], r[kStep<F>];
  Eta<kFull, true>(xt, off, coef, P, R, T, j0, n, eta);
  F v = 0, s0 = 0;
#pragma omp simd reduction(+ : v, s0)
  for (int64_t j = 0; j < n; ++j) {
    const F e = eta[j], t = ExpNonpositive(-std::fabs(e));
    const F s = (e >= F(0) ? F(1) : t) / (F(1) + t);  // sigma(eta)
    const F m = static_cast<F>(mask[j0 + j]), yy = y[j0 + j];
    v += m * LogLikelihood(yy, e, t);
    const F rj = m * (yy - s);
    r[j] = rj;
    s0 += rj;
  }
  val += v;
  gi += s0;
  if (kFull) {
    constexpr int NV = kStep<F> / W::L;
    typename W::V rr[NV];
#pragma GCC unroll 16
    for (int k = 0; k < NV; ++k) rr[k] = W::Load(r + W::L * k);
    const bool ahead = kAheadPasses<F> == 2 && j0 + (kAheadSteps + 1) * kStep<F> <= R;
    for (int64_t p = 0; p < P; ++p) {
      const F* row = RowAt(xt, P, T, p, j0);
      if (ahead) Ahead(xt, P, T, p, j0 + kAheadSteps * kStep<F>, 1);
      typename W::V acc = rr[0] * W::Load(row);
#pragma GCC unroll 16
      for (int k = 1; k < NV; ++k) acc += rr[k] * W::Load(row + W::L * k);
      gv[p] += acc;
    }
  } else {
    for (int64_t p = 0; p < P; ++p) {
      const F* row = RowAt(xt, P, T, p, j0);
      F acc = 0;
      for (int64_t j = 0; j < n; ++j) acc += row[j] * r[j];
      g[p] += acc;
    }
  }
}

template <typename F, typename C>
static void Rows(const F* xt, const F* y, const F* off, const uint8_t* mask, const C* coef, int64_t P, int64_t R,
                 int64_t T, int64_t lo, int64_t hi, double* value, double* grad) {
  using W = Lanes<F>;
  constexpr int64_t step = kStep<F>;
  double val = 0.0, gi = 0.0;
  std::vector<double> g(P, 0.0);
  std::vector<typename W::V> gv(P);
  int64_t j0 = lo;
  while (j0 + step <= hi) {
    // F lanes over kFlush rows at most, then into the float64 sums
    const int64_t stop = std::min(hi - step + 1, j0 + kFlush);
    for (int64_t p = 0; p < P; ++p) gv[p] = typename W::V{};
    for (; j0 < stop; j0 += step) Step<true>(xt, y, off, mask, coef, P, R, T, j0, step, val, gi, gv.data(), nullptr);
    for (int64_t p = 0; p < P; ++p) g[p] += W::Sum(gv[p]);
  }
  if (j0 < hi) Step<false>(xt, y, off, mask, coef, P, R, T, j0, hi - j0, val, gi, nullptr, g.data());
  *value = val;
  for (int64_t p = 0; p < P; ++p) grad[p] = g[p];
  grad[P] = gi;
}

// values of rows [lo, hi) at the B sets of coefficients coefs (B, P + 1): values (B)
template <typename F, typename C>
static void RowValues(const F* xt, const F* y, const F* off, const uint8_t* mask, const C* coefs, int64_t B,
                      int64_t P, int64_t R, int64_t T, int64_t lo, int64_t hi, double* values) {
  constexpr int64_t step = kStep<F>;
  for (int64_t b = 0; b < B; ++b) values[b] = 0.0;
  int64_t j0 = lo;
  for (; j0 + step <= hi; j0 += step)
    for (int64_t b = 0; b < B; ++b)
      values[b] += StepValue<true>(xt, y, off, mask, coefs + b * (P + 1), P, R, T, j0, step);
  if (j0 < hi)
    for (int64_t b = 0; b < B; ++b)
      values[b] += StepValue<false>(xt, y, off, mask, coefs + b * (P + 1), P, R, T, j0, hi - j0);
}

namespace {
// One call's rows and the chunks' partial sums; shared with the helpers, which may start
// after the call has returned (and then find no chunk left). B sets of coefficients with
// values only, or (B = 1) one with the gradient too.
template <typename F, typename C>
struct Chunks {
  const F *xt, *y, *off;
  const uint8_t* mask;
  const C* coef;
  int64_t B, P, R, T, count;
  bool gradient;
  std::vector<double> values, grads;  // (count, B), (count, P + 1)
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mutex;
  std::condition_variable finished;

  void Take() {
    for (int64_t c; (c = next.fetch_add(1)) < count;) {
      const int64_t lo = c * kChunk, hi = std::min(R, lo + kChunk);
      if (gradient)
        Rows(xt, y, off, mask, coef, P, R, T, lo, hi, &values[c], &grads[c * (P + 1)]);
      else
        RowValues(xt, y, off, mask, coef, B, P, R, T, lo, hi, &values[c * B]);
      if (done.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }
};

// P, R and the tile's rows T of XT (P, R) or (R_t, P, T), T a multiple of the step's rows, beside
// R rows of y; an error where the shapes do not fit together
ffi::Error Shape(ffi::Span<const int64_t> dims, int64_t rows, int64_t step, int64_t& P, int64_t& R, int64_t& T) {
  R = rows;
  if (dims.size() == 2 && dims[1] == R) {
    P = dims[0];
    T = std::max<int64_t>(R, 1);
    return ffi::Error::Success();
  }
  if (dims.size() == 3 && dims[2] % step == 0 && dims[0] * dims[2] >= R && (dims[0] - 1) * dims[2] < R) {
    P = dims[1];
    T = dims[2];
    return ffi::Error::Success();
  }
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    "XT must be (P, R) or tiles (R_t, P, T) of R rows, T a multiple of " + std::to_string(step));
}

// the chunks taken by this thread and helpers on the pool, until all are done
template <typename F, typename C>
std::shared_ptr<Chunks<F, C>> Run(ffi::ThreadPool& pool, const F* xt, const F* y, const F* off, const bool* mask,
                                  const C* coef, int64_t B, int64_t P, int64_t R, int64_t T, bool gradient) {
  auto chunks = std::make_shared<Chunks<F, C>>();
  chunks->xt = xt;
  chunks->y = y;
  chunks->off = off;
  chunks->mask = reinterpret_cast<const uint8_t*>(mask);  // bool: one byte, 0 or 1
  chunks->coef = coef;
  chunks->B = B;
  chunks->P = P;
  chunks->R = R;
  chunks->T = T;
  chunks->gradient = gradient;
  chunks->count = (R + kChunk - 1) / kChunk;
  chunks->values.assign(chunks->count * B, 0.0);
  if (gradient) chunks->grads.assign(chunks->count * (P + 1), 0.0);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks->count) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([chunks] { chunks->Take(); });
  chunks->Take();
  {
    std::unique_lock<std::mutex> lock(chunks->mutex);
    chunks->finished.wait(lock, [&] { return chunks->done.load() == chunks->count; });
  }
  return chunks;
}
}  // namespace

// NaN or infinite, read from the bits (-ffast-math assumes neither and folds std::isfinite)
static inline bool NotFinite(double x) {
  uint64_t bits;
  __builtin_memcpy(&bits, &x, sizeof bits);
  return (bits >> 52 & 0x7ff) == 0x7ff;
}

// D the data's type, K the coefficients' (and the results')
template <ffi::DataType D, ffi::DataType K>
static ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<D> xt, ffi::Buffer<D> y, ffi::Buffer<D> off,
                       ffi::Buffer<ffi::PRED> mask, ffi::Buffer<K> coef, ffi::ResultBuffer<K> value,
                       ffi::ResultBuffer<K> grad) {
  using F = ffi::NativeType<D>;
  int64_t P, R, T;
  if (auto error = Shape(xt.dimensions(), y.dimensions()[0], kStep<F>, P, R, T); !error.success()) return error;
  auto chunks = Run(pool, xt.typed_data(), y.typed_data(), off.typed_data(), mask.typed_data(), coef.typed_data(), 1,
                    P, R, T, true);
  double v = 0.0;
  for (int64_t c = 0; c < chunks->count; ++c) v += chunks->values[c];
  *value->typed_data() = v;
  for (int64_t p = 0; p <= P; ++p) {
    double s = 0.0;
    for (int64_t c = 0; c < chunks->count; ++c) s += chunks->grads[c * (P + 1) + p];
    grad->typed_data()[p] = s;
  }
  // NaN coefficients: the value is NaN, and so the gradient, as XLA's would be (the per-row
  // loop, under -ffast-math, need not carry a NaN into the residuals)
  if (NotFinite(v))
    for (int64_t p = 0; p <= P; ++p) grad->typed_data()[p] = v;
  return ffi::Error::Success();
}

template <ffi::DataType D, ffi::DataType K>
static ffi::Error ImplValues(ffi::ThreadPool pool, ffi::Buffer<D> xt, ffi::Buffer<D> y, ffi::Buffer<D> off,
                             ffi::Buffer<ffi::PRED> mask, ffi::Buffer<K> coefs, ffi::ResultBuffer<K> values) {
  using F = ffi::NativeType<D>;
  int64_t P, R, T;
  if (auto error = Shape(xt.dimensions(), y.dimensions()[0], kStep<F>, P, R, T); !error.success()) return error;
  if (coefs.dimensions().size() != 2 || coefs.dimensions()[1] != P + 1)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "coefs must be (B, P + 1)");
  const int64_t B = coefs.dimensions()[0];
  auto chunks =
      Run(pool, xt.typed_data(), y.typed_data(), off.typed_data(), mask.typed_data(), coefs.typed_data(), B, P, R, T,
          false);
  for (int64_t b = 0; b < B; ++b) {
    double v = 0.0;
    for (int64_t c = 0; c < chunks->count; ++c) v += chunks->values[c * B + b];
    values->typed_data()[b] = v;
  }
  return ffi::Error::Success();
}

// the handlers' arguments: XLA's thread pool, XT, y, offset, mask, then the coefficients
template <ffi::DataType D, ffi::DataType K>
static auto DataArguments() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<D>>()
      .template Arg<ffi::Buffer<D>>()
      .template Arg<ffi::Buffer<D>>()
      .template Arg<ffi::Buffer<ffi::PRED>>()
      .template Arg<ffi::Buffer<K>>();
}

// value and gradient; values at a batch of coefficients: one pair per precision
#define CMCFLOW_HANDLERS(Name, D, K)                                                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(Name, (Impl<D, K>),                                                    \
                                (DataArguments<D, K>().Ret<ffi::Buffer<K>>().Ret<ffi::Buffer<K>>())); \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(Name##Values, (ImplValues<D, K>), (DataArguments<D, K>().Ret<ffi::Buffer<K>>()))

CMCFLOW_HANDLERS(Logistic, ffi::F32, ffi::F64);     // mixed
CMCFLOW_HANDLERS(LogisticF32, ffi::F32, ffi::F32);  // float32
CMCFLOW_HANDLERS(LogisticF64, ffi::F64, ffi::F64);  // float64
