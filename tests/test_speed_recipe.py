"""The speed-ups change how the work is done, never what is learned: checked here."""
import random

import pytest

import fine_tune_lora
from fine_tune_lora import LengthGroupedSampler


def imdb_like_lengths(n, seed=0):
    """Review lengths shaped like IMDB's in GPT-2 tokens (median ~220, long tail, cut at 512)."""
    rng = random.Random(seed)
    return [min(512, max(10, int(rng.lognormvariate(5.45, 0.6)))) for _ in range(n)]


def epoch_order(lengths, seed, epoch, batch_size=8):
    sampler = LengthGroupedSampler(lengths, batch_size, seed)
    sampler.set_epoch(epoch)
    return list(sampler)


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
    from transformers import DataCollatorWithPadding, TrainingArguments

    cfg, _ = fine_tune_lora.parse_args(["--model_name", str(tiny_model), "--dataset_name", str(reviews),
                                        "--max_length", "64"])
    tokenizer = fine_tune_lora.load_tokenizer(str(tiny_model))
    train, test = fine_tune_lora.prepare_data(cfg, tokenizer)
    train = train.map(lambda row, i: {"input_ids": [i + 1] * row["length"]}, with_indices=True)  # id = index + 1
    model = fine_tune_lora.load_model(cfg, tokenizer)
    LoraTrainer = fine_tune_lora.make_trainer_class()[0]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, seed=42, report_to="none",
                             use_cpu=True)
    trainer = LoraTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                          data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8))
    trainer.group_by_length = True
    loader = trainer.get_train_dataloader()
    for epoch in range(2):
        loader.set_epoch(epoch)
        seen = []
        for batch in loader:
            ids = batch["input_ids"] * batch["attention_mask"]
            seen += [int(row.max()) - 1 for row in ids]
            assert batch["input_ids"].shape[1] % 8 == 0
        assert sorted(seen) == list(range(len(train)))
        assert seen == epoch_order(train["length"], 42, epoch)
    assert torch.is_tensor(batch["labels"])


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_both_cpu_precisions_learn_and_keep_the_trained_weights_in_fp32(tiny_model, reviews, tmp_path, precision):
    """"auto" picks one of the two on a CPU, by what the CPU computes in hardware: both must learn.
    Under bf16 the frozen layers are stored in bf16; the adapter and `score` must stay fp32."""
    from conftest import base_args, read_results, run_script
    from safetensors.torch import load_file

    out = tmp_path / precision
    done = run_script(*base_args(tiny_model, reviews), "--precision", precision, "--output_dir", out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"precision {precision}" in done.stdout
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert {str(t.dtype) for t in weights.values()} == {"torch.float32"}
    assert read_results(out)["accuracy"] >= 0.9


def load_lora_model(tiny_model):
    cfg, _ = fine_tune_lora.parse_args(["--model_name", str(tiny_model)])
    tokenizer = fine_tune_lora.load_tokenizer(str(tiny_model))
    return fine_tune_lora.load_model(cfg, tokenizer).eval(), tokenizer


def test_attention_without_the_mask_classifies_each_review_as_it_would_alone(tiny_model):
    """The script's attention ignores the padding mask (GPT-2 is causal and pads on the right):
    padding a review among longer ones must not change its logits, which must also be the ones
    transformers' own attention gives with the mask."""
    import torch
    from conftest import make_reviews

    model, tokenizer = load_lora_model(tiny_model)
    features = [tokenizer(text) for text in make_reviews(6, seed=3)[0]]
    assert len({len(f["input_ids"]) for f in features}) > 1  # so that most of them are padded
    batch = fine_tune_lora.make_collator(tokenizer, 8)(features)
    assert batch["input_ids"].shape[1] % 8 == 0
    with torch.no_grad():
        with_mask = model(**batch).logits
        fine_tune_lora.attend_without_the_padding_mask(model, tokenizer)
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

    make_trainer_class = fine_tune_lora.make_trainer_class

    def with_step_numbers():
        LoraTrainer, *others = make_trainer_class()

        class Numbered(LoraTrainer):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.add_callback(StepNumber())

        return (Numbered, *others)

    monkeypatch.setattr(fine_tune_lora, "make_trainer_class", with_step_numbers)
    cfg, _ = fine_tune_lora.parse_args(["--model_name", str(tiny_model), "--dataset_name", str(reviews),
                                        "--max_length", "40", "--max_train_samples", "48", "--max_eval_samples", "16",
                                        "--num_epochs", "2", "--output_dir", str(tmp_path / "out")])
    with CountReads():
        fine_tune_lora.train(cfg)
    # 6 steps per epoch; the Trainer evaluates (and the script looks at the loss) after steps 6 and 12
    assert sum(reads.values()) > 0  # reads do show up here
    assert {s: n for s, n in reads.items() if s not in (0, 6, 12)} == {}


def test_training_uses_pytorchs_fused_gelu_and_gets_gpt2s_results(tiny_model):
    """GPT-2's Python "gelu_new" is replaced by the one-kernel tanh GELU: same formula, same logits."""
    import torch

    torch.manual_seed(0)
    model, tokenizer = load_lora_model(tiny_model)
    torch.manual_seed(0)  # the new head `score` gets the same initial weights in both
    original = fine_tune_lora.load_base_model(str(tiny_model), tokenizer).eval()
    assert {type(m).__name__ for m in model.modules()} >= {"GELUTanh"}
    assert {type(m).__name__ for m in original.modules()} >= {"NewGELUActivation"}
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
        compiled = fine_tune_lora.train(cfg)
    finally:
        torch._dynamo.reset()
    assert compiled["config"]["torch_compile"] is True
    assert counters["stats"]["unique_graphs"] == 1
    # and the compiled steps compute what the plain ones do (with the eager backend, to the last bit)
    cfg.torch_compile, cfg.output_dir = False, str(tmp_path / "plain")
    plain = fine_tune_lora.train(cfg)
    assert compiled["train_loss"] == plain["train_loss"] and compiled["accuracy"] == plain["accuracy"]


def test_evaluation_runs_merged_and_training_gets_its_weights_back_exactly(tiny_model, reviews, tmp_path,
                                                                           monkeypatch):
    """Evaluation folds the adapter into the weights (no adapter products at all), scores as the
    unmerged adapter does, and leaves every weight bit for bit as it found it, so that training
    goes on exactly as it would have without the evaluation."""
    import contextlib

    import torch
    from transformers import TrainingArguments

    cfg, _ = fine_tune_lora.parse_args(["--model_name", str(tiny_model), "--dataset_name", str(reviews),
                                        "--max_length", "64"])
    tokenizer = fine_tune_lora.load_tokenizer(str(tiny_model))
    _, test = fine_tune_lora.prepare_data(cfg, tokenizer)
    torch.manual_seed(0)
    model = fine_tune_lora.load_model(cfg, tokenizer)
    with torch.no_grad():  # a trained-looking adapter: peft starts B at zero, which would merge to nothing
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5)
    before = {name: weight.detach().clone() for name, weight in model.named_parameters()}
    adapter_products = []
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_hook(lambda *_: adapter_products.append(1))
    LoraTrainer = fine_tune_lora.make_trainer_class()[0]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=8, report_to="none", use_cpu=True)
    trainer = LoraTrainer(model=model, args=args, eval_dataset=test, processing_class=tokenizer,
                          data_collator=fine_tune_lora.make_collator(tokenizer, 8),
                          compute_metrics=fine_tune_lora.compute_metrics)

    merged = trainer.evaluate()
    assert adapter_products == []
    for name, weight in model.named_parameters():
        assert torch.equal(weight, before[name]), name
    monkeypatch.setattr(fine_tune_lora, "adapter_merged", lambda model: contextlib.nullcontext())
    unmerged = trainer.evaluate()
    assert adapter_products  # the hook does see unmerged adapters at work
    assert merged["eval_loss"] == pytest.approx(unmerged["eval_loss"], abs=1e-5)
    assert merged["eval_confusion_matrix"] == unmerged["eval_confusion_matrix"]


def test_the_classifier_keeps_no_key_value_cache(tiny_model, trained):
    """GPT-2 by default returns a copy of every layer's keys and values, for generating text. A
    classifier never generates, so the script turns the copies off, for training and for a saved
    adapter; the logits stay the same."""
    import torch

    caches = {"cache", "past_key_values"}
    model, tokenizer = load_lora_model(tiny_model)
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


def test_the_trainers_tally_of_work_counts_the_weights_once(tiny_model, tmp_path, monkeypatch):
    """The Trainer's `total_flos` (6 x tokens x weights) comes out as the Trainer computes it, but
    the weights are counted once, not walked over again at every step."""
    import torch
    from transformers import Trainer, TrainingArguments

    model, tokenizer = load_lora_model(tiny_model)
    LoraTrainer = fine_tune_lora.make_trainer_class()[0]
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = LoraTrainer(model=model, args=args, processing_class=tokenizer)
    batches = [{"input_ids": torch.zeros(8, length, dtype=torch.long)} for length in (16, 64, 512, 64)]
    expected = [Trainer.floating_point_ops(trainer, batch) for batch in batches]

    gpt2 = model.get_base_model()
    counts = []
    count_weights = gpt2.num_parameters
    monkeypatch.setattr(gpt2, "num_parameters", lambda **kwargs: counts.append(1) or count_weights(**kwargs))
    assert [trainer.floating_point_ops(batch) for batch in batches] == expected
    assert len(counts) == 1


def test_batches_come_the_same_from_workers_started_as_on_windows_and_python_3_14(tiny_model, reviews, tmp_path):
    """On a GPU the Trainer prepares batches in worker processes. On Windows, and on Linux from
    Python 3.14, those start as fresh processes ("spawn", "forkserver") and receive the collator
    pickled; the batches must come out as they do without workers."""
    import multiprocessing

    import torch
    from transformers import TrainingArguments

    cfg, _ = fine_tune_lora.parse_args(["--model_name", str(tiny_model), "--dataset_name", str(reviews),
                                        "--max_length", "64", "--max_train_samples", "48"])
    tokenizer = fine_tune_lora.load_tokenizer(str(tiny_model))
    train, _ = fine_tune_lora.prepare_data(cfg, tokenizer)
    model = fine_tune_lora.load_model(cfg, tokenizer)
    LoraTrainer = fine_tune_lora.make_trainer_class()[0]

    def batches(workers):
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, seed=42, report_to="none",
                                 use_cpu=True, dataloader_num_workers=workers)
        trainer = LoraTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                              data_collator=fine_tune_lora.make_collator(tokenizer, 8))
        trainer.group_by_length = True
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
                           "--dataset", str(reviews), "--train_samples", "64", "--eval_samples", "64",
                           "--max_length", "96", "--json", str(report)],
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


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp32"), (None, "fp32")])
def test_auto_precision_on_a_cpu_is_bf16_only_where_it_has_bf16_arithmetic(monkeypatch, native_bf16, expected):
    """Where the CPU computes bf16 in hardware, "auto" trains in bf16 (faster); where it would only
    emulate it (slower than fp32), or where torch cannot tell (None: no such test), in fp32."""
    import torch

    cfg, _ = fine_tune_lora.parse_args([])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if native_bf16 is None:
        monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    else:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native_bf16, raising=False)
    assert fine_tune_lora.pick_device_and_precision(cfg) == ("cpu", "CPU", expected)


def test_bf16_asked_for_on_a_cpu_without_it_is_done_with_a_warning(monkeypatch, capsys):
    """Emulated bf16 can make a CPU run many times slower: the user who asks for it gets it, and is told."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for native_bf16, warned in ((False, True), (True, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native_bf16, raising=False)
        cfg, _ = fine_tune_lora.parse_args(["--precision", "bf16"])
        assert fine_tune_lora.pick_device_and_precision(cfg) == ("cpu", "CPU", "bf16")
        assert ("this CPU has no bf16 arithmetic" in capsys.readouterr().out) == warned
