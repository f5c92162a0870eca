"""
Does CUDA_GRAPHS (each LoRA training step of GPT-2 recorded once per padded length and replayed as CUDA
graphs) work, and does it learn what the usual steps learn? Two parts, each its own command; gpu_checks.py
runs both on the GPU machine, with the speed of the recipes between them:

    python benchmarks/cuda_graphs.py --part smoke --json smoke.json
    python benchmarks/cuda_graphs.py --part exactness --tokenizer ./gpt2 --dataset ./imdb --json exactness.json

smoke: on a tiny GPT-2 (seconds), record a step and replay it; dropout draws anew at each replay; without
   dropout, the replayed loss and gradients against the usual step's.
exactness: GPT-2 small's architecture (random weights), three runs with the same seed: two with the usual
   steps, one with CUDA graphs. (a) --exact_steps steps without dropout, padded to 64 as the graphs are, so
   that all compute on the same shapes: every logged loss. The two usual runs set the tolerance: on a GPU
   they differ where a kernel sums in another order (attention's backward pass), and the graphed run must
   differ from the first by no more than twice as much as the second does, or one bf16 rounding (2^-8 of
   the value) where that is more. (b) one epoch on --train_samples reviews with the recipe as it is
   (dropout on): the accuracies, within two standard errors, beside the two usual runs' own gap; and in the
   graphed run the steps that made Python wait for the GPU (torch.cuda.set_sync_debug_mode), outside the
   steps that log, evaluate or save. Each run is a process of its own; the results file is written after
   each.

On a CPU, where the graphs are not used, the same commands run with tiny sizes, to try them.
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
# A logged loss is the fp32 mean of 8 reviews' losses computed from bf16 products. The graphed steps run the same
# kernels on the same shapes, but a kernel chosen otherwise while recording may round a product otherwise: one
# bf16 rounding (2^-8 of the value) is the least difference the check allows, whatever the usual runs' own gap.
LOSS_FLOOR = 2 ** -8
NOISE_FACTOR = 2  # the graphed run against the first usual run, the second usual run's gap to it twice over
VARIANTS = {"usual": "false", "usual again": "false", "graphs": "true"}  # the same seed each: name, --cuda_graphs


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
    parser.add_argument("--part", choices=["smoke", "exactness"], required=True)
    parser.add_argument("--exact_steps", type=int, default=50, help="steps of the exactness check without dropout")
    parser.add_argument("--timeout", type=float, default=45, help="seconds each of the three runs may take")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one variant's runs (a name in VARIANTS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
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
                            bos_token_id=0, eos_token_id=0,
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
    graphs.on_train_begin(None, None, None)  # records each length, as when training begins
    if device == "cuda":
        torch.cuda.synchronize()
    seen["record_seconds"] = time.perf_counter() - started
    # Each replay returns the recorded output, which the next replay overwrites: read each loss before the next.
    seen["losses_with_dropout"] = [graphs.loss(batch).item() for _ in range(4)]
    seen["dropout_draws_anew"] = len(set(seen["losses_with_dropout"])) == 4
    # without dropout: the replayed loss and gradients against the usual step's (autocast, as the Trainer has it)
    plain = model(0.0)
    plain.step_graphs.on_train_begin(None, None, None)
    graphed = plain.step_graphs.loss(batch)
    graphed.backward()
    seen["loss_graphs"] = graphed.item()
    from_graphs = {n: p.grad.clone() for n, p in plain.named_parameters() if p.requires_grad}
    plain.zero_grad(set_to_none=True)
    with torch.autocast(device, torch.bfloat16, enabled=precision == "bf16"):
        usual = plain(**batch).loss
    usual.backward()
    seen["loss_graphs_vs_usual"] = [seen.pop("loss_graphs"), usual.item()]
    seen["largest_gradient_difference"] = max(
        ((g - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)).item()
        for n, p in plain.named_parameters() if (g := from_graphs.get(n)) is not None)
    return seen


def train(extra, sync_check):
    """One fine_tune_lora.py training in this process; with sync_check, count the steps that made Python wait
    for the GPU, outside those that log, evaluate or save."""
    import torch

    waits, state = {}, {}

    class WatchWaits(ft.TrainerCallback):
        def on_step_begin(self, args, state_, control, **kwargs):
            state["seen"] = len(state["warnings"])
            torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args, state_, control, **kwargs):
            torch.cuda.set_sync_debug_mode("default")
            quiet_step = not (control.should_log or control.should_evaluate or control.should_save)
            if quiet_step and len(state["warnings"]) > state["seen"]:
                waits[state_.global_step] = [str(w.message)[:200] for w in state["warnings"][state["seen"]:]]

    watch_training = ft.watch_training

    def watched(cfg, setup, trainer):
        watch_training(cfg, setup, trainer)
        if sync_check and torch.cuda.is_available():
            trainer.add_callback(WatchWaits())

    ft.watch_training = watched
    cfg, _ = ft.parse_args(extra)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state["warnings"] = caught
        results = ft.fine_tune(cfg)
    ft.watch_training = watch_training
    history = json.loads((Path(cfg.output_dir) / "log_history.json").read_text())
    return dict(losses=[(log["step"], log["loss"]) for log in history if "loss" in log], accuracy=results["accuracy"],
                eval_samples=results["eval_samples"], train_samples_per_second=results["train_samples_per_second"],
                steps_that_waited=waits if sync_check and torch.cuda.is_available() else None)


def random_gpt2(tokenizer, folder, dropout):
    """GPT-2 small's architecture with random weights (the same for every run), with this dropout everywhere."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    small = {} if torch.cuda.is_available() else dict(n_layer=2, n_embd=256, n_head=4)  # as speed.py does
    tokens = AutoTokenizer.from_pretrained(tokenizer)
    config = GPT2Config(vocab_size=len(tokens), resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **small)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokens.save_pretrained(folder)


def runs_of_a_variant(args, workdir, name):
    """(a) and (b) with or without the graphs, one after the other in this process."""
    common = ["--dataset_name", args.dataset, "--max_length", str(args.max_length), "--num_epochs", "1",
              "--save_steps", "0", "--resume", "false", "--cuda_graphs", VARIANTS[name]]
    steps = ["--model_name", str(workdir / "gpt2-no-dropout"), "--lora_dropout", "0", "--max_train_samples",
             str(8 * args.exact_steps), "--max_eval_samples", "64", "--logging_steps", "1", "--pad_to_multiple_of",
             "64", "--output_dir", str(workdir / name / "steps"), *common]
    epoch = ["--model_name", str(workdir / "gpt2"), "--max_train_samples", str(args.train_samples),
             "--max_eval_samples", str(args.eval_samples), "--logging_steps", "50", "--output_dir",
             str(workdir / name / "epoch"), *common]
    return dict(steps=train(steps, sync_check=False), epoch=train(epoch, sync_check=VARIANTS[name] == "true"))


def exactness(args, workdir, write):
    """Three runs with the same seed, each in a process of its own; `write` gets the results after each."""
    random_gpt2(args.tokenizer or args.model, workdir / "gpt2-no-dropout", 0.0)
    random_gpt2(args.tokenizer or args.model, workdir / "gpt2", 0.1)
    result = {}
    for name, graphs in VARIANTS.items():
        command = [sys.executable, __file__, *sys.argv[1:], "--child", name, "--workdir", str(workdir)]
        print(f"\n===== {name}: CUDA graphs {graphs} =====", flush=True)
        output, status = speed.child_process(command, args.timeout)
        print("".join(line for line in output.splitlines(True) if not line.startswith("ROW ")), end="", flush=True)
        row = next((json.loads(line[4:]) for line in output.splitlines() if line.startswith("ROW ")), None)
        result[name] = row or dict(failed=f"exit status {status}" if status is not None else
                                   f"not done after {args.timeout:.0f} s")
        write(result)
    return result


def largest_difference(a, b):  # of two runs' logged losses, relative
    return max(abs(x - y) / abs(x) for (_, x), (_, y) in zip(a["losses"], b["losses"]))


def exactness_report(result):
    """What the three runs say, a line each for (a), (b) and the waits."""
    failed = {name: run["failed"] for name, run in result.items() if "failed" in run}
    if failed or len(result) < len(VARIANTS):
        return "exactness: " + ("; ".join(f"{name} failed ({why})" for name, why in failed.items()) or
                                "not finished")
    usual, again, graphs = (result[name]["steps"] for name in VARIANTS)
    noise, found = largest_difference(usual, again), largest_difference(usual, graphs)
    tolerance = max(NOISE_FACTOR * noise, LOSS_FLOOR)
    lines = [f"{len(usual['losses'])} logged losses without dropout, padded to 64: the two usual runs differ by "
             f"{noise:.2e} at most (relative), the graphed run from the first by {found:.2e}; tolerance "
             f"{tolerance:.2e} (the larger of {NOISE_FACTOR}x the usual runs' gap and one bf16 rounding): "
             f"{'within' if found <= tolerance else 'OUTSIDE'}"]
    usual, again, graphs = (result[name]["epoch"] for name in VARIANTS)
    n, p = usual["eval_samples"], usual["accuracy"]
    noise = 2 * math.sqrt(p * (1 - p) / n)  # two standard errors of an accuracy on n reviews
    gap = abs(graphs["accuracy"] - p)
    lines.append(f"one epoch with dropout: accuracy {graphs['accuracy']:.4f} with CUDA graphs, {p:.4f} and "
                 f"{again['accuracy']:.4f} in the usual runs ({n:,} test reviews, noise +-{noise:.4f}, two standard "
                 f"errors): {'the same within noise' if gap <= noise else 'DIFFERENT'}; training samples/s "
                 f"{graphs['train_samples_per_second']:.0f} against {usual['train_samples_per_second']:.0f}")
    waited = graphs.get("steps_that_waited")
    lines.append("steps that made Python wait for the GPU (not logging, evaluating or saving): " + (
        "not checked (no GPU)" if waited is None else f"{len(waited)}" + (
            f", e.g. step {next(iter(waited))}: {next(iter(waited.values()))[0]}" if waited else "")))
    return "\n".join(lines)


def main():
    import peft
    import torch
    import transformers

    args, gpu = parse_args()
    if args.child:
        print("ROW " + json.dumps(runs_of_a_variant(args, Path(args.workdir), args.child)), flush=True)
        return
    device = torch.cuda.get_device_name() if gpu else "CPU"
    versions = ", ".join(f"{module.__name__} {module.__version__}" for module in (torch, transformers, peft))
    report = dict(header=f"{datetime.date.today()}, {device}; Python {sys.version.split()[0]}, {versions}")
    print(report["header"], flush=True)

    def write(part):
        report[args.part] = part
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))

    if args.part == "smoke":
        print("\n===== smoke test: record and replay a step of a tiny GPT-2 =====", flush=True)
        try:
            write(smoke_test())
        except Exception:  # a failure is a result too: the next checks still run
            write(dict(failed=traceback.format_exc()))
        print(json.dumps(report["smoke"], indent=2), flush=True)
    else:
        exactness(args, Path(tempfile.mkdtemp(prefix="cuda-graphs-")), write)
        print(f"\n{report['header']}\n\n{exactness_report(report['exactness'])}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        speed.stopped()
