/* What the C files of the library share: the inline helpers every kernel uses, and the kernels of
 * cpu_native.c that other files compose. */
#ifndef MOE_SERVE_CPU_NATIVE_H
#define MOE_SERVE_CPU_NATIVE_H
#include <math.h>
#include <stdint.h>

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

static inline float ms_dot(const float *restrict a, const float *restrict b, int64_t n) {
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

/* out[j] = ms_dot(a, b[j], n) for four b rows at once, the same bits as four ms_dot calls (each pair
 * keeps ms_dot's four chains, its order and its tail), with each vector of a loaded once for all
 * four: 1.25 loads per multiply-add instead of 2, which bound ms_dot once a's row is in L1. */
static inline void ms_dot4(const float *restrict a, const float *const b[4], int64_t n, float out[4]) {
    const float *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
    ms_v16 c00 = {0.f}, c01 = {0.f}, c02 = {0.f}, c03 = {0.f}, c10 = {0.f}, c11 = {0.f}, c12 = {0.f}, c13 = {0.f};
    ms_v16 c20 = {0.f}, c21 = {0.f}, c22 = {0.f}, c23 = {0.f}, c30 = {0.f}, c31 = {0.f}, c32 = {0.f}, c33 = {0.f};
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        for (int line = 0; line < 64; line += 16) __builtin_prefetch(a + i + MS_PREFETCH + line);
        ms_v16 a0 = ms_load(a + i), a1 = ms_load(a + i + 16), a2 = ms_load(a + i + 32), a3 = ms_load(a + i + 48);
        c00 += a0 * ms_load(b0 + i), c01 += a1 * ms_load(b0 + i + 16), c02 += a2 * ms_load(b0 + i + 32),
        c03 += a3 * ms_load(b0 + i + 48);
        c10 += a0 * ms_load(b1 + i), c11 += a1 * ms_load(b1 + i + 16), c12 += a2 * ms_load(b1 + i + 32),
        c13 += a3 * ms_load(b1 + i + 48);
        c20 += a0 * ms_load(b2 + i), c21 += a1 * ms_load(b2 + i + 16), c22 += a2 * ms_load(b2 + i + 32),
        c23 += a3 * ms_load(b2 + i + 48);
        c30 += a0 * ms_load(b3 + i), c31 += a1 * ms_load(b3 + i + 16), c32 += a2 * ms_load(b3 + i + 32),
        c33 += a3 * ms_load(b3 + i + 48);
    }
    for (; i + 16 <= n; i += 16) {
        ms_v16 a0 = ms_load(a + i);
        c00 += a0 * ms_load(b0 + i), c10 += a0 * ms_load(b1 + i), c20 += a0 * ms_load(b2 + i),
        c30 += a0 * ms_load(b3 + i);
    }
    float s0 = ms_hsum((c00 + c01) + (c02 + c03)), s1 = ms_hsum((c10 + c11) + (c12 + c13));
    float s2 = ms_hsum((c20 + c21) + (c22 + c23)), s3 = ms_hsum((c30 + c31) + (c32 + c33));
    for (; i < n; ++i) s0 += a[i] * b0[i], s1 += a[i] * b1[i], s2 += a[i] * b2[i], s3 += a[i] * b3[i];
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

/* g * sigmoid(g), through exp(-|g|), which never overflows (an overflowing expf takes glibc's slow
 * error path: random weights made a MoE layer 5x slower). */
static inline float ms_silu(float g) {
    float e = expf(-fabsf(g));
    return g * (g >= 0.f ? 1.f / (1.f + e) : e / (1.f + e));
}

/* Rows [*lo, *hi) of n that thread t of nt owns. */
static inline void ms_share(int64_t n, int t, int nt, int64_t *lo, int64_t *hi) {
    int64_t per = (n + nt - 1) / nt;
    *lo = t * per < n ? t * per : n;
    *hi = *lo + per < n ? *lo + per : n;
}

static inline int ms_threads(int64_t floats, int threads) {
    return floats < MS_PARALLEL_MIN_FLOATS || threads < 1 ? 1 : threads;
}


void ms_linear(const float *x, int64_t x_stride, const float *w, const float *bias, float *y,
               int64_t m_rows, int64_t n, int64_t k, int threads);
void ms_rms_norm(const float *x, int64_t x_stride, const float *w, float eps, float *out, int64_t m_rows,
                 int64_t d);
void ms_attend(const float *q, const float *k, const float *v, int64_t kv_row, int64_t keys, int64_t nh,
               int64_t nkv, int64_t d, float scale, float *out, float *scores, int threads);
void ms_attend_causal(const float *q, int64_t n, const float *k, const float *v, int64_t kv_row, int64_t keys,
                      int64_t nh, int64_t nkv, int64_t d, float scale, float *out, int64_t out_stride,
                      float *scores, int threads);
void ms_rope(float *x, int64_t row_stride, int64_t rows, int64_t heads, int64_t d, const float *cos,
             const float *sin_signed);

#endif
