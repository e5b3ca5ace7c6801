// The logistic log-likelihood and its gradient in one pass over the data (cmcflow.fused:
// built per CPU type on first use, called from JAX through the XLA FFI).
//
// Logistic: inputs XT float32, y, offset float32 (R), mask bool (R), coef float64 (P + 1: beta,
// then the intercept). XT holds the features one row per feature, (P, R), or in tiles
// (R_t, P, T): tile t the rows [t T, t T + T) of every feature, feature after feature, the last
// one zero-padded (cmcflow.fused.feature_tiles), so that a step's rows of all P features are
// one stretch of memory. Outputs: value float64 () = sum_j mask_j (y_j eta_j - softplus(eta_j))
// and its gradient float64 (P + 1), eta = beta . XT + intercept + offset.
// LogisticValues: the same data and coefs float64 (B, P + 1), B sets of coefficients; output the
// B values float64 (B): each step of rows is read from memory once for all B of them.
// Mixed precision as the workflow's `mixed`: per-row arithmetic, and sums over at most 512
// rows, in float32; the sums of those sums in float64. exp and log1p are polynomials inline
// in the loops over rows (ExpNonpositive, Log1pUnit), within a few float32 ulp.
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
// rows whose eta stay in vector registers: 8 registers of AVX-512's 32, or 16 AVX2 ones
#if defined(__AVX512F__)
constexpr int64_t kStep = 128;
#else
constexpr int64_t kStep = 64;
#endif
// the gradient asks for the rows this far ahead of its step into L2 (prefetcht2) as it reads each
// feature row, so that memory streams the next steps while this one computes its exp and log
// (Ahead: half the lines in the eta pass, half in the XT r pass, so that the requests spread
// over the step)
constexpr int64_t kAhead = 4 * kStep;
constexpr int64_t kFlush = 512;  // rows a gradient lane sums in float32 before the float64 sum

typedef float V __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register, two AVX2 ones
static inline V Load(const float* p) { V v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void Store(float* p, V v) { __builtin_memcpy(p, &v, sizeof v); }
static inline double Sum(V v) { double s = 0.0; for (int k = 0; k < 16; ++k) s += v[k]; return s; }

// feature p of row j in XT laid out in tiles of T rows
static inline const float* RowAt(const float* xt, int64_t P, int64_t T, int64_t p, int64_t j) {
  return xt + (j / T) * P * T + p * T + j % T;
}

// ask for every other 64-byte line, from the first (0) or second (1) on, of feature p's kStep
// rows from j on into L2
static inline void Ahead(const float* xt, int64_t P, int64_t T, int64_t p, int64_t j, int first) {
  const float* later = RowAt(xt, P, T, p, j);
#pragma GCC unroll 16
  for (int64_t k = first; k < kStep / 16; k += 2) __builtin_prefetch(later + 16 * k, 0, 1);
}

// eta of rows [j0, j0 + n), n <= kStep (n == kStep when kFull), into eta; kPrefetch: ask for
// half the lines of the feature rows kAhead rows on (within XT) as each is read
template <bool kFull, bool kPrefetch>
static inline void Eta(const float* xt, const float* off, const double* coef, int64_t P, int64_t R, int64_t T,
                       int64_t j0, int64_t n, float* eta) {
  const float b0 = (float)coef[P];
  if (kFull) {
    constexpr int NV = kStep / 16;  // vectors per step
    const bool ahead = kPrefetch && j0 + kAhead + kStep <= R;
    V e[NV];
#pragma GCC unroll 16
    for (int k = 0; k < NV; ++k) e[k] = Load(off + j0 + 16 * k) + b0;
    for (int64_t p = 0; p < P; ++p) {
      const float* row = RowAt(xt, P, T, p, j0);
      const float bp = (float)coef[p];
      if (ahead) Ahead(xt, P, T, p, j0 + kAhead, 0);
#pragma GCC unroll 16
      for (int k = 0; k < NV; ++k) e[k] += bp * Load(row + 16 * k);
    }
#pragma GCC unroll 16
    for (int k = 0; k < NV; ++k) Store(eta + 16 * k, e[k]);
  } else {
    for (int64_t j = 0; j < n; ++j) eta[j] = b0 + off[j0 + j];
    for (int64_t p = 0; p < P; ++p) {
      const float* row = RowAt(xt, P, T, p, j0);
      const float bp = (float)coef[p];
      for (int64_t j = 0; j < n; ++j) eta[j] += bp * row[j];
    }
  }
}

// exp(x) for x <= 0 in float32, inline so that it vectorises with the loop around it (a libmvec
// call does not): Cody and Waite's reduction x = n ln 2 + r, |r| <= ln 2 / 2, Cephes' expf
// polynomial for e^r, times 2^n; x clamped at -87 (e^-87 = 1.6e-38, the smallest normal
// float's order). Relative error below 3e-7 (2.5 float32 epsilons) on [-87, 0] against float64.
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

// log(1 + t) for 0 <= t <= 1 (softplus' only range: t = exp(-|eta|)): t q(t), q of degree 9 the
// least-squares fit to log(1 + t) / t on [0, 1] in Chebyshev polynomials; relative error below
// 2e-7 against float64, so also where t is far below float32's epsilon (log(1.0f + t) is 0)
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

// y eta - softplus(eta), softplus(eta) = max(eta, 0) + log(1 + t), t = exp(-|eta|)
static inline float LogLikelihood(float yy, float e, float t) { return yy * e - (std::fmax(e, 0.0f) + Log1pUnit(t)); }

// value of rows [j0, j0 + n), n <= kStep, at one set of coefficients, summed in float32
template <bool kFull>
static inline float StepValue(const float* xt, const float* y, const float* off, const uint8_t* mask,
                              const double* coef, int64_t P, int64_t R, int64_t T, int64_t j0, int64_t n) {
  alignas(64) float eta[kStep];
  Eta<kFull, false>(xt, off, coef, P, R, T, j0, n, eta);
  float v = 0.0f;
#pragma omp simd reduction(+ : v)
  for (int64_t j = 0; j < n; ++j) {
    const float e = eta[j], m = static_cast<float>(mask[j0 + j]);
    v += m * LogLikelihood(y[j0 + j], e, ExpNonpositive(-std::fabs(e)));
  }
  return v;
}

// value and gradient of rows [j0, j0 + n), n <= kStep, added to val, gi and g
template <bool kFull>
static inline void Step(const float* xt, const float* y, const float* off, const uint8_t* mask, const double* coef,
                        int64_t P, int64_t R, int64_t T, int64_t j0, int64_t n, double& val, double& gi, V* gv,
                        double* g) {
  alignas(64) float eta[kStep], r[kStep];
  Eta<kFull, true>(xt, off, coef, P, R, T, j0, n, eta);
  float v = 0.0f, s0 = 0.0f;
#pragma omp simd reduction(+ : v, s0)
  for (int64_t j = 0; j < n; ++j) {
    const float e = eta[j], t = ExpNonpositive(-std::fabs(e));
    const float s = (e >= 0.0f ? 1.0f : t) / (1.0f + t);  // sigma(eta)
    const float m = static_cast<float>(mask[j0 + j]), yy = y[j0 + j];
    v += m * LogLikelihood(yy, e, t);
    const float rj = m * (yy - s);
    r[j] = rj;
    s0 += rj;
  }
  val += v;
  gi += s0;
  if (kFull) {
    constexpr int NV = kStep / 16;
    V rr[NV];
#pragma GCC unroll 16
    for (int k = 0; k < NV; ++k) rr[k] = Load(r + 16 * k);
    const bool ahead = j0 + kAhead + kStep <= R;
    for (int64_t p = 0; p < P; ++p) {
      const float* row = RowAt(xt, P, T, p, j0);
      if (ahead) Ahead(xt, P, T, p, j0 + kAhead, 1);
      V acc = rr[0] * Load(row);
#pragma GCC unroll 16
      for (int k = 1; k < NV; ++k) acc += rr[k] * Load(row + 16 * k);
      gv[p] += acc;
    }
  } else {
    for (int64_t p = 0; p < P; ++p) {
      const float* row = RowAt(xt, P, T, p, j0);
      float acc = 0.0f;
      for (int64_t j = 0; j < n; ++j) acc += row[j] * r[j];
      g[p] += acc;
    }
  }
}

static void Rows(const float* xt, const float* y, const float* off, const uint8_t* mask, const double* coef,
                 int64_t P, int64_t R, int64_t T, int64_t lo, int64_t hi, double* value, double* grad) {
  double val = 0.0, gi = 0.0;
  std::vector<double> g(P, 0.0);
  std::vector<V> gv(P);
  int64_t j0 = lo;
  while (j0 + kStep <= hi) {
    // float32 lanes over kFlush rows at most, then into the float64 sums
    const int64_t stop = std::min(hi - kStep + 1, j0 + kFlush);
    for (int64_t p = 0; p < P; ++p) gv[p] = V{};
    for (; j0 < stop; j0 += kStep)
      Step<true>(xt, y, off, mask, coef, P, R, T, j0, kStep, val, gi, gv.data(), nullptr);
    for (int64_t p = 0; p < P; ++p) g[p] += Sum(gv[p]);
  }
  if (j0 < hi) Step<false>(xt, y, off, mask, coef, P, R, T, j0, hi - j0, val, gi, nullptr, g.data());
  *value = val;
  for (int64_t p = 0; p < P; ++p) grad[p] = g[p];
  grad[P] = gi;
}

// values of rows [lo, hi) at the B sets of coefficients coefs (B, P + 1): values (B)
static void RowValues(const float* xt, const float* y, const float* off, const uint8_t* mask, const double* coefs,
                      int64_t B, int64_t P, int64_t R, int64_t T, int64_t lo, int64_t hi, double* values) {
  for (int64_t b = 0; b < B; ++b) values[b] = 0.0;
  int64_t j0 = lo;
  for (; j0 + kStep <= hi; j0 += kStep)
    for (int64_t b = 0; b < B; ++b)
      values[b] += StepValue<true>(xt, y, off, mask, coefs + b * (P + 1), P, R, T, j0, kStep);
  if (j0 < hi)
    for (int64_t b = 0; b < B; ++b)
      values[b] += StepValue<false>(xt, y, off, mask, coefs + b * (P + 1), P, R, T, j0, hi - j0);
}

namespace {
// One call's rows and the chunks' partial sums; shared with the helpers, which may start
// after the call has returned (and then find no chunk left). B sets of coefficients with
// values only, or (B = 1) one with the gradient too.
struct Chunks {
  const float *xt, *y, *off;
  const uint8_t* mask;
  const double* coef;
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

// P, R and the tile's rows T of XT (P, R) or (R_t, P, T) beside R rows of y; an error where
// the shapes do not fit together
ffi::Error Shape(ffi::Buffer<ffi::F32>& xt, ffi::Buffer<ffi::F32>& y, int64_t& P, int64_t& R, int64_t& T) {
  const auto dims = xt.dimensions();
  R = y.dimensions()[0];
  if (dims.size() == 2 && dims[1] == R) {
    P = dims[0];
    T = std::max<int64_t>(R, 1);
    return ffi::Error::Success();
  }
  if (dims.size() == 3 && dims[2] % kStep == 0 && dims[0] * dims[2] >= R && (dims[0] - 1) * dims[2] < R) {
    P = dims[1];
    T = dims[2];
    return ffi::Error::Success();
  }
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    "XT must be (P, R) or tiles (R_t, P, T) of R rows, T a multiple of " + std::to_string(kStep));
}

// the chunks taken by this thread and helpers on the pool, until all are done
std::shared_ptr<Chunks> Run(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& xt, ffi::Buffer<ffi::F32>& y,
                            ffi::Buffer<ffi::F32>& off, ffi::Buffer<ffi::PRED>& mask, const double* coef, int64_t B,
                            int64_t P, int64_t R, int64_t T, bool gradient) {
  auto chunks = std::make_shared<Chunks>();
  chunks->xt = xt.typed_data();
  chunks->y = y.typed_data();
  chunks->off = off.typed_data();
  chunks->mask = reinterpret_cast<const uint8_t*>(mask.typed_data());  // bool: one byte, 0 or 1
  chunks->coef = coef;
  chunks->B = B;
  chunks->P = P;
  chunks->R = R;
  chunks->T = T;
  chunks->gradient = gradient;
  chunks->count = (chunks->R + kChunk - 1) / kChunk;
  chunks->values.assign(chunks->count * B, 0.0);
  if (gradient) chunks->grads.assign(chunks->count * (chunks->P + 1), 0.0);
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

static ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xt, ffi::Buffer<ffi::F32> y,
                       ffi::Buffer<ffi::F32> off, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F64> coef,
                       ffi::ResultBuffer<ffi::F64> value, ffi::ResultBuffer<ffi::F64> grad) {
  int64_t P, R, T;
  if (auto error = Shape(xt, y, P, R, T); !error.success()) return error;
  auto chunks = Run(pool, xt, y, off, mask, coef.typed_data(), 1, P, R, T, true);
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

static ffi::Error ImplValues(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xt, ffi::Buffer<ffi::F32> y,
                             ffi::Buffer<ffi::F32> off, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F64> coefs,
                             ffi::ResultBuffer<ffi::F64> values) {
  int64_t P, R, T;
  if (auto error = Shape(xt, y, P, R, T); !error.success()) return error;
  if (coefs.dimensions().size() != 2 || coefs.dimensions()[1] != P + 1)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "coefs must be (B, P + 1)");
  const int64_t B = coefs.dimensions()[0];
  auto chunks = Run(pool, xt, y, off, mask, coefs.typed_data(), B, P, R, T, false);
  for (int64_t b = 0; b < B; ++b) {
    double v = 0.0;
    for (int64_t c = 0; c < chunks->count; ++c) v += chunks->values[c * B + b];
    values->typed_data()[b] = v;
  }
  return ffi::Error::Success();
}

// the handlers' arguments: XLA's thread pool, XT, y, offset, mask, then the coefficients
static auto DataArguments() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::PRED>>()
      .Arg<ffi::Buffer<ffi::F64>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Logistic, Impl, DataArguments().Ret<ffi::Buffer<ffi::F64>>().Ret<ffi::Buffer<ffi::F64>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LogisticValues, ImplValues, DataArguments().Ret<ffi::Buffer<ffi::F64>>());
