"""LoRA vs full fine-tuning, several adapters on one base, and merging."""
import json
import subprocess
import sys

import pytest
from conftest import base_args, check_model_card, read_results, run_main, wait_until

LABELLED = """
import json, sys
from transformers import pipeline
print(json.dumps(pipeline("text-classification", model=sys.argv[1])(json.loads(sys.argv[2]))))
"""


def labels_from_a_pipeline(folder):
    """What transformers' pipeline answers for TEXTS, in a fresh process, with nothing but the folder."""
    done = subprocess.run([sys.executable, "-c", LABELLED, str(folder), json.dumps(TEXTS)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return {answer["label"] for answer in json.loads(done.stdout.strip().splitlines()[-1])}

TEXTS = ["the film was wonderful . overall superb", "dull wooden acting . overall awful",
         "the camera and the music . overall", "a scene with a dog . overall loved"]


def predictions_table(stdout):
    """Rows of the --predict table: the cells before the text, split into (label, probability)."""
    rows = []
    for line in stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] in ("positive", "negative"):
            rows.append(parts)
    return rows


def test_full_finetune_saves_a_whole_model_that_reloads(tiny_model, reviews, tmp_path, capsys):
    out = tmp_path / "full"
    done = run_main(capsys, *base_args(tiny_model, reviews), "--full_finetune", "--full_learning_rate", "1e-3",
                    "--full_output_dir", out, "--output_dir", tmp_path / "unused")
    assert done.returncode == 0, done.stderr[-2000:]
    results = read_results(out)
    assert results["method"] == "full" and results["trainable_percent"] == 100
    assert results["accuracy"] >= 0.9
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert not (out / "what_lora_learned.png").exists() and "what_lora_learned" not in results  # no adapter
    assert not (tmp_path / "unused").exists()
    check_model_card(out, "transformers", results["accuracy"])
    assert labels_from_a_pipeline(out) == {"negative", "positive"}  # TEXTS holds clear cases of each
    # A plain AutoModelForSequenceClassification, in a fresh process, predicts what --predict prints.
    code = ("import sys, json, torch; from transformers import AutoModelForSequenceClassification as M, "
            "AutoTokenizer as T; m = M.from_pretrained(sys.argv[1]).eval(); t = T.from_pretrained(sys.argv[1]); "
            "t.pad_token = t.eos_token; b = t(json.loads(sys.argv[2]), padding=True, return_tensors='pt'); "
            "print(json.dumps(m(**b).logits.softmax(-1).tolist()))")
    loaded = subprocess.run([sys.executable, "-c", code, str(out), json.dumps(TEXTS)], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    probabilities = json.loads(loaded.stdout.strip().splitlines()[-1])
    printed = run_main(capsys, "--full_finetune", "--full_output_dir", out, "--predict", *TEXTS)
    assert printed.returncode == 0 and len(predictions_table(printed.stdout)) == len(TEXTS) == len(probabilities)
    for (label, shown, *_), p in zip(predictions_table(printed.stdout), probabilities):
        assert label == ("positive" if p[1] > p[0] else "negative")
        assert float(shown) == pytest.approx(max(p), abs=6e-4)


def test_compare_writes_the_table_with_every_cell_measured(tiny_model, reviews, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # comparison.md, .json and .png are written where the command is run
    done = run_main(capsys, *base_args(tiny_model, reviews), "--num_epochs", "1", "--full_learning_rate", "1e-3",
                    "--output_dir", tmp_path / "lora", "--full_output_dir", tmp_path / "full", "--compare")
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "comparison.md").read_text()
    results = json.loads((tmp_path / "comparison.json").read_text())
    assert set(results) == {"lora", "full"}
    assert results["lora"]["trainable_percent"] < 10 and results["full"]["trainable_percent"] == 100
    for name in ("trainable parameters", "peak GPU memory", "peak process memory", "training time",
                 "training samples/s", "accuracy", "F1", "saved weights on disk"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 4 and all(cells), row
        if name == "peak GPU memory":  # no GPU here: said so, and process memory given instead
            assert cells[1:] == ["n/a (no GPU)", "n/a (no GPU)", "n/a"], row
        else:  # a figure in every cell, and the ratio of the two
            assert not any("n/a" in cell for cell in cells) and cells[3].endswith("x"), row
    assert table in done.stdout
    assert (tmp_path / "comparison.png").stat().st_size > 10_000  # both methods' curves in one figure
    for method in ("lora", "full"):  # the two runs saw the same data and schedule
        assert results[method]["train_samples"] == 240 and results[method]["config"]["seed"] == 42
    assert results["full"]["saved_weights_mb"] > 10 * results["lora"]["saved_weights_mb"]


def test_several_adapters_share_one_base(trained, tiny_model, reviews, tmp_path, capsys, monkeypatch):
    first, _ = trained
    second = tmp_path / "home" / first.name  # the same name, in another folder
    done = run_main(capsys, *base_args(tiny_model, reviews), "--lora_r", "4", "--lora_alpha", "8", "--target_modules",
                    "c_attn", "c_proj", "--seed", "7", "--output_dir", second)
    assert done.returncode == 0, done.stderr[-2000:]
    monkeypatch.setenv("HOME", str(second.parent))  # "~/..." quoted, as the shell leaves it
    both = run_main(capsys, "--predict", *TEXTS, "--adapters", first, f"~/{first.name}")
    assert both.returncode == 0, both.stderr[-2000:]
    header = both.stdout.splitlines()[0].split()
    assert header[:2] == [str(first), str(second)]  # told apart, however long
    rows = predictions_table(both.stdout)
    assert len(rows) == len(TEXTS) and all(len(r) >= 4 for r in rows)
    # each column is exactly what that adapter gives when loaded on its own
    for column, folder in ((0, first), (2, second)):
        alone = predictions_table(run_main(capsys, "--output_dir", folder, "--predict", *TEXTS).stdout)
        assert [r[column:column + 2] for r in rows] == [a[:2] for a in alone]
    # and the two adapters, whose weights differ, do not give the same probabilities
    assert [r[1] for r in rows] != [r[3] for r in rows]


def test_merge_saves_a_plain_model_matching_the_adapter(trained, tmp_path, capsys):
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification

    import fine_tune_lora

    adapter, _ = trained
    source = tmp_path / "adapter"
    shutil.copytree(adapter, source)
    done = run_main(capsys, "--output_dir", source, "--merge")
    assert done.returncode == 0, done.stderr[-2000:]
    merged_dir = tmp_path / "adapter-merged"
    reported = float(done.stdout.split("texts:")[-1].split()[0])
    assert reported < 1e-4
    check_model_card(merged_dir, "transformers", read_results(source)["accuracy"])
    assert labels_from_a_pipeline(merged_dir) <= {"negative", "positive"}
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()  # no peft involved
    assert type(merged).__name__ == "GPT2ForSequenceClassification"
    with_adapter, tokenizer = fine_tune_lora.load_saved_model(source)
    a = fine_tune_lora.classify(with_adapter, tokenizer, TEXTS, 64)
    b = fine_tune_lora.classify(merged, tokenizer, TEXTS, 64)
    assert torch.allclose(a, b, atol=1e-4)


def test_compare_trains_each_variant_in_its_folder_and_goes_on_after_an_interruption(tiny_model, reviews, tmp_path,
                                                                                     capsys, monkeypatch):
    """Three variants of the settings; the comparison is stopped once the first has finished, and the same
    command then skips it and trains the others. Each variant's settings really were applied."""
    import os
    import signal

    from conftest import SCRIPT

    variants = ["--lora_r 4", "--lora_r 16 --lora_alpha 32", "--target_modules c_attn c_proj"]
    args = [*base_args(tiny_model, reviews), "--num_epochs", "1", "--output_dir", "adapter", "--compare", *variants]
    first = tmp_path / "adapter-compare" / "lora_r-4" / "results.json"
    with open(tmp_path / "log", "w") as log:
        process = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], cwd=tmp_path, stdout=log,
                                   stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_until(first.exists, process, "the first variant's results")
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    assert process.returncode == 1 and "Stopped the comparison" in (tmp_path / "log").read_text()
    assert not (tmp_path / "comparison.json").exists()

    monkeypatch.chdir(tmp_path)
    done = run_main(capsys, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "===== --lora_r 4: trained already" in done.stdout
    assert "===== --lora_r 16 --lora_alpha 32: python" in done.stdout
    results = json.loads((tmp_path / "comparison.json").read_text())
    assert list(results) == variants
    # the closed form for each: 2 layers x r x (in + out) per adapted layer, + score (64 x 2)
    c_attn, c_proj = 64 + 192, (64 + 64) + (256 + 64)  # c_proj: attention output, then the MLP's output
    expected = {"--lora_r 4": 2 * 4 * c_attn, "--lora_r 16 --lora_alpha 32": 2 * 16 * c_attn,
                "--target_modules c_attn c_proj": 2 * 8 * (c_attn + c_proj)}
    for variant, lora_weights in expected.items():
        assert results[variant]["trainable_params"] == lora_weights + 64 * 2, variant
    for folder, r in (("lora_r-4", 4), ("lora_r-16-lora_alpha-32", 16), ("target_modules-c_attn-c_proj", 8)):
        own = read_results(tmp_path / "adapter-compare" / folder)
        assert own["config"]["lora_r"] == r and (tmp_path / "adapter-compare" / folder / "adapter_model.safetensors").exists()
    table = (tmp_path / "comparison.md").read_text()
    assert "| | --lora_r 4 | --lora_r 16 --lora_alpha 32 | --target_modules c_attn c_proj |" in table
    for name in ("accuracy", "trainable parameters", "training time", "peak process memory", "saved weights on disk"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert len([c for c in row.strip("|").split("|") if c.strip()]) == 4, row
    assert (tmp_path / "comparison.png").exists()


def test_accuracy_benchmark_writes_its_tables_and_its_command_reruns_nothing_done(tiny_model, reviews, tmp_path):
    """benchmarks/accuracy.py on local folders named relative to where it is started: every run of the study
    trains on them with the settings passed through, and the page names the command that re-measures it."""
    import shlex

    from conftest import ROOT

    benchmark = [sys.executable, str(ROOT / "benchmarks" / "accuracy.py")]
    settings = ["--max_train_samples", "16", "--max_eval_samples", "8", "--max_length", "64", "--lora_r", "4"]
    args = ["--model", tiny_model.name, "--dataset", reviews.name, "--studies", "quick", "--out", str(tmp_path / "acc"),
            *settings]
    done = subprocess.run([*benchmark, *args], capture_output=True, text=True, cwd=tiny_model.parent, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    page = (tmp_path / "acc" / "accuracy.md").read_text()
    assert "CPU" in page and "torch " in page and "peft " in page
    results = json.loads((tmp_path / "acc" / "quick" / "comparison.json").read_text())
    assert list(results) == ["--learning_rate 3e-4", "--learning_rate 1e-3", "--full_finetune true"]
    for name, result in results.items():
        assert (result["train_samples"], result["eval_samples"], result["config"]["lora_r"]) == (16, 8, 4), name
        assert result["config"]["model_name"] == str(tiny_model), name
    assert "| accuracy | " + " | ".join(f"{r['accuracy']:.4f}" for r in results.values()) + " |" in page
    assert results["--learning_rate 1e-3"]["learning_rate"] == 1e-3 and results["--full_finetune true"]["method"] == "full"

    rerun = next(line.strip("`") for line in page.splitlines() if line.startswith("`python benchmarks/accuracy.py"))
    words = shlex.split(rerun)[2:]
    assert words[:4] == ["--model", tiny_model.name, "--dataset", reviews.name]
    again = subprocess.run([*benchmark, *words], capture_output=True, text=True,
                           cwd=tiny_model.parent, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("trained already") == 3


def test_compare_measures_speed_settings_and_trains_again_when_what_it_measures_changes(
        tiny_model, reviews, tmp_path, capsys, monkeypatch):
    """Variants that differ only in a speed setting are a comparison, not a repeat; a variant trained before
    is reused only if everything its figures depend on is the same, not just what training learns from."""
    monkeypatch.chdir(tmp_path)  # comparison.md, .json and .png are written where the command is run
    args = [*base_args(tiny_model, reviews), "--num_epochs", "1", "--max_train_samples", "32", "--output_dir", "a"]
    done = run_main(capsys, *args, "--max_eval_samples", "8", "--compare", "--precision fp32", "--precision bf16")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "comparison.json").read_text())
    assert [r["training_precision"] for r in results.values()] == ["fp32", "bf16"]
    assert ", fp32 / bf16; model " in (tmp_path / "comparison.md").read_text()  # each run's, not the first's alone

    again = run_main(capsys, *args, "--max_eval_samples", "16", "--compare", "--precision fp32")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trained already" not in again.stdout  # evaluated on 8 reviews before: not the figures asked for
    assert json.loads((tmp_path / "comparison.json").read_text())["--precision fp32"]["eval_samples"] == 16

    # Checkpointing and logging do not change what is measured: nothing trains again.
    same = run_main(capsys, *args, "--max_eval_samples", "16", "--logging_steps", "3", "--compare", "--precision fp32")
    assert same.returncode == 0 and "===== --precision fp32: trained already" in same.stdout, same.stderr[-3000:]

    # A run trained on another number of processes (under torchrun) took other steps, in another time: trained again.
    saved = tmp_path / "a-compare" / "precision-fp32" / "results.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "processes": 2}))
    retrained = run_main(capsys, *args, "--max_eval_samples", "16", "--compare", "--precision fp32")
    assert retrained.returncode == 0 and "trained already" not in retrained.stdout, retrained.stderr[-3000:]
    assert json.loads(saved.read_text())["processes"] == 1


def test_the_settings_study_table_has_a_line_per_variant_with_the_noise_of_its_accuracy():
    """accuracy.py --studies settings: each variant's accuracy with two standard errors for the reviews it was
    measured on, its minutes, and a record from before run_seconds and saved_weights_mb still shown."""
    from benchmarks import accuracy

    run = dict(accuracy=0.9, eval_samples=1000, f1=0.89, trainable_params=461952, train_seconds=1800,
               peak_process_memory_gb=5.04)
    table = accuracy.variant_table({"": {**run, "run_seconds": 2400, "saved_weights_mb": 1.86,
                                         "estimated_run_seconds": 2700, "estimated_step_seconds": 10.04},
                                    "--lora_r 4 --lora_alpha 8": {**run, "accuracy": 0.5, "adapter_size_mb": 0.93}})
    lines = table.splitlines()
    assert lines[2] == ("|  | 0.900 ± 0.019 | 0.890 | 461,952 | 30.0 min | 40.0 min | 45 min (10.0 s) | 5.04 GB | "
                        "1.86 MB |")
    assert lines[3] == ("| --lora_r 4 --lora_alpha 8 | 0.500 ± 0.032 | 0.890 | 461,952 | 30.0 min | n/a | n/a | "
                        "5.04 GB | 0.93 MB |")
    assert "1,000 test reviews" in table
