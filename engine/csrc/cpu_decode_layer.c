/* One decoder layer for a step of decode tokens only, fp32 on the CPU, in one call.
 *
 * A decode step's layer is a dozen small ops; run one by one from Python, their
 * dispatch costs about as much as reading the layer's weights. Here the layer runs
 * start to end in C, on the same kernels the per-op path uses:
 *   x = rms_norm(h); qkv = x Wqkv (+b); rotate q, k; store k, v in the cache;
 *   a = attention(q, cache); h += a Wo; x = rms_norm(h); h += silu_mul(x Wgu) Wd.
 * h [B, hidden] is updated in place. Scratch comes from the caller, sized by
 * `pd_decode_scratch_floats`.
 */
#include <stdint.h>
#include <string.h>

#include "pd_kernels.h"

typedef struct {
  const float *input_norm, *qkv, *qkv_bias, *o, *post_norm, *gate_up, *down;
  int64_t hidden, q_heads, kv_heads, head_dim, intermediate;
  float eps, scale;
} pd_layer;

typedef struct {
  int64_t tokens, block_size, table_stride;
  const int64_t *positions, *slots, *tables, *lens;
  const float *cos, *sin; /* [max_positions, head_dim] rotary tables */
  float *scratch;
  int threads;
} pd_step;

int64_t pd_decode_scratch_floats(const pd_layer *l, int64_t tokens) {
  int64_t qkv = (l->q_heads + 2 * l->kv_heads) * l->head_dim;
  return tokens * (l->hidden + qkv + l->q_heads * l->head_dim + 3 * l->intermediate);
}

/* Half-split rotary embedding of `heads` heads of one token, in place. */
static void rotate(float *v, int64_t heads, int64_t dim, const float *cos, const float *sin) {
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; h++, v += dim)
    for (int64_t i = 0; i < half; i++) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] + -b * sin[i];
      v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

int pd_decode_layer(const pd_layer *l, const pd_step *s, float *h, float *k_cache,
                    float *v_cache) {
  const int64_t t = s->tokens, d = l->head_dim, hid = l->hidden;
  const int64_t q_width = l->q_heads * d, kv_width = l->kv_heads * d;
  const int64_t qkv_width = q_width + 2 * kv_width;
  float *x = s->scratch, *qkv = x + t * hid, *attn = qkv + t * qkv_width;
  float *gate_up = attn + t * q_width, *act = gate_up + t * 2 * l->intermediate;

  pd_rms_norm(h, hid, l->input_norm, x, t, hid, l->eps, s->threads);
  pd_linear_into(x, hid, l->qkv, l->qkv_bias, qkv, qkv_width, t, qkv_width, hid, 0, s->threads);
  for (int64_t i = 0; i < t; i++) {
    float *row = qkv + i * qkv_width;
    const int64_t pos = s->positions[i];
    rotate(row, l->q_heads + l->kv_heads, d, s->cos + pos * d, s->sin + pos * d);
    const int64_t slot = s->slots[i];
    memcpy(k_cache + slot * kv_width, row + q_width, (size_t)kv_width * sizeof(float));
    memcpy(v_cache + slot * kv_width, row + q_width + kv_width, (size_t)kv_width * sizeof(float));
  }
  int rc = pd_decode_attention(qkv, qkv_width, k_cache, v_cache, s->tables, s->table_stride,
                               s->lens, attn, t, l->q_heads, l->kv_heads, d, s->block_size,
                               l->scale, s->threads);
  if (rc) return rc;
  pd_linear_into(attn, q_width, l->o, 0, h, hid, t, hid, q_width, 1, s->threads);
  pd_rms_norm(h, hid, l->post_norm, x, t, hid, l->eps, s->threads);
  pd_linear_into(x, hid, l->gate_up, 0, gate_up, 2 * l->intermediate, t, 2 * l->intermediate,
                 hid, 0, s->threads);
  pd_silu_mul(gate_up, act, t, l->intermediate, s->threads);
  pd_linear_into(act, l->intermediate, l->down, 0, h, hid, t, hid, l->intermediate, 1,
                 s->threads);
  return 0;
}
