/* Drawing one token from a row of logits with temperature, top-k and top-p, on the CPU (see
 * kernels/cpu_native.py `sample_native`; tested against cluster/sampler.py's torch path). Without a
 * sort: top-k keeps the probabilities at or above the k-th largest (found by selection, as HF keeps
 * every token tied with the k-th), top-p the smallest set of the largest ones whose mass reaches
 * top_p (found by a selection on mass; tokens tied at its edge are all kept), and the draw walks
 * the kept tokens in id order, as the torch path does.
 *
 * The passes over the whole row run on 16-float vectors (the exponentials too: ms_exp16); the
 * selections run only on the tokens at or above a bound the final cut cannot fall below (ms_floor),
 * which for a peaked row is a few dozen of tens of thousands; the draw sums blocks of 64 and walks
 * one block. Rows are shared among the threads (ms_sample_rows). */
#include <math.h>
#include <stdint.h>
#include <omp.h>

#include "cpu_native.h"

typedef int32_t ms_i16 __attribute__((vector_size(64)));
typedef double ms_d8 __attribute__((vector_size(64)));

/* exp(x) for x <= 0 in 16 lanes: 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 (ln 2 in two
 * parts, Cody-Waite), e^r by its Taylor series to r^7 (|r| <= ln 2 / 2: within 1e-8 relative, under
 * an ulp, before rounding); 0 below -87.3, where 2^n would leave the normal floats. */
static inline ms_v16 ms_exp16(ms_v16 x) {
    const ms_v16 zero = {0.f};
    ms_i16 normal = x >= -87.3f;  /* -1 in the lanes that stay */
    x = (ms_v16)(((ms_i16)x & normal) | ((ms_i16)(zero - 87.3f) & ~normal));
    ms_i16 n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, ms_i16);  /* x <= 0: rounds */
    ms_v16 nf = __builtin_convertvector(n, ms_v16);
    ms_v16 r = (x - nf * 0.693145751953125f) - nf * 1.42860682030941723212e-6f;
    ms_v16 e = r * (1.f / 5040) + 1.f / 720;
    e = e * r + 1.f / 120;
    e = e * r + 1.f / 24;
    e = e * r + 1.f / 6;
    e = e * r + 0.5f;
    e = e * r + 1.f;
    e = e * r + 1.f;
    ms_v16 y = e * (ms_v16)((n + 127) << 23);
    return (ms_v16)((ms_i16)y & normal);
}

static inline double ms_dsum(ms_v16 v) {  /* the 16 lanes summed in double */
    ms_v8 lo, hi;
    __builtin_memcpy(&lo, &v, sizeof lo);
    __builtin_memcpy(&hi, (const char *)&v + sizeof lo, sizeof hi);
    ms_d8 d = __builtin_convertvector(lo, ms_d8) + __builtin_convertvector(hi, ms_d8);
    return ((d[0] + d[1]) + (d[2] + d[3])) + ((d[4] + d[5]) + (d[6] + d[7]));
}

static inline ms_v16 ms_masked(ms_v16 v, ms_i16 keep) { return (ms_v16)((ms_i16)v & keep); }

/* Hoare partition of a[lo..hi] around its middle value, larger values first: on return
 * a[lo..*j] >= pivot, a[*j+1..*i-1] == pivot, a[*i..hi] <= pivot; returns the pivot. */
static float ms_partition(float *a, int64_t lo, int64_t hi, int64_t *i_out, int64_t *j_out) {
    float pivot = a[lo + (hi - lo) / 2];
    int64_t i = lo, j = hi;
    while (i <= j) {
        while (a[i] > pivot) ++i;
        while (a[j] < pivot) --j;
        if (i <= j) { float t = a[i]; a[i] = a[j]; a[j] = t; ++i; --j; }
    }
    *i_out = i, *j_out = j;
    return pivot;
}

/* The `rank`-th largest of a[0..n) (rank 1: the largest); reorders a. Quickselect, O(n) on average. */
static float ms_select(float *a, int64_t n, int64_t rank) {
    int64_t lo = 0, hi = n - 1, want = rank - 1, i, j;
    while (lo < hi) {
        ms_partition(a, lo, hi, &i, &j);
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return a[want];
    }
    return a[want];
}

/* The largest threshold t among a[0..n) such that the values >= t sum to at least `mass`; reorders a.
 * A selection on mass: each round partitions around a pivot and keeps the side holding the edge. */
static float ms_mass_threshold(float *a, int64_t n, double mass) {
    int64_t lo = 0, hi = n - 1, i, j;
    double above = 0.0;  /* the mass of values known to be larger than a[lo..hi] */
    while (lo < hi) {
        float pivot = ms_partition(a, lo, hi, &i, &j);
        double big = 0.0, mid = 0.0;
        for (int64_t x = lo; x <= j; ++x) big += a[x];
        for (int64_t x = j + 1; x < i; ++x) mid += a[x];
        if (above + big >= mass && j >= lo) hi = j;  /* the edge lies among the larger values */
        else if (above + big + mid >= mass || i > hi) return pivot;
        else { above += big + mid; lo = i; }
    }
    return a[lo];
}

/* p[i] = exp((logits[i] - max) / temperature) for the row; returns the sum of p (double lanes). */
static double ms_exps(const float *logits, int64_t v, float temperature, float *p) {
    int64_t i = 0, body = v / 16 * 16;
    float top = -INFINITY;
    if (body) {
        ms_v16 m = ms_load(logits);
        for (i = 16; i < body; i += 16) {
            ms_v16 x = ms_load(logits + i);
            ms_i16 more = x > m;
            m = (ms_v16)(((ms_i16)x & more) | ((ms_i16)m & ~more));
        }
        for (int l = 0; l < 16; ++l) top = m[l] > top ? m[l] : top;
    }
    for (i = body; i < v; ++i) top = logits[i] > top ? logits[i] : top;
    double total = 0.0;
    for (i = 0; i < body; i += 16) {
        ms_v16 e = ms_exp16((ms_load(logits + i) - top) / temperature);
        __builtin_memcpy(p + i, &e, sizeof e);
        total += ms_dsum(e);
    }
    for (; i < v; ++i) total += (p[i] = expf((logits[i] - top) / temperature));
    return total;
}

/* Thresholds at which ms_floor counts the tokens and their mass. */
#define MS_LEVELS 6
static const float MS_LEVEL[MS_LEVELS] = {0x1p-2f, 0x1p-5f, 0x1p-8f, 0x1p-12f, 0x1p-17f, 0x1p-24f};

/* A bound below which no token is kept nor needed: with top_k, the largest level with at least
 * top_k tokens at or above it (the k-th largest is at least that; top-p then selects among what
 * top-k keeps, all of it above the bound); with top_p alone, the largest level with at least top_p *
 * total of mass at or above it (the largest threshold keeping that much is at least that level).
 * 0 when no level qualifies. */
static float ms_floor(const float *p, int64_t v, int64_t top_k, float top_p, double total) {
    ms_i16 count[MS_LEVELS];
    ms_v16 mass[MS_LEVELS];
    for (int l = 0; l < MS_LEVELS; ++l) count[l] = (ms_i16){0}, mass[l] = (ms_v16){0.f};
    int64_t i = 0, body = v / 16 * 16;
    for (; i < body; i += 16) {
        ms_v16 x = ms_load(p + i);
        for (int l = 0; l < MS_LEVELS; ++l) {
            ms_i16 in = x >= MS_LEVEL[l];
            count[l] -= in;
            mass[l] += ms_masked(x, in);
        }
    }
    float bound = 0.f;
    for (int l = MS_LEVELS - 1; l >= 0; --l) {
        int64_t c = 0;
        double m = ms_dsum(mass[l]);
        for (int lane = 0; lane < 16; ++lane) c += count[l][lane];
        for (int64_t j = body; j < v; ++j) c += p[j] >= MS_LEVEL[l], m += p[j] >= MS_LEVEL[l] ? p[j] : 0.f;
        /* float lanes may overstate the mass slightly: a margin keeps the bound safe */
        if (top_k > 0 ? c >= top_k : m >= top_p * total * 1.001 + 1e-6) bound = MS_LEVEL[l];
    }
    return bound;
}

/* The values of p [v] at or above `floor`, into out; returns how many. */
static int64_t ms_gather(const float *p, int64_t v, float floor, float *out) {
    int64_t n = 0, i = 0, body = v / 16 * 16;
    for (; i < body; i += 16) {
        ms_i16 in = ms_load(p + i) >= floor;
        int any = 0;
        for (int lane = 0; lane < 16; ++lane) any |= in[lane];
        if (any)
            for (int lane = 0; lane < 16; ++lane)
                if (p[i + lane] >= floor) out[n++] = p[i + lane];
    }
    for (; i < v; ++i)
        if (p[i] >= floor) out[n++] = p[i];
    return n;
}

static double ms_sum_from(const float *a, int64_t n, float cut) {
    double s = 0.0;
    for (int64_t x = 0; x < n; ++x) s += a[x] >= cut ? a[x] : 0.f;
    return s;
}

/* The first token in id order at which the running sum of the kept p (p >= cut) exceeds target; the
 * last kept token if none does (target rounded up to the total). Blocks of 64 are summed whole
 * until the one holding the edge, which is walked. */
static int64_t ms_draw(const float *p, int64_t v, float cut, double target) {
    double run = 0.0;
    int64_t last_block = -1, i = 0, body = v / 64 * 64;
    for (; i < body; i += 64) {
        ms_v16 s = {0.f};
        for (int q = 0; q < 64; q += 16) {
            ms_v16 x = ms_load(p + i + q);
            s += ms_masked(x, (x >= cut) & (x > 0.f));
        }
        double block = ms_dsum(s);
        if (block > 0.0) last_block = i;
        if (run + block > target) break;
        run += block;
    }
    int64_t end = i < body ? i + 64 : v, last = -1;
    for (int64_t j = i; j < end; ++j) {
        if (p[j] < cut || p[j] <= 0.f) continue;
        run += p[j];
        last = j;
        if (run > target) return j;
    }
    if (last >= 0) return last;
    for (int64_t j = last_block < 0 ? 0 : last_block; j < v; ++j)  /* the last kept token */
        if (p[j] >= cut && p[j] > 0.f) last = j;
    return last < 0 ? 0 : last;
}

/* A token drawn at uniform u in [0, 1) from logits [v] / temperature, kept to its top_k (0: all) and
 * top_p (>= 1: all) as above. scratch: 2 * v floats. */
int64_t ms_sample_row(const float *logits, int64_t v, float temperature, int64_t top_k, float top_p, double u,
                      float *scratch) {
    float *p = scratch, *work = scratch + v, cut = 0.f;  /* the kept tokens: p >= cut */
    double total = ms_exps(logits, v, temperature, p);
    if (top_k >= v) top_k = 0;
    if (top_k > 0 || top_p < 1.f) {
        int64_t n = ms_gather(p, v, ms_floor(p, v, top_k, top_p, total), work);  /* every token that may be kept */
        if (top_k > 0) {
            cut = ms_select(work, n, top_k);
            total = ms_sum_from(work, n, cut);
        }
        if (top_p < 1.f) {
            int64_t kept = 0;
            for (int64_t x = 0; x < n; ++x)
                if (work[x] >= cut) work[kept++] = work[x];
            cut = ms_mass_threshold(work, kept, top_p * total);
            total = ms_sum_from(work, kept, cut);
        }
    }
    return ms_draw(p, v, cut, u * total);
}

/* One token per row of logits [rows, v] (ms_sample_row with each row's settings), the rows shared
 * among the threads. scratch: threads * 2 * v floats. */
void ms_sample_rows(const float *logits, int64_t rows, int64_t v, const float *temperatures, const int64_t *top_ks,
                    const float *top_ps, const double *uniforms, float *scratch, int64_t *out, int threads) {
#pragma omp parallel num_threads(rows > 1 ? ms_threads(rows * v, threads) : 1)
    {
        int64_t lo, hi;
        int t = omp_get_thread_num();
        ms_share(rows, t, omp_get_num_threads(), &lo, &hi);
        for (int64_t r = lo; r < hi; ++r)
            out[r] = ms_sample_row(logits + r * v, v, temperatures[r], top_ks[r], top_ps[r], uniforms[r],
                                   scratch + t * 2 * v);
    }
}
