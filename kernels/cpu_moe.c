/* The MoE layer of a few float32 tokens (decode steps, draft chunks; see kernels/cpu_native.py
 * `moe_native`, tested against kernels/fused_moe.py `fused_moe_ref`). */
#include <stdint.h>
#include <omp.h>

#include "cpu_native.h"

/* Floats of ms_moe's scratch before its pair weights: partial sums and activations. */
static inline int64_t threads_scratch(int threads, int64_t t_rows, int64_t h, int64_t inter) {
    return (threads > 1 ? threads : 1) * t_rows * (h + inter) + 2 * t_rows * inter;
}

/* silu(gate(x_j)) * up(x_j) of one expert for its n tokens (x rows tok[0..n), h floats apart),
 * rows [lo, hi) of the intermediate dimension, into act [n, inter]. Each weight row is read once for
 * all the tokens. */
static void ms_act(const float *x, const int64_t *tok, int64_t n, const float *wgu, int64_t h, int64_t inter,
                   int64_t lo, int64_t hi, float *act) {
    for (int64_t i = lo; i < hi; ++i) {
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) {
            const float *xs[4] = {x + tok[j] * h, x + tok[j + 1] * h, x + tok[j + 2] * h, x + tok[j + 3] * h};
            float g[4], u[4];
            ms_dot4(wgu + i * h, xs, h, g);
            ms_dot4(wgu + (inter + i) * h, xs, h, u);
            for (int q = 0; q < 4; ++q) act[(j + q) * inter + i] = ms_silu(g[q]) * u[q];
        }
        for (; j < n; ++j) {
            const float *xj = x + tok[j] * h;
            act[j * inter + i] = ms_silu(ms_dot(wgu + i * h, xj, h)) * ms_dot(wgu + (inter + i) * h, xj, h);
        }
    }
}

/* Rows [lo, hi) of the expert's down projection for its n tokens (rows tok[j] of part [T, h]):
 * weighted by w and added, or, with w NULL, written unweighted (an expert shard's pair outputs). */
static inline void ms_put(float *dst, float d, const float *w, int64_t j) {
    if (w) *dst += d * w[j];
    else *dst = d;
}

static void ms_down(const float *wd, const int64_t *tok, const float *w, int64_t n, int64_t h, int64_t inter,
                    int64_t lo, int64_t hi, const float *act, float *part) {
    for (int64_t r = lo; r < hi; ++r) {
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) {
            const float *as[4] = {act + j * inter, act + (j + 1) * inter, act + (j + 2) * inter, act + (j + 3) * inter};
            float d[4];
            ms_dot4(wd + r * inter, as, inter, d);
            for (int q = 0; q < 4; ++q) ms_put(part + tok[j + q] * h + r, d[q], w, j + q);
        }
        for (; j < n; ++j) ms_put(part + tok[j] * h + r, ms_dot(wd + r * inter, act + j * inter, inter), w, j);
    }
}

/* The pairs p of ids [n] with 0 <= ids[p] < num_experts (a negative id is skipped) sorted by id,
 * stably (ties in pair order), in O(n + num_experts), into order [n]; returns how many were placed.
 * next: num_experts + 1 int64s of scratch (each id's next place in order). */
static int64_t ms_sort_pairs(const int64_t *ids, int64_t n, int64_t num_experts, int64_t *order, int64_t *next) {
    for (int64_t e = 0; e <= num_experts; ++e) next[e] = 0;
    for (int64_t p = 0; p < n; ++p)
        if (ids[p] >= 0) ++next[ids[p] + 1];
    for (int64_t e = 0; e < num_experts; ++e) next[e + 1] += next[e];  /* next[e]: where e's pairs start */
    for (int64_t p = 0; p < n; ++p)
        if (ids[p] >= 0) order[next[ids[p]]++] = p;
    return next[num_experts];  /* no id reaches num_experts: still the count */
}

/* out [T, h] = for each token, sum over its slots j with ids[t, j] >= 0 (a negative id is an expert
 * held elsewhere) of weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = ids[t, j]. Expert e's
 * [2i, h] gate and up rows start at gate_up + e * gate_up_stride, its [h, i] down rows at
 * down + e * down_stride; x: [T, h] contiguous. Each expert runs once on its tokens, the experts in
 * ascending id order. scratch: threads * T * (h + i) + 2 * T * i + T * K floats; index: 3 * T * K +
 * 2 * num_experts + 2 int64s (nothing on the stack, whatever T). Returns -1, or, computing nothing,
 * the first id >= num_experts (the banks' rows: it would read past them).
 * When there are enough experts for the threads (a multiple of their number, or at least three
 * each), each thread runs a contiguous share of whole experts into a partial sum of its own: one
 * sequential stream per thread and a single barrier before the partial sums are added (on the 2-core
 * VM one token's 4 experts read 36-45 GB/s this way, 29-45 with every expert's rows split).
 * Otherwise each expert's rows are split among the threads, one barrier per expert (two activation
 * buffers alternate). */
int64_t ms_moe(const float *x, int64_t t_rows, const float *gate_up, int64_t gate_up_stride, const float *down,
               int64_t down_stride, const int64_t *ids, const float *weights, int64_t top_k, int64_t h,
               int64_t inter, int64_t num_experts, float *out, float *scratch, int64_t *index, int threads) {
    for (int64_t p = 0; p < t_rows * top_k; ++p)
        if (ids[p] >= num_experts) return ids[p];  /* would read past the banks: nothing computed */
    int64_t n_pairs = t_rows * top_k, ne = 0;
    int64_t *slot = index, *tok = slot + n_pairs, *by_id = tok + n_pairs, *first = by_id + num_experts + 1;
    float *w = scratch + threads_scratch(threads, t_rows, h, inter);
    int64_t np = ms_sort_pairs(ids, n_pairs, num_experts, slot, by_id);  /* pairs by (expert, token) */
    for (int64_t p = 0; p < np; ++p) {
        tok[p] = slot[p] / top_k, w[p] = weights[slot[p]];
        if (p == 0 || ids[slot[p]] != ids[slot[p - 1]]) first[ne++] = p;  /* each expert's first pair */
    }
    first[ne] = np;
#pragma omp parallel num_threads(ms_threads(3 * h * inter, threads))
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t lo, hi, olo, ohi, size = t_rows * h;
        ms_share(size, t, nt, &olo, &ohi);
        if (ne % nt == 0 || ne >= 3 * nt) {
            float *part = scratch + t * t_rows * (h + inter), *act = part + size;
            for (int64_t i = 0; i < size; ++i) part[i] = 0.f;
            ms_share(ne, t, nt, &lo, &hi);
            for (int64_t g = lo; g < hi; ++g) {
                int64_t e = ids[slot[first[g]]], n = first[g + 1] - first[g];
                ms_act(x, tok + first[g], n, gate_up + e * gate_up_stride, h, inter, 0, inter, act);
                ms_down(down + e * down_stride, tok + first[g], w + first[g], n, h, inter, 0, h, act, part);
            }
#pragma omp barrier
            for (int64_t i = olo; i < ohi; ++i) {
                float sum = 0.f;
                for (int u = 0; u < nt; ++u) sum += scratch[u * t_rows * (h + inter) + i];
                out[i] = sum;
            }
        } else {
            int64_t dlo, dhi;
            ms_share(inter, t, nt, &lo, &hi);
            ms_share(h, t, nt, &dlo, &dhi);
            for (int64_t i = olo; i < ohi; ++i) out[i] = 0.f;
#pragma omp barrier
            for (int64_t g = 0; g < ne; ++g) {
                int64_t e = ids[slot[first[g]]], n = first[g + 1] - first[g];
                float *act = scratch + (g % 2) * t_rows * inter;
                ms_act(x, tok + first[g], n, gate_up + e * gate_up_stride, h, inter, lo, hi, act);
#pragma omp barrier
                ms_down(down + e * down_stride, tok + first[g], w + first[g], n, h, inter, dlo, dhi, act, out);
            }
        }
    }
    return -1;
}

/* An expert shard's part of a MoE layer (kernels/fused_moe.py `expert_pair_outputs_ref`): out [P, h]
 * row p = the SwiGLU MLP of bank row ex[p] on row rows[p] of x [n_rows, h], unweighted; each expert
 * runs once on its pairs (in pair order), the experts in ascending row order, whole experts per
 * thread when there are enough of them (each pair's row is written by one expert: no partial sums),
 * else each expert's rows split among the threads. scratch: max(threads, 2) * P * inter floats;
 * index: 3 * P + 2 * num_experts + 2 int64s (any number of pairs: nothing on the stack).
 * Returns -1, or, computing nothing, the first pair whose bank row or x row lies outside its tensor. */
int64_t ms_pair_outputs(const float *x, int64_t n_rows, const float *gate_up, int64_t gate_up_stride,
                        const float *down, int64_t down_stride, const int64_t *rows, const int64_t *ex, int64_t np,
                        int64_t h, int64_t inter, int64_t num_experts, float *out, float *scratch, int64_t *index,
                        int threads) {
    for (int64_t p = 0; p < np; ++p)
        if (ex[p] < 0 || ex[p] >= num_experts || rows[p] < 0 || rows[p] >= n_rows) return p;
    int64_t ne = 0;
    int64_t *pid = index, *tok = pid + np, *by_id = tok + np, *first = by_id + num_experts + 1;
    ms_sort_pairs(ex, np, num_experts, pid, by_id);  /* pairs by (expert, pair order) */
    for (int64_t p = 0; p < np; ++p) {
        tok[p] = rows[pid[p]];
        if (p == 0 || ex[pid[p]] != ex[pid[p - 1]]) first[ne++] = p;
    }
    first[ne] = np;
#pragma omp parallel num_threads(ms_threads(3 * h * inter, threads))
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t lo, hi;
        if (ne % nt == 0 || ne >= 3 * nt) {
            float *act = scratch + t * np * inter;
            ms_share(ne, t, nt, &lo, &hi);
            for (int64_t g = lo; g < hi; ++g) {
                int64_t e = ex[pid[first[g]]], n = first[g + 1] - first[g];
                ms_act(x, tok + first[g], n, gate_up + e * gate_up_stride, h, inter, 0, inter, act);
                ms_down(down + e * down_stride, pid + first[g], 0, n, h, inter, 0, h, act, out);
            }
        } else {
            int64_t dlo, dhi;
            ms_share(inter, t, nt, &lo, &hi);
            ms_share(h, t, nt, &dlo, &dhi);
            for (int64_t g = 0; g < ne; ++g) {
                int64_t e = ex[pid[first[g]]], n = first[g + 1] - first[g];
                float *act = scratch + (g % 2) * np * inter;
                ms_act(x, tok + first[g], n, gate_up + e * gate_up_stride, h, inter, lo, hi, act);
#pragma omp barrier
                ms_down(down + e * down_stride, pid + first[g], 0, n, h, inter, dlo, dhi, act, out);
            }
        }
    }
    return -1;
}
