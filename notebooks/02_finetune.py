# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Fine-tuning: teaching Qwen2-VL to answer attribute questions
#
# The paper (§3.2) turns every training image into W = 5 question–answer tuples: five of the 16
# attributes drawn at random, each asked with its question Q(a) and answered with the measured value
# as digits. Qwen2-VL is trained to maximise the likelihood of the answer tokens only. This chapter
# builds those tuples, trains, and shows what was trained and how the loss went.

# %% tags=["parameters", "hide-input"]
profile = "default"  # profile name or path to a profile YAML
out = None  # run folder; default runs/<profile>
# Overrides of the profile's `train` section; None keeps the profile's value.
method = None  # "full" | "lora"
lr = None
batch_size = None
epochs = None
w = None
packed = None
compare_steps = None  # tiny model: steps of the LoRA-vs-full comparison (0: skip it)

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from skinlib import attributes, chapter, config, figures, finetune, train as training

ch = chapter.open(profile, out, "02_finetune", train={
    "method": method, "lr": lr, "batch_size": batch_size, "epochs": epochs, "w": w,
    "packed": packed, "compare_steps": compare_steps})
cfg, run = ch.cfg, ch.run
print(f"profile {cfg['name']!r}: model {cfg['model']['name']!r}, "
      f"method {cfg['train']['method']!r}, run folder {config.shown(run)}")

# %% [markdown]
# ## The tuples
#
# Each answer is the attribute's value written in the registry's number format: a fixed number of
# decimals and the integer part zero-padded to the digit count of the attribute's typical values
# (area `05.8`, perimeter `19.9`). A fixed width makes every digit mean the same decimal
# place, so the model cannot be off by a factor of ten by dropping a digit; the width is that of
# typical values, not of the largest, so the first character still differs between lesions — the
# state of the last question token, which {doc}`chapter 4 <04_embed>` uses as the embedding
# h_im,a, has to predict it. For the same reason ΔL, negative for every lesion (darker than its
# skin), is asked the other way round: how much higher L* is outside the lesion than inside,
# answer `08.13` for ΔL = −8.13. Asked as ΔL, every answer would begin with `-`, a first character
# that tells the lesions nothing.

# %% tags=["hide-input"]
def example(a):
    """The attribute's answer to a value of its typical size."""
    return a.format_answer(a.answer_sign * 3.14159 * 10 ** (a.int_digits - 1))


fmt = pd.DataFrame([{"attribute": a.name, "unit": a.unit, "question": a.question,
                     "decimals": a.decimals, "integer digits": a.int_digits,
                     "example": example(a)} for a in attributes.ATTRIBUTES])
display(fmt)

# %% [markdown]
# ## Train
#
# The loop runs through `accelerate`: with the profile's `train.processes` above 1 this cell runs
# `accelerate launch --multi_gpu --num_processes N -m skinlib.finetune` (data parallel: N GPUs, or
# here two gloo processes of one thread each on the two CPU cores; `bench/processes.py` times
# them against one process on both cores, and {doc}`chapter 8 <08_performance>` shows its newest
# result). It has a cosine schedule, a progress bar with loss and throughput, and a checkpoint of
# the trainable weights, optimizer, scheduler and random state every `checkpoint_every` steps.
# Stopping this cell and running it again resumes from the last checkpoint and ends with the same
# weights as an uninterrupted run (a test checks it). A model already trained under this run folder
# with the same recipe (for example by `accelerate launch`) is reused; after a change to the model
# or train section, the other recipe's files are removed and training starts afresh.
#
# Where the embedded default departs from the paper's recipe, and why (the `paper` profile keeps the
# paper's: LoRA, one tuple per sequence, no warm-up):
#
# - **Every weight is trained**, not LoRA adapters: the tiny model starts from random weights (see
#   the comparison at the end of this chapter).
# - **A short vision warm-up** (`skinlib.warmup`) first: the paper's Qwen2-VL comes with a vision
#   tower pretrained on millions of images; ours is random, and trained on answers alone its language
#   model settles on each attribute's usual answer before the vision tower learns to see the lesion.
#   A linear read-out of the vision tower's mean output token regresses the same training tuples'
#   values for the profile's `vision_warmup.steps` steps (data parallel like the training) and is
#   then thrown away.
# - **The W tuples of an image share one sequence**: the system prompt and the image come once,
#   then each tuple's question and answer, and each tuple sees only the image prefix and itself, at
#   the positions it would have alone (`skinlib.inputs`; a test holds its logits and loss equal to
#   the one-tuple sequence's). Each tuple is thus trained exactly as the paper's one-tuple sequence,
#   the prompt the model is asked at prediction, in a fraction of the time (`bench/training.py`
#   against one tuple per sequence; {doc}`chapter 8 <08_performance>`). The W answers of an image
#   never see each other: packed as one multi-turn chat, the 2nd to 5th answers could read the
#   answers before them, a help no prediction prompt offers.
#
# W stays the paper's 5 here; the `w` and `epochs` parameters above run other choices.
# {doc}`Chapter 4 <04_embed>` compares a linear read-out of the model's last layer with its answers:
# where the read-out does better, the language model, not the vision tower, is what falls short.

# %%
summary = finetune.shown_summary(finetune.run(cfg, run), run)  # paths within the run
display(pd.Series(summary, name="value").to_frame())

# %% tags=["hide-input"]
tup = pd.read_parquet(config.tuples_path(run))
print(f"{len(tup):,} tuples from {tup.isic_id.nunique():,} training images "
      f"(W = {cfg['train']['w']}); answers per attribute:")
display(tup.attribute.value_counts().reindex(attributes.NAMES).to_frame("tuples").T)
display(tup.head(8))

# %% [markdown]
# ## What was trained

# %% tags=["hide-input"]
method_text = {
    "full": "every weight of the model (vision tower, merger, language model, "
            "embeddings, head)",
    "lora": f"LoRA adapters (rank {cfg['train']['lora']['rank']}) on the vision "
            "tower's and the language model's linear layers; the base weights stay "
            "frozen",
}[summary["method"]]
print(f"base: {summary['base']}\ntrained: {method_text}\n"
      f"trainable parameters: {summary['trainable_parameters']:,} "
      f"of {summary['parameters']:,}\n"
      f"{summary['steps']:,} optimizer steps of batch {cfg['train']['batch_size']} "
      f"on {summary['processes']} process(es), {summary['device']}; "
      f"{summary['train_seconds']:.0f} s of training in the run that finished it")

# %% [markdown]
# ## Loss and throughput
#
# The loss is the mean cross-entropy per answer token (digits, point, sign and the closing
# `<|im_end|>`); the curve is smoothed over 50 steps.

# %% tags=["hide-input"]
hist = pd.read_csv(config.checkpoint_dir(run) / training.HISTORY)
fig = figures.training_curves(hist)
plt.show()
print(f"final loss (mean of the last 100 steps) {hist.loss.tail(100).mean():.3f}; "
      f"throughput {hist.tuples_per_s.iloc[-1]:.0f} tuples/s")

# %% [markdown]
# ## Why the embedded default trains every weight
#
# The paper adapts a *pretrained* Qwen2-VL with LoRA. The tiny model here starts from random weights:
# its embeddings and output head are noise, and LoRA leaves them frozen, so low-rank updates of the
# linear layers have little to build on. The comparison below trains the same random-init model for a
# few steps both ways, on the same batches; it is measured in this run, not quoted.

# %% tags=["hide-input"]
if cfg["model"]["name"] == "tiny" and cfg["train"]["compare_steps"]:
    curves = finetune.compare_methods(cfg, run, steps=cfg["train"]["compare_steps"])
    fig = figures.method_comparison(curves)
    plt.show()
    last = curves.groupby("method").loss.apply(lambda s: s.tail(20).mean())
    print("loss over the last 20 steps: "
          + ", ".join(f"{m} {v:.2f}" for m, v in last.items()))
else:
    print("skipped: the comparison is for the tiny random-init model "
          "(the paper profile uses LoRA).")
