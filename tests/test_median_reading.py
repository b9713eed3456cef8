"""The median reading of the model's answer distribution, on the real tiny Qwen2-VL: the exact
median of the distribution enumerated string by string (teacher-forced, no cache), greedy on a
point mass, inside the sampled replies' middle, and the frame `predict.predict` would give."""
import copy
import zlib

import numpy as np
import pandas as pd
import pytest
import torch

from skinlib import answer_format, attributes, median_reading, metrics, model as mdl, predict, qa
from skinlib.answer_format import END, Shape
from skinlib.inputs import build_batch

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

SIGNED = Shape(1, 1, 1, True)     # "-d.d" or "d.d": 200 strings
OPEN = Shape(1, 2, 1, True)       # widths 1 and 2, signed: 2,200 strings
# The reading and the brute force compute the same probabilities along different float32 paths
# (cached steps, full forwards): where the CDF passes q closer than this, neither can tell.
TIE = 2e-6


@pytest.fixture(scope="module")
def setup(tmp_path_factory, phantom_release):
    torch.set_num_threads(1)
    release = phantom_release(tmp_path_factory.mktemp("phantom"), 4, seed=5)
    loaded = mdl.load(mdl.build_tiny(tmp_path_factory.mktemp("tiny"), seed=0))
    return release, loaded, qa.ImageCache(release, loaded.image_processor)


def scaled(loaded, factor, bias=0.0):
    """The random-init model with its head scaled by `factor` (1e3: a point mass) and `bias` added
    to the logits of '-', '.' and '0'."""
    net = copy.deepcopy(loaded.model)
    ids = answer_format.character_ids(loaded.tokenizer)
    with torch.no_grad():
        net.lm_head.weight.mul_(factor)
        b = torch.zeros(net.lm_head.weight.shape[0])
        b[[ids[c] for c in "-.0"]] = bias
    net.lm_head.bias = torch.nn.Parameter(b)
    return net


def informative(loaded):
    """A spread distribution with mass on all of a reply's cases near its middle: negative
    replies, one-digit integer parts and leading zeros ("04.0" beside "4.0")."""
    return scaled(loaded, 5.0, bias=2.0)


def rows(release, cache, n_images=2, n_questions=4):
    """(images, questions): the first images, each asked the first attributes' questions."""
    ids = list(release.ids)[:n_images]
    qs = [a.question for a in attributes.ATTRIBUTES[:n_questions]]
    return [cache[i] for i in ids for _ in qs], qs * n_images


def complete(shape):
    """Every complete answer of `shape`, walked with `Shape.allowed` (the one description)."""
    def walk(text):
        for c in shape.allowed(text):
            yield from ([text] if c == END else walk(text + c))
    return list(walk(""))


def after_prefixes(net, tokenizer, image_processor, image, question, answers):
    """{prefix: full-vocabulary log-probabilities after it} for every prefix of `answers` (and each
    answer itself), from full teacher-forced forwards of prompt + answer (no cache, the model's
    own positions). One chat is built per answer length; the others of that length are the same
    tokens with the answer's characters (one token each) put in its place."""
    ids = answer_format.character_ids(tokenizer)
    after = {}
    by_length = {}
    for answer in answers:
        by_length.setdefault(len(answer), []).append(answer)
    for group in by_length.values():
        batch = build_batch(tokenizer, image_processor, [image] * len(group), [question] * len(group),
                            ["0" * len(group[0])] * len(group))
        at = torch.nonzero(batch["labels"][0] != -100).flatten()
        for row, answer in enumerate(group):
            batch["input_ids"][row, at[:-1]] = torch.tensor([ids[c] for c in answer])
        with torch.no_grad():
            logp = torch.log_softmax(net(**batch).logits.float(), -1)
        for row, answer in enumerate(group):
            for k in range(len(answer) + 1):
                after[answer[:k]] = logp[row, at[k] - 1]
    return after


def enumerated(after, tokenizer, shape):
    """{answer: probability} of every answer of `shape` under the model held to it: the product of
    the per-position softmax over the allowed characters, its end included (probability 1 where
    the end is the only character allowed). `after`: `after_prefixes` covering the shape."""
    ids = answer_format.character_ids(tokenizer)
    prob = {}
    for a in complete(shape):
        p = 1.0
        for k, ch in enumerate(a + END):
            allowed = shape.allowed(a[:k])
            if allowed == END:
                continue
            p *= float(torch.softmax(after[a[:k]][[ids[c] for c in allowed]], 0)[allowed.index(ch)])
        prob[a] = p
    return prob


@pytest.fixture(scope="module")
def brute(setup):
    """Per row of `rows(...)`: the model's log-probabilities after every prefix of every answer of
    the three test shapes (OPEN's answers ending in '0' hold all of them), `informative` model."""
    release, loaded, cache = setup
    net = informative(loaded)
    images, questions = rows(release, cache)
    leaves = [a for a in complete(OPEN) if a.endswith("0")]
    return net, images, questions, [after_prefixes(net, loaded.tokenizer, loaded.image_processor, im, q, leaves)
                                    for im, q in zip(images, questions)]


def in_shape(net, tokenizer, image_processor, image, question, shape, answer):
    """The full softmax's mass on the allowed characters, multiplied along `answer` and its end."""
    ids = answer_format.character_ids(tokenizer)
    after = after_prefixes(net, tokenizer, image_processor, image, question, [answer])
    return float(np.prod([after[answer[:k]][[ids[c] for c in shape.allowed(answer[:k])]].exp().sum()
                          for k in range(len(answer) + 1)]))


def cdf(prob):
    """(values ascending, the value distribution's CDF at each) of {answer: probability}."""
    values = pd.Series(list(prob.values()), index=[float(a) for a in prob]).groupby(level=0).sum()
    return values.index.to_numpy(), (values.cumsum() / values.sum()).to_numpy()


def quantile(dist, q):
    """The lower q-quantile of a `cdf`, and how close the CDF comes to q there."""
    values, c = dist
    at = int(np.searchsorted(c, q))
    margin = min(abs(c[at] - q), abs(c[at - 1] - q) if at else 1.0)
    return float(values[at]), margin


@pytest.mark.parametrize("shape", [SIGNED, OPEN, Shape(1, 2, 0, True)], ids=["width1", "width1-2", "integers"])
def test_the_reading_is_the_exact_median_of_the_enumerated_distribution(setup, brute, shape):
    """Against the brute-force median of every answer's probability. The rows include medians
    below zero (the reversed digit order there) and medians away from the likeliest answer; for
    open widths, a first digit's subtree holds both widths and a value has two spellings."""
    _, loaded, _ = setup
    net, images, questions, afters = brute
    got = median_reading.replies(net, loaded.tokenizer, loaded.image_processor, images, questions,
                                 [shape] * len(images))
    negative = away = checked = 0
    for (text, mass, unresolved), image, question, after in zip(got, images, questions, afters):
        prob = enumerated(after, loaded.tokenizer, shape)
        median, margin = quantile(cdf(prob), 0.5)
        if margin < TIE:
            continue
        checked += 1
        assert shape.matches(text) and float(text) == median, (text, median)
        assert unresolved == 0.0
        assert mass == pytest.approx(in_shape(net, loaded.tokenizer, loaded.image_processor, image, question,
                                              shape, text), rel=1e-4)
        negative += median < 0
        away += float(max(prob, key=prob.get)) != median
    assert checked >= len(got) - 1 and negative >= 1 and away >= 2, (checked, negative, away)


def test_other_quantiles_and_a_pruned_enumeration_keep_their_bound(setup, brute):
    """Quantiles other than 1/2 are exact too; with a beam too small to ask every prefix, the
    reading lies between the (q - eps) and (q + eps) quantiles, eps the unresolved mass."""
    _, loaded, _ = setup
    net, images, questions, afters = brute
    dists = [cdf(enumerated(after, loaded.tokenizer, OPEN)) for after in afters]
    for q in (0.3, 0.6, 0.8):
        got = median_reading.replies(net, loaded.tokenizer, loaded.image_processor, images, questions,
                                     [OPEN] * len(images), quantile=q)
        pruned = median_reading.replies(net, loaded.tokenizer, loaded.image_processor, images, questions,
                                        [OPEN] * len(images), quantile=q, beam=3)
        for (text, _, _), (ptext, _, eps), prob in zip(got, pruned, dists):
            exact, margin = quantile(prob, q)
            assert margin < TIE or float(text) == exact
            assert 0 < eps < 1
            lo, hi = quantile(prob, max(q - eps, 1e-9))[0], quantile(prob, min(q + eps, 1.0) - 1e-12)[0]
            assert lo <= float(ptext) <= hi, (ptext, lo, hi, eps)


class TableDecoder:
    """The decoder's part with the model replaced by a table: the log-probabilities after a prefix
    are a fixed random function of (row, prefix), so the exact distribution is known for shapes too
    wide to enumerate through the model, and the spellings of one value ("4.x", "04.x") get
    unrelated decimals, which the random tiny model, led by its last token, never gives. The
    characters' ids are their indices in CHARS; one extra column is the mass outside them."""

    def __init__(self, n_rows: int, spread: float, size: int = 1 << 16):
        self.rows = [(r, "") for r in range(n_rows)]
        z = np.random.default_rng(0).normal(size=(size, len(median_reading.CHARS) + 1)) * spread
        self.table = (z - np.logaddexp.reduce(z, axis=1, keepdims=True))[:, :-1]

    def logp(self, row: int, text: str) -> np.ndarray:
        return self.table[zlib.crc32(f"{row}|{text}".encode()) % len(self.table)]

    def select(self, slots):
        self.rows = [self.rows[s] for s in slots]

    def step(self, tokens):
        self.rows = [(r, t if c is None else t + median_reading.CHARS[c]) for (r, t), c in zip(self.rows, tokens)]
        return np.stack([self.logp(r, t) for r, t in self.rows])


def table_distribution(table: TableDecoder, row: int, shape: Shape):
    """{answer: probability} and {answer: in-shape mass} of every answer, walking the tree."""
    col = {c: i for i, c in enumerate(median_reading.CHARS)}
    prob, mass = {}, {}

    def walk(text, p, m):
        allowed = shape.allowed(text)
        lp = table.logp(row, text)[[col[c] for c in allowed]]
        m *= float(np.exp(lp).sum())
        if allowed == END:
            prob[text], mass[text] = p, m
            return
        q = np.exp(lp - np.logaddexp.reduce(lp))
        for c, pc in zip(allowed, q):
            if c == END:
                prob[text], mass[text] = p * pc, m
            else:
                walk(text + c, p * pc, m)
    walk("", 1.0, 1.0)
    return prob, mass


def table_readings(table: TableDecoder, shapes, q, beam=median_reading.BEAM):
    ids = {c: i for i, c in enumerate(median_reading.CHARS)}
    readings = [median_reading._Reading(s, q, beam, r, table.logp(r, "")) for r, s in enumerate(shapes)]
    median_reading._descend(readings, table, ids)
    return [(r.text, r.in_shape, r.unresolved) for r in readings]


@pytest.mark.parametrize("shape", [SIGNED, Shape(1, 1, 2, True), OPEN, Shape(1, 3, 1, True), Shape(2, 3, 1, False),
                                   Shape(1, 2, 0, True)], ids=str)
def test_the_descent_is_exact_on_known_distributions_of_every_shape_kind(shape):
    """On table distributions (spread 1.5: smooth; 4: peaked), every quantile is exact for fixed and
    open widths (1-3 digits: prefixes kept waiting while deeper ones are asked), signs, 0 and 2
    decimals; the in-shape mass is the product along the reading. With a small beam the reading
    stays within its reported eps of the quantile."""
    n, checked = 5, 0
    for spread in (1.5, 4.0):
        table = TableDecoder(n, spread)
        exact = [(cdf(prob), mass) for prob, mass in (table_distribution(table, r, shape) for r in range(n))]
        for q in (0.1, 0.3, 0.5, 0.7, 0.9):
            got = table_readings(TableDecoder(n, spread), [shape] * n, q)
            for (text, in_shape, unresolved), (prob, mass) in zip(got, exact):
                value, margin = quantile(prob, q)
                assert unresolved == 0.0 and in_shape == pytest.approx(mass[text], rel=1e-9)
                if margin >= TIE:
                    assert float(text) == value, (spread, q, text, value)
                    checked += 1
            if shape.max_width > max(shape.min_width, 1):
                for (text, _, eps), (prob, _) in zip(table_readings(TableDecoder(n, spread), [shape] * n, q, beam=4),
                                                     exact):
                    assert 0 < eps < 1
                    lo, hi = quantile(prob, max(q - eps, 1e-9))[0], quantile(prob, min(q + eps, 1.0) - 1e-12)[0]
                    assert lo <= float(text) <= hi
    assert checked >= 0.9 * 2 * 5 * n


def test_on_a_point_mass_the_reading_is_constrained_greedy(setup):
    """Head logits x 1e3: every position's distribution is one character, so the median is the
    greedy reply held to the same shape (`predict.generate`, a separate decoding loop)."""
    release, loaded, cache = setup
    net = scaled(loaded, 1e3)
    images, questions = rows(release, cache, n_images=2, n_questions=4)
    shapes = [SIGNED, OPEN, Shape(2, 3, 1, False), Shape(1, 2, 0, True)] * 2
    got = median_reading.replies(net, loaded.tokenizer, loaded.image_processor, images, questions, shapes)
    greedy, _ = predict.generate(net, loaded.tokenizer, loaded.image_processor, images, questions, 12,
                                 row_shapes=shapes)
    assert [t for t, _, _ in got] == greedy
    assert len({g.startswith("-") for g in greedy}) == 2, "rows of both signs"


def test_the_reading_lies_between_the_sampled_replies_40th_and_60th_percentiles(setup):
    """Many replies sampled from the same rows by `predict.generate(sample=True)` (temperature 1,
    in shape): the reading is inside their middle fifth, and the greedy reply is not always."""
    release, loaded, cache = setup
    net = informative(loaded)
    images, questions = rows(release, cache, n_images=2, n_questions=2)
    shapes = [OPEN, SIGNED] * 2
    got = median_reading.replies(net, loaded.tokenizer, loaded.image_processor, images, questions, shapes)
    k = 300
    with torch.random.fork_rng():
        torch.manual_seed(0)
        drawn, _ = predict.generate(net, loaded.tokenizer, loaded.image_processor,
                                    [im for im in images for _ in range(k)], [q for q in questions for _ in range(k)],
                                    12, row_shapes=[s for s in shapes for _ in range(k)], sample=True)
    greedy, _ = predict.generate(net, loaded.tokenizer, loaded.image_processor, images, questions, 12,
                                 row_shapes=shapes)
    outside = 0
    for j, (text, _, _) in enumerate(got):
        lo, hi = np.percentile([float(d) for d in drawn[j * k:(j + 1) * k]], [40, 60])
        assert lo <= float(text) <= hi, (j, text, lo, hi)
        outside += not lo <= float(greedy[j]) <= hi
    assert outside >= 2, "the greedy replies are already in the middle: the test cannot tell"


def test_predict_gives_the_rows_of_predict_predict_read_with_the_answer_sign(setup):
    """Same rows and order as `predict.predict`; pred is read_answer of the reading (deltaL's
    answer text is -value); a model with non-finite logits gives empty readings, counted as
    unparsed by r2_table, not a crash."""
    release, loaded, cache = setup
    frame = release.attribute_frame().head(2)
    names = ["areaMM2", "deltaL", "deltaB"]
    shapes = {"areaMM2": Shape(2, 3, 1, False), "deltaL": Shape(2, 2, 2, False), "deltaB": OPEN}
    net = informative(loaded)
    args = (net, loaded.tokenizer, loaded.image_processor, cache, frame)
    got = median_reading.predict(*args, shapes=shapes, names=names, batch_size=4, progress=False)
    ref = predict.predict(*args, shapes=shapes, names=names, batch_size=4, progress=False)
    assert list(got.columns) == ["isic_id", "attribute", "true", "reply", "pred", "in_shape", "unresolved"]
    pd.testing.assert_frame_equal(got[["isic_id", "attribute", "true"]], ref[["isic_id", "attribute", "true"]])
    assert all(shapes[a].matches(r) for a, r in zip(got.attribute, got.reply))
    sign = got.attribute.map(lambda a: attributes.get(a).answer_sign)
    np.testing.assert_array_equal(got.pred.to_numpy(), sign * got.reply.astype(float))
    assert (sign < 0).any() and (got.in_shape.between(0, 1)).all() and (got.unresolved == 0).all()

    broken = copy.deepcopy(loaded.model)
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    bad = median_reading.predict(broken, *args[1:], shapes=shapes, names=names, batch_size=4, progress=False)
    assert (bad.reply == "").all() and bad.pred.isna().all()
    assert metrics.r2_table(bad).unparsed.sum() == len(bad)
    with pytest.raises(ValueError, match="quantile"):
        median_reading.replies(net, loaded.tokenizer, loaded.image_processor, [cache[frame.isic_id.iloc[0]]],
                               [attributes.get("deltaB").question], [OPEN], quantile=1.0)
