"""
Fine-tune GPT-2 small to tell positive from negative IMDB movie reviews, training only a LoRA
adapter (about 0.24% of the weights) with PEFT and the Hugging Face Trainer.

    python fine_tune_lora.py                                    # train, evaluate, save ./gpt2-imdb-lora
    python fine_tune_lora.py --max_train_samples 2000 --max_eval_samples 500 --num_epochs 1
    python fine_tune_lora.py --predict "A wonderful film." "Two hours I will never get back."
    python fine_tune_lora.py --predict "Great fun." --adapters ./gpt2-imdb-lora ./gpt2-imdb-lora-r16
    python fine_tune_lora.py --merge                            # fold the adapter into a plain model
    python fine_tune_lora.py --compare                          # LoRA vs full fine-tuning, measured
    torchrun --nproc_per_node 2 fine_tune_lora.py               # data-parallel on 2 GPUs

Every constant below can be set from the command line as --lowercase_name VALUE
(--lora_r 16, --target_modules c_attn c_proj, --max_train_samples none); --help lists them all.
"""
import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import typing
import warnings
from pathlib import Path
from types import SimpleNamespace

# Two deprecation notices raised inside the libraries themselves, not by anything this script does.
warnings.filterwarnings("ignore", message=".*(null_placement|is_gradient_checkpointing).*")

# -----------------------------------------------------------------------------
# configuration: edit here, or pass --lowercase_name VALUE
# I/O
MODEL_NAME = "gpt2"  # Hub id or local folder; "gpt2-medium" has 355M weights instead of 124M: ~3x the compute
DATASET_NAME = "imdb"  # Hub id, or a local folder: aclImdb layout, or train.*/test.* as parquet, csv or jsonl
OUTPUT_DIR = "./gpt2-imdb-lora"  # adapter, tokenizer and results.json; checkpoints go to OUTPUT_DIR/checkpoints
FULL_OUTPUT_DIR = "./gpt2-imdb-full"  # where --full_finetune saves the whole model
# data
MAX_LENGTH = 512  # tokens kept per review; IMDB's median review is 222 tokens, 14% are over 512, 41% over 256
MAX_TRAIN_SAMPLES: int | None = None  # None = all 25,000; a random 2000 makes a quick run
MAX_EVAL_SAMPLES: int | None = None  # None = all 25,000; with 1000, accuracy near 90% is known to about +-2 points
# LoRA
LORA_R = 8  # rank of the update; 4-16 is typical, higher learns more and saves a bigger adapter
LORA_ALPHA = 16  # the update is scaled by alpha / r; keep alpha = 2 * r when you change r
LORA_DROPOUT = 0.05  # dropout on the adapter's input; 0.0-0.1
TARGET_MODULES = ["c_attn"]  # GPT-2 layers that get an adapter; add c_proj c_fc for more capacity
# training
FULL_FINETUNE = False  # True trains every weight instead of an adapter and saves the whole model
LEARNING_RATE = 3e-4  # for the adapter; 1e-4 to 5e-4 is usual for LoRA, too high and training diverges
FULL_LEARNING_RATE = 5e-5  # for full fine-tuning: all 124M pretrained weights move, so steps must be ~10x smaller
BATCH_SIZE = 8  # reviews per step on each GPU; halve it (and double the next line) if you run out of memory
GRADIENT_ACCUMULATION_STEPS = 1  # steps summed per update: effective batch = BATCH_SIZE * this * GPUs
NUM_EPOCHS = 3  # passes over the training set
SEED = 42  # same seed, same data order and initial adapter: the run is repeatable
# speed: how fast the same training runs (batches hold the same reviews, the loss and schedule are unchanged)
PRECISION = "auto"  # "auto": bf16 where the GPU or CPU has it in hardware, else fp16 on a GPU, fp32 on a CPU or Mac
PAD_TO_MULTIPLE_OF = 8  # pad each batch to its longest review, rounded up to this; = MAX_LENGTH pads all to the max
GROUP_BY_LENGTH = True  # put reviews of similar length in the same batch, so little of each batch is padding
EVAL_BATCH_SIZE: int | None = None  # None: 64 on a GPU (no backward pass, so room for more), BATCH_SIZE on a CPU
TORCH_COMPILE = False  # True: torch.compile each transformer block (CUDA graphs on a GPU); experimental, see README
# reliability
RESUME = True  # an interrupted run continues from its last checkpoint when started again with the same settings
SAVE_STEPS = 500  # checkpoint every this many steps (0 = at the end of each epoch)
SAVE_TOTAL_LIMIT = 2  # checkpoints kept; a full fine-tuning checkpoint is ~1.5 GB with its optimizer state
LOGGING_STEPS = 50  # print the training loss every this many steps
# -----------------------------------------------------------------------------

CONSTANTS = [name for name in list(globals()) if name.isupper() and not name.startswith("_")]
LABELS = ["negative", "positive"]  # IMDB's label 0 and 1
CHECKPOINTS = "checkpoints"  # sub-folder of the output folder that holds the checkpoints of a run in progress
# Texts that --merge uses to compare the merged model with the adapter.
MERGE_CHECK_TEXTS = [
    "One of the best films I have seen this year: moving, funny and beautifully shot.",
    "A tedious mess. The plot makes no sense and the acting is wooden.",
    "It was fine, I suppose. Some good scenes, some dull ones.",
]


class UserError(Exception):
    """A problem the user can fix; main() prints it as one line and exits with status 1."""


# -----------------------------------------------------------------------------
# command line: every constant becomes --lowercase_name, typed like its default


def constant_comments():
    """The comment after each constant in this file, for --help: one place to document a setting."""
    comments = {}
    for line in Path(__file__).read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Z][A-Z0-9_]*)\s*(?::[^=]+)?=.*?#\s*(.*)$", line)
        if match and match.group(1) in CONSTANTS:
            comments[match.group(1)] = match.group(2)
    return comments


def value_parser(name, default):
    """Turn a command-line string into a value of the constant's type, or fail with a clear sentence."""
    # `int | None` at the top marks a constant that can also be none. Read the annotations from the
    # module object, which works in every Python version (from 3.14 on they are evaluated lazily).
    annotations = typing.get_type_hints(sys.modules[__name__])
    optional = type(None) in getattr(annotations.get(name), "__args__", ())
    kind = int if optional else type(default)

    def parse(text):
        if optional and text.lower() == "none":
            return None
        try:
            if kind is bool:
                if text.lower() in ("true", "1", "yes", "on"):
                    return True
                if text.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            if kind is int:
                return int(text.replace("_", "").replace(",", ""))
            return kind(text)
        except ValueError:
            expected = {bool: "true or false", int: "a whole number", float: "a number"}.get(kind, "text")
            if optional:
                expected += " or none"
            raise argparse.ArgumentTypeError(f"expects {expected}, got {text!r}") from None

    return parse


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (python {self.prog} --help lists every option)\n")


def parse_args(argv):
    parser = OneLineParser(
        prog=Path(__file__).name,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a mistyped flag is an error, not silently taken for another one
    )
    comments = constant_comments()
    for name in CONSTANTS:
        default = globals()[name]
        flag = "--" + name.lower()
        help_text = f"{comments.get(name, '')} (default: {default!r})".replace("%", "%%")
        if isinstance(default, list):
            parser.add_argument(flag, nargs="+", metavar="NAME", default=default, help=help_text)
        elif isinstance(default, bool):
            # `--full_finetune` alone means true; `--full_finetune false` is accepted too.
            parser.add_argument(flag, nargs="?", const=True, type=value_parser(name, default), default=default,
                                metavar="BOOL", help=help_text)
        else:
            parser.add_argument(flag, type=value_parser(name, default), default=default,
                                metavar=name.split("_")[-1], help=help_text)
    actions = parser.add_argument_group("instead of training")
    actions.add_argument("--predict", nargs="+", metavar="TEXT",
                         help="classify these texts with the model saved in OUTPUT_DIR and print label and probability")
    actions.add_argument("--adapters", nargs="+", metavar="DIR",
                         help="with --predict: load one base model, add each adapter folder, classify with each in turn")
    actions.add_argument("--merge", action="store_true",
                         help="fold the adapter in OUTPUT_DIR into the base weights and save a plain model to OUTPUT_DIR-merged")
    actions.add_argument("--compare", action="store_true",
                         help="train with LoRA, then fully, on the same data; write comparison.md and comparison.json")
    args = parser.parse_args(argv)
    if args.adapters and not args.predict:
        parser.error("--adapters goes with --predict: add --predict followed by the texts to classify")
    if sum(bool(x) for x in (args.predict, args.merge, args.compare)) > 1:
        parser.error("choose one of --predict, --merge and --compare")
    cfg = SimpleNamespace(**{name.lower(): getattr(args, name.lower()) for name in CONSTANTS})
    check_config(cfg)
    return cfg, args


def check_config(cfg):
    positive = ["max_length", "lora_r", "batch_size", "gradient_accumulation_steps", "num_epochs",
                "pad_to_multiple_of", "logging_steps", "learning_rate", "full_learning_rate"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be greater than 0, got {getattr(cfg, name)}")
    for name in ["max_train_samples", "max_eval_samples", "eval_batch_size"]:
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be a positive number or none, got {getattr(cfg, name)}")
    if not 0 <= cfg.lora_dropout < 1:
        raise UserError(f"--lora_dropout must be at least 0 and below 1, got {cfg.lora_dropout}")
    if cfg.save_steps < 0 or cfg.save_total_limit < 1:
        raise UserError("--save_steps must be 0 or more and --save_total_limit at least 1")
    if cfg.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise UserError(f"--precision must be one of auto, bf16, fp16, fp32, got {cfg.precision!r}")
    for name in ["output_dir", "full_output_dir"]:
        setattr(cfg, name, getattr(cfg, name).rstrip("/\\") or getattr(cfg, name))


# -----------------------------------------------------------------------------
# device and precision


def is_main_process():
    """Under torchrun every process runs this file; only the first one prints and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def say(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


def pick_device_and_precision(cfg):
    import torch

    if torch.cuda.is_available():
        device = "cuda"
        name = torch.cuda.get_device_name()
        # bf16 has fp32's range, so it needs no loss scaling. GPUs before Ampere (a T4, a V100) only
        # have fp16: bf16 there is emulated, slowly, and torch counts that as support unless told not to.
        auto = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    elif torch.backends.mps.is_available():
        device, name, auto = "mps", "Apple GPU", "fp32"
    else:
        # CPUs with bf16 arithmetic in hardware (AVX512-BF16: Intel Xeons since Cooper Lake, AMD since
        # Zen 4) train GPT-2 in bf16 about 1.4x faster than in fp32 (see README). Elsewhere bf16 is
        # emulated, and matrix products can be tens of times slower than in fp32 (pytorch/pytorch
        # issue 146508). torch has no public test for it yet, hence the fallback.
        native_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        device, name, auto = "cpu", "CPU", "bf16" if native_bf16 else "fp32"
    precision = auto if cfg.precision == "auto" else cfg.precision
    if device != "cuda" and precision == "fp16":
        raise UserError("--precision fp16 needs a CUDA GPU and there is none here; use auto (bf16 where this "
                        "machine computes it, else fp32) or fp32")
    if device == "cpu" and precision == "bf16" and auto != "bf16":
        say("Warning: this CPU has no bf16 arithmetic, so bf16 is emulated here and can be many times "
            "slower than fp32 (--precision auto would use fp32)")
    return device, name, precision


# -----------------------------------------------------------------------------
# data: IMDB from the Hub, or a local folder; tokenized with datasets' batched map


def looks_like_a_path(name):
    return name.startswith((".", "/", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", name) is not None


def load_reviews(name):
    """Return a DatasetDict with `train` and `test` splits holding `text` and `label` (0 = negative)."""
    import datasets

    path = Path(name).expanduser()
    if path.is_dir():
        if all((path / split / kind).is_dir() for split in ("train", "test") for kind in ("pos", "neg")):
            # Stanford's aclImdb layout: one .txt per review, the folder name is the label.
            splits = {}
            for split in ("train", "test"):
                texts, labels = [], []
                for label, kind in enumerate(("neg", "pos")):
                    for file in sorted((path / split / kind).glob("*.txt")):
                        texts.append(file.read_text(encoding="utf-8", errors="replace"))
                        labels.append(label)
                splits[split] = datasets.Dataset.from_dict({"text": texts, "label": labels})
            return datasets.DatasetDict(splits)
        builders = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}
        files = {}
        for split in ("train", "test"):
            found = [f for f in sorted(path.glob(split + ".*")) if f.suffix in builders]
            if found:
                files[split] = found[0]
        if len(files) == 2 and builders[files["train"].suffix] == builders[files["test"].suffix]:
            builder = builders[files["train"].suffix]
            return datasets.load_dataset(builder, data_files={k: str(v) for k, v in files.items()})
        raise UserError(
            f"--dataset_name {name}: the folder holds neither the aclImdb layout (train/pos, train/neg, test/pos, "
            f"test/neg) nor train.* and test.* files in one format (parquet, csv or jsonl); add them or point elsewhere")
    if path.exists() or looks_like_a_path(name):
        raise UserError(f"--dataset_name {name}: no such folder; give an existing folder or a Hub id such as imdb")
    try:
        return datasets.load_dataset(name)
    except Exception as error:  # offline, a typo in the id, a private dataset...
        raise UserError(f"--dataset_name {name}: could not load it from the Hugging Face Hub ({first_line(error)}); "
                        f"check the id and your connection, or pass a local folder") from None


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def check_columns(data, name):
    for split in ("train", "test"):
        if split not in data:
            raise UserError(f"--dataset_name {name} has no {split!r} split (it has {', '.join(data)}); "
                            f"provide both train and test")
        for column in ("text", "label"):
            if column not in data[split].column_names:
                raise UserError(f"--dataset_name {name}: the {split} split has no {column!r} column "
                                f"(it has {', '.join(data[split].column_names)}); rename the columns to text and label")
        bad = sorted(set(data[split].unique("label")) - {0, 1})
        if bad:
            raise UserError(f"--dataset_name {name}: labels must be 0 (negative) or 1 (positive), the {split} split "
                            f"also has {', '.join(map(repr, bad[:5]))}; map them to 0 and 1")


def subset(split, limit, seed):
    """A seeded random subset: IMDB is sorted by label, so the first N rows would be all negative."""
    if limit is None or limit >= len(split):
        return split
    return split.shuffle(seed=seed).select(range(limit))


def prepare_data(cfg, tokenizer):
    data = load_reviews(cfg.dataset_name)
    check_columns(data, cfg.dataset_name)
    data = data.select_columns(["text", "label"])
    say(f"Found {len(data['train']):,} train and {len(data['test']):,} test reviews in {cfg.dataset_name}")

    data = {split: data[split] for split in ("train", "test")}
    for split in data:
        before = len(data[split])
        data[split] = data[split].filter(lambda b: [isinstance(t, str) and t.strip() != "" for t in b["text"]],
                                         batched=True)
        if len(data[split]) < before:
            say(f"Dropped {before - len(data[split]):,} empty or whitespace-only {split} reviews")
        if len(data[split]) == 0:
            raise UserError(f"--dataset_name {cfg.dataset_name}: no {split} reviews are left after dropping empty "
                            f"ones; check the text column")
    train = subset(data["train"], cfg.max_train_samples, cfg.seed)
    test = subset(data["test"], cfg.max_eval_samples, cfg.seed)

    def tokenize(batch):
        # No padding here: each batch is padded later, only as far as its longest review needs.
        encoded = tokenizer(batch["text"], truncation=True, max_length=cfg.max_length)
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    train = train.map(tokenize, batched=True, remove_columns=["text"], desc="Tokenizing train")
    test = test.map(tokenize, batched=True, remove_columns=["text"], desc="Tokenizing test")
    # Evaluation order does not matter, so sort by length: every eval batch is nearly free of padding.
    test = test.sort("length")
    return train, test


class LengthGroupedSampler:
    """Shuffle the training set, then put reviews of similar length into the same batch.

    Within each window of 64 batches the reviews are sorted by length and cut into batches, and the
    batches are shuffled. Every epoch sees every review exactly once; which reviews share a batch and
    the order of the batches change every epoch, seeded by (SEED, epoch). The longest batch goes first,
    so a run that will run out of memory does so at step 1, not an hour in.
    """

    def __init__(self, lengths, batch_size, seed, window=64):
        self.lengths, self.batch_size, self.seed, self.window, self.epoch = list(lengths), batch_size, seed, window, 0

    def set_epoch(self, epoch):  # the Trainer calls this at the start of every epoch
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        import torch

        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start:start + size], key=self.lengths.__getitem__, reverse=True)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # Only the very last batch can be short; it must stay last, or the DataLoader (which cuts the
        # stream of indices into batches itself) would mix it with its neighbours.
        tail = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + tail
        longest = max(range(len(batches)), key=lambda i: max(self.lengths[j] for j in batches[i]))
        if len(batches[longest]) == self.batch_size:
            batches[0], batches[longest] = batches[longest], batches[0]
        return iter([index for batch in batches for index in batch])


def make_collator(tokenizer, pad_to_multiple_of):
    """Pads each batch to its longest review, rounded up to PAD_TO_MULTIPLE_OF (GPU kernels prefer
    multiples of 8)."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)


# -----------------------------------------------------------------------------
# model and LoRA


def load_tokenizer(name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    # GPT-2 was trained without padding, so it has no pad token. Batches need one: reuse the
    # end-of-text token. It goes after each text, where no real token attends to it, and the
    # classifier reads the last real token.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def quiet_loading():
    """Loading GPT-2 for classification reports that the head `score` is newly initialized. That is
    expected: the pretrained model has no sentiment head; `score` is trained and saved with the adapter."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_base_model(name, tokenizer, **kwargs):
    import torch
    from transformers import AutoModelForSequenceClassification

    with quiet_loading():
        model = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)},
            dtype=torch.float32, **kwargs)
    # The model must know the pad token too: GPT2ForSequenceClassification classifies from the
    # hidden state of the last token that is not padding, and finds it by this id.
    model.config.pad_token_id = tokenizer.pad_token_id
    # Saying so up front spares the model a check (and a torch.compile graph break) at every step.
    model.config.problem_type = "single_label_classification"
    return without_cache(model)


def without_cache(model):
    """By default GPT-2 returns a copy of every layer's keys and values, ready to generate text
    token by token. A classifier never generates: the copies only cost time and memory (0.6 GB of
    a 7 GB LoRA training step at 8 reviews of 512 tokens in fp32; see the README's Speed section)."""
    model.config.use_cache = False
    return model


def resolve_model_name(name):
    """A local folder is stored as an absolute path in the adapter, so --predict works from anywhere."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if looks_like_a_path(name):
        raise UserError(f"--model_name {name}: no such folder; give an existing folder or a Hub id such as gpt2")
    return name


def load_model(cfg, tokenizer):
    from transformers import AutoConfig

    name = resolve_model_name(cfg.model_name)
    try:
        config = AutoConfig.from_pretrained(name)
        # GPT-2's activation "gelu_new" is written out in Python as eight tensor operations, and under
        # bf16 autocast four of their results are kept for the backward pass, three of them in fp32
        # (autocast runs `pow` in fp32): about 2 GB at 8 reviews of 512 tokens, by our count the
        # largest item of a LoRA step. PyTorch's gelu(approximate="tanh") is the same formula in one
        # kernel that keeps only its input. The results agree to rounding; the weights are untouched.
        gelu_new = getattr(config, "activation_function", None) == "gelu_new"
        model = load_base_model(name, tokenizer, **({"activation_function": "gelu_pytorch_tanh"} if gelu_new else {}))
    except (OSError, ValueError) as error:
        raise UserError(f"--model_name {cfg.model_name}: could not load it ({first_line(error)}); check the id "
                        f"and your connection, or pass a local folder with config.json and weights") from None
    if cfg.full_finetune:
        return model

    from peft import LoraConfig, get_peft_model

    layer_names = {name.split(".")[-1] for name, module in model.named_modules()
                   if type(module).__name__ in ("Linear", "Conv1D") and name != "score"}
    missing = [t for t in cfg.target_modules if t not in layer_names]
    if missing:
        raise UserError(f"--target_modules: this model has no layer called {', '.join(missing)}; "
                        f"it has for example {', '.join(sorted(layer_names)[:6])}")
    lora = LoraConfig(
        task_type="SEQ_CLS",  # also trains and saves the new classification head `score` with the adapter
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        # GPT-2's layers are `Conv1D`, which store the weight transposed (in x out) compared with
        # `nn.Linear`; this tells peft so, instead of letting it warn and flip it.
        fan_in_fan_out=True,
    )
    return get_peft_model(model, lora)


def attend_without_the_padding_mask(model, tokenizer):
    """GPT-2 reads left to right: each token attends only to the tokens before it. The padding goes
    after each review, so no real token ever sees it, and the classifier reads the last real token:
    the attention mask changes nothing in the result (a test checks this). Attention can then be
    PyTorch's causal kernel alone (flash attention on recent GPUs), with no mask to build or read.

    transformers prepares the mask at every step, and to do so reads a number back from the GPU (is
    the mask needed at all? are several texts packed into one row?): the CPU waits for the GPU to
    catch up, at every step. Registered under a name of our own, the same attention function comes
    with no mask preparation: none is done, and the mask in each batch is ignored."""
    if model.config.model_type != "gpt2" or tokenizer.padding_side != "right":
        return  # another model, or padding before the text: there the mask matters
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("sdpa_without_mask", sdpa_attention_forward)
    model.set_attn_implementation("sdpa_without_mask")


def store_frozen_weights_in_half_precision(model, precision):
    """Under bf16 (or fp16) autocast every matrix multiplication casts its fp32 weight to 16 bits,
    at every step. For the frozen layers, do it once: the products are exactly the same, the
    weights take half the memory, and each step skips those casts. Embeddings, layer norms and
    everything that is trained stay in fp32."""
    import torch

    from transformers.pytorch_utils import Conv1D

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    for name, module in model.named_modules():
        frozen = not any(p.requires_grad for p in module.parameters())
        if isinstance(module, (torch.nn.Linear, Conv1D)) and frozen and "score" not in name:
            module.to(dtype)


def compile_for_speed(model, device, cuda_graphs=True):
    """At batch 8 on a fast GPU, GPT-2 small is limited by the time Python takes to launch the
    ~1,500 small kernels of each step, not by arithmetic. torch.compile fuses them, and on a GPU
    replays them as CUDA graphs, one launch each. Only the transformer block is compiled: all 12
    share the compiled code. `dynamic=True` compiles once for every review length; a CUDA graph is
    recorded once per padded length. Evaluation runs uncompiled (see LoraTrainer.evaluate). Off by
    default: its speed on a GPU is not measured yet (see README)."""
    import torch

    # The embeddings are frozen under LoRA, so the first block's input would not need a gradient
    # while the others' do, and torch.compile would compile the block twice. Asking for that
    # gradient costs one small extra product in the backward pass and saves a compilation.
    model.enable_input_require_grads()
    blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    for block in blocks:
        block.compile(dynamic=True, mode="reduce-overhead" if device == "cuda" and cuda_graphs else "default")


@contextlib.contextmanager
def adapter_merged(model):
    """Evaluate with the adapter folded into the layers it adapts: W + (alpha / r) * B @ A is one
    matrix, so each adapted layer runs one product, as in the plain model, instead of three, a
    scaling and an addition. Training then goes on from the very same weights: they are copied
    before and put back after, because taking the merge back out by subtraction would not give them
    back exactly."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):  # full fine-tuning: nothing to merge
        yield
        return
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    originals = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()
        for layer, weight in zip(layers, originals):
            layer.get_base_layer().weight.data.copy_(weight)  # in place: compiled code keeps its pointers


def count_parameters(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# training


def make_trainer_class():
    """The Trainer, plus length-grouped batches and a cheap watch for a NaN or infinite loss."""
    import torch
    from transformers import Trainer, TrainerCallback

    class NonFiniteLoss(Exception):
        pass

    class LoraTrainer(Trainer):
        group_by_length = False
        first_bad_step = None
        weights_without_embeddings = None

        def _get_train_sampler(self, train_dataset=None):
            # The Trainer hands over the data set without the columns the model does not take, so
            # read the lengths from the full one (same rows, same order).
            if self.group_by_length and "length" in self.train_dataset.column_names:
                return LengthGroupedSampler(self.train_dataset["length"], self.args.per_device_train_batch_size,
                                            self.args.seed)
            return super()._get_train_sampler(train_dataset)

        def evaluate(self, *args, **kwargs):
            # Evaluating draws from the random number generator (each DataLoader takes a seed from
            # it). Put the generator back afterwards, so that training's random stream (dropout) does
            # not depend on when evaluations happen: a resumed run then continues exactly as an
            # uninterrupted one would.
            state = torch.random.get_rng_state()
            # With TORCH_COMPILE, evaluation (no gradients, batches of 64) would need compilations
            # of its own; at that batch size the GPU is busy enough without them.
            try:
                with torch.compiler.set_stance("force_eager"), adapter_merged(self.model):
                    return super().evaluate(*args, **kwargs)
            finally:
                torch.random.set_rng_state(state)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            # Looking at the loss from Python each step would make the CPU wait for the GPU every
            # step. Instead, remember on the GPU the first step whose loss was not finite, and look
            # only when the Trainer is about to log, evaluate or save anyway.
            # (torch.full, not torch.tensor: copying a number from the CPU to the GPU waits for the GPU.)
            step = torch.full((), self.state.global_step + 1, device=loss.device)
            if self.first_bad_step is None:
                self.first_bad_step = torch.zeros((), dtype=torch.long, device=loss.device)
            bad = (~torch.isfinite(loss.detach())) & (self.first_bad_step == 0)
            self.first_bad_step = torch.where(bad, step, self.first_bad_step)
            return loss

        def floating_point_ops(self, inputs):
            # The Trainer tallies the work done (6 x tokens x weights, `total_flos` in its state) and
            # for that counts the model's weights again at every step: a walk over all ~300 modules,
            # about 0.4 ms of Python per step on a 2-core CPU. The count never changes; take it once.
            if self.weights_without_embeddings is None:
                self.weights_without_embeddings = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs["input_ids"].numel() * self.weights_without_embeddings

    class EpochTimer(TrainerCallback):
        """Seconds spent training in each epoch (the evaluation after it is not counted)."""

        def __init__(self):
            self.seconds, self.started = [], None

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the GPU may still be working on the last steps
            self.seconds.append(time.perf_counter() - self.started)

    class StopOnNonFiniteLoss(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            # Runs before the Trainer saves a checkpoint, so a broken model is never written.
            last = state.global_step >= state.max_steps
            if control.should_log or control.should_evaluate or control.should_save or last:
                bad = self.trainer.first_bad_step
                if bad is not None and int(bad) > 0:
                    raise NonFiniteLoss(int(bad))

    return LoraTrainer, EpochTimer, StopOnNonFiniteLoss, NonFiniteLoss


def compute_metrics(eval_prediction):
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    predictions = logits.argmax(axis=-1)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predictions, average="binary",
                                                               zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1": float(f1),
        "precision": float(precision),
        "recall": float(recall),
        # rows: true negative, true positive; columns: predicted negative, predicted positive
        "confusion_matrix": confusion_matrix(labels, predictions, labels=[0, 1]).tolist(),
    }


def estimate_cpu_time(cfg, model, collator, train, test, precision):
    """Time one real training step here and scale it up: a rough figure, but measured."""
    import torch

    by_length = sorted(range(len(train)), key=train["length"].__getitem__)
    middle = len(by_length) // 2
    rows = [train[i] for i in by_length[max(0, middle - cfg.batch_size // 2):][:cfg.batch_size]]
    batch = collator([{k: row[k] for k in ("input_ids", "attention_mask", "label")} for row in rows])
    batch["labels"] = batch.pop("label") if "label" in batch else batch.pop("labels")
    model.train()

    def step(inputs):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**inputs).loss
        loss.backward()

    step({k: v[:1, :16] if v.dim() == 2 else v[:1] for k, v in batch.items()})  # a first step is always slower
    started = time.perf_counter()
    step(batch)
    seconds = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    steps = math.ceil(len(train) / cfg.batch_size / int(os.environ.get("WORLD_SIZE", "1"))) * cfg.num_epochs
    # An evaluation step needs no backward pass: about a third of a training step per review.
    total = steps * seconds + cfg.num_epochs * len(test) * seconds / len(rows) / 3
    return seconds, total


def human_time(seconds):
    if seconds < 1:
        return "a second"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def check_output_dir(out_dir):
    """Fail before training, not after it, if the results could not be saved."""
    out = Path(out_dir)
    recover_interrupted_save(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out_dir} is a file; give a folder name")
    ours = {"adapter_config.json", "config.json", "results.json", CHECKPOINTS}
    if out.is_dir() and any(out.iterdir()) and not ours & {p.name for p in out.iterdir()}:
        raise UserError(f"--output_dir {out_dir} already holds files that are not a saved model; "
                        f"it would be replaced, so give a new or empty folder")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
        if out.is_dir():
            with tempfile.TemporaryFile(dir=out):
                pass
    except OSError as error:
        raise UserError(f"--output_dir {out_dir} is not writable ({error.strerror}); "
                        f"choose a folder you can write to") from None


def recover_interrupted_save(out):
    """A crash between the two renames of save_atomically leaves the previous folder under a
    hidden name; put it back."""
    if not out.exists():
        for old in sorted(out.parent.glob(f".{out.name}.old-*")):
            os.rename(old, out)
            say(f"Restored {out} from an interrupted save")
            break


def save_atomically(out_dir, write):
    """Write a folder next to `out_dir`, then swap it in: a crash leaves the old folder or the new
    one, never a half-written one."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for path in [tmp, *tmp.rglob("*")]:  # temporary files are private; give them the usual permissions
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def last_complete_checkpoint(folder):
    """The newest checkpoint that was written to the end (the Trainer writes trainer_state.json last)."""
    found = [p for p in Path(folder).glob("checkpoint-*") if (p / "trainer_state.json").exists()
             and p.name.split("-")[-1].isdigit()]
    return str(max(found, key=lambda p: int(p.name.split("-")[-1]))) if found else None


def run_settings(cfg):
    """The settings that must match for a checkpoint to be resumed (not the speed or I/O ones)."""
    keep = ["model_name", "dataset_name", "max_length", "max_train_samples", "lora_r", "lora_alpha", "lora_dropout",
            "target_modules", "full_finetune", "learning_rate", "full_learning_rate", "batch_size",
            "gradient_accumulation_steps", "num_epochs", "seed", "group_by_length"]
    return {k: getattr(cfg, k) for k in keep}


def find_resume_checkpoint(cfg, out_dir):
    folder = Path(out_dir) / CHECKPOINTS
    checkpoint = last_complete_checkpoint(folder) if folder.is_dir() else None
    if checkpoint is None:
        return None
    saved = json.loads((folder / "run_settings.json").read_text()) if (folder / "run_settings.json").exists() else {}
    different = [k for k, v in run_settings(cfg).items() if saved.get(k) != v]
    if not cfg.resume:
        return None
    if different:
        name = different[0]
        raise UserError(f"{folder} holds an interrupted run with other settings (--{name} was {saved.get(name)!r}, "
                        f"now {getattr(cfg, name)!r}); pass --resume false to start over (its checkpoints are "
                        f"deleted) or choose another --output_dir")
    return checkpoint


def train(cfg):
    import torch
    from transformers import TrainingArguments, set_seed

    out_dir = cfg.full_output_dir if cfg.full_finetune else cfg.output_dir
    check_output_dir(out_dir)
    resume_from = find_resume_checkpoint(cfg, out_dir)
    if not resume_from and (Path(out_dir) / CHECKPOINTS).exists() and is_main_process():
        shutil.rmtree(Path(out_dir) / CHECKPOINTS)  # left by an interrupted run that is not being resumed

    device, device_name, precision = pick_device_and_precision(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # The seed fixes the new classification head and the adapter's initial weights, so set it first.
    set_seed(cfg.seed)

    try:
        from transformers import AutoConfig

        tokenizer = load_tokenizer(resolve_model_name(cfg.model_name))
        positions = AutoConfig.from_pretrained(resolve_model_name(cfg.model_name)).max_position_embeddings
    except (OSError, ValueError) as error:
        raise UserError(f"--model_name {cfg.model_name}: could not load it ({first_line(error)}); check the id "
                        f"and your connection, or pass a local folder with the model and its tokenizer") from None
    if cfg.max_length > positions:
        say(f"MAX_LENGTH {cfg.max_length} is more than this model can read; using its maximum, {positions}")
        cfg.max_length = positions
    train_set, test_set = prepare_data(cfg, tokenizer)
    model = load_model(cfg, tokenizer)
    trainable, total = count_parameters(model)
    if cfg.full_finetune:
        say(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    elif is_main_process():
        # For GPT-2 small with r=8 on c_attn: 12 layers x 8 x (768 + 2304) = 294,912 LoRA weights,
        # plus the 768 x 2 = 1,536 weights of the classification head `score`, which is new (the
        # pretrained model has no sentiment head), so it is trained and saved with the adapter.
        model.print_trainable_parameters()

    if precision in ("bf16", "fp16") and not cfg.full_finetune:
        store_frozen_weights_in_half_precision(model, precision)

    attend_without_the_padding_mask(model, tokenizer)
    collator = make_collator(tokenizer, cfg.pad_to_multiple_of)
    per_step = cfg.batch_size * world * cfg.gradient_accumulation_steps  # reviews per optimizer update
    steps_per_epoch = math.ceil(len(train_set) / per_step)
    learning_rate = cfg.full_learning_rate if cfg.full_finetune else cfg.learning_rate
    compiled = ", torch.compile" + (" with CUDA graphs" if device == "cuda" else "") if cfg.torch_compile else ""
    say(f"Device: {device} ({device_name}), precision {precision}{compiled}{f', {world} processes' if world > 1 else ''}")
    say(f"Training on {len(train_set):,} reviews, evaluating on {len(test_set):,}; "
        f"{cfg.num_epochs} epoch{'s' if cfg.num_epochs != 1 else ''} x {steps_per_epoch:,} steps of {per_step} "
        f"reviews = {steps_per_epoch * cfg.num_epochs:,} steps, learning rate {learning_rate:g}")
    if device == "cpu" and is_main_process() and not resume_from:
        step_seconds, total_seconds = estimate_cpu_time(cfg, model, collator, train_set, test_set, precision)
        step = f"about {step_seconds:.1f} s" if step_seconds >= 0.05 else "under 0.1 s"
        # Suggest a quick run, unless this one is no bigger than that already.
        quick = {"max_train_samples": 2000, "max_eval_samples": 500, "num_epochs": 1, "max_length": 256}
        this_run = {"max_train_samples": len(train_set), "max_eval_samples": len(test_set),
                    "num_epochs": cfg.num_epochs, "max_length": cfg.max_length}
        flags = "".join(f" --{name} {value}" for name, value in quick.items())
        hint = f" For a quick run:{flags}" if any(this_run[k] > v for k, v in quick.items()) else ""
        say(f"No GPU found: training runs on the CPU. One step takes {step} here, so this run "
            f"needs roughly {human_time(total_seconds)}.{hint}")

    if cfg.torch_compile:
        compile_for_speed(model, device)

    args = TrainingArguments(
        output_dir=str(Path(out_dir) / CHECKPOINTS),
        per_device_train_batch_size=cfg.batch_size,
        # On a GPU a big evaluation batch keeps the GPU busy; on a CPU it only thrashes the caches.
        per_device_eval_batch_size=cfg.eval_batch_size or (64 if device == "cuda" else cfg.batch_size),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_epochs,
        learning_rate=learning_rate,
        eval_strategy="epoch",
        save_strategy="steps" if cfg.save_steps else "epoch",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        # The Trainer would check the loss for NaN at every step, making the CPU wait for the GPU;
        # LoraTrainer watches for it without waiting.
        logging_nan_inf_filter=False,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=cfg.seed,
        # Worker processes prepare the next batches while the GPU computes; on the CPU they would
        # only compete with the training for the same cores.
        dataloader_num_workers=2 if device == "cuda" else 0,
        dataloader_persistent_workers=device == "cuda",  # not restarted at every epoch and evaluation
        dataloader_pin_memory=device == "cuda",
        # Copy each batch to the GPU without waiting for the copy (from pinned memory that is safe).
        accelerator_config={"non_blocking": device == "cuda"},
        # Under torchrun on machines without a GPU the processes talk over gloo; say so explicitly,
        # or each process would train alone on the whole data set.
        use_cpu=device == "cpu",
        ddp_find_unused_parameters=False,  # every trainable weight gets a gradient at every step
        ddp_backend="gloo" if device == "cpu" and world > 1 else None,
        report_to="none",
    )
    LoraTrainer, EpochTimer, StopOnNonFiniteLoss, NonFiniteLoss = make_trainer_class()
    trainer = LoraTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=test_set,
                          processing_class=tokenizer, data_collator=collator, compute_metrics=compute_metrics)
    trainer.group_by_length = cfg.group_by_length
    trainer.add_callback(StopOnNonFiniteLoss(trainer))
    epoch_timer = EpochTimer()
    trainer.add_callback(epoch_timer)
    if is_main_process():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "run_settings.json").write_text(json.dumps(run_settings(cfg), indent=2))
    if resume_from:
        say(f"Resuming from {resume_from} (step {resume_from.split('-')[-1]}); pass --resume false to start over")

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    previous_sigterm = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        output = trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        close_progress_bars(trainer)
        checkpoint = last_complete_checkpoint(args.output_dir)
        where = f"the last checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved yet"
        raise UserError(f"Training stopped at step {trainer.state.global_step}; {where}. Run the same command "
                        f"again to resume") from None
    except NonFiniteLoss as error:
        close_progress_bars(trainer)
        raise UserError(
            f"The training loss became NaN or infinite at step {error.args[0]}, so nothing was saved. Lower the "
            f"learning rate (now {learning_rate:g}); with --precision fp16 it can also be an overflow, "
            f"use bf16 or fp32") from None
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)

    evaluations = [log for log in trainer.state.log_history if "eval_accuracy" in log]
    if evaluations and evaluations[-1].get("step") == trainer.state.global_step:
        metrics = evaluations[-1]
    else:  # resumed after the last evaluation
        metrics = trainer.evaluate()
    train_seconds = sum(epoch_timer.seconds)
    results = {
        "method": "full" if cfg.full_finetune else "lora",
        **{k: metrics[f"eval_{k}"] for k in ("accuracy", "f1", "precision", "recall", "confusion_matrix")},
        "eval_loss": metrics["eval_loss"],
        "train_loss": output.training_loss,
        "trainable_params": trainable,
        "all_params": total,
        "trainable_percent": 100 * trainable / total,
        "train_samples": len(train_set),
        "eval_samples": len(test_set),
        # Time in training steps, without the evaluations that run after each epoch.
        "train_seconds": train_seconds,
        "epoch_seconds": epoch_timer.seconds,  # the first includes warm-up (and compiling, if on)
        "train_samples_per_second": len(train_set) * cfg.num_epochs / train_seconds if not resume_from else None,
        "eval_samples_per_second": metrics.get("eval_samples_per_second"),
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
        "peak_process_memory_gb": peak_process_memory_gb(),
        "device": device_name,
        "training_precision": precision,
        "processes": world,
        "config": vars(cfg),
    }
    if resume_from:
        results["resumed_from_step"] = int(resume_from.split("-")[-1])

    if trainer.is_world_process_zero():
        model_to_save = trainer.accelerator.unwrap_model(trainer.model)

        def write(folder):
            model_to_save.save_pretrained(folder)  # LoRA: only the adapter and `score`, as safetensors
            tokenizer.save_pretrained(folder)
            (folder / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
            weights = folder / ("model.safetensors" if cfg.full_finetune else "adapter_model.safetensors")
            results["adapter_size_mb"] = weights.stat().st_size / 1e6
            (folder / "results.json").write_text(json.dumps(results, indent=2))

        save_atomically(out_dir, write)  # also removes the checkpoints of this run: it is complete
        print_summary(results, out_dir)
    trainer.accelerator.wait_for_everyone()
    return results


def close_progress_bars(trainer):
    """Close the Trainer's progress bars, so that the message that follows gets a line of its own."""
    for callback in trainer.callback_handler.callbacks:
        for bar in ("prediction_bar", "training_bar"):
            if getattr(callback, bar, None) is not None:
                getattr(callback, bar).close()
                setattr(callback, bar, None)


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def peak_process_memory_gb():
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes on macOS, KiB on Linux


def print_summary(results, out_dir):
    cm = results["confusion_matrix"]
    rows = [
        ("accuracy", f"{results['accuracy']:.4f}"),
        ("F1 / precision / recall", f"{results['f1']:.4f} / {results['precision']:.4f} / {results['recall']:.4f}"),
        ("confusion matrix", f"true neg {cm[0][0]}, false pos {cm[0][1]}, false neg {cm[1][0]}, true pos {cm[1][1]}"),
        ("trainable parameters", f"{results['trainable_params']:,} of {results['all_params']:,} "
                                 f"({results['trainable_percent']:.2f}%)"),
        ("training time", f"{results['train_seconds']:.1f} s" + (
            f" ({results['train_samples_per_second']:.1f} reviews/s)" if results["train_samples_per_second"] else "")),
        ("peak GPU memory", f"{results['peak_gpu_memory_gb']:.2f} GB" if results["peak_gpu_memory_gb"] else "n/a (no GPU)"),
        ("saved", f"{out_dir} ({results['adapter_size_mb']:.2f} MB of weights)"),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n" + "\n".join(f"{name:<{width}}  {value}" for name, value in rows), flush=True)


# -----------------------------------------------------------------------------
# using what was saved: predict, several adapters on one base, merge


def load_saved_model(folder):
    """An adapter folder (as saved above) or a plain model folder, ready for inference."""
    import torch

    folder = Path(folder)
    if (folder / "adapter_config.json").exists():
        from peft import AutoPeftModelForSequenceClassification

        tokenizer = load_tokenizer(str(folder))
        # Loads the base model named in adapter_config.json, then the adapter and `score` on top.
        with quiet_loading():
            model = AutoPeftModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id  # the base model's config does not know it
    elif (folder / "config.json").exists():
        from transformers import AutoModelForSequenceClassification

        tokenizer = load_tokenizer(str(folder))
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32)
    elif not folder.exists():
        raise UserError(f"{folder} does not exist; train an adapter first (python {Path(__file__).name}) "
                        f"or point --output_dir at the folder you trained into")
    else:
        raise UserError(f"{folder} holds no saved adapter or model; train one first (python {Path(__file__).name}) "
                        f"or point --output_dir at the folder you trained into")
    return without_cache(model).eval(), tokenizer


def classify(model, tokenizer, texts, max_length, batch_size=32):
    """The model's two logits (negative, positive) for each text, as a float tensor."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    max_length = min(max_length, model.config.max_position_embeddings)  # longer texts are cut, never fail
    model.to(device)
    logits = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length,
                              padding=True, return_tensors="pt").to(device)
            logits.append(model(**batch).logits.float().cpu())
    return torch.cat(logits)


def shorten(text, width=60):
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def predict(cfg, texts, adapter_dirs=None):
    kept = [t for t in texts if t.strip()]
    folders = adapter_dirs or [cfg.full_output_dir if cfg.full_finetune else cfg.output_dir]
    columns = {}
    if adapter_dirs:
        model, tokenizer = load_adapters_on_one_base(adapter_dirs)
        for name in model.peft_config:
            model.set_adapter(name)  # switching adapters is instant: the base weights stay in place
            columns[name] = classify(model, tokenizer, kept, cfg.max_length) if kept else None
    else:
        model, tokenizer = load_saved_model(folders[0])
        columns[Path(folders[0]).name] = classify(model, tokenizer, kept, cfg.max_length) if kept else None

    names = list(columns)
    header = "  ".join(f"{n[:18]:<18}" for n in names)
    print(f"{header}  text")
    row = 0
    for text in texts:
        if not text.strip():
            cells = "  ".join(f"{'skipped':<18}" for _ in names)
            print(f"{cells}  (empty text: nothing to classify)")
            continue
        cells = []
        for name in names:
            p = columns[name][row].softmax(-1)
            label = int(p.argmax())
            cells.append(f"{LABELS[label] + f' {p[label]:.3f}':<18}")
        print(f"{'  '.join(cells)}  {shorten(text)}")
        row += 1
    if len(kept) < len(texts):
        print(f"Skipped {len(texts) - len(kept)} empty or whitespace-only text(s).")
    return columns


def load_adapters_on_one_base(adapter_dirs):
    import torch
    from peft import PeftConfig, PeftModel

    configs = []
    for folder in adapter_dirs:
        if not (Path(folder) / "adapter_config.json").exists():
            raise UserError(f"--adapters: {folder} holds no adapter (adapter_config.json); train one first")
        configs.append(PeftConfig.from_pretrained(folder))
    bases = {c.base_model_name_or_path for c in configs}
    if len(bases) > 1:
        raise UserError(f"--adapters were trained on different base models ({', '.join(sorted(bases))}); "
                        f"adapters can share a base only if they were trained on the same one")
    names = []
    for folder in adapter_dirs:
        name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(folder).resolve().name)
        while name in names:
            name += "_"
        names.append(name)
    tokenizer = load_tokenizer(adapter_dirs[0])
    base = load_base_model(configs[0].base_model_name_or_path, tokenizer)
    # The base model is loaded once; each adapter adds only its own small weights under its name.
    model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name=names[0])
    for folder, name in zip(adapter_dirs[1:], names[1:]):
        model.load_adapter(folder, adapter_name=name)
    model.to(torch.float32)
    return model.eval(), tokenizer


def merge(cfg):
    from transformers import AutoModelForSequenceClassification

    source = Path(cfg.output_dir)
    target = Path(cfg.output_dir + "-merged")
    if not (source / "adapter_config.json").exists():
        raise UserError(f"{source} holds no adapter to merge; train one first (python {Path(__file__).name})")
    check_output_dir(target)
    model, tokenizer = load_saved_model(source)
    before = classify(model, tokenizer, MERGE_CHECK_TEXTS, cfg.max_length)
    # W + (alpha / r) * B @ A is computed once and written into W: the result is a plain GPT-2 with
    # no adapter layers, as fast as the base model, but a full copy of the weights for every task.
    merged = model.merge_and_unload()

    def write(folder):
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    save_atomically(target, write)
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(target)).eval()
    after = classify(reloaded, tokenizer, MERGE_CHECK_TEXTS, cfg.max_length)
    difference = (before - after).abs().max().item()
    size = (target / "model.safetensors").stat().st_size / 1e6
    print(f"Merged {source} into {target} ({size:.1f} MB); it loads with AutoModelForSequenceClassification alone.")
    print(f"Largest difference between the logits of the adapter and of the merged model on "
          f"{len(MERGE_CHECK_TEXTS)} texts: {difference:.2e}")
    return difference


# -----------------------------------------------------------------------------
# LoRA vs full fine-tuning, measured in one run


def compare(cfg, argv):
    import subprocess

    # Each method trains in its own process, so that its peak memory is its own.
    forwarded = [a for a in argv if a != "--compare"]
    results = {}
    for method, flag in (("lora", "false"), ("full", "true")):
        say(f"\n===== {method}: python {Path(__file__).name} {' '.join(forwarded)} --full_finetune {flag} =====")
        done = subprocess.run([sys.executable, __file__, *forwarded, "--full_finetune", flag])
        if done.returncode != 0:
            raise UserError(f"the {method} run failed (exit status {done.returncode}); see its message above")
        folder = cfg.full_output_dir if method == "full" else cfg.output_dir
        results[method] = json.loads((Path(folder) / "results.json").read_text())
    table = comparison_table(results)
    Path("comparison.md").write_text(table + "\n")
    Path("comparison.json").write_text(json.dumps(results, indent=2))
    print("\n" + table + "\n\nWritten to comparison.md and comparison.json")
    return results


def comparison_table(results):
    lora, full = results["lora"], results["full"]

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "n/a"

    def number(x):  # a resumed run cannot say how fast the whole of it was
        return f"{x:.1f}" if x is not None else "n/a (resumed)"

    gpu = lora["peak_gpu_memory_gb"] is not None
    rows = [
        ("trainable parameters", f"{lora['trainable_params']:,} ({lora['trainable_percent']:.2f}%)",
         f"{full['trainable_params']:,} ({full['trainable_percent']:.2f}%)",
         ratio(full["trainable_params"], lora["trainable_params"])),
    ]
    if gpu:
        rows.append(("peak GPU memory", f"{lora['peak_gpu_memory_gb']:.2f} GB", f"{full['peak_gpu_memory_gb']:.2f} GB",
                     ratio(full["peak_gpu_memory_gb"], lora["peak_gpu_memory_gb"])))
    else:
        rows.append(("peak GPU memory", "n/a on CPU", "n/a on CPU", "n/a"))
    if lora["peak_process_memory_gb"] is not None:
        rows.append(("peak process memory", f"{lora['peak_process_memory_gb']:.2f} GB",
                     f"{full['peak_process_memory_gb']:.2f} GB",
                     ratio(full["peak_process_memory_gb"], lora["peak_process_memory_gb"])))
    rows += [
        ("training time", f"{lora['train_seconds']:.1f} s", f"{full['train_seconds']:.1f} s",
         ratio(full["train_seconds"], lora["train_seconds"])),
        ("training samples/s", number(lora["train_samples_per_second"]), number(full["train_samples_per_second"]),
         ratio(full["train_samples_per_second"], lora["train_samples_per_second"])),
        ("accuracy", f"{lora['accuracy']:.4f}", f"{full['accuracy']:.4f}", ratio(full["accuracy"], lora["accuracy"])),
        ("F1", f"{lora['f1']:.4f}", f"{full['f1']:.4f}", ratio(full["f1"], lora["f1"])),
        ("saved weights on disk", f"{lora['adapter_size_mb']:.2f} MB", f"{full['adapter_size_mb']:.1f} MB",
         ratio(full["adapter_size_mb"], lora["adapter_size_mb"])),
    ]
    cfg = lora["config"]
    head = (f"{lora['device']}, {lora['training_precision']}; model {cfg['model_name']}; {lora['train_samples']:,} train / "
            f"{lora['eval_samples']:,} eval reviews, {cfg['num_epochs']} epoch(s), batch {cfg['batch_size']}, "
            f"max length {cfg['max_length']}")
    lines = [head, "", "| | LoRA | full fine-tuning | full / LoRA |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {a} | {b} | {r} |" for name, a, b, r in rows]
    return "\n".join(lines)


# -----------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg, args = parse_args(argv)
        if args.predict:
            predict(cfg, args.predict, args.adapters)
        elif args.merge:
            merge(cfg)
        elif args.compare:
            compare(cfg, argv)
        else:
            train(cfg)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
