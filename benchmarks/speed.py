"""
How much faster is fine_tune_lora.py's recipe than the naive one? Both run here, one after the other,
each in a fresh process of its own, on the same reviews, with the same hyperparameters (batch 8,
learning rate, schedule, MAX_LENGTH), and one table compares them.

    python benchmarks/speed.py                                  # GPT-2 small and IMDB from the Hub
    python benchmarks/speed.py --model ./gpt2 --dataset ./imdb  # local folders

The naive recipe is the usual tutorial's: fp32, every review padded to MAX_LENGTH, batches in random
order, the attention mask, GPT-2's own (Python) GELU and key/value cache, evaluation at the training
batch size, no compilation. The script's recipe is its defaults.
Training speed is taken from the last epoch, after warm-up (and compilation); the first epoch's time
is shown too. If the GPT-2 checkpoint cannot be loaded, the same architecture with random weights
stands in (pass --tokenizer if the Hub is unreachable): compute per token, speed and memory are the
real ones, accuracy is meaningless and is not shown. On a CPU a smaller model and subset are used:
the padding and overhead ratios are the point there, not the absolute speed.
"""
import argparse
import datetime
import functools
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fine_tune_lora as ft  # noqa: E402

NAIVE = dict(precision="fp32", group_by_length=False, torch_compile=False)  # + padding to MAX_LENGTH, eval batch 8


def no_speed_ups(model, tokenizer, cfg, run):
    """The model as transformers loads it: GPT-2's own (Python) GELU, the key/value cache on, the
    attention mask prepared at every step and used, every weight in fp32."""


def compile_whole_model(model, device, cuda_graphs=True):
    """The alternative to compiling each transformer block: the whole forward pass as one graph
    (one CUDA graph on a GPU), at the price of a longer compilation."""
    model.compile(dynamic=True, mode="reduce-overhead" if device == "cuda" and cuda_graphs else "default")


# The naive recipe is the script without any of its speed-ups: GPT-2's own Python GELU, the
# key/value cache, the attention mask, fp32, every review padded to MAX_LENGTH, random batches,
# eval batch 8.
UNDO_SPEED_UPS = dict(speed_up=no_speed_ups)

# name: (settings over the script's defaults, replacements for functions of the script)
RECIPES = {
    "naive": (NAIVE, UNDO_SPEED_UPS),
    "script": ({}, {}),  # fine_tune_lora.py's defaults
    # where "auto" picks bf16, the same in fp32: what the other speed-ups give without it
    "script, fp32": (dict(precision="fp32"), {}),
    "script, compiled": (dict(torch_compile=True), {}),
    "script, compiled without CUDA graphs": (
        dict(torch_compile=True), dict(compile_for_speed=functools.partial(ft.compile_for_speed, cuda_graphs=False))),
    # fewer distinct lengths, so fewer CUDA graphs to record, at the price of more padding
    "script, compiled, padded to x64": (dict(torch_compile=True, pad_to_multiple_of=64), {}),
    "script, whole model compiled": (dict(torch_compile=True), dict(compile_for_speed=compile_whole_model)),
}


def parse_args():
    import torch

    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", help="Hub id or folder of the model to time")
    parser.add_argument("--tokenizer", help="tokenizer folder for the random-weight stand-in (default: the model's)")
    parser.add_argument("--dataset", default="imdb", help="as fine_tune_lora.py's --dataset_name")
    parser.add_argument("--train_samples", type=int, default=4000 if gpu else 256)
    parser.add_argument("--eval_samples", type=int, default=2000 if gpu else 512)
    parser.add_argument("--epochs", type=int, default=2, help="the last epoch is the one timed (at least 2)")
    parser.add_argument("--max_length", type=int, default=ft.MAX_LENGTH)
    parser.add_argument("--recipes", nargs="+", default=["naive", "script"], choices=list(RECIPES))
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--timeout", type=float, default=900, help="seconds each recipe may take")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one recipe, print its row as JSON
    parser.add_argument("--model_folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.epochs = max(2, args.epochs)
    return args, gpu


def model_folder(args, gpu, workdir):
    """The model to time: the real checkpoint if it loads, else its architecture with random weights."""
    from transformers import AutoConfig, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    try:
        AutoConfig.from_pretrained(args.model)
        if gpu:
            return args.model, f"{args.model} (pretrained weights)"
    except (OSError, ValueError):  # offline, or not a model folder
        pass
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    # GPT-2 small: 12 layers, 768 wide, 124M weights. On a CPU, 2 layers 256 wide keep the run to minutes.
    small = {} if gpu else dict(n_layer=2, n_embd=256, n_head=4)
    config = GPT2Config(vocab_size=len(tokenizer), **small)
    folder = Path(workdir) / "random-gpt2"
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    size = "GPT-2 small architecture (124M)" if gpu else "a GPT-2 with 2 layers, 256 wide"
    return str(folder), f"{size}, random weights"


class PeakMemory:
    """Peak resident memory of this process while a recipe runs, sampled every 10 ms (Linux only):
    the process-wide peak would carry over from one recipe to the next."""

    def __enter__(self):
        import threading

        self.peak, self.done = 0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        status = Path("/proc/self/status")
        while not self.done.wait(0.01) and status.exists():
            rss = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS"))
            self.peak = max(self.peak, rss * 1024 / 1e9)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def padding_efficiency(cfg, lengths_train, lengths_eval):
    """Real tokens / processed tokens, for the batches this recipe makes in its first epoch."""
    import torch

    def padded(batch):
        return len(batch) * math.ceil(max(batch) / cfg.pad_to_multiple_of) * cfg.pad_to_multiple_of

    if cfg.group_by_length:
        order = list(ft.length_grouped_sampler(lengths_train, cfg.batch_size, cfg.seed))
    else:
        order = torch.randperm(len(lengths_train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    train = [[lengths_train[i] for i in order[s:s + cfg.batch_size]] for s in range(0, len(order), cfg.batch_size)]
    size = cfg.eval_batch_size or (64 if torch.cuda.is_available() else cfg.batch_size)  # as the script does
    lengths_eval = sorted(lengths_eval)  # as the script orders the test set
    evals = [lengths_eval[s:s + size] for s in range(0, len(lengths_eval), size)]
    return (sum(map(sum, train)) / sum(map(padded, train)), sum(map(sum, evals)) / sum(map(padded, evals)))


def report_progress():
    """Make the Trainer print each finished step and the seconds since it was created: a recipe that
    runs out of time can then still say how far it got, and when its first step ended (torch.compile
    compiles during the first step)."""

    class ReportingTrainer(ft.FastTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.created = time.perf_counter()

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            print(f"STEP {self.state.global_step + 1} {self.state.max_steps} "
                  f"{time.perf_counter() - self.created:.1f}", flush=True)
            return loss

    ft.FastTrainer = ReportingTrainer


def progress(output):
    """(steps done, steps in all, seconds to the end of the first step) from a recipe's output."""
    steps = [line.split()[1:] for line in output.splitlines() if line.startswith("STEP ")]
    if not steps:
        return None
    return int(steps[-1][0]), int(steps[-1][1]), float(steps[0][2])


def run_recipe(name, model, args):
    """Train with one recipe (in this process) and return its row of the table."""
    import torch
    from transformers import AutoTokenizer

    settings, replacements = RECIPES[name]
    cfg = SimpleNamespace(**{c.lower(): getattr(ft, c) for c in ft.CONSTANTS})
    cfg.__dict__.update(model_name=model, dataset_name=args.dataset, max_length=args.max_length,
                        max_train_samples=args.train_samples, max_eval_samples=args.eval_samples,
                        num_epochs=args.epochs, output_dir=tempfile.mkdtemp(prefix="speed-out-") + "/out",
                        save_steps=10 ** 9, resume=False)  # no checkpoints: they are not what is timed
    if name == "naive":
        cfg.__dict__.update(pad_to_multiple_of=cfg.max_length, eval_batch_size=cfg.batch_size)
    cfg.__dict__.update(settings)
    for function, replacement in replacements.items():
        setattr(ft, function, replacement)
    report_progress()
    tokenizer = AutoTokenizer.from_pretrained(model)

    def token_counts(reviews):
        return [len(ids) for ids in tokenizer(list(reviews["text"]), truncation=True, max_length=cfg.max_length)["input_ids"]]

    train_set, eval_set = ft.load_reviews(cfg)
    pad_train, pad_eval = padding_efficiency(cfg, token_counts(train_set), token_counts(eval_set))
    with PeakMemory() as memory:
        results = ft.fine_tune(cfg)
    from torch._dynamo.utils import counters

    return dict(
        compiled_graphs=counters["stats"]["unique_graphs"] if cfg.torch_compile else None,
        recipe=name, precision=results["training_precision"], compiled=cfg.torch_compile,
        train_samples_per_second=results["train_samples"] / results["epoch_seconds"][-1],
        first_epoch_seconds=results["epoch_seconds"][0],
        eval_samples_per_second=results["eval_samples_per_second"],
        padding_efficiency_train=pad_train, padding_efficiency_eval=pad_eval,
        peak_gpu_memory_gb=results["peak_gpu_memory_gb"] if torch.cuda.is_available() else None,
        peak_process_memory_gb=memory.peak or None)


def main():
    import subprocess

    import torch
    import transformers

    args, gpu = parse_args()
    if args.child:  # one recipe, in a process of its own
        print("ROW " + json.dumps(run_recipe(args.child, args.model_folder, args)), flush=True)
        return
    workdir = tempfile.mkdtemp(prefix="speed-")
    model, model_note = model_folder(args, gpu, workdir)
    device = torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()})"
    rows = []
    for name in args.recipes:
        # Each recipe runs in a fresh process: its peak memory is its own, and a crash or a hang in
        # one (torch.compile is young) cannot hide the others' numbers.
        print(f"\n===== {name} =====", flush=True)
        command = [sys.executable, __file__, *sys.argv[1:], "--child", name, "--model_folder", model]
        try:
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=args.timeout)
            output, failed = done.stdout, f"exit status {done.returncode}"
        except subprocess.TimeoutExpired as timeout:
            output, failed = timeout.stdout or "", f"not done after {args.timeout:.0f} s"
            if isinstance(output, bytes):
                output = output.decode(errors="replace")
        print("".join(line for line in output.splitlines(True) if not line.startswith("STEP ")), end="", flush=True)
        row = next((json.loads(line[4:]) for line in output.splitlines() if line.startswith("ROW ")), None)
        steps = progress(output)
        if row is None:
            row = dict(recipe=name, failed=failed + (" ({} of {} steps; the first took {:.0f} s)".format(*steps)
                                                     if steps else ""))
        elif steps:
            row["first_step_seconds"] = steps[2]
        rows.append(row)
        if args.json:  # after every recipe, so that a run stopped later still leaves these rows
            Path(args.json).write_text(json.dumps(dict(rows=rows), indent=2))

    table = make_table(rows, gpu)
    head = (f"{datetime.date.today()}, {device}, torch {torch.__version__}, transformers {transformers.__version__}\n"
            f"model: {model_note}; {args.train_samples:,} train / {args.eval_samples:,} eval reviews from "
            f"{args.dataset}, {args.epochs} epochs, batch {ft.BATCH_SIZE}, max length {args.max_length}")
    print("\n" + head + "\n\n" + table)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header=head, rows=rows), indent=2))


def make_table(rows, gpu):
    base = next((r for r in rows if r["recipe"] == "naive" and "failed" not in r), None)

    def ratio(row, key):
        return f" ({row[key] / base[key]:.1f}x)" if base and row is not base else ""

    memory = "peak GPU memory" if gpu else "peak process memory"
    key = "peak_gpu_memory_gb" if gpu else "peak_process_memory_gb"
    lines = [f"| recipe | train samples/s | first epoch | eval samples/s | padding efficiency train / eval | {memory} |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['recipe']} | failed: {row['failed']} | | | | |")
            continue
        notes = [row["precision"]] if row["precision"] not in row["recipe"] else []
        if row.get("compiled_graphs"):  # how often torch.compile compiled, and how long until the first step ended
            notes += [f"{row['compiled_graphs']} graph(s) compiled", f"first step {row['first_step_seconds']:.0f} s"]
        label = f"{row['recipe']} ({', '.join(notes)})" if notes else row["recipe"]
        lines.append(
            f"| {label} | {row['train_samples_per_second']:.0f}{ratio(row, 'train_samples_per_second')} "
            f"| {row['first_epoch_seconds']:.1f} s | {row['eval_samples_per_second']:.0f}"
            f"{ratio(row, 'eval_samples_per_second')} | {row['padding_efficiency_train']:.0%} / "
            f"{row['padding_efficiency_eval']:.0%} | {f'{row[key]:.2f} GB' if row[key] else 'n/a'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
