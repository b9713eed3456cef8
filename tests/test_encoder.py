"""skinlib.encoder: the contrastive stand-in trained on phantom images, and the MONET (CLIP) path on
a tiny random CLIP this file builds and saves itself (no network, no mocks)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from skinlib import encoder as E

torch.set_num_threads(1)

# A small net keeps the tests quick; the default architecture differs only in sizes.
ARCH = {"image_size": 64, "channels": [16, 32, 48, 64], "convs": [1, 1, 1, 1]}
TRAIN = {"steps": 40, "batch_size": 32, "lr": 3e-3, "seed": 0, "arch": ARCH}


@pytest.fixture(scope="module")
def images(tmp_path_factory, phantom_release):
    ds = phantom_release(tmp_path_factory.mktemp("phantom"), 60, seed=0, on_error="raise")
    ims = [ds.image(i) for i in ds.ids]
    ds.close()
    return ims


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory):
    return E.train_contrastive(images, tmp_path_factory.mktemp("enc"), progress=False, device="cpu", **TRAIN)


def _cos(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


# ------------------------------------------------------------------------------ contrastive CNN


def _fixed_loss(net, images, seed=7, reps=3):
    """NT-Xent of `net` on fixed augmented views of all `images` (BN on batch statistics, as in training)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.stack([E.resize_square(im, ARCH["image_size"]) for im in images]))
    x = x.permute(0, 3, 1, 2).float() / 255.0
    net = net.train()
    with torch.no_grad():
        return float(np.mean([E.nt_xent(net(E.augment(x, g)), net(E.augment(x, g)), 0.2).item()
                              for _ in range(reps)]))


def test_loss_decreases(trained, images):
    note = json.loads((trained / E.NOTE).read_text())
    losses = np.array(note["losses"])
    assert len(losses) == TRAIN["steps"] and np.isfinite(losses).all()
    assert note["train"]["labels_used"] is False and note["train"]["n_images"] == 60
    assert losses[-10:].mean() < losses[:10].mean() - 0.1, losses
    # on the same fixed views of all 60 images (chance: log(119) = 4.78)
    before = E.ContrastiveEncoder.untrained(seed=0, device="cpu", **ARCH).net
    after = E.ContrastiveEncoder.load(trained, device="cpu").net
    before.mean.copy_(after.mean)
    before.std.copy_(after.std)
    l0, l1 = _fixed_loss(before, images), _fixed_loss(after, images)
    assert l1 < l0 - 0.5, (l0, l1)


@pytest.fixture(scope="module")
def untrained_calibrated(images, tmp_path_factory):
    return E.train_contrastive(images, tmp_path_factory.mktemp("enc0"), progress=False, device="cpu",
                               **{**TRAIN, "lr": 0.0})


def test_views_closer_than_other_images_and_better_than_untrained(trained, untrained_calibrated, images):
    """An image's embedding is nearer an augmented view of itself than other images are, on average,
    and the training made that gap wider; the view's nearest image is often itself."""
    g = torch.Generator().manual_seed(123)
    base = torch.from_numpy(np.stack([E.resize_square(im, ARCH["image_size"]) for im in images]))
    views = E.augment(base.permute(0, 3, 1, 2).float() / 255.0, g)
    views = list((views * 255).round().byte().permute(0, 2, 3, 1).numpy())

    def scores(enc):
        sim = _cos(enc.embed(views), enc.embed(images))
        n = len(images)
        own = np.diag(sim).mean()
        other = (sim.sum() - np.trace(sim)) / (n * n - n)
        return own - other, (sim.argmax(1) == np.arange(n)).mean()

    gap_t, top1_t = scores(E.ContrastiveEncoder.load(trained, device="cpu"))
    # baseline: the same random init with lr 0, so its input normalisation and BN running statistics
    # are calibrated on the same images; only the learned weights differ
    gap_u, _ = scores(E.ContrastiveEncoder.load(untrained_calibrated, device="cpu"))
    assert gap_t > 0.05
    assert gap_t > gap_u + 0.05, (gap_t, gap_u)
    assert top1_t > 0.2, top1_t  # chance: 1/60


def test_save_load_identical_and_input_forms(trained, images):
    a = E.ContrastiveEncoder.load(trained, device="cpu")
    b = E.ContrastiveEncoder.load(trained, device="cpu")
    ims = images[:7]
    ea = a.embed(ims, batch_size=3)
    assert ea.dtype == np.float32 and ea.shape == (7, a.dim) == (7, ARCH["channels"][-1])
    np.testing.assert_array_equal(ea, b.embed(ims, batch_size=3))
    np.testing.assert_allclose(ea, a.embed(ims, batch_size=7), atol=1e-5)  # batch size: eval BN, no coupling
    np.testing.assert_allclose(a.embed(ims[:1], batch_size=1)[0], ea[0], atol=1e-5)
    # PIL, arrays, an (n, H, W, 3) array and a callable give the same embeddings
    arrays = [np.asarray(im) for im in ims]
    np.testing.assert_array_equal(ea, a.embed(arrays, batch_size=3))
    if len({x.shape for x in arrays}) == 1:
        np.testing.assert_array_equal(ea, a.embed(np.stack(arrays), batch_size=3))
    np.testing.assert_array_equal(ea, a.embed(lambda: iter(arrays), batch_size=3))
    assert a.embed([], batch_size=3).shape == (0, a.dim)
    assert "no attribute labels" in a.name and a.kind == "contrastive"
    with pytest.raises(TypeError, match="sequence of images"):
        a.embed(arrays[0])


def test_deterministic_under_seed(images, tmp_path):
    small = {**TRAIN, "steps": 3, "batch_size": 16}
    p1 = E.train_contrastive(images[:30], tmp_path / "a", progress=False, device="cpu", **small)
    p2 = E.train_contrastive(images[:30], tmp_path / "b", progress=False, device="cpu", **small)
    p3 = E.train_contrastive(images[:30], tmp_path / "c", progress=False, device="cpu", **{**small, "seed": 1})
    l1, l2, l3 = (json.loads((p / E.NOTE).read_text())["losses"] for p in (p1, p2, p3))
    assert l1 == l2 and l1 != l3
    assert (p1 / E.WEIGHTS).read_bytes() == (p2 / E.WEIGHTS).read_bytes()
    e1 = E.ContrastiveEncoder.load(p1, "cpu").embed(images[30:35])
    e3 = E.ContrastiveEncoder.load(p3, "cpu").embed(images[30:35])
    np.testing.assert_array_equal(e1, E.ContrastiveEncoder.load(p2, "cpu").embed(images[30:35]))
    assert not np.allclose(e1, e3)


def test_nt_xent():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    terms = []
    for i in range(10):  # written out: -log softmax over the 9 others at the partner (i +- 5)
        logits = torch.stack([z[i] @ z[j] / 0.2 for j in range(10) if j != i])
        others = [j for j in range(10) if j != i]
        terms.append(-torch.log_softmax(logits, 0)[others.index((i + 5) % 10)])
    torch.testing.assert_close(E.nt_xent(z1, z2, 0.2), torch.stack(terms).mean())
    assert E.nt_xent(z1, z1, 0.2) < 0.5 < E.nt_xent(z1, z2, 0.2)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_contrastive"):
        E.ContrastiveEncoder.load(tmp_path)
    with pytest.raises(KeyError, match="unknown architecture"):
        E.ContrastiveEncoder.untrained(width=3)
    with pytest.raises(ValueError, match="at least 2"):
        E.train_contrastive([np.zeros((90, 90, 3), np.uint8)], tmp_path / "x", progress=False, steps=1)


def test_load_encoder_contrastive(trained, images, tmp_path):
    spec = {"kind": "contrastive", "path": str(trained), **TRAIN}
    enc = E.load_encoder(spec, device="cpu")
    assert isinstance(enc, E.ContrastiveEncoder) and enc.path == trained
    # other settings, no images: an error, not a silent reuse
    with pytest.raises(FileNotFoundError, match="different settings.*seed"):
        E.load_encoder({**spec, "seed": 5}, device="cpu")
    with pytest.raises(FileNotFoundError, match="no trained encoder"):
        E.load_encoder({**spec, "path": str(tmp_path / "new")}, device="cpu")
    # with images (a callable: decoded only when training is needed) it trains there
    calls = []

    def lazy():
        calls.append(1)
        return images[:20]

    new = {**spec, "path": str(tmp_path / "new"), "steps": 2, "batch_size": 8}
    enc2 = E.load_encoder(new, images=lazy, progress=False, device="cpu")
    assert calls == [1] and enc2.embed(images[:2]).shape == (2, ARCH["channels"][-1])
    E.load_encoder(new, images=lazy, progress=False, device="cpu")
    assert calls == [1]  # second time: loaded, nothing decoded
    with pytest.raises(KeyError, match="unknown contrastive"):
        E.load_encoder({**spec, "wrong": 1})
    with pytest.raises(ValueError, match="kind"):
        E.load_encoder({"kind": "resnet"})


# ---------------------------------------------------------------------------- MONET / CLIP path

PROJ = 24


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    out = tmp_path_factory.mktemp("clip")
    config = CLIPConfig(
        text_config={"vocab_size": 99, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"image_size": 224, "patch_size": 32, "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=PROJ)
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(out)  # safetensors
    proc = E._clip_image_processor_class()(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                           resample=Image.BICUBIC, do_center_crop=True)
    proc.save_pretrained(out)
    return out


def test_tiny_clip_folder_is_safetensors_and_bicubic(tiny_clip):
    assert (tiny_clip / "model.safetensors").exists() and not list(tiny_clip.glob("*.bin"))
    p = json.loads((tiny_clip / "preprocessor_config.json").read_text())
    assert p["size"] == {"shortest_edge": 224} and p["crop_size"] == {"height": 224, "width": 224}
    assert p["resample"] == int(Image.BICUBIC) and p["do_center_crop"] is True


def test_monet_encoder_on_tiny_clip(tiny_clip, images):
    from transformers import CLIPModel

    enc = E.MonetEncoder(tiny_clip, device="cpu")
    assert enc.dim == PROJ and enc.kind == "monet" and enc.name == f"MONET ({tiny_clip})"
    assert "torchvision" not in type(enc.processor).__module__
    ims = images[:5]
    emb = enc.embed(ims, batch_size=2)
    assert emb.dtype == np.float32 and emb.shape == (5, PROJ)
    one = np.concatenate([enc.embed([im], batch_size=1) for im in ims])
    np.testing.assert_allclose(one, emb, atol=1e-5)
    np.testing.assert_allclose(enc.embed([np.asarray(im) for im in ims], batch_size=5), emb, atol=1e-5)
    # the same numbers as the CLIP model's projected image embedding, computed by hand
    model = CLIPModel.from_pretrained(tiny_clip, use_safetensors=True).eval()
    px = enc.processor(images=ims, return_tensors="pt")["pixel_values"]
    assert tuple(px.shape) == (5, 3, 224, 224)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=px).pooler_output
        ref = model.visual_projection(pooled).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    assert not np.allclose(emb[0], emb[1])
    via_spec = E.load_encoder({"kind": "monet", "name": str(tiny_clip)}, device="cpu")
    np.testing.assert_allclose(via_spec.embed(ims, batch_size=5), emb, atol=1e-5)


def test_monet_folder_errors(tmp_path, tiny_clip):
    with pytest.raises(FileNotFoundError, match="config.json"):
        E.MonetEncoder(tmp_path, device="cpu")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((tiny_clip / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        E.MonetEncoder(partial, device="cpu")
    with pytest.raises(KeyError, match="unknown monet"):
        E.load_encoder({"kind": "monet", "name": str(tiny_clip), "size": 3})


def test_embed_a_slice3d_release(trained, tmp_path, phantom_release):
    ds = phantom_release(tmp_path, 4, seed=3, on_error="raise")
    enc = E.ContrastiveEncoder.load(trained, device="cpu")
    np.testing.assert_array_equal(enc.embed(ds, batch_size=3), enc.embed([ds.image(i) for i in ds.ids], batch_size=3))
    ds.close()
