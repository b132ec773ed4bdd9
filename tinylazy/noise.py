"""Counter-based Gaussian noise: the noise of image i depends only on (seed, i).

``make_noise`` draws a whole batch from one sequential generator, so an image's noise
depends on its place in the batch; DiT's ``sample_ddp.py`` seeds each GPU from the
global seed and its rank, so its images change with the number of GPUs.  Here every
image has its own stream, addressed by a counter, and any worker can draw the noise
of any image without drawing anything else first:

- Philox4x64-10 (Salmon et al., SC 2011; NumPy's ``np.random.Philox``, Random123's
  ``philox4x64_10``) with the 128-bit key (k0, k1) = (i, seed);
- segment s of that image's noise (s = 0: the starting noise x_T; s = k + 1: the
  per-step noise of sampling step k, k = 0 the first step, for DDPM) is the sequence
  of 64-bit words of the blocks Philox(counter = (j + 1, 0, s, 0), key), j = 0, 1, ...,
  each block giving its four words in order (NumPy's Philox, started at counter
  (0, 0, s, 0), increments the first word before each block);
- words are taken in pairs (a, b); with u = ((a >> 11) + 1) * 2**-53 in (0, 1] and
  v = (b >> 11) * 2**-53 in [0, 1), Box-Muller gives the two normals
  sqrt(-2 ln u) cos(2 pi v) and sqrt(-2 ln u) sin(2 pi v), in that order, in float64
  (2 pi: the float64 nearest it); a segment of n numbers takes ceil(n / 2) pairs and
  drops the last sine when n is odd;
- the n = C * H * W numbers fill the image's (C, H, W) array in C order and are then
  cast to the model dtype.

Only ``log``, ``cos`` and ``sin`` are not exact operations: another math library may
differ from NumPy's in the last bit of a float64, which changes the float32 noise
only when a value lies that close to a float32 rounding boundary (about one number in
2**29).  ``docs/distributed.md`` states the recipe for other backends.
"""
import numpy as np

FORMAT = "philox4x64-10 key (i, seed) counter (j+1, 0, segment, 0); box-muller float64; v1"
_U64 = 1 << 64


def _word(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not 0 <= value < _U64:
        raise ValueError(f"{name} must be an integer in 0..2**64-1, got {value!r}")
    return int(value)


def normals(seed, index, count, segment=0):
    """``count`` float64 standard normals of image ``index`` in segment ``segment`` (see the module doc)."""
    key = np.array([_word(index, "index"), _word(seed, "seed")], dtype=np.uint64)
    counter = np.array([0, 0, _word(segment, "segment"), 0], dtype=np.uint64)
    pairs = (int(count) + 1) // 2
    words = np.random.Philox(key=key, counter=counter).random_raw(2 * pairs)    # (2 * pairs,) uint64
    bits = (words >> np.uint64(11)).astype(np.float64)                           # 53-bit integers, exact
    u = (bits[0::2] + 1.0) * 2.0 ** -53                                         # (0, 1]
    theta = (2.0 * np.pi) * (bits[1::2] * 2.0 ** -53)                           # [0, 2 pi)
    r = np.sqrt(-2.0 * np.log(u))
    z = np.empty(2 * pairs)
    z[0::2], z[1::2] = r * np.cos(theta), r * np.sin(theta)
    return z[:count]


def image_noise(seed, indices, shape, segment=0, dtype=np.float32):
    """(len(indices),) + shape noise: row r is image ``indices[r]``'s segment ``segment``, cast to dtype."""
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape))
    out = np.empty((len(indices),) + shape, dtype=dtype)
    for r, i in enumerate(indices):
        out[r] = normals(seed, int(i), n, segment).reshape(shape)
    return out
