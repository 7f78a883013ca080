/* Integrity sums for KV transfers: the 64-bit words of strided blocks, summed per
 * block (wrapping), optionally copied to a destination in the same pass.
 *
 * A region of the paged cache is groups (layer, K/V, block) of `slots` runs, each
 * run `run_bytes` contiguous bytes (a slot's heads). Offsets are in bytes, from three
 * group strides and a slot stride on each side; on either side the block index may go
 * through a list of block ids, so that blocks scattered over the cache are summed (and
 * gathered, scattered or copied) in one call. Copying while summing reads the source
 * once, where a checksum followed by a copy reads it twice.
 */
#include <stdint.h>
#include <string.h>

#include "pd_kernels.h"

static uint64_t run_sum(const uint8_t *src, uint8_t *dst, int64_t words) {
  const uint64_t *s = (const uint64_t *)src;
  uint64_t acc = 0;
  if (dst) {
    uint64_t *d = (uint64_t *)dst;
#pragma omp simd reduction(+ : acc)
    for (int64_t w = 0; w < words; w++) {
      const uint64_t v = s[w];
      acc += v;
      d[w] = v;
    }
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t w = 0; w < words; w++) acc += s[w];
  }
  return acc;
}

/* dims: {g0, g1, g2, slots}; strides (bytes): {g0, g1, g2, slot} per side; dst may be
 * NULL (sums only). Block ids (g2 entries each), per side, may be NULL: block i2 is
 * then at i2. sums[g0 * g1 * g2], in group order. run_bytes % 8 == 0, and runs 8-byte
 * aligned. */
void pd_word_sums(const uint8_t *src, const int64_t *src_strides, const int64_t *src_ids,
                  uint8_t *dst, const int64_t *dst_strides, const int64_t *dst_ids,
                  const int64_t *dims, int64_t run_bytes, uint64_t *sums, int threads) {
  const int64_t groups = dims[0] * dims[1] * dims[2];
  int64_t words = run_bytes / 8, slots = dims[3];
  /* A block whose slots lie back to back (all heads) on both sides is one run. */
  if (src_strides[3] == run_bytes && (!dst || dst_strides[3] == run_bytes)) {
    words *= slots;
    slots = 1;
  }
  if (threads > groups) threads = (int)groups;
#pragma omp parallel for schedule(static) num_threads(threads) if (groups > 1)
  for (int64_t g = 0; g < groups; g++) {
    const int64_t i0 = g / (dims[1] * dims[2]), i1 = g / dims[2] % dims[1], i2 = g % dims[2];
    const int64_t b_src = src_ids ? src_ids[i2] : i2, b_dst = dst_ids ? dst_ids[i2] : i2;
    const uint8_t *s = src + i0 * src_strides[0] + i1 * src_strides[1] + b_src * src_strides[2];
    uint8_t *d = dst ? dst + i0 * dst_strides[0] + i1 * dst_strides[1] + b_dst * dst_strides[2] : 0;
    uint64_t acc = 0;
    for (int64_t slot = 0; slot < slots; slot++)
      acc += run_sum(s + slot * src_strides[3], d ? d + slot * dst_strides[3] : 0, words);
    sums[g] = acc;
  }
}
