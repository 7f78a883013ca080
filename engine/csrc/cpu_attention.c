/* Decode attention over the paged KV cache, for the CPU, in fp32.
 *
 * One new query token per sequence attends to its sequence's first `lens[b]` cache
 * slots, found through its block table; the cache is read in place, never gathered.
 * The query heads that share a KV head (GQA) are computed together, so each key and
 * value row is read once per group. Softmax is exact (max-subtracted, two passes).
 * Work is split over (sequence, KV head) pairs.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pd_kernels.h"

#define PD_MAX_GROUP 64

static float dot(const float *a, const float *b, int64_t d) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; i++) acc += a[i] * b[i];
  return acc;
}

static void axpy(float *y, float a, const float *x, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; i++) y[i] += a * x[i];
}

/* q [B, Hq, D] with rows q_stride floats apart (heads contiguous); k_cache and
 * v_cache [blocks, block_size, Hkv, D] contiguous; tables [B, table_stride] block
 * ids; out [B, Hq, D] contiguous. Returns 0, or -1 if scratch memory ran out. */
int pd_decode_attention(const float *q, int64_t q_stride, const float *k_cache,
                        const float *v_cache, const int64_t *tables, int64_t table_stride,
                        const int64_t *lens, float *out, int64_t batch, int64_t q_heads,
                        int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale,
                        int threads) {
  const int64_t group = q_heads / kv_heads;
  if (group < 1 || group > PD_MAX_GROUP || group * kv_heads != q_heads) return -2;
  int failed = 0;
  const int64_t tasks = batch * kv_heads;
  if (threads > tasks) threads = (int)tasks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(| : failed)
  for (int64_t task = 0; task < tasks; task++) {
    const int64_t b = task / kv_heads, h = task % kv_heads, len = lens[b];
    const int64_t row = kv_heads * head_dim; /* floats between two cache slots */
    const int64_t *table = tables + b * table_stride;
    const float *qb = q + b * q_stride + h * group * head_dim;
    float *ob = out + (b * q_heads + h * group) * head_dim;
    float *scores = malloc((size_t)(group * len) * sizeof(float));
    if (!scores) {
      failed = 1;
      continue;
    }
    float top[PD_MAX_GROUP], total[PD_MAX_GROUP];
    for (int64_t g = 0; g < group; g++) top[g] = -INFINITY;
    for (int64_t p = 0; p < len; p++) {
      const float *k = k_cache + (table[p / block_size] * block_size + p % block_size) * row +
                       h * head_dim;
      for (int64_t g = 0; g < group; g++) {
        const float s = dot(qb + g * head_dim, k, head_dim) * scale;
        scores[g * len + p] = s;
        if (s > top[g]) top[g] = s;
      }
    }
    for (int64_t g = 0; g < group; g++) {
      float sum = 0.0f;
      for (int64_t p = 0; p < len; p++) {
        const float e = expf(scores[g * len + p] - top[g]);
        scores[g * len + p] = e;
        sum += e;
      }
      total[g] = sum;
    }
    memset(ob, 0, (size_t)(group * head_dim) * sizeof(float));
    for (int64_t p = 0; p < len; p++) {
      const float *v = v_cache + (table[p / block_size] * block_size + p % block_size) * row +
                       h * head_dim;
      for (int64_t g = 0; g < group; g++) axpy(ob + g * head_dim, scores[g * len + p], v, head_dim);
    }
    for (int64_t g = 0; g < group; g++) {
      const float inv = 1.0f / total[g];
      for (int64_t i = 0; i < head_dim; i++) ob[g * head_dim + i] *= inv;
    }
    free(scores);
  }
  return failed ? -1 : 0;
}
