/* Row-wise and element-wise fp32 ops of a decoder layer, for the CPU: RMSNorm and
 * the SwiGLU gate. Each is one pass over its rows, where torch runs several ops;
 * rows are split over threads only when there are enough of them to pay for it. */
#include <math.h>
#include <stdint.h>

#include "pd_kernels.h"
#include "pd_simd.h"

#define PD_PARALLEL_ROWS 16

/* y[m] = w * (x[m] * 1/sqrt(mean(x[m]^2) + eps)); x rows ldx floats apart, y contiguous. */
void pd_rms_norm(const float *x, int64_t ldx, const float *w, float *y, int64_t rows,
                 int64_t dim, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows >= PD_PARALLEL_ROWS)
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * ldx;
    float *yr = y + r * dim;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < dim; i++) ss += xr[i] * xr[i];
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
#pragma omp simd
    for (int64_t i = 0; i < dim; i++) yr[i] = w[i] * (xr[i] * inv);
  }
}

/* out[m, i] = silu(gate_up[m, i]) * gate_up[m, dim + i]; gate_up rows are 2*dim wide. */
void pd_silu_mul(const float *gate_up, float *out, int64_t rows, int64_t dim, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows >= PD_PARALLEL_ROWS)
  for (int64_t r = 0; r < rows; r++) {
    const float *restrict g = gate_up + r * 2 * dim, *restrict u = g + dim;
    float *restrict o = out + r * dim;
    for (int64_t i = 0; i < dim; i += PD_VW) {
      const int64_t w = dim - i < PD_VW ? dim - i : PD_VW;
      const pd_vf gv = pd_vload_part(g + i, w, 0.0f), uv = pd_vload_part(u + i, w, 0.0f);
      pd_vstore_part(o + i, gv / (1.0f + pd_vexp(-gv)) * uv, w);
    }
  }
}
