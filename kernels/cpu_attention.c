/* The attention half of a decoder layer for a few new tokens of one sequence, in one call (see
 * kernels/cpu_native.py `attention_block_native`). It runs the same kernels in the same order as the attention worker's
 * unfused path with the C kernels (cluster/attention_worker.py `attention`), so it gives the same
 * bits; what it saves is the glue between them: ~20 torch ops per layer, each run with cold caches
 * since the weights streamed in between have evicted torch's own code and data. */
#include <stdint.h>
#include <string.h>

#include "cpu_native.h"

enum { MS_QK_NONE = 0, MS_QK_FULL = 1, MS_QK_HEAD = 2 };

/* For n new tokens of one sequence (a decode token, or a draft chunk; n <= 8 as the unfused path's
 * attention kernel takes), rows r of h [n, hid]: h_out[r] = h[r] + o(attention(input_norm(h[r]))),
 * x_out[r] = post_norm(h_out[r]). Their keys and values go to the last n of the sequence's `keys`
 * consecutive cache slots from `first`; query r attends the slots up to its own (causal). qkv_bias,
 * q_norm and k_norm may be NULL; clip <= 0 means no clipping. cos and sin_signed: [n, d], the rotary
 * rows at the tokens' positions. scratch: n * (2 * hid + 2 * nh * d + 2 * nkv * d + nh * d) + nh * keys
 * floats. */
void ms_attention_block(const float *h, float *h_out, float *x_out, int64_t n, int64_t hid, const float *input_norm,
                        const float *post_norm, float eps, const float *qkv_w, const float *qkv_bias,
                        const float *q_norm, const float *k_norm, int qk_mode, float clip, const float *cos,
                        const float *sin_signed, float *k_cache, float *v_cache, int64_t first, int64_t keys,
                        int64_t nh, int64_t nkv, int64_t d, float scale, const float *o_w, float *scratch,
                        int threads) {
    int64_t q_out = nh * d, kv_out = nkv * d, n_qkv = q_out + 2 * kv_out, row = kv_out;
    float *xn = scratch, *qkv = xn + n * hid, *q = qkv + n * n_qkv, *attn = q + n * q_out, *o = attn + n * q_out;
    float *scores = o + n * hid;
    ms_rms_norm(h, hid, input_norm, eps, xn, n, hid);
    ms_linear(xn, hid, qkv_w, qkv_bias, qkv, n, n_qkv, hid, threads);
    for (int64_t r = 0; r < n && qk_mode == MS_QK_FULL; ++r) {
        float *qr = qkv + r * n_qkv, *kr = qr + q_out;
        ms_rms_norm(qr, q_out, q_norm, eps, qr, 1, q_out);
        ms_rms_norm(kr, kv_out, k_norm, eps, kr, 1, kv_out);
    }
    if (clip > 0.f)
        for (int64_t i = 0; i < n * n_qkv; ++i) qkv[i] = qkv[i] < -clip ? -clip : (qkv[i] > clip ? clip : qkv[i]);
    for (int64_t r = 0; r < n && qk_mode == MS_QK_HEAD; ++r) {
        float *qr = qkv + r * n_qkv, *kr = qr + q_out;
        ms_rms_norm(qr, d, q_norm, eps, qr, nh, d);
        ms_rms_norm(kr, d, k_norm, eps, kr, nkv, d);
    }
    ms_rope(qkv, n_qkv, n, nh, d, cos, sin_signed);
    ms_rope(qkv + q_out, n_qkv, n, nkv, d, cos, sin_signed);
    for (int64_t r = 0; r < n; ++r) {
        const float *qr = qkv + r * n_qkv;
        int64_t slot = first + keys - n + r;
        memcpy(q + r * q_out, qr, q_out * sizeof(float));
        memcpy(k_cache + slot * row, qr + q_out, kv_out * sizeof(float));
        memcpy(v_cache + slot * row, qr + q_out + kv_out, kv_out * sizeof(float));
    }
    ms_attend_causal(q, n, k_cache + first * row, v_cache + first * row, row, keys, nh, nkv, d, scale, attn, q_out,
                     scores, threads);
    ms_linear(attn, q_out, o_w, 0, o, n, hid, q_out, threads);
    for (int64_t i = 0; i < n * hid; ++i) h_out[i] = h[i] + o[i];
    ms_rms_norm(h_out, hid, post_norm, eps, x_out, n, hid);
}
