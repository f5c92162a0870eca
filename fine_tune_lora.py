r"""
Fine-tune GPT-2 small to tell positive from negative IMDB movie reviews, training only a LoRA
adapter (about 0.24% of the weights) with PEFT and the Hugging Face Trainer.

    python fine_tune_lora.py                                    # train, evaluate, save ./gpt2-imdb-lora
    python fine_tune_lora.py --max_train_samples 2000 --max_eval_samples 500 --num_epochs 1 \
        --max_length 256 --learning_rate 1e-3                   # a quick run: under half an hour on a CPU
    python fine_tune_lora.py --predict "A wonderful film." "Two hours I will never get back."
    python fine_tune_lora.py --predict "Great fun." --adapters ./gpt2-imdb-lora ./gpt2-imdb-lora-r16
    python fine_tune_lora.py --merge                            # fold the adapter into a plain model
    python fine_tune_lora.py --compare                          # LoRA vs full fine-tuning, measured
    torchrun --nproc_per_node 2 fine_tune_lora.py               # data-parallel on 2 GPUs

Every constant below can be set from the command line as --lowercase_name VALUE
(--lora_r 16, --target_modules c_attn c_proj, --max_train_samples none); --help lists them all.
The lesson is fine_tune(), in six numbered steps; nothing below the fence is needed to learn LoRA.
"""
import argparse
import ast
import builtins
import contextlib
import difflib
import errno
import hashlib
import importlib.metadata
import json
import math
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import typing
import warnings
from pathlib import Path
from types import SimpleNamespace

try:
    import resource  # the peak memory of the process, for results.json; not on Windows
except ImportError:
    resource = None

def check_versions(needed={"torch": "2.11", "transformers": "5.18", "datasets": "5.2", "peft": "0.21", "accelerate": "1.15"}):
    """Old releases fail late (transformers 4 after tokenizing): name all before they load (require_version can't)."""
    if sys.version_info < (3, 10):
        sys.exit(f"error: this script needs Python 3.10 or newer, as transformers 5 does; this is {sys.version.split()[0]}")
    old = {}
    for name, minimum in needed.items():
        try:
            found = f"found {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            found = "not installed"
        if [int(n) for n in re.findall(r"\d+", found)[:2]] < [int(n) for n in minimum.split(".")]:
            old[f"{name}>={minimum}"] = f"{name} >= {minimum} ({found})"
    if old:
        sys.exit(f"error: this script needs {', '.join(old.values())}; run: pip install -U "
                 + " ".join(f'"{requirement}"' for requirement in old))

check_versions()
if __name__ == "__main__":  # Ctrl-C while the libraries load: one line, no traceback (main() takes over after)
    sigint_before = signal.signal(signal.SIGINT, lambda *_: sys.exit("error: Stopped while loading the libraries; "
                                                                     "nothing was done."))

import datasets
import filelock
import huggingface_hub
import pyarrow.compute
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from peft import AutoPeftModelForSequenceClassification, LoraConfig, PeftConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from tqdm.std import tqdm
from transformers import (AttentionInterface, AutoModelForSequenceClassification, AutoTokenizer,
                          DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments, pipeline, set_seed)
from transformers import integrations as hf_integrations
from transformers.activations import GELUTanh, NewGELUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.pytorch_utils import Conv1D
from transformers.trainer_pt_utils import DistributedLengthGroupedSampler
from transformers.utils import logging as hf_logging


# -----------------------------------------------------------------------------
# settings: edit them here, or pass --lowercase_name VALUE
# model and data
MODEL_NAME: str = "gpt2"  # Hub id or local folder; "gpt2-medium" has 355M weights instead of 124M: ~3x the compute
DATASET_NAME: str = "imdb"  # Hub id, or a local folder: aclImdb layout, or train.*/test.* as parquet, csv or jsonl
MAX_LENGTH: int = 512  # tokens kept per review; IMDB's median review is 222 tokens, 14% are over 512, 41% over 256
TRUNCATION: str = "end"  # which tokens a longer review keeps: "end" (where verdicts often are), "start", "start+end"
EVAL_MAX_LENGTH: int | None = None  # tokens read per review to evaluate, and by --predict; None: as MAX_LENGTH
MAX_TRAIN_SAMPLES: int | None = None  # None = all 25,000; a random 2000 makes a quick run
MAX_EVAL_SAMPLES: int | None = None  # None = all 25,000; with 1000, accuracy near 90% is known to about +-2 points
# LoRA
LORA_R: int = 8  # rank of the update; 4-16 is typical: it sets the adapter's size (in a short run, not its accuracy)
LORA_ALPHA: int = 16  # the update is scaled by alpha / r; keep alpha = 2 * r when you change r
LORA_DROPOUT: float = 0.05  # dropout on the adapter's input; 0.0-0.1
TARGET_MODULES: list = ["c_attn"]  # GPT-2 layers to adapt (c_attn: query, key, value); more: c_proj c_fc, all-linear
LORA_TOP_BLOCKS: int | None = None  # None: every block gets adapters; 6: only the top 6 (the backward pass stops there)
USE_DORA: bool = False  # True: DoRA, which also trains each adapted weight's magnitude (its length)
# training
LEARNING_RATE: float = 3e-4  # for the adapter; 1e-4 to 1e-3 is usual for LoRA (higher for short runs), too high diverges
BATCH_SIZE: int = 8  # reviews per step on each GPU; halve it (and double the next line) if you run out of memory
GRADIENT_ACCUMULATION_STEPS: int = 1  # steps summed per update: effective batch = BATCH_SIZE * this * GPUs
NUM_EPOCHS: int = 3  # passes over the training set
SEED: int = 42  # same seed, same data order and initial adapter: the run is repeatable
OUTPUT_DIR: str = "./gpt2-imdb-lora"  # adapter, tokenizer and results.json; checkpoints go to OUTPUT_DIR/checkpoints
# full fine-tuning, to compare with LoRA
FULL_FINETUNE: bool = False  # True trains every weight instead of an adapter and saves the whole model
FULL_LEARNING_RATE: float = 5e-5  # for full fine-tuning: all 124M pretrained weights move, so steps must be ~10x smaller
FULL_OUTPUT_DIR: str = "./gpt2-imdb-full"  # where --full_finetune saves the whole model


# -----------------------------------------------------------------------------
# advanced: how fast and how safely the same training runs
# speed (batches hold the same reviews, the loss and schedule are unchanged)
PRECISION: str = "auto"  # "auto": bf16 where the GPU or CPU has it in hardware, else fp16 on a GPU, fp32 on a CPU or Mac
PAD_TO_MULTIPLE_OF: int = 8  # pad each batch to its longest review, rounded up to this; = MAX_LENGTH pads all to the max
GROUP_BY_LENGTH: bool = True  # put reviews of similar length in the same batch, so little of each batch is padding
EVAL_BATCH_SIZE: int | None = None  # None: 64 on a GPU (no backward pass, so room for more), BATCH_SIZE on a CPU
TORCH_COMPILE: bool = False  # True: compile each transformer block, CUDA graphs on a GPU (pad to 64 there: fewer graphs)
CUDA_GRAPHS: bool = False  # True: on a CUDA GPU, each LoRA training step of GPT-2 replayed as recorded CUDA graphs
# reliability
RESUME: bool = True  # an interrupted run continues from its last checkpoint when started again with the same settings
SAVE_STEPS: int = 100  # checkpoint every this many steps (LoRA's are ~4 MB; full fine-tuning's ~1.5 GB, so 10x fewer)
SAVE_MINUTES: int = 10  # and whenever this many minutes pass without one, so that a slow run always has a recent one
SAVE_TOTAL_LIMIT: int = 2  # checkpoints kept; an interrupted run resumes from the last one
LOGGING_STEPS: int = 50  # print the training loss every this many steps
REPORT_TO: str = "none"  # also send the logs to a tracker: "tensorboard" (pip install tensorboard), "wandb", "trackio"...
# -----------------------------------------------------------------------------

CONSTANTS = [name for name in list(globals()) if name.isupper() and not name.startswith("_")]
LABELS = ["negative", "positive"]  # IMDB's label 0 and 1
ID2LABEL, LABEL2ID = dict(enumerate(LABELS)), {label: i for i, label in enumerate(LABELS)}

# get_peft_model reads an attribute transformers 5 deprecates: a notice about the libraries, not about this script.
KNOWN_LIBRARY_WARNINGS = ".*is_gradient_checkpointing.*"
warnings.filterwarnings("ignore", message=KNOWN_LIBRARY_WARNINGS)


# -----------------------------------------------------------------------------
# the lesson: fine-tune GPT-2 with a LoRA adapter, in six steps

def fine_tune(cfg):
    """Train GPT-2 on IMDB with a LoRA adapter (or all its weights, with --full_finetune), evaluate
    it and save it. What is not part of the lesson is a one-line call into the code below the fence."""
    setup = prepare_run(cfg)  # where to save, a checkpoint to resume from, the device and precision
    set_seed(cfg.seed)  # the same seed gives the same new head, adapter, data order and dropout

    # 1. Load GPT-2 and its tokenizer
    with loading("--model_name", cfg.model_name):
        # The end of a review too long to read whole is cut off, or its start: TRUNCATION (step 3), saved with it
        tokenizer = AutoTokenizer.from_pretrained(cfg.model_name,
                                                  truncation_side="left" if cfg.truncation == "end" else "right")
        # GPT-2 with a new two-class head, in float32 to train (else transformers 5 keeps the saved dtype, bf16 for some)
        model, loading_info = AutoModelForSequenceClassification.from_pretrained(
            cfg.model_name, num_labels=2, id2label=ID2LABEL, label2id=LABEL2ID, dtype=torch.float32,
            output_loading_info=True)  # which weights were not in the checkpoint: the new head, `score` on GPT-2
    # GPT-2 was trained without padding, so it has no pad token, and batches need one. The end-of-text
    # token will do: it goes after each review, where no real token attends to it. The model must know
    # it too: it classifies a review from its last token that is not padding, found by this id.
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    # LoRA targets the model has; the tokens read per review to train and to evaluate (MAX_LENGTH, EVAL_MAX_LENGTH)
    max_length, eval_length = check_model_settings(cfg, model)

    # 2. Add a LoRA adapter
    if not cfg.full_finetune:  # (--full_finetune trains all the weights instead, to compare)
        lora_config = LoraConfig(
            task_type="SEQ_CLS",  # sequence classification
            # GPT-2 has no sentiment head: the new one, `score`, is trained and saved too (as is any other new weight)
            modules_to_save=new_modules(model, loading_info),
            r=cfg.lora_r,  # each adapted weight W becomes W + (alpha / r) * B @ A, with A: r x in, B: out x r
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules,  # c_attn computes each block's queries, keys and values
            fan_in_fan_out=is_conv1d(model, cfg.target_modules),  # GPT-2's Conv1D layers store W transposed
            layers_to_transform=top_blocks(model, cfg.lora_top_blocks),  # None: the layers of every block
            use_dora=cfg.use_dora,  # DoRA (Liu et al., 2024) adapts each weight's direction and length apart
        )
        model = get_peft_model(model, lora_config)  # freezes GPT-2: only A, B and `score` are trained
        # GPT-2 small, r = 8 on c_attn: 12 blocks x 8 x (768 + 2,304) + 768 x 2 for `score` = 296,448
        model.print_trainable_parameters()

    # 3. Tokenize the reviews
    train_set, test_set = load_reviews(cfg)  # IMDB or a local folder, checked; random subsets if asked

    def tokenize(batch, max_length):
        # Cut to max_length tokens but not padded: each batch is padded later, to its longest review.
        if cfg.truncation == "start+end":  # not a tokenizer option: the first quarter of the tokens, then the end
            return start_and_end(tokenizer, batch["text"], max_length)
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    # new_fingerprint names the result in datasets' cache; without it datasets would hash `tokenize`, slowly
    train_set = train_set.map(tokenize, batched=True, remove_columns=["text"], fn_kwargs={"max_length": max_length},
                              new_fingerprint=cache_name(train_set, tokenizer, max_length, cfg.truncation))
    test_set = test_set.map(tokenize, batched=True, remove_columns=["text"], fn_kwargs={"max_length": eval_length},
                            new_fingerprint=cache_name(test_set, tokenizer, eval_length, cfg.truncation))

    # 4. Train with the Trainer
    speed_up(model, tokenizer, cfg, setup)  # the same computation in less time and memory
    args = TrainingArguments(
        output_dir=setup.checkpoints,  # checkpoints of the run in progress, deleted once it is saved
        num_train_epochs=cfg.num_epochs,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        # AdamW, with the learning rate decaying linearly to 0. Full fine-tuning moves the pretrained
        # weights themselves, and wants steps about ten times smaller than a new adapter does.
        learning_rate=cfg.full_learning_rate if cfg.full_finetune else cfg.learning_rate,
        eval_strategy="epoch",  # accuracy on the test reviews after every epoch
        logging_steps=cfg.logging_steps,
        **checkpoint_arguments(cfg),  # a checkpoint every SAVE_STEPS steps, the last SAVE_TOTAL_LIMIT kept
        seed=cfg.seed,
        report_to=cfg.report_to,  # "none", or a tracker that shows the curves live
        **hardware_arguments(cfg, setup),  # precision, data loading and evaluation batches, several processes
    )
    trainer = FastTrainer(  # transformers' Trainer, with the speed-ups defined below the fence
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=test_set,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=cfg.pad_to_multiple_of),
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=logits_only,  # (T5 returns its encoder's states beside the logits)
    )
    describe_run(cfg, setup, trainer)  # the device and steps and, on a CPU, how long it will take
    watch_training(cfg, setup, trainer)  # checkpoints on time too, a stop on a NaN loss
    trained = trainer.train(resume_from_checkpoint=setup.resume_from)  # Ctrl-C: a rerun resumes

    # 5. Evaluate on the test reviews
    metrics = trainer.evaluate()
    results = collect_results(cfg, setup, trainer, trained, metrics)

    # 6. Save the adapter
    if trainer.is_world_process_zero():  # with several processes, the first one saves

        def save(folder):
            model.save_pretrained(folder)  # LoRA: only the adapter and `score`, 1.2 MB for GPT-2 small
            tokenizer.save_pretrained(folder)
            save_results(folder, results, trainer)  # results.json, a model card, the training curves

        save_atomically(setup.out_dir, save)  # never a half-written folder; the checkpoints go with the old one
        print_summary(setup.out_dir)
    trainer.accelerator.wait_for_everyone()
    return results

def logits_only(logits, labels):  # each evaluation batch's logits, all that compute_metrics needs kept
    return logits[0] if isinstance(logits, tuple) else logits

def compute_metrics(eval_prediction):
    """Accuracy, F1, precision, recall and the confusion matrix, with scikit-learn: evaluate.load()
    would download a metric script from the Hub at run time, and fail offline."""
    labels, predictions = eval_prediction.label_ids, eval_prediction.predictions.argmax(axis=-1)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predictions, average="binary", zero_division=0)
    true_negatives, false_positives, false_negatives, true_positives = confusion_matrix(
        labels, predictions, labels=[0, 1]).ravel().tolist()
    return {"accuracy": float(accuracy_score(labels, predictions)), "f1": float(f1), "precision": float(precision),
            "recall": float(recall), "true_negatives": true_negatives, "false_positives": false_positives,
            "false_negatives": false_negatives, "true_positives": true_positives}


# -----------------------------------------------------------------------------
# using what was saved: predict, several adapters on one base model, merge; LoRA vs full fine-tuning

def load_saved_model(folder):
    """An adapter folder (as fine_tune saves it) or a whole model folder, ready to classify."""
    folder = Path(folder)
    adapter = (folder / "adapter_config.json").exists()
    if not adapter and not (folder / "config.json").exists():
        raise UserError(nothing_saved(folder, "saved adapter or model"))
    if adapter:  # the base model is loaded from where it was when the adapter was trained
        base = PeftConfig.from_pretrained(folder).base_model_name_or_path
        if looks_like_a_path(base) and not Path(base).exists():
            raise UserError(f"{folder} is an adapter for the model in {base}, which is not there any more; put "
                            f"it back, or set base_model_name_or_path in {folder / 'adapter_config.json'} to where it is")
        check_hub_reachable(base)
    with loading("--output_dir", folder):
        tokenizer = AutoTokenizer.from_pretrained(folder)  # with the pad token the lesson gave it
        # An adapter loads the base model named in adapter_config.json, then the adapter and `score` on
        # top. The base model's config knows nothing of this task: its labels and pad token are given here.
        model_class = AutoPeftModelForSequenceClassification if adapter else AutoModelForSequenceClassification
        model = model_class.from_pretrained(folder, dtype=torch.float32, pad_token_id=tokenizer.pad_token_id,
                                            id2label=ID2LABEL, label2id=LABEL2ID)
    model.config.use_cache = False  # a classifier needs no copies of the keys and values (see speed_up)
    return model.eval(), tokenizer

def nothing_saved(folder, what):
    """Why `folder` has no `what` to use, and what to do about it."""
    if any((folder / "checkpoints").glob("checkpoint-*")):
        return f"{folder} holds only the checkpoints of an unfinished run; run its training command again to finish it"
    if (folder / "config.json").exists():  # fully fine-tuned, or merged
        return f"{folder} holds a whole model, not a LoRA {what}; --predict --output_dir {folder} classifies with it"
    return (f"{folder} {f'holds no {what}' if folder.exists() else 'does not exist'}; train one first (python "
            f"{Path(__file__).name}) or point --output_dir at the folder you trained into")

def classify(model, tokenizer, texts, max_length, truncation=None):
    """Each text's probabilities (negative, positive), by transformers' text-classification pipeline; a text
    longer than max_length keeps the tokens TRUNCATION says, as in training (None: the end the tokenizer cuts)."""
    max_length = min(max_length, max_positions(model))
    if truncation == "start+end":  # not a tokenizer option, so not the pipeline's: the model reads the kept tokens
        rows = []
        for i in range(0, len(texts), 32):
            batch = tokenizer.pad(start_and_end(tokenizer, texts[i:i + 32], max_length), return_tensors="pt")
            with torch.no_grad():
                rows.append(model(**batch.to(model.device)).logits.float().softmax(-1).cpu())
        return torch.cat(rows)
    if truncation:
        tokenizer.truncation_side = "left" if truncation == "end" else "right"
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None,
                          device="cuda" if torch.cuda.is_available() else "cpu")
    rows = classifier(texts, truncation=True, max_length=max_length, batch_size=32)
    return torch.tensor([[next(r["score"] for r in row if r["label"] == label) for label in LABELS] for row in rows])

def reading(folder, cfg):
    """How many tokens of each review --predict reads with the model in `folder`, and which: as its evaluation
    did (its results.json), or EVAL_MAX_LENGTH of them if one is given."""
    done = read_json(Path(folder) / "results.json")
    length = cfg.eval_max_length or done.get("eval_max_length") or done.get("max_length") or cfg.max_length
    return length, done.get("config", {}).get("truncation", "start")

def predict(cfg, texts, adapter_dirs=None):
    """Print a row per text: the label and its probability, for each model (a column each)."""
    adapter_dirs = [os.path.expanduser(folder) for folder in adapter_dirs or []]  # quoted, "~/a" is not expanded
    folders = adapter_dirs or [output_dir(cfg)]
    for folder in adapter_dirs:
        if not (Path(folder) / "adapter_config.json").exists():
            raise UserError("--adapters: " + nothing_saved(Path(folder), "adapter"))
    if adapter_dirs and len(bases := {PeftConfig.from_pretrained(f).base_model_name_or_path for f in adapter_dirs}) > 1:
        raise UserError(f"--adapters were trained on different base models ({', '.join(sorted(bases))}); "
                        f"adapters can share a base only if they were trained on the same one")
    model, tokenizer = load_saved_model(folders[0])
    for i, folder in enumerate(folders[1:], 1):
        model.load_adapter(folder, adapter_name=str(i))  # on the same base: only the adapter's small weights
    kept, columns = [text for text in texts if text.strip()], []
    for i in range(len(folders)):
        if len(folders) > 1:
            model.set_adapter(str(i) if i else "default")  # instant: the base weights stay in place
        columns.append(classify(model, tokenizer, kept, *reading(folders[i], cfg)) if kept else [])
    widths = [max(18, len(str(folder))) for folder in folders]  # each folder as given: two may share a name

    def line(cells, text):
        return "  ".join(f"{cell:<{width}}" for cell, width in zip(cells, widths)) + "  " + text
    print(line(map(str, folders), "text"))
    rows = zip(*columns)
    for text in texts:
        shown = " ".join("".join(c if c.isprintable() else " " for c in text).split())  # on one short line
        if text.strip():
            cells = [f"{LABELS[int(p.argmax())]} {p.max():.3f}" for p in next(rows)]
        else:
            cells, shown = ["skipped"] * len(folders), "(empty text: nothing to classify)"
        print(line(cells, shown if len(shown) <= 60 else shown[:59] + "…"))
    if len(kept) < len(texts):
        print(f"Skipped {len(texts) - len(kept)} empty or whitespace-only text(s).")

def merge(cfg):
    """Fold the adapter into the base weights and save a plain model, checked against the adapter."""
    source, target = Path(cfg.output_dir), Path(cfg.output_dir + "-merged")
    if not (source / "adapter_config.json").exists():
        raise UserError(nothing_saved(source, "adapter to merge"))
    finish_an_interrupted_save(target)
    check_output_dir(target)
    model, tokenizer = load_saved_model(source)
    texts = ["One of the best films I have seen this year: moving and funny.", "A tedious, wooden mess.",
             "It was fine, I suppose. Some good scenes, some dull ones."]
    before = classify(model, tokenizer, texts, *reading(source, cfg))
    # W + (alpha / r) * B @ A is computed once and written into W: the result is a plain GPT-2 with
    # no adapter layers, as fast as the base model, but a full copy of the weights for every task.
    merged, results = model.merge_and_unload(), read_json(source / "results.json")

    def save(folder):
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if results:  # the same weights, so the adapter's results
            write_model_card(folder, target.name, results, merged_from=source.name)

    save_atomically(target, save)
    reloaded = AutoModelForSequenceClassification.from_pretrained(target).eval()
    difference = (before - classify(reloaded, tokenizer, texts, *reading(source, cfg))).abs().max().item()
    size = (target / "model.safetensors").stat().st_size / 1e6
    print(f"Merged {source} into {target} ({size:.1f} MB); it loads with AutoModelForSequenceClassification alone.")
    print(f"Largest difference between the probabilities of the adapter and of the merged model on "
          f"{len(texts)} texts: {difference:.2e}")

def compare(cfg, argv, variants):
    """Train each variant of the settings (alone, --compare sets LoRA against full fine-tuning) on the same
    data, each in a process of its own so that each peak memory is its own, and tabulate what each cost and
    gained. A variant already trained with the same settings is not trained again."""
    results, histories = {}, {}
    # Under torchrun, the first process starts each run on as many processes, with a torchrun of its own.
    world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] * (world > 1)
    for name, (settings, args) in plan_comparison(cfg, argv, variants).items():
        folder = output_dir(settings)
        done = read_json(folder / "results.json")
        if settings_behind_figures(done.get("config", {})) == settings_behind_figures(vars(settings)) and done.get("processes") == world:
            print(f"===== {name}: trained already, in {folder} =====", flush=True)
        else:
            launch = f"torchrun --nproc_per_node {world}" if torchrun else "python"
            print(f"\n===== {name}: {launch} {Path(__file__).name} {shlex.join(args)} =====", flush=True)
            if subprocess.run([sys.executable, *torchrun, __file__, *args]).returncode != 0:
                raise UserError(f"the {name!r} run stopped; see its message above. The same command goes on from it")
        results[name] = read_json(folder / "results.json")
        histories[TITLES.get(name, name)] = read_json(folder / "log_history.json")
    table = comparison_table(results)
    Path("comparison.md").write_text(table + "\n", "utf-8")
    Path("comparison.json").write_text(json.dumps(results, indent=2))
    plot_curves(histories, Path("comparison.png"))
    print("\n" + table + "\n\nWritten to comparison.md, comparison.json and comparison.png")

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # --compare takes the rest of the command line: its variants, each one quoted
    variants = argv[argv.index("--compare") + 1:] if "--compare" in argv else []
    argv = argv[:len(argv) - len(variants)]
    with one_line_on_stop_or_error() as outcome:  # Ctrl-C, a kill, a problem the user can fix: one line, status 1
        cfg, args = outcome.parsed = parse_args(argv)
        if (args.predict or args.merge or args.compare) and not is_main_process():
            return 0  # under torchrun every process runs this file: one classifies, merges or compares
        quiet_output()
        if args.predict:
            predict(cfg, args.predict, args.adapters)
        elif args.merge:
            merge(cfg)
        elif args.compare:
            compare(cfg, [arg for arg in argv if arg != "--compare"], variants)
        else:
            with one_run_at_a_time(output_dir(cfg)):
                fine_tune(cfg)
    return outcome.status


# =============================================================================
# Nothing below this line is needed to learn LoRA: the command line, clear errors, the speed-ups,
# resuming and safe saving, the device, and the results. README.md's "Under the hood" says why each is.
#
# Private or undocumented parts of the libraries used below, each where no public way does the same (transformers
# 5.25, datasets 5.2, torch 2.13, tqdm 4.67), and what a release that changes it would break:
# - Trainer._get_train_sampler and _get_eval_sampler, overridden in FastTrainer (the first with DistributedLength-
#   GroupedSampler for one process, seeded by epoch). Left uncalled: an exact resume and some speed lost (tests fail).
# - Trainer.model_accepts_loss_kwargs, set in FastTrainer. Recomputed later: gradient accumulation's loss too large.
# - TrainingArguments._n_gpu, set in FastTrainer: one GPU without torchrun. Renamed: DataParallel over every GPU,
#   which fails with the frozen weights stored in 16 bits.
# - Dataset._fingerprint, in cache_name: datasets' own name for the reviews. Renamed: an AttributeError there.
# - argparse.HelpFormatter._split_lines, in HelpFormatter: --help wraps between words. Renamed: "--" cut off flags.
# - tqdm._instances, in one_line: the open progress bars, closed before the error line. Renamed: left open (getattr).
# - transformers' masking_utils prepares no mask for an attention it does not know (a path for serving backends):
#   speed_up's sdpa_without_mask relies on it. Changed: a mask made again (the same results, slower), or an error.
# - transformers.integrations.INTEGRATION_TO_CALLBACK, in check_config: the trackers' names, for the message.
# =============================================================================
# command line: every constant becomes --lowercase_name, typed like its default

class UserError(Exception):
    """A problem the user can fix; main() prints it as one line and exits with status 1."""

class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (python {self.prog} --help lists every option)")

class HelpFormatter(argparse.RawDescriptionHelpFormatter):  # the docstring as written; help lines wrapped
    def _split_lines(self, text, width):  # between words only, so that no flag is cut after its "--"
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

def parse_args(argv):
    parser = OneLineParser(prog=Path(__file__).name, description=__doc__, allow_abbrev=False,  # no guessed flags
                           formatter_class=HelpFormatter)
    # --help shows the comment after each constant: one place to document a setting.
    comments = dict(re.findall(r"^([A-Z][A-Z0-9_]*)\s*(?::[^=]+)?=.*?#\s*(.*)$", Path(__file__).read_text("utf-8"), re.M))
    for name in CONSTANTS:
        default = check_constant(name)
        kind = {"nargs": "+", "metavar": "NAME"} if setting_type(name)[0] is list else {"type": value_parser(name)}
        if isinstance(default, bool):  # `--full_finetune` alone means true; `--full_finetune false` works too
            kind.update(nargs="?", const=True, metavar="BOOL")
        parser.add_argument("--" + name.lower(), default=default, **kind,
                            help=f"{comments.get(name, '')} (default: {default!r})".replace("%", "%%"))
    actions = parser.add_argument_group("instead of training")
    actions.add_argument("--predict", nargs="+", metavar="TEXT",
                         help="classify these texts with the model saved in OUTPUT_DIR and print label and probability")
    actions.add_argument("--adapters", nargs="+", metavar="DIR",
                         help="with --predict: load one base model, add each adapter folder, classify with each in turn")
    actions.add_argument("--merge", action="store_true",
                         help="fold the adapter in OUTPUT_DIR into the base weights, save a plain model in OUTPUT_DIR-merged")
    actions.add_argument("--compare", action="store_true",
                         help="LoRA against full fine-tuning; or, last on the line, variants of the settings, each "
                              "quoted: --compare \"--lora_r 4\" \"--lora_r 16 --lora_alpha 32\". Writes comparison.md, "
                              ".json and .png")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse lists them; say which flag was probably meant too
        flags = ["--" + name for name in vars(args)]
        guess = difflib.get_close_matches(unknown[0].split("=")[0].replace("-", "_").replace("__", "--", 1), flags, 1)
        parser.error(f"unrecognized arguments: {' '.join(unknown)}" + (f"; did you mean {guess[0]}?" if guess else ""))
    if args.adapters and not args.predict:
        parser.error("--adapters goes with --predict: add --predict followed by the texts to classify")
    if sum(bool(x) for x in (args.predict, args.merge, args.compare)) > 1:
        parser.error("choose one of --predict, --merge and --compare")
    if args.merge and args.full_finetune:
        parser.error(f"--merge folds a LoRA adapter into its base model; a --full_finetune model has none, and "
                     f"{args.full_output_dir} already loads as a plain model")
    cfg = normalized(SimpleNamespace(**{name.lower(): getattr(args, name.lower()) for name in CONSTANTS}))
    check_config(cfg)
    return cfg, args

def setting_type(name):
    """The type a constant's annotation gives, and whether it may be None: (int, True) for `int | None`."""
    # From the module: lazy from Python 3.14 on. A constant added without a type has its value's.
    hint = typing.get_type_hints(sys.modules[__name__]).get(name, type(globals()[name]))
    kinds = [kind for kind in typing.get_args(hint) or [hint] if kind is not type(None)]
    return kinds[0], len(kinds) < len(typing.get_args(hint))

def check_constant(name):
    """A constant edited at the top of the file to a value of the wrong type, such as LEARNING_RATE = "3e-4",
    would fail deep in a library: name the line instead."""
    value, (kind, optional) = globals()[name], setting_type(name)

    def fits(v):
        return type(v) is kind or v is None and optional or (kind, type(v)) in ((float, int), (list, str))
    if fits(value):
        return value
    expected = {bool: "True or False", int: "a whole number", float: "a number", list: 'a list, such as ["c_attn"]'}
    try:  # "3e-4" is a number in quotes; "fast" is not
        quoted = isinstance(value, str) and fits(ast.literal_eval(value))
    except (ValueError, SyntaxError):
        quoted = False
    raise UserError(f"{name} = {value!r} at the top of {Path(__file__).name}{' is in quotes' * quoted}: it must be "
                    f"{expected.get(kind, 'text in quotes')}{' or None' * optional}; "
                    + ("remove the quotes" if quoted else "change that line"))

def value_parser(name):
    """Turn a command-line string into a value of the constant's type, or fail with a clear sentence."""
    kind, optional = setting_type(name)
    words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}

    def parse(text):
        try:
            if optional and text.lower() == "none":
                return None
            if kind is bool:
                return words[text.lower()]
            return int(text.replace("_", "").replace(",", "")) if kind is int else kind(text)
        except (KeyError, ValueError):
            expected = {bool: "true or false", int: "a whole number", float: "a number"}.get(kind, "text")
            raise argparse.ArgumentTypeError(f"expects {expected}{' or none' * optional}, got {text!r}") from None
    return parse

def normalized(cfg):
    """The settings as the run uses them."""
    if isinstance(cfg.target_modules, str):  # TARGET_MODULES = "c_attn c_proj" edited in: a list of names
        cfg.target_modules = cfg.target_modules.split()
    if cfg.target_modules == ["all-linear"]:  # PEFT's own shorthand, which it takes as a string only
        cfg.target_modules = "all-linear"
    # ~ expanded here as the Trainer expands it, or the checkpoints and the saved model would part ways
    cfg.output_dir, cfg.full_output_dir = (os.path.expanduser(d.rstrip("/\\") or d)
                                           for d in (cfg.output_dir, cfg.full_output_dir))
    if Path(cfg.model_name).expanduser().is_dir():  # a local model as a whole path: the adapter records its base
        cfg.model_name = str(Path(cfg.model_name).expanduser().resolve())
    return cfg

def check_config(cfg):
    for name, value in vars(cfg).items():  # sizes, counts and rates (any seed will do)
        off = name in ("save_steps", "save_minutes")  # 0: no checkpoints by steps, or by time
        if type(value) in (int, float) and name not in ("seed", "lora_dropout") and (value < 0 or not value and not off):
            raise UserError(f"--{name} must be {'0 or more' if off else 'greater than 0'}, got {value}")
    if not 0 <= cfg.seed < 2**32:  # what numpy's generator takes
        raise UserError(f"--seed must be from 0 to {2**32 - 1}, got {cfg.seed}")
    if not 0 <= cfg.lora_dropout < 1:
        raise UserError(f"--lora_dropout must be at least 0 and below 1, got {cfg.lora_dropout}")
    if cfg.truncation not in ("start", "end", "start+end"):
        raise UserError(f"--truncation must be one of start, end, start+end, got {cfg.truncation!r}")
    if cfg.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise UserError(f"--precision must be one of auto, bf16, fp16, fp32, got {cfg.precision!r}")
    if cfg.report_to not in ("none", "all", *hf_integrations.get_available_reporting_integrations()):
        trackers = hf_integrations.INTEGRATION_TO_CALLBACK
        raise UserError(f"--report_to {cfg.report_to}: " + (f"that tracker is not installed; install it (pip "
                        f"install {cfg.report_to}) or use none" if cfg.report_to in trackers else
                        f"not a tracker; use none or one of {', '.join(trackers)}"))
    for flag, holding in (("model_name", "config.json and the weights (as save_pretrained writes it), or a Hub id "
                                         "such as gpt2"),
                          ("dataset_name", "train.* and test.* files (parquet, csv or jsonl) or the aclImdb layout, "
                                           "or a Hub id such as imdb")):
        name = getattr(cfg, flag)
        if flag == "model_name" and (base := read_json(Path(name).expanduser() / "adapter_config.json")):
            raise UserError(f"--model_name {name} is a LoRA adapter, not a model; train on its base model "
                            f"(--model_name {base.get('base_model_name_or_path')}), or merge the adapter into it "
                            f"(--merge --output_dir {name}) and give the merged folder")
        if looks_like_a_path(name) and not Path(name).expanduser().is_dir():
            problem = "that is a file" if Path(name).expanduser().is_file() else "no such folder"
            raise UserError(f"--{flag} {name}: {problem}; give a folder holding {holding}")

def looks_like_a_path(name):  # such a name is never sent to the Hub
    return (name.startswith((".", "/", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", name) is not None
            or Path(name).suffix.lower() in (".csv", ".parquet", ".json", ".jsonl", ".txt", ".tsv", ".safetensors", ".bin")
            or Path(name).expanduser().is_file())


# -----------------------------------------------------------------------------
# loading, local data folders, checks

def quiet_output():
    if not is_main_process():
        sys.stdout = open(os.devnull, "w")  # under torchrun every process runs this file; the first one speaks
    if hasattr(sys.stdout, "reconfigure"):  # into a file or a pipe too, each line as soon as it is printed;
        sys.stdout.reconfigure(line_buffering=True, errors="replace")  # "?" for a character the encoding lacks
    hf_logging.disable_progress_bar()  # "Loading weights" bars: chatter, for a model already on disk
    if not sys.stderr.isatty():  # in a file, every redraw of a progress bar would be a line of its own
        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()

def check_hub_reachable(*names):
    """Without a network the libraries retry for a minute before failing: find out in seconds."""
    names = [name for name in names if not Path(name).expanduser().exists() and not looks_like_a_path(name)]
    if not names or huggingface_hub.constants.HF_HUB_OFFLINE:
        return
    try:  # through the libraries' own connection, so a proxy they would use is used here too
        huggingface_hub.get_session().head(huggingface_hub.constants.ENDPOINT, timeout=5)
    except Exception as error:  # no network, a name that does not resolve, a firewall...
        raise UserError(f"cannot reach the Hugging Face Hub at {huggingface_hub.constants.ENDPOINT} ({error}) to "
                        f"load {' and '.join(names)}; set HF_HUB_OFFLINE=1 to use files downloaded before, or pass "
                        f"local folders (README: Running offline)") from None

@contextlib.contextmanager
def loading(flag, name):
    """Turn a failed load into one sentence, and keep quiet the expected note that GPT-2's new head
    `score` is newly initialized."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
        stop_if_asked()
    except Exception as error:  # offline, a typo in the name, a folder without weights...
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        fix = ("check the files in it" if Path(name).expanduser().exists() else "check the name and your "
               "connection, or pass a local folder (README: Running offline)")
        raise UserError(f"{flag} {name}: could not load it ({reason}); {fix}") from None
    finally:
        hf_logging.set_verbosity(verbosity)

def check_model_settings(cfg, model):
    """Fail on LoRA targets the model lacks; return MAX_LENGTH and EVAL_MAX_LENGTH, each capped at what the model
    reads. (The settings themselves stay as asked: a rerun of the same command must find them to resume.)"""
    layers = {name.split(".")[-1] for name, module in model.named_modules()
              if isinstance(module, (torch.nn.Linear, Conv1D)) and name != "score"}
    targets = [] if cfg.target_modules == "all-linear" else cfg.target_modules
    if (missing := [t for t in targets if t not in layers]) and not cfg.full_finetune:
        raise UserError(f"--target_modules: this model has no layer called {', '.join(missing)}; "
                        f"it has for example {', '.join(sorted(layers)[:6])}, or use all-linear")
    if cfg.lora_top_blocks and cfg.target_modules == "all-linear" and not cfg.full_finetune:
        raise UserError(f"--lora_top_blocks takes named --target_modules, not all-linear (PEFT cannot combine them); "
                        f"name the layers instead: --target_modules {' '.join(sorted(layers))}")
    blocks = getattr(model.config, "num_hidden_layers", None)
    if cfg.lora_top_blocks and not cfg.full_finetune and not (blocks and cfg.lora_top_blocks <= blocks):
        raise UserError(f"--lora_top_blocks {cfg.lora_top_blocks}: this model has {blocks or 'no countable'} blocks; "
                        f"give at most that many, or none for all")
    for name, asked in (("MAX_LENGTH", cfg.max_length), ("EVAL_MAX_LENGTH", cfg.eval_max_length)):
        if asked and asked > (limit := min(asked, max_positions(model))):
            print(f"{name} {asked} is more than this model can read; using its maximum, {limit}")
    # Batches are padded up to a multiple of PAD_TO_MULTIPLE_OF: never past the last position the model has.
    limit = max(max_tokens(cfg, model), eval_tokens(cfg, model))
    padded = math.ceil(limit / cfg.pad_to_multiple_of) * cfg.pad_to_multiple_of
    if padded > max_positions(model):
        raise UserError(f"--pad_to_multiple_of {cfg.pad_to_multiple_of} pads a review of {limit} tokens to {padded}, "
                        f"more than this model can read; use {limit} or a smaller number")
    return max_tokens(cfg, model), eval_tokens(cfg, model)

def max_tokens(cfg, model):  # MAX_LENGTH, or the most tokens the model can read if that is fewer
    return min(cfg.max_length, max_positions(model))

def eval_tokens(cfg, model):  # EVAL_MAX_LENGTH (MAX_LENGTH if None), or the most tokens the model can read
    return min(cfg.eval_max_length or cfg.max_length, max_positions(model))

def max_positions(model):  # the most tokens the model can read; no limit given: relative positions, as T5's
    return getattr(model.config, "max_position_embeddings", math.inf)

def new_modules(model, loading_info):
    """The modules whose weights the checkpoint lacked, made at load, each named whole: GPT-2's `score`, DeBERTa's
    `pooler` and `classifier`, T5's `classification_head`. get_peft_model freezes every weight but LoRA's, and PEFT
    saves only the heads it knows by name (`score`, `classifier`): any other new module would stay at its random
    start, unsaved, and each reload would draw it anew. As modules_to_save, each is trained and saved whole."""
    new = set(loading_info["missing_keys"]) & {name for name, _ in model.named_parameters()}
    names = []
    for name, module in model.named_modules():  # parents first: a module wholly new is named, not its parts
        weights = {f"{name}.{weight}".lstrip(".") for weight, _ in module.named_parameters()}
        if weights and weights <= new and not any(name.startswith(f"{done}.") for done in names):
            names.append(name)
    sizes = {name: weight.numel() for name, weight in model.named_parameters() if name in new}
    if (share := sum(sizes.values()) / model.num_parameters()) > 0.5:  # LoRA on random weights learns little
        raise UserError(f"--model_name {model.name_or_path}: {share:.0%} of the model's weights are missing from its "
                        f"checkpoint (such as {max(sizes, key=sizes.get)}), so it would train from random weights; "
                        f"give the folder or Hub id of a pretrained model")
    return names

def is_conv1d(model, names):  # GPT-2's layers; most other models use nn.Linear
    return any(isinstance(module, Conv1D) for name, module in model.named_modules()
               if names == "all-linear" or name.split(".")[-1] in names)

def top_blocks(model, count):  # the numbers of the top `count` blocks, for LoraConfig; None: all of them
    return None if count is None else list(range(model.config.num_hidden_layers - count, model.config.num_hidden_layers))

def load_reviews(cfg):
    """The train and test reviews (`text`; `label`, 0 = negative), checked, without empty ones, and a
    seeded random subset of each if MAX_TRAIN_SAMPLES or MAX_EVAL_SAMPLES ask for one."""
    name, data, splits = cfg.dataset_name, read_reviews(cfg.dataset_name), []
    for split in ("train", "test"):
        if split not in data:
            raise UserError(f"--dataset_name {name} has no {split!r} split (it has {', '.join(data)}); "
                            f"provide both train and test")
        if missing := [column for column in ("text", "label") if column not in data[split].column_names]:
            raise UserError(f"--dataset_name {name}: the {split} split has no {missing[0]!r} column (it has "
                            f"{', '.join(data[split].column_names)}); rename the columns to text and label")
        if bad := sorted(set(data[split].unique("label")) - {0, 1}):
            raise UserError(f"--dataset_name {name}: labels must be 0 (negative) or 1 (positive), the {split} split "
                            f"also has {', '.join(map(repr, bad[:5]))}; map them to 0 and 1")
    print(f"Found {len(data['train']):,} train and {len(data['test']):,} test reviews in {name}")
    for split, limit in (("train", cfg.max_train_samples), ("test", cfg.max_eval_samples)):
        reviews = data[split].select_columns(["text", "label"])
        kept = reviews.filter(lambda batch: [isinstance(t, str) and t.strip() != "" for t in batch["text"]],
                              batched=True)
        if len(kept) < len(reviews):
            print(f"Dropped {len(reviews) - len(kept):,} empty or whitespace-only {split} reviews")
        if len(kept) == 0:
            raise UserError(f"--dataset_name {name}: no {split} reviews are left after dropping empty ones; "
                            f"check the text column")
        if kept.features["label"].dtype != "int64":  # labels read as 1.0 or True: the loss takes whole numbers
            kept = kept.cast_column("label", datasets.Value("int64"))
        # A random subset, not the first rows: IMDB is sorted by label, so those would all be negative.
        splits.append(kept.shuffle(seed=cfg.seed).select(range(limit)) if limit and limit < len(kept) else kept)
    stop_if_asked()
    return splits

def start_and_end(tokenizer, texts, max_length, start_share=0.25):
    """Each text's tokens, at most max_length of them: a longer text keeps its first quarter and its end, special
    tokens included (a start-of-text token is first, an end-of-text token last). A quarter: Sun et al. (2019),
    "How to Fine-Tune BERT for Text Classification?", kept 128 of 512 from the start on IMDb; measured against
    half in benchmarks/README.md."""
    encoded = tokenizer(texts, verbose=False)  # (verbose: no warning for a text longer than the model reads)
    first = round(max_length * start_share)
    for key, rows in encoded.items():
        encoded[key] = [row if len(row) <= max_length else row[:first] + row[len(row) - max_length + first:]
                        for row in rows]
    return encoded

def cache_name(reviews, tokenizer, max_length, truncation="start"):
    """The name datasets caches the tokenized reviews under, made from all that decides them: the reviews (datasets'
    fingerprint of them), the whole tokenizer (its vocabulary, merges and rules, as JSON) and the cut. Without one,
    datasets hashes the tokenize function, tokenizer and all, with dill: a second or more, inside a bare `except:`
    that would swallow a Ctrl-C (see STOP_ASKED). None for a slow tokenizer: datasets hashes it as before."""
    if not tokenizer.is_fast:
        return None
    rules = json.loads(tokenizer.backend_tokenizer.to_str())
    rules.pop("truncation"), rules.pop("padding")  # left by the last call: not part of the tokenizer's rules
    key = [reviews._fingerprint, type(tokenizer).__name__, tokenizer.truncation_side, max_length, truncation, rules]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]

def read_reviews(name):
    """From the Hub, or a local folder: Stanford's aclImdb layout, or train.* and test.* files."""
    path = Path(name).expanduser()
    if all((path / split / kind).is_dir() for split in ("train", "test") for kind in ("pos", "neg")):
        splits = {}  # aclImdb: one .txt per review; the folder name is the label
        for split in ("train", "test"):
            files = [(label, file) for label, kind in enumerate(("neg", "pos"))
                     for file in sorted((path / split / kind).glob("*.txt"))]
            splits[split] = datasets.Dataset.from_dict({
                "text": [file.read_text(encoding="utf-8", errors="replace") for _, file in files],
                "label": [label for label, _ in files]})
        return datasets.DatasetDict(splits)
    if path.is_dir() and not (any(path.glob("train.*")) and any(path.glob("test.*"))):
        raise UserError(
            f"--dataset_name {name}: the folder holds neither the aclImdb layout (train/pos, train/neg, test/pos, "
            f"test/neg) nor train.* and test.* files in one format (parquet, csv or jsonl); add them or point elsewhere")
    # datasets reads train.* and test.* files by their names. The folder goes as a whole path: as "csv" or
    # "json" (./csv), datasets would take it for its reader of that name, and find no files.
    with loading("--dataset_name", name):
        return datasets.load_dataset(str(path.resolve()) if path.is_dir() else name)

def read_json(path):  # a results.json, run_settings.json...; {} if there is none, or a stop cut it short
    with contextlib.suppress(FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return json.loads(Path(path).read_text("utf-8"))
    return {}


# -----------------------------------------------------------------------------
# speed: each changes how the training is computed, not what (tested); measured in benchmarks/README.md

def speed_up(model, tokenizer, cfg, setup):
    stop_if_asked()  # (swallowed while tokenizing)
    model.config.use_cache = False  # no copies of every layer's keys and values: a classifier never generates
    for module in list(model.modules()):  # GPT-2's GELU, eight operations in Python, as one PyTorch kernel
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, GELUTanh())
    no_mask = model.config.model_type == "gpt2" and tokenizer.padding_side == "right"
    if no_mask:
        # GPT-2 attends only to earlier tokens and pads after the text: no real token sees a pad, so the
        # mask changes nothing (tested). Under a name of our own, transformers does not prepare one.
        AttentionInterface.register("sdpa_without_mask", sdpa_attention_forward)
        model.set_attn_implementation("sdpa_without_mask")
    if setup.precision in ("bf16", "fp16") and not cfg.full_finetune:
        # Autocast casts every frozen weight to 16 bits at every step; do it once (same products).
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, Conv1D)) and "score" not in name and not any(
                    p.requires_grad for p in module.parameters()):
                module.to(torch.bfloat16 if setup.precision == "bf16" else torch.float16)
    if cfg.torch_compile:
        compile_for_speed(model, setup.device)
    if cfg.cuda_graphs and (why_not := why_no_step_graphs(cfg, setup, no_mask)):
        print(f"CUDA_GRAPHS: not used, {why_not}; the steps run as usual")
    elif cfg.cuda_graphs:  # FastTrainer finds them on the model
        model.step_graphs = StepGraphs(model, cfg.batch_size, tokenizer.pad_token_id, setup.precision,
                                       max_tokens(cfg, model))

def why_no_step_graphs(cfg, setup, no_mask):
    """Why the training steps cannot be replayed as CUDA graphs here, or None."""
    reasons = [(setup.device != "cuda", "as there is no CUDA GPU here"),
               (not no_mask, "as they are for GPT-2 only (other models read the attention mask, which can make "
                             "the GPU wait)"),
               (cfg.full_finetune, "as they are for LoRA only"),
               (cfg.torch_compile, "as TORCH_COMPILE records CUDA graphs of its own; choose one"),
               (setup.world > 1, "as they run in one process only, not under torchrun"),
               # the recorded backward pass hands back its gradients in the same memory at every replay
               (cfg.gradient_accumulation_steps > 1, "as they cannot accumulate gradients over several batches")]
    return next((reason for applies, reason in reasons if applies), None)

class StepGraphs(TrainerCallback):
    """A batch's training loss, forward and backward passes, as CUDA graphs (torch.cuda.make_graphed_callables),
    replayed, so that the GPU gets a step's ~700 kernels in two launches instead of waiting for Python to launch
    each. The batches are padded after the text to a multiple of 64 for it, at most 8 shapes up to 512 tokens:
    GPT-2 reads neither the pads nor the mask (see speed_up), so each review's loss is the same. Each shape is
    recorded when training begins, before the data loader starts: its pin-memory thread makes CUDA calls, which
    would fail a recording (torch records in its "global" mode, which refuses them from any thread). A shorter
    batch (an epoch's last) and the evaluation run as usual. Dropout draws anew at each replay (CUDA graphs
    advance the random generator). All graphs share one memory pool: a step's two graphs replay back to back,
    so none overwrites memory that another still needs."""

    multiple = 64

    def __init__(self, model, batch_size, pad_token_id, precision, max_tokens):
        self.model, self.batch_size, self.pad, self.limit = model.get_base_model(), batch_size, pad_token_id, \
            max_positions(model)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.lengths = range(self.multiple, self.length(max_tokens) + 1, self.multiple)
        self.graphs, self.pool = {}, None

    def length(self, tokens):  # the recorded length a batch of this many tokens is padded to
        return min(math.ceil(tokens / self.multiple) * self.multiple, self.limit)

    def on_train_begin(self, args, state, control, **kwargs):  # (the Trainer has put the model on the GPU)
        device = next(self.model.parameters()).device
        for length in self.lengths:  # any tokens will do: a replay copies the batch's into the recorded inputs
            batch = (torch.full((self.batch_size, length), self.pad, device=device),
                     torch.ones(self.batch_size, length, dtype=torch.long, device=device),
                     torch.zeros(self.batch_size, dtype=torch.long, device=device))
            self.graphs[length] = self.record(BatchLoss(self.model, self.dtype), batch)

    def loss(self, inputs):
        """The batch's loss from the graphs of its shape; None for a batch that runs as usual."""
        tokens = inputs["input_ids"].shape[1]
        length = self.length(tokens)
        if (len(inputs["input_ids"]) != self.batch_size or set(inputs) != {"input_ids", "attention_mask", "labels"}
                or length not in self.graphs):
            return None
        batch = (torch.nn.functional.pad(inputs["input_ids"], (0, length - tokens), value=self.pad),
                 torch.nn.functional.pad(inputs["attention_mask"], (0, length - tokens)), inputs["labels"])
        return self.graphs[length](*batch)  # (the recorded output, which the next replay overwrites)

    def record(self, module, batch):
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        return torch.cuda.make_graphed_callables(module, batch, pool=self.pool)

class BatchLoss(torch.nn.Module):
    """A batch's training loss as the model computes it under the Trainer: what StepGraphs records."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, input_ids, attention_mask, labels):
        # Autocast's cache of cast weights cannot be recorded (the frozen ones are stored in 16 bits already).
        with torch.autocast(input_ids.device.type, self.dtype, enabled=self.dtype is not None, cache_enabled=False):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

def compile_for_speed(model, device, cuda_graphs=True):
    """Compile the transformer block (all share the code) and, on a GPU, replay it as CUDA graphs."""
    model.enable_input_require_grads()  # or the first block, fed by frozen embeddings, compiles apart
    blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    for block in blocks:
        block.compile(dynamic=True, mode="reduce-overhead" if device == "cuda" and cuda_graphs else "default")

def token_counts(dataset):
    return pyarrow.compute.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()

def hardware_arguments(cfg, setup):
    gpu = setup.device == "cuda"
    return dict(
        bf16=setup.precision == "bf16", fp16=setup.precision == "fp16",
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        # On a GPU a big evaluation batch keeps it busy; on a CPU it only thrashes the caches.
        per_device_eval_batch_size=cfg.eval_batch_size or (64 if gpu else cfg.batch_size),
        # The Trainer would check every step's loss, making the CPU wait for the GPU, and hide a NaN in
        # the logged average; TrainingWatch stops at the next logged loss instead.
        logging_nan_inf_filter=False,
        # Workers prepare the next batches while the GPU computes (on a CPU they would compete with it).
        dataloader_num_workers=2 if gpu else 0, dataloader_persistent_workers=gpu, dataloader_pin_memory=gpu,
        accelerator_config={"non_blocking": gpu},  # copies to the GPU from pinned memory need no wait
        disable_tqdm=not sys.stderr.isatty(),  # in a file, plain lines: every redraw of a bar would be one
        # Under torchrun without GPUs the processes talk over gloo; say so, or each would train alone.
        use_cpu=setup.device == "cpu", ddp_backend="gloo" if setup.device == "cpu" and setup.world > 1 else None,
        ddp_find_unused_parameters=False,  # every trainable weight gets a gradient at every step
    )

class FastTrainer(Trainer):
    """transformers' Trainer, with what its arguments and callbacks cannot do (each says why not)."""

    def __init__(self, model, args, **kwargs):
        # Several GPUs without torchrun: the Trainer would split each batch between them (DataParallel), and
        # there it leaves out mixed precision, so speed_up's 16-bit weights fail. One GPU; describe_run says more.
        self.gpus_found, args._n_gpu = args.n_gpu, min(args.n_gpu, 1)
        super().__init__(model, args, **kwargs)
        # GPT-2's classification loss is the mean over its own batch; the Trainer, seeing its forward take **kwargs,
        # would take it for a sum over the accumulated batches and not divide it by GRADIENT_ACCUMULATION_STEPS. (Not
        # loss_is_scaled_for_ga, 5.19: each step would still count the labels and copy the count to the GPU, a wait.)
        self.model_accepts_loss_kwargs = False

    def _get_train_sampler(self, train_dataset=None):
        # Grouped by length as the Trainer's own, but seeded by epoch: with its own, a resumed run ended otherwise.
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        return DistributedLengthGroupedSampler(self.args.per_device_train_batch_size, num_replicas=1, rank=0,
                                               lengths=token_counts(self.train_dataset), seed=self.args.seed)

    def _get_eval_sampler(self, eval_dataset):  # any order, the same metrics; sorted, less padding than the Trainer's
        return sorted(range(len(eval_dataset)), key=token_counts(eval_dataset).__getitem__)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        step_graphs = getattr(self.model, "step_graphs", None)  # CUDA_GRAPHS, see speed_up
        if step_graphs and model.training and not return_outputs and (loss := step_graphs.loss(inputs)) is not None:
            return loss
        return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)

    def evaluate(self, *args, **kwargs):
        # Compiled blocks would compile again without gradients. And the evaluation leaves the random generator
        # as it was (its data loader draws a seed from it): a run resumed from the checkpoint saved at the end
        # of an epoch, just before that epoch's evaluation, then draws the same dropout as one never stopped.
        with torch.compiler.set_stance("force_eager"), torch.random.fork_rng(devices=[]):
            return super().evaluate(*args, **kwargs)

class TrainingWatch(TrainerCallback):
    """Times each epoch; saves a checkpoint when SAVE_MINUTES pass without one, and at an epoch's end after
    its evaluation; stops on a NaN or infinite loss before it is saved; skips the evaluation after the last
    epoch (step 5 does it)."""

    def __init__(self, trainer, save_seconds):
        self.trainer, self.save_seconds, self.started, self.saved = trainer, save_seconds, None, time.monotonic()
        self.save_after_evaluation, trainer.epoch_seconds = False, []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the GPU may still be working on the last steps
        self.trainer.epoch_seconds.append(time.perf_counter() - self.started)
        control.should_evaluate = control.should_evaluate and state.global_step < state.max_steps
        control.should_save, self.save_after_evaluation = control.should_save or self.save_after_evaluation, False
        self.on_step_end(args, state, control, epoch_end=True)

    def on_step_end(self, args, state, control, epoch_end=False, **kwargs):
        stop_if_asked()
        control.should_save = control.should_save or 0 < self.save_seconds < time.monotonic() - self.saved
        # An epoch's last step is followed by its evaluation: save after it, or a run resumed from this
        # checkpoint would go on without that evaluation.
        if state.epoch == int(state.epoch) and state.global_step < state.max_steps and not epoch_end:
            self.save_after_evaluation, control.should_save = control.should_save, False
        # The loss is read only when logged (until then it is summed on the device): log before each
        # evaluation and checkpoint, which the Trainer does after logging, and at the last step.
        control.should_log = control.should_log or control.should_evaluate or control.should_save or (
            state.global_step >= state.max_steps)

    def on_save(self, args, state, control, **kwargs):
        self.saved = time.monotonic()

    def on_substep_end(self, args, state, control, **kwargs):  # each batch, also between accumulated ones
        stop_if_asked()

    def on_prediction_step(self, args, state, control, **kwargs):  # each evaluation batch
        stop_if_asked()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not math.isfinite(logs.get("loss", 0.0)):
            raise UserError(f"The training loss became NaN or infinite by step {state.global_step}, so it was not "
                            f"saved. Lower the learning rate (now {args.learning_rate:g}); with --precision fp16 "
                            f"it can also be an overflow, use bf16 or fp32")


# -----------------------------------------------------------------------------
# reliability: resume, clean stops, safe saves

def output_dir(cfg):
    return Path(cfg.full_output_dir if cfg.full_finetune else cfg.output_dir)

def prepare_run(cfg):
    started = time.monotonic()
    check_hub_reachable(cfg.model_name, cfg.dataset_name)
    out_dir = output_dir(cfg)
    for flag in ("model_name", "dataset_name"):  # a save replaces the output folder: never one it reads from
        source = Path(getattr(cfg, flag)).expanduser()
        if source.exists() and source.resolve().is_relative_to(out_dir.resolve()):
            raise UserError(f"--output_dir {out_dir} holds --{flag} {getattr(cfg, flag)}, which saving would "
                            f"delete; give the output a folder of its own, such as {OUTPUT_DIR}")
    finish_an_interrupted_save(out_dir)
    check_output_dir(out_dir)  # fail now, not after training, if the results could not be saved
    checkpoints = out_dir / "checkpoints"
    resume_from = find_resume_checkpoint(cfg, checkpoints)
    if not resume_from and checkpoints.exists() and is_main_process():
        shutil.rmtree(checkpoints)  # left by an interrupted run that is not being resumed
    earlier = read_json(out_dir / "results.json").get("config", {})  # of the run saved there, if any
    if changed := [n for n, v in settings_learned_from(vars(cfg)).items() if n in earlier and earlier[n] != v]:
        print(f"{out_dir} holds a model trained with another --{changed[0]}; this run replaces it when it finishes "
              f"(to keep it, stop now with Ctrl-C and give this run an --output_dir of its own)")
    device, device_name, precision = pick_device_and_precision(cfg)
    return SimpleNamespace(out_dir=out_dir, checkpoints=str(checkpoints), resume_from=resume_from, device=device,
                           device_name=device_name, precision=precision, world=int(os.environ.get("WORLD_SIZE", "1")),
                           started=started)

@contextlib.contextmanager
def one_run_at_a_time(out_dir):
    """A second run into the folder a run is training into would delete its checkpoints, or replace what it
    saves: a lock file beside the folder, held while the run goes on, refuses it."""
    out = Path(out_dir).resolve()
    # (under torchrun the first process holds it for all)
    lock = filelock.FileLock(out.parent / f".{out.name}.lock", timeout=0) if is_main_process() else None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if lock:
            lock.acquire()
    except filelock.Timeout:
        raise UserError(f"another run is training into {out_dir}; wait for it to end, or give this one an "
                        f"--output_dir of its own") from None
    except OSError:  # a folder that cannot be written: check_output_dir says so
        lock = None
    try:
        yield
    finally:
        if lock:
            lock.release()
            with contextlib.suppress(OSError):  # (Windows: another run has it open)
                os.remove(lock.lock_file)

def finish_an_interrupted_save(out_dir):
    """A stop in save_atomically's swap leaves the old folder under a hidden name: put it back, or delete it."""
    out = Path(out_dir).resolve()
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if out.exists():  # after the new folder took its place, while the old one was being deleted
            shutil.rmtree(old, ignore_errors=True)
        else:  # between the two renames: the old folder comes back
            os.rename(old, out)
            print(f"Restored {out_dir} from an interrupted save")

def check_output_dir(out_dir):
    out = Path(out_dir).resolve()  # a link to a folder on another disk: that folder is the one saved and swapped
    if Path.cwd().is_relative_to(out):  # a save replaces the folder: it cannot be the one we are in
        raise UserError(f"--output_dir {out_dir} is the current folder or holds it, and saving replaces the whole "
                        f"output folder; give a folder of its own, such as {OUTPUT_DIR}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out_dir} is a file; give a folder name")
    if out.is_dir() and any(out.iterdir()) and not saved_by_this_script(out):
        raise UserError(f"--output_dir {out_dir} already holds files that are not a saved model; "
                        f"it would be replaced, so give a new or empty folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for folder in [out.parent] + ([out] if out.is_dir() else []):
            tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise UserError(f"--output_dir {out_dir} is not writable ({error.strerror}); "
                        f"choose a folder you can write to") from None

def saved_by_this_script(folder):
    """An adapter or a model and its results, a model's config beside its weights, or an unfinished run:
    what the next save may replace. A folder of anything else is never replaced."""
    checkpoints = folder / "checkpoints"
    return ((folder / "adapter_config.json").exists() or (folder / "results.json").exists()
            or (folder / "config.json").exists() and any(folder.glob("*.safetensors"))
            or checkpoints.is_dir() and all(p.name in ("run_settings.json", "runs") or p.name.startswith("checkpoint-")
                                            for p in checkpoints.iterdir()))

def save_atomically(out_dir, write):
    """Write a folder beside `out_dir`, then swap it in: a crash leaves the old folder or the new one,
    never a half-written one."""
    out = Path(out_dir).resolve()  # (a link stays, and points at the new folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        stop_if_asked()  # before the swap: the folder as it was stays
        umask = os.umask(0)
        os.umask(umask)
        for path in [tmp, *tmp.rglob("*")]:  # temporary files are private; give them the usual permissions
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    # Windows renames no folder while a program has a file in it open, or a terminal is in it: an antivirus
    # scanner lets go in a moment, a user has to be told.
    for attempt in range(10):
        try:
            if out.exists():
                os.rename(out, old)
            os.rename(tmp, out)
            break
        except PermissionError as error:
            if attempt == 9:
                raise UserError(f"could not replace {out} ({error.strerror}); is a program or a terminal using it? "
                                f"The new one is saved in {tmp}: close it, then replace {out} with that folder") from None
            time.sleep(0.5)
    shutil.rmtree(old, ignore_errors=True)

# What each setting is to a run. Bookkeeping changes none of its figures: where it saves, how often it checkpoints
# and logs. These others change what it measures, but not what it learns: a checkpoint resumes with other values.
BOOKKEEPING = ["output_dir", "full_output_dir", "resume", "save_steps", "save_minutes", "save_total_limit",
               "logging_steps", "report_to"]
NOT_LEARNED = ["max_eval_samples", "eval_max_length", "precision", "pad_to_multiple_of", "eval_batch_size",
               "torch_compile", "cuda_graphs"]

def settings_behind_figures(settings):  # --compare reuses a run trained with the same; so does a rerun's message
    return {name: value for name, value in settings.items() if name not in BOOKKEEPING}

def settings_learned_from(settings):  # a checkpoint resumes only with the same (every new setting is one)
    return {name: value for name, value in settings_behind_figures(settings).items() if name not in NOT_LEARNED}

def find_resume_checkpoint(cfg, folder):
    """The last complete checkpoint of a run with these settings: the Trainer writes trainer_state.json last
    (a kill while it is written leaves it cut short, and that checkpoint is passed over)."""
    found = [p for p in Path(folder).glob("checkpoint-*")
             if read_json(p / "trainer_state.json") and checkpoint_step(p) is not None] if cfg.resume else []
    saved = read_json(Path(folder) / "run_settings.json")
    for name in settings_learned_from(vars(cfg)) if found else []:
        if saved.get(name) != getattr(cfg, name):
            raise UserError(f"{folder} holds an interrupted run with other settings (--{name} was "
                            f"{saved.get(name)!r}, now {getattr(cfg, name)!r}); pass --resume false to start over "
                            f"(its checkpoints are deleted) or choose another --output_dir")
    return str(max(found, key=checkpoint_step)) if found else None

def checkpoint_step(folder):  # the Trainer's checkpoint-500 holds step 500; None for another name
    step = Path(folder).name.split("-")[-1]
    return int(step) if step.isdigit() else None

def watch_training(cfg, setup, trainer):
    """Write the settings beside the checkpoints (a rerun resumes only with the same ones) and watch the training."""
    if trainer.is_world_process_zero() and not setup.resume_from:  # (resumed: the same settings are there)
        Path(setup.checkpoints).mkdir(parents=True, exist_ok=True)
        (Path(setup.checkpoints) / "run_settings.json").write_text(json.dumps(settings_learned_from(vars(cfg))))
    if setup.resume_from:
        print(f"Resuming from {setup.resume_from} (step {checkpoint_step(setup.resume_from)}); "
              f"pass --resume false to start over")
    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.add_callback(TrainingWatch(trainer, save_seconds=60 * cfg.save_minutes))
    if step_graphs := getattr(trainer.model, "step_graphs", None):  # CUDA_GRAPHS: recorded as training begins
        trainer.add_callback(step_graphs)

# A stop asked for (Ctrl-C, a kill), remembered: the KeyboardInterrupt it raises can be swallowed by a library
# that catches everything (datasets 5.2 hashes a transform inside a bare `except:`), and then the run would go on.
STOP_ASKED = threading.Event()

def ask_to_stop(signum, frame):
    STOP_ASKED.set()
    raise KeyboardInterrupt

def stop_if_asked():
    """Raise the KeyboardInterrupt again if a stop was asked for and swallowed: after each phase and each step."""
    if STOP_ASKED.is_set():
        raise KeyboardInterrupt

@contextlib.contextmanager
def one_line_on_stop_or_error():
    """main()'s frame: Ctrl-C or a kill (SIGTERM) at any moment, a problem the user can fix (UserError), a full disk
    or memory end with one line saying what is kept and what to do, and status 1; a bug keeps its traceback.
    Yields where main() puts the settings (for the line after a stop) and finds the status."""
    outcome = SimpleNamespace(parsed=(None, None), status=0)
    handlers = {sig: signal.signal(sig, ask_to_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    STOP_ASKED.clear()
    # Python prints and ignores an exception raised in a finalizer (__del__): a Ctrl-C landing in one is remembered
    # instead, and stops the run at the next check. (Sent again from a thread, it could land after the run's end.)
    unraisable_hook = sys.unraisablehook
    sys.unraisablehook = lambda event: (STOP_ASKED.set() if issubclass(event.exc_type, KeyboardInterrupt)
                                        else unraisable_hook(event))
    try:
        yield outcome
        stop_if_asked()  # swallowed in the last phase: the line says what was done
    except (Exception, KeyboardInterrupt) as error:
        message = one_line(error, *outcome.parsed)  # (a bug is raised again, with its traceback)
        if not isinstance(error, KeyboardInterrupt) or is_main_process():  # under torchrun every process stops
            print(f"error: {message}", file=sys.stderr, flush=True)
        outcome.status = 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        sys.unraisablehook = unraisable_hook

def one_line(error, cfg, args):
    """What the user reads when the run ends early, and can act on; raises the error again if it is a bug."""
    # Besides the input, the user can fix a full disk and a batch too big for the memory: each gets its line too.
    disk_full = getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)
    no_memory = isinstance(error, torch.OutOfMemoryError) or any(  # a CPU's and a Mac's are RuntimeErrors
        text in str(error) for text in ("DefaultCPUAllocator: can't allocate", "MPS backend out of memory"))
    # The output piped into a program that has stopped reading (| head) stops the run too, as Ctrl-C does.
    if pipe_closed := isinstance(error, BrokenPipeError) and stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what Python writes on exit goes nowhere
    if not isinstance(error, (UserError, KeyboardInterrupt)) and not (disk_full or no_memory or pipe_closed):
        raise error
    for bar in list(getattr(tqdm, "_instances", [])):  # close the progress bars: the message gets its line
        bar.close()
    message = str(error) if isinstance(error, UserError) else stopped(cfg, args)
    if disk_full:
        message = f"the disk is full; free some space, or give --output_dir a folder on another disk. {message}"
    if no_memory:
        message = (f"out of memory; halve --batch_size and double --gradient_accumulation_steps (updates of as "
                   f"many reviews, in less memory), or lower --max_length or, if it was evaluating, "
                   f"--eval_batch_size. {message}")
    return message

def stopped(cfg, args):
    """The line after Ctrl-C or a kill. Saves are atomic: only checkpoints can be left, and a rerun finds them."""
    if args is not None and args.compare:
        return "Stopped the comparison; the same command goes on from the run it stopped in."
    if cfg is None or args.predict or args.merge:
        return "Stopped; nothing was left half-written."
    out = output_dir(cfg)
    with contextlib.suppress(UserError):  # (another run's checkpoints: this one starts over)
        if checkpoint := find_resume_checkpoint(cfg, out / "checkpoints"):
            return f"Stopped; the last checkpoint is {checkpoint}: run the same command again to resume from it"
    # Saved, and no run in progress: stopped after the save, or before a new run began.
    saved = read_json(out / "results.json").get("config", {})
    if settings_behind_figures(saved) == settings_behind_figures(vars(cfg)) and not (out / "checkpoints").exists():
        return f"Stopped; {out} holds the model trained with these settings; the same command would train it again."
    return ("Stopped before this run saved a checkpoint: the same command starts over." if cfg.resume else
            "Stopped; with --resume false the same command starts over.")

def checkpoint_arguments(cfg):
    # A LoRA checkpoint is a few MB; a full fine-tuning one ~1.5 GB (the weights and AdamW's state).
    steps = cfg.save_steps * (10 if cfg.full_finetune else 1)
    return dict(save_strategy="steps" if steps else "epoch", save_steps=steps or 1, save_total_limit=cfg.save_total_limit)


# -----------------------------------------------------------------------------
# device and precision, and how long a CPU run will take

def is_main_process():  # under torchrun every process runs this file; the first one prints and saves
    return int(os.environ.get("RANK", "0")) == 0

def pick_device_and_precision(cfg):
    if torch.cuda.is_available():
        # bf16 has fp32's range, so it needs no loss scaling. GPUs before Ampere (a T4, a V100) only
        # emulate bf16, slowly, and torch counts that as support unless told not to: fp16 there.
        device, name = "cuda", torch.cuda.get_device_name()
        auto = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    elif torch.backends.mps.is_available():
        device, name, auto = "mps", "Apple GPU", "fp32"
    else:
        # CPUs with bf16 arithmetic (AVX512-BF16) train faster in bf16; elsewhere bf16 is emulated and
        # far slower than fp32 (pytorch/pytorch issue 146508). torch has no public test for it yet.
        native_bf16 = torch.cpu.get_capabilities().get("avx512_bf16", False)
        device, name, auto = "cpu", "CPU", "bf16" if native_bf16 else "fp32"
    precision = auto if cfg.precision == "auto" else cfg.precision
    if device != "cuda" and precision == "fp16":
        raise UserError("--precision fp16 needs a CUDA GPU and there is none here; use auto (bf16 where this "
                        "machine computes it, else fp32) or fp32")
    if device == "cpu" and precision == "bf16" and auto != "bf16":
        print("Warning: this CPU has no bf16 arithmetic, so bf16 is emulated here and can be many times "
              "slower than fp32 (--precision auto would use fp32)")
    return device, name, precision

# What a CPU run suggests when it needs more than half an hour, about what this one takes on 2 cores without
# bf16. Its 250 steps are few for a new adapter, which learns more of the task in them with larger steps
# (measured on real pretrained weights: benchmarks/README.md).
QUICK_RUN = {"max_train_samples": 2000, "max_eval_samples": 500, "num_epochs": 1, "max_length": 256,
             "learning_rate": 1e-3}

def describe_run(cfg, setup, trainer):
    n_train, n_test = len(trainer.train_dataset), len(trainer.eval_dataset)
    per_step = cfg.batch_size * setup.world * cfg.gradient_accumulation_steps  # reviews per optimizer update
    steps = math.ceil(n_train / per_step)
    if cfg.full_finetune:  # (for LoRA, peft prints this line)
        n = trainer.model.num_parameters()
        print(f"trainable params: {n:,} || all params: {n:,} || trainable%: 100.0000")
    compiled = (", torch.compile" + " with CUDA graphs" * (setup.device == "cuda")) * cfg.torch_compile
    compiled += ", each training step replayed as CUDA graphs" * bool(getattr(trainer.model, "step_graphs", None))
    gpus, processes = trainer.gpus_found, f", {setup.world} processes" * (setup.world > 1)
    one_gpu = f", 1 of {gpus} GPUs (torchrun --nproc_per_node {gpus} {Path(__file__).name} trains on all)" * (gpus > 1)
    print(f"Device: {setup.device} ({setup.device_name}), precision {setup.precision}{compiled}{processes}{one_gpu}")
    print(f"Training on {plural(n_train, 'review')}, evaluating on {n_test:,}; {plural(cfg.num_epochs, 'epoch')} x "
          f"{plural(steps, 'step')} of {per_step} reviews = {plural(steps * cfg.num_epochs, 'step')}, learning rate "
          f"{trainer.args.learning_rate:g}")
    if setup.device == "cpu" and not setup.resume_from:
        step_seconds, seconds = estimate_cpu_time(cfg, setup, trainer)
        trainer.cpu_estimate = {"estimated_step_seconds": step_seconds, "estimated_run_seconds": seconds}
        sizes = {"max_train_samples": n_train, "max_eval_samples": n_test, "num_epochs": cfg.num_epochs,
                 "max_length": cfg.max_length}
        bigger = seconds > 30 * 60 and any(size > QUICK_RUN[key] for key, size in sizes.items())
        quick = " For a quick run:" + "".join(f" --{k} {v}" for k, v in QUICK_RUN.items()) if bigger else ""
        total = f"{max(seconds, 1):.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else \
            f"{seconds / 3600:.1f} h"
        step = f"{step_seconds:.2g}" if step_seconds < 10 else f"{step_seconds:.0f}"  # 0.012, 6.9, 42
        print(f"No GPU found: training runs on the CPU. One step takes about {step} s here, so this run needs "
              f"roughly {total}.{quick}")
    stop_if_asked()

def plural(n, noun):  # 1 step, 2 steps
    return f"{n:,} {noun}{'s' * (n != 1)}"

def estimate_cpu_time(cfg, setup, trainer):
    """Time one real batch on reviews of average length, and scale it up: rough, but measured. Returns the
    seconds of a step (GRADIENT_ACCUMULATION_STEPS batches) and of the whole run."""
    train, model, lengths = trainer.train_dataset, trainer.model, token_counts(trainer.train_dataset)
    mean = sum(lengths) / len(lengths)
    typical = sorted(range(len(train)), key=lambda i: abs(lengths[i] - mean))
    batch = trainer.data_collator([train[i] for i in typical[:cfg.batch_size]])
    model.train()
    # Uncompiled, and with the random generator put back after: training's dropout draws as it would have.
    with torch.random.fork_rng(devices=[]), torch.compiler.set_stance("force_eager"):
        for _ in range(2):  # the first step of a new shape is slower: time the second
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setup.precision == "bf16"):
                model(**batch).loss.backward()
        seconds = time.perf_counter() - started
        model.zero_grad(set_to_none=True)
        # Evaluation runs forward only: about a third of a training step when the backward pass goes through
        # every block, about half when only the top half of them is adapted (LORA_TOP_BLOCKS). So it is timed too.
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=setup.precision == "bf16"):
            started = time.perf_counter()
            model(**batch)
            per_review = (time.perf_counter() - started) / len(batch["labels"])
        model.train()
    batches = math.ceil(len(train) / cfg.batch_size / setup.world) * cfg.num_epochs
    # (per review of the typical batch's length: the test reviews may be read longer, EVAL_MAX_LENGTH)
    evaluations = cfg.num_epochs * sum(token_counts(trainer.eval_dataset)) / mean * per_review
    return seconds * cfg.gradient_accumulation_steps, batches * seconds + evaluations


# -----------------------------------------------------------------------------
# results: results.json, the curves, the model card, the summary after training, the --compare table

def collect_results(cfg, setup, trainer, trained, metrics):
    model, seconds, n_train = trainer.model, sum(trainer.epoch_seconds), len(trainer.train_dataset)
    # The whole run's training loss, from the logged ones: the Trainer's covers only the steps since a resume.
    logs = logged(trainer.state.log_history, "loss")
    steps = [step - before for (step, _), (before, _) in zip(logs, [(0, 0)] + logs)]
    trainable, total = model.num_parameters(only_trainable=True), model.num_parameters()
    # The process's peak memory, in bytes on macOS, KiB on Linux; not on Windows.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) if resource else None
    return {
        "method": "full" if cfg.full_finetune else "lora",
        **{k: metrics[f"eval_{k}"] for k in ("accuracy", "f1", "precision", "recall")},
        # rows: true negative, true positive; columns: predicted negative, predicted positive
        "confusion_matrix": [[metrics["eval_true_negatives"], metrics["eval_false_positives"]],
                             [metrics["eval_false_negatives"], metrics["eval_true_positives"]]],
        "eval_loss": metrics["eval_loss"],
        "train_loss": sum(n * loss for n, (_, loss) in zip(steps, logs)) / sum(steps),
        "trainable_params": trainable, "all_params": total, "trainable_percent": 100 * trainable / total,
        "learning_rate": trainer.args.learning_rate,
        "train_samples": n_train, "eval_samples": len(trainer.eval_dataset), "max_length": max_tokens(cfg, model),
        "eval_max_length": eval_tokens(cfg, model),  # (with TRUNCATION in "config": which tokens were read)
        # Time in training steps, without the evaluations; a resumed run cannot say it for the whole run.
        "train_seconds": None if setup.resume_from else seconds,
        "epoch_seconds": trainer.epoch_seconds,  # the first includes warm-up (and compiling, if on)
        "train_samples_per_second": None if setup.resume_from else n_train * cfg.num_epochs / seconds,
        # Loading, tokenizing, training and evaluating (not the imports before, nor the save after: seconds)
        "run_seconds": None if setup.resume_from else time.monotonic() - setup.started,
        "eval_samples_per_second": metrics.get("eval_samples_per_second"),
        # The CPU estimate printed before training, to set beside run_seconds (a GPU run, or a resumed one, has none)
        **getattr(trainer, "cpu_estimate", {"estimated_step_seconds": None, "estimated_run_seconds": None}),
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if setup.device == "cuda" else None,
        "peak_process_memory_gb": peak / 1e9 if peak else None,
        "device": setup.device_name, "training_precision": setup.precision, "processes": setup.world, "config": vars(cfg),
        **({"resumed_from_step": checkpoint_step(setup.resume_from)} if setup.resume_from else {}),
    }

def save_results(folder, results, trainer):
    """Beside the weights: results.json, the Trainer's log history and its curves, and a model card."""
    weights = folder / ("adapter_model.safetensors" if results["method"] == "lora" else "model.safetensors")
    results = {**results, "saved_weights_mb": weights.stat().st_size / 1e6}
    if results["method"] == "lora":  # what the adapter changed, beside it
        results["what_lora_learned"] = what_lora_learned(trainer.model)
        plot_what_lora_learned(results["what_lora_learned"], folder / "what_lora_learned.png")
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    (folder / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    plot_curves({results["method"]: trainer.state.log_history}, folder / "training_curves.png")
    write_model_card(folder, Path(results["config"][f"{'full_' * (results['method'] == 'full')}output_dir"]).name,
                     results)
    if (Path(trainer.args.output_dir) / "runs").is_dir():  # TensorBoard's event files, kept with the model
        shutil.copytree(Path(trainer.args.output_dir) / "runs", folder / "runs")

def what_lora_learned(model):
    """For each adapted weight W (GPT-2's c_attn as its queries, keys and values apart, as the model splits its
    output): the size of LoRA's change, |dW| / |W| (Frobenius norms), the singular values of dW, and how many of
    them hold 90% of the change (of |dW|^2, the sum of their squares). dW = scale * B A has rank r at most: its
    singular values are those of an r x r matrix, from the QR factors of B and of A transposed, without an SVD of
    W's size. A DoRA layer also rescales W's columns: its change is the merged weight's, of any rank. (W as the
    run holds it: in bf16 where it trained in bf16, which moves |W| by less than 0.1%.)"""
    layers = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or not layer.lora_A:
            continue
        adapter, base = layer.active_adapters[0], layer.get_base_layer()
        weight = (base.weight.T if layer.fan_in_fan_out else base.weight).detach().float()  # out x in
        scaled_b = layer.lora_B[adapter].weight.detach().float() * layer.scaling[adapter]
        r_a = torch.linalg.qr(layer.lora_A[adapter].weight.detach().float().T)[1]
        change = merged_change(layer, adapter) if layer.use_dora.get(adapter) else None
        # named as the model names it (encoder or decoder, then e.g. self_attn.q_proj), GPT-2's c_attn by its parts
        stack = next((f"{s} " for s in ("encoder", "decoder") if f".{s}." in f".{name}."), "")
        parts = ["query", "key", "value"] if model.config.model_type == "gpt2" and name.endswith("c_attn") else [
            stack + ".".join(name.split(".")[-2:])]
        for i, (part, rows) in enumerate(zip(parts, weight.split(len(weight) // len(parts)))):
            picked = slice(i * len(rows), (i + 1) * len(rows))
            if change is None:  # the r x r core: dW = Q_b (R_b R_a^T) Q_a^T, with orthonormal Q_b and Q_a
                values = torch.linalg.svdvals(torch.linalg.qr(scaled_b[picked])[1] @ r_a.T)
            else:
                values = torch.linalg.svdvals(change[picked])
            share = (values ** 2).cumsum(0) / (values ** 2).sum() if values.any() else values
            layers.append({"block": next((int(n) for n in name.split(".") if n.isdigit()), None), "weight": part,
                           "relative_change": float(values.norm() / rows.norm()),
                           "singular_values": values.tolist(),
                           "directions_for_90_percent": int((share < 0.9).sum()) + 1 if values.any() else 0})
    top = max(layers, key=lambda layer: layer["relative_change"])
    return {"rank": int(max(len(layer["singular_values"]) for layer in layers)), "layers": layers,
            "mean_relative_change": sum(layer["relative_change"] for layer in layers) / len(layers),
            "largest": {"block": top["block"], "weight": top["weight"], "relative_change": top["relative_change"]},
            "median_directions_for_90_percent": sorted(layer["directions_for_90_percent"] for layer in layers)[
                len(layers) // 2]}

def merged_change(layer, adapter):
    """A DoRA layer's change, out x in: its weight merged (PEFT's own merge, undone after) less the weight."""
    weight = layer.get_base_layer().weight
    before = weight.detach().clone()
    layer.merge(adapter_names=[adapter])
    change = weight.detach().float() - before.float()
    layer.unmerge()
    weight.data.copy_(before)  # (unmerging divides again: back to the very bits)
    return change.T if layer.fan_in_fan_out else change

def lora_learned_sentence(learned):
    """What the adapter changed, in a sentence: the summary after training and the model card say it."""
    largest = learned["largest"]
    where = f"block {largest['block']}'s {largest['weight']}" if largest["block"] is not None else largest["weight"]
    return (f"the adapter changed the weights it adapts by {learned['mean_relative_change']:.2%} on average "
            f"(|dW| / |W|), most in {where} ({largest['relative_change']:.2%}); of rank {learned['rank']}, "
            f"{plural(learned['median_directions_for_90_percent'], 'direction')} hold 90% of the change in the "
            f"median weight")

def plot_what_lora_learned(learned, path):
    """Left: the size of the change per block, a line per adapted weight; right: the singular values of the
    change for the lowest, middle and top adapted blocks, against the rank r."""
    figure = Figure(figsize=(12, 3.5), layout="constrained")
    change_panel, values_panel = figure.subplots(1, 2)
    names = list(dict.fromkeys(layer["weight"] for layer in learned["layers"]))
    for name in names:
        points = [(layer["block"] or 0, 100 * layer["relative_change"]) for layer in learned["layers"]
                  if layer["weight"] == name]
        change_panel.plot(*zip(*points), "o-", label=name)
    blocks = sorted({layer["block"] or 0 for layer in learned["layers"]})
    shown = sorted({blocks[0], blocks[len(blocks) // 2], blocks[-1]})
    top_name = learned["largest"]["weight"]
    for block in shown:
        values = next(layer["singular_values"] for layer in learned["layers"]
                      if (layer["block"] or 0) == block and layer["weight"] == top_name)
        values_panel.plot(range(1, len(values) + 1), values, "o-", label=f"block {block}")
    values_panel.axvline(learned["rank"], color="gray", linestyle="--", label=f"r = {learned['rank']}")
    values_panel.set_ylim(bottom=0)
    change_panel.set(title="size of the change, |dW| / |W|", xlabel="block", ylabel="%")
    values_panel.set(title=f"singular values of dW ({top_name})", xlabel="direction", ylabel="singular value")
    for panel in (change_panel, values_panel):
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        panel.grid(alpha=0.3)
        panel.legend()
    figure.savefig(path, dpi=100)

def logged(history, *keys):
    """(step, value of each key) for each entry of a Trainer's log history that has them all."""
    return [(log["step"], *(log[key] for key in keys)) for log in history if all(key in log for key in keys)]

def plot_curves(runs, path):
    """The loss on the training batches and on the test reviews, and the accuracy, by step: a colour per run."""
    figure = Figure(figsize=(12, 3.5), layout="constrained")
    loss_panel, accuracy_panel = figure.subplots(1, 2)
    for name, history in runs.items():
        train, evals = logged(history, "loss"), logged(history, "eval_loss", "eval_accuracy")
        run = f"{name}: " if len(runs) > 1 else ""
        line, = loss_panel.plot([s for s, _ in train], [loss for _, loss in train], label=f"{run}training batches")
        loss_panel.plot([s for s, _, _ in evals], [loss for _, loss, _ in evals], "o--", color=line.get_color(),
                        label=f"{run}test reviews")
        accuracy_panel.plot([s for s, _, _ in evals], [a for _, _, a in evals], "o-", color=line.get_color(), label=name)
    last = max((log["step"] for history in runs.values() for log in history), default=1)
    for panel, title in ((loss_panel, "loss"), (accuracy_panel, "accuracy on the test reviews")):
        panel.set(title=title, xlabel="step", ylabel=title.split()[0], xlim=(0, last * 1.03))
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        panel.grid(alpha=0.3)
        if panel is loss_panel or len(runs) > 1:
            panel.legend()
    figure.savefig(path, dpi=100)

def write_model_card(folder, name, results, merged_from=None):
    """A README.md with the metadata the Hub links models by, what the model is, how it was trained, its
    results and how to load it. peft's own card is an empty template: this one replaces it."""
    cfg, lora = results["config"], results["method"] == "lora" and not merged_from
    # Hub ids as they are; local folders by their names only (a path on this machine means nothing elsewhere).
    base = Path(cfg["model_name"]).name if Path(cfg["model_name"]).is_absolute() else cfg["model_name"]
    data = None if looks_like_a_path(cfg["dataset_name"]) else cfg["dataset_name"]
    data_name = data or Path(cfg["dataset_name"]).name
    card_data = ModelCardData(
        library_name="peft" if lora else "transformers", base_model=base, pipeline_tag="text-classification",
        datasets=[data] if data else None, tags=["sentiment-analysis", results["method"]], model_name=name,
        eval_results=[EvalResult(task_type="text-classification", dataset_type=data_name, dataset_name=data_name,
                                 dataset_split="test", metric_type=metric, metric_value=round(results[metric], 4))
                      for metric in ("accuracy", "f1")])
    what = (f"A LoRA adapter for `{base}`" if lora else f"`{base}` with a LoRA adapter merged into its weights"
            if merged_from else f"`{base}` with every weight fine-tuned")
    targets = cfg["target_modules"] if isinstance(cfg["target_modules"], str) else ", ".join(cfg["target_modules"])
    top = f" of the top {plural(cfg['lora_top_blocks'], 'block')}" if cfg.get("lora_top_blocks") else ""
    how = (f"{'DoRA' if cfg.get('use_dora') else 'LoRA'}, r={cfg['lora_r']}, alpha={cfg['lora_alpha']}, dropout "
           f"{cfg['lora_dropout']}, on {targets}{top}" if results["method"] == "lora" else "full fine-tuning")
    trained, truncation = results.get("max_length", cfg["max_length"]), cfg.get("truncation", "start")
    read = results.get("eval_max_length", trained)  # what the evaluation read
    kept = {"start": "its first", "end": "its last", "start+end": "its first quarter and its end: in all"}[truncation]
    # An adapter's pipeline would take the base's config and tokenizer: labels, pad token, this tokenizer given
    where = "# this folder, or its Hub id once uploaded"
    examples = '["A wonderful film.", "Two hours I will never get back."]'
    code = ["from transformers import AutoTokenizer, pipeline", "",
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")  {where}']
    code += [f'classifier = pipeline("text-classification", model="{name}", tokenizer=tokenizer, model_kwargs={{',
             '    "id2label": {0: "negative", 1: "positive"}, "pad_token_id": tokenizer.pad_token_id})'] if lora else [
        f'classifier = pipeline("text-classification", model="{name}", tokenizer=tokenizer)']
    if truncation == "start+end":  # not a tokenizer option: the texts are cut before the pipeline reads them
        first = round(read * 0.25)
        code += ["", f"def start_and_end(text):  # what training read of a review over {read} tokens",
                 '    ids = tokenizer(text, verbose=False)["input_ids"]',
                 f"    return text if len(ids) <= {read} else tokenizer.decode(ids[:{first}] + ids[{first - read}:])",
                 "", f"print(classifier([start_and_end(text) for text in {examples}], batch_size=8))"]
    else:
        code += ["", f"print(classifier({examples}, batch_size=8, truncation=True,",
                 f"                 max_length={read}))  # a longer review keeps {kept} {read} tokens"]
    learned = (f"\n\nWhat LoRA learned: {lora_learned_sentence(results['what_lora_learned'])}" + (
        " (`what_lora_learned.png`)." if lora else ".")) if results.get("what_lora_learned") else ""
    body = f"""
# {name}

{what}: it tells whether a movie review is negative or positive.{f" Merged from `{merged_from}`." if merged_from else ""}

Trained with `fine_tune_lora.py` by {how}: {cfg['num_epochs']} epoch(s) of {results['train_samples']:,} reviews
from `{data_name}`, at most {trained} tokens each (a longer one: {kept} {trained}), batch {cfg['batch_size']},
learning rate {results['learning_rate']:g}, {results['training_precision']}, seed {cfg['seed']};
{results['trainable_params']:,} of {results['all_params']:,} weights trained.

On {results['eval_samples']:,} test reviews, read up to {read} tokens each: accuracy {results['accuracy']:.4f}, F1
{results['f1']:.4f}, precision {results['precision']:.4f}, recall {results['recall']:.4f}.{learned}

```python
{chr(10).join(code)}
```
"""
    ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}").save(folder / "README.md")

# name, the field of results.json that the ratio compares, and how the value is written
RESULT_ROWS = [
    ("accuracy", "accuracy", "{accuracy:.4f}"),
    ("F1", "f1", "{f1:.4f}"),
    ("trainable parameters", "trainable_params", "{trainable_params:,} ({trainable_percent:.2f}%)"),
    ("training time", "train_seconds", "{train_seconds:.1f} s"),
    ("training samples/s", "train_samples_per_second", "{train_samples_per_second:.1f}"),
    ("whole run", "run_seconds", "{run_seconds:.1f} s"),
    ("peak GPU memory", "peak_gpu_memory_gb", "{peak_gpu_memory_gb:.2f} GB"),
    ("peak process memory", "peak_process_memory_gb", "{peak_process_memory_gb:.2f} GB"),
    ("saved weights on disk", "saved_weights_mb", "{saved_weights_mb:.2f} MB"),
]
MISSING = {"train_seconds": "n/a (resumed)", "train_samples_per_second": "n/a (resumed)", "run_seconds": "n/a (resumed)",
           "peak_gpu_memory_gb": "n/a (no GPU)"}

def result_rows(runs):
    """(name, one cell per run, last run / first run): the summary's rows, and the --compare table's."""
    rows = []
    for name, key, template in RESULT_ROWS:
        values = [run.get(key) for run in runs]
        cells = [template.format(**run) if run.get(key) is not None else MISSING.get(key, "n/a") for run in runs]
        rows.append((name, cells, f"{values[-1] / values[0]:.2f}x" if None not in values and values[0] else "n/a"))
    return rows

def print_summary(out_dir):  # what results.json holds, as a table
    results = read_json(out_dir / "results.json")
    rows = result_rows([results]) + [("saved to", [str(out_dir)], "")]
    width = max(len(name) for name, _, _ in rows)
    print("\n" + "\n".join(f"{name:<{width}}  {cells[0]}" for name, cells, _ in rows), flush=True)
    if learned := results.get("what_lora_learned"):
        print(f"What LoRA learned: {lora_learned_sentence(learned)} ({out_dir / 'what_lora_learned.png'})")

def plan_comparison(cfg, argv, variants):
    """{name: (settings, command-line arguments)} for each run of --compare. A variant that does not parse,
    or repeats another, stops the comparison here, before anything trains."""
    if not variants:
        runs = [("lora", [*argv, "--full_finetune", "false"]), ("full", [*argv, "--full_finetune", "true"])]
    else:  # each variant in a folder of its own, named after it
        dirs = ("--output_dir", "--full_output_dir")
        argv = [arg for i, arg in enumerate(argv) if arg.split("=")[0] not in dirs and (i == 0 or argv[i - 1] not in dirs)]
        runs = []
        for variant in variants:
            words = shlex.split(variant)
            if {"--output_dir", "--full_output_dir", "--compare", "--predict", "--merge"} & set(words):
                raise UserError(f"--compare variant {variant!r}: a variant changes training settings only; "
                                "other options go before --compare")
            name = " ".join(words) or "base settings"
            folder = Path(f"{cfg.output_dir}-compare") / re.sub(r"[^\w.=-]+", "-", name.replace("--", "")).strip("-")
            runs.append((name, [*argv, *words, "--output_dir", str(folder), "--full_output_dir", str(folder)]))
    plan, seen = {}, {}
    for name, args in runs:
        try:
            settings, _ = parse_args(args)
        except UserError as error:  # a variant of one word that fails: most likely its quotes were left out
            hint = "" if " " in name else '; variants go last, each quoted whole: --compare "--lora_r 4" "--lora_r 16"'
            raise UserError(f"--compare variant {name!r}: {error}{hint}") from None
        key, folder = json.dumps(settings_behind_figures(vars(settings)), sort_keys=True), output_dir(settings)
        if key in seen:
            raise UserError(f"--compare variants {seen[key]!r} and {name!r} train with the same settings; drop one")
        if folder in seen:  # the second would replace the first's results
            raise UserError(f"--compare runs {seen[folder]!r} and {name!r} would both save to {folder}; "
                            f"give them different folders or names")
        seen[key] = seen[folder] = name
        plan[name] = settings, args
    return plan

TITLES = {"lora": "LoRA", "full": "full fine-tuning"}  # the columns of a plain --compare

def comparison_table(results):
    runs, titles = list(results.values()), [TITLES.get(name, name) for name in results]
    ratio = len(runs) == 2  # two runs: the second's figures over the first's

    def each(key):  # the value the runs share, or each one's in column order ("fp32 / bf16")
        values = [run[key] if key in run else run["config"][key] for run in runs]  # (older results: no max_length)
        shown = [Path(v).name if key == "model_name" else f"{v:,}" if type(v) is int else v for v in values]
        return " / ".join(dict.fromkeys(shown))
    lines = [f"{each('device')}, {each('training_precision')}; model {each('model_name')}; {each('train_samples')} "
             f"train / {each('eval_samples')} eval reviews, {each('num_epochs')} epoch(s), batch {each('batch_size')}, "
             f"max length {each('max_length')}", "",
             f"| | {' | '.join(titles)} |" + (f" {titles[1]} / {titles[0]} |" if ratio else ""),
             "| --- " * (len(titles) + 1 + ratio) + "|"]
    lines += [f"| {name} | {' | '.join(cells)} |" + (f" {r} |" if ratio else "")
              for name, cells, r in result_rows(runs)]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:  # Python exits: a Ctrl-C now just ends it, quietly. In IPython (%run) it goes on: Ctrl-C as before.
        goes_on = sys.flags.interactive or hasattr(builtins, "__IPYTHON__")
        signal.signal(signal.SIGINT, sigint_before if goes_on else signal.SIG_DFL)
