"""Retrieval method (e): a general skin image encoder trained without the attributes.

Two encoders with one interface — `embed(images, batch_size=...) -> float32 (n, dim)`, `dim`,
`name`, `kind` — so the retrieval code never asks which one it holds:

* `MonetEncoder` (paper profile): MONET, a CLIP ViT-L/14 fine-tuned on dermatology image-text pairs
  (hub `chanwkim/monet`), loaded with transformers' CLIP classes; embedding = `get_image_features`
  (the projected image embedding) after the checkpoint's own CLIP preprocessing (resize 224
  bicubic + centre crop 224).
* `ContrastiveEncoder` (embedded default): MONET cannot be downloaded here, so the stand-in is a
  small CNN trained by `train_contrastive` SimCLR-style (NT-Xent) on the phantom's images with no
  attribute label anywhere in the objective: like MONET, it learns what makes skin images look
  alike, not the 16 measured attributes. The embedding is the pooled backbone feature (before the
  projection head used only for the loss), as is usual for SimCLR.

`load_encoder(spec)` builds either from a profile-like dict. Nothing here imports torchvision.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import resumable
from .model import default_device   # one rule for the device, model.py's

MONET_ID = "chanwkim/monet"
WEIGHTS = "model.safetensors"
NOTE = "encoder.json"
FORMAT = "skinlib-contrastive-encoder"

# --------------------------------------------------------------------------------------- images


def to_rgb_array(image) -> np.ndarray:
    """A PIL image or an HxWx3 (or HxW) uint8 array -> HxWx3 uint8 array. A dict with an "image"
    (an item of a `slice3d.Slice3D`) gives its image."""
    if isinstance(image, dict) and "image" in image:
        image = image["image"]
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 image, got an array of shape {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels (0-255), got {a.dtype}")
    return a[:, :, :3]


def _iter_images(images):
    """Images from a list / tuple, an (n, H, W, 3) uint8 array, any iterable (a `slice3d.Slice3D`
    too: its items are dicts with an "image"), or a zero-argument callable returning one of these
    (lets callers defer decoding until it is needed)."""
    if callable(images) and not isinstance(images, (list, tuple, np.ndarray)):
        images = images()
    if isinstance(images, (Image.Image,)) or (isinstance(images, np.ndarray) and images.ndim == 3):
        raise TypeError("pass a sequence of images (a list, or an (n, H, W, 3) array), not one image")
    return iter(images)


def _batches(images, batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    batch = []
    for im in _iter_images(images):
        batch.append(im)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def resize_square(image, size: int) -> np.ndarray:
    """Centre crop to a square (SLICE-3D crops are square already) and resize to size x size with
    PIL's antialiased bilinear filter -> size x size x 3 uint8. The contrastive encoder's only
    preprocessing, the same in training (before augmentation) and in `embed`."""
    a = to_rgb_array(image)
    h, w = a.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    a = a[top:top + s, left:left + s]
    if s != size:
        a = np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((size, size), Image.BILINEAR))
    return np.ascontiguousarray(a)


# ------------------------------------------------------------------------------------ MONET (e)


def _clip_image_processor_class():
    # Without torchvision, CLIPImageProcessor falls back to the PIL variant with a warning; pick
    # the PIL variant directly (as skinlib.model does for Qwen2-VL).
    if importlib.util.find_spec("torchvision") is None:
        from transformers import CLIPImageProcessorPil
        return CLIPImageProcessorPil
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor


class MonetEncoder:
    """MONET image embeddings: `CLIPModel.get_image_features` of the checkpoint's preprocessing.

    `name_or_path`: a hub id (default `chanwkim/monet`) or a local folder saved with
    `save_pretrained` (config.json + model.safetensors + preprocessor_config.json). Weights are
    read from safetensors only and no remote code is run; `revision` picks a hub revision (e.g. a
    `refs/pr/N` conversion if a repository has only pytorch_model.bin). GPU when available;
    dtype None: bfloat16 on GPU, float32 on CPU. Embeddings are float32, not normalised (cosine
    retrieval normalises).
    """

    kind = "monet"

    def __init__(self, name_or_path: str = MONET_ID, device=None, dtype=None, revision: str | None = None):
        from transformers import CLIPModel

        self.source = str(name_or_path)
        local = Path(name_or_path)
        if local.exists():
            if not local.is_dir() or not (local / "config.json").exists():
                raise FileNotFoundError(f"{local} has no config.json: not a saved CLIP model folder "
                                        "(save one with CLIPModel.save_pretrained, or give a hub id such "
                                        f"as {MONET_ID!r})")
            if not (local / "preprocessor_config.json").exists():
                raise FileNotFoundError(f"{local} has no preprocessor_config.json: save the checkpoint's "
                                        "CLIPImageProcessor next to the model (its resize / crop / mean / std "
                                        "are part of the encoder)")
        self.device = torch.device(device or default_device())
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"unknown dtype {dtype!r} (e.g. 'bfloat16', 'float32')")
            dtype = getattr(torch, dtype)
        self.dtype = dtype
        kw = {"revision": revision} if revision else {}
        try:
            model = CLIPModel.from_pretrained(self.source, dtype=dtype, use_safetensors=True,
                                              trust_remote_code=False, **kw)
        except OSError as exc:
            raise OSError(f"could not load CLIP weights (safetensors only) from {self.source!r}: {exc}") from exc
        self.model = model.to(self.device).eval()
        self.processor = _clip_image_processor_class().from_pretrained(self.source, **kw)
        self.dim = int(self.model.config.projection_dim)
        self.name = f"MONET ({self.source})"

    @torch.inference_mode()
    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=pixel_values)
        # transformers 4.x returns the projected embedding as a tensor; 5.x returns a
        # BaseModelOutputWithPooling whose pooler_output holds the projected embedding.
        if not torch.is_tensor(out):
            emb = getattr(out, "image_embeds", None)
            out = emb if emb is not None else out.pooler_output
        if out.ndim != 2 or out.shape[-1] != self.dim:
            raise RuntimeError(f"get_image_features gave shape {tuple(out.shape)}, expected (batch, "
                               f"projection_dim={self.dim}); this transformers version is not handled")
        return out

    def embed(self, images, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """float32 (n, projection_dim) embeddings of PIL images / HxWx3 uint8 arrays."""
        from tqdm.auto import tqdm

        chunks = []
        for batch in tqdm(_batches(images, batch_size), desc="MONET embed", unit="batch", disable=not progress):
            px = self.processor(images=[to_rgb_array(b) for b in batch], return_tensors="pt")["pixel_values"]
            chunks.append(self._features(px.to(self.device, self.dtype)).float().cpu().numpy())
        if not chunks:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"MonetEncoder({self.source!r}, dim={self.dim}, device={self.device}, dtype={self.dtype})"


# ------------------------------------------------------------------- contrastive CNN (default)

ARCH_DEFAULTS = {"image_size": 96, "channels": [32, 64, 96, 128], "convs": [1, 1, 1, 1], "proj_hidden": 128,
                 "proj_dim": 64}
# Augmentations (SimCLR's recipe, kept mild where it would erase what skin images differ in: the
# colour jitter has no hue change and small gains; the crop keeps at least 35 % of the area).
AUGMENT_DEFAULTS = {
    "crop_scale": [0.35, 1.0], "crop_ratio": [0.75, 1.3333], "flip_rot90": True,
    "brightness": 0.1, "contrast": 0.1, "channel_gain": 0.05, "blur_p": 0.5, "noise_std": 0.03,
}


class ContrastiveNet(nn.Module):
    """conv blocks (3x3 stride-2 conv, BN, ReLU, then `convs - 1` more 3x3 convs) -> global average pool ->
    features (the embedding); `head` (MLP) maps features to the space the NT-Xent loss sees.
    Input: float (n, 3, S, S) in [0, 1]; the per-channel mean / std of the training images are
    buffers, saved with the weights."""

    def __init__(self, channels=(32, 64, 96, 128), convs=(1, 1, 1, 1), proj_hidden: int = 128, proj_dim: int = 64):
        super().__init__()
        if len(convs) != len(channels) or min(convs) < 1:
            raise ValueError(f"convs {list(convs)} must give >= 1 conv for each of the {len(channels)} blocks")
        layers, c_in = [], 3
        for c, k in zip(channels, convs):
            for j in range(k):
                layers += [nn.Conv2d(c_in, c, 3, stride=2 if j == 0 else 1, padding=1, bias=False),
                           nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                c_in = c
        self.backbone = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(c_in, proj_hidden), nn.ReLU(inplace=True), nn.Linear(proj_hidden, proj_dim))
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25))
        self.dim = c_in

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment(x: torch.Tensor, g: torch.Generator, params: dict | None = None) -> torch.Tensor:
    """One random view of each image of a float (n, 3, S, S) batch in [0, 1] (same size out).

    Random resized crop, horizontal flip and rotation by a multiple of 90 degrees (one affine
    resampling, bilinear), brightness / contrast / per-channel gain (no hue shift), a random blend
    with a 3x3 gaussian blur, gaussian noise. Every random number is drawn on the CPU from `g`, so
    views are reproducible on any device."""
    p = {**AUGMENT_DEFAULTS, **(params or {})}
    n, dev = x.shape[0], x.device
    # crop: fraction of the side in x / y, centre anywhere that keeps the crop inside the image
    area = _uniform(n, *p["crop_scale"], g)
    logr = _uniform(n, math.log(p["crop_ratio"][0]), math.log(p["crop_ratio"][1]), g)
    w = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(n, generator=g) - 1)
    cy = (1 - h) * (2 * torch.rand(n, generator=g) - 1)
    rot = torch.eye(2).repeat(n, 1, 1)
    if p["flip_rot90"]:
        k = torch.randint(0, 4, (n,), generator=g)
        c, s = torch.cos(k * math.pi / 2).round(), torch.sin(k * math.pi / 2).round()
        rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], 1)
        flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        rot[:, :, 0] *= flip[:, None]
    theta = torch.cat([torch.diag_embed(torch.stack([w, h], -1)) @ rot, torch.stack([cx, cy], -1)[:, :, None]], 2)
    grid = F.affine_grid(theta.to(dev), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # photometric: y = mean + contrast * (x * brightness * gain - mean)
    bright = _uniform(n, 1 - p["brightness"], 1 + p["brightness"], g)
    gain = 1 + p["channel_gain"] * (2 * torch.rand(n, 3, generator=g) - 1)
    contrast = _uniform(n, 1 - p["contrast"], 1 + p["contrast"], g)
    x = x * (bright[:, None] * gain).to(dev)[:, :, None, None]
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    x = m + contrast.to(dev)[:, None, None, None] * (x - m)
    # blur: blend with a 3x3 gaussian (sigma 1) by a random weight, for a random half of the batch
    # (separable, by shifted slices: a depthwise conv is far slower on the CPU)
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    side, mid = 0.27407, 0.45186
    rows = side * (xp[:, :, :-2] + xp[:, :, 2:]) + mid * xp[:, :, 1:-1]
    blurred = side * (rows[:, :, :, :-2] + rows[:, :, :, 2:]) + mid * rows[:, :, :, 1:-1]
    a = torch.rand(n, generator=g) * (torch.rand(n, generator=g) < p["blur_p"])
    a = a.to(dev)[:, None, None, None]
    x = (1 - a) * x + a * blurred
    sigma = _uniform(n, 0.0, p["noise_std"], g).to(dev)[:, None, None, None]
    x = x + sigma * torch.randn(x.shape, generator=g).to(dev)
    return x.clamp(0.0, 1.0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's normalized-temperature cross entropy: each of the 2n views must pick its partner
    among the other 2n - 1 (cosine similarity / temperature)."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def _to_float(batch_u8: torch.Tensor, device) -> torch.Tensor:
    """(n, S, S, 3) uint8 -> (n, 3, S, S) float in [0, 1] on `device`."""
    return batch_u8.to(device).permute(0, 3, 1, 2).float().div_(255.0)


def _stack_images(images, size: int) -> torch.Tensor:
    arrays = [resize_square(im, size) for im in _iter_images(images)]
    if not arrays:
        raise ValueError("no images")
    return torch.from_numpy(np.stack(arrays))


def _new_net(arch: dict, seed: int) -> ContrastiveNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ContrastiveNet(arch["channels"], arch["convs"], arch["proj_hidden"], arch["proj_dim"])


class ContrastiveEncoder:
    """The embedded default's image encoder: a small CNN trained by `train_contrastive` on skin
    images with a self-supervised loss and no attribute labels. Embedding = pooled backbone
    features (dim = last channel count), float32, not normalised."""

    kind = "contrastive"

    def __init__(self, net: ContrastiveNet, config: dict, device=None, path=None):
        self.device = torch.device(device or default_device())
        self.net = net.to(self.device).eval()
        self.config = config
        self.image_size = int(config["arch"]["image_size"])
        self.dim = int(net.dim)
        self.path = Path(path) if path is not None else None
        self.name = "contrastive CNN trained on phantom images, no attribute labels"

    @classmethod
    def untrained(cls, seed: int = 0, device=None, **arch) -> "ContrastiveEncoder":
        """Random-init weights (the baseline the trained encoder must beat)."""
        unknown = set(arch) - set(ARCH_DEFAULTS)
        if unknown:
            raise KeyError(f"unknown architecture keys {sorted(unknown)}; known: {', '.join(ARCH_DEFAULTS)}")
        a = {**ARCH_DEFAULTS, **arch}
        return cls(_new_net(a, seed), {"format": FORMAT, "arch": a, "train": None}, device)

    @classmethod
    def load(cls, path, device=None) -> "ContrastiveEncoder":
        """A folder written by `train_contrastive` (encoder.json + model.safetensors)."""
        from safetensors.torch import load_file

        path = Path(path)
        note = path / NOTE
        if not note.exists() or not (path / WEIGHTS).exists():
            raise FileNotFoundError(f"{path} has no {NOTE} / {WEIGHTS}: not a folder written by train_contrastive")
        problem = resumable.check_dir(path)
        if problem is not None:
            raise resumable.Damaged(f"encoder {problem}; train it again (load_encoder with images does)")
        config = json.loads(note.read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"{note} is not a {FORMAT} note (format {config.get('format')!r})")
        a = config["arch"]
        net = ContrastiveNet(a["channels"], a["convs"], a["proj_hidden"], a["proj_dim"])
        net.load_state_dict(load_file(str(path / WEIGHTS)))
        return cls(net, config, device, path)

    @torch.inference_mode()
    def embed(self, images, batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """float32 (n, dim) embeddings of PIL images / HxWx3 uint8 arrays."""
        from tqdm.auto import tqdm

        self.net.eval()
        chunks = []
        for batch in tqdm(_batches(images, batch_size), desc="encoder embed", unit="batch", disable=not progress):
            x = _to_float(torch.from_numpy(np.stack([resize_square(b, self.image_size) for b in batch])), self.device)
            chunks.append(self.net.features(x).float().cpu().numpy())
        if not chunks:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"ContrastiveEncoder(dim={self.dim}, image_size={self.image_size}{where})"


def train_contrastive(images, out_dir, epochs: float = 4.0, batch_size: int = 128, lr: float = 2e-3,
                      seed: int = 0, steps: int | None = None, progress: bool = True, *,
                      temperature: float = 0.2, weight_decay: float = 1e-4, warmup_frac: float = 0.05,
                      arch: dict | None = None, augment_params: dict | None = None, device=None,
                      data_key: str = "") -> Path:
    """Train a `ContrastiveEncoder` SimCLR-style on `images`; returns `out_dir`.

    images: PIL images / HxWx3 uint8 arrays as a list, an (n, H, W, 3) array, an iterable or a
    zero-argument callable returning one; they are decoded once, centre-cropped and resized to
    `arch["image_size"]` and kept in memory as uint8. No labels are used.
    Each step draws `batch_size` images (shuffled, epoch after epoch), two augmented views of each,
    and minimises NT-Xent(temperature) on the projection head's outputs; AdamW with linear warmup
    and cosine decay. `steps` (if given) overrides `epochs` (steps = ceil(epochs * n / batch_size)).
    Deterministic for a seed on the CPU (same thread count). Writes model.safetensors and
    encoder.json (architecture, augmentation, training settings, per-step losses, seconds), then
    seals the folder (`resumable.seal_dir`) as the job of the recipe and `data_key` (what names
    the training images, e.g. a hash of their ids: see `folder_job`).

    Cost (defaults, 96 px, batch 128): ~0.55 s a step on 2 free CPU cores, so 3,500 images x 4
    epochs = 110 steps ~ 1 minute; 2-4x that when other jobs share the cores.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    rec = recipe(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, steps=steps, temperature=temperature,
                 weight_decay=weight_decay, warmup_frac=warmup_frac, arch=arch, augment_params=augment_params)
    a, aug = rec["arch"], rec["augment_params"]
    (Path(out_dir) / resumable.DIR_SEAL).unlink(missing_ok=True)  # until the new encoder is whole
    device = torch.device(device or default_device())
    t0 = time.perf_counter()
    data = _stack_images(images, int(a["image_size"]))  # (n, S, S, 3) uint8, CPU
    n = data.shape[0]
    if n < 2:
        raise ValueError(f"contrastive training needs at least 2 images, got {n}")
    batch_size = min(int(batch_size), n)
    total = int(steps) if steps is not None else max(1, math.ceil(float(epochs) * n / batch_size))
    if total < 1:
        raise ValueError(f"steps must be >= 1, not {steps}")
    t_load = time.perf_counter() - t0

    net = _new_net(a, seed)
    # per-channel mean / std of the training pixels (in chunks: no float copy of the whole set)
    s1, s2 = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for i in range(0, n, 512):
        c = data[i:i + 512].reshape(-1, 3).double() / 255.0
        s1 += c.sum(0)
        s2 += (c * c).sum(0)
    count = n * data.shape[1] * data.shape[2]
    mean = s1 / count
    net.mean.copy_(mean.float().view(1, 3, 1, 1))
    net.std.copy_((s2 / count - mean * mean).clamp(min=1e-6).sqrt().float().view(1, 3, 1, 1))
    net.to(device, memory_format=torch.channels_last).train()  # ~10 % faster convolutions on the CPU
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, int(round(warmup_frac * total)))

    def lr_factor(s: int) -> float:  # linear warmup, then cosine to 0
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    g = torch.Generator().manual_seed(seed)

    def order():
        while True:
            yield from torch.randperm(n, generator=g).tolist()

    stream = order()
    losses = []
    bar = tqdm(range(total), desc="contrastive encoder", unit="step", disable=not progress)
    for _ in bar:
        idx = torch.tensor([next(stream) for _ in range(batch_size)])
        x = _to_float(data[idx], device)
        v1, v2 = augment(x, g, aug), augment(x, g, aug)
        z = net(torch.cat([v1, v2]).contiguous(memory_format=torch.channels_last))
        loss = nt_xent(z[:batch_size], z[batch_size:], temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    seconds = time.perf_counter() - t0

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT, "version": 1, "arch": a, "augment": aug, "recipe": rec, "data_key": str(data_key),
        "train": {"epochs": float(epochs) if steps is None else total * batch_size / n, "batch_size": batch_size,
                  "lr": lr, "seed": seed, "steps": total, "temperature": temperature,
                  "weight_decay": weight_decay, "warmup_steps": warm, "n_images": n, "labels_used": False,
                  "device": str(device), "threads": torch.get_num_threads()},
        "losses": [round(v, 5) for v in losses],
        "seconds": {"load_images": round(t_load, 2), "total": round(seconds, 2)},
    }
    # each file whole (written aside, then renamed), the folder's seal last: only a sealed folder
    # is a finished encoder
    weights = out / WEIGHTS
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
              str(resumable.partial_path(weights)))
    os.replace(resumable.partial_path(weights), weights)
    resumable.write_json(out / NOTE, config)
    resumable.seal_dir(out, folder_job(rec, data_key))
    return out


# --------------------------------------------------------------------------------------- choice

TRAIN_KEYS = ("epochs", "batch_size", "lr", "seed", "steps", "temperature", "weight_decay", "warmup_frac",
              "arch", "augment_params")


def load_encoder(spec: dict, images=None, progress: bool = True, device=None, data_key: str = ""):
    """An encoder from a profile-like dict.

    {"kind": "monet", "name": "chanwkim/monet", "dtype": null, "revision": null} -> MonetEncoder.
    {"kind": "contrastive", "path": "<folder>", <train_contrastive settings: epochs, batch_size, lr,
    seed, steps, temperature, weight_decay, warmup_frac, arch, augment_params>} -> ContrastiveEncoder:
    loaded from `path` when it holds a whole, unaltered one trained with these settings on the
    images `data_key` names; otherwise trained there on `images` (which may be a zero-argument
    callable, so nothing is decoded when the folder is already good). Without `images` a missing,
    damaged or differently trained folder is an error that says which and why.
    """
    spec = dict(spec)
    kind = spec.pop("kind", None)
    device = spec.pop("device", device)
    if kind == "monet":
        unknown = set(spec) - {"name", "dtype", "revision"}
        if unknown:
            raise KeyError(f"unknown monet encoder keys {sorted(unknown)}; known: name, dtype, revision")
        return MonetEncoder(spec.get("name") or MONET_ID, device=device, dtype=spec.get("dtype"),
                            revision=spec.get("revision"))
    if kind == "contrastive":
        unknown = set(spec) - {"path", *TRAIN_KEYS}
        if unknown:
            raise KeyError(f"unknown contrastive encoder keys {sorted(unknown)}; known: path, {', '.join(TRAIN_KEYS)}")
        if not spec.get("path"):
            raise KeyError("a contrastive encoder spec needs 'path' (the folder it is trained into / loaded from)")
        path = Path(spec.pop("path"))
        settings = {k: v for k, v in spec.items() if v is not None}
        recipe(**settings)  # unknown keys fail before anything is trained
        stale = _stale(path, settings, data_key)
        if stale is None:
            return ContrastiveEncoder.load(path, device)
        if images is None:
            raise FileNotFoundError(f"{path}: {stale}; pass images to train the encoder there")
        if (path / NOTE).exists():  # say why a trained encoder is not reused
            print(f"encoder: training again: {stale}")
        train_contrastive(images, path, progress=progress, device=device, data_key=data_key, **settings)
        return ContrastiveEncoder.load(path, device)
    raise ValueError(f"encoder kind must be 'monet' or 'contrastive', not {kind!r}")


def recipe(**settings) -> dict:
    """The full training settings (defaults filled in) that `train_contrastive` records; two
    folders trained on the same images with equal recipes hold the same encoder (on CPU)."""
    import inspect

    unknown = set(settings) - set(TRAIN_KEYS)
    if unknown:
        raise KeyError(f"unknown training keys {sorted(unknown)}; known: {', '.join(TRAIN_KEYS)}")
    sig = inspect.signature(train_contrastive).parameters
    r = {k: settings.get(k, sig[k].default) for k in TRAIN_KEYS}
    unknown = set(r["arch"] or {}) - set(ARCH_DEFAULTS)
    if unknown:
        raise KeyError(f"unknown architecture keys {sorted(unknown)}; known: {', '.join(ARCH_DEFAULTS)}")
    unknown = set(r["augment_params"] or {}) - set(AUGMENT_DEFAULTS)
    if unknown:
        raise KeyError(f"unknown augmentation keys {sorted(unknown)}; known: {', '.join(AUGMENT_DEFAULTS)}")
    r["arch"] = {**ARCH_DEFAULTS, **(r["arch"] or {})}
    r["augment_params"] = {**AUGMENT_DEFAULTS, **(r["augment_params"] or {})}
    r["epochs"] = float(r["epochs"])
    r["steps"] = None if r["steps"] is None else int(r["steps"])
    return json.loads(json.dumps(r))  # tuples -> lists, as read back from the note


def folder_job(rec: dict, data_key: str = "") -> str:
    """The job key of an encoder folder: its full recipe and what names its training images."""
    return resumable.job_key({"format": FORMAT, "recipe": rec, "data": str(data_key)})


def _stale(path: Path, settings: dict, data_key: str = "") -> str | None:
    """None if `path` holds a whole, unaltered encoder trained with the recipe of `settings` on the
    images `data_key` names, else why not (naming the file when one is damaged)."""
    note = path / NOTE
    if not note.exists() or not (path / WEIGHTS).exists():
        return "no trained encoder there"
    problem = resumable.check_dir(path)
    if problem is not None:
        return problem
    saved = resumable.read_json(note) or {}
    want = recipe(**settings)
    diff = [k for k in want if json.dumps(want[k], sort_keys=True) != json.dumps((saved.get("recipe") or {}).get(k),
                                                                                  sort_keys=True)]
    if diff:
        return f"trained with different settings ({', '.join(diff)})"
    if str(saved.get("data_key", "")) != str(data_key):
        return "trained on other images"
    return resumable.check_dir(path, folder_job(want, data_key))
