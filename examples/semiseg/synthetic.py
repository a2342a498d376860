"""A small synthetic street-scene dataset in the official Cityscapes layout.

Each image is a procedurally drawn street (sky, buildings with windows, trees, road with
lane markings, sidewalks, poles, cars, people, sometimes the ego-vehicle's hood) with
random palettes, lighting and noise textures; the label image holds the matching
Cityscapes *label ids* (sky 23, road 7, sidewalk 8, building 11, pole 17, vegetation 21,
person 24, car 26, ego vehicle 1), so the real loader maps them to train ids exactly as
for Cityscapes. ::

    python -m examples.semiseg.synthetic --out data/semiseg-synth --train 96 --val 24

writes ``leftImg8bit/{train,val}/{city}/{city}_{seq:06d}_{frame:06d}_leftImg8bit.png`` and
``gtFine/.../*_gtFine_labelIds.png``. Every image is a function of ``(seed, split, index)``.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import os
import sys
from typing import Tuple

import numpy as np

# Cityscapes label ids (cityscapesscripts.helpers.labels)
EGO, ROAD, SIDEWALK, BUILDING, POLE, VEGETATION, SKY, PERSON, CAR = 1, 7, 8, 11, 17, 21, 23, 24, 26

CITIES = {"train": ("tpsville", "warpton", "jitterburg"), "val": ("kernelstadt",)}
VERSION = 2


def _hsv(h: float, s: float, v: float) -> Tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0), 1), min(max(v, 0), 1))
    return int(r * 255), int(g * 255), int(b * 255)


def street_scene(height: int = 256, width: int = 512, seed: int = 0):
    """One scene: ``(image (H, W, 3) uint8, label ids (H, W) uint8)``."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    H, W = height, width
    img = Image.new("RGB", (W, H))
    lab = Image.new("L", (W, H), 0)
    di, dl = ImageDraw.Draw(img), ImageDraw.Draw(lab)

    def shape(kind, xy, colour, label, **kw):
        if kind in ("rectangle", "ellipse"):  # PIL wants x0 <= x1, y0 <= y1
            x0, y0, x1, y1 = xy
            xy = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
        getattr(di, kind)(xy, fill=colour, **kw)
        getattr(dl, kind)(xy, fill=label, **kw)

    horizon = int(H * rng.uniform(0.38, 0.55))
    # sky: a vertical gradient (day, overcast or dusk)
    mood = rng.choice(["day", "overcast", "dusk"], p=[0.5, 0.3, 0.2])
    if mood == "day":
        top, bottom = _hsv(rng.uniform(0.55, 0.63), rng.uniform(0.4, 0.8), rng.uniform(0.6, 0.9)), \
            _hsv(rng.uniform(0.52, 0.6), rng.uniform(0.1, 0.4), rng.uniform(0.85, 1.0))
    elif mood == "overcast":
        g0 = rng.uniform(0.55, 0.85)
        top, bottom = _hsv(0.6, 0.05, g0), _hsv(0.6, 0.03, min(1, g0 + 0.1))
    else:
        top, bottom = _hsv(rng.uniform(0.6, 0.7), 0.5, 0.45), _hsv(rng.uniform(0.02, 0.1), 0.6, 0.95)
    for y in range(horizon + 1):
        t = y / max(1, horizon)
        di.line([(0, y), (W, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    dl.rectangle([0, 0, W, horizon], fill=SKY)

    # buildings along the horizon, with windows; gaps show the sky
    x = int(rng.uniform(-0.05, 0.05) * W)
    while x < W:
        bw = int(rng.uniform(0.07, 0.24) * W)
        if rng.random() < 0.15:
            x += bw // 2
            continue
        btop = int(rng.uniform(0.03, 0.85) * horizon)
        base = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.35), rng.uniform(0.3, 0.8))
        shape("rectangle", [x, btop, x + bw, horizon + 2], base, BUILDING)
        win = tuple(int(c * rng.uniform(0.3, 0.7)) for c in base)
        wx, wy = max(3, bw // int(rng.integers(4, 8))), max(3, int(rng.uniform(0.04, 0.08) * H))
        for yy in range(btop + wy // 2, horizon - wy, wy * 2):
            for xx in range(x + wx // 2, x + bw - wx, wx * 2):
                di.rectangle([xx, yy, xx + wx - 1, yy + wy - 1], fill=win)
        x += bw

    # trees in front of the buildings
    for _ in range(int(rng.integers(0, 4))):
        cx, r = rng.uniform(0, W), rng.uniform(0.04, 0.12) * H
        cy = horizon - r * rng.uniform(0.2, 1.2)
        leaf = _hsv(rng.uniform(0.17, 0.33), rng.uniform(0.4, 0.9), rng.uniform(0.25, 0.65))
        shape("ellipse", [cx - r * 1.2, cy - r, cx + r * 1.2, cy + r], leaf, VEGETATION)
        shape("rectangle", [cx - r * 0.12, cy + r * 0.8, cx + r * 0.12, horizon + 2], _hsv(0.08, 0.5, 0.3),
              VEGETATION)

    # road and sidewalks below the horizon (perspective wedges)
    road = _hsv(rng.uniform(0, 1), rng.uniform(0, 0.1), rng.uniform(0.2, 0.5))
    shape("rectangle", [0, horizon, W, H], road, ROAD)
    vx = W * rng.uniform(0.35, 0.65)
    walk = _hsv(rng.uniform(0.8, 1.05), rng.uniform(0.05, 0.35), rng.uniform(0.45, 0.8))
    lw, rw = rng.uniform(0.05, 0.35) * W, rng.uniform(0.05, 0.35) * W
    shape("polygon", [(0, horizon), (vx - W * 0.12, horizon), (lw, H), (0, H)], walk, SIDEWALK)
    shape("polygon", [(W, horizon), (vx + W * 0.12, horizon), (W - rw, H), (W, H)], walk, SIDEWALK)
    # lane markings (road)
    mark = _hsv(0.15, rng.uniform(0, 0.6), 0.95)
    for k in range(6):
        t0, t1 = k / 6, (k + 0.5) / 6
        y0, y1 = horizon + (H - horizon) * t0 ** 1.5, horizon + (H - horizon) * t1 ** 1.5
        w0, w1 = 1 + 6 * t0 ** 1.5, 1 + 6 * t1 ** 1.5
        xc0 = vx + (W / 2 - vx) * t0 ** 1.5
        xc1 = vx + (W / 2 - vx) * t1 ** 1.5
        di.polygon([(xc0 - w0, y0), (xc0 + w0, y0), (xc1 + w1, y1), (xc1 - w1, y1)], fill=mark)

    def depth_scale(y_bottom: float) -> float:
        return max(0.05, (y_bottom - horizon) / (H - horizon))

    objects = []
    for _ in range(int(rng.integers(1, 5))):
        objects.append(("car", rng.uniform(horizon + 0.08 * (H - horizon), H * 1.05)))
    for _ in range(int(rng.integers(0, 5))):
        objects.append(("person", rng.uniform(horizon + 0.05 * (H - horizon), H)))
    for _ in range(int(rng.integers(1, 4))):
        objects.append(("pole", rng.uniform(horizon + 0.05 * (H - horizon), H)))
    objects.sort(key=lambda o: o[1])  # far to near
    for kind, yb in objects:
        s = depth_scale(yb)
        if kind == "car":
            cw, ch = 0.45 * W * s, 0.3 * H * s
            cx = rng.uniform(-0.1, 1.1) * W
            body = _hsv(rng.uniform(0, 1), rng.choice([0.0, rng.uniform(0.5, 1.0)]), rng.uniform(0.1, 0.95))
            shape("rectangle", [cx - cw / 2, yb - ch * 0.6, cx + cw / 2, yb - ch * 0.15], body, CAR)
            shape("polygon", [(cx - cw * 0.35, yb - ch * 0.6), (cx - cw * 0.22, yb - ch),
                              (cx + cw * 0.22, yb - ch), (cx + cw * 0.35, yb - ch * 0.6)], body, CAR)
            glass = _hsv(0.58, 0.2, rng.uniform(0.15, 0.45))
            di.polygon([(cx - cw * 0.3, yb - ch * 0.62), (cx - cw * 0.2, yb - ch * 0.93),
                        (cx + cw * 0.2, yb - ch * 0.93), (cx + cw * 0.3, yb - ch * 0.62)], fill=glass)
            for wxc in (cx - cw * 0.3, cx + cw * 0.3):
                r = ch * 0.18
                shape("ellipse", [wxc - r, yb - ch * 0.15 - r, wxc + r, yb - ch * 0.15 + r], (15, 15, 15), CAR)
        elif kind == "person":
            ph = 0.45 * H * s
            px = rng.uniform(0, 1) * W
            shirt = _hsv(rng.uniform(0, 1), rng.uniform(0.2, 1), rng.uniform(0.2, 0.95))
            trousers = _hsv(rng.uniform(0, 1), rng.uniform(0, 0.6), rng.uniform(0.1, 0.6))
            skin = _hsv(rng.uniform(0.02, 0.1), rng.uniform(0.3, 0.6), rng.uniform(0.35, 0.95))
            bw = ph * 0.22
            shape("rectangle", [px - bw / 2, yb - ph * 0.45, px + bw / 2, yb], trousers, PERSON)
            shape("rectangle", [px - bw / 2, yb - ph * 0.85, px + bw / 2, yb - ph * 0.45], shirt, PERSON)
            r = ph * 0.08
            shape("ellipse", [px - r, yb - ph - r * 0.2, px + r, yb - ph * 0.85 + r * 0.2], skin, PERSON)
        else:
            px = rng.uniform(0, 1) * W
            pw = max(1.5, 0.012 * W * s)
            top = yb - 0.9 * H * s - 0.1 * H
            shape("rectangle", [px - pw / 2, top, px + pw / 2, yb], _hsv(0.6, 0.05, rng.uniform(0.3, 0.75)), POLE)

    if rng.random() < 0.35:  # the ego vehicle's hood: ignored in evaluation
        hood = _hsv(rng.uniform(0, 1), rng.uniform(0, 0.3), rng.uniform(0.05, 0.3))
        shape("ellipse", [-0.2 * W, H - 0.1 * H, 1.2 * W, H + 0.25 * H], hood, EGO)

    image = np.asarray(img).astype(np.float32)
    # camera and lighting: exposure, white balance, sometimes a strong condition (the
    # photometric variation that PhTPS's jitter teaches invariance to)
    gain, bias = rng.uniform(0.7, 1.2), rng.uniform(-20, 20)
    tint = rng.uniform(0.9, 1.1, size=3)
    condition = rng.choice(["plain", "warm", "night", "fog", "cast"], p=[0.4, 0.15, 0.15, 0.15, 0.15])
    if condition == "warm":      # low sun / sodium lights
        tint = tint * np.array([1.25, 1.0, 0.65])
    elif condition == "night":   # dark, bluish, low contrast
        gain, bias, tint = gain * rng.uniform(0.3, 0.5), bias * 0.3, tint * np.array([0.8, 0.9, 1.25])
    elif condition == "fog":     # washed out towards grey
        f = rng.uniform(0.4, 0.7)
        image = image * (1 - f) + f * rng.uniform(150, 210)
    elif condition == "cast":    # a strong colour cast of random hue
        tint = tint * (0.55 + 0.9 * np.array(_hsv(rng.uniform(0, 1), 0.6, 1.0)) / 255)
    noise = rng.normal(0, rng.uniform(3, 12), size=(H, W, 1)) + rng.normal(0, 3, size=(H, W, 3))
    yy = np.linspace(0, 1, H)[:, None, None]
    image = image * gain * tint + bias + noise - rng.uniform(0, 30) * (yy - 0.5)
    return np.clip(image, 0, 255).astype(np.uint8), np.asarray(lab).copy()


def generate(out: str, *, train: int = 96, val: int = 24, height: int = 256, width: int = 512, seed: int = 0,
             force: bool = False, quiet: bool = False) -> str:
    """Write the dataset under ``out`` (skipped when an identical one is already there)."""
    from PIL import Image

    spec = dict(version=VERSION, train=train, val=val, height=height, width=width, seed=seed)
    marker = os.path.join(out, "synthetic.json")
    if not force and os.path.isfile(marker):
        with open(marker) as fh:
            if json.load(fh) == spec:
                if not quiet:
                    print(f"synthetic dataset already at {out}")
                return out
    for split, count in (("train", train), ("val", val)):
        cities = CITIES[split]
        for i in range(count):
            city = cities[i % len(cities)]
            name = f"{city}_{i // len(cities):06d}_{19 + i:06d}"
            image, ids = street_scene(height, width, seed=[seed, 0 if split == "train" else 1, i])
            for sub, arr, suffix in (("leftImg8bit", image, "_leftImg8bit.png"), ("gtFine", ids, "_gtFine_labelIds.png")):
                d = os.path.join(out, sub, split, city)
                os.makedirs(d, exist_ok=True)
                Image.fromarray(arr).save(os.path.join(d, name + suffix))
    with open(marker, "w") as fh:
        json.dump(spec, fh)
    if not quiet:
        print(f"wrote synthetic Cityscapes-layout dataset to {out}: {train} train + {val} val images of {width}x{height}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/semiseg-synth")
    p.add_argument("--train", type=int, default=96)
    p.add_argument("--val", type=int, default=24)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rewrite even if the same dataset exists")
    a = p.parse_args(argv)
    generate(a.out, train=a.train, val=a.val, height=a.height, width=a.width, seed=a.seed, force=a.force)


if __name__ == "__main__":
    main(sys.argv[1:])
