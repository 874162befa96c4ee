/* The attention half of a decoder layer for one decode token, in one call (see
 * kernels/cpu_native.py `attention_block_native`). It runs the same kernels in the same order as the attention worker's
 * unfused path with the C kernels (cluster/attention_worker.py `attention`), so it gives the same
 * bits; what it saves is the glue between them: ~20 torch ops per layer, each run with cold caches
 * since the weights streamed in between have evicted torch's own code and data. */
#include <stdint.h>
#include <string.h>

#include "cpu_native.h"

enum { MS_QK_NONE = 0, MS_QK_FULL = 1, MS_QK_HEAD = 2 };

/* h_out [hid] = h + o(attention(input_norm(h))), x_out [hid] = post_norm(h_out). The token's key and
 * value go to cache slot first + keys - 1 (the last of its `keys` consecutive slots). qkv_bias,
 * q_norm and k_norm may be NULL; clip <= 0 means no clipping. cos and sin_signed: the rotary rows
 * at the token's position. scratch: 2 * hid + (2 * nh + 2 * nkv) * d + nh * keys floats. */
void ms_attention_block(const float *h, float *h_out, float *x_out, int64_t hid, const float *input_norm,
                        const float *post_norm, float eps, const float *qkv_w, const float *qkv_bias,
                        const float *q_norm, const float *k_norm, int qk_mode, float clip, const float *cos,
                        const float *sin_signed, float *k_cache, float *v_cache, int64_t first, int64_t keys,
                        int64_t nh, int64_t nkv, int64_t d, float scale, const float *o_w, float *scratch,
                        int threads) {
    int64_t q_out = nh * d, kv_out = nkv * d, n_qkv = q_out + 2 * kv_out, row = kv_out;
    float *xn = scratch, *qkv = xn + hid, *attn = qkv + n_qkv, *o = attn + q_out, *scores = o + hid;
    float *q = qkv, *k = qkv + q_out, *v = k + kv_out;
    ms_rms_norm(h, hid, input_norm, eps, xn, 1, hid);
    ms_linear(xn, hid, qkv_w, qkv_bias, qkv, 1, n_qkv, hid, threads);
    if (qk_mode == MS_QK_FULL) {
        ms_rms_norm(q, q_out, q_norm, eps, q, 1, q_out);
        ms_rms_norm(k, kv_out, k_norm, eps, k, 1, kv_out);
    }
    if (clip > 0.f)
        for (int64_t i = 0; i < n_qkv; ++i) qkv[i] = qkv[i] < -clip ? -clip : (qkv[i] > clip ? clip : qkv[i]);
    if (qk_mode == MS_QK_HEAD) {
        ms_rms_norm(q, d, q_norm, eps, q, nh, d);
        ms_rms_norm(k, d, k_norm, eps, k, nkv, d);
    }
    ms_rope(q, q_out, 1, nh, d, cos, sin_signed);
    ms_rope(k, kv_out, 1, nkv, d, cos, sin_signed);
    memcpy(k_cache + (first + keys - 1) * row, k, kv_out * sizeof(float));
    memcpy(v_cache + (first + keys - 1) * row, v, kv_out * sizeof(float));
    ms_attend(q, k_cache + first * row, v_cache + first * row, row, keys, nh, nkv, d, scale, attn, scores, threads);
    ms_linear(attn, q_out, o_w, 0, o, 1, hid, q_out, threads);
    for (int64_t i = 0; i < hid; ++i) h_out[i] = h[i] + o[i];
    ms_rms_norm(h_out, hid, post_norm, eps, x_out, 1, hid);
}
