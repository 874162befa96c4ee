/* Float32 CPU kernels for decode-sized inputs (see kernels/cpu_native.py, which builds and loads
 * the library, and the torch references they are tested against: kernels/linear.py `linear_ref`,
 * kernels/norm.py `rms_norm_ref`, cpu_native.py `attention_ref`, cluster/layers.py
 * `apply_rope_rolled`; the MoE kernel is in cpu_moe.c, a decode token's attention half in
 * cpu_attention.c).
 *
 * Each thread streams one contiguous run of weight rows, one row after another, so the hardware
 * prefetcher sees a single sequential stream per core; every row is dotted with all of x's rows
 * while it is in L1. Threads split the work by hand (OpenMP parallel regions and barriers only, no
 * worksharing constructs), so the file links against whichever libgomp the process has already
 * loaded (torch's). Dot products use the compiler's vector extensions (see ms_dot), not -ffast-math.
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>

#include "cpu_native.h"

/* Rows [lo, hi) of y[m, n] = x[m, :] . w[n, :] (+ bias[n]); y has row stride y_stride. */
static void ms_rows(const float *x, int64_t x_stride, const float *w, const float *bias, float *y,
                    int64_t y_stride, int64_t m_rows, int64_t k, int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
        const float *wn = w + n * k;
        float b = bias ? bias[n] : 0.f;
        int64_t m = 0;
        for (; m + 4 <= m_rows; m += 4) {
            const float *xs[4] = {x + m * x_stride, x + (m + 1) * x_stride, x + (m + 2) * x_stride,
                                  x + (m + 3) * x_stride};
            float d[4];
            ms_dot4(wn, xs, k, d);
            for (int j = 0; j < 4; ++j) y[(m + j) * y_stride + n] = d[j] + b;
        }
        for (; m < m_rows; ++m) y[m * y_stride + n] = ms_dot(wn, x + m * x_stride, k) + b;
    }
}

/* y [m, n] = x [m, k] @ w [n, k]^T (+ bias [n]). x rows may be strided; w, y contiguous. */
void ms_linear(const float *x, int64_t x_stride, const float *w, const float *bias, float *y,
               int64_t m_rows, int64_t n, int64_t k, int threads) {
#pragma omp parallel num_threads(ms_threads(n * k, threads))
    {
        int64_t lo, hi;
        ms_share(n, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        ms_rows(x, x_stride, w, bias, y, n, m_rows, k, lo, hi);
    }
}

/* out [m, d] = x [m, d] * rsqrt(mean(x^2) + eps) * w [d]; x rows may be strided, out contiguous. */
void ms_rms_norm(const float *x, int64_t x_stride, const float *w, float eps, float *out, int64_t m_rows,
                 int64_t d) {
    for (int64_t m = 0; m < m_rows; ++m) {
        const float *xm = x + m * x_stride;
        float scale = 1.f / sqrtf(ms_dot(xm, xm, d) / (float)d + eps);
        float *om = out + m * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) om[i] = xm[i] * scale * w[i];
    }
}

/* One query per head over `keys` consecutive cached positions (decode attention, GQA):
 * out [nh, d] = softmax(scale * q_h . k_j) . v_j, with head h reading KV head h / (nh / nkv).
 * q: [nh, d] contiguous; k, v: the first position's row of [slots, nkv, d] caches (kv_row floats
 * from one position to the next); scores: nh * keys floats of scratch. Positions are the outer loop,
 * so each thread reads the cache rows in order, as the prefetcher likes (heads outer read them with
 * a stride of one row, and a layer's cold cache cost several times the arithmetic). */
void ms_attend(const float *q, const float *k, const float *v, int64_t kv_row, int64_t keys, int64_t nh,
               int64_t nkv, int64_t d, float scale, float *out, float *scores, int threads) {
    int64_t group = nh / nkv;
#pragma omp parallel num_threads(ms_threads(2 * nh * keys * d, threads))
    {
        int64_t lo, hi;
        ms_share(nh, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        for (int64_t j = 0; j < keys; ++j)
            for (int64_t h = lo; h < hi; ++h)
                scores[h * keys + j] = scale * ms_dot(k + j * kv_row + (h / group) * d, q + h * d, d);
        for (int64_t h = lo; h < hi; ++h) {
            float *s = scores + h * keys, top = -INFINITY, sum = 0.f;
            for (int64_t j = 0; j < keys; ++j) top = s[j] > top ? s[j] : top;
            for (int64_t j = 0; j < keys; ++j) sum += (s[j] = expf(s[j] - top));
            for (int64_t j = 0; j < keys; ++j) s[j] /= sum;
            for (int64_t i = 0; i < d; ++i) out[h * d + i] = 0.f;
        }
        for (int64_t j = 0; j < keys; ++j)
            for (int64_t h = lo; h < hi; ++h) {
                const float *vj = v + j * kv_row + (h / group) * d;
                float p = scores[h * keys + j], *o = out + h * d;
#pragma omp simd
                for (int64_t i = 0; i < d; ++i) o[i] += p * vj[i];
            }
    }
}

/* n queries of one sequence, the last n of its `keys` consecutive positions, each over the keys up
 * to its own position (causal): query i attends the first keys - n + 1 + i. q: [n, nh, d]
 * contiguous; out: n rows of nh * d floats, out_stride apart; scores: nh * keys floats. */
void ms_attend_causal(const float *q, int64_t n, const float *k, const float *v, int64_t kv_row, int64_t keys,
                      int64_t nh, int64_t nkv, int64_t d, float scale, float *out, int64_t out_stride,
                      float *scores, int threads) {
    for (int64_t i = 0; i < n; ++i)
        ms_attend(q + i * nh * d, k, v, kv_row, keys - n + 1 + i, nh, nkv, d, scale, out + i * out_stride, scores,
                  threads);
}

/* Rotary embedding in place, HF's rotate_half form: for each row t and head, x = x * cos[t] +
 * roll(x, d / 2) * sin_signed[t] (sin with its first half negated; cluster/layers.py
 * `apply_rope_rolled`). x: [rows, heads, d] with heads d floats apart and rows row_stride apart. */
void ms_rope(float *x, int64_t row_stride, int64_t rows, int64_t heads, int64_t d, const float *cos,
             const float *sin_signed) {
    int64_t half = d / 2;
    for (int64_t t = 0; t < rows; ++t) {
        const float *c = cos + t * d, *s = sin_signed + t * d;
        for (int64_t h = 0; h < heads; ++h) {
            float *xh = x + t * row_stride + h * d;
            for (int64_t i = 0; i < half; ++i) {
                float a = xh[i], b = xh[half + i];
                xh[i] = a * c[i] + b * s[i];
                xh[half + i] = b * c[half + i] + a * s[half + i];
            }
        }
    }
}
