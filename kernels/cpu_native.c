/* Float32 CPU kernels for decode-sized inputs (see kernels/cpu_native.py, which builds and loads
 * this file, and the torch references it is tested against: kernels/linear.py `linear_ref`,
 * kernels/fused_moe.py `fused_moe_ref`, cluster/layers.py `rms_norm`).
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

/* Work below which a call runs on one thread: waking the others costs more than it saves. */
#define MS_PARALLEL_MIN_FLOATS (64 * 1024)

/* a . b in four independent chains of 16-float vectors (GCC/Clang vector extensions: the compiler
 * maps them onto the CPU's own vector width). The element order of the sum is fixed by n alone. */
typedef float ms_v16 __attribute__((vector_size(64)));
typedef float ms_v8 __attribute__((vector_size(32)));
typedef float ms_v4 __attribute__((vector_size(16)));

static inline ms_v16 ms_load(const float *p) {
    ms_v16 v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

/* The sum of a vector's lanes as a tree of halves (a chain of 16 scalar adds cost more than a
 * 64-float dot product itself). */
static inline float ms_hsum(ms_v16 v) {
    ms_v8 a, b;
    ms_v4 c, d;
    __builtin_memcpy(&a, &v, sizeof a);
    __builtin_memcpy(&b, (const char *)&v + sizeof a, sizeof b);
    a += b;
    __builtin_memcpy(&c, &a, sizeof c);
    __builtin_memcpy(&d, (const char *)&a + sizeof c, sizeof d);
    c += d;
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* How far ahead (floats) ms_dot prefetches its first operand, the weights it streams: on the 2-core
 * VM a projection of 50,304 x 512 read 38-40 GB/s with 4,096 (also 8,192 and 16,384) against 36-37
 * without, where the probe's sum read 42-44. */
#define MS_PREFETCH 4096

static float ms_dot(const float *restrict a, const float *restrict b, int64_t n) {
    ms_v16 c0 = {0.f}, c1 = {0.f}, c2 = {0.f}, c3 = {0.f};
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        for (int line = 0; line < 64; line += 16) __builtin_prefetch(a + i + MS_PREFETCH + line);
        c0 += ms_load(a + i) * ms_load(b + i);
        c1 += ms_load(a + i + 16) * ms_load(b + i + 16);
        c2 += ms_load(a + i + 32) * ms_load(b + i + 32);
        c3 += ms_load(a + i + 48) * ms_load(b + i + 48);
    }
    for (; i + 16 <= n; i += 16) c0 += ms_load(a + i) * ms_load(b + i);
    float s = ms_hsum((c0 + c1) + (c2 + c3));
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

/* g * sigmoid(g), through exp(-|g|), which never overflows (an overflowing expf takes glibc's slow
 * error path: random weights made a MoE layer 5x slower). */
static float ms_silu(float g) {
    float e = expf(-fabsf(g));
    return g * (g >= 0.f ? 1.f / (1.f + e) : e / (1.f + e));
}

/* Rows [*lo, *hi) of n that thread t of nt owns. */
static void ms_share(int64_t n, int t, int nt, int64_t *lo, int64_t *hi) {
    int64_t per = (n + nt - 1) / nt;
    *lo = t * per < n ? t * per : n;
    *hi = *lo + per < n ? *lo + per : n;
}

static int ms_threads(int64_t floats, int threads) {
    return floats < MS_PARALLEL_MIN_FLOATS || threads < 1 ? 1 : threads;
}

/* Rows [lo, hi) of y[m, n] = x[m, :] . w[n, :] (+ bias[n]); y has row stride y_stride. */
static void ms_rows(const float *x, int64_t x_stride, const float *w, const float *bias, float *y,
                    int64_t y_stride, int64_t m_rows, int64_t k, int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
        const float *wn = w + n * k;
        float b = bias ? bias[n] : 0.f;
        for (int64_t m = 0; m < m_rows; ++m) y[m * y_stride + n] = ms_dot(wn, x + m * x_stride, k) + b;
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

/* silu(gate(x)) * up(x) of one expert, rows [lo, hi) of the intermediate dimension, into act. */
static void ms_act(const float *x, const float *wgu, int64_t h, int64_t inter, int64_t lo, int64_t hi, float *act) {
    for (int64_t i = lo; i < hi; ++i)
        act[i] = ms_silu(ms_dot(wgu + i * h, x, h)) * ms_dot(wgu + (inter + i) * h, x, h);
}

/* One token through its experts: out [h] = sum_j weights[j] * down_e(silu(gate_e(x)) * up_e(x)) over
 * e = ids[j] >= 0 (a negative id is an expert held elsewhere), in ascending id order as fused_moe_ref
 * adds them. Expert e's [2i, h] gate and up rows start at gate_up + e * gate_up_stride, its [h, i]
 * down rows at down + e * down_stride. scratch: threads * (h + i) floats.
 * When the experts divide evenly among the threads, each thread runs whole experts into a partial
 * sum of its own: one sequential stream per thread and no barrier until the partial sums are added
 * (on the 2-core VM this read 36-45 GB/s where splitting every expert's rows read 29-45). Otherwise
 * each expert's rows are split among the threads, with one barrier per expert (two activation
 * buffers alternate). */
void ms_moe_token(const float *x, const float *gate_up, int64_t gate_up_stride, const float *down,
                  int64_t down_stride, const int64_t *ids, const float *weights, int64_t top_k, int64_t h,
                  int64_t inter, float *out, float *scratch, int threads) {
    int64_t order[top_k > 0 ? top_k : 1], k = 0;
    for (int64_t j = 0; j < top_k; ++j) {  /* the valid slots, by ascending id (insertion sort) */
        if (ids[j] < 0) continue;
        int64_t at = k++;
        for (; at > 0 && ids[order[at - 1]] > ids[j]; --at) order[at] = order[at - 1];
        order[at] = j;
    }
#pragma omp parallel num_threads(ms_threads(3 * h * inter, threads))
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t lo, hi, olo, ohi;
        ms_share(h, t, nt, &olo, &ohi);
        if (k % nt == 0) {
            float *part = scratch + t * (h + inter), *act = part + h;
            for (int64_t n = 0; n < h; ++n) part[n] = 0.f;
            for (int64_t j = t * (k / nt); j < (t + 1) * (k / nt); ++j) {
                const float *wd = down + ids[order[j]] * down_stride;
                ms_act(x, gate_up + ids[order[j]] * gate_up_stride, h, inter, 0, inter, act);
                for (int64_t n = 0; n < h; ++n) part[n] += ms_dot(wd + n * inter, act, inter) * weights[order[j]];
            }
#pragma omp barrier
            for (int64_t n = olo; n < ohi; ++n) {
                float sum = 0.f;
                for (int u = 0; u < nt; ++u) sum += scratch[u * (h + inter) + n];
                out[n] = sum;
            }
        } else {
            ms_share(inter, t, nt, &lo, &hi);
            for (int64_t n = olo; n < ohi; ++n) out[n] = 0.f;
            for (int64_t j = 0; j < k; ++j) {
                const float *wd = down + ids[order[j]] * down_stride;
                float *act = scratch + (j % 2) * inter;
                ms_act(x, gate_up + ids[order[j]] * gate_up_stride, h, inter, lo, hi, act);
#pragma omp barrier
                for (int64_t n = olo; n < ohi; ++n) out[n] += ms_dot(wd + n * inter, act, inter) * weights[order[j]];
            }
        }
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
