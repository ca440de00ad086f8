"""The perceptive-model stages on any device. PyTorch's meta device (shapes, no data) stands in for
a GPU: a tensor made on the CPU inside device code meets a meta tensor and fails ("Tensor on device
cpu is not on the expected device meta"), as it would on CUDA. What cannot run on meta (reading a
value: a log line, a PNG, detections handed back on the CPU) is checked with a stand-in network that
records the device of its input. On the CPU in fp32 the device setting changes no number; under a
bf16 autocast the losses stay fp32."""
import pytest
import torch
import torch.fx.experimental._config as fx_config
import torch.nn as nn
import torch.nn.functional as F

import autoencoder
import config
import data
from experiments import crops, evaluate
from perceptive import __main__ as perceptive_cli
from perceptive import detector
from conftest import TINY_DETECTOR, tiny_train_cfg

META = torch.device("meta")


@pytest.fixture
def meta_nonzero(monkeypatch):
    # nonzero (and so boolean-mask indexing) has a data-dependent shape the meta device cannot know;
    # PyTorch can assume every element is non-zero instead, which is all a device check needs
    monkeypatch.setattr(fx_config, "meta_nonzero_assume_all_nonzero", True)


def meta_batch(B=2, M=3, S=32):
    """A collated detector batch on meta (the loss reads image, boxes, labels, valid)."""
    return dict(image=torch.empty(B, 3, S, S, device=META), boxes=torch.empty(B, M, 4, device=META),
                labels=torch.empty(B, M, dtype=torch.long, device=META),
                valid=torch.empty(B, M, dtype=torch.bool, device=META))


def tiny_detector(num_classes=5, class_names=(), size=32):
    return detector.Detector(detector.DetectorConfig(num_classes, tuple(class_names), size,
                                                     **TINY_DETECTOR))


# ----------------------------------------------------------------------------------------------
# perceptive/detector.py

def test_centernet_targets_are_made_on_the_boxes_device(meta_nonzero):
    b = meta_batch()
    out = detector.centernet_targets(b["boxes"], b["labels"], b["valid"], 5, 8)
    assert out[0].shape == (2, 5, 8, 8) and all(t.device == META for t in out)


def test_detector_loss_and_its_backward_on_the_model_device(meta_nonzero):
    model = tiny_detector().to(META)
    loss, parts = detector.detector_loss(model, meta_batch(), detector.DetTrainConfig())
    loss.backward()
    assert loss.device == META and all(v.device == META for v in parts.values())
    assert all(p.grad is not None and p.grad.device == META for p in model.parameters())


def test_decoding_stays_on_the_outputs_device():
    model = tiny_detector().to(META).eval()
    boxes, scores, labels = detector.decode(*model(torch.empty(2, 3, 32, 32, device=META)),
                                            max_dets=10)
    assert (boxes.shape, scores.shape, labels.shape) == ((2, 10, 4), (2, 10), (2, 10))
    assert boxes.device == scores.device == labels.device == META


def test_predict_runs_on_the_model_device_and_answers_on_the_cpu():
    model, seen, G = tiny_detector().to(META), [], 8

    def forward(x):   # meta outputs have no values to hand back: record the input's device, answer
                      # from the CPU
        seen.append(x.device)
        return (
            torch.randn(len(x), 5, G, G),
            torch.rand(len(x), 2, G, G),
            torch.rand(len(x), 2, G, G),
        )
    model.forward = forward
    out = detector.predict(model, torch.rand(2, 3, 32, 32) * 2 - 1)
    assert seen == [META] and len(out) == 2
    assert all(v.device.type == "cpu" for d in out for v in d.values())


def test_detector_trains_on_the_given_device(meta_nonzero, tiny_data):
    ds = data.CocoLayoutDataset(tiny_data, "train", size=32)
    # a log line reads a value
    cfg = detector.DetTrainConfig(steps=2, batch_size=4, warmup=1, log_every=0)
    model = detector.train(ds,
                           detector.DetectorConfig(5, tuple(ds.class_names), 32, **TINY_DETECTOR),
                           cfg,
                           device="meta")
    assert all(t.device == META for t in model.state_dict().values())


def test_the_detector_loss_is_fp32_under_a_bf16_autocast(tiny_data):
    ds = data.CocoLayoutDataset(tiny_data, "train", size=32)
    batch = data.collate([ds[i] for i in range(4)])
    with config.autocast("cpu", "bf16"):
        loss, parts = detector.detector_loss(tiny_detector(), batch, detector.DetTrainConfig())
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in parts.values())


def test_cpu_fp32_training_is_repeatable_and_the_default(tiny_data):
    # same seed, same weights: the device arguments at their defaults and spelled out train the same
    # model
    ds = data.CocoLayoutDataset(tiny_data, "train", size=32)
    mcfg = detector.DetectorConfig(5, tuple(ds.class_names), 32, **TINY_DETECTOR)
    cfg = detector.DetTrainConfig(steps=3, batch_size=4, warmup=1, log_every=0)
    a, b = detector.train(ds, mcfg, cfg), detector.train(ds, mcfg, cfg, device="cpu", dtype="fp32")
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    out = detector.predict(b, torch.stack([ds[i]["image"] for i in range(2)]))
    assert all(v.device.type == "cpu" for d in out for v in d.values())


def test_bf16_training_on_the_cpu_gives_an_fp32_model(tiny_data):
    ds = data.CocoLayoutDataset(tiny_data, "train", size=32)
    model = detector.train(ds,
                           detector.DetectorConfig(5, tuple(ds.class_names), 32, **TINY_DETECTOR),
                           detector.DetTrainConfig(steps=2, batch_size=4, warmup=1, log_every=1),
                           log=lambda m: None,
                           dtype="bf16")
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# experiments/crops.py

def test_crop_classifier_step_on_the_device():
    x = torch.empty(4, 3, 16, 16, device=META)                           # the images, on the device
    boxes, index = torch.empty(6, 4, device=META), torch.zeros(6, dtype=torch.long, device=META)
    clf = crops.CropClassifier(3, width=4, size=8).to(META)
    logits = clf(crops._crop(x, crops._rois(boxes, index, x.shape[-2:], 0.1), 8))
    loss = F.cross_entropy(logits, torch.zeros(6, dtype=torch.long, device=META))
    loss.backward()
    assert logits.shape == (6, 3) and loss.device == META


class DeviceStub(nn.Module):
    """A crop classifier that lives on meta (a buffer says so), records its input's device, answers
    from the CPU."""
    size, context, class_names = 4, 0.0, ("a", "b", "c")

    def __init__(self):
        super().__init__()
        self.register_buffer("here", torch.empty(0, device=META))
        self.seen = []

    def forward(self, x):
        self.seen.append(x.device)
        return torch.zeros(len(x), 3)


def test_classify_runs_on_the_classifier_device_and_answers_on_the_cpu():
    clf, image = DeviceStub(), torch.full((16, 16, 3), 128, dtype=torch.uint8).numpy()
    layout = dict(boxes=torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]),
                  labels=torch.tensor([0, 1]))
    acc = crops.crop_accuracy(clf, [image], [layout])
    ok = crops.accept_objects(clf, [image], [layout], min_prob=0.3)
    assert clf.seen == [META, META] and acc["overall"]["count"] == 2
    assert ok[0].device.type == "cpu" and ok[0].tolist() == [True, True]   # each class at 1/3 > 0.3


# ----------------------------------------------------------------------------------------------
# autoencoder.py

def test_autoencoder_and_its_loss_on_the_device(tiny_data):
    ae = autoencoder.Autoencoder(autoencoder.AutoencoderConfig(channels=4, factor=4)).to(META)
    x = torch.empty(2, 3, 16, 16, device=META)
    loss = autoencoder.reconstruction_loss(ae(x), x, edge_weight=0.5)
    loss.backward()
    z = ae.encode(x)
    assert loss.device == z.device == ae.decode(z).device == META and z.shape == (2, 4, 4, 4)
    ds = data.CocoLayoutDataset(tiny_data, "train", size=16)
    assert autoencoder.encode_dataset(ae, ds, META, batch=8, progress=False).shape == (
        len(ds),
        4,
        4,
        4,
    )


def test_autoencoder_loss_is_fp32_and_bf16_training_runs(tiny_data, tmp_path):
    x = torch.rand(2, 3, 8, 8, dtype=torch.bfloat16)
    assert autoencoder.reconstruction_loss(x.flip(-1), x, 0.5).dtype == torch.float32
    cfg = tiny_train_cfg(tiny_data, tmp_path, ae_steps=2, ae_channels=4, ae_factor=4,
                         ae_latent_channels=4)
    info = autoencoder.train_autoencoder(cfg, tiny_data, tmp_path / "ae.pt", log=lambda m: None,
                                         dtype="bf16")
    ae, _ = autoencoder.load_autoencoder(tmp_path / "ae.pt")
    assert info["scale"] > 0 and all(p.dtype == torch.float32 for p in ae.parameters())


# ---------------------------------------------------------------------------------------------- the
# commands

no_cuda = pytest.mark.skipif(torch.cuda.is_available(),
                             reason="needs a machine without a CUDA device")


@no_cuda
def test_perception_command_names_a_device_it_lacks_in_one_line(tiny_data):
    with pytest.raises(SystemExit) as e:
        perceptive_cli.main(["eval", "--data", tiny_data, "--device", "cuda"])
    msg = str(e.value)
    assert msg.startswith("error: --device cuda: this machine has no CUDA device") and "\n" not in msg


def test_perception_commands_print_their_device_and_dtype(tiny_data, tmp_path, capsys):
    device, why = config.resolve_device("auto")
    perceptive_cli.main(["train", "--data", tiny_data, "--out", str(tmp_path), "--image-size", "32",
                         "--width", "8",
                     "--steps", "2", "--batch-size", "4", "--warmup", "1", "--log-every", "0",
                         "--dtype", "fp32"])
    assert capsys.readouterr().out.splitlines()[0] == f"device {device} ({why}), dtype fp32 (as asked)"
    perceptive_cli.main(["eval", "--data", tiny_data, "--image-size", "32", "--detector",
                         str(tmp_path / "detector.pt"),
                     "--device", "cpu"])
    assert capsys.readouterr().out.splitlines()[0] == "device cpu (as asked)"


@no_cuda
def test_evaluate_names_a_device_it_lacks_before_anything_runs(tmp_path):
    # tmp_path is no run folder: the device is checked first, and main turns the DataError into one
    # line
    with pytest.raises(config.DataError, match=r"^--device cuda: this machine has no CUDA device"):
        evaluate.evaluate(tmp_path, evaluate.EvalConfig(device="cuda"))
    with pytest.raises(SystemExit,
                       match=r"^error: --device cuda:3: this machine has no CUDA device"):
        evaluate.main(["--run", str(tmp_path), "--device", "cuda:3", "--dtype", "fp32"])
    with pytest.raises(config.DataError,
                       match=r"^--dtype must be auto, fp32, bf16 or fp16, got 'fp8'$"):
        # the command line's choices refuse it first
        evaluate.evaluate(tmp_path, evaluate.EvalConfig(dtype="fp8"))
