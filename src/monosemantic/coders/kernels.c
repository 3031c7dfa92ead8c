/* The sparse path's fused CPU kernels (coders/kernels.py compiles this file once with the
 * machine's C compiler and calls it through ctypes; without a compiler the path runs on PyTorch
 * ops alone, with the same results up to float rounding).
 *
 * Every kernel splits its work over `threads` threads (parallel_for). Tensors are contiguous float32 /
 * int64 buffers passed as raw pointers; shapes: B rows, F features, D width, N active entries
 * of a CSR matrix [B, F] given as offsets [B + 1], index [N], values [N].
 */
#if defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void (*range_fn)(void *arg, int64_t start, int64_t end);

#ifndef _OPENMP
typedef struct {
    range_fn fn;
    void *arg;
    int64_t start, end;
} job_t;

static void *run_job(void *p) {
    job_t *j = (job_t *)p;
    j->fn(j->arg, j->start, j->end);
    return NULL;
}
#endif

/* fn(arg, start, end) over [0, n) split into `threads` contiguous ranges at the cut points
 * `cuts` (threads + 1 entries) or evenly when cuts is NULL. Built with OpenMP, the ranges run on
 * the process's OpenMP threads, which are PyTorch's own (its libgomp.so.1 is already loaded, so
 * this library binds to it): no second pool spinning against the first. Otherwise on POSIX
 * threads made for the call. */
/* threads in [1, 64], and no more than the n items to split */
static int clamp_threads(int threads, int64_t n) {
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if (threads > n) threads = n > 0 ? (int)n : 1;
    return threads;
}

/* the thread whose range starts at `start`, for cuts from feature_sort_make or even_cuts (an empty
 * range shares its start with the next; it writes nothing, so sharing its thread's slot is safe) */
static int range_thread(const int64_t *cuts, int threads, int64_t start) {
    int t = 0;
    while (t < threads && cuts[t] != start) t++;
    return t;
}

static void parallel_for(range_fn fn, void *arg, int64_t n, int threads, const int64_t *cuts) {
    threads = clamp_threads(threads, n);
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++)
        fn(arg, cuts ? cuts[t] : n * t / threads, cuts ? cuts[t + 1] : n * (t + 1) / threads);
#else
    job_t jobs[64];
    pthread_t tids[64];
    int started[64] = {0};
    for (int t = 0; t < threads; t++) {
        jobs[t].fn = fn;
        jobs[t].arg = arg;
        jobs[t].start = cuts ? cuts[t] : n * t / threads;
        jobs[t].end = cuts ? cuts[t + 1] : n * (t + 1) / threads;
    }
    for (int t = 1; t < threads; t++)
        started[t] = pthread_create(&tids[t], NULL, run_job, &jobs[t]) == 0;
    run_job(&jobs[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(tids[t], NULL);
        else run_job(&jobs[t]);  /* no thread to be had: run it here */
    }
#endif
}

/* ---- top-k of each row of (pre + bias), unsorted ------------------------------------------ */

typedef struct {
    const float *pre, *bias;
    int64_t n, ld, k;
    float *vals;
    int64_t *idx;
    int64_t offset;  /* continuing: the block's first column in the whole row */
    int cont;        /* continue the heaps in vals / idx (a later block of the same rows) */
} topk_args;

static inline void sift_down(float *hv, int64_t *hi, int64_t k, int64_t i) {
    float v = hv[i];
    int64_t x = hi[i];
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= k) break;
        if (c + 1 < k && hv[c + 1] < hv[c]) c++;
        if (hv[c] >= v) break;
        hv[i] = hv[c];
        hi[i] = hi[c];
        i = c;
    }
    hv[i] = v;
    hi[i] = x;
}

#define GROUP 16

/* the maximum of x[0:16] + b[0:16] */
static inline float group_max(const float *x, const float *b) {
#if defined(__AVX512F__)
    return _mm512_reduce_max_ps(_mm512_add_ps(_mm512_loadu_ps(x), _mm512_loadu_ps(b)));
#else
    float m = x[0] + b[0];
    for (int i = 1; i < GROUP; i++) m = x[i] + b[i] > m ? x[i] + b[i] : m;
    return m;
#endif
}

/* <x, y> over D floats, in a fixed order (vector lanes, then a tree) */
static inline float dot(const float *restrict x, const float *restrict y, int64_t D) {
    int64_t d = 0;
    float s = 0;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= D; d += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + d), _mm512_loadu_ps(y + d), acc);
    s = _mm512_reduce_add_ps(acc);
#elif defined(__AVX__)
    __m256 acc = _mm256_setzero_ps();
    for (; d + 8 <= D; d += 8)
        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d)));
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
#else
    float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (; d + 8 <= D; d += 8)
        for (int i = 0; i < 8; i++) p[i] += x[d + i] * y[d + i];
    s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
#endif
    for (; d < D; d++) s += x[d] * y[d];
    return s;
}

/* whether any of x[0:16] + b[0:16] is > thr */
static inline int group_beats(const float *x, const float *b, float thr) {
#if defined(__AVX512F__)
    __m512 v = _mm512_add_ps(_mm512_loadu_ps(x), _mm512_loadu_ps(b));
    return _mm512_cmp_ps_mask(v, _mm512_set1_ps(thr), _CMP_GT_OQ) != 0;
#elif defined(__AVX__)
    __m256 t = _mm256_set1_ps(thr);
    __m256 lo = _mm256_add_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(b));
    __m256 hi = _mm256_add_ps(_mm256_loadu_ps(x + 8), _mm256_loadu_ps(b + 8));
    return _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(lo, t, _CMP_GT_OQ),
                                           _mm256_cmp_ps(hi, t, _CMP_GT_OQ))) != 0;
#else
    int any = 0;
    for (int i = 0; i < GROUP; i++) any |= x[i] + b[i] > thr;
    return any;
#endif
}

/* one row by a single scan: a min-heap of the k largest so far (hv[0] the smallest of them), and
 * any 16 values none of which beats it skipped at once */
static void topk_row_scan(const float *restrict x, const float *restrict b, int64_t n, int64_t k,
                          float *hv, int64_t *hi) {
    for (int64_t j = 0; j < k; j++) {
        const float v = x[j] + b[j];
        hv[j] = v == v ? v : -__builtin_inff();  /* NaN counts as -inf */
        hi[j] = j;
    }
    for (int64_t i = k / 2 - 1; i >= 0; i--) sift_down(hv, hi, k, i);
    float thr = hv[0];
    int64_t j = k;
    for (; j < n && (j % GROUP); j++) {  /* to a group boundary */
        float v = x[j] + b[j];
        if (v > thr) { hv[0] = v; hi[0] = j; sift_down(hv, hi, k, 0); thr = hv[0]; }
    }
    for (; j + GROUP <= n; j += GROUP) {
        if (!group_beats(x + j, b + j, thr)) continue;
        for (int t = 0; t < GROUP; t++) {
            float v = x[j + t] + b[j + t];
            if (v > thr) { hv[0] = v; hi[0] = j + t; sift_down(hv, hi, k, 0); thr = hv[0]; }
        }
    }
    for (; j < n; j++) {
        float v = x[j] + b[j];
        if (v > thr) { hv[0] = v; hi[0] = j; sift_down(hv, hi, k, 0); thr = hv[0]; }
    }
}

/* a later block of a row whose k-heap (hv, hi) holds the earlier blocks' k largest: offer it the
 * block's entries that beat its smallest, skipping any 16 none of which does (block column j is
 * column offset + j of the row) */
static void topk_row_continue(const float *restrict x, const float *restrict b, int64_t n, int64_t k,
                              float *hv, int64_t *hi, int64_t offset) {
    float thr = hv[0];
    int64_t j = 0;
    for (; j + GROUP <= n; j += GROUP) {
        if (!group_beats(x + j, b + j, thr)) continue;
        for (int t = 0; t < GROUP; t++) {
            float v = x[j + t] + b[j + t];
            if (v > thr) { hv[0] = v; hi[0] = offset + j + t; sift_down(hv, hi, k, 0); thr = hv[0]; }
        }
    }
    for (; j < n; j++) {
        float v = x[j] + b[j];
        if (v > thr) { hv[0] = v; hi[0] = offset + j; sift_down(hv, hi, k, 0); thr = hv[0]; }
    }
}

/* how many of v[0:n] are >= t (NaN never) */
static inline int64_t count_at_least(const float *v, int64_t n, float t) {
    int64_t c = 0, i = 0;
#if defined(__AVX512F__)
    const __m512 tv = _mm512_set1_ps(t);
    for (; i + 16 <= n; i += 16)
        c += __builtin_popcount(_mm512_cmp_ps_mask(_mm512_loadu_ps(v + i), tv, _CMP_GE_OQ));
#endif
    for (; i < n; i++) c += v[i] >= t;
    return c;
}

/* bit t set when x[t] + b[t] >= tau, t < 16 */
static inline unsigned group_at_least(const float *x, const float *b, float tau) {
#if defined(__AVX512F__)
    __m512 v = _mm512_add_ps(_mm512_loadu_ps(x), _mm512_loadu_ps(b));
    return _mm512_cmp_ps_mask(v, _mm512_set1_ps(tau), _CMP_GE_OQ);
#elif defined(__AVX__)
    __m256 t = _mm256_set1_ps(tau);
    __m256 lo = _mm256_add_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(b));
    __m256 hi = _mm256_add_ps(_mm256_loadu_ps(x + 8), _mm256_loadu_ps(b + 8));
    return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(lo, t, _CMP_GE_OQ))
           | ((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(hi, t, _CMP_GE_OQ)) << 8);
#else
    unsigned m = 0;
    for (int i = 0; i < GROUP; i++) m |= (unsigned)(x[i] + b[i] >= tau) << i;
    return m;
#endif
}

/* one row in two passes: the maximum of each group of 16; tau such that at least k of those are
 * >= tau (k distinct values >= tau, so the row's k-th largest is >= tau and every selected value
 * lies in a group whose maximum is >= tau); then only the entries >= tau of those groups
 * are offered to the heap. Returns 0 when the heap could not be filled (NaN or -inf rows): the
 * caller scans. `gmax` has room for the groups. */
static int topk_row_groups(const float *restrict x, const float *restrict b, int64_t n, int64_t k,
                           float *hv, int64_t *hi, float *gmax) {
    const int64_t full = n / GROUP, groups = (n + GROUP - 1) / GROUP;
    for (int64_t g = 0; g < full; g++) gmax[g] = group_max(x + g * GROUP, b + g * GROUP);
    if (full < groups) {
        float m = -__builtin_inff();
        for (int64_t j = full * GROUP; j < n; j++) m = x[j] + b[j] > m ? x[j] + b[j] : m;
        gmax[full] = m;
    }
    /* tau: a value with at least k group maxima >= it, and not many more than k (bisection by
     * counting: no branchy heap over the groups) */
    float lo = __builtin_inff(), top = -__builtin_inff();
    for (int64_t g = 0; g < groups; g++) {
        const float v = gmax[g];
        if (v > top) top = v;
        if (v < lo && v > -__builtin_inff()) lo = v;
    }
    if (!(top > -__builtin_inff()) || count_at_least(gmax, groups, lo) < k) return 0;
    if (count_at_least(gmax, groups, top) >= k) {
        lo = top;  /* k groups share the largest maximum */
    } else {
        for (int it = 0; it < 40; it++) {  /* count(>= lo) >= k > count(>= top) */
            const float mid = lo + (top - lo) * 0.5f;
            if (!(mid > lo && mid < top)) break;
            const int64_t c = count_at_least(gmax, groups, mid);
            if (c >= k) {
                lo = mid;
                if (c <= k + k / 4) break;
            } else {
                top = mid;
            }
        }
    }
    const float tau = lo;
    int64_t filled = 0;
    for (int64_t g = 0; g < groups; g++) {
        if (!(gmax[g] >= tau)) continue;
        const int64_t j0 = g * GROUP;
        unsigned m = 0;
        if (g < full)
            m = group_at_least(x + j0, b + j0, tau);
        else  /* the last, partial group */
            for (int64_t j = j0; j < n; j++) m |= (unsigned)(x[j] + b[j] >= tau) << (j - j0);
        for (; m; m &= m - 1) {
            const int64_t j = j0 + __builtin_ctz(m);
            const float v = x[j] + b[j];
            if (filled < k) {  /* fill the heap, then keep the k largest */
                hv[filled] = v;
                hi[filled] = j;
                if (++filled == k)
                    for (int64_t i = k / 2 - 1; i >= 0; i--) sift_down(hv, hi, k, i);
            } else if (v > hv[0]) {
                hv[0] = v;
                hi[0] = j;
                sift_down(hv, hi, k, 0);
            }
        }
    }
    return filled == k;
}

static void topk_rows(void *p, int64_t r0, int64_t r1) {
    const topk_args *a = (const topk_args *)p;
    const int64_t n = a->n, k = a->k, groups = (n + GROUP - 1) / GROUP;
    /* two passes pay when the groups are many times k; otherwise (or without memory) one scan */
    float *gmax = groups >= 4 * k ? (float *)malloc(groups * sizeof(float)) : NULL;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = a->pre + r * a->ld;
        float *hv = a->vals + r * k;
        int64_t *hi = a->idx + r * k;
        if (a->cont) {
            topk_row_continue(x, a->bias, n, k, hv, hi, a->offset);
            continue;
        }
        if (!gmax || !topk_row_groups(x, a->bias, n, k, hv, hi, gmax))
            topk_row_scan(x, a->bias, n, k, hv, hi);
        if (a->offset)
            for (int64_t j = 0; j < k; j++) hi[j] += a->offset;
    }
    free(gmax);
}

/* vals, idx [rows, k] = the k largest entries of each row of pre [rows, n] (row stride ld) plus
 * bias [n], in no particular order. NaN is not selected while k other values exist, but a row
 * holding NaN may lose others of its 16-value group from the selection: such a row's indices are
 * valid and distinct, its selection unspecified (training refuses non-finite inputs first).
 * Indices are column + offset. With cont, vals and idx hold each row's k-heap from an earlier
 * call on other columns of the same rows (the row split into blocks), and the k largest of
 * both are kept: the heaps are left in heap order by every call. */
void topk_bias(const float *pre, int64_t rows, int64_t n, int64_t ld, const float *bias, int64_t k,
               float *vals, int64_t *idx, int64_t offset, int cont, int threads) {
    topk_args a = {pre, bias, n, ld, k, vals, idx, offset, cont};
    parallel_for(topk_rows, &a, rows, threads, NULL);
}

/* ---- out [F, D] = S^T @ R for CSR S [B, F], dense R [B, D] ---------------------------------- */

typedef struct {
    const int64_t *start;  /* [F + 1] each feature's entries in the feature-sorted order */
    const int64_t *rows;   /* [N] the row of each entry, feature-sorted */
    const int64_t *ent;    /* [N] its position in the CSR arrays */
    const float *values;
    const float *R;
    int64_t D, ldr;
    float *out;
    const float *W;        /* [F, D] or NULL */
    float *dots;           /* [N] <R[row], W[feature]> per entry, or NULL */
} tmm_args;

/* o [D] = feature f's row of S^T @ R: its entries e0 <= e < e1 of the feature-sorted order
 * (rows, ent) summed in row order, written once (no zero fill unless it has none); with w given,
 * also dots[ent[e]] = <R[row of e], w> for each, in the same pass over R */
static inline void feature_row(const int64_t *rows, const int64_t *ent, int64_t e, int64_t e1,
                               const float *values, const float *R, int64_t ldr, int64_t D,
                               float *restrict o, const float *w, float *dots) {
    if (e == e1) { memset(o, 0, D * sizeof(float)); return; }
    for (int64_t first = 1; e < e1; e++, first = 0) {
        const float *restrict r = R + rows[e] * ldr;
        const float v = values[ent[e]];
        if (first)
            for (int64_t d = 0; d < D; d++) o[d] = v * r[d];
        else
            for (int64_t d = 0; d < D; d++) o[d] += v * r[d];
        if (w) dots[ent[e]] = dot(r, w, D);
    }
}

static void tmm_features(void *p, int64_t f0, int64_t f1) {
    const tmm_args *a = (const tmm_args *)p;
    for (int64_t f = f0; f < f1; f++)
        feature_row(a->rows, a->ent, a->start[f], a->start[f + 1], a->values, a->R, a->ldr, a->D,
                    a->out + f * a->D, a->W ? a->W + f * a->D : NULL, a->dots);
}

/* The entries of a CSR matrix [B, F] sorted by feature (a counting sort, rows ascending within
 * each feature): start [F + 1], rows [N], ent [N] (each entry's position in the CSR arrays), and
 * cuts [threads + 1] splitting the features so each thread gets about the same work, an entry
 * counting 1 and a feature `per_feature`. Returns 0, or -1 when out of memory (nothing kept). */
typedef struct {
    int64_t *start, *rows, *ent;
    int64_t cuts[65];
    int threads;
} feature_sort;

static void feature_sort_free(feature_sort *s) {
    free(s->start); free(s->rows); free(s->ent);
    s->start = s->rows = s->ent = NULL;
}

static int feature_sort_make(feature_sort *s, const int64_t *offsets, const int64_t *index,
                             int64_t B, int64_t F, int threads, int64_t per_feature) {
    const int64_t N = offsets[B];
    s->start = (int64_t *)calloc(F + 1, sizeof(int64_t));
    s->rows = (int64_t *)malloc((N ? N : 1) * sizeof(int64_t));
    s->ent = (int64_t *)malloc((N ? N : 1) * sizeof(int64_t));
    int64_t *cursor = (int64_t *)malloc((F ? F : 1) * sizeof(int64_t));
    if (!s->start || !s->rows || !s->ent || !cursor) {
        free(cursor);
        feature_sort_free(s);
        return -1;
    }
    for (int64_t e = 0; e < N; e++) s->start[index[e] + 1]++;
    for (int64_t f = 0; f < F; f++) s->start[f + 1] += s->start[f];
    memcpy(cursor, s->start, F * sizeof(int64_t));
    for (int64_t b = 0; b < B; b++)
        for (int64_t e = offsets[b]; e < offsets[b + 1]; e++) {
            int64_t pos = cursor[index[e]]++;
            s->rows[pos] = b;
            s->ent[pos] = e;
        }
    free(cursor);
    threads = clamp_threads(threads, F);
    s->threads = threads;
    s->cuts[0] = 0;
    int64_t f = 0;
    for (int t = 1; t < threads; t++) {
        const int64_t want = (N + per_feature * F) * t / threads;
        while (f < F && s->start[f] + per_feature * f < want) f++;
        s->cuts[t] = f;
    }
    s->cuts[threads] = F;
    return 0;
}

/* out = S^T @ R, each feature's entries summed in row order (deterministic); with W and dots
 * given, also dots[e] = <R[row of e], W[feature of e]> for every entry, in the same pass (the
 * decoder's backward: d W_dec = acts^T @ d out and d acts = (d out @ W_dec^T) at the active
 * entries read each d out row once). Returns 0, or -1 when out of memory (nothing written). */
int t_matmul(const int64_t *offsets, const int64_t *index, const float *values, int64_t B,
             int64_t F, const float *R, int64_t D, int64_t ldr, float *out, const float *W,
             float *dots, int threads) {
    feature_sort s;
    if (feature_sort_make(&s, offsets, index, B, F, threads, 1) != 0) return -1;
    tmm_args a = {s.start, s.rows, s.ent, values, R, D, ldr, out, dots ? W : NULL, dots};
    parallel_for(tmm_features, &a, F, s.threads, s.cuts);
    feature_sort_free(&s);
    return 0;
}

/* ---- one pass over a batch: statistics, and the squared error with its gradient ----------- */

static void even_cuts(int64_t *cuts, int64_t n, int *threads) {
    *threads = clamp_threads(*threads, n);
    for (int t = 0; t <= *threads; t++) cuts[t] = n * t / *threads;
}

typedef struct {
    const float *x;
    int64_t D, ld;
    float *row_sq;       /* [B] or NULL */
    double *col, *tot;   /* per thread: [D] column sums, 1 sum of squares */
    int *bad;            /* per thread: a non-finite value seen */
    const int64_t *cuts;
    int threads;
} stats_args;

static void stats_range(void *p, int64_t b0, int64_t b1) {
    const stats_args *a = (const stats_args *)p;
    const int t = range_thread(a->cuts, a->threads, b0);
    double *col = a->col + t * a->D, tot = 0;
    int bad = 0;
    for (int64_t b = b0; b < b1; b++) {
        const float *restrict r = a->x + b * a->ld;
        float sq = 0;
        for (int64_t d = 0; d < a->D; d++) {
            const float v = r[d];
            sq += v * v;
            col[d] += v;
        }
        bad |= !isfinite(sq);  /* inf or nan anywhere in the row makes its sum of squares so */
        if (a->row_sq) a->row_sq[b] = sq;
        tot += sq;
    }
    a->tot[t] = tot;
    a->bad[t] = bad;
}

/* For x [B, D] (row stride ld): row_sq[b] = the sum of squares of row b (when row_sq is given),
 * col_sum [D] = the column sums and *total_sq = the sum of all squares, both in double; returns
 * 1 when x holds a non-finite value (or a row's sum of squares overflows), else 0, or -1 when out
 * of memory. */
int batch_stats(const float *x, int64_t B, int64_t D, int64_t ld, float *row_sq, double *col_sum,
                double *total_sq, int threads) {
    int64_t cuts[65];
    even_cuts(cuts, B, &threads);
    double *col = (double *)calloc((size_t)threads * (D ? D : 1), sizeof(double));
    double tot[64];
    int bad[64];
    if (!col) return -1;
    stats_args a = {x, D, ld, row_sq, col, tot, bad, cuts, threads};
    for (int t = 0; t < threads; t++) { tot[t] = 0; bad[t] = 0; }
    parallel_for(stats_range, &a, B, threads, cuts);
    int any_bad = 0;
    *total_sq = 0;
    for (int64_t d = 0; d < D; d++) col_sum[d] = 0;
    for (int t = 0; t < threads; t++) {
        for (int64_t d = 0; d < D; d++) col_sum[d] += col[t * D + d];
        *total_sq += tot[t];
        any_bad |= bad[t];
    }
    free(col);
    return any_bad;
}

typedef struct {
    float *pred;
    const float *target;
    int64_t D, ldt;
    float scale, coef;
    double *part;
    const int64_t *cuts;
    int threads, grad;
} sqerr_args;

static void sqerr_range(void *p, int64_t b0, int64_t b1) {
    const sqerr_args *a = (const sqerr_args *)p;
    const float s = a->scale, c = a->coef;
    double total = 0;
    for (int64_t b = b0; b < b1; b++) {
        float *restrict o = a->pred + b * a->D;
        const float *restrict y = a->target + b * a->ldt;
        if (a->grad) {
            for (int64_t d = 0; d < a->D; d++) o[d] = c * (o[d] - s * y[d]);
        } else {
            float row = 0;
            for (int64_t d = 0; d < a->D; d++) {
                const float e = o[d] - s * y[d];
                row += e * e;
            }
            total += row;
        }
    }
    if (!a->grad) a->part[range_thread(a->cuts, a->threads, b0)] = total;
}

/* grad = 0: the sum over [B, D] of (pred - scale * target)^2, each row's in float, their total in
 * double (returned). grad = 1: in place, pred = coef * (pred - scale * target), the loss's gradient
 * for coef = 2 x the gradient arriving at the loss (returns 0). pred is contiguous, target has row
 * stride ldt. Rows are split evenly between threads (no empty ranges: range_thread is exact). */
double squared_error(float *pred, const float *target, int64_t B, int64_t D, int64_t ldt, float scale,
                     float coef, int grad, int threads) {
    int64_t cuts[65];
    double part[64];
    even_cuts(cuts, B, &threads);
    for (int t = 0; t < threads; t++) part[t] = 0;
    sqerr_args a = {pred, target, D, ldt, scale, coef, part, cuts, threads, grad};
    parallel_for(sqerr_range, &a, B, threads, cuts);
    double total = 0;
    for (int t = 0; t < threads; t++) total += part[t];
    return total;
}

/* ---- decode: out[b] = bias + sum over row b's entries of value * W[feature] ------------------ */

typedef struct {
    const int64_t *offsets, *index;
    const float *values, *W, *bias;
    int64_t D;
    float *out;
} dec_args;

static void decode_range(void *p, int64_t b0, int64_t b1) {
    const dec_args *a = (const dec_args *)p;
    const int64_t D = a->D;
    for (int64_t b = b0; b < b1; b++) {
        float *restrict o = a->out + b * D;
        const int64_t e0 = a->offsets[b], e1 = a->offsets[b + 1];
        if (a->bias) memcpy(o, a->bias, D * sizeof(float));
        else memset(o, 0, D * sizeof(float));
        int64_t e = e0;
        for (; e + 4 <= e1; e += 4) {  /* four rows a pass: a quarter of the loads and stores of o */
            const float v0 = a->values[e], v1 = a->values[e + 1], v2 = a->values[e + 2], v3 = a->values[e + 3];
            const float *restrict w0 = a->W + a->index[e] * D, *restrict w1 = a->W + a->index[e + 1] * D;
            const float *restrict w2 = a->W + a->index[e + 2] * D, *restrict w3 = a->W + a->index[e + 3] * D;
            for (int64_t d = 0; d < D; d++) o[d] += (v0 * w0[d] + v1 * w1[d]) + (v2 * w2[d] + v3 * w3[d]);
        }
        for (; e < e1; e++) {
            const float v = a->values[e];
            const float *restrict w = a->W + a->index[e] * D;
            for (int64_t d = 0; d < D; d++) o[d] += v * w[d];
        }
    }
}

/* out [B, D] = bias [D] (or 0 when NULL) + the CSR matrix [B, F] @ W [F, D], row by row: an
 * embedding-bag with per-entry weights that writes into a given buffer */
void decode_rows(const int64_t *offsets, const int64_t *index, const float *values, int64_t B,
                 const float *W, const float *bias, int64_t D, float *out, int threads) {
    dec_args a = {offsets, index, values, W, bias, D, out};
    parallel_for(decode_range, &a, B, threads, NULL);
}

/* ---- sampled dots: <R[row], W[feature]> at each entry of a CSR matrix ---------------------- */

typedef struct {
    const int64_t *offsets, *index;
    const float *R, *W;
    int64_t D, ldr;
    float *dots;
} sdot_args;

static void sdot_rows(void *p, int64_t b0, int64_t b1) {
    const sdot_args *a = (const sdot_args *)p;
    for (int64_t b = b0; b < b1; b++) {
        const float *r = a->R + b * a->ldr;
        for (int64_t e = a->offsets[b]; e < a->offsets[b + 1]; e++)
            a->dots[e] = dot(r, a->W + a->index[e] * a->D, a->D);
    }
}

/* dots[e] = <R[b], W[index[e]]> for every entry e of row b (the decoder's d acts, when its weight
 * gradient is left to sparse_adam) */
void sampled_dot(const int64_t *offsets, const int64_t *index, int64_t B, const float *R,
                 int64_t D, int64_t ldr, const float *W, float *dots, int threads) {
    sdot_args a = {offsets, index, R, W, D, ldr, dots};
    parallel_for(sdot_rows, &a, B, threads, NULL);
}

/* ---- Adam on a weight whose gradient is S^T @ R (+ a few dense rows), row by row -------------- */

typedef struct {
    const feature_sort *s;
    const float *values, *R;
    int64_t D, ldr;
    const int64_t *extra_pos;  /* [F]: the row of `extra` added to feature f's gradient, or -1 */
    const float *extra;
    const float *u, *c;          /* the gradient less u[f] c, or NULL */
    float *W, *m, *v, *scratch;  /* scratch: one D-row per thread */
    float *dots;                 /* [N] <R[row], W[feature]> before the step, per entry; or NULL */
    float beta1, beta2, c1, c2, eps, step_size, bc2_sqrt;  /* c = 1 - beta, from doubles */
    int project, unit;
} adam_args;

static void adam_features(void *p, int64_t f0, int64_t f1) {
    const adam_args *a = (const adam_args *)p;
    const feature_sort *s = a->s;
    const int64_t D = a->D;
    float *restrict g = a->scratch + range_thread(s->cuts, s->threads, f0) * D;  /* its scratch row */
    const float b1 = a->beta1, b2 = a->beta2, c1 = a->c1, c2 = a->c2;
    for (int64_t f = f0; f < f1; f++) {
        float *restrict w = a->W + f * D;
        /* the gradient row, and the dots with W's row before its step */
        feature_row(s->rows, s->ent, s->start[f], s->start[f + 1], a->values, a->R, a->ldr, D, g,
                    a->dots ? w : NULL, a->dots);
        if (a->extra_pos && a->extra_pos[f] >= 0) {
            const float *restrict x = a->extra + a->extra_pos[f] * D;
            for (int64_t d = 0; d < D; d++) g[d] += x[d];
        }
        if (a->u) {
            const float uf = a->u[f];
            const float *restrict c = a->c;
            for (int64_t d = 0; d < D; d++) g[d] -= uf * c[d];
        }
        float *restrict m = a->m + f * D;
        float *restrict v = a->v + f * D;
        if (a->project) {  /* the gradient's component along the (unit) decoder row removed */
            const float sq = dot(w, w, D);
            if (sq > 0) {
                const float c = dot(g, w, D) / sq;
                for (int64_t d = 0; d < D; d++) g[d] -= c * w[d];
            }
        }
        for (int64_t d = 0; d < D; d++) {  /* torch.optim.Adam's update, no weight decay */
            m[d] = b1 * m[d] + c1 * g[d];
            v[d] = b2 * v[d] + c2 * g[d] * g[d];
            w[d] -= a->step_size * m[d] / (sqrtf(v[d]) / a->bc2_sqrt + a->eps);
        }
        if (a->unit) {
            const float norm = sqrtf(dot(w, w, D));
            if (norm > 0)
                for (int64_t d = 0; d < D; d++) w[d] /= norm;
        }
    }
}

/* One Adam step of W [F, D] (moments m, v) whose gradient is S^T @ R for the CSR matrix S [B, F]
 * and R [B, D] (row stride ldr), plus extra[extra_pos[f]] for features with extra_pos[f] >= 0
 * (extra_pos may be NULL), less u[f] c when u and c are given (the encoder's centre folded into its
 * bias): each feature's gradient row is formed in a scratch row, optionally
 * projected off the row of W (project), applied, and the row of W optionally renormalised (unit).
 * With dots given, also dots[e] = <R[row of e], W[feature of e]> with W's row as it was before
 * the step (the decoder's d acts, in the same pass over R). No [F, D] gradient exists at any point. c1 = 1 - beta1 and c2 = 1 - beta2 (computed in double
 * precision: 1 - 0.999f is off by 1e-5), step_size = lr / (1 - beta1^t), bc2_sqrt =
 * sqrt(1 - beta2^t). Returns 0, or -1 when out of memory (nothing written). */
int sparse_adam(const int64_t *offsets, const int64_t *index, const float *values, int64_t B,
                int64_t F, const float *R, int64_t D, int64_t ldr, const int64_t *extra_pos,
                const float *extra, const float *u, const float *c, float *W, float *m, float *v,
                float beta1, float beta2,
                float c1, float c2, float eps, float step_size, float bc2_sqrt, int project, int unit,
                float *dots, int threads) {
    feature_sort s;
    if (feature_sort_make(&s, offsets, index, B, F, threads, 4) != 0) return -1;
    float *scratch = (float *)malloc((size_t)s.threads * (D ? D : 1) * sizeof(float));
    if (!scratch) {
        feature_sort_free(&s);
        return -1;
    }
    adam_args a = {&s, values, R, D, ldr, extra_pos, extra, u, c, W, m, v, scratch,
                   dots, beta1, beta2, c1, c2, eps, step_size, bc2_sqrt, project, unit};
    parallel_for(adam_features, &a, F, s.threads, s.cuts);
    free(scratch);
    feature_sort_free(&s);
    return 0;
}

/* ---- decoder rows: the gradient's component along each row, and unit norm ------------------ */

typedef struct {
    float *W, *G;
    int64_t D;
} rows_args;

static void project_rows_range(void *p, int64_t f0, int64_t f1) {
    const rows_args *a = (const rows_args *)p;
    const int64_t D = a->D;
    for (int64_t f = f0; f < f1; f++) {
        const float *restrict w = a->W + f * D;
        float *restrict g = a->G + f * D;
        const float sq = dot(w, w, D);
        if (!(sq > 0)) continue;  /* a zero row: nothing to project out */
        const float c = dot(g, w, D) / sq;
        for (int64_t d = 0; d < D; d++) g[d] -= c * w[d];
    }
}

static void unit_rows_range(void *p, int64_t f0, int64_t f1) {
    const rows_args *a = (const rows_args *)p;
    const int64_t D = a->D;
    for (int64_t f = f0; f < f1; f++) {
        float *restrict w = a->W + f * D;
        const float norm = sqrtf(dot(w, w, D));
        if (!(norm > 0)) continue;  /* rows of zero norm stay zero */
        for (int64_t d = 0; d < D; d++) w[d] /= norm;
    }
}

/* G[f] -= (<G[f], W[f]> / |W[f]|^2) W[f] for each of the F rows, in one pass */
void project_rows(const float *W, float *G, int64_t F, int64_t D, int threads) {
    rows_args a = {(float *)W, G, D};
    parallel_for(project_rows_range, &a, F, threads, NULL);
}

/* W[f] /= |W[f]| for each row of non-zero norm, in one pass */
void unit_rows(float *W, int64_t F, int64_t D, int threads) {
    rows_args a = {W, NULL, D};
    parallel_for(unit_rows_range, &a, F, threads, NULL);
}
