"""Side measurement (not part of the book run): what a purpose-built CNN reads from the pictures.

Chapter 2 compares the tiny Qwen2-VL vision tower with it. A small convolutional network is
trained from scratch on the default run's training images, every attribute of every image (not
only the W drawn per image), with random quarter-turns and flips, and scored on all its test
images: at the model's 112 x 112 (bicubic, as the image processor resizes) or at the crop's own
pixels (centred on a 160 x 160 canvas). Needs `make book` to have written runs/default first.

    .venv/bin/python probes/cnn_reader.py 112 14      # resolution, epochs
    .venv/bin/python probes/cnn_reader.py native 14
"""
import sys, io, time
import numpy as np, pandas as pd, torch, h5py
from PIL import Image
torch.set_num_threads(2)
torch.manual_seed(0)
from skinlib import config, split, attributes

res, epochs = sys.argv[1], int(sys.argv[2])
run = "runs/default"
cfg = config.load_profile("default")
man = split.load_manifest(config.manifest_path(run))
h5p, _ = config.release_files(cfg, run)
names = [a.name for a in attributes.ATTRIBUTES]
S = 112 if res == "112" else 160


def load(ids):
    out = np.zeros((len(ids), 3, S, S), np.uint8)
    with h5py.File(h5p, "r") as f:
        for k, i in enumerate(ids):
            im = Image.open(io.BytesIO(f[i][()])).convert("RGB")
            if res == "112":
                im = im.resize((112, 112), Image.BICUBIC)
                a = np.asarray(im)
            else:
                a0 = np.asarray(im); a = np.zeros((160, 160, 3), np.uint8); o = (160 - a0.shape[0]) // 2
                a[o:o + a0.shape[0], o:o + a0.shape[1]] = a0
            out[k] = a.transpose(2, 0, 1)
    return torch.from_numpy(out)


tr, te = man[man.split == "train"], man[man.split == "test"]
Xtr, Xte = load(list(tr.isic_id)), load(list(te.isic_id))
Ytr, Yte = tr[names].to_numpy(float), te[names].to_numpy(float)
mu, sd = np.nanmean(Ytr, 0), np.nanstd(Ytr, 0)
ytr = torch.tensor((Ytr - mu) / sd, dtype=torch.float32)
mtr = torch.isfinite(ytr); ytr = torch.nan_to_num(ytr)


def block(i, o):
    return torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=1, bias=False), torch.nn.BatchNorm2d(o), torch.nn.ReLU(),
                               torch.nn.Conv2d(o, o, 3, padding=1, bias=False), torch.nn.BatchNorm2d(o), torch.nn.ReLU())


def one(i, o):
    return torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=1, bias=False), torch.nn.BatchNorm2d(o), torch.nn.ReLU())


net = torch.nn.Sequential(one(3, 16), torch.nn.MaxPool2d(2), block(16, 32), torch.nn.MaxPool2d(2),
                          block(32, 64), torch.nn.MaxPool2d(2), block(64, 128),
                          torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, len(names)))
bs = 64
steps = epochs * (len(Xtr) // bs)
opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
sch = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)
t0 = time.time()
for ep in range(epochs):
    net.train(); perm = torch.randperm(len(Xtr))
    for b in range(len(Xtr) // bs):
        idx = perm[b * bs:(b + 1) * bs]
        x = Xtr[idx].float() / 255
        k = int(torch.randint(4, (1,)))
        x = torch.rot90(x, k, (2, 3))
        if torch.rand(1) < 0.5:
            x = x.flip(3)
        loss = (((net(x) - ytr[idx]) ** 2) * mtr[idx]).sum() / mtr[idx].sum()
        opt.zero_grad(); loss.backward(); opt.step(); sch.step()
    print(f"epoch {ep} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
net.eval()
with torch.no_grad():
    P = torch.cat([net(Xte[j:j + 256].float() / 255) for j in range(0, len(Xte), 256)]).numpy() * sd + mu
r2 = {}
for k, n in enumerate(names):
    ok = np.isfinite(Yte[:, k])
    y, p = Yte[ok, k], P[ok, k]
    r2[n] = 1 - ((y - p) ** 2).sum() / ((y - y.mean()) ** 2).sum()
s = pd.Series(r2)
print(f"res {res} epochs {epochs} train {time.time() - t0:.0f}s test n {len(Xte)}: median {s.median():.3f}, >=0.70: {(s >= 0.7).sum()}")
full = s.drop(["norm_color", "radial_color_std_max"])   # the 14 every image has (chapter 2's tower probes)
print(f"median over the 14 attributes every image has: {full.median():.3f}")
print(s.round(3).to_string())
