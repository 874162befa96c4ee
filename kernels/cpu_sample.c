/* Drawing one token from a row of logits with temperature, top-k and top-p, on the CPU (see
 * kernels/cpu_native.py `sample_native`; tested against cluster/sampler.py's torch path). Without a
 * sort: top-k keeps the probabilities at or above the k-th largest (found by selection, as HF keeps
 * every token tied with the k-th), top-p the smallest set of the largest ones whose mass reaches
 * top_p (found by a selection on mass; tokens tied at its edge are all kept), and the draw walks
 * the kept tokens in id order, as the torch path does. */
#include <math.h>
#include <stdint.h>

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

/* A token drawn at uniform u in [0, 1) from logits [v] / temperature, kept to its top_k (0: all) and
 * top_p (>= 1: all) as above. scratch: 2 * v floats. */
int64_t ms_sample_row(const float *logits, int64_t v, float temperature, int64_t top_k, float top_p, double u,
                      float *scratch) {
    float *p = scratch, *work = scratch + v, top = -INFINITY;
    for (int64_t i = 0; i < v; ++i) top = logits[i] > top ? logits[i] : top;
    double total = 0.0;
    for (int64_t i = 0; i < v; ++i) total += (p[i] = expf((logits[i] - top) / temperature));
    float cut = 0.f;  /* the kept tokens: p >= cut */
    if (top_k > 0 && top_k < v) {
        for (int64_t i = 0; i < v; ++i) work[i] = p[i];
        cut = ms_select(work, v, top_k);
        total = 0.0;
        for (int64_t i = 0; i < v; ++i) total += p[i] >= cut ? p[i] : 0.f;
    }
    if (top_p < 1.f) {
        int64_t n = 0;
        for (int64_t i = 0; i < v; ++i)
            if (p[i] >= cut) work[n++] = p[i];
        cut = ms_mass_threshold(work, n, top_p * total);
        total = 0.0;
        for (int64_t i = 0; i < v; ++i) total += p[i] >= cut ? p[i] : 0.f;
    }
    double target = u * total, run = 0.0;
    int64_t last = 0;
    for (int64_t i = 0; i < v; ++i) {
        if (p[i] < cut) continue;
        run += p[i];
        last = i;
        if (run > target) return i;
    }
    return last;  /* u * total rounded up to the total */
}
