/* LazyDiT's per-sample laziness: the gate score and the cache update. */

/* Gate score: score[b] = sigmoid(sum over tokens t of Z[b, t, :] . w).
 * The official score is the probability to compute the module (run when >= 0.5).
 * Mirrors tinylazy.lazy.LazyDiT.scores (a Linear(D, 1, bias=False) on the modulated
 * input Z, summed over tokens, then a sigmoid).
 * Inputs   z (B, T, D); gates (rows, D) a stack of gate vectors, w = gates[w_row]
 * Output   score (B)
 * Layout   one work-group of 64 work-items per sample (group id = b): work-item i sums
 *          tokens i, i + 64, ... with VW-wide vectors, then a tree reduction in local
 *          memory. */
#define GS 64

__kernel __attribute__((reqd_work_group_size(GS, 1, 1)))
void gate_score(const int T, const int D, __global const float* restrict z,
                __global const float* restrict gates, const int w_row, __global float* restrict score)
{
    const __global float* w = gates + w_row * D;
    __local float part[GS];
    const int b = get_group_id(0), lid = get_local_id(0);
    floatv acc = 0.0f;
    for (int t = lid; t < T; t += GS) {
        const __global float* row = z + (b * T + t) * D;
        for (int i = 0; i < D; i += VW)
            acc += LOADV(row + i) * LOADV(w + i);
    }
    part[lid] = hsum(acc);
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = GS / 2; s > 0; s >>= 1) {
        if (lid < s)
            part[lid] += part[lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0)
        score[b] = 1.0f / (1.0f + exp(-part[0]));
}

/* Gather the samples that compute: dst[i] = src[idx[i]], each sample n floats.
 * Compacts the module inputs Z of a mixed batch so the module runs only on them.
 * Layout gid (0, 1) = (VW-wide chunk of a sample, i); groups of 64. */
__kernel __attribute__((reqd_work_group_size(64, 1, 1)))
void gather_samples(const int n, __global const int* idx, __global const float* restrict src,
                    __global float* restrict dst)
{
    const int k = get_global_id(0) * VW, i = get_global_id(1);
    if (k < n)
        STOREV(dst + i * n + k, LOADV(src + idx[i] * n + k));
}

/* Per-sample skip select of the module cache:
 *   cache[b] = fresh[slot[b]] if slot[b] >= 0 (sample b computed the module),
 *   cache[b] unchanged        if slot[b] <  0 (sample b skips and reuses it).
 * The cache then holds, for every sample, the module output the step uses (before the
 * gate_msa / gate_mlp multiply, as the official cache).  Mirrors the per-sample
 * select of tinylazy.lazy.
 * Inputs  slot (B) int, fresh (n_computed, n); in/out cache (B, n).
 * Layout  gid (0, 1) = (VW-wide chunk of a sample, b); groups of 64. */
__kernel __attribute__((reqd_work_group_size(64, 1, 1)))
void skip_select(const int n, __global const int* slot, __global const float* restrict fresh,
                 __global float* restrict cache)
{
    const int k = get_global_id(0) * VW, b = get_global_id(1);
    const int s = slot[b];
    if (k < n && s >= 0)
        STOREV(cache + b * n + k, LOADV(fresh + s * n + k));
}
