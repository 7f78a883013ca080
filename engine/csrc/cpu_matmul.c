/* fp32 matmul for the CPU: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), with w packed once.
 *
 * The packed layout is [ceil(N / 32)][K][32]: each block of 32 output columns is one
 * contiguous stream, read front to back, so a decode step (M of 1 to a few rows)
 * reads its weights in long sequential runs that the hardware prefetcher follows. A
 * software prefetch 16 KiB ahead of the stream (into L2) adds to it where the weights
 * come from memory (the LM head: about a fifth faster at 1 to 8 rows); weights that
 * stay in the last-level cache run at the same speed with or without it. Columns past
 * N in the last block are zero.
 *
 * The inner loop is a register tile: `rows` rows of x against `nv` vectors of a column
 * block's 32 columns, the accumulators held in registers for the whole of K while each
 * step loads nv weight vectors and broadcasts one x value per row. Its shape is chosen
 * per vector unit (pd_simd.h) so that accumulators, weight vectors and the broadcast
 * fit the register file:
 * - AVX-512 (32 x 16 floats): up to 12 rows x 2 vectors (24 accumulators), the whole
 *   block in one pass;
 * - AVX2 (16 x 8 floats): up to 6 rows x 2 vectors (12 accumulators), a block in two
 *   passes of 16 columns;
 * - otherwise (128-bit vectors): up to 4 rows x 2 vectors, in four passes.
 * Few rows leave too few accumulators to cover the FMA latency, so there the tile
 * widens to more of the block and splits K into interleaved partial sums (`ku`), added
 * at the end. M rows are cut into tiles of near-equal height.
 *
 * Threads are OpenMP's, from the process's one runtime (the one torch loaded), split
 * over column blocks.
 */
#include <stdint.h>
#include <string.h>

#include "pd_kernels.h"
#include "pd_simd.h"

#define PD_BLOCK 32
#define PD_MAX_ACC 8 /* nv * ku, at most, in every tile shape below */
#define PD_AHEAD 4096 /* floats a one-tile pass prefetches ahead of its weight stream */

/* The tile for `rows` rows (a compile-time constant after inlining): nv vectors of
 * columns per pass, and ku interleaved partial sums over K. */
#if PD_VW == 16
#define PD_TILE_ROWS 12
#define TILE_NV(rows) 2
#define TILE_KU(rows) ((rows) == 1 ? 4 : (rows) == 2 ? 2 : 1)
#elif PD_VW == 8
#define PD_TILE_ROWS 6
#define TILE_NV(rows) ((rows) <= 2 ? 4 : 2)
#define TILE_KU(rows) ((rows) == 1 ? 2 : 1)
#else
#define PD_TILE_ROWS 4
#define TILE_NV(rows) ((rows) == 1 ? 4 : 2)
#define TILE_KU(rows) ((rows) == 1 ? 2 : 1)
#endif

int64_t pd_block_cols(void) { return PD_BLOCK; }

const char *pd_isa(void) { return PD_ISA; }

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

/* y[r, c..] = (y[r, c..] if accumulate) + acc + bias[c..], for the columns below `cols`. */
static inline __attribute__((always_inline)) void store(pd_vf v, const float *bias, float *yr,
                                                        int64_t c, int64_t cols, int accumulate) {
  if (c + PD_VW <= cols) {
    if (bias) v = pd_vadd(v, pd_vloadu(bias + c));
    if (accumulate) v = pd_vadd(pd_vloadu(yr + c), v);
    pd_vstoreu(yr + c, v);
  } else if (c < cols) {
    float out[PD_VW];
    pd_vstoreu(out, v);
    for (int64_t j = 0; j < cols - c; j++) {
      const float o = bias ? out[j] + bias[c + j] : out[j];
      yr[c + j] = accumulate ? yr[c + j] + o : o;
    }
  }
}

/* `rows` rows of x against one column block (cols of its 32 columns are real). With
 * pf, every pfs-th step also prefetches the next row of the panel at pf into L2. */
static inline __attribute__((always_inline)) void tile(
    const float *x, int64_t ldx, const float *wb, const float *pf, int pfs, const float *bias,
    float *y, int64_t ldy, const int rows, int64_t k, int64_t cols, int accumulate) {
  const int nv = TILE_NV(rows), ku = TILE_KU(rows);
  for (int c0 = 0; c0 < cols; c0 += nv * PD_VW) {
    pd_vf acc[PD_TILE_ROWS][PD_MAX_ACC];
    for (int r = 0; r < rows; r++)
      for (int i = 0; i < nv * ku; i++) acc[r][i] = pd_vzero();
    const float *wk = wb + c0;
    const float *pp = c0 == 0 ? pf : 0;
    int left = 1;
    int64_t kk = 0;
    for (; kk + ku <= k; kk += ku, wk += ku * PD_BLOCK)
      for (int u = 0; u < ku; u++) {
        if (pp && --left == 0) {
          __builtin_prefetch(pp, 0, 2);
          __builtin_prefetch(pp + 16, 0, 2);
          pp += PD_BLOCK;
          left = pfs;
        }
        pd_vf w[4];
        for (int j = 0; j < nv; j++) w[j] = pd_vload(wk + u * PD_BLOCK + j * PD_VW);
        for (int r = 0; r < rows; r++) {
          const pd_vf b = pd_vset1(x[r * ldx + kk + u]);
          for (int j = 0; j < nv; j++) acc[r][u * nv + j] = pd_vfma(b, w[j], acc[r][u * nv + j]);
        }
      }
    for (; kk < k; kk++, wk += PD_BLOCK) {
      pd_vf w[4];
      for (int j = 0; j < nv; j++) w[j] = pd_vload(wk + j * PD_VW);
      for (int r = 0; r < rows; r++) {
        const pd_vf b = pd_vset1(x[r * ldx + kk]);
        for (int j = 0; j < nv; j++) acc[r][j] = pd_vfma(b, w[j], acc[r][j]);
      }
    }
    for (int r = 0; r < rows; r++)
      for (int j = 0; j < nv; j++) {
        pd_vf v = acc[r][j];
        for (int u = 1; u < ku; u++) v = pd_vadd(v, acc[r][u * nv + j]);
        store(v, bias, y + r * ldy, c0 + j * PD_VW, cols, accumulate);
      }
  }
}

#define TILE_CASE(n) \
  case n: tile(xr, ldx, wb, pf, pfs, bias, yr, ldy, n, k, cols, acc); break;

/* All m rows against one column block, in tiles of near-equal height. One tile
 * prefetches its own stream PD_AHEAD floats ahead (past the block's end, that is the
 * next block: the blocks lie back to back). With several tiles, only the first reads
 * the block's weights from memory, and every tile prefetches its share of the next
 * block's (`next`, may be NULL) into L2, spread evenly over its steps, so that the
 * fetch of the next block overlaps the whole of this one's compute and the next first
 * tile finds it in L2 rather than stalling on memory. (Fetched by the last tile alone,
 * the 32-row decode matmuls and LM head ran 10-25% slower, one thread, CPU time.) */
static void column_block(const float *x, int64_t ldx, const float *wb, const float *next,
                         const float *bias, float *y, int64_t ldy, int64_t m, int64_t k,
                         int64_t cols, int acc) {
  const int64_t tiles = (m + PD_TILE_ROWS - 1) / PD_TILE_ROWS;
  int64_t r = 0;
  for (int64_t t = 0; t < tiles; t++) {
    const int64_t left = tiles - t, rows = (m - r + left - 1) / left;
    const float *xr = x + r * ldx;
    /* one tile: its own stream, PD_AHEAD ahead; several: tile t fetches rows
     * [t k / tiles, (t + 1) k / tiles) of the next block, one every `tiles` steps */
    const float *pf = tiles == 1 ? wb + PD_AHEAD : next ? next + t * k / tiles * PD_BLOCK : 0;
    const int pfs = tiles == 1 ? 1 : (int)tiles;
    float *yr = y + r * ldy;
    switch (rows) {
      TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4)
#if PD_TILE_ROWS > 4
      TILE_CASE(5) TILE_CASE(6)
#endif
#if PD_TILE_ROWS > 6
      TILE_CASE(7) TILE_CASE(8) TILE_CASE(9) TILE_CASE(10) TILE_CASE(11) TILE_CASE(12)
#endif
      default: break;
    }
    r += rows;
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
    const float *wb = packed + b * k * PD_BLOCK;
    column_block(x, ldx, wb, b + 1 < blocks ? wb + k * PD_BLOCK : 0, bias ? bias + col : 0, y + col, ldy, m, k,
                 cols, accumulate);
  }
}

void pd_linear(const float *x, int64_t ldx, const float *packed, const float *bias, float *y,
               int64_t ldy, int64_t m, int64_t n, int64_t k, int threads) {
  pd_linear_into(x, ldx, packed, bias, y, ldy, m, n, k, 0, threads);
}
