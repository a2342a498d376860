"""PhTPS demo: perturb a generated street scene (and scikit-image's sample photos when
installed), save a PNG grid of clean / perturbed / warped-label / validity-mask panels and
print per-op timings of the fused ops against the pure-PyTorch reference.

    python examples/demo_phtps.py --out out/demo
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import tpswarp

# A few Cityscapes train ids and their palette colours, for the generated scene.
ROAD, SIDEWALK, BUILDING, POLE, VEGETATION, SKY, PERSON, CAR = 0, 1, 2, 5, 8, 10, 11, 13
PALETTE = {
    ROAD: (128, 64, 128), SIDEWALK: (244, 35, 232), BUILDING: (70, 70, 70), POLE: (153, 153, 153),
    VEGETATION: (107, 142, 35), SKY: (70, 130, 180), PERSON: (220, 20, 60), CAR: (0, 0, 142),
}


def street_scene(height: int = 256, width: int = 512, seed: int = 0):
    """A textured synthetic street scene: image (3, H, W) in [0, 1] and train ids (H, W) int64."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height)[:, None].expand(height, width)
    xs = torch.linspace(0, 1, width)[None, :].expand(height, width)
    labels = torch.full((height, width), SKY, dtype=torch.int64)
    horizon = 0.45
    labels[ys > horizon] = ROAD
    labels[(ys > horizon) & ((xs < 0.18 - (ys - horizon) * 0.3) | (xs > 0.82 + (ys - horizon) * 0.3))] = SIDEWALK
    for x0, x1, top in ((0.0, 0.22, 0.12), (0.25, 0.42, 0.2), (0.6, 0.78, 0.08), (0.8, 1.0, 0.18)):
        labels[(xs >= x0) & (xs < x1) & (ys > top) & (ys <= horizon)] = BUILDING
    labels[((xs - 0.5) ** 2 / 0.01 + (ys - 0.33) ** 2 / 0.012 < 1) & (ys <= horizon)] = VEGETATION
    labels[(xs > 0.45) & (xs < 0.46) & (ys > 0.2) & (ys < 0.7)] = POLE
    labels[(xs > 0.3) & (xs < 0.48) & (ys > 0.58) & (ys < 0.75)] = CAR
    labels[(xs > 0.65) & (xs < 0.69) & (ys > 0.5) & (ys < 0.72)] = PERSON
    colours = torch.zeros(3, height, width)
    for tid, rgb in PALETTE.items():
        colours[:, labels == tid] = torch.tensor(rgb, dtype=torch.float32)[:, None] / 255
    texture = 0.08 * torch.randn(1, height, width, generator=g)
    stripes = 0.05 * torch.sin(xs * 80)[None] * (labels == BUILDING)
    shade = 0.15 * (ys[None] - 0.5)
    return (colours + texture + stripes - shade).clamp(0, 1), labels


def colourize(labels: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(3, *labels.shape)
    for tid, rgb in PALETTE.items():
        out[:, labels == tid] = torch.tensor(rgb, dtype=torch.float32)[:, None] / 255
    return out  # ignore (255) stays black


def sample_photos(size):
    """scikit-image's sample photos resized to ``size``, if scikit-image is installed."""
    try:
        from skimage import data
    except ImportError:
        return []
    photos = []
    for name in ("astronaut", "coffee", "chelsea"):
        img = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float() / 255
        photos.append(torch.nn.functional.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0])
    return photos


def median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def timings(images: torch.Tensor, params: tpswarp.PhTPSParams, phtps: tpswarp.PhTPS, classes: int = 19) -> list:
    B, _, H, W = images.shape
    logits = torch.randn(B, classes, H, W)
    teacher = torch.randn(B, classes, H, W).softmax(1)
    ops = {
        "tps_solve": lambda: tpswarp.tps_solve(params.src, params.dst),
        "photometric_jitter": lambda: phtps.photometric(images, params),
        "tps_warp": lambda: phtps.warp(images, params),
        "masked_kl_div": lambda: tpswarp.masked_kl_div(logits, teacher),
        "warped_kl_div": lambda: phtps.consistency_loss(logits, teacher, params),
    }
    rows = []
    for name, fn in ops.items():
        fused = median_ms(fn)
        with tpswarp.use_backend("reference"):
            ref = median_ms(fn)
        backend = tpswarp.backends()["selected"]["cpu"][name]
        rows.append((name, backend, fused, ref))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--samples", type=int, default=3, help="perturbations per image")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = (args.height, args.width)
    scene, labels = street_scene(*size, seed=args.seed)
    images = [scene] + sample_photos(size)
    phtps = tpswarp.PhTPS()
    g = torch.Generator().manual_seed(args.seed)

    rows = []
    for idx, img in enumerate(images):
        batch = img[None].expand(args.samples, -1, -1, -1).contiguous()
        params = phtps.sample(args.samples, size, generator=g)
        perturbed, valid = phtps.perturb(batch, params)
        lab = phtps.warp_labels(labels[None].expand(args.samples, -1, -1), params) if idx == 0 else None
        for k in range(args.samples):
            panels = [("clean", img), (f"perturbed #{k}", perturbed[k].clamp(0, 1))]
            if lab is not None:
                panels.append(("warped labels", colourize(lab[k])))
            panels.append(("validity mask", valid[k].float().expand(3, -1, -1)))
            rows.append(panels)

    ncols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(3.2 * ncols, 1.8 * len(rows)), squeeze=False)
    for r, panels in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(panels):
                title, im = panels[c]
                ax.imshow(im.permute(1, 2, 0).numpy())
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "phtps_demo.png")
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")

    batch = torch.stack([scene] * 4)
    params = phtps.sample(4, size, generator=g)
    print(f"\nper-op timings on CPU ({torch.get_num_threads()} threads), batch 4 x {size[0]} x {size[1]}, "
          "19 classes for the losses; forward only, median of 5:")
    print(f"{'op':<20}{'backend':>10}{'ms':>10}{'reference ms':>15}{'speed-up':>10}")
    for name, backend, fused, ref in timings(batch, params, phtps):
        print(f"{name:<20}{backend:>10}{fused:>10.2f}{ref:>15.2f}{ref / fused:>9.1f}x")


if __name__ == "__main__":
    main()
