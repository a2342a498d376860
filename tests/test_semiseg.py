"""The reference semi-supervised trainer in examples/semiseg: loader, model, every training
variant, resume, DDP (gloo, 2 processes), bad input. Tiny inputs; about a minute on 2 CPU cores."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

pytest.importorskip("torchvision")
pytest.importorskip("cityscapesscripts")
pytest.importorskip("PIL")

from PIL import Image  # noqa: E402

from examples.semiseg import data as D  # noqa: E402
from examples.semiseg.config import Config, parse_args  # noqa: E402
from examples.semiseg.engine import Trainer, load_checkpoint  # noqa: E402
from examples.semiseg.labels import IGNORE_INDEX, id_to_train_id_lut  # noqa: E402
from examples.semiseg.metrics import confusion_matrix, iou_from_confusion, summarize  # noqa: E402
from examples.semiseg.swiftnet import SwiftNet  # noqa: E402
from examples.semiseg.synthetic import generate  # noqa: E402

# train ids of the synthetic classes: road 0, sidewalk 1, building 2, pole 5, vegetation 8,
# sky 10, person 11, car 13 (+ the ego vehicle -> 255)
SYNTH_TRAIN_IDS = {0, 1, 2, 5, 8, 10, 11, 13, IGNORE_INDEX}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a busy 2-core machine OpenMP's spin-waiting makes two threads
    several times slower than one for these tiny models."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth"))
    generate(root, train=8, val=2, height=64, width=128, seed=0, quiet=True)
    return root


def tiny_config(root: str = "", **kw) -> Config:
    base = dict(data_root=root, resolution="full", crop_size=48, scale_range=[0.75, 1.5], labeled_fraction="1/2",
                batch_labeled=2, batch_unlabeled=2, steps=4, num_workers=0, eval_every=1000, ckpt_every=1000,
                log_every=1, eval_batch_size=2, vis_images=1, tensorboard=False, progress=False, device="cpu")
    base.update(kw)
    return Config.from_dict(base)


# ---------------------------------------------------------------------------------------
# labels and loader
# ---------------------------------------------------------------------------------------
def test_label_table_maps_ids_to_train_ids_and_unknown_to_ignore(tmp_path):
    lut = id_to_train_id_lut()
    assert lut[7] == 0 and lut[8] == 1 and lut[11] == 2 and lut[17] == 5 and lut[21] == 8
    assert lut[23] == 10 and lut[24] == 11 and lut[26] == 13 and lut[33] == 18
    assert lut[0] == lut[1] == lut[6] == IGNORE_INDEX  # void classes
    assert lut[34] == lut[200] == lut[255] == IGNORE_INDEX  # not in the table
    ids = np.array([[7, 26, 1, 200], [23, 24, 250, 33]], dtype=np.uint8)
    p = tmp_path / "x_gtFine_labelIds.png"
    Image.fromarray(ids).save(p)
    np.testing.assert_array_equal(D.read_label(str(p)), [[0, 13, 255, 255], [10, 11, 255, 18]])
    # 16-bit label images: ids above 255 are unknown too
    Image.fromarray(np.array([[7, 300]], dtype=np.uint16)).save(tmp_path / "w.png")
    np.testing.assert_array_equal(D.read_label(str(tmp_path / "w.png")), [[0, 255]])


def test_loader_reads_generated_dataset(synth):
    ds = D.CityscapesSegmentation(synth, "train", resolution="full")
    assert len(ds) == 8 and len(set(ds.names)) == 8
    img, lab = ds[0]
    assert img.shape == (3, 64, 128) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert lab.shape == (64, 128) and lab.dtype == torch.int64
    raw = np.asarray(Image.open(ds.samples[0].label))
    np.testing.assert_array_equal(lab.numpy(), id_to_train_id_lut()[raw])
    present = set()
    for i in range(len(ds)):
        present |= set(ds[i][1].unique().tolist())
    assert present <= SYNTH_TRAIN_IDS and {0, 2, 10, 13} <= present
    half = D.CityscapesSegmentation(synth, "val", resolution="half")
    img, lab = half[0]
    assert img.shape == (3, 32, 64) and lab.shape == (32, 64)
    assert set(lab.unique().tolist()) <= SYNTH_TRAIN_IDS  # nearest neighbour: no new ids


def test_unlabeled_dataset_never_opens_labels(synth, monkeypatch):
    def boom(path):
        raise AssertionError(f"label opened: {path}")

    monkeypatch.setattr(D, "read_label", boom)
    ds = D.CityscapesSegmentation(synth, "train", labels=False, jitter=D.Jitter(32))
    x = ds[(3, 123)]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 32, 32)
    assert all(s.label is None for s in ds.samples)


def test_labeled_subsets_seeded_permutation_and_split_file(synth, tmp_path):
    names = [f"city_{i:06d}_000019" for i in range(16)]
    a = D.labeled_indices(names, fraction="1/4", seed=0)
    assert len(a) == 4 and a == D.labeled_indices(names, fraction=0.25, seed=0)
    assert a != D.labeled_indices(names, fraction="1/4", seed=1)
    assert len(D.labeled_indices(names, fraction="1/8", seed=0)) == 2
    assert set(D.labeled_indices(names, fraction="1/8", seed=0)) <= set(range(16))
    assert D.labeled_indices(names, fraction=1, seed=3) == list(range(16))
    split = tmp_path / "labeled.txt"
    split.write_text("city_000003_000019\n"
                     "leftImg8bit/train/city/city_000007_000019_leftImg8bit.png gtFine/train/city/x.png\n"
                     "\n# comment\ncity_000001_000019_leftImg8bit.png\n")
    assert D.labeled_indices(names, split_file=str(split)) == [1, 3, 7]
    split.write_text("city_000003_000019\nnope_000000_000000\n")
    with pytest.raises(D.DatasetError, match=r"labeled\.txt.*line 2.*nope_000000_000000"):
        D.labeled_indices(names, split_file=str(split))


def _encoded_pair(h=40, w=56):
    """A label map of large blocks and an image whose first channel encodes it."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 19, (5, 7), generator=g)
    lab = blocks.repeat_interleave(8, 0).repeat_interleave(8, 1)[:h, :w].to(torch.uint8)
    img = torch.stack([lab.float() / 255, torch.rand(h, w, generator=g), torch.zeros(h, w)])
    return img, lab


def test_jitter_keeps_image_and_label_aligned():
    img, lab = _encoded_pair()
    # scale 1: crop, padding and flip are exact
    j = D.Jitter(crop=64, scale_range=(1.0, 1.0), flip=True)
    for seed in range(6):
        x, y = j(img, lab, np.random.default_rng(seed))
        assert x.shape == (3, 64, 64) and y.shape == (64, 64)
        pad = y == IGNORE_INDEX
        assert pad.any() and (x[:, pad] == 0).all()
        torch.testing.assert_close((x[0][~pad] * 255).round().to(torch.uint8), y[~pad], rtol=0, atol=0)
    # random scale: the bilinear image and the nearest-neighbour label agree wherever the
    # label is constant over a 3x3 neighbourhood (a shift or a lone flip would break that)
    j = D.Jitter(crop=32, scale_range=(0.5, 2.0), flip=True)
    for seed in range(8):
        x, y = j(img, lab, np.random.default_rng(seed))
        yp = torch.nn.functional.pad(y[None, None].float(), (1, 1, 1, 1), value=-1.0)  # crop border: not interior
        patches = torch.nn.functional.unfold(yp, 3)[0].view(9, *y.shape)
        interior = (patches == y.long()).all(0) & (y != IGNORE_INDEX)
        assert interior.sum() > 50, seed
        agree = (x[0] * 255 - y.float()).abs() < 0.5
        assert agree[interior].all(), seed
    # the same seed gives the same example
    a, b = j(img, lab, np.random.default_rng(5)), j(img, lab, np.random.default_rng(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_dataset_jitter_via_sampler_is_deterministic(synth):
    ds = D.CityscapesSegmentation(synth, "train", jitter=D.Jitter(32, (0.5, 1.5)))
    s = D.StepSampler(len(ds), 3, 5, seed=1, stream=1)
    batches = list(s)
    assert len(batches) == 5 and all(len(b) == 3 for b in batches)
    assert batches == list(D.StepSampler(len(ds), 3, 5, seed=1, stream=1))
    assert batches[2:] == list(D.StepSampler(len(ds), 3, 5, start_step=2, seed=1, stream=1))
    # 2 ranks split the same global batch
    r0 = list(D.StepSampler(len(ds), 2, 2, seed=1, stream=1, rank=0, world_size=2))
    r1 = list(D.StepSampler(len(ds), 2, 2, seed=1, stream=1, rank=1, world_size=2))
    glob = list(D.StepSampler(len(ds), 4, 2, seed=1, stream=1))
    assert [a + b for a, b in zip(r0, r1)] == glob
    # one epoch visits every image once
    idx = [i for b in D.StepSampler(len(ds), 4, 2, seed=0) for i, _ in b]
    assert sorted(idx) == list(range(8))
    x1, y1 = ds[batches[0][0]]
    x2, y2 = ds[batches[0][0]]
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------
# model and metrics
# ---------------------------------------------------------------------------------------
def test_swiftnet_shapes_parameters_and_local_weights(tmp_path):
    import torchvision

    m = SwiftNet(19, "rn18")
    assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - 11.80) < 0.01  # paper, Table 10
    m.eval()
    x = torch.rand(1, 3, 50, 70)
    with torch.no_grad():
        full, low = m(x), m(x, upsample=False)
    assert full.shape == (1, 19, 50, 70) and low.shape == (1, 19, 13, 18)
    assert torch.equal(m.forward_low(x), low)
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "rn18.pth"
    torch.save(ref.state_dict(), path)
    m2 = SwiftNet(19, "rn18", pretrained=str(path))
    assert torch.equal(m2.stem[0].weight, ref.conv1.weight) and torch.equal(m2.layer4[1].bn2.running_var,
                                                                            ref.layer4[1].bn2.running_var)
    with pytest.raises(RuntimeError, match="rn18.pth.*ResNet depth"):
        SwiftNet(19, "rn34", pretrained=str(path))
    torch.save({"model": ref.state_dict(), "evil": copy.copy}, tmp_path / "code.pth")  # not data
    with pytest.raises(RuntimeError, match="code.pth.*weights_only"):
        SwiftNet(19, "rn18", pretrained=str(tmp_path / "code.pth"))


def test_confusion_matrix_and_iou():
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pr = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    cm = confusion_matrix(pr, gt, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    iou = iou_from_confusion(cm)
    torch.testing.assert_close(iou[:3], torch.tensor([1 / 3, 3 / 4, 1 / 2], dtype=torch.float64))
    assert torch.isnan(iou[3])
    s = summarize(cm, ["a", "b", "c", "d"])
    assert s["classes_in_mean"] == 3 and abs(s["miou"] - (1 / 3 + 3 / 4 + 1 / 2) / 3) < 1e-12
    assert s["iou"]["d"] is None and abs(s["pixel_acc"] - 5 / 7) < 1e-12


# ---------------------------------------------------------------------------------------
# training steps
# ---------------------------------------------------------------------------------------
def _batch(seed=0, b=2, hw=48):
    g = torch.Generator().manual_seed(seed)
    xl = torch.rand(b, 3, hw, hw, generator=g)
    yl = torch.randint(0, 19, (b, hw, hw), generator=g)
    yl[:, :4] = IGNORE_INDEX
    xu = torch.rand(b, 3, hw, hw, generator=g)
    return xl, yl, xu


def _bn_count(model):
    return int(next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).num_batches_tracked)


@pytest.mark.parametrize("method,teacher,extra,bn_updates", [
    ("supervised", "live", {}, 1),
    ("1w-ct", "live", {}, 2),                                  # the authors' teacher: clean batch updates BN
    ("1w-ct", "live", {"bn_update_perturbed": True}, 3),
    ("1w-ct", "live", {"teacher_bn": "population", "consistency_resolution": "stride4"}, 1),
    ("1w-ct", "frozen", {"warp_teacher_logits": True}, 1),
    ("1w-ct", "ema", {"amp": "bf16", "grad_clip": 1.0}, 1),
    ("1w-cs", "live", {}, 2),
    ("2w-c1", "live", {}, 2),
    ("1w-p2", "ema", {}, 1),
])
def test_one_training_step(method, teacher, extra, bn_updates):
    torch.manual_seed(0)
    t = Trainer(tiny_config(method=method, teacher=teacher, **extra), data=False)
    before = copy.deepcopy(t.student.state_dict())
    teacher_before = copy.deepcopy(t.teacher.state_dict()) if t.teacher is not None else None
    stats = t.train_step(*_batch(hw=32 if "amp" in extra else 48))  # bf16 convolutions are slow on CPU
    assert t.step == 1 and np.isfinite(stats["loss_sup"]) and np.isfinite(stats["loss"])
    if method != "supervised":
        assert np.isfinite(stats["loss_cons"]) and stats["loss_cons"] > 0 and 0 < stats["valid_frac"] <= 1
    # the student got gradients and moved
    assert all(p.grad is not None for p in t.student.parameters())
    assert not torch.equal(before["logits.conv.weight"], t.student.logits.conv.weight)
    assert _bn_count(t.student) == int(before["stem.1.num_batches_tracked"]) + bn_updates
    if teacher == "frozen":
        # θ' = frozen copy of θ at the start of the step: no gradients, statistics untouched
        assert all(p.grad is None and not p.requires_grad for p in t.teacher.parameters())
        for k, v in t.teacher.state_dict().items():
            assert torch.equal(v, before[k]), k
    if teacher == "ema" and method != "supervised":
        assert all(p.grad is None for p in t.teacher.parameters())
        d = t.cfg.ema_decay
        after = t.student.state_dict()
        for k, v in t.teacher.state_dict().items():
            if v.dtype.is_floating_point:  # EMA of the student; the forward passes left it alone
                torch.testing.assert_close(v, d * teacher_before[k] + (1 - d) * after[k], rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(v, after[k])


def test_step_gradient_is_supervised_plus_alpha_consistency():
    """Algorithm 1: the step's gradient is grad(CE) + alpha * grad(consistency), the
    consistency term with the teacher's output as a constant target."""
    from examples.semiseg.engine import PHTPS_STREAM

    torch.manual_seed(0)
    cfg = tiny_config(method="1w-ct", teacher="frozen", alpha=0.5, lr=0.0, weight_decay=0.0)
    xl, yl, xu = _batch(1)
    t = Trainer(cfg, data=False)
    init = copy.deepcopy(t.student.state_dict())
    t.train_step(xl, yl, xu)
    g = [p.grad.clone() for p in t.student.parameters()]
    sup = Trainer(cfg.replace(method="supervised"), data=False)
    sup.student.load_state_dict(init)
    sup.train_step(xl, yl)
    ref = copy.deepcopy(sup.student)
    ref.load_state_dict(init)
    teacher = copy.deepcopy(ref).eval()
    gen = torch.Generator().manual_seed(D.mix_seed(cfg.seed, PHTPS_STREAM, 0, 0))
    params = t.phtps.sample(xu.shape[0], xu.shape[-2:], generator=gen)
    with torch.no_grad():
        target = teacher(xu).softmax(1)
    xp, _ = t.phtps.perturb(xu, params)
    loss = t.phtps.consistency_loss(ref(xp), target, params)
    gc = torch.autograd.grad(loss, list(ref.parameters()))
    for a, s_, c in zip(g, sup.student.parameters(), gc):
        torch.testing.assert_close(a, s_.grad + 0.5 * c, rtol=1e-4, atol=1e-6)


def test_resume_reproduces_the_next_step_bit_for_bit(synth, tmp_path):
    from examples.semiseg import train

    common = ["--data-root", synth, "--resolution", "full", "--crop-size", "48", "--labeled-fraction", "1/2",
              "--batch-labeled", "2", "--batch-unlabeled", "2", "--steps", "3", "--num-workers", "0",
              "--eval-every", "100", "--ckpt-every", "2", "--keep-checkpoints", "--eval-batch-size", "2",
              "--vis-images", "1", "--no-progress", "--no-tensorboard", "--device", "cpu",
              "--method", "mt", "--seed", "3"]
    a = str(tmp_path / "a")
    train.main(common + ["--out", a])
    b = str(tmp_path / "b")
    os.makedirs(b)
    import shutil

    shutil.copy(os.path.join(a, "step_0000002.pt"), os.path.join(b, "last.pt"))
    tb = train.main(common + ["--out", b, "--resume", "auto"])
    assert tb.step == 3
    ca, cb = load_checkpoint(os.path.join(a, "last.pt")), load_checkpoint(os.path.join(b, "last.pt"))
    assert ca["step"] == cb["step"] == 3

    def same(x, y, where):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), where
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for k in x:
                same(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            for i, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{where}[{i}]")
        else:
            assert x == y, where

    for key in ("model", "teacher", "optimizer", "scheduler", "rng"):
        same(ca[key], cb[key], key)
    for f in ("config.yaml", "train_log.csv", "eval_log.csv", "metrics.json", "model.pt"):
        assert os.path.isfile(os.path.join(a, f)), f
    assert os.listdir(os.path.join(a, "vis"))


# ---------------------------------------------------------------------------------------
# distributed (gloo, 2 processes)
# ---------------------------------------------------------------------------------------
def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from examples.semiseg.distributed import DistInfo

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        info = DistInfo(rank, world, 0)
        xl, yl, xu = _batch(seed=10, b=4)
        sl = slice(rank * 2, rank * 2 + 2)
        res = {}
        for method in ("supervised", "1w-ct", "2w-c1"):
            torch.manual_seed(0)
            t = Trainer(tiny_config(method=method), info, data=False)
            stats = t.train_step(xl[sl], yl[sl], xu[sl])
            res[method] = {"stats": stats, "state": t.student.state_dict(),
                           "grads": [p.grad.clone() for p in t.student.parameters()]}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_two_processes_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    # fork (like DataLoader workers; the workers use one intra-op thread) avoids re-importing
    # torch in each process, which costs more than the test itself on a small machine
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method=method)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for method in r0:
        for k, v in r0[method]["state"].items():  # DDP + SyncBN: identical replicas
            assert torch.equal(v, r1[method]["state"][k]), (method, k)
        assert np.isfinite(r0[method]["stats"]["loss"]) and np.isfinite(r1[method]["stats"]["loss"])
    # supervised: the same as one process on the concatenated batch (gradients and BN statistics)
    torch.manual_seed(0)
    t = Trainer(tiny_config(method="supervised"), data=False)
    xl, yl, _ = _batch(seed=10, b=4)
    t.train_step(xl, yl)
    # (48 x 48 inputs: with 1 x 1 feature maps BN normalizes over 4 values, and near-constant
    # channels amplify the different float summation order of 2 processes far beyond 1e-3)
    g_ddp = torch.cat([g.flatten() for g in r0["supervised"]["grads"]])
    g_one = torch.cat([p.grad.flatten() for p in t.student.parameters()])
    assert (g_ddp - g_one).norm() / g_one.norm() < 1e-4
    for g1, p in zip(r0["supervised"]["grads"], t.student.parameters()):
        torch.testing.assert_close(g1, p.grad, rtol=1e-3, atol=1e-5)
    for k, v in t.student.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(r0["supervised"]["state"][k], v, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------
def _write_pair(root, split, city, name, size=(16, 8), label_size=None, label_mode="L"):
    for sub in ("leftImg8bit", "gtFine"):
        os.makedirs(os.path.join(root, sub, split, city), exist_ok=True)
    img = os.path.join(root, "leftImg8bit", split, city, name + "_leftImg8bit.png")
    lab = os.path.join(root, "gtFine", split, city, name + "_gtFine_labelIds.png")
    Image.new("RGB", size, (10, 20, 30)).save(img)
    Image.new(label_mode, label_size or size, 7 if label_mode == "L" else (7, 7, 7)).save(lab)
    return img, lab


def test_bad_input_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(D.DatasetError, match="nowhere"):
        D.find_samples(missing, "train")
    root = str(tmp_path / "cs")
    os.makedirs(os.path.join(root, "leftImg8bit_trainvaltest", "leftImg8bit", "train"))
    with pytest.raises(D.DatasetError, match=r"leftImg8bit/train.*found .*leftImg8bit_trainvaltest"):
        D.find_samples(root, "train")
    # an image outside a city folder
    os.makedirs(os.path.join(root, "leftImg8bit", "train"))
    with pytest.raises(D.DatasetError, match="label folder not found: .*gtFine/train"):
        D.find_samples(root, "train")
    os.makedirs(os.path.join(root, "gtFine", "train"))
    stray = os.path.join(root, "leftImg8bit", "train", "a_000000_000019_leftImg8bit.png")
    Image.new("RGB", (4, 4)).save(stray)
    with pytest.raises(D.DatasetError, match="mis-laid image .*a_000000_000019_leftImg8bit.png"):
        D.find_samples(root, "train")
    os.remove(stray)
    # a missing label file
    img, lab = _write_pair(root, "train", "c", "c_000000_000001")
    os.remove(lab)
    with pytest.raises(D.DatasetError, match="c_000000_000001_gtFine_labelIds.png"):
        D.find_samples(root, "train")
    assert len(D.find_samples(root, "train", labels=False)) == 1  # unlabeled use is fine
    # unreadable image
    _write_pair(root, "train", "c", "c_000000_000001")
    with open(img, "wb") as fh:
        fh.write(b"not a png")
    ds = D.CityscapesSegmentation(root, "train")
    with pytest.raises(D.DatasetError, match="cannot read image .*c_000000_000001_leftImg8bit.png"):
        ds[0]
    # image/label size mismatch
    _write_pair(root, "train", "c", "c_000000_000001", label_size=(8, 8))
    with pytest.raises(D.DatasetError, match=r"size mismatch.*c_000000_000001_leftImg8bit.png.*16x8.*"
                                             r"c_000000_000001_gtFine_labelIds.png.*8x8"):
        D.CityscapesSegmentation(root, "train")[0]
    # a colour rendering instead of label ids
    _write_pair(root, "train", "c", "c_000000_000001", label_mode="RGB")
    with pytest.raises(D.DatasetError, match="c_000000_000001_gtFine_labelIds.png.*mode RGB"):
        D.CityscapesSegmentation(root, "train")[0]
    # the trainer reports a missing dataset the same way
    with pytest.raises(D.DatasetError, match="nowhere"):
        Trainer(tiny_config(missing, method="supervised"))
    # a checkpoint that is not data
    torch.save({"format": "x", "f": copy.copy}, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="bad.pt.*weights_only"):
        load_checkpoint(str(tmp_path / "bad.pt"))


# ---------------------------------------------------------------------------------------
# configuration and entry points
# ---------------------------------------------------------------------------------------
def test_config_layers_and_entry_points(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("crop_size: 96\nmethod: mt\nlabeled-fraction: 1/8\n")
    cfg, explicit = parse_args(["--preset", "cityscapes-full", "--config", str(y), "--steps", "7", "--no-flip"])
    assert cfg.crop_size == 96 and cfg.method == "1w-ct" and cfg.teacher == "ema" and cfg.steps == 7
    assert cfg.weight_decay_semi_scale == 0.25 and cfg.scale_range == [0.5, 2.0] and cfg.flip is False
    assert explicit["labeled_fraction"] == "1/8" and "out" not in explicit
    with pytest.raises(ValueError, match="unknown configuration keys"):
        Config.from_dict({"crop": 3})
    env = dict(os.environ, PYTHONPATH=ROOT)
    for cmd in ([sys.executable, os.path.join(ROOT, "examples", "semiseg", "train.py"), "--help"],
                [sys.executable, "-m", "examples.semiseg.train", "--help"]):
        r = subprocess.run(cmd, cwd=str(tmp_path) if cmd[1] != "-m" else ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and "--preset" in r.stdout, r.stderr
