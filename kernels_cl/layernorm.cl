/* Fused LayerNorm + adaLN modulate: out = LN(x) * (1 + scale) + shift.
 *
 * Mirrors tinylazy.ops.modulate_forward(tinylazy.ops.layernorm_forward(x), shift, scale),
 * i.e. DiT.modulated_input: LayerNorm without affine, eps 1e-6, biased variance.
 *
 * Inputs   x    (rows, D)  rows = B * T tokens, row r belongs to sample r / T
 *          mod  (B, ldm)   adaLN output; shift = mod[b, shift_off : shift_off + D],
 *                          scale = mod[b, scale_off : scale_off + D] (ldm = 6D in a block,
 *                          2D in the final layer)
 * Output   out  (rows, D)  may not alias x
 * Layout   one work-item per row, VW-wide vectors along D (VW divides D); two passes
 *          over the row for mean and variance (as the reference), a third writes.
 *          Work-groups of 16 rows; global size rounded up, extra items return.
 */
#define LN_EPS 1e-6f

__kernel __attribute__((reqd_work_group_size(16, 1, 1)))
void layernorm_modulate(const int rows, const int T, const int D,
                        __global const float* restrict x, __global const float* restrict mod,
                        const int ldm, const int shift_off, const int scale_off,
                        __global float* restrict out)
{
    const int r = get_global_id(0);
    if (r >= rows)
        return;
    const __global float* xr = x + r * D;
    floatv s = 0.0f;
    for (int i = 0; i < D; i += VW)
        s += LOADV(xr + i);
    const float mean = hsum(s) / D;
    floatv v = 0.0f;
    for (int i = 0; i < D; i += VW) {
        const floatv d = LOADV(xr + i) - mean;
        v += d * d;
    }
    const float rstd = 1.0f / sqrt(hsum(v) / D + LN_EPS);
    const __global float* shift = mod + (r / T) * ldm + shift_off;
    const __global float* scale = mod + (r / T) * ldm + scale_off;
    __global float* o = out + r * D;
    for (int i = 0; i < D; i += VW)
        STOREV(o + i, (LOADV(xr + i) - mean) * rstd * (1.0f + LOADV(scale + i)) + LOADV(shift + i));
}
