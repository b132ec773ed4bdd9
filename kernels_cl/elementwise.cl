/* Elementwise pieces of the DiT block and its conditioning. */

/* SiLU: y = x / (1 + exp(-x)).  Mirrors tinylazy.ops.silu_forward.
 * Inputs x (n); output y (n), may alias x.  One work-item per element, groups of 64.
 * Used on (B, D) conditioning vectors only, so it is not vectorised. */
__kernel __attribute__((reqd_work_group_size(64, 1, 1)))
void silu(const int n, __global const float* x, __global float* y)
{
    const int i = get_global_id(0);
    if (i < n)
        y[i] = x[i] / (1.0f + exp(-x[i]));
}

/* Class embedding added to the timestep embedding: c[b] += table[labels[b]].
 * Mirrors DiT.timestep_embed(t) + DiT.class_embed(y) (the label-table lookup).
 * Inputs labels (B) int, table (num_classes + 1, D); in/out c (B, D).
 * Layout gid (0, 1) = (d, b), groups of 64 along d. */
__kernel __attribute__((reqd_work_group_size(64, 1, 1)))
void class_embed_add(const int D, __global const int* labels, __global const float* table,
                     __global float* c)
{
    const int d = get_global_id(0), b = get_global_id(1);
    if (d < D)
        c[b * D + d] += table[labels[b] * D + d];
}

/* Gated residual add: x += gate * branch, gate per sample and channel.
 * Mirrors DiT.block's x + gate_msa[:, None, :] * attn(...) (and the gate_mlp line).
 * Inputs branch (rows, D), mod (B, ldm) with gate = mod[b, gate_off : gate_off + D];
 * in/out x (rows, D).  rows = B * T, row r belongs to sample r / T.
 * Layout one work-item per row, VW-wide vectors along D; groups of 16 rows. */
__kernel __attribute__((reqd_work_group_size(16, 1, 1)))
void gated_residual(const int rows, const int T, const int D, __global float* restrict x,
                    __global const float* restrict mod, const int ldm, const int gate_off,
                    __global const float* restrict branch)
{
    const int r = get_global_id(0);
    if (r >= rows)
        return;
    const __global float* gate = mod + (r / T) * ldm + gate_off;
    __global float* xr = x + r * D;
    const __global float* br = branch + r * D;
    for (int i = 0; i < D; i += VW)
        STOREV(xr + i, LOADV(xr + i) + LOADV(gate + i) * LOADV(br + i));
}
