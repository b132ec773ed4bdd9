/* Patch embedding and unpatchify: the image <-> token maps at both ends of DiT. */

/* Patch embedding plus the fixed position embedding:
 *   out[b, t, :] = Wp^T patch(b, t) + bias + pos[t]
 * Mirrors tinylazy.ops.patch_embed_forward (Conv2d(C, D, p, stride p), flatten,
 * transpose) followed by "+ pos_embed" (DiT.embed_tokens).
 * Inputs   x    (B, C, S, S) images, S = G * p
 *          Wp   (C*p*p, D)   the conv weight (D, C, p, p) flattened and transposed
 *          bias (D), pos (T, D) with T = G * G tokens, row-major over the patch grid
 * Output   out  (B, T, D)
 * Layout   gid (0, 1) = (VW-wide channel chunk, token b*T + t); the patch is read
 *          straight from x in (c, i, j) order, the order of the flattened conv weight.
 *          Groups of 16 along the channel axis. */
__kernel __attribute__((reqd_work_group_size(16, 1, 1)))
void patch_embed(const int B, const int C, const int G, const int P, const int D,
                 __global const float* restrict x, __global const float* restrict Wp,
                 __global const float* restrict bias, __global const float* restrict pos,
                 __global float* restrict out)
{
    const int d = get_global_id(0) * VW, r = get_global_id(1);
    if (d >= D || r >= B * G * G)
        return;
    const int T = G * G, b = r / T, t = r % T, S = G * P;
    const int gy = t / G, gx = t % G;
    floatv acc = LOADV(bias + d) + LOADV(pos + t * D + d);
    const __global float* w = Wp + d;
    for (int c = 0; c < C; c++) {
        const __global float* img = x + ((b * C + c) * S + gy * P) * S + gx * P;
        for (int i = 0; i < P; i++)
            for (int j = 0; j < P; j++, w += D)
                acc += img[i * S + j] * LOADV(w);
    }
    STOREV(out + r * D + d, acc);
}

/* Unpatchify: tokens (B, T, p*p*C) -> images (B, C, S, S), einsum 'nhwpqc->nchpwq'.
 * Mirrors tinylazy.ops.unpatchify.
 * Output pixel (b, c, y, x) reads token (y / p) * G + x / p, feature ((y % p) * p + x % p) * C + c.
 * Layout gid (0, 1, 2) = (pixel y * S + x, channel, sample); groups of 64 pixels. */
__kernel __attribute__((reqd_work_group_size(64, 1, 1)))
void unpatchify(const int G, const int P, const int C, __global const float* restrict tok,
                __global float* restrict img)
{
    const int S = G * P, pix = get_global_id(0), c = get_global_id(1), b = get_global_id(2);
    if (pix >= S * S)
        return;
    const int y = pix / S, x = pix % S;
    const int t = (y / P) * G + x / P, f = ((y % P) * P + x % P) * C + c;
    img[(b * C + c) * S * S + pix] = tok[(b * G * G + t) * P * P * C + f];
}
