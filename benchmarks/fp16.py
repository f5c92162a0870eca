"""
The GPUs most beginners have (a T4 on Colab or Kaggle, a V100) compute no bf16, so PRECISION = "auto"
trains there in fp16: the frozen weights stored in fp16 and a gradient scaler. Does that path train as
bf16 does, and what do LoRA and full fine-tuning each cost on this GPU? One command answers both (on the GPU
machine, gpu_checks.py runs it as its second section):

    python benchmarks/fp16.py --tokenizer ./gpt2 --dataset ./imdb --json fp16.json

1. fp16 against bf16: one epoch on --train_samples reviews (default 2,000) with GPT-2 small's
   architecture and random weights, same seed, each in a process of its own: the optimizer steps the
   gradient scaler skipped for an overflow (and at which steps), the logged training loss side by side,
   the evaluation, then the saved adapter loaded as --predict loads it, classifying the test reviews again.
2. fine_tune_lora.py --compare on the same reviews (one epoch, batch 8, max length 512): LoRA against
   full fine-tuning, training samples/s, peak GPU memory and saved size.

On a GPU an fp16 run stands in for a T4's arithmetic, not for its speed. On a CPU, where fp16 cannot
train, fp32 stands in for it and a GPT-2 of 2 layers (speed.py's), so that the command can be tried.
"""
import argparse
import datetime
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (the model stand-in, and the script as a module: speed.ft)

ft = speed.ft


def parse_args():
    import torch

    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", help="Hub id or folder whose tokenizer (and, on a GPU, "
                        "weights if they load) are used")
    parser.add_argument("--tokenizer", help="tokenizer folder for the random-weight stand-in (default: the model's)")
    parser.add_argument("--dataset", default="imdb", help="as fine_tune_lora.py's --dataset_name")
    parser.add_argument("--train_samples", type=int, default=2000)
    parser.add_argument("--eval_samples", type=int, default=2000)
    parser.add_argument("--max_length", type=int, default=ft.MAX_LENGTH)
    parser.add_argument("--precisions", nargs="+", default=["fp16", "bf16"] if gpu else ["fp32"],
                        help="one run each (default: fp16 and bf16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--compare", type=float, default=240,
                        help="seconds for the LoRA-against-full-fine-tuning comparison (0: skip it)")
    parser.add_argument("--timeout", type=float, default=150, help="seconds each precision's run may take")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one precision's run
    parser.add_argument("--model_folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(), gpu


def settings(args, model, out, *extra):
    """fine_tune_lora.py's settings for these runs, through its own command line."""
    return ["--model_name", model, "--dataset_name", args.dataset, "--max_train_samples", str(args.train_samples),
            "--max_eval_samples", str(args.eval_samples), "--max_length", str(args.max_length), "--num_epochs", "1",
            "--output_dir", out, "--full_output_dir", out + "-full", *extra]


class CountSkippedSteps(ft.TrainerCallback):
    """The optimizer steps the gradient scaler skipped for an overflow (inf or NaN in the gradients), read from
    its scale, which it lowers after each skip and raises only after 2,000 steps without one. accelerate's own
    flag (optimizer_step_was_skipped) cannot tell: with the fused AdamW the Trainer takes on torch 2.8 and later,
    the optimizer skips the update itself and the flag stays False (huggingface/accelerate#4242). Reading the
    scale makes the CPU wait for the GPU at each step, which a check can afford."""

    def __init__(self, trainer):
        self.trainer, self.skipped, self.scales = trainer, [], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if (scaler := self.trainer.accelerator.scaler) is not None:  # (bf16 and fp32 have none)
            self.scales.append(scaler.get_scale())  # what this step's gradients were multiplied by

    def on_optimizer_step(self, args, state, control, **kwargs):  # after the step and the scaler's update
        if (scaler := self.trainer.accelerator.scaler) is not None and scaler.get_scale() < self.scales[-1]:
            self.skipped.append(state.global_step + 1)  # (the Trainer counts the step after this)


def run_precision(args):
    """Train in one precision (in this process), count the skipped optimizer steps, reload what was saved."""
    import torch

    counters, watch_training = [], ft.watch_training

    def watched(cfg, setup, trainer):
        watch_training(cfg, setup, trainer)
        counters.append(CountSkippedSteps(trainer))
        trainer.add_callback(counters[-1])

    ft.watch_training = watched
    cfg, _ = ft.parse_args(settings(args, args.model_folder, args.out, "--precision", args.child, "--save_steps",
                                    "0", "--logging_steps", "10", "--resume", "false"))
    results = ft.fine_tune(cfg)
    skipped, scales = counters[0].skipped, counters[0].scales
    history = json.loads((Path(args.out) / "log_history.json").read_text())
    # The saved adapter, loaded as --predict loads it (fp32), classifies the same test reviews again.
    model, tokenizer = ft.load_saved_model(args.out)
    _, test = ft.load_reviews(cfg)
    predicted = ft.classify(model, tokenizer, list(test["text"]), cfg.max_length).argmax(-1)
    reloaded_accuracy = (predicted == torch.tensor(test["label"])).float().mean().item()
    ft.predict(cfg, ["A wonderful, moving film.", "Two hours I will never get back."])
    return dict(
        precision=results["training_precision"], steps=max(log["step"] for log in history), skipped_steps=skipped,
        scales=sorted(set(scales), reverse=True), final_scale=scales[-1] if scales else None,
        losses=[(log["step"], log["loss"]) for log in history if "loss" in log],
        eval_loss=results["eval_loss"], accuracy=results["accuracy"], reloaded_accuracy=reloaded_accuracy,
        train_samples_per_second=results["train_samples_per_second"], peak_gpu_memory_gb=results["peak_gpu_memory_gb"])


def loss_table(rows):
    """The logged training loss of each precision, side by side, and the largest gap to the first."""
    done = [row for row in rows if "losses" in row]
    if not done:
        return ""
    by_step = [dict(row["losses"]) for row in done]
    steps = sorted(set().union(*by_step))
    lines = ["| step | " + " | ".join(row["precision"] for row in done) + " |", "| --- " * (len(done) + 1) + "|"]
    lines += [f"| {step} | " + " | ".join(f"{losses[step]:.4f}" if step in losses else "" for losses in by_step) + " |"
              for step in steps]
    if len(done) > 1:
        gaps = [abs(by_step[0][s] - other[s]) for other in by_step[1:] for s in steps if s in by_step[0] and s in other]
        lines.append(f"\nLargest difference of a logged loss from {done[0]['precision']}'s: {max(gaps):.4f}")
    return "\n".join(lines)


def summary_table(rows):
    lines = ["| precision | steps | skipped for an overflow (at steps) | loss scale, first / last | first / last logged "
             "loss | eval loss | accuracy | reloaded in fp32 | train samples/s | peak GPU memory |",
             "| --- " * 10 + "|"]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['precision']} | failed: {row['failed']} |" + " |" * 8)
            continue
        skipped = f"{len(row['skipped_steps'])} ({', '.join(map(str, row['skipped_steps'][:12]))})" \
            if row["skipped_steps"] else "0"
        scale = f"{row['scales'][0]:g} / {row['final_scale']:g}" if row["scales"] else "none (no scaler)"
        memory = f"{row['peak_gpu_memory_gb']:.2f} GB" if row["peak_gpu_memory_gb"] else "n/a"
        lines.append(f"| {row['precision']} | {row['steps']} | {skipped} | {scale} | {row['losses'][0][1]:.4f} / "
                     f"{row['losses'][-1][1]:.4f} | {row['eval_loss']:.4f} | {row['accuracy']:.4f} | "
                     f"{row['reloaded_accuracy']:.4f} | {row['train_samples_per_second']:.0f} | {memory} |")
    return "\n".join(lines)


def main():
    import peft
    import torch
    import transformers

    args, gpu = parse_args()
    if Path(args.dataset).exists():  # the runs start in folders of their own
        args.dataset = str(Path(args.dataset).resolve())
    if args.child:
        print("ROW " + json.dumps(run_precision(args)), flush=True)
        return
    workdir = Path(tempfile.mkdtemp(prefix="fp16-"))
    try:
        model, note = speed.model_folder(args, gpu, workdir)
        device = (f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} "
                  f"GiB, CUDA {torch.version.cuda})" if gpu else "CPU")
        versions = ", ".join(f"{module.__name__} {module.__version__}" for module in (torch, transformers, peft))
        head = (f"{datetime.date.today()}, {device}; Python {sys.version.split()[0]}, {versions}\nmodel: {note}; "
                f"{args.train_samples:,} train / {args.eval_samples:,} eval reviews from {args.dataset}, 1 epoch, "
                f"batch {ft.BATCH_SIZE}, max length {args.max_length}")
        rows, comparison = [], None

        def write():  # after each run, so that a stop later still leaves these
            if args.json:
                Path(args.json).write_text(json.dumps(dict(header=head, rows=rows, comparison=comparison), indent=2))
        for precision in args.precisions:
            print(f"\n===== {precision} =====", flush=True)
            output, status = speed.child_process([sys.executable, __file__, *sys.argv[1:], "--child", precision,
                                            "--model_folder", model, "--out", str(workdir / precision)], args.timeout)
            print(output, end="", flush=True)
            row = next((json.loads(line[4:]) for line in output.splitlines() if line.startswith("ROW ")), None)
            rows.append(row or dict(precision=precision, failed=f"exit status {status}" if status else "timed out"))
            write()
        if args.compare:
            print("\n===== LoRA against full fine-tuning =====", flush=True)
            command = [sys.executable, str(Path(ft.__file__)), *settings(args, model, str(workdir / "lora")), "--compare"]
            output, status = speed.child_process(command, args.compare, cwd=workdir)  # where it writes its table
            print(output, end="", flush=True)
            done = workdir / "comparison.md"
            comparison = done.read_text().strip() if status == 0 else f"failed (exit status {status})"
        report = "\n\n".join(filter(None, [head, summary_table(rows), loss_table(rows),
                                           comparison and f"LoRA against full fine-tuning:\n\n{comparison}"]))
        print("\n" + report)
        write()
        if any("failed" in row for row in rows) or (comparison or "").startswith("failed"):
            sys.exit(1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        speed.stopped()
