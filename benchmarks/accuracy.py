"""
What accuracy does the recipe reach on real pretrained weights, in how long, and how does LoRA
compare with full fine-tuning? This runs the trainings behind the README's real-weights figures,
through fine_tune_lora.py --compare, and writes their tables to one page.

    python benchmarks/accuracy.py                               # GPT-2 small and IMDB from the Hub
    python benchmarks/accuracy.py --model ./SmolLM2-135M-Instruct --dataset ./imdb --studies quick \
        --target_modules q_proj v_proj --precision fp32         # the README's real-weights figures

Each study is one `fine_tune_lora.py --compare` with the same reviews for every run in it (add your own
to STUDIES):
  quick     the quick run the script suggests on a CPU (QUICK_RUN): LoRA at two learning rates, and full
            fine-tuning
  settings  what each setting buys on the quick run: rank 4 / 8 / 16, the adapted layers (the script's
            targets, every attention projection, every linear layer), the top half of the blocks only,
            128 tokens instead of 256 (and both), DoRA; 1,000 test reviews, one line per variant
  truncation  which tokens of a longer review the quick run reads: its end, or its first quarter and its end,
            at 128 and at 256 tokens (its start: the settings study's runs), and the end on the top half of
            the blocks; 1,000 test reviews. With
            --reread_best 512, the most accurate run's adapter also classifies the same test reviews reading
            up to 512 tokens of each (trained short, read long: no training)
Every training runs in a process of its own and saves to OUT/<study>/; a finished one is not run
again, so an interrupted benchmark goes on where it stopped. OUT/accuracy.md gets one table per
study, with the model, data, hardware, date, library versions and the command that re-measures it;
each run's folder keeps its results.json and training_curves.png, each study its comparison.png.
Any other fine_tune_lora.py setting can be added (--precision fp32, --batch_size 16, ...).
"""
import argparse
import datetime
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fine_tune_lora as ft  # noqa: E402

SCRIPT = Path(ft.__file__)
QUICK = [arg for key, value in ft.QUICK_RUN.items() for arg in (f"--{key}", str(value))]
# study: (what it shows, settings over the quick run's, its --compare variants: none = LoRA and full)
STUDIES = {
    "quick": ("The quick run: LoRA at two learning rates, and full fine-tuning", ["--logging_steps", "25"],
              ["--learning_rate 3e-4", "--learning_rate 1e-3", "--full_finetune true"]),
    # {attention} and {half} are filled in for the model: its attention projections, half its blocks
    "settings": ("What each setting buys, on the quick run", ["--logging_steps", "25", "--max_eval_samples", "1000"],
                 ["", "--lora_top_blocks {half}", "--max_length 128", "--max_length 128 --lora_top_blocks {half}",
                  "--lora_r 4 --lora_alpha 8", "--lora_r 16 --lora_alpha 32", "--target_modules {attention}",
                  "--target_modules all-linear", "--use_dora true"]),
    "truncation": ("Which tokens of a longer review, on the quick run", ["--logging_steps", "25",
                                                                         "--max_eval_samples", "1000"],
                   ["--truncation end --max_length 128", "--truncation start+end --max_length 128",
                    "--truncation end", "--truncation start+end", "--truncation end --lora_top_blocks {half}"]),
}
# Each model family's attention projections. GPT-2's c_proj names its MLP's output layer too.
ATTENTION = {"llama": "q_proj k_proj v_proj o_proj", "gpt2": "c_attn c_proj"}
ONE_LINE_PER_VARIANT = {"settings", "truncation"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", help="Hub id or local folder (default: gpt2)")
    parser.add_argument("--dataset", default="imdb", help="Hub id or local folder (default: imdb)")
    parser.add_argument("--studies", nargs="+", choices=list(STUDIES), default=list(STUDIES))
    parser.add_argument("--out", default="accuracy", help="folder for the runs and accuracy.md (default: accuracy)")
    parser.add_argument("--reread_best", type=int, metavar="TOKENS",
                        help="the most accurate run of each study also classifies its test reviews reading this many "
                             "tokens of each")
    return parser.parse_known_args()  # the rest goes to fine_tune_lora.py


def hardware():
    import torch
    if torch.cuda.is_available():
        return f"1 {torch.cuda.get_device_name()}"
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # Linux names the CPU here; platform.processor() often says only "x86_64"
        name = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.startswith("model name")), name)
    # The vector instructions PyTorch uses on this CPU too: one name ("AMD EPYC") covers machines of different speeds
    return f"{torch.get_num_threads()} CPU threads ({name}, {torch.backends.cpu.get_cpu_capability()})"


def run_study(name, args, extra, out):
    """Train the study's runs (those not done yet) and return its table, headed by how to re-measure it."""
    title, settings, variants = STUDIES[name]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model)
    variants = [v.format(attention=ATTENTION.get(config.model_type, ""), half=config.num_hidden_layers // 2)
                for v in variants]
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    # The runs start in the study's folder: a local model or data folder is passed to them as a full path.
    model, dataset = (str(Path(n).resolve()) if Path(n).exists() else n for n in (args.model, args.dataset))
    command = [sys.executable, str(SCRIPT), "--model_name", model, "--dataset_name", dataset,
               *QUICK, *settings, *extra, "--output_dir", "lora", "--full_output_dir", "full", "--compare", *variants]
    print(f"\n##### {title}: {shlex.join(command[1:])}", flush=True)
    # Relative folders resolve in the study's folder, where --compare writes its table too.
    process = subprocess.Popen(command, cwd=folder)
    while process.returncode is None:
        try:
            process.wait()
        except KeyboardInterrupt:  # Ctrl-C reaches the runs too: they stop cleanly, each saying so
            pass
    if process.returncode != 0:
        sys.exit(f"error: the {name!r} study stopped; see above. The same command goes on where it stopped.")
    rerun = shlex.join(["python", "benchmarks/accuracy.py", "--model", args.model, "--dataset", args.dataset,
                        "--studies", name, *extra] + (["--out", args.out] if args.out != "accuracy" else []))
    results = json.loads((folder / "comparison.json").read_text())
    table = variant_table(results) if name in ONE_LINE_PER_VARIANT else (folder / "comparison.md").read_text().strip()
    if args.reread_best:
        rerun = rerun.replace(" --studies", f" --reread_best {args.reread_best} --studies")
        table += "\n\n" + reread_best(results, folder, args.reread_best)
    return f"## {title}\n\n`{rerun}`\n\n{table}\n"


def reread_best(results, folder, tokens):
    """The most accurate run's adapter classifies its test reviews again, reading up to `tokens` of each (which
    ones as it was trained: TRUNCATION), as --predict --eval_max_length TOKENS would; kept in its folder."""
    name, run = max(((name, run) for name, run in results.items() if run["method"] == "lora"),
                    key=lambda item: item[1]["accuracy"])
    saved = folder / run["config"]["output_dir"]
    done = saved / f"reread-{tokens}.json"
    if not done.exists():
        print(f"\n##### {name}, read up to {tokens} tokens of each test review", flush=True)
        cfg = SimpleNamespace(**run["config"])
        _, test = ft.load_reviews(cfg)
        model, tokenizer = ft.load_saved_model(saved)
        started = time.monotonic()
        predicted = ft.classify(model, tokenizer, list(test["text"]), tokens, cfg.truncation).argmax(-1).tolist()
        accuracy = sum(p == label for p, label in zip(predicted, test["label"])) / len(predicted)
        done.write_text(json.dumps(dict(accuracy=accuracy, eval_samples=len(predicted), tokens=tokens,
                                        seconds=time.monotonic() - started)))
    reread = json.loads(done.read_text())
    p, n = reread["accuracy"], reread["eval_samples"]
    return (f"The most accurate, `{name}` ({run['accuracy']:.3f} reading {run.get('eval_max_length', run['max_length'])} "
            f"tokens), reading up to {tokens} tokens of each of the same {n:,} test reviews: {p:.3f} ± "
            f"{2 * math.sqrt(p * (1 - p) / n):.3f} ({reread['seconds'] / 60:.1f} min; no training)")


def variant_table(results):
    """One line per run: what it reached (with the noise of an accuracy measured on so many reviews), in how long
    and how much memory, and what it saves."""
    lines = ["| variant | accuracy | F1 | trainable parameters | training | whole run | CPU estimate (its step) | "
             "peak process memory | adapter |", "| --- " * 9 + "|"]
    for name, run in results.items():
        p, n = run["accuracy"], run["eval_samples"]
        noise = 2 * math.sqrt(p * (1 - p) / n)  # two standard errors: 95% of such measurements fall within it
        whole = f"{run['run_seconds'] / 60:.1f} min" if run.get("run_seconds") else "n/a"
        memory = f"{run['peak_process_memory_gb']:.2f} GB" if run.get("peak_process_memory_gb") else "n/a"
        # What the script foresaw, from the step it timed just before: this machine's speed of the moment
        estimate = (f"{run['estimated_run_seconds'] / 60:.0f} min ({run['estimated_step_seconds']:.1f} s)"
                    if run.get("estimated_run_seconds") else "n/a")
        saved = run.get("saved_weights_mb", run.get("adapter_size_mb"))  # (its name in results.json until 2026-12)
        lines.append(f"| {name} | {p:.3f} ± {noise:.3f} | {run['f1']:.3f} | {run['trainable_params']:,} | "
                     f"{run['train_seconds'] / 60:.1f} min | {whole} | {estimate} | {memory} | {saved:.2f} MB |")
    n = next(iter(results.values()))["eval_samples"]
    return "\n".join(lines) + (f"\n\n± is two standard errors of an accuracy measured on {n:,} test reviews: a "
                               f"difference inside it is not a finding.")


def main():
    args, extra = parse_args()
    import peft
    import torch
    import transformers
    out = Path(args.out)
    tables = [run_study(name, args, extra, out) for name in args.studies]
    head = (f"# Accuracy of fine_tune_lora.py\n\n{datetime.date.today()}, {hardware()}; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}; model {args.model}, "
            f"data {args.dataset}\n")
    page = "\n".join([head, *tables])
    (out / "accuracy.md").write_text(page)
    print("\n" + page + f"\nWritten to {out / 'accuracy.md'}")


if __name__ == "__main__":
    main()
