/* The kernels' entry points, shared by the sources that call one another. */
#ifndef PD_KERNELS_H
#define PD_KERNELS_H
#include <stdint.h>
#include <string.h>

typedef float pd_v16 __attribute__((vector_size(64)));
typedef int32_t pd_i16 __attribute__((vector_size(64)));

/* The first w (<= 16) floats at p into a vector whose other lanes are `fill`. */
static inline pd_v16 pd_load16(const float *p, int64_t w, float fill) {
  pd_v16 v = (pd_v16){0} + fill;
  if (w == 16)
    memcpy(&v, p, sizeof v);
  else
    memcpy(&v, p, (size_t)w * sizeof(float));
  return v;
}

static inline void pd_store16(float *p, pd_v16 v, int64_t w) {
  if (w == 16)
    memcpy(p, &v, sizeof v);
  else
    memcpy(p, &v, (size_t)w * sizeof(float));
}

/* exp of 16 floats, within 1 ulp (measured over [-87, 88]). x = n ln2 + r with
 * |r| <= ln2/2, exp(r) by a degree-6 polynomial, scaled by 2^n through the exponent
 * bits. Below -87.3 it returns 2^-126 (about 1.2e-38) where expf would go subnormal;
 * from 88.38 up, +inf (expf overflows at 88.72). In vector extensions because the
 * libm call doesn't vectorize. */
static inline pd_v16 pd_exp16(pd_v16 x) {
  const pd_v16 lo = (pd_v16){0} - 87.33654f, hi = (pd_v16){0} + 88.72283f;
  pd_i16 m = x < lo;
  x = (pd_v16)(((pd_i16)x & ~m) | ((pd_i16)lo & m));
  m = x > hi;
  x = (pd_v16)(((pd_i16)x & ~m) | ((pd_i16)hi & m));
  const pd_v16 t = x * 1.44269504088896341f + 0.5f;
  pd_i16 n = __builtin_convertvector(t, pd_i16); /* toward zero */
  n += __builtin_convertvector(n, pd_v16) > t;   /* -1 where that rounded up: floor */
  const pd_v16 nf = __builtin_convertvector(n, pd_v16);
  pd_v16 r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  pd_v16 p = (pd_v16){0} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * (pd_v16)((n + 127) << 23);
}

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
