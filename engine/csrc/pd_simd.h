/* The host vector unit's native float vector, for the register-blocked kernels.
 *
 * One vector is one register of the unit the library is built for: 512-bit with
 * AVX-512 (32 registers), 256-bit with AVX2 and FMA (16 registers), else a 128-bit
 * GCC vector (SSE2, NEON), which every target has. The kernels size their register
 * tiles with PD_VW (floats per vector) and PD_NREGS.
 *
 * Why not one 64-byte vector type everywhere: on a target without 512-bit registers,
 * GCC lowers a 64-byte vector piecewise through the stack, and a scalar broadcast into
 * one (`v * s`) becomes 16 scalar stores and a reload; the AVX2 build of such a matmul
 * ran at a few GFLOP/s.
 */
#ifndef PD_SIMD_H
#define PD_SIMD_H
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define PD_VW 16
#define PD_NREGS 32
#define PD_ISA "avx512"
typedef __m512 pd_vf;
static inline pd_vf pd_vzero(void) { return _mm512_setzero_ps(); }
static inline pd_vf pd_vset1(float s) { return _mm512_set1_ps(s); }
static inline pd_vf pd_vload(const float *p) { return _mm512_load_ps(p); }
static inline pd_vf pd_vloadu(const float *p) { return _mm512_loadu_ps(p); }
static inline void pd_vstoreu(float *p, pd_vf v) { _mm512_storeu_ps(p, v); }
static inline pd_vf pd_vadd(pd_vf a, pd_vf b) { return _mm512_add_ps(a, b); }
/* a * b + c, one rounding */
static inline pd_vf pd_vfma(pd_vf a, pd_vf b, pd_vf c) { return _mm512_fmadd_ps(a, b, c); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PD_VW 8
#define PD_NREGS 16
#define PD_ISA "avx2"
typedef __m256 pd_vf;
static inline pd_vf pd_vzero(void) { return _mm256_setzero_ps(); }
static inline pd_vf pd_vset1(float s) { return _mm256_set1_ps(s); }
static inline pd_vf pd_vload(const float *p) { return _mm256_load_ps(p); }
static inline pd_vf pd_vloadu(const float *p) { return _mm256_loadu_ps(p); }
static inline void pd_vstoreu(float *p, pd_vf v) { _mm256_storeu_ps(p, v); }
static inline pd_vf pd_vadd(pd_vf a, pd_vf b) { return _mm256_add_ps(a, b); }
static inline pd_vf pd_vfma(pd_vf a, pd_vf b, pd_vf c) { return _mm256_fmadd_ps(a, b, c); }
#else
#define PD_VW 4
#define PD_NREGS 16 /* SSE2's count; NEON's 32 leave the same tiles room */
#define PD_ISA "generic"
typedef float pd_vf __attribute__((vector_size(16)));
static inline pd_vf pd_vzero(void) { return (pd_vf){0}; }
static inline pd_vf pd_vset1(float s) { return (pd_vf){0} + s; }
static inline pd_vf pd_vload(const float *p) { return *(const pd_vf *)p; }
static inline pd_vf pd_vloadu(const float *p) {
  pd_vf v;
  memcpy(&v, p, sizeof v);
  return v;
}
static inline void pd_vstoreu(float *p, pd_vf v) { memcpy(p, &v, sizeof v); }
static inline pd_vf pd_vadd(pd_vf a, pd_vf b) { return a + b; }
/* contracted to one fused multiply-add where the target has one (-ffp-contract=fast) */
static inline pd_vf pd_vfma(pd_vf a, pd_vf b, pd_vf c) { return a * b + c; }
#endif

/* Lanes as int32, for the bit-level steps below (the same bits, reinterpreted by a cast). */
typedef int32_t pd_vi __attribute__((vector_size(sizeof(pd_vf))));

/* The first w (<= PD_VW) floats at p into a vector whose other lanes are `fill`. */
static inline pd_vf pd_vload_part(const float *p, int64_t w, float fill) {
  if (w == PD_VW) return pd_vloadu(p);
  pd_vf v = pd_vset1(fill);
  memcpy(&v, p, (size_t)w * sizeof(float));
  return v;
}

static inline void pd_vstore_part(float *p, pd_vf v, int64_t w) {
  if (w == PD_VW)
    pd_vstoreu(p, v);
  else
    memcpy(p, &v, (size_t)w * sizeof(float));
}

/* exp of each lane, within 1 ulp (measured over [-87, 88]). x = n ln2 + r with
 * |r| <= ln2/2, exp(r) by a degree-6 polynomial, scaled by 2^n through the exponent
 * bits. Below -87.3 it returns 2^-126 (about 1.2e-38) where expf would go subnormal;
 * from 88.38 up, +inf (expf overflows at 88.72). In vector code because the libm call
 * doesn't vectorize. */
static inline pd_vf pd_vexp(pd_vf x) {
  const pd_vf lo = pd_vset1(-87.33654f), hi = pd_vset1(88.72283f);
  pd_vi m = x < lo;
  x = (pd_vf)(((pd_vi)x & ~m) | ((pd_vi)lo & m));
  m = x > hi;
  x = (pd_vf)(((pd_vi)x & ~m) | ((pd_vi)hi & m));
  const pd_vf t = x * 1.44269504088896341f + 0.5f;
  pd_vi n = __builtin_convertvector(t, pd_vi); /* toward zero */
  n += __builtin_convertvector(n, pd_vf) > t;  /* -1 where that rounded up: floor */
  const pd_vf nf = __builtin_convertvector(n, pd_vf);
  pd_vf r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  pd_vf p = pd_vset1(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * (pd_vf)((n + 127) << 23);
}

#endif
