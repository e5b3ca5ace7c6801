// One pass over the data for the logistic log-likelihood and its gradient (bench-only
// prototype for issue 13 b, bench/fused_gradient.py; not used by the workflow).
//
// Inputs: XT float32 (P, R), y, offset float32 (R), mask float32 (R), coef float64 (P + 1: beta, then
// the intercept). Outputs: value float64 () = sum_j mask_j (y_j eta_j - softplus(eta_j)) and
// its gradient float64 (P + 1), eta = beta . XT + intercept + offset. Mixed precision as the
// workflow's `mixed`: per-row arithmetic in float32, sums over blocks of rows in float64.
// Each of kThreads threads takes a contiguous range of rows, in blocks of kBlock rows: a
// block's eta from P strided reads, then its residuals, then XT r from the same block while
// it is still in cache, so XT is read from memory once.
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;

constexpr int kThreads = 2;
constexpr int64_t kBlock = 512;

static void Rows(const float* xt, const float* y, const float* off, const float* mask, const double* coef,
                 int64_t P, int64_t R, int64_t lo, int64_t hi, double* value, double* grad) {
  constexpr int64_t B = kBlock;
  float eta[B]; float r[B];
  double val = 0.0;
  std::vector<double> g(P + 1, 0.0);
  const double b0 = coef[P];
  for (int64_t j0 = lo; j0 < hi; j0 += B) {
    const int64_t n = std::min(B, hi - j0);
    for (int64_t j = 0; j < n; ++j) eta[j] = (float)b0 + off[j0 + j];
    for (int64_t p = 0; p < P; ++p) {
      const float* row = xt + p * R + j0;
      const float bp = (float)coef[p];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) eta[j] += bp * row[j];
    }
    double gi = 0.0;
    float ef[B], tf[B];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) { ef[j] = eta[j]; tf[j] = std::exp(-std::fabs(ef[j])); }
    float lf[B];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) lf[j] = std::log(1.0f + tf[j]);
#pragma omp simd reduction(+ : val, gi)
    for (int64_t j = 0; j < n; ++j) {
      const float e = ef[j], t = tf[j];
      const float s = (e >= 0.0f ? 1.0f : t) / (1.0f + t);
      const float m = mask[j0 + j], yy = y[j0 + j];
      val += (double)(m * (yy * e - (std::fmax(e, 0.0f) + lf[j])));
      const float rj = m * (yy - s);
      r[j] = rj;
      gi += rj;
    }
    g[P] += gi;
    for (int64_t p = 0; p < P; ++p) {
      const float* row = xt + p * R + j0;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < n; ++j) acc += row[j] * r[j];
      g[p] += (double)acc;
    }
  }
  *value = val;
  for (int64_t p = 0; p <= P; ++p) grad[p] = g[p];
}

static ffi::Error Impl(ffi::Buffer<ffi::F32> xt, ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> off,
                       ffi::Buffer<ffi::F32> mask, ffi::Buffer<ffi::F64> coef, ffi::ResultBuffer<ffi::F64> value,
                       ffi::ResultBuffer<ffi::F64> grad) {
  const int64_t P = xt.dimensions()[0], R = xt.dimensions()[1];
  const int T = kThreads;
  std::vector<double> vals(T), grads(T * (P + 1));
  std::vector<std::thread> pool;
  for (int t = 0; t < T; ++t) {
    const int64_t lo = R * t / T, hi = R * (t + 1) / T;
    auto work = [&, t, lo, hi] { Rows(xt.typed_data(), y.typed_data(), off.typed_data(), mask.typed_data(),
                                      coef.typed_data(), P, R, lo, hi, &vals[t], &grads[t * (P + 1)]); };
    if (t + 1 < T) pool.emplace_back(work); else work();
  }
  for (auto& th : pool) th.join();
  double v = 0.0;
  for (int t = 0; t < T; ++t) v += vals[t];
  *value->typed_data() = v;
  for (int64_t p = 0; p <= P; ++p) {
    double s = 0.0;
    for (int t = 0; t < T; ++t) s += grads[t * (P + 1) + p];
    grad->typed_data()[p] = s;
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Logistic, Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F64>>()
                                  .Ret<ffi::Buffer<ffi::F64>>()
                                  .Ret<ffi::Buffer<ffi::F64>>());
