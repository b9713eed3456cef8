"""Question-answer tuples as training items: the images behind them, the dataset, the collate.

One item is one tuple (image, Q(a), y_a) as in the paper, or, with `packed=True`, one image with
all of its W tuples in one sequence, each tuple seeing only the shared image prefix and itself (the
image is encoded once per image instead of once per tuple; measured in bench/). Both go through
`inputs.build_batch`.
"""
from __future__ import annotations

from typing import Mapping

import pandas as pd
import torch

from .inputs import EncodedImage, build_batch, encode_images


class ImageCache:
    """isic_id -> EncodedImage, read from a release (`slice3d.Slice3D`) on first use and kept.

    The embedded default keeps all of its ~3,500 training images (~0.3 MB each at 112 px); for the
    paper profile pass `keep=False` and let DataLoader workers read and encode on the fly."""

    def __init__(self, release, image_processor, keep: bool = True):
        self.release, self.image_processor, self.keep = release, image_processor, keep
        self._cache: dict[str, EncodedImage] = {}

    def __getitem__(self, isic_id: str) -> EncodedImage:
        enc = self._cache.get(isic_id)
        if enc is None:
            enc = encode_images(self.image_processor, [self.release.image(isic_id)])[0]
            if self.keep:
                self._cache[isic_id] = enc
        return enc

    def fill(self, ids, progress: bool = True) -> "ImageCache":
        """Encode `ids` now (with a progress bar) rather than during the first epoch."""
        from tqdm.auto import tqdm
        for i in tqdm(list(ids), desc="encode images", unit="img", disable=not progress):
            self[i]
        return self

    def __len__(self) -> int:
        return len(self._cache)

    def __getstate__(self):  # DataLoader workers get their own (empty) cache and file handle
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state


class TupleDataset(torch.utils.data.Dataset):
    """Items (EncodedImage, question(s), answer(s)) from a tuples frame (`tuples.sample_tuples`).

    packed=False: one tuple per item (the paper). packed=True: one image per item, its tuples as
    lists, in the frame's order."""

    def __init__(self, tuples: pd.DataFrame, images: Mapping[str, EncodedImage], packed: bool = False):
        need = {"isic_id", "question", "answer"}
        if need - set(tuples.columns):
            raise KeyError(f"TupleDataset: tuples frame lacks {sorted(need - set(tuples.columns))}")
        self.images, self.packed = images, packed
        if packed:
            groups = tuples.groupby("isic_id", sort=False)
            self.rows = [(i, list(g.question), list(g.answer)) for i, g in groups]
        else:
            self.rows = list(zip(tuples.isic_id, tuples.question, tuples.answer))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        isic_id, q, a = self.rows[i]
        return self.images[isic_id], q, a



def collate(tokenizer, image_processor):
    """The DataLoader collate: items -> `build_batch` inputs with answer-only labels."""
    def fn(items):
        images, questions, answers = zip(*items)
        return build_batch(tokenizer, image_processor, list(images), list(questions), list(answers))
    return fn


def tuple_counter(tokenizer):
    """Tuples in a collated batch, for the throughput figure: every answer ends with a labelled
    <|im_end|>, so packed rows count once per answer."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return lambda batch: int((batch["labels"] == end).sum())
