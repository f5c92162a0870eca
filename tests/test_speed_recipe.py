"""The speed-ups change how the work is done, never what is learned: checked here."""
import random
import types
from pathlib import Path

import pytest
from conftest import wait_until

import fine_tune_lora


def imdb_like_lengths(n, seed=0):
    """Review lengths shaped like IMDB's in GPT-2 tokens (median ~220, long tail, cut at 512)."""
    rng = random.Random(seed)
    return [min(512, max(10, int(rng.lognormvariate(5.45, 0.6)))) for _ in range(n)]


def epoch_order(lengths, seed, epoch, batch_size=8):
    """The order of one epoch's reviews, from the sampler the script's Trainer draws its training batches from."""
    import datasets

    trainer = types.SimpleNamespace(train_dataset=datasets.Dataset.from_dict({"input_ids": [[0] * n for n in lengths]}),
                                    args=types.SimpleNamespace(train_sampling_strategy="group_by_length", seed=seed,
                                                               per_device_train_batch_size=batch_size))
    sampler = fine_tune_lora.FastTrainer._get_train_sampler(trainer)
    sampler.set_epoch(epoch)
    return list(sampler)


def settings(tiny_model, reviews, *args):
    cfg, _ = fine_tune_lora.parse_args(["--model_name", str(tiny_model), "--dataset_name", str(reviews), *args])
    return cfg


def tokenized_reviews(cfg, tokenizer):
    """The train and test sets as the lesson's step 3 makes them."""
    train, test = fine_tune_lora.load_reviews(cfg)
    tokenize = lambda batch: tokenizer(batch["text"], truncation=True, max_length=cfg.max_length)  # noqa: E731
    return (train.map(tokenize, batched=True, remove_columns=["text"]),
            test.map(tokenize, batched=True, remove_columns=["text"]))


def lora_model(tiny_model, speed_ups=False):
    """The tiny GPT-2 with a LoRA adapter, as the lesson's steps 1 and 2 make it; with the script's
    speed-ups if asked."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2,
                                                               pad_token_id=tokenizer.pad_token_id)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["c_attn"],
                                             fan_in_fan_out=True))
    if speed_ups:
        speed_up(model, tokenizer)
    return model.eval(), tokenizer


def speed_up(model, tokenizer):
    """The script's speed-ups, as they apply to a LoRA run in fp32 on a CPU."""
    cfg = fine_tune_lora.parse_args(["--precision", "fp32"])[0]
    fine_tune_lora.speed_up(model, tokenizer, cfg, types.SimpleNamespace(precision="fp32", device="cpu"))


def trainer_for(model, tokenizer, tmp_path, train=None, test=None, **arguments):
    from transformers import DataCollatorWithPadding, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, per_device_eval_batch_size=8,
                             seed=42, report_to="none", use_cpu=True, **arguments)
    return fine_tune_lora.FastTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                                      processing_class=tokenizer, compute_metrics=fine_tune_lora.compute_metrics,
                                      data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8))


@pytest.mark.parametrize("n", [1, 7, 8, 1000, 1003])
def test_each_epoch_sees_every_example_exactly_once(n):
    lengths = imdb_like_lengths(n)
    for epoch in range(3):
        assert sorted(epoch_order(lengths, seed=42, epoch=epoch)) == list(range(n))


def test_grouping_is_seeded_and_changes_every_epoch():
    lengths = imdb_like_lengths(2000)
    assert epoch_order(lengths, 42, 0) == epoch_order(lengths, 42, 0)
    assert epoch_order(lengths, 42, 0) != epoch_order(lengths, 42, 1)
    assert epoch_order(lengths, 42, 0) != epoch_order(lengths, 43, 0)
    # which reviews share a batch changes too, not only the order of the batches
    batches = [{frozenset(order[i:i + 8]) for i in range(0, 2000, 8)}
               for order in (epoch_order(lengths, 42, 0), epoch_order(lengths, 42, 1))]
    assert len(batches[0] & batches[1]) < 0.1 * len(batches[0])


def test_batches_hold_similar_lengths_and_the_longest_comes_first():
    lengths = imdb_like_lengths(4000)
    order = epoch_order(lengths, 42, 0)
    batches = [[lengths[i] for i in order[s:s + 8]] for s in range(0, len(order), 8)]
    real = sum(lengths)
    padded = sum(len(b) * -(-max(b) // 8) * 8 for b in batches)  # to the longest, rounded up to 8
    assert real / padded >= 0.95
    assert max(batches[0]) == max(lengths)


def test_label_mix_in_a_batch_stays_random():
    """Grouping by length must not make batches of one label. In IMDB, length says nothing about the
    label (correlation 0.002 over the 25,000 training reviews), so the labels here are independent
    of length and come sorted, as IMDB's do."""
    lengths = imdb_like_lengths(4000)
    labels = [0] * 2000 + [1] * 2000
    order = epoch_order(lengths, 42, 0)
    single = sum(len({labels[i] for i in order[s:s + 8]}) == 1 for s in range(0, 4000, 8))
    # a random sampler makes 2 / 2**8 = 0.8% of batches single-label; allow a few times that, not more
    assert single / 500 < 0.03


def test_the_trainer_draws_its_batches_from_the_grouped_sampler(tiny_model, reviews, tmp_path):
    """The sampler the Trainer really uses: every training example once per epoch, batches ordered as tested above."""
    import torch

    cfg = settings(tiny_model, reviews, "--max_length", "64")
    model, tokenizer = lora_model(tiny_model)
    train, _ = tokenized_reviews(cfg, tokenizer)
    train = train.map(lambda row, i: {"input_ids": [i + 1] * len(row["input_ids"])}, with_indices=True)  # id = index + 1
    trainer = trainer_for(model, tokenizer, tmp_path, train=train, train_sampling_strategy="group_by_length")
    loader = trainer.get_train_dataloader()
    for epoch in range(2):
        loader.set_epoch(epoch)
        seen = []
        for batch in loader:
            ids = batch["input_ids"] * batch["attention_mask"]
            seen += [int(row.max()) - 1 for row in ids]
            assert batch["input_ids"].shape[1] % 8 == 0
        assert sorted(seen) == list(range(len(train)))
        assert seen == epoch_order(fine_tune_lora.token_counts(train), 42, epoch)
    assert torch.is_tensor(batch["labels"])


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_both_cpu_precisions_learn_and_keep_the_trained_weights_in_fp32(tiny_model, reviews, tmp_path, precision,
                                                                       capsys, monkeypatch):
    """"auto" picks one of the two on a CPU, by what the CPU computes in hardware: both must learn.
    Under bf16 the frozen layers are stored in bf16; the adapter and `score` must stay fp32."""
    from conftest import base_args, read_results, run_main
    from safetensors.torch import load_file

    stored = {}
    speed_up = fine_tune_lora.speed_up

    def speed_up_and_look(model, *args):  # the weights as training will use them
        speed_up(model, *args)
        stored.update({name: str(p.dtype) for name, p in model.named_parameters() if name.endswith("weight")})
    monkeypatch.setattr(fine_tune_lora, "speed_up", speed_up_and_look)
    out = tmp_path / precision
    done = run_main(capsys, *base_args(tiny_model, reviews), "--precision", precision, "--output_dir", out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"precision {precision}" in done.stdout
    frozen = {name: dtype for name, dtype in stored.items() if name.rsplit(".", 1)[0].endswith(("c_attn.base_layer",
                                                                                              "c_proj", "c_fc"))}
    assert len(frozen) == 4 * 2  # c_attn, c_fc and two c_proj in each of 2 blocks
    assert set(frozen.values()) == {"torch.bfloat16" if precision == "bf16" else "torch.float32"}, frozen
    trained = {dtype for name, dtype in stored.items() if "lora_" in name or "score" in name}
    assert trained == {"torch.float32"}
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert {str(t.dtype) for t in weights.values()} == {"torch.float32"}
    assert read_results(out)["accuracy"] >= 0.9


def test_attention_without_the_mask_classifies_each_review_as_it_would_alone(tiny_model):
    """The script's attention ignores the padding mask (GPT-2 is causal and pads on the right):
    padding a review among longer ones must not change its logits, which must also be the ones
    transformers' own attention gives with the mask."""
    import torch
    from conftest import make_reviews

    from transformers import DataCollatorWithPadding

    model, tokenizer = lora_model(tiny_model)
    features = [tokenizer(text) for text in make_reviews(6, seed=3)[0]]
    assert len({len(f["input_ids"]) for f in features}) > 1  # so that most of them are padded
    batch = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)(features)
    assert batch["input_ids"].shape[1] % 8 == 0
    with torch.no_grad():
        with_mask = model(**batch).logits
        speed_up(model, tokenizer)
        assert model.config._attn_implementation == "sdpa_without_mask"
        batched = model(**batch).logits
        alone = torch.cat([model(input_ids=torch.tensor([f["input_ids"]])).logits for f in features])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, with_mask, rtol=1e-5, atol=1e-5)


def test_training_steps_read_nothing_back_from_the_device(tiny_model, reviews, tmp_path, monkeypatch):
    """On a GPU, reading a number back from it (`.item()`, `if tensor:`) makes Python wait until the
    GPU has done everything queued, and the GPU then idles while Python prepares the next step.
    Steps between logging, evaluating and saving must read nothing back. On the CPU each such
    read is still visible, as the operation that would copy the number back."""
    from collections import Counter

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import TrainerCallback

    reads, step = Counter(), [0]

    class CountReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                reads[step[0]] += 1
            return func(*args, **(kwargs or {}))

    class StepNumber(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            step[0] = state.global_step + 1

    class Numbered(fine_tune_lora.FastTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(StepNumber())

    monkeypatch.setattr(fine_tune_lora, "FastTrainer", Numbered)
    cfg, _ = fine_tune_lora.parse_args(["--model_name", str(tiny_model), "--dataset_name", str(reviews),
                                        "--max_length", "40", "--max_train_samples", "48", "--max_eval_samples", "16",
                                        "--num_epochs", "2", "--output_dir", str(tmp_path / "out")])
    with CountReads():
        fine_tune_lora.fine_tune(cfg)
    # 6 steps per epoch; the script looks at the loss and evaluates after steps 6 and 12
    assert sum(reads.values()) > 0  # reads do show up here
    assert {s: n for s, n in reads.items() if s not in (0, 6, 12)} == {}


def test_training_uses_pytorchs_fused_gelu_and_gets_gpt2s_results(tiny_model):
    """GPT-2's Python "gelu_new" is replaced by the one-kernel tanh GELU: same formula, same logits."""
    import torch

    torch.manual_seed(0)  # the new head `score` gets the same initial weights in both
    original, tokenizer = lora_model(tiny_model)
    torch.manual_seed(0)
    model, _ = lora_model(tiny_model, speed_ups=True)
    assert {type(m).__name__ for m in model.modules()} >= {"GELUTanh"}
    assert {type(m).__name__ for m in original.modules()} >= {"NewGELUActivation"}
    assert "NewGELUActivation" not in {type(m).__name__ for m in model.modules()}
    batch = tokenizer(["a wonderful film . overall great", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, original(**batch).logits, rtol=1e-5, atol=1e-5)


def test_compiled_training_compiles_the_block_once_and_learns_the_same(tiny_model, reviews, tmp_path, monkeypatch):
    """With TORCH_COMPILE, all blocks and every review length share one compiled graph, and
    evaluation needs none: each extra graph would make the user wait for another compilation. The
    "eager" backend makes the same graphs as the real one without building kernels."""
    import torch
    from torch._dynamo.utils import counters

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kwargs: compile_module(self, **kwargs, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    # (max length 40: a length equal to the tiny model's width, 64, would be compiled apart)
    cfg, _ = fine_tune_lora.parse_args(["--model_name", str(tiny_model), "--dataset_name", str(reviews),
                                        "--max_length", "40", "--max_train_samples", "48", "--max_eval_samples", "24",
                                        "--num_epochs", "2", "--torch_compile", "--output_dir", str(tmp_path / "out")])
    try:
        compiled = fine_tune_lora.fine_tune(cfg)
    finally:
        torch._dynamo.reset()
    assert compiled["config"]["torch_compile"] is True
    assert counters["stats"]["unique_graphs"] == 1
    # and the compiled steps compute what the plain ones do (with the eager backend, to the last bit)
    cfg.torch_compile, cfg.output_dir = False, str(tmp_path / "plain")
    plain = fine_tune_lora.fine_tune(cfg)
    assert compiled["train_loss"] == plain["train_loss"] and compiled["accuracy"] == plain["accuracy"]


def test_the_classifier_keeps_no_key_value_cache(tiny_model, trained):
    """GPT-2 by default returns a copy of every layer's keys and values, for generating text. A
    classifier never generates, so the script turns the copies off, for training and for a saved
    adapter; the logits stay the same."""
    import torch

    caches = {"cache", "past_key_values"}
    model, tokenizer = lora_model(tiny_model, speed_ups=True)
    batch = tokenizer(["a wonderful film . overall great"], return_tensors="pt")
    with torch.no_grad():
        without = model(**batch)
        model.config.use_cache = True  # transformers' default
        with_cache = model(**batch)
    assert not caches & set(without.keys())
    assert caches & set(with_cache.keys())
    torch.testing.assert_close(without.logits, with_cache.logits)

    saved, tokenizer = fine_tune_lora.load_saved_model(trained[0])
    with torch.no_grad():
        assert not caches & set(saved(**tokenizer(["dull"], return_tensors="pt")).keys())


def test_batches_come_the_same_from_workers_started_as_on_windows_and_python_3_14(tiny_model, reviews, tmp_path):
    """On a GPU the Trainer prepares batches in worker processes. On Windows, and on Linux from
    Python 3.14, those start as fresh processes ("spawn", "forkserver") and receive the collator
    pickled; the batches must come out as they do without workers."""
    import multiprocessing

    import torch

    cfg = settings(tiny_model, reviews, "--max_length", "64", "--max_train_samples", "48")
    model, tokenizer = lora_model(tiny_model)
    train, _ = tokenized_reviews(cfg, tokenizer)

    def batches(workers):
        trainer = trainer_for(model, tokenizer, tmp_path, train=train, dataloader_num_workers=workers,
                              train_sampling_strategy="group_by_length")
        return list(trainer.get_train_dataloader())

    previous = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    try:
        from_workers = batches(workers=2)
    finally:
        multiprocessing.set_start_method(previous, force=True)
    in_process = batches(workers=0)
    assert len(from_workers) == len(in_process) == 6
    for a, b in zip(from_workers, in_process):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a)


# The script with the GPU's data loading on the CPU: what hardware_arguments gives a GPU run, 2 loader workers.
WITH_WORKERS = """
import sys
sys.path.insert(0, sys.argv[1])
import fine_tune_lora
arguments = fine_tune_lora.hardware_arguments
fine_tune_lora.hardware_arguments = lambda cfg, setup: {**arguments(cfg, setup), "dataloader_num_workers": 2}
sys.exit(fine_tune_lora.main(sys.argv[2:]))
"""


def test_loader_workers_start_without_the_tokenizers_fork_warning(tiny_model, tmp_path):
    """On a GPU, 2 workers are forked to prepare the batches, after the tokenizers ran in parallel (a first run: its
    reviews not tokenized before). tokenizers before 0.22.2 printed a "process just got forked" warning there; the
    releases transformers 5.18 and later require turn their parallelism off in the workers silently
    (huggingface/tokenizers#1898). The run is as a user's: TOKENIZERS_PARALLELISM not set."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, base_args, write_split_files

    env = {key: value for key, value in os.environ.items() if key != "TOKENIZERS_PARALLELISM"}
    env["HF_DATASETS_CACHE"] = str(tmp_path / "cache")  # a first run: the reviews are tokenized in this process
    data = write_split_files(tmp_path / "reviews", "parquet")
    done = subprocess.run([sys.executable, "-c", WITH_WORKERS, str(ROOT), *base_args(tiny_model, data),
                           "--num_epochs", "1", "--output_dir", tmp_path / "out"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert "tokenizers" not in done.stderr and "forked" not in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize("hardware_bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_is_bf16_only_where_the_gpu_has_it(monkeypatch, hardware_bf16, expected):
    """A GPU before Ampere (a T4, a V100) can only emulate bf16, slowly; there "auto" means fp16.
    No GPU here, so one is described to the script as torch would describe it."""
    import torch

    cfg, _ = fine_tune_lora.parse_args([])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a GPU")
    # torch says yes to bf16 where it can emulate it, unless asked for hardware support only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: hardware_bf16 or including_emulation)
    assert fine_tune_lora.pick_device_and_precision(cfg) == ("cuda", "a GPU", expected)


def test_the_benchmark_prints_its_table_and_the_script_pads_far_less(tiny_model, reviews, tmp_path):
    """benchmarks/speed.py runs both recipes on the same reviews and prints one table. The reviews
    here are 12 to 76 tokens long, 41 on average: padded to 96 as the naive recipe does, under half
    of what is processed is real; the script's recipe pads each batch only to its longest review."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    report = tmp_path / "speed.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--model", str(tiny_model),
                           "--dataset", str(reviews), "--train_samples", "240", "--eval_samples", "64",
                           "--max_length", "96", "--profile_steps", "2", "--json", str(report)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["recipe"]: row for row in json.loads(report.read_text())["rows"]}
    assert rows.keys() == {"naive", "script"} and not any("failed" in row for row in rows.values())
    naive, script = rows["naive"], rows["script"]
    # the naive recipe computes in fp32; the script as "auto" decides on this machine (no GPU here)
    auto = fine_tune_lora.pick_device_and_precision(fine_tune_lora.parse_args([])[0])[2]
    assert naive["precision"] == "fp32" and script["precision"] == auto
    assert naive["padding_efficiency_train"] < 0.6 and naive["padding_efficiency_eval"] < 0.6
    assert script["padding_efficiency_train"] > 0.8 and script["padding_efficiency_eval"] > 0.8
    assert all(row["train_samples_per_second"] > 0 and row["eval_samples_per_second"] > 0 for row in rows.values())
    table = done.stdout[done.stdout.index("| recipe |"):]
    assert "| naive (fp32) |" in table and f"| script ({auto}) |" in table and "x) |" in table
    # each recipe's profile: the time of its profiled steps and what took most of it
    for row in rows.values():
        assert row["profile"]["steps"] == 2 and row["profile"]["step_ms"] > 0, row["profile"]
        assert row["profile"]["top"] and all(t["ms_per_step"] > 0 for t in row["profile"]["top"])
        assert f"{row['recipe']}: {row['profile']['step_ms']:.1f} ms per step (2 steps" in table


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the processes in /proc (Linux)")
def test_ctrl_c_stops_the_benchmark_with_the_recipe_it_runs(tiny_model, reviews, tmp_path):
    """Each recipe runs in a session of its own, out of reach of the terminal's Ctrl-C: the benchmark
    stops it itself, in one line, rather than leaving it training on in the background."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    marker = str(tmp_path / "speed.json")  # in the command line of the benchmark and of each recipe's process

    def processes():
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if marker in cmdline.read_bytes().decode(errors="replace"):
                    found.append(int(cmdline.parent.name))
            except OSError:  # ended meanwhile
                pass
        return found

    benchmark = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--model", str(tiny_model),
                                  "--dataset", str(reviews), "--json", marker],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(processes()) < 2 and time.monotonic() < deadline:  # the benchmark and its first recipe
        time.sleep(0.1)
    assert len(processes()) >= 2, "the first recipe did not start"
    benchmark.send_signal(signal.SIGINT)  # what Ctrl-C sends to the terminal's process group, the benchmark alone
    stderr = benchmark.communicate(timeout=60)[1]
    assert benchmark.returncode == 130 and stderr.strip().endswith("Stopped during the recipe 'naive'"), stderr[-2000:]
    wait_until(lambda: processes() == [], what="the recipe's processes ending", seconds=30)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="sees what a process loads in /proc (Linux)")
def test_ctrl_c_while_the_benchmark_loads_its_libraries_is_one_line(tiny_model, reviews):
    """Before any recipe runs, Ctrl-C ends the benchmark with one line and no traceback."""
    import signal
    import subprocess
    import sys

    from conftest import ROOT, loading_libraries

    benchmark = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--model", str(tiny_model),
                                  "--dataset", str(reviews)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: loading_libraries(benchmark.pid), benchmark, "the libraries loading", seconds=60)
    benchmark.send_signal(signal.SIGINT)
    stderr = benchmark.communicate(timeout=60)[1]
    assert benchmark.returncode == 130 and stderr.strip() == "Stopped", stderr[-2000:]


def test_the_benchmark_runs_no_recipe_once_its_time_budget_is_spent(tiny_model, reviews, tmp_path):
    """--budget bounds the whole benchmark: a recipe that would start with under 10 s left is not run,
    and the table says so instead of the run going past the time it was given."""
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--model", str(tiny_model),
                           "--dataset", str(reviews), "--budget", "5"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| naive | failed: not run: the time budget was spent |" in done.stdout
    assert "| script | failed: not run: the time budget was spent |" in done.stdout


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp32"), (None, "fp32")])
def test_auto_precision_on_a_cpu_is_bf16_only_where_it_has_bf16_arithmetic(monkeypatch, native_bf16, expected):
    """Where the CPU computes bf16 in hardware (AVX512-BF16), "auto" trains in bf16 (faster); where it would
    only emulate it (slower than fp32), or where torch cannot tell (None: not among the CPU's capabilities, as on
    an ARM CPU), in fp32. The CPU is described to the script as torch describes it."""
    import types

    import torch

    cfg, _ = fine_tune_lora.parse_args([])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    capabilities = {"avx2": True} if native_bf16 is None else {"avx2": True, "avx512_bf16": native_bf16}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: types.MappingProxyType(capabilities))
    assert fine_tune_lora.pick_device_and_precision(cfg) == ("cpu", "CPU", expected)


def test_bf16_asked_for_on_a_cpu_without_it_is_done_with_a_warning(monkeypatch, capsys):
    """Emulated bf16 can make a CPU run many times slower: the user who asks for it gets it, and is told."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for native_bf16, warned in ((False, True), (True, False)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": native_bf16})
        cfg, _ = fine_tune_lora.parse_args(["--precision", "bf16"])
        assert fine_tune_lora.pick_device_and_precision(cfg) == ("cpu", "CPU", "bf16")
        assert ("this CPU has no bf16 arithmetic" in capsys.readouterr().out) == warned


def test_the_gpu_checks_run_section_by_section_each_within_its_budget(tiny_model, reviews, tmp_path):
    """benchmarks/gpu_checks.py, the one command prepared for the GPU machine, tried with --tiny as its test:
    the sections in order, each within its budget; one given too little time (speed, 5 s) is stopped at it, and
    those before it and after it leave their files. On a CPU fp32 stands in for fp16 and the graphs are not used:
    fp16's row has no scaler and no skipped step, its saved adapter reloads to the accuracy the run evaluated,
    and the three exactness runs (two usual, one asking for the graphs) agree."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_checks.py"), "--tokenizer", str(tiny_model),
                           "--dataset", str(reviews), "--out", str(out), "--tiny", "--budget", "speed=5"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sections = json.loads((out / "sections.json").read_text())
    assert list(sections) == ["smoke", "fp16", "speed", "exactness"]
    assert {name: section["ended"] for name, section in sections.items()} == {
        "smoke": "done", "fp16": "done", "speed": "stopped at its budget", "exactness": "done"}
    assert all(section["seconds"] <= section["budget"] + 2 for section in sections.values()), sections
    assert json.loads((out / "smoke.json").read_text())["smoke"] == {
        "skipped": "CUDA_GRAPHS is not used here (no CUDA GPU)"}
    fp16 = json.loads((out / "fp16.json").read_text())
    (row,) = fp16["rows"]
    assert row["precision"] == "fp32" and row["steps"] == 6 and row["skipped_steps"] == [] and row["scales"] == []
    assert row["reloaded_accuracy"] == pytest.approx(row["accuracy"])  # the saved adapter, as --predict loads it
    assert "| trainable parameters |" in fp16["comparison"] and "| LoRA | full fine-tuning |" in fp16["comparison"]
    exactness = json.loads((out / "exactness.json").read_text())["exactness"]
    assert list(exactness) == ["usual", "usual again", "graphs"]
    assert len({json.dumps(run["steps"]["losses"]) for run in exactness.values()}) == 1  # no graphs on a CPU
    summary = (out / "summary.md").read_text()
    assert "## speed: stopped at its budget (5 s of 5)" in summary and "| fp32 | 6 | 0 | none (no scaler) |" in summary
    assert "the graphed run from the first by 0.00e+00" in summary and ": within" in summary
    assert not list(tmp_path.glob("comparison.*"))  # --compare wrote its table in a folder of its own


def read_results_history(folder):
    import json

    return json.loads((Path(folder) / "log_history.json").read_text())


def test_cuda_graphs_change_nothing_on_a_cpu(tiny_model, reviews, tmp_path, capsys):
    """CUDA_GRAPHS is for CUDA GPUs: on a CPU (or a Mac) the run says so in one line and trains exactly as
    without it."""
    runs = {}
    for graphs in ("false", "true"):
        cfg = settings(tiny_model, reviews, "--max_length", "64", "--max_train_samples", "48", "--max_eval_samples",
                       "16", "--num_epochs", "1", "--cuda_graphs", graphs, "--output_dir", str(tmp_path / graphs))
        runs[graphs] = fine_tune_lora.fine_tune(cfg)
        said = capsys.readouterr().out
        assert ("CUDA_GRAPHS: not used, as there is no CUDA GPU here" in said) == (graphs == "true")
        assert "replayed as CUDA graphs" not in said
    for key in ("train_loss", "eval_loss", "accuracy"):
        assert runs["true"][key] == runs["false"][key]


def test_steps_recorded_once_per_padded_length_and_replayed_learn_as_the_usual_steps(tiny_model, reviews, tmp_path,
                                                                                     monkeypatch):
    """What CUDA_GRAPHS records, tried without a GPU: the step's loss module (BatchLoss) runs here as itself
    where a GPU would record and replay it. Full batches are padded to a multiple of 64 and get one recording per
    length, every one before the data loader starts (its pin-memory thread must not make CUDA calls during a
    recording); the epoch's last, shorter batch runs as usual; and the run learns exactly what the usual steps
    learn on batches padded to 64."""
    import torch

    recorded, fell_back, recorded_when_loading_began = [], [], []
    monkeypatch.setattr(fine_tune_lora, "why_no_step_graphs", lambda *args: None)  # as on a GPU
    monkeypatch.setattr(fine_tune_lora.StepGraphs, "record",
                        lambda self, module, batch: recorded.append(batch[0].shape) or module)
    loader_iter = torch.utils.data.DataLoader.__iter__

    def iterate(self):  # each data loader that starts, how many shapes were recorded by then
        recorded_when_loading_began.append(len(recorded))
        return loader_iter(self)
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", iterate)
    loss = fine_tune_lora.StepGraphs.loss

    def loss_or_usual_step(self, inputs):
        value = loss(self, inputs)
        if value is None:
            fell_back.append(inputs["input_ids"].shape)
        return value
    monkeypatch.setattr(fine_tune_lora.StepGraphs, "loss", loss_or_usual_step)
    # 52 reviews of 12 to 76 tokens: 6 batches of 8 padded to 64 or 128 tokens, then one of 4
    args = ["--max_length", "100", "--max_train_samples", "52", "--max_eval_samples", "16", "--num_epochs", "1",
            "--precision", "fp32", "--logging_steps", "1"]
    graphed = fine_tune_lora.fine_tune(settings(tiny_model, reviews, *args, "--cuda_graphs", "true",
                                                "--output_dir", str(tmp_path / "graphs")))
    assert sorted(shape[1] for shape in recorded) == [64, 128] and all(shape[0] == 8 for shape in recorded)
    assert recorded_when_loading_began and set(recorded_when_loading_began) == {2}  # all, before any loader began
    assert [shape[0] for shape in fell_back] == [4]
    usual = fine_tune_lora.fine_tune(settings(tiny_model, reviews, *args, "--pad_to_multiple_of", "64",
                                              "--output_dir", str(tmp_path / "usual")))

    def logged(folder, key):  # each step's logged value (logging_steps 1), but the last, shorter batch's
        return [log[key] for log in read_results_history(folder) if key in log][:6]
    for key in ("loss", "grad_norm"):
        assert logged(tmp_path / "graphs", key) == pytest.approx(logged(tmp_path / "usual", key), rel=1e-6)
    assert graphed["train_samples"] == usual["train_samples"] == 52
    # the recorded module: the model's own loss, from the batch padded to 64 as from the batch as it came
    model, tokenizer = lora_model(tiny_model, speed_ups=True)
    graphs = fine_tune_lora.StepGraphs(model, 2, tokenizer.pad_token_id, "fp32", 100)
    assert [graphs.length(n) for n in (1, 64, 65, 200, 256, 300)] == [64, 64, 128, 256, 256, 256]
    batch = tokenizer(["a wonderful film . overall great", "dull"], padding=True, return_tensors="pt")
    batch["labels"] = torch.tensor([1, 0])
    with torch.no_grad():
        torch.testing.assert_close(fine_tune_lora.BatchLoss(model.get_base_model(), None)(**batch),
                                   model(**batch).loss)
        graphs.on_train_begin(None, None, None)  # recorded (here: kept as they are) for 64 and 128 tokens
        torch.testing.assert_close(graphs.loss(dict(batch)), model(**batch).loss)


def test_the_fp16_check_counts_a_step_the_gradient_scaler_skipped(monkeypatch):
    """benchmarks/fp16.py's count of skipped updates, on the CPU with what the Trainer uses on a GPU in fp16: a
    gradient scaler, the fused AdamW, and accelerate's optimizer wrapper, which scales and updates. An overflow at
    step 2 is one skip, at step 2. The wrapper's own flag (step_was_skipped) stays False with a fused optimizer
    (huggingface/accelerate#4242); the scale's drop is what tells."""
    import sys
    import types

    import torch
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from conftest import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import fp16

    Accelerator(cpu=True)  # (the wrapper wants one made; the next Trainer's arguments make theirs anew)
    weight = torch.nn.Parameter(torch.ones(4))
    scaler = torch.amp.GradScaler("cpu")
    optimizer = AcceleratedOptimizer(torch.optim.AdamW([weight], lr=0.1, fused=True), device_placement=False,
                                     scaler=scaler)
    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(scaler=scaler))
    count = fp16.CountSkippedSteps(trainer)
    state, flags = types.SimpleNamespace(global_step=0), []
    for step in (1, 2, 3, 4):
        scaler.scale((weight ** 2).sum()).backward()
        if step == 2:
            weight.grad[0] = float("inf")  # an overflow, as fp16 gradients meet one
        before = weight.detach().clone()
        count.on_pre_optimizer_step(None, state, None)
        optimizer.step()  # the scaler's step and update
        count.on_optimizer_step(None, state, None)
        assert torch.equal(weight.detach(), before) == (step == 2)  # the skipped update left the weight alone
        flags.append(optimizer.step_was_skipped)
        optimizer.zero_grad()
        state.global_step += 1
    assert count.skipped == [2] and count.scales == [2.0 ** 16] * 2 + [2.0 ** 15] * 2
    assert flags == [False] * 4  # what the check counted before: nothing
    del sys.modules["fp16"]


def test_the_cuda_graphs_smoke_test_reads_each_replays_loss_before_the_next(monkeypatch):
    """benchmarks/cuda_graphs.py's smoke test, on the CPU with a stand-in for the recorded graphs that behaves as
    torch's make_graphed_callables does: every replay returns the same output buffer, overwritten by the next.
    Four replays with dropout give four losses; without dropout, the replayed loss and gradients are the usual
    step's."""
    import sys

    import torch

    from conftest import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import cuda_graphs

    def record(self, module, batch):
        buffer = torch.zeros(())

        class Replay(torch.autograd.Function):  # as torch's Graphed: the static output, detached
            @staticmethod
            def forward(ctx, loss):
                buffer.copy_(loss)
                return buffer.detach()

            @staticmethod
            def backward(ctx, grad):
                return grad
        return lambda *inputs: Replay.apply(module(*inputs))
    monkeypatch.setattr(fine_tune_lora, "why_no_step_graphs", lambda *args: None)  # as on a GPU
    monkeypatch.setattr(fine_tune_lora.StepGraphs, "record", record)
    seen = cuda_graphs.smoke_test()
    assert seen["dropout_draws_anew"] and len(set(seen["losses_with_dropout"])) == 4, seen
    graphed, usual = seen["loss_graphs_vs_usual"]
    assert graphed == pytest.approx(usual, rel=1e-6) and seen["largest_gradient_difference"] < 1e-5, seen
    del sys.modules["cuda_graphs"]
