"""Side measurement (not part of the book run): what a purpose-built CNN reads from the pictures.

probes/scale_study.py runs it beside the tiny Qwen2-VL at several training sizes (chapter 3 shows
the result). A small convolutional network is trained from scratch on a run's training
images, every attribute of every image (not only the W drawn per image), with random quarter-turns
and flips: at the model's 112 x 112 (bicubic, as the image processor resizes) or at the crop's own
pixels (centred on a 160 x 160 canvas). It is scored on the same test images and (image,
attribute) rows as the chain's R² (the run's 03_predict/predictions.csv: the profile's
`predict.n_images` test images), with the chain's patient-bootstrap intervals; where the run has
no predictions yet, on every test image of its split (the printout says which).

    .venv/bin/python probes/cnn_reader.py --run runs/default --res 112 --epochs 14
    .venv/bin/python probes/cnn_reader.py --run runs/default --res native --epochs 14
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from PIL import Image

from skinlib import attributes, config, intervals, split

NAMES = [a.name for a in attributes.ATTRIBUTES]
BATCH = 64


@dataclass
class Reading:
    """What the CNN read on one run: R² per attribute with intervals, and how it got there."""
    r2: pd.DataFrame      # attribute, r2, r2_lo, r2_hi, n
    n_train: int
    n_test: int           # test images scored
    on: str               # "chain" (the chain's predicted rows) or "all test images"
    seconds: float        # loading, training and scoring


def load_images(h5_path, ids, res: str) -> torch.Tensor:
    """(n, 3, S, S) uint8: 112 x 112 bicubic, or the crop centred on a 160 x 160 canvas."""
    s = 112 if res == "112" else 160
    out = np.zeros((len(ids), 3, s, s), np.uint8)
    with h5py.File(h5_path, "r") as f:
        for k, i in enumerate(ids):
            im = Image.open(io.BytesIO(f[i][()])).convert("RGB")
            if res == "112":
                a = np.asarray(im.resize((112, 112), Image.BICUBIC))
            else:
                a0 = np.asarray(im)
                a = np.zeros((160, 160, 3), np.uint8)
                o = (160 - a0.shape[0]) // 2
                a[o:o + a0.shape[0], o:o + a0.shape[1]] = a0
            out[k] = a.transpose(2, 0, 1)
    return torch.from_numpy(out)


def _block(i, o, convs=2):
    layers = []
    for k in range(convs):
        layers += [torch.nn.Conv2d(i if k == 0 else o, o, 3, padding=1, bias=False),
                   torch.nn.BatchNorm2d(o), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def network(n_out: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        _block(3, 16, 1), torch.nn.MaxPool2d(2), _block(16, 32), torch.nn.MaxPool2d(2),
        _block(32, 64), torch.nn.MaxPool2d(2), _block(64, 128),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, n_out))


def fit(x: torch.Tensor, y: np.ndarray, epochs: int, log=print) -> torch.nn.Module:
    """Train on standardised targets (NaN: not scored) with quarter-turns and flips."""
    mu, sd = np.nanmean(y, 0), np.nanstd(y, 0)
    yt = torch.tensor((y - mu) / sd, dtype=torch.float32)
    mask = torch.isfinite(yt)
    yt = torch.nan_to_num(yt)
    net = network(y.shape[1])
    per_epoch = max(len(x) // BATCH, 1)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sch = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * per_epoch,
                                              pct_start=0.1)
    t0 = time.time()
    for ep in range(epochs):
        net.train()
        perm = torch.randperm(len(x))
        for b in range(per_epoch):
            idx = perm[b * BATCH:(b + 1) * BATCH]
            xb = torch.rot90(x[idx].float() / 255, int(torch.randint(4, (1,))), (2, 3))
            if torch.rand(1) < 0.5:
                xb = xb.flip(3)
            loss = (((net(xb) - yt[idx]) ** 2) * mask[idx]).sum() / mask[idx].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sch.step()
        log(f"epoch {ep} loss {loss.item():.3f} {time.time() - t0:.0f}s")
    net.eval()
    net.target_scale = (mu, sd)
    return net


def predict(net, x: torch.Tensor) -> np.ndarray:
    mu, sd = net.target_scale
    with torch.no_grad():
        out = torch.cat([net(x[j:j + 256].float() / 255) for j in range(0, len(x), 256)])
    return out.numpy() * sd + mu


def test_rows(run, manifest: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """(isic_id, attribute, true) rows to score: the chain's, else every test image's."""
    path = config.predictions_path(run)
    if path.exists():
        return pd.read_csv(path, usecols=["isic_id", "attribute", "true"]), "chain"
    long = manifest[manifest.split == "test"].melt(
        id_vars=["isic_id"], value_vars=[n for n in NAMES if n in manifest.columns],
        var_name="attribute", value_name="true")
    return long, "all test images"


def read_run(run, profile="default", res: str = "112", epochs: int = 14, seed: int = 0,
             threads: int = 2, log=print) -> Reading:
    """Train the CNN on `run`'s training images and score it as the chain scores R² there."""
    if res not in ("112", "native"):
        raise ValueError(f"cnn_reader: res must be '112' or 'native', not {res!r}")
    run = Path(run)
    cfg = config.load_profile(profile)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.time()
    man = split.load_manifest(config.manifest_path(run))
    h5, _ = config.release_files(cfg, run)
    names = [n for n in NAMES if n in man.columns]
    tr = man[man.split == "train"]
    rows, on = test_rows(run, man)
    unknown = set(rows.isic_id) - set(man.isic_id[man.split == "test"])
    if unknown:
        raise ValueError(f"{config.predictions_path(run)}: {len(unknown)} isic_id(s) not in the "
                         f"test split of {config.manifest_path(run)}, e.g. {sorted(unknown)[0]}")
    ids = list(pd.unique(rows.isic_id))
    net = fit(load_images(h5, list(tr.isic_id), res), tr[names].to_numpy(float), epochs, log)
    pred = predict(net, load_images(h5, ids, res))
    scored = rows[rows.attribute.isin(names)].copy()
    row = pd.Index(ids).get_indexer(scored.isic_id)
    scored["pred"] = pred[row, pd.Index(names).get_indexer(scored.attribute)]
    patient_of = man.set_index("isic_id").patient_id
    r2 = intervals.r2_intervals(scored, patient_of, seed=cfg["seed"])
    n = scored.dropna(subset=["true", "pred"]).groupby("attribute").size()
    r2["n"] = r2.attribute.map(n).astype(int)
    return Reading(r2, len(tr), len(ids), on, time.time() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("legacy", nargs="*", help=argparse.SUPPRESS)  # old form: RES EPOCHS
    ap.add_argument("--run", default=str(config.REPO_ROOT / "runs" / "default"))
    ap.add_argument("--profile", default="default", help="the run's profile (name or YAML)")
    ap.add_argument("--res", default="112", choices=["112", "native"])
    ap.add_argument("--epochs", type=int, default=14)
    a = ap.parse_args(argv)
    if a.legacy:
        if len(a.legacy) != 2:
            ap.error("positional form: RES EPOCHS (e.g. 112 14)")
        a.res, a.epochs = a.legacy[0], int(a.legacy[1])
    got = read_run(a.run, a.profile, a.res, a.epochs, log=lambda m: print(m, flush=True))
    s = got.r2.set_index("attribute").r2
    print(f"res {a.res} epochs {a.epochs}: {got.n_train:,} training images, "
          f"{got.seconds:.0f}s; scored on {got.n_test:,} test images ({got.on}): "
          f"median {s.median():.3f}, >=0.70: {(s >= 0.7).sum()}")
    # the 14 attributes every image has (chapter 2's tower probes)
    full = s.drop(["norm_color", "radial_color_std_max"], errors="ignore")
    print(f"median over the 14 attributes every image has: {full.median():.3f}")
    print(got.r2.round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
