/* fp32 matmul for the CPU: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), with w packed once.
 *
 * The packed layout is [ceil(N / 32)][K][32]: each block of 32 output columns is one
 * contiguous stream, read front to back, so a decode step (M of 1 to a few rows)
 * reads its weights in long sequential runs that the hardware prefetcher follows
 * (software prefetching measured no better). For larger M, a tile of several rows of
 * x reuses each loaded weight vector across rows, to keep the FMA units busy.
 * Columns past N in the last block are zero.
 *
 * Written in GCC vector extensions and built with -march=native on the serving host,
 * so one source compiles for whatever vector unit the host has. Threads are OpenMP's, from
 * the process's one runtime (the one torch loaded), split over column blocks.
 */
#include <stdint.h>
#include <string.h>

#include "pd_kernels.h"

#define PD_BLOCK 32
/* Rows of x per tile: 2 vector accumulators each, plus the 2 weight vectors, must fit
 * in the register file (32 x 512-bit with AVX-512; 16 x 256-bit with AVX2, where a
 * 16-float vector takes two). */
#if defined(__AVX512F__)
#define PD_TILE_ROWS 8
#else
#define PD_TILE_ROWS 3
#endif
#define PD_MAX_TILE_ROWS 8 /* the remainder cases below go up to 7 rows */

int64_t pd_block_cols(void) { return PD_BLOCK; }

int64_t pd_packed_numel(int64_t n, int64_t k) {
  return (n + PD_BLOCK - 1) / PD_BLOCK * k * PD_BLOCK;
}

void pd_pack(const float *w, float *packed, int64_t n, int64_t k) {
  int64_t blocks = (n + PD_BLOCK - 1) / PD_BLOCK;
  for (int64_t b = 0; b < blocks; b++)
    for (int64_t kk = 0; kk < k; kk++)
      for (int64_t j = 0; j < PD_BLOCK; j++) {
        int64_t col = b * PD_BLOCK + j;
        packed[(b * k + kk) * PD_BLOCK + j] = col < n ? w[col * k + kk] : 0.0f;
      }
}

/* rows (a compile-time constant after inlining) rows of x against one column block. */
static inline __attribute__((always_inline)) void tile(
    const float *x, int64_t ldx, const float *wb, const float *bias, float *y, int64_t ldy,
    const int rows, int64_t k, int64_t cols, int accumulate) {
  pd_v16 acc[PD_MAX_TILE_ROWS][2];
  for (int r = 0; r < rows; r++) {
    acc[r][0] = (pd_v16){0};
    acc[r][1] = (pd_v16){0};
  }
  for (int64_t kk = 0; kk < k; kk++) {
    const float *wk = wb + kk * PD_BLOCK;
    const pd_v16 w0 = *(const pd_v16 *)wk, w1 = *(const pd_v16 *)(wk + 16);
    for (int r = 0; r < rows; r++) {
      const float xv = x[r * ldx + kk];
      acc[r][0] += w0 * xv;
      acc[r][1] += w1 * xv;
    }
  }
  for (int r = 0; r < rows; r++) {
    float out[PD_BLOCK];
    memcpy(out, acc[r], sizeof out);
    if (bias)
      for (int64_t j = 0; j < cols; j++) out[j] += bias[j];
    float *yr = y + r * ldy;
    if (accumulate)
      for (int64_t j = 0; j < cols; j++) yr[j] = yr[j] + out[j];
    else
      memcpy(yr, out, (size_t)cols * sizeof(float));
  }
}

static void column_block(const float *x, int64_t ldx, const float *wb, const float *bias,
                         float *y, int64_t ldy, int64_t m, int64_t k, int64_t cols, int acc) {
  int64_t r = 0;
  for (; r + PD_TILE_ROWS <= m; r += PD_TILE_ROWS)
    tile(x + r * ldx, ldx, wb, bias, y + r * ldy, ldy, PD_TILE_ROWS, k, cols, acc);
  const float *xr = x + r * ldx;
  float *yr = y + r * ldy;
  switch (m - r) {
    case 1: tile(xr, ldx, wb, bias, yr, ldy, 1, k, cols, acc); break;
    case 2: tile(xr, ldx, wb, bias, yr, ldy, 2, k, cols, acc); break;
    case 3: tile(xr, ldx, wb, bias, yr, ldy, 3, k, cols, acc); break;
    case 4: tile(xr, ldx, wb, bias, yr, ldy, 4, k, cols, acc); break;
    case 5: tile(xr, ldx, wb, bias, yr, ldy, 5, k, cols, acc); break;
    case 6: tile(xr, ldx, wb, bias, yr, ldy, 6, k, cols, acc); break;
    case 7: tile(xr, ldx, wb, bias, yr, ldy, 7, k, cols, acc); break;
    default: break;
  }
}

/* x rows are ldx floats apart, y rows ldy apart; bias may be NULL. With accumulate,
 * y = y + (x @ w^T + bias), the residual add of a decoder layer. */
void pd_linear_into(const float *x, int64_t ldx, const float *packed, const float *bias,
                    float *y, int64_t ldy, int64_t m, int64_t n, int64_t k, int accumulate,
                    int threads) {
  int64_t blocks = (n + PD_BLOCK - 1) / PD_BLOCK;
  if (threads > blocks) threads = (int)blocks;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < blocks; b++) {
    int64_t col = b * PD_BLOCK;
    int64_t cols = n - col < PD_BLOCK ? n - col : PD_BLOCK;
    column_block(x, ldx, packed + b * k * PD_BLOCK, bias ? bias + col : 0, y + col, ldy, m, k,
                 cols, accumulate);
  }
}

void pd_linear(const float *x, int64_t ldx, const float *packed, const float *bias, float *y,
               int64_t ldy, int64_t m, int64_t n, int64_t k, int threads) {
  pd_linear_into(x, ldx, packed, bias, y, ldy, m, n, k, 0, threads);
}
