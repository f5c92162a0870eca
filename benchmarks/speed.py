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
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace


def stopped(*_):
    print("Stopped", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":  # Ctrl-C while the libraries load: one line, no traceback (main() takes over after)
    signal.signal(signal.SIGINT, stopped)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fine_tune_lora as ft  # noqa: E402

NAIVE = dict(precision="fp32", group_by_length=False, torch_compile=False, cuda_graphs=False)  # + padding to MAX_LENGTH, eval batch 8


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
    # each training step recorded once per padded length (64, 128...) and replayed (CUDA_GRAPHS)
    "script, CUDA graphs": (dict(cuda_graphs=True), {}),
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
    parser.add_argument("--budget", type=float, help="seconds all recipes together may take: the last ones get less")
    parser.add_argument("--profile_steps", type=int, default=5 if gpu else 0,
                        help="profile this many steps at the end of each recipe's first epoch (0: none)")
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

    def padded(batch, multiple=cfg.pad_to_multiple_of):
        return len(batch) * math.ceil(max(batch) / multiple) * multiple

    def padded_for_training(batch):  # CUDA_GRAPHS pads full training batches to a multiple of 64 on a GPU
        graphed = cfg.cuda_graphs and torch.cuda.is_available() and len(batch) == cfg.batch_size
        return padded(batch, ft.StepGraphs.multiple if graphed else cfg.pad_to_multiple_of)

    if cfg.group_by_length:
        order = list(ft.DistributedLengthGroupedSampler(cfg.batch_size, num_replicas=1, rank=0, lengths=lengths_train,
                                                        seed=cfg.seed))  # as FastTrainer._get_train_sampler makes it
    else:
        order = torch.randperm(len(lengths_train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    train = [[lengths_train[i] for i in order[s:s + cfg.batch_size]] for s in range(0, len(order), cfg.batch_size)]
    size = cfg.eval_batch_size or (64 if torch.cuda.is_available() else cfg.batch_size)  # as the script does
    lengths_eval = sorted(lengths_eval)  # as the script orders the test set
    evals = [lengths_eval[s:s + size] for s in range(0, len(lengths_eval), size)]
    return (sum(map(sum, train)) / sum(map(padded_for_training, train)), sum(map(sum, evals)) / sum(map(padded, evals)))


def report_progress(profile_steps, profile):
    """Make the Trainer print each finished step and the seconds since it was created: a recipe that
    runs out of time can then still say how far it got, and when its first step ended (torch.compile
    compiles during the first step). With profile_steps, the last steps of the first epoch are profiled
    into the dict profile: by then the compiled recipes have met most batch lengths, and the timed epoch,
    the last, is not slowed by the profiler."""

    class ReportingTrainer(ft.FastTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.created = time.perf_counter()
            if profile_steps:
                self.add_callback(ProfileSteps(profile_steps, profile))

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            print(f"STEP {self.state.global_step + 1} {self.state.max_steps} "
                  f"{time.perf_counter() - self.created:.1f}", flush=True)
            return loss

    ft.FastTrainer = ReportingTrainer


class ProfileSteps(ft.TrainerCallback):
    """torch.profiler over the last steps of the first epoch, waiting for the GPU at both ends so that
    the window holds exactly their work; its summary goes into the dict profile."""

    def __init__(self, steps, profile):
        self.steps, self.profile, self.profiler = steps, profile, None

    def on_step_begin(self, args, state, control, **kwargs):
        import torch

        per_epoch = state.max_steps // math.ceil(args.num_train_epochs)
        if state.global_step == max(0, per_epoch - self.steps) and self.profiler is None:
            gpu = torch.cuda.is_available()
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
            try:
                self.profiler = torch.profiler.profile(activities=activities)
                sync()
                self.profiler.__enter__()
                self.first, self.started = state.global_step, time.perf_counter()
            except Exception as error:  # a failed profile must not cost the recipe's timing
                self.profile["failed"], self.profiler = repr(error), False

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler and state.global_step - self.first == self.steps:
            try:
                sync()
                seconds = time.perf_counter() - self.started
                self.profiler.__exit__(None, None, None)
                self.profile.update(summarize_profile(self.profiler, self.steps, seconds))
            except Exception as error:
                self.profile["failed"] = repr(error)
            self.profiler = False


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summarize_profile(profiler, steps, seconds, top=8):
    """Per step: wall time; on a GPU, the time it was busy (kernels and copies, overlaps counted once)
    and the kernels that took most of it; on a CPU, the operators that took most of its time."""
    import torch

    summary = dict(steps=steps, step_ms=1000 * seconds / steps)
    device_events = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if device_events:
        busy, end = 0.0, -math.inf
        for start, stop in sorted((e.time_range.start, e.time_range.end) for e in device_events):
            busy += max(0.0, stop - max(start, end))
            end = max(end, stop)
        by_name = {}
        for e in device_events:
            by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us()
        summary.update(gpu_busy_ms=busy / 1000 / steps, gpu_idle_share=max(0.0, 1 - busy / 1e6 / seconds),
                       kernels_per_step=len(device_events) / steps)
        ranked = sorted(by_name.items(), key=lambda item: -item[1])
    else:
        ranked = sorted(((e.key, e.self_cpu_time_total) for e in profiler.key_averages()), key=lambda item: -item[1])
    summary["top"] = [dict(name=name[:120], ms_per_step=us / 1000 / steps) for name, us in ranked[:top]]
    return summary


def progress(output):
    """(steps done, steps in all, seconds to the end of the first step, steps per second over the last
    up to 50 steps) from a recipe's output."""
    steps = [line.split()[1:] for line in output.splitlines() if line.startswith("STEP ")]
    if not steps:
        return None
    last = steps[-min(51, len(steps)):]
    rate = (len(last) - 1) / (float(last[-1][2]) - float(last[0][2])) if len(last) > 1 else float("nan")
    return int(steps[-1][0]), int(steps[-1][1]), float(steps[0][2]), rate


def child_process(command, timeout, cwd=None):
    """Run a command in a session of its own (stopped with its workers on a timeout or Ctrl-C); its output."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True, cwd=cwd)
    try:
        return child.communicate(timeout=timeout)[0], child.returncode
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        return child.communicate()[0] + f"\n(not done after {timeout:.0f} s)", None
    except KeyboardInterrupt:
        os.killpg(child.pid, signal.SIGKILL)
        raise


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
    profile = {}
    report_progress(args.profile_steps, profile)
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
        peak_process_memory_gb=memory.peak or None, profile=profile or None)


def main():

    import torch
    import transformers

    args, gpu = parse_args()
    if args.child:  # one recipe, in a process of its own
        print("ROW " + json.dumps(run_recipe(args.child, args.model_folder, args)), flush=True)
        return
    workdir = tempfile.mkdtemp(prefix="speed-")
    model, model_note = model_folder(args, gpu, workdir)
    device = torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()})"
    rows, started = [], time.monotonic()
    for name in args.recipes:
        timeout = args.timeout if args.budget is None else min(args.timeout, args.budget - (time.monotonic() - started))
        if timeout < 10:
            rows.append(dict(recipe=name, failed="not run: the time budget was spent"))
            continue
        # Each recipe runs in a fresh process: its peak memory is its own, and a crash or a hang in
        # one (torch.compile is young) cannot hide the others' numbers.
        print(f"\n===== {name} =====", flush=True)
        command = [sys.executable, __file__, *sys.argv[1:], "--child", name, "--model_folder", model]
        # In a session of its own, so that a recipe out of time is stopped with its compiler's and data
        # loader's processes, which would otherwise go on taking the CPU from the next recipe.
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            output, failed = child.communicate(timeout=timeout)[0], f"exit status {child.wait()}"
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            output, failed = child.communicate()[0], f"not done after {timeout:.0f} s"
        except KeyboardInterrupt:  # Ctrl-C reaches this process alone: the recipe's must be stopped too
            os.killpg(child.pid, signal.SIGKILL)
            print(f"Stopped during the recipe {name!r}" + (f"; the recipes done before it are in {args.json}"
                                                           if args.json and rows else ""), file=sys.stderr)
            sys.exit(130)
        print("".join(line for line in output.splitlines(True) if not line.startswith("STEP ")), end="", flush=True)
        row = next((json.loads(line[4:]) for line in output.splitlines() if line.startswith("ROW ")), None)
        steps = progress(output)
        if row is None:
            row = dict(recipe=name, failed=failed + (" ({} of {} steps; the first took {:.0f} s; the last ones "
                                                     "{:.1f} steps/s)".format(*steps) if steps else ""))
        elif steps:
            row["first_step_seconds"] = steps[2]
        rows.append(row)
        if args.json:  # after every recipe, so that a run stopped later still leaves these rows
            Path(args.json).write_text(json.dumps(dict(rows=rows), indent=2))

    table = make_table(rows, gpu)
    head = (f"{datetime.date.today()}, {device}, torch {torch.__version__}, transformers {transformers.__version__}\n"
            f"model: {model_note}; {args.train_samples:,} train / {args.eval_samples:,} eval reviews from "
            f"{args.dataset}, {args.epochs} epochs, batch {ft.BATCH_SIZE}, max length {args.max_length}")
    print("\n" + head + "\n\n" + table + profiles(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header=head, rows=rows), indent=2))


def profiles(rows):
    """What each recipe's profiled steps spent their time on."""
    text = ""
    for row in rows:
        profile = row.get("profile")
        if not profile:
            continue
        text += f"\n\n{row['recipe']}: "
        if "failed" in profile:
            text += f"profile failed: {profile['failed']}"
            continue
        text += f"{profile['step_ms']:.1f} ms per step ({profile['steps']} steps at the end of the first epoch)"
        if "gpu_busy_ms" in profile:
            text += (f", the GPU busy {profile['gpu_busy_ms']:.1f} ms of it (idle {profile['gpu_idle_share']:.0%}), "
                     f"{profile['kernels_per_step']:.0f} kernels and copies per step")
        text += "; most time per step:\n"
        text += "\n".join(f"  {t['ms_per_step']:7.2f} ms  {t['name']}" for t in profile["top"])
    return text


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
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main()
    except KeyboardInterrupt:  # outside a recipe (main() stops one itself)
        stopped()
