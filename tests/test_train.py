"""The tutorial's main path, through the real entry point: train, save, predict, reload."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (NEGATIVE, POSITIVE, SCRIPT, TINY, TINY_TRAINABLE, base_args, check_model_card, error_lines,
                      make_reviews, read_results, run_main, run_script, write_acl_imdb, write_split_files)

RESULT_KEYS = {"accuracy", "f1", "precision", "recall", "confusion_matrix", "trainable_params", "all_params",
               "train_seconds", "train_samples_per_second", "peak_gpu_memory_gb", "saved_weights_mb", "config"}


def test_training_learns_and_saves_adapter_and_results(trained):
    out, done = trained
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "results.json", "README.md",
            "log_history.json", "training_curves.png"} <= {p.name for p in out.iterdir()}
    assert not (out / "checkpoints").exists(), "a finished run keeps no checkpoints"
    # saved with the usual permissions (safetensors writes its file private), so others can read the folder
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {
        p.name: oct(0o666 & ~umask) for p in out.iterdir()}
    results = read_results(out)
    assert RESULT_KEYS <= results.keys()
    assert results["accuracy"] >= 0.9, results
    assert sum(map(sum, results["confusion_matrix"])) == results["eval_samples"] == 120
    assert results["trainable_params"] == TINY_TRAINABLE
    assert results["peak_gpu_memory_gb"] is None  # no GPU in the tests
    assert results["saved_weights_mb"] == pytest.approx((out / "adapter_model.safetensors").stat().st_size / 1e6)
    assert results["config"]["lora_r"] == 8 and results["config"]["max_length"] == 64
    # what the user reads on screen
    assert f"trainable params: {TINY_TRAINABLE:,}" in done.stdout
    assert "Found 240 train and 120 test reviews" in done.stdout
    # a run of seconds gets its estimate, and no advice to make it quicker
    assert "No GPU found" in done.stdout and "For a quick run" not in done.stdout
    # and results.json keeps it, as printed, beside the time the run took
    printed = re.search(r"One step takes about ([\d.e-]+) s here, so this run needs roughly (\d+) s", done.stdout)
    assert printed.groups() == (f"{results['estimated_step_seconds']:.2g}",
                                f"{max(results['estimated_run_seconds'], 1):.0f}"), results
    assert re.search(r"^accuracy\s+0\.9\d+$", done.stdout, re.M)
    # the attention mask is left out on purpose (exact for GPT-2, tested): no warning about it
    assert "attention_mask" not in done.stdout + done.stderr
    # written to a file (as here), the output is plain lines: no progress bars redrawn, no escape codes
    assert [mark for mark in ("\r", "\x1b", "it/s]", "Loading weights") if mark in done.stdout + done.stderr] == []


def test_a_saved_adapter_has_its_model_card_history_and_curves(trained):
    from matplotlib.image import imread

    out, _ = trained
    results = read_results(out)
    check_model_card(out, "peft", results["accuracy"])
    history = json.loads((out / "log_history.json").read_text())
    # one training loss per logging step (every 10 of the 60 steps here), and an evaluation per epoch
    assert [log["step"] for log in history if "loss" in log] == [10, 20, 30, 40, 50, 60]
    assert [log["epoch"] for log in history if "eval_accuracy" in log] == [1, 2]
    assert imread(out / "training_curves.png").shape[:2] == (350, 1200)  # loss and accuracy panels, 12 x 3.5 inches


def test_predict_prints_a_label_and_probability_per_text(trained, capsys):
    out, _ = trained
    done = run_main(capsys, "--output_dir", out, "--predict", "the film was wonderful . overall superb",
                      "dull wooden acting . overall awful")
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines()[1:] if line.strip()]
    assert rows[0].startswith("positive ") and rows[1].startswith("negative ")
    probability = float(rows[0].split()[1])
    assert 0.5 < probability <= 1.0


def test_output_piped_into_a_program_that_stops_reading_ends_with_one_line(trained):
    """`--predict ... | head -2`, or a training run piped into head: the rows no one reads are no traceback."""
    out, _ = trained
    texts = [f"review {i} . overall superb" for i in range(3000)]  # more than a pipe holds
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--output_dir", str(out), "--predict", *texts],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().split() == [str(out), "text"]
    process.stdout.close()  # as head does once it has its lines
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 1 and "Traceback" not in stderr
    assert error_lines(stderr) == ["error: Stopped; nothing was left half-written."], stderr[-2000:]


RELOAD = """
import json, sys, torch
from peft import AutoPeftModelForSequenceClassification, PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, texts = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(folder)
tokenizer.pad_token = tokenizer.eos_token
batch = tokenizer(texts, padding=True, return_tensors="pt")
# as the README loads it: the base model's config is given the task's labels and pad token
auto = AutoPeftModelForSequenceClassification.from_pretrained(
    folder, id2label={0: "negative", 1: "positive"}, pad_token_id=tokenizer.pad_token_id).eval()
assert auto.config.id2label == {0: "negative", 1: "positive"}, auto.config.id2label
base = AutoModelForSequenceClassification.from_pretrained(auto.peft_config["default"].base_model_name_or_path,
                                                          num_labels=2, pad_token_id=tokenizer.pad_token_id)
manual = PeftModel.from_pretrained(base, folder).eval()
with torch.no_grad():
    print(json.dumps([auto(**batch).logits.softmax(-1).tolist(), manual(**batch).logits.softmax(-1).tolist()]))
"""


def test_reloading_in_a_fresh_process_gives_the_same_predictions(trained, capsys):
    out, _ = trained
    texts = ["the film was wonderful . overall superb", "dull wooden acting . overall awful", "the plot . overall"]
    done = subprocess.run([sys.executable, "-c", RELOAD, str(out), json.dumps(texts)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    auto, manual = json.loads(done.stdout.strip().splitlines()[-1])
    flat = [p for row in auto for p in row]
    assert flat == pytest.approx([p for row in manual for p in row], abs=1e-6)  # the two ways agree
    predicted = run_main(capsys, "--output_dir", out, "--predict", *texts)
    assert predicted.returncode == 0 and len(predicted.stdout.splitlines()[1:]) == len(texts) == len(auto)
    for row, probabilities in zip(predicted.stdout.splitlines()[1:], auto):
        label, shown = row.split()[:2]
        expected = max(range(2), key=lambda i: probabilities[i])
        assert label == ["negative", "positive"][expected]
        assert float(shown) == pytest.approx(probabilities[expected], abs=6e-4)


def test_reloaded_adapter_reproduces_the_reported_accuracy(trained, reviews):
    """The folder a user gets back classifies the test set exactly as well as results.json says."""
    import pandas as pd

    import fine_tune_lora

    out, _ = trained
    test = pd.read_parquet(reviews / "test.parquet")
    model, tokenizer = fine_tune_lora.load_saved_model(out)
    logits = fine_tune_lora.classify(model, tokenizer, test.text.tolist(), max_length=64)
    accuracy = float((logits.argmax(-1).numpy() == test.label.values).mean())
    assert accuracy == pytest.approx(read_results(out)["accuracy"], abs=1 / len(test) + 1e-9)


@pytest.mark.parametrize("layout", ["aclImdb", "csv", "jsonl", "jsonl, labels 0.0 and 1.0"])
def test_each_local_data_layout_trains(tiny_model, tmp_path, layout, capsys):
    data = tmp_path / "data"
    if layout == "aclImdb":
        write_acl_imdb(data, n_train=64, n_test=32)
    else:
        write_split_files(data, layout.split(",")[0], n_train=64, n_test=32)
    if "0.0" in layout:  # as some tools write them; the loss needs whole numbers
        for file in data.iterdir():
            file.write_text(re.sub(r'"label":(\d)', r'"label":\1.0', file.read_text()))
    done = run_main(capsys, *base_args(tiny_model, data), "--num_epochs", "1", "--output_dir", tmp_path / "out")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Found 64 train and 32 test reviews" in done.stdout
    assert read_results(tmp_path / "out")["eval_samples"] == 32
    # and each review has its own label: the synthetic reviews end with a word of their sentiment
    import fine_tune_lora

    for split in fine_tune_lora.load_reviews(fine_tune_lora.parse_args(base_args(tiny_model, data))[0]):
        assert split["label"] == [int(text.split()[-1] in POSITIVE) for text in split["text"]]
        assert all(text.split()[-1] in POSITIVE + NEGATIVE for text in split["text"])


def test_a_data_folder_named_like_a_file_format_is_read_as_that_folder(tiny_model, tmp_path, capsys, monkeypatch):
    """datasets has readers named csv, json and parquet: a folder of such a name is read, and only it."""
    write_split_files(tmp_path / "csv", "csv", n_train=64, n_test=32)
    write_split_files(tmp_path / "last-year" / "csv", "csv", n_train=100, n_test=50)  # not to be read
    monkeypatch.chdir(tmp_path)
    done = run_main(capsys, *base_args(tiny_model, "csv"), "--num_epochs", "1", "--output_dir", tmp_path / "out")
    assert done.returncode == 0 and "Found 64 train and 32 test reviews in csv" in done.stdout, done.stderr[-2000:]


def test_subsets_are_random_not_the_first_rows(tiny_model, tmp_path, capsys):
    """IMDB is sorted by label: the first N rows would all be negative."""
    data = tmp_path / "sorted"
    data.mkdir()
    import pandas as pd

    for split, n in (("train", 200), ("test", 100)):
        texts, labels = make_reviews(n, seed=5)
        frame = pd.DataFrame({"text": texts, "label": labels}).sort_values("label")
        frame.to_parquet(data / f"{split}.parquet")
    done = run_main(capsys, *base_args(tiny_model, data), "--num_epochs", "1", "--max_train_samples", "64",
                      "--max_eval_samples", "40", "--output_dir", tmp_path / "out")
    assert done.returncode == 0, done.stderr[-2000:]
    # a run this small is quick already: the estimate comes without the advice to make it quicker
    assert "No GPU found" in done.stdout and "For a quick run" not in done.stdout
    matrix = read_results(tmp_path / "out")["confusion_matrix"]
    negatives, positives = sum(matrix[0]), sum(matrix[1])
    assert negatives + positives == 40 and min(negatives, positives) >= 10


def test_a_cpu_run_of_hours_suggests_the_quick_run(tiny_model, reviews, tmp_path):
    """The estimate comes before training; a run that needs more than half an hour gets the quick run's
    flags (a user would then press Ctrl-C, as this test does). Its figures agree with one another: a step
    is what the line before counts, GRADIENT_ACCUMULATION_STEPS batches (here 30: one step an epoch)."""
    args = [*base_args(tiny_model, reviews), "--num_epochs", "100000", "--gradient_accumulation_steps", "30",
            "--output_dir", tmp_path / "out"]
    process = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    printed, deadline = [], time.monotonic() + 300
    while not printed or not printed[-1].startswith("No GPU found"):
        printed.append(process.stdout.readline())
        assert printed[-1], "the script ended before its estimate"
        assert time.monotonic() < deadline, printed
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    estimate = printed[-1]
    assert re.search(r"this run needs roughly \d+\.\d h\. For a quick run: --max_train_samples 2000 "
                     r"--max_eval_samples 500 --num_epochs 1 --max_length 256 --learning_rate 0\.001$", estimate)
    assert "1 step of 240 reviews = 100,000 steps" in printed[-2]
    step, hours = map(float, re.search(r"One step takes about ([\d.e-]+) s .* roughly ([\d.]+) h", estimate).groups())
    # the rest of the time is the evaluations: 120 test reviews an epoch, each a timed forward pass (no backward)
    assert 0.75 < step * 100_000 / (hours * 3600) < 1, estimate


def test_empty_reviews_are_dropped_and_counted(tiny_model, tmp_path, capsys):
    import pandas as pd

    data = write_split_files(tmp_path / "data", "parquet", n_train=64, n_test=32)
    frame = pd.read_parquet(data / "train.parquet")
    frame.loc[[3, 10, 20], "text"] = ["", "   ", "\n\t"]
    frame.to_parquet(data / "train.parquet")
    done = run_main(capsys, *base_args(tiny_model, data), "--num_epochs", "1", "--output_dir", tmp_path / "out")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Dropped 3 empty or whitespace-only train reviews" in done.stdout
    assert read_results(tmp_path / "out")["train_samples"] == 61


def test_a_flag_overrides_its_constant_like_editing_the_file(tiny_model, reviews, tmp_path, monkeypatch, capsys):
    import fine_tune_lora

    from_flag, _ = fine_tune_lora.parse_args(["--lora_r", "4", "--target_modules", "c_attn", "c_proj",
                                              "--max_train_samples", "none", "--full_finetune"])
    monkeypatch.setattr(fine_tune_lora, "LORA_R", 4)
    monkeypatch.setattr(fine_tune_lora, "TARGET_MODULES", "c_attn c_proj")  # a string edited in: its names
    monkeypatch.setattr(fine_tune_lora, "MAX_TRAIN_SAMPLES", 300)
    monkeypatch.setattr(fine_tune_lora, "FULL_FINETUNE", True)
    edited, _ = fine_tune_lora.parse_args(["--max_train_samples", "none"])
    assert vars(from_flag) == vars(edited)
    assert from_flag.lora_r == 4 and from_flag.max_train_samples is None and from_flag.full_finetune is True

    # and the flag really changes the model that is trained: r = 4 on c_attn only
    monkeypatch.undo()
    done = run_main(capsys, *base_args(tiny_model, reviews), "--num_epochs", "1", "--max_train_samples", "16",
                      "--lora_r", "4", "--output_dir", tmp_path / "r4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_results(tmp_path / "r4")["trainable_params"] == 2 * 4 * (64 + 192) + 64 * 2


def test_an_output_dir_under_home_written_with_a_tilde_gets_everything(tiny_model, reviews, tmp_path, monkeypatch,
                                                                        capsys):
    """--output_dir=~/adapter (the shell leaves that ~ alone): the Trainer expands it, so the script does too;
    before, the checkpoints went to the home folder and the adapter to a folder named ~ here."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    done = run_main(capsys, *base_args(tiny_model, reviews), "--num_epochs", "1", "--max_train_samples", "16",
                    "--save_steps", "1", "--output_dir=~/adapter")
    assert done.returncode == 0, done.stderr[-2000:]
    saved = tmp_path / "home" / "adapter"
    assert (saved / "adapter_config.json").exists() and not (saved / "checkpoints").exists()
    assert not (tmp_path / "~").exists()
    assert f"saved to               {saved}" in done.stdout


def test_another_kind_of_model_trains_and_predicts(tiny_llama, reviews, tmp_path, capsys):
    """A Llama-style model: nn.Linear layers (no fan_in_fan_out, no warning about it), and no GPT-2-only speed-up."""
    out = tmp_path / "llama"
    done = run_script(*base_args(tiny_llama, reviews), "--target_modules", "q_proj", "v_proj", "--output_dir", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fan_in_fan_out" not in done.stdout + done.stderr
    assert read_results(out)["trainable_params"] == 2 * 8 * (64 + 64) * 2 + 64 * 2  # 2 layers x (q, v) + score
    assert read_results(out)["accuracy"] > 0.8  # it learned the task
    predicted = run_main(capsys, "--output_dir", out, "--predict", "wonderful . overall superb", "dull . overall awful")
    assert predicted.returncode == 0 and [row.split()[0] for row in predicted.stdout.splitlines()[1:]] == [
        "positive", "negative"], predicted.stdout


def test_a_tracker_gets_the_logs(tiny_model, reviews, tmp_path, capsys):
    """--report_to tensorboard: its event files, with the training loss and the evaluation, are kept with the saved
    model. (The run lasts over a second: TensorBoard names its files to the second, and the evaluation after the
    training opens a file of its own.)"""
    # Three epochs: training a second or more, so that the evaluation's event file is not named as training's
    done = run_main(capsys, *base_args(tiny_model, reviews), "--num_epochs", "3", "--report_to", "tensorboard",
                    "--output_dir", tmp_path / "out")
    assert done.returncode == 0, done.stderr[-2000:]
    events = list((tmp_path / "out" / "runs").rglob("events.out.tfevents.*"))
    logged = {value.tag: value.simple_value for event in events for value in tensorboard_values(event)}
    assert logged.get("train/loss", 0) > 0 and 0 <= logged.get("eval/accuracy", -1) <= 1, sorted(logged.items())


def tensorboard_values(path):
    """The scalars in a TensorBoard event file: records of a length (8 bytes), its checksum, an Event, its checksum."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    data, values = Path(path).read_bytes(), []
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        event = Event.FromString(data[12:12 + length])
        values += list(event.summary.value)
        data = data[12 + length + 4:]
    return values


def test_help_lists_every_constant_with_default_and_comment(capsys, monkeypatch):
    import fine_tune_lora

    monkeypatch.setenv("COLUMNS", "80")
    done = run_main(capsys, "--help")
    # The commands at the top as the file writes them, the quick run's two lines joined by a backslash a shell
    # reads; and help lines cut between words, never after a flag's "--" (--compare's "--lora_r 4").
    assert "--num_epochs 1 \\\n        --max_length 256 --learning_rate 1e-3" in done.stdout
    assert not re.search(r"--\s*$", done.stdout, re.M)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    # the settings block's constants, each a flag, and no other flag but the actions
    block = SCRIPT.read_text().split("# settings:")[1].split("# " + "-" * 77 + "\n\n")[0]
    settings = re.findall(r"^([A-Z][A-Z0-9_]*)\s*[:=]", block, re.M)
    assert len(settings) > 20 and fine_tune_lora.CONSTANTS == settings
    assert set(re.findall(r"--\w+", text.split("options:")[1])) == {f"--{name.lower()}" for name in settings} | {
        "--help", "--predict", "--adapters", "--merge", "--compare"}
    assert "rank of the update" in text and "(default: 8)" in text
    assert "(default: ['c_attn'])" in text


def test_a_max_length_beyond_the_model_is_capped_with_a_note_and_the_run_resumes(tiny_model, reviews, tmp_path,
                                                                                  capsys, monkeypatch):
    args = [*base_args(tiny_model, reviews), "--max_length", "512", "--num_epochs", "1", "--max_train_samples", "32",
            "--max_eval_samples", "16", "--save_steps", "2", "--output_dir", tmp_path / "out"]
    import fine_tune_lora

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    # Ctrl-C at the evaluation, after the last checkpoint: the same command must resume from it
    monkeypatch.setattr(fine_tune_lora.FastTrainer, "evaluate", ctrl_c)
    stopped = run_main(capsys, *args)
    assert stopped.returncode == 1 and "run the same command again to resume" in stopped.stderr, stopped.stderr
    assert "MAX_LENGTH 512 is more than this model can read; using its maximum, 256" in stopped.stdout
    monkeypatch.undo()
    done = run_main(capsys, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Resuming from" in done.stdout and "another" not in done.stdout, done.stdout
    results = read_results(tmp_path / "out")
    assert results["max_length"] == 256 and results["config"]["max_length"] == 512  # what was used; what was asked
    assert "at most 256 tokens each" in (tmp_path / "out" / "README.md").read_text()
    again = run_main(capsys, *args)  # the same command once more: the same settings, so no word of another one
    assert again.returncode == 0 and "another" not in again.stdout, again.stdout


def test_gradient_accumulation_is_the_same_training_as_a_bigger_batch(tiny_model, reviews, tmp_path, capsys):
    """BATCH_SIZE 8 x GRADIENT_ACCUMULATION_STEPS 4 updates on the same 32 reviews as BATCH_SIZE 32: the same loss,
    not one 4 times larger (what the README advises when memory runs out must not change the training)."""
    logs = []
    for name, sizes in (("accumulated", ["--batch_size", "8", "--gradient_accumulation_steps", "4"]),
                        ("one batch", ["--batch_size", "32"])):
        done = run_main(capsys, *base_args(tiny_model, reviews), *sizes, "--num_epochs", "1", "--learning_rate", "3e-4",
                        "--group_by_length", "false", "--max_train_samples", "64", "--max_eval_samples", "16",
                        "--logging_steps", "1", "--output_dir", tmp_path / name)
        assert done.returncode == 0, done.stderr[-2000:]
        history = json.loads((tmp_path / name / "log_history.json").read_text())
        logs.append([(log["step"], log["loss"], log["grad_norm"]) for log in history if "grad_norm" in log])
    # two updates of 32 reviews each, whose losses and gradients are those of one batch of 32 (dropout aside)
    assert [step for step, _, _ in logs[0]] == [step for step, _, _ in logs[1]] == [1, 2], logs
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(*logs):
        assert abs(loss_a / loss_b - 1) < 0.1 and abs(norm_a / norm_b - 1) < 0.2, logs


def test_all_linear_top_blocks_and_dora_each_do_what_they_say_and_predict_and_merge(tiny_model, reviews, tmp_path,
                                                                                    capsys):
    """The settings the Experiments study measures, on the tiny GPT-2 (2 blocks, 64 wide): --target_modules
    all-linear adapts all four of a block's layers, --lora_top_blocks 1 the last block only, --use_dora adds a
    trained magnitude per output of each adapted layer, saved with the adapter; --predict and --merge take them."""
    from safetensors import safe_open

    width, head = TINY["n_embd"], TINY["n_embd"] * 2
    outputs = {"attn.c_attn": 3 * width, "attn.c_proj": width, "mlp.c_fc": 4 * width, "mlp.c_proj": width}
    inputs = {"attn.c_attn": width, "attn.c_proj": width, "mlp.c_fc": width, "mlp.c_proj": 4 * width}
    runs = {"all-linear": (["--target_modules", "all-linear"],
                           2 * sum(8 * (inputs[k] + outputs[k]) for k in outputs) + head, {"0", "1"}),
            "top block": (["--lora_top_blocks", "1"], 8 * (width + 3 * width) + head, {"1"}),
            "dora": (["--use_dora", "true"], TINY_TRAINABLE + 2 * outputs["attn.c_attn"], {"0", "1"})}
    for name, (args, trainable, blocks) in runs.items():
        out = tmp_path / name
        done = run_main(capsys, *base_args(tiny_model, reviews), "--num_epochs", "1", "--max_train_samples", "48",
                        "--max_eval_samples", "16", "--output_dir", out, *args)
        assert done.returncode == 0, done.stderr[-2000:]
        assert read_results(out)["trainable_params"] == trainable, name
        with safe_open(out / "adapter_model.safetensors", "pt") as saved:
            keys = list(saved.keys())
        assert {key.split(".h.")[1].split(".")[0] for key in keys if "lora_A" in key} == blocks, name
        assert any("lora_magnitude_vector" in key for key in keys) == (name == "dora"), name
        if name == "all-linear":
            assert {key.split(".h.")[1].split(".", 1)[1].rsplit(".lora_A", 1)[0] for key in keys if "lora_A" in key} \
                == set(outputs)
    predicted = run_main(capsys, "--output_dir", tmp_path / "dora", "--predict", "a wonderful film . overall great")
    assert predicted.returncode == 0 and predicted.stdout.splitlines()[1].split()[0] in ("negative", "positive")
    merged = run_main(capsys, "--output_dir", tmp_path / "top block", "--merge")
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert float(merged.stdout.split("texts:")[-1].split()[0]) < 1e-4


def test_tokenized_reviews_are_cached_under_a_name_made_of_what_decides_them(tiny_model, reviews):
    """The lesson names the tokenized reviews for datasets' cache itself (hashing the tokenize function takes
    datasets seconds, and can swallow a Ctrl-C): the same reviews, tokenizer and cut find the cache; a change to
    any of them does not."""
    from transformers import AutoTokenizer

    import fine_tune_lora

    cfg, _ = fine_tune_lora.parse_args(["--model_name", str(tiny_model), "--dataset_name", str(reviews),
                                        "--max_train_samples", "64"])
    train, _ = fine_tune_lora.load_reviews(cfg)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    calls = []

    def tokenize(batch):
        calls.append(len(batch["text"]))
        return tokenizer(batch["text"], truncation=True, max_length=64)

    train.map(tokenize, batched=True, new_fingerprint=fine_tune_lora.cache_name(train, tokenizer, 61))
    assert calls in ([64], [])  # tokenized, unless a run with these settings was cached before
    calls.clear()
    train.map(tokenize, batched=True, new_fingerprint=fine_tune_lora.cache_name(train, tokenizer, 61))
    assert calls == []  # the same reviews, tokenizer and cut: read from the cache
    changed_tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    changed_tokenizer.add_tokens(["superbly"])
    cfg.max_train_samples = 63
    names = [fine_tune_lora.cache_name(train, tokenizer, 64), fine_tune_lora.cache_name(train, tokenizer, 32),
             fine_tune_lora.cache_name(fine_tune_lora.load_reviews(cfg)[0], tokenizer, 64),
             fine_tune_lora.cache_name(train, changed_tokenizer, 64)]
    assert len(set(names)) == 4
    assert fine_tune_lora.cache_name(fine_tune_lora.load_reviews(cfg)[0], tokenizer, 64) == names[2]


def test_a_long_review_keeps_the_tokens_truncation_says_and_predict_reads_as_the_run_did(tiny_model, reviews, tmp_path,
                                                                                         capsys, monkeypatch):
    """--truncation: a review longer than --max_length keeps its first tokens, its last, or its first quarter and
    its end, in training and evaluation alike (checked against the text). Each choice in turn, on the same
    reviews: each is tokenized anew, not read from the one before's cache. The folder records it; --predict then
    reads each text as the run did."""
    import torch
    from transformers import AutoTokenizer

    import fine_tune_lora

    seen = {}
    describe = fine_tune_lora.describe_run
    monkeypatch.setattr(fine_tune_lora, "describe_run", lambda cfg, setup, trainer: seen.update(
        train=trainer.train_dataset, test=trainer.eval_dataset) or describe(cfg, setup, trainer))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = "wonderful superb loved brilliant " + " ".join(["the plot and the music"] * 6) + " . overall dull awful"
    for truncation in ("start", "start+end", "end"):
        args = [*base_args(tiny_model, reviews), "--max_length", "16", "--truncation", truncation]
        out = tmp_path / truncation
        assert run_main(capsys, *args, "--output_dir", out).returncode == 0

        def kept(whole):  # what the choice keeps of a review's tokens
            first = {"start": 16, "end": 0, "start+end": 4}[truncation]  # tokens from the start, then from the end
            return whole if len(whole) <= 16 else whole[:first] + whole[len(whole) - 16 + first:]
        train, test = fine_tune_lora.load_reviews(fine_tune_lora.parse_args(args)[0])  # in the run's order
        cut = 0
        for texts, tokenized in ((train["text"], seen["train"]), (test["text"], seen["test"])):
            for review, ids in zip(texts, tokenized["input_ids"], strict=True):
                whole = tokenizer(review)["input_ids"]
                assert ids == kept(whole), (truncation, review)
                first = {"start": 16, "end": 0, "start+end": 4}[truncation]
                assert review.startswith(tokenizer.decode(ids[:first]))
                assert review.endswith(tokenizer.decode(ids[first:]))
                cut += len(whole) > 16
        assert cut > 100  # most of the reviews were longer
        results = read_results(out)
        assert results["config"]["truncation"] == truncation
        assert results["max_length"] == results["eval_max_length"] == 16
        assert AutoTokenizer.from_pretrained(out).truncation_side == ("left" if truncation == "end" else "right")
        assert f"(a longer one: its {'last' if truncation == 'end' else 'first'}" in (out / "README.md").read_text()
        # --predict reads the 16 tokens of a longer text that the run read: the probability the model gives them
        model, _ = fine_tune_lora.load_saved_model(out)
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([kept(tokenizer(text)["input_ids"])])).logits.softmax(-1)[0]
        printed = run_main(capsys, "--output_dir", out, "--predict", text)
        label, probability = printed.stdout.splitlines()[1].split()[:2]
        assert label == ["negative", "positive"][int(expected.argmax())], truncation
        assert float(probability) == pytest.approx(float(expected.max()), abs=6e-4), truncation


def test_the_evaluation_can_read_more_of_each_review_than_training_and_predict_reads_as_it_did(tiny_model, reviews,
                                                                                               tmp_path, capsys,
                                                                                               monkeypatch):
    """--eval_max_length: trained on 16 tokens of each review, evaluated on up to 48, recorded; --predict reads 48
    as the evaluation did, or what --eval_max_length says."""
    import torch
    from transformers import AutoTokenizer

    import fine_tune_lora

    seen = {}
    describe = fine_tune_lora.describe_run
    monkeypatch.setattr(fine_tune_lora, "describe_run", lambda cfg, setup, trainer: seen.update(
        train=trainer.train_dataset, test=trainer.eval_dataset) or describe(cfg, setup, trainer))
    out = tmp_path / "out"
    done = run_main(capsys, *base_args(tiny_model, reviews), "--max_length", "16", "--eval_max_length", "48",
                    "--output_dir", out)
    assert done.returncode == 0, done.stderr
    assert max(fine_tune_lora.token_counts(seen["train"])) == 16 and max(fine_tune_lora.token_counts(seen["test"])) == 48
    results = read_results(out)
    assert results["max_length"] == 16 and results["eval_max_length"] == 48
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = "wonderful superb loved brilliant " + " ".join(["the plot and the music"] * 12) + " . overall dull awful"
    model, _ = fine_tune_lora.load_saved_model(out)
    for extra, length in (([], 48), (["--eval_max_length", "24"], 24)):
        with torch.no_grad():
            # TRUNCATION's default keeps each review's end, in training, in the evaluation and in --predict
            expected = model(input_ids=torch.tensor([tokenizer(text)["input_ids"][-length:]])).logits.softmax(-1)[0]
        printed = run_main(capsys, "--output_dir", out, "--predict", text, *extra)
        assert float(printed.stdout.splitlines()[1].split()[1]) == pytest.approx(float(expected.max()), abs=6e-4)
