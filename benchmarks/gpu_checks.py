"""
What can only be measured on a GPU, in one command that fits one short window on the GPU machine:

    python benchmarks/gpu_checks.py --tokenizer .gpu/gpt2-tokenizer --dataset .gpu/imdb --out $OUT

Four sections, the most valuable first. Each runs in a process of its own and is stopped at its time budget,
so none can overrun and the whole takes at most the sum of the budgets (520 s). Each writes OUT/<section>.json
and OUT/<section>.log as it goes (a section stopped at its budget leaves what it had written), and
OUT/summary.md is written again after each section:

1. smoke (40 s): cuda_graphs.py --part smoke: record and replay a LoRA step of a tiny GPT-2.
2. fp16 (170 s): fp16.py: fp16 against bf16, one epoch each, then LoRA against full fine-tuning.
3. speed (150 s): speed.py: the recipes naive, script, script with CUDA graphs and compiled padded to 64.
4. exactness (160 s): cuda_graphs.py --part exactness: two usual runs and one with CUDA graphs, same seed.

GPT-2 small's architecture with random weights throughout, on 2,000 training and 1,000 test reviews for fp16,
1,000 and 1,000 for the others (speed: two epochs). On a CPU, --tiny tries the same command with small sizes and a
GPT-2 of 2 layers (fp32 stands in for fp16, and the graphs are not used there).
"""
import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name: (seconds, what it runs); the sizes are the GPU's, --tiny replaces them
SECTIONS = {
    "smoke": (40, ["cuda_graphs.py", "--part", "smoke"]),
    "fp16": (170, ["fp16.py", "--train_samples", "2000", "--eval_samples", "1000", "--timeout", "45",
                   "--compare", "70"]),
    "speed": (150, ["speed.py", "--train_samples", "1000", "--eval_samples", "1000", "--epochs", "2", "--timeout",
                    "55", "--budget", "140", "--recipes", "naive", "script", "script, CUDA graphs",
                    "script, compiled, padded to x64"]),
    "exactness": (160, ["cuda_graphs.py", "--part", "exactness", "--train_samples", "1000", "--eval_samples",
                        "1000", "--timeout", "50"]),
}
TINY = {  # on a CPU: the same sections, small
    "smoke": (60, ["cuda_graphs.py", "--part", "smoke"]),
    "fp16": (150, ["fp16.py", "--train_samples", "48", "--eval_samples", "32", "--max_length", "64", "--timeout",
                   "40", "--compare", "60"]),
    "speed": (90, ["speed.py", "--train_samples", "48", "--eval_samples", "32", "--max_length", "64", "--timeout",
                   "40", "--budget", "80", "--recipes", "naive", "script"]),
    "exactness": (150, ["cuda_graphs.py", "--part", "exactness", "--train_samples", "48", "--eval_samples", "32",
                        "--max_length", "64", "--exact_steps", "4", "--timeout", "45"]),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="the GPT-2 tokenizer's folder")
    parser.add_argument("--dataset", required=True, help="as fine_tune_lora.py's --dataset_name")
    parser.add_argument("--out", required=True, help="the folder the results go to")
    parser.add_argument("--tiny", action="store_true", help="small sizes, to try the command on a CPU")
    parser.add_argument("--budget", nargs="+", default=[], metavar="SECTION=SECONDS",
                        help="another time budget for a section, such as speed=60")
    args = parser.parse_args()
    sections = dict(TINY if args.tiny else SECTIONS)
    for given in args.budget:
        name, seconds = given.split("=")
        sections[name] = (float(seconds), sections[name][1])
    return args, sections


def run_section(name, seconds, command, args, out):
    """Run one section in a session of its own, its output into OUT/<name>.log; stopped with all its processes
    at its budget. Returns how it ended."""
    started = time.monotonic()
    script, *options = command
    full = [sys.executable, str(HERE / script), *options, "--json", str(out / f"{name}.json"), "--dataset",
            str(Path(args.dataset).resolve()), "--tokenizer", str(Path(args.tokenizer).resolve())]
    with open(out / f"{name}.log", "w") as log:
        child = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=out)
        try:
            status = child.wait(timeout=seconds)
            ended = "done" if status == 0 else f"failed (exit status {status})"
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            ended = "stopped at its budget"
        except KeyboardInterrupt:
            os.killpg(child.pid, signal.SIGKILL)
            raise
    return dict(ended=ended, seconds=round(time.monotonic() - started, 1), budget=seconds)


def summary(out, sections, gpu):
    """What each section found, as far as it got: OUT/summary.md."""
    sys.path.insert(0, str(HERE))
    import cuda_graphs
    import fp16
    import speed

    def read(name):
        path = out / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else {}
    parts = []
    for name, ended in sections.items():
        found = read(name)
        text = f"## {name}: {ended['ended']} ({ended['seconds']:.0f} s of {ended['budget']:.0f})"
        if name == "smoke" and found.get("smoke"):
            text += f"\n\n{found['header']}\n\n```\n{json.dumps(found['smoke'], indent=2)}\n```"
        elif name == "fp16" and found.get("rows"):
            text += f"\n\n{found['header']}\n\n{fp16.summary_table(found['rows'])}\n\n{fp16.loss_table(found['rows'])}"
            text += f"\n\nLoRA against full fine-tuning:\n\n{found['comparison']}" * bool(found.get("comparison"))
        elif name == "speed" and found.get("rows"):
            text += (f"\n\n{found.get('header', '')}\n\n{speed.make_table(found['rows'], gpu)}"
                     f"{speed.profiles(found['rows'])}")
        elif name == "exactness" and found.get("exactness"):
            text += f"\n\n{found['header']}\n\n{cuda_graphs.exactness_report(found['exactness'])}"
        parts.append(text)
    (out / "summary.md").write_text("\n\n".join(parts) + "\n")


def main():
    args, sections = parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    gpu = torch.cuda.is_available()
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {torch.cuda.get_device_name() if gpu else 'CPU'}; sections "
          f"and budgets: {', '.join(f'{name} {seconds:.0f} s' for name, (seconds, _) in sections.items())}", flush=True)
    ended = {}
    for name, (seconds, command) in sections.items():
        print(f"===== {name} (at most {seconds:.0f} s) =====", flush=True)
        try:
            ended[name] = run_section(name, seconds, command, args, out)
        except KeyboardInterrupt:
            print(f"Stopped during the section {name!r}; what the sections before it found is in {out}",
                  file=sys.stderr)
            sys.exit(130)
        (out / "sections.json").write_text(json.dumps(ended, indent=2))
        summary(out, ended, gpu)
        print(f"{name}: {ended[name]['ended']} in {ended[name]['seconds']:.0f} s", flush=True)
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # while the libraries load
        print("Stopped", file=sys.stderr)
        sys.exit(130)
