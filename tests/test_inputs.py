"""skinlib.inputs against the real transformers Qwen2-VL processor and model (no mocks)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from skinlib import inputs as I
from skinlib import model as M
from skinlib.attributes import ATTRIBUTES

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return M.load(M.build_tiny(tmp_path_factory.mktemp("tiny")), device="cpu")


def image(size, seed=0):
    """A random-colour RGB image; size is a side or (width, height)."""
    w, h = (size, size) if isinstance(size, int) else size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def processor(loaded):
    """A torchvision-free Qwen2VLProcessor: the reference for the image-pad expansion."""
    from transformers import Qwen2VLProcessor

    class Proc(Qwen2VLProcessor):
        def __init__(self, image_processor, tokenizer, chat_template=None):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)

    return Proc(loaded.image_processor, loaded.tokenizer, loaded.tokenizer.chat_template)


Q0, Q1 = ATTRIBUTES[0].question, ATTRIBUTES[5].question


@pytest.mark.parametrize("size,grid", [(90, (1, 8, 8)), (130, (1, 8, 8)), (160, (1, 8, 8)), ((90, 160), (1, 12, 6))])
def test_image_size_and_token_count(tiny, size, grid):
    # MIN_PIXELS/MAX_PIXELS: every square 90-160 px crop -> 112 x 112 -> 16 image tokens.
    enc = I.encode_images(tiny.image_processor, [image(size)])[0]
    assert tuple(enc.grid_thw.tolist()) == grid
    assert enc.n_tokens(2) == grid[1] * grid[2] // 4


def test_matches_qwen2vl_processor(tiny):
    """Same ids, image-pad count, pixel values, grid and 3-D positions as Qwen2VLProcessor."""
    tok, proc = tiny.tokenizer, processor(tiny)
    im = image(130)
    ours = I.build_batch(tok, tiny.image_processor, [im], [Q0])
    text = tok.apply_chat_template(I.messages([Q0]), tokenize=False, add_generation_prompt=True)
    ref = proc(text=[text], images=[im], return_tensors="pt")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(ours[key], ref[key].to(ours[key].dtype)), key
    assert torch.allclose(ours["pixel_values"], ref["pixel_values"])
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert int((ours["input_ids"] == image_id).sum()) == 16  # 8x8 patches / merge 2x2

    # The positions the model derives: text 0..s-1, then the image on a 4x4 grid at (s, s+row, s+col),
    # then text again from s + 4.
    pos, _ = tiny.model.model.get_rope_index(ours["input_ids"], ours["mm_token_type_ids"], ours["image_grid_thw"],
                                             attention_mask=ours["attention_mask"])
    ids = ours["input_ids"][0]
    s = int((ids == image_id).nonzero()[0])
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    assert torch.equal(pos[:, 0, :s], torch.arange(s).expand(3, s))
    assert torch.equal(pos[:, 0, s:s + 16], torch.stack([torch.full((16,), s), s + rows.flatten(), s + cols.flatten()]))
    n_after = len(ids) - s - 16
    assert torch.equal(pos[:, 0, s + 16:], (s + 4 + torch.arange(n_after)).expand(3, n_after))


def test_labels_cover_answer_and_im_end_only(tiny):
    tok = tiny.tokenizer
    ans = [ATTRIBUTES[0].format_answer(123.456), ATTRIBUTES[5].format_answer(-7.1)]
    b = I.build_batch(tok, tiny.image_processor, [image(130), image(100, 1)], [Q0, Q1], ans)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for r, a in enumerate(ans):
        ids, lab, att = b["input_ids"][r], b["labels"][r], b["attention_mask"][r]
        want = tok(a, add_special_tokens=False)["input_ids"] + [end]
        on = lab != I.IGNORE_INDEX
        assert lab[on].tolist() == want and ids[on].tolist() == want
        # ... and they are the last tokens of the row (left padding, no trailing newline).
        assert ids[-len(want):].tolist() == want and on[-len(want):].all()
        assert (lab[att == 0] == I.IGNORE_INDEX).all()
    # The prompt part is exactly the generation prompt (what the model sees at inference).
    p = I.build_batch(tok, tiny.image_processor, [image(130)], [Q0])
    n = int(p["attention_mask"].sum())
    row = b["input_ids"][0][b["attention_mask"][0] == 1].tolist()
    assert row[:n] == p["input_ids"][0].tolist()
    assert tok.decode(row[n:]) == ans[0] + "<|im_end|>"


def _packed_example():
    """Two images of different grids (8x8 and 10x8 patches: rows of different lengths, left
    padding, a non-square M-RoPE grid), three and two tuples."""
    atts = [ATTRIBUTES[:3], ATTRIBUTES[5:7]]
    qs = [[a.question for a in at] for at in atts]
    ans = [[a.format_answer(v) for a, v in zip(at, (50.6, -2.345, 7))] for at in atts]
    return [image(130), image((100, 150), seed=1)], qs, ans


def test_packed_rows_label_every_answer_and_hold_the_image_once(tiny):
    tok = tiny.tokenizer
    imgs, qs, ans = _packed_example()
    b = I.build_batch(tok, tiny.image_processor, imgs, qs, ans)
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    for r, n_img in enumerate((16, 20)):
        ids, lab = b["input_ids"][r], b["labels"][r]
        assert int((ids == image_id).sum()) == n_img  # one image per row, once
        # Labelled runs, in order, are the answers each with its <|im_end|>.
        on = (lab != I.IGNORE_INDEX).tolist()
        runs, i = [], 0
        while i < len(on):
            j = i
            while j < len(on) and on[j]:
                j += 1
            if j > i:
                runs.append(ids[i:j].tolist())
            i = j + 1
        assert [tok.decode(x) for x in runs] == [a + "<|im_end|>" for a in ans[r]]
        text = tok.decode(ids[b["mm_token_type_ids"][r] == 0])
        # no second user turn: each tuple continues the shared prefix with its own question
        assert text.count("<|im_start|>user") == 1 and text.count("<|im_start|>assistant") == len(ans[r])
    assert b["attention_mask"].shape == (2, 1, b["input_ids"].shape[1], b["input_ids"].shape[1])
    assert b["position_ids"].shape == (3,) + tuple(b["input_ids"].shape)


@torch.no_grad()
def test_packed_tuples_see_only_the_prefix_and_themselves(tiny):
    """Each packed tuple is its own single-tuple row: the same logits at every answer token and the
    same loss as the tuples built one per row (a tuple that could read an earlier tuple's answer, or
    sat at shifted positions, would differ)."""
    tok = tiny.tokenizer
    imgs, qs, ans = _packed_example()
    packed = I.build_batch(tok, tiny.image_processor, imgs, qs, ans)
    flat = [(im, q, a) for im, qq, aa in zip(imgs, qs, ans) for q, a in zip(qq, aa)]
    single = I.build_batch(tok, tiny.image_processor, *map(list, zip(*flat)))
    tiny.model.eval()
    out_p, out_s = tiny.model(**packed), tiny.model(**single)

    def at_answers(logits, labels):
        return torch.cat([logits[r, :-1][labels[r, 1:] != I.IGNORE_INDEX] for r in range(len(logits))])

    lp, ls = at_answers(out_p.logits, packed["labels"]), at_answers(out_s.logits, single["labels"])
    assert lp.shape == ls.shape and lp.shape[0] == sum(len(tok(a)["input_ids"]) + 1 for aa in ans for a in aa)
    torch.testing.assert_close(lp, ls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_p.loss, out_s.loss, atol=1e-6, rtol=1e-6)


def test_mrope_positions_follow_the_model_rule(tiny):
    """The positions packed rows carry are the model's own get_rope_index, for square and
    non-square grids, prompts and training rows, left padding included."""
    tok = tiny.tokenizer
    imgs = [image(130), image((100, 150), seed=1), image((160, 95), seed=2)]
    for answers in (None, [ATTRIBUTES[0].format_answer(12.3)] * 3):
        b = I.build_batch(tok, tiny.image_processor, imgs, [Q0, Q1, Q0], answers)
        want, _ = tiny.model.model.get_rope_index(b["input_ids"], b["mm_token_type_ids"],
                                                  image_grid_thw=b["image_grid_thw"], attention_mask=b["attention_mask"])
        assert len({tuple(g.tolist()) for g in b["image_grid_thw"]}) == 3
        for r in range(3):
            real = b["attention_mask"][r].bool()
            got = I.mrope_positions(b["input_ids"][r][real].tolist(), tok.convert_tokens_to_ids("<|image_pad|>"),
                                    b["image_grid_thw"][r], 2)
            assert torch.equal(got, want[:, r, real])


def test_packed_training_refuses_attention_that_misreads_the_mask(tiny):
    class Cfg:
        _attn_implementation = "eager"

    class Net:
        config = Cfg()

    with pytest.raises(ValueError, match="packed training needs attn_implementation 'sdpa'"):
        I.check_packed_attention(Net())
    I.check_packed_attention(tiny.model)   # the tiny model runs SDPA


def test_shape_errors(tiny):
    with pytest.raises(ValueError, match="questions for 2 images"):
        I.build_batch(tiny.tokenizer, tiny.image_processor, [image(130)] * 2, [Q0])
    with pytest.raises(ValueError, match="no answers"):
        I.build_batch(tiny.tokenizer, tiny.image_processor, [image(130)], [[Q0, Q1]])
    with pytest.raises(ValueError, match="2 questions but 1 answers"):
        I.build_batch(tiny.tokenizer, tiny.image_processor, [image(130)], [[Q0, Q1]], [["1"]])


@torch.no_grad()
def test_left_padding_matches_batch_of_one(tiny):
    """Two prompts of different lengths (different questions and image sizes) batched: the last
    position's logits equal those of each prompt alone. Padding only adds masked keys, so the
    difference is float32 reduction order (measured 3e-7); 1e-4 leaves room for other CPUs without
    hiding a real bug (attending to the pads, i.e. dropping the mask, moves them by 8e-2)."""
    tok, ip, model = tiny.tokenizer, tiny.image_processor, tiny.model
    ims, qs = [image(130), image((90, 160), 1)], [Q0, ATTRIBUTES[6].question]
    both = I.build_batch(tok, ip, ims, qs)
    assert (both["attention_mask"] == 0).any()  # really padded
    assert (both["attention_mask"][:, -1] == 1).all()  # on the left
    last = model(**both).logits[:, -1]
    for r in range(2):
        one = I.build_batch(tok, ip, ims[r:r + 1], qs[r:r + 1])
        alone = model(**one).logits[0, -1]
        torch.testing.assert_close(last[r], alone, atol=1e-4, rtol=1e-4)
