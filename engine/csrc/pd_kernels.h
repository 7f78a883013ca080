/* The kernels' entry points, shared by the sources that call one another. */
#ifndef PD_KERNELS_H
#define PD_KERNELS_H
#include <stdint.h>

void pd_linear_into(const float *x, int64_t ldx, const float *packed, const float *bias,
                    float *y, int64_t ldy, int64_t m, int64_t n, int64_t k, int accumulate,
                    int threads);
void pd_rms_norm(const float *x, int64_t ldx, const float *w, float *y, int64_t rows,
                 int64_t dim, float eps, int threads);
void pd_silu_mul(const float *gate_up, float *out, int64_t rows, int64_t dim, int threads);
int pd_decode_attention(const float *q, int64_t q_stride, const float *k_cache,
                        const float *v_cache, const int64_t *tables, int64_t table_stride,
                        const int64_t *lens, float *out, int64_t batch, int64_t q_heads,
                        int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale,
                        int threads);
#endif
