/* Softmax attention per head, tiled over keys with an online (running-max) softmax.
 *
 * Mirrors tinylazy.ops.sdpa_forward together with the head split and merge of
 * DiT.attn: softmax(q k^T / sqrt(Dh)) v for every (sample, head, query).
 *
 * Inputs   qkv  (B, T, 3, H, Dh)  the qkv linear's output as it comes, q, k, v stacked
 *          scale                  1 / sqrt(Dh), folded into q as the reference does
 * Output   o    (B, T, H, Dh)     heads merged back, the input of attn.proj
 * Layout   one work-item per (query t, head h, sample b) = gid (0, 1, 2); q and the
 *          output accumulator stay in registers (Dh / VW vectors, HEAD_DIM and VW are
 *          compile-time).  Keys come in tiles of 8: 8 dot products give a float8 of
 *          scores, the running max m and sum l are updated once per tile (numerically
 *          stable: every exponent is <= 0), the accumulator is rescaled by exp(m_old -
 *          m_new) and the tile's 8 value rows are added.  Keys past T in the last tile
 *          get score -inf (weight 0).  Work-groups of 16 queries of one head share K, V
 *          in cache.
 */
#define NV (HEAD_DIM / VW)
#define KT 8

__kernel __attribute__((reqd_work_group_size(16, 1, 1)))
void attention(const int T, const int H, const float scale,
               __global const float* restrict qkv, __global float* restrict o)
{
    const int t = get_global_id(0), h = get_global_id(1), b = get_global_id(2);
    if (t >= T)
        return;
    const int D = H * HEAD_DIM, ld = 3 * D;
    const __global float* base = qkv + b * T * ld + h * HEAD_DIM;   /* q of token 0; k at +D, v at +2D */
    floatv q[NV], acc[NV];
    for (int i = 0; i < NV; i++) {
        q[i] = LOADV(base + t * ld + i * VW) * scale;
        acc[i] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int j0 = 0; j0 < T; j0 += KT) {
        /* rows of the tile's keys and values; keys past T repeat the last one (masked below) */
        const __global float* kv[KT];
        #pragma unroll
        for (int jj = 0; jj < KT; jj++)
            kv[jj] = base + (j0 + jj < T ? j0 + jj : T - 1) * ld + D;
        /* 8 scores, vector chunk by chunk: 8 independent multiply-add chains */
        floatv d[KT];
        #pragma unroll
        for (int jj = 0; jj < KT; jj++)
            d[jj] = 0.0f;
        for (int i = 0; i < NV; i++) {
            const floatv qi = q[i];
            #pragma unroll
            for (int jj = 0; jj < KT; jj++)
                d[jj] += qi * LOADV(kv[jj] + i * VW);
        }
        float8 sv = (float8)(hsum(d[0]), hsum(d[1]), hsum(d[2]), hsum(d[3]),
                             hsum(d[4]), hsum(d[5]), hsum(d[6]), hsum(d[7]));
        if (j0 + KT > T)
            sv = (float8)(0, 1, 2, 3, 4, 5, 6, 7) < (float)(T - j0) ? sv : (float8)(-INFINITY);
        /* online softmax: rescale the running sum and output when the max grows */
        const float mt = hmax8(sv);
        if (mt > m) {
            const float corr = exp(m - mt);
            l *= corr;
            for (int i = 0; i < NV; i++)
                acc[i] *= corr;
            m = mt;
        }
        const float8 p = exp(sv - m);
        l += hsum8(p);
        const float pj[KT] = {p.s0, p.s1, p.s2, p.s3, p.s4, p.s5, p.s6, p.s7};
        for (int i = 0; i < NV; i++) {
            floatv a = acc[i];
            #pragma unroll
            for (int jj = 0; jj < KT; jj++)
                a += pj[jj] * LOADV(kv[jj] + D + i * VW);
            acc[i] = a;
        }
    }
    const float inv = 1.0f / l;
    __global float* out = o + (b * T + t) * D + h * HEAD_DIM;
    for (int i = 0; i < NV; i++)
        STOREV(out + i * VW, acc[i] * inv);
}
