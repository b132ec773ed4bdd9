"""The digits dataset of the bundled model: scikit-learn's ``load_digits`` as 1x16x16 images.

1797 grey 8x8 images of the digits 0..9 with values 0..16 ship inside the
scikit-learn wheel (no download).  tinylazy maps them to [-1, 1] and
upsamples them to 16x16 with nearest neighbour (each pixel becomes a 2x2
block).  scikit-learn is the ``[train]`` extra, never a runtime dependency.
"""
import numpy as np

NUM_CLASSES = 10
IMAGE_SIZE = 16
SOURCE = "sklearn.datasets.load_digits (1797 8x8 images, values 0..16)"


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise RuntimeError("the digits dataset needs scikit-learn: pip install 'tinylazy[train]'") from e
    return load_digits()


def to_model_range(images8):
    """(N, 8, 8) values 0..16 -> (N, 1, 16, 16) float32 in [-1, 1], nearest upsampled."""
    x = np.asarray(images8, dtype=np.float64) / 16.0 * 2.0 - 1.0                 # 0..16 -> [-1, 1]
    x = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)                            # (N, 8, 8) -> (N, 16, 16)
    return x[:, None].astype(np.float32)                                         # (N, 1, 16, 16)


def load_digits_dataset():
    """All 1797 digits: images (N, 1, 16, 16) float32 in [-1, 1], labels (N,) int64 in 0..9."""
    d = _load_digits()
    return to_model_range(d.images), np.asarray(d.target, dtype=np.int64)
