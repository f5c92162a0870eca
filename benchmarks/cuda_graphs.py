"""
Does CUDA_GRAPHS (each LoRA training step of GPT-2 recorded once per padded length and replayed as CUDA
graphs) work, how fast is it, and does it learn what the usual steps learn? One command, for the machine
with the GPU:

    python benchmarks/cuda_graphs.py --tokenizer ./gpt2 --dataset ./imdb --json graphs.json

1. Smoke test, on a tiny GPT-2 (seconds): record a step, replay it; dropout draws anew at each replay;
   without dropout, the replayed loss and gradients against the usual step's. A failure prints its error,
   and the rest goes on.
2. Speed: benchmarks/speed.py with the recipes naive, script, script with CUDA graphs, and compiled padded
   to 64, on 2,000 / 2,000 reviews with GPT-2 small's architecture (random weights), with its profile of
   each (GPU busy share, kernels per step).
3. Exactness, with and without the graphs, same seed: (a) 50 steps without dropout, the usual steps padded
   to 64 as the graphs are, so that both compute on the same shapes: every logged loss; (b) one epoch on
   2,000 reviews with the recipe as it is (dropout on): the accuracies, and in the run with the graphs the
   steps that made Python wait for the GPU (torch.cuda.set_sync_debug_mode), outside the steps that log,
   evaluate, save or record a new length.

On a CPU, where the graphs are not used, the same command runs with tiny sizes, to try it.
"""
import argparse
import datetime
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402

ft = speed.ft
HERE = Path(__file__).resolve().parent
# A logged loss is the fp32 mean of 8 reviews' losses computed from bf16 products; two runs that compute the same
# numbers on the same shapes can still differ where a kernel sums in another order. One bf16 rounding (2^-8 of
# the value) is the most such a difference should reach: more means the graphs computed something else.
LOSS_TOLERANCE = 2 ** -8


def parse_args():
    import torch

    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", help="Hub id or folder whose tokenizer is used")
    parser.add_argument("--tokenizer", help="tokenizer folder for the random-weight stand-in (default: the model's)")
    parser.add_argument("--dataset", default="imdb", help="as fine_tune_lora.py's --dataset_name")
    parser.add_argument("--train_samples", type=int, default=2000)
    parser.add_argument("--eval_samples", type=int, default=2000)
    parser.add_argument("--max_length", type=int, default=ft.MAX_LENGTH)
    parser.add_argument("--exact_steps", type=int, default=50, help="steps of the exactness check without dropout")
    parser.add_argument("--speed_budget", type=float, default=240, help="seconds for speed.py's four recipes")
    parser.add_argument("--timeout", type=float, default=100, help="seconds each training of part 3 may take")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child_args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if Path(args.dataset).exists():  # the children start in folders of their own
        args.dataset = str(Path(args.dataset).resolve())
    return args, gpu


def smoke_test():
    """Record and replay one step of a tiny GPT-2 with LoRA; returns what was seen, or raises."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2ForSequenceClassification

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = "bf16" if device == "cuda" else "fp32"
    cfg, _ = ft.parse_args(["--cuda_graphs", "true", "--precision", precision])
    run = argparse.Namespace(device=device, precision=precision, world=1)
    tokenizer = argparse.Namespace(padding_side="right", pad_token_id=0)

    def model(dropout):
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=1000, n_layer=2, n_embd=64, n_head=2, n_positions=256, pad_token_id=0,
                            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, num_labels=2)
        lora = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["c_attn"],
                          fan_in_fan_out=True)
        peft_model = get_peft_model(GPT2ForSequenceClassification(config).to(device), lora)
        ft.speed_up(peft_model, tokenizer, cfg, run)
        return peft_model.train()

    batch = dict(input_ids=torch.randint(1, 1000, (8, 100), device=device),
                 attention_mask=torch.ones(8, 100, dtype=torch.long, device=device),
                 labels=torch.randint(0, 2, (8,), device=device))
    seen = {}
    with_dropout = model(0.1)
    graphs = getattr(with_dropout, "step_graphs", None)
    if graphs is None:
        return dict(skipped="CUDA_GRAPHS is not used here (no CUDA GPU)")
    started = time.perf_counter()
    first = graphs.loss(batch)
    torch.cuda.synchronize()
    seen["record_seconds"] = time.perf_counter() - started
    replays = [graphs.loss(batch).item() for _ in range(3)]
    seen["losses_with_dropout"] = [first.item(), *replays]
    seen["dropout_draws_anew"] = len(set(seen["losses_with_dropout"])) == 4
    # without dropout: the replayed loss and gradients against the usual step's (autocast, as the Trainer has it)
    plain = model(0.0)
    graphed = plain.step_graphs.loss(batch)
    graphed.backward()
    from_graphs = {n: p.grad.clone() for n, p in plain.named_parameters() if p.requires_grad}
    plain.zero_grad(set_to_none=True)
    with torch.autocast(device, torch.bfloat16):
        usual = plain(**batch).loss
    usual.backward()
    seen["loss_graphs_vs_usual"] = [graphed.item(), usual.item()]
    seen["largest_gradient_difference"] = max(
        ((g - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)).item()
        for n, p in plain.named_parameters() if (g := from_graphs.get(n)) is not None)
    return seen


def train(args, extra, sync_check):
    """One fine_tune_lora.py training in this process; with sync_check, count the steps that made Python wait
    for the GPU, outside those that log, evaluate, save or record a new padded length."""
    import torch

    waits, state = {}, dict(recorded=0)

    class WatchWaits(ft.TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_begin(self, args, state_, control, **kwargs):
            graphs = getattr(self.trainer.model, "step_graphs", None)
            state["recorded"] = len(graphs.graphs) if graphs else 0
            state["seen"] = len(state["warnings"])
            torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args, state_, control, **kwargs):
            torch.cuda.set_sync_debug_mode("default")
            graphs = getattr(self.trainer.model, "step_graphs", None)
            quiet_step = not (control.should_log or control.should_evaluate or control.should_save) and (
                (len(graphs.graphs) if graphs else 0) == state["recorded"])
            if quiet_step and len(state["warnings"]) > state["seen"]:
                waits[state_.global_step] = [str(w.message)[:200] for w in state["warnings"][state["seen"]:]]

    class Watched(ft.FastTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            if sync_check and torch.cuda.is_available():
                self.add_callback(WatchWaits(self))

    ft.FastTrainer = Watched
    cfg, _ = ft.parse_args(extra)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state["warnings"] = caught
        results = ft.fine_tune(cfg)
    history = json.loads((Path(cfg.output_dir) / "log_history.json").read_text())
    return dict(losses=[(log["step"], log["loss"]) for log in history if "loss" in log], accuracy=results["accuracy"],
                eval_samples=results["eval_samples"], train_samples_per_second=results["train_samples_per_second"],
                steps_that_waited=waits if sync_check and torch.cuda.is_available() else None)


def child(args, name, extra, timeout, sync_check=False):
    """Run `train` in a fresh process (its own CUDA state and peak memory); its result, or why there is none."""
    command = [sys.executable, __file__, "--child", name, "--child_args", json.dumps(dict(extra=extra,
                                                                                         sync_check=sync_check))]
    print(f"\n===== {name} =====", flush=True)
    output, status = speed.child_process(command, timeout)
    print("".join(line for line in output.splitlines(True) if not line.startswith("ROW ")), end="", flush=True)
    row = next((json.loads(line[4:]) for line in output.splitlines() if line.startswith("ROW ")), None)
    return row or dict(failed=f"exit status {status}" if status is not None else f"not done after {timeout:.0f} s")


def random_gpt2(tokenizer, folder, dropout):
    """GPT-2 small's architecture with random weights, and with the given dropout everywhere in it."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    small = {} if torch.cuda.is_available() else dict(n_layer=2, n_embd=256, n_head=4)  # as speed.py does
    tokens = AutoTokenizer.from_pretrained(tokenizer)
    config = GPT2Config(vocab_size=len(tokens), resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **small)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokens.save_pretrained(folder)
    return str(folder)


def exactness(args, workdir):
    """Part 3: the same seed with and without the graphs."""
    common = ["--dataset_name", args.dataset, "--max_length", str(args.max_length), "--num_epochs", "1",
              "--save_steps", "0", "--resume", "false"]
    tokenizer = args.tokenizer or args.model
    no_dropout = random_gpt2(tokenizer, workdir / "gpt2-no-dropout", 0.0)
    steps = ["--model_name", no_dropout, "--lora_dropout", "0", "--max_train_samples", str(8 * args.exact_steps),
             "--max_eval_samples", "64", "--logging_steps", "1", "--pad_to_multiple_of", "64", *common]
    result = {}
    for graphs in ("false", "true"):
        result[f"steps, graphs {graphs}"] = child(args, f"{args.exact_steps} steps without dropout, CUDA graphs "
                                                        f"{graphs}", steps + ["--cuda_graphs", graphs, "--output_dir",
                                                                              str(workdir / f"steps-{graphs}")],
                                                  args.timeout)
    recipe = ["--model_name", random_gpt2(tokenizer, workdir / "gpt2", 0.1), "--max_train_samples",
              str(args.train_samples), "--max_eval_samples", str(args.eval_samples), "--logging_steps", "50", *common]
    for graphs in ("false", "true"):
        result[f"epoch, graphs {graphs}"] = child(args, f"one epoch, CUDA graphs {graphs}", recipe + [
            "--cuda_graphs", graphs, "--output_dir", str(workdir / f"epoch-{graphs}")], args.timeout,
            sync_check=graphs == "true")
    return result


def exactness_report(result):
    lines = []
    usual, graphed = result["steps, graphs false"], result["steps, graphs true"]
    if "failed" in usual or "failed" in graphed:
        lines.append(f"steps without dropout: failed ({usual.get('failed') or graphed.get('failed')})")
    else:
        pairs = [(a, b) for (_, a), (_, b) in zip(usual["losses"], graphed["losses"])]
        worst = max(abs(a - b) / abs(a) for a, b in pairs)
        lines.append(f"{len(pairs)} logged losses without dropout, with against without CUDA graphs (both padded to "
                     f"64): largest relative difference {worst:.2e}, tolerance {LOSS_TOLERANCE:.2e} (one bf16 "
                     f"rounding): {'within' if worst <= LOSS_TOLERANCE else 'OUTSIDE'}")
    usual, graphed = result["epoch, graphs false"], result["epoch, graphs true"]
    if "failed" in usual or "failed" in graphed:
        lines.append(f"one epoch: failed ({usual.get('failed') or graphed.get('failed')})")
    else:
        n, p = usual["eval_samples"], usual["accuracy"]
        noise = 2 * math.sqrt(p * (1 - p) / n)  # two standard errors of an accuracy on n reviews
        gap = abs(graphed["accuracy"] - p)
        lines.append(f"one epoch with dropout: accuracy {graphed['accuracy']:.4f} with CUDA graphs, {p:.4f} without "
                     f"({n:,} test reviews, noise +-{noise:.4f}, two standard errors): "
                     f"{'the same within noise' if gap <= noise else 'DIFFERENT'}; training samples/s "
                     f"{graphed['train_samples_per_second']:.0f} against {usual['train_samples_per_second']:.0f}")
        waited = graphed.get("steps_that_waited")
        lines.append("steps that made Python wait for the GPU (not logging, evaluating, saving or recording): " + (
            "not checked (no GPU)" if waited is None else f"{len(waited)}" + (
                f", e.g. step {next(iter(waited))}: {next(iter(waited.values()))[0]}" if waited else "")))
    return "\n".join(lines)


def main():
    import peft
    import torch
    import transformers

    args, gpu = parse_args()
    if args.child:
        given = json.loads(args.child_args)
        print("ROW " + json.dumps(train(args, given["extra"], given["sync_check"])), flush=True)
        return
    workdir = Path(tempfile.mkdtemp(prefix="cuda-graphs-"))
    device = torch.cuda.get_device_name() if gpu else "CPU"
    versions = ", ".join(f"{module.__name__} {module.__version__}" for module in (torch, transformers, peft))
    report = dict(header=f"{datetime.date.today()}, {device}; Python {sys.version.split()[0]}, {versions}")
    print(report["header"], flush=True)

    print("\n===== 1. smoke test: record and replay a step of a tiny GPT-2 =====", flush=True)
    try:
        report["smoke"] = smoke_test()
    except Exception:  # the benchmark still says how fast the rest is
        report["smoke"] = dict(failed=traceback.format_exc())
    print(json.dumps(report["smoke"], indent=2), flush=True)

    print("\n===== 2. speed =====", flush=True)
    speed_json = workdir / "speed.json"
    command = [sys.executable, str(HERE / "speed.py"), "--model", args.model, "--dataset", args.dataset,
               "--train_samples", str(args.train_samples), "--eval_samples", str(args.eval_samples), "--max_length",
               str(args.max_length), "--budget", str(args.speed_budget), "--timeout", str(args.speed_budget / 2.5),
               "--json", str(speed_json), "--recipes", "naive", "script", "script, CUDA graphs",
               "script, compiled, padded to x64"] + (["--tokenizer", args.tokenizer] if args.tokenizer else [])
    status = subprocess.run(command).returncode
    report["speed"] = json.loads(speed_json.read_text()) if speed_json.exists() else dict(failed=f"exit {status}")

    print("\n===== 3. exactness =====", flush=True)
    report["exactness"] = exactness(args, workdir)
    summary = exactness_report(report["exactness"])
    print(f"\n{report['header']}\n\nsmoke test: {json.dumps(report['smoke'])[:2000]}\n\n"
          f"{report['speed'].get('header', '')}\n\n{speed.make_table(report['speed'].get('rows', []), gpu)}"
          f"{speed.profiles(report['speed'].get('rows', []))}\n\n{summary}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        speed.stopped()
