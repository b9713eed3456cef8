"""The training loop on the real tiny Qwen2-VL with real peft and accelerate: schedule, batch order,
safetensors checkpoints, and resume-after-interrupt equivalence."""
import numpy as np
import pytest
import torch
from PIL import Image

from skinlib import inputs, model as mdl, train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return mdl.build_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


def data(loaded, n=12):
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (130, 130, 3), dtype=np.uint8)) for _ in range(n)]
    enc = inputs.encode_images(loaded.image_processor, imgs)
    return [(e, "What is the area of the lesion in mm²?", f"{rng.uniform(1, 40):.1f}") for e in enc]


def collate_for(loaded):
    def collate(items):
        return inputs.build_batch(loaded.tokenizer, loaded.image_processor,
                                  [i[0] for i in items], [i[1] for i in items], [i[2] for i in items])
    return collate


def lora_model(path):
    loaded = mdl.load(path)
    torch.manual_seed(1)               # LoRA's initial A matrices
    return loaded, mdl.apply_lora(loaded.model, rank=4, dropout=0.1)


def test_cosine_schedule_warms_up_and_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = train.cosine_schedule(opt, warmup=2, total=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 0.05


def test_batch_order_is_a_seeded_permutation_per_epoch():
    s = train.EpochBatches(10, 4, epochs=2, seed=3)
    batches = list(s)
    assert len(batches) == len(s) == s.steps == 5                # 20 items in full batches of 4
    assert all(len(b) == 4 for b in batches)
    stream = sum(batches, [])
    assert sorted(stream[:10]) == sorted(stream[10:]) == list(range(10))   # each epoch: every item once
    assert batches == list(train.EpochBatches(10, 4, epochs=2, seed=3))
    assert stream[:10] != stream[10:]
    # for one global batch, the order does not depend on the number of processes
    two = train.EpochBatches(10, 2, epochs=2, seed=3, processes=2)
    assert sum(list(two), []) == stream and two.steps == s.steps


def test_interrupted_run_resumes_to_the_same_weights(tiny, tmp_path):
    settings = train.Settings(lr=5e-3, batch_size=4, epochs=2, checkpoint_every=2, seed=0)
    loaded, m = lora_model(tiny)
    items, collate = data(loaded), collate_for(loaded)
    full = train.train(m, items, collate, settings, tmp_path / "a", progress=False)
    assert full["step"] == full["total_steps"] == 6
    want = train.trainable_state(m)

    loaded, m = lora_model(tiny)
    cut = train.train(m, items, collate, settings, tmp_path / "b", progress=False, stop_after=3)
    assert cut["step"] == 3 and train.latest_checkpoint(tmp_path / "b").name == "step-0000002"
    loaded, m = lora_model(tiny)                       # a new process would start from scratch
    rest = train.train(m, items, collate, settings, tmp_path / "b", progress=False)
    assert rest["resumed_from"].endswith("step-0000002") and rest["step"] == 6
    got = train.trainable_state(m)
    assert set(got) == set(want) and any("lora_A" in k for k in got)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # the history has each step once, the redone step 3 included once
    steps = [int(l.split(",")[0]) for l in (tmp_path / "b" / train.HISTORY).read_text().splitlines()[1:]]
    assert steps == list(range(1, 7))
    # checkpoints are safetensors + JSON only, and the newest two are kept
    ck = sorted((tmp_path / "b").glob(train.CHECKPOINT_GLOB))
    assert [p.name for p in ck] == ["step-0000004", "step-0000006"]
    assert {p.suffix for p in ck[-1].iterdir()} == {".safetensors", ".json"}


def test_lora_training_lowers_the_loss(tiny, tmp_path):
    loaded, m = lora_model(tiny)
    items = data(loaded, n=4)
    collate = collate_for(loaded)
    batch = collate(items)
    with torch.no_grad():
        before = float(m(**batch).loss)
    train.train(m, items, collate, train.Settings(lr=2e-2, batch_size=4, epochs=15, checkpoint_every=100),
                tmp_path, progress=False)
    with torch.no_grad():
        after = float(m(**batch).loss)
    assert after < 0.9 * before


def test_a_setting_that_is_not_a_number_is_named():
    # YAML 1.1 reads `lr: 2e-3` as the string "2e-3"; it used to fail deep in torch's scheduler
    with pytest.raises(TypeError, match=r"'lr'.*'2e-3'.*2\.0e-3"):
        train.Settings.from_dict({"lr": "2e-3"})
    with pytest.raises(TypeError, match="'batch_size' must be a whole number"):
        train.Settings.from_dict({"batch_size": 8.5})
    s = train.Settings.from_dict({"lr": 2e-3, "batch_size": 8.0, "epochs": 3})
    assert (s.lr, s.batch_size, type(s.batch_size), s.epochs) == (2e-3, 8, int, 3)


def test_unknown_setting_is_named():
    with pytest.raises(KeyError, match="lerning_rate"):
        train.Settings.from_dict({"lerning_rate": 1})


def test_a_failed_accelerate_launch_names_the_command_and_its_error(tmp_path):
    # two real processes through accelerate's launcher; the run folder has no manifest, so both
    # fail in their first lines and the stage must say so rather than return without a model
    from skinlib import config, finetune

    cfg = config.load_profile("smoke")
    assert cfg["train"]["processes"] == 2
    with pytest.raises(RuntimeError, match=r"(?s)accelerate\.commands\.launch.*--num_processes 2.*manifest"):
        finetune.run(cfg, tmp_path / "run", progress=False)
    assert (config.stage_dir(tmp_path / "run", "02_finetune") / "launched-profile.yaml").exists()


def test_a_terminal_view_keeps_each_bar_as_last_drawn_however_the_stream_is_split():
    """What the notebook shows of a launched process: real tqdm output, whose thousands of \\r
    redraws must collapse to one line per bar, the same for any split of the stream into chunks."""
    import io

    from tqdm import tqdm

    from skinlib.finetune import TerminalView

    buf = io.StringIO()
    buf.write("a warning\n")
    for _ in tqdm(range(300), file=buf, mininterval=0, desc="warm-up"):
        pass
    bar = tqdm(range(200), file=buf, mininterval=0, desc="train")
    for i in bar:          # interrupted mid-bar: the live line is shown as last drawn
        if i == 120:
            break
    raw = buf.getvalue()
    assert raw.count("\r") > 400
    rng = np.random.default_rng(0)
    for cuts in ([], [1], list(range(1, len(raw))), sorted(rng.choice(len(raw), 60, replace=False))):
        view = TerminalView()
        for a, b in zip([0, *cuts], [*cuts, len(raw)]):
            view.feed(raw[a:b])
        lines = view.text.split("\n")
        assert len(lines) == 3, lines[:5]
        assert lines[0] == "a warning"
        assert lines[1].startswith("warm-up: 100%") and "300/300" in lines[1]
        assert lines[2].startswith("train:") and "120/200" in lines[2]
