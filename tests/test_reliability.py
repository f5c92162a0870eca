"""Interrupted runs resume exactly, saves are atomic, torchrun works, runs repeat, NaN stops cleanly."""
import builtins
import io
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SCRIPT, base_args, checkpoint_reached, error_lines, read_results, run_main, wait_until

import fine_tune_lora

# Long enough to be interrupted: 6 epochs x 30 steps, a checkpoint every 10 steps.
LONG = ["--num_epochs", "6", "--save_steps", "10"]


def start(args, log):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=log, stderr=subprocess.STDOUT,
                            env=env)


def interrupt_after(args, checkpoints, step, sig, log_path):
    """Run the script until a checkpoint of `step` or later is complete on disk, then send it `sig`."""
    with open(log_path, "w") as log:
        process = start(args, log)
        wait_until(lambda: checkpoint_reached(checkpoints, step), process, f"a checkpoint of step {step}")
        process.send_signal(sig)
        process.wait(timeout=120)
    return process.returncode, open(log_path).read()


def run_patched(code, args):
    """The real entry point in a real process, with `code` (which ends by calling main) patching it first."""
    from conftest import ROOT

    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def test_an_interrupted_run_resumes_to_the_same_result(tiny_model, reviews, tmp_path, capsys):
    args = [*base_args(tiny_model, reviews), *LONG]
    reference = run_main(capsys, *args, "--output_dir", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "interrupted"
    checkpoints = out / "checkpoints"
    # Ctrl-C as the first epoch ends (30 steps), just after its checkpoint: a clean sentence, no traceback
    code, log = interrupt_after([*args, "--output_dir", out], checkpoints, 30, signal.SIGINT, tmp_path / "first.log")
    assert code == 1 and "Traceback" not in log
    assert "run the same command again to resume" in log
    # killed outright, later in the run
    with open(tmp_path / "second.log", "w") as log_file:
        process = start([*args, "--output_dir", out], log_file)
        wait_until(lambda: checkpoint_reached(checkpoints, 70), process, "a checkpoint of step 70")
        process.kill()
        process.wait()
    assert "Resuming from" in (tmp_path / "second.log").read_text()
    assert not (out / "results.json").exists()
    # a kill while the Trainer wrote a checkpoint's last file, trainer_state.json, leaves it cut short: passed over
    last = max(fine_tune_lora.checkpoint_step(c) for c in checkpoints.glob("checkpoint-*")
               if (c / "trainer_state.json").exists())
    shutil.copytree(checkpoints / f"checkpoint-{last}", checkpoints / f"checkpoint-{last + 10}", dirs_exist_ok=True)
    state = checkpoints / f"checkpoint-{last + 10}" / "trainer_state.json"
    state.write_text(state.read_text()[:100])

    resumed = run_main(capsys, *args, "--output_dir", out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from" in resumed.stdout and f"(step {last})" in resumed.stdout
    a, b = read_results(tmp_path / "reference"), read_results(out)
    assert a["accuracy"] == b["accuracy"]
    assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-4 and abs(a["train_loss"] - b["train_loss"]) < 1e-4
    assert_same_adapter(tmp_path / "reference", out, tolerance=1e-5)
    # and the curves have every epoch's evaluation: the checkpoint at an epoch's end is saved after it
    evaluated = [[log["step"] for log in json.loads((folder / "log_history.json").read_text()) if "eval_loss" in log]
                 for folder in (tmp_path / "reference", out)]
    assert evaluated[0] == evaluated[1] == [30, 60, 90, 120, 150, 180], evaluated


def test_resuming_with_other_settings_is_refused(tiny_model, reviews, tmp_path, capsys):
    args = [*base_args(tiny_model, reviews), *LONG, "--output_dir", tmp_path / "out"]
    interrupt_after(args, tmp_path / "out" / "checkpoints", 10, signal.SIGKILL, tmp_path / "log")
    changed = run_main(capsys, *args, "--lora_r", "4")
    assert changed.returncode == 1
    assert "--lora_r was 8" in changed.stderr and "--resume false" in changed.stderr
    fresh = run_main(capsys, *args, "--lora_r", "4", "--resume", "false", "--num_epochs", "1")
    assert fresh.returncode == 0 and "Resuming" not in fresh.stdout


def test_a_second_run_into_the_folder_a_run_is_training_into_is_refused(tiny_model, reviews, tmp_path, capsys):
    """Started again in another terminal, the second run would delete the first's checkpoints (or resume from
    them while it goes on), and whichever finished last would replace the other's model."""
    out = tmp_path / "out"
    args = [*base_args(tiny_model, reviews), "--output_dir", out, "--resume", "false"]
    with open(tmp_path / "log", "w") as log:
        first = start([*args, "--num_epochs", "100", "--save_steps", "5"], log)
        wait_until(lambda: checkpoint_reached(out / "checkpoints", 1), first, "a first checkpoint")
        second = run_main(capsys, *args, "--num_epochs", "1")
        assert second.returncode == 1 and error_lines(second.stderr) == [
            f"error: another run is training into {out}; wait for it to end, or give this one an --output_dir of "
            f"its own"]
        assert list(out.glob("checkpoints/checkpoint-*")) and not (out / "adapter_model.safetensors").exists()
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 1
    after = run_main(capsys, *args, "--num_epochs", "1")  # the first run has ended: the folder is free again
    assert after.returncode == 0 and (out / "adapter_model.safetensors").exists(), after.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["log", "out"]  # and the lock's file is gone


def adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_adapter(a, b, tolerance=0.0):
    x, y = adapter_tensors(a), adapter_tensors(b)
    assert x.keys() == y.keys()
    worst = max(float((x[k] - y[k]).abs().max()) for k in x)
    assert worst <= tolerance, worst


def test_same_seed_same_result_and_another_seed_differs(trained, tiny_model, reviews, tmp_path, capsys):
    first, _ = trained  # trained in another process
    again = run_main(capsys, *base_args(tiny_model, reviews), "--output_dir", tmp_path / "again")
    other = run_main(capsys, *base_args(tiny_model, reviews), "--output_dir", tmp_path / "other", "--seed", "1")
    assert again.returncode == 0 and other.returncode == 0
    a, b = read_results(first), read_results(tmp_path / "again")
    for key in ("accuracy", "f1", "precision", "recall", "confusion_matrix", "eval_loss", "train_loss"):
        assert a[key] == b[key], key
    assert_same_adapter(first, tmp_path / "again")
    with pytest.raises(AssertionError):
        assert_same_adapter(first, tmp_path / "other", tolerance=1e-3)


def test_a_run_that_will_replace_a_model_trained_otherwise_says_so_first(trained, tiny_model, reviews, tmp_path,
                                                                        capsys):
    out = tmp_path / "out"
    shutil.copytree(trained[0], out)  # trained with 2 epochs
    args = [*base_args(tiny_model, reviews), "--num_epochs", "1", "--output_dir", out]
    done = run_main(capsys, *args)
    assert done.returncode == 0 and read_results(out)["config"]["num_epochs"] == 1, done.stderr[-2000:]
    assert done.stdout.startswith(f"{out} holds a model trained with another --num_epochs; this run replaces it")
    again = run_main(capsys, *args)  # the same settings: nothing is lost, nothing to say
    assert again.returncode == 0 and "holds a model" not in again.stdout


def test_an_output_folder_linked_to_another_disk_is_saved_there_and_stays_a_link(tiny_model, reviews, tmp_path, capsys):
    """On a cluster the output folder is often a link to a bigger disk: the model goes there, the link stays."""
    disk, link = tmp_path / "scratch" / "lora", tmp_path / "home" / "gpt2-imdb-lora"
    disk.mkdir(parents=True)
    link.parent.mkdir()
    link.symlink_to(disk)
    done = run_main(capsys, *base_args(tiny_model, reviews), "--num_epochs", "1", "--save_steps", "5",
                    "--output_dir", link)
    assert done.returncode == 0, done.stderr[-2000:]
    assert link.is_symlink() and (disk / "adapter_model.safetensors").exists()
    # nothing left beside either: no copy of the link, no old folder; and the checkpoints are gone with it
    assert os.listdir(link.parent) == [link.name] and os.listdir(disk.parent) == [disk.name]
    assert not (disk / "checkpoints").exists()


def test_a_crash_while_saving_keeps_the_previous_adapter(trained, tmp_path):
    import fine_tune_lora

    adapter, _ = trained
    out = tmp_path / "adapter"
    shutil.copytree(adapter, out)
    before = adapter_tensors(out)
    model, tokenizer = fine_tune_lora.load_saved_model(out)

    def crash_half_way(folder):
        model.save_pretrained(folder)  # the new weights are on disk...
        (folder / "results.json").write_text("{")
        raise OSError("No space left on device")  # ...and then the disk is full

    with pytest.raises(OSError):
        fine_tune_lora.save_atomically(out, crash_half_way)
    assert set(os.listdir(tmp_path)) == {"adapter"}, "no half-written folder is left behind"
    assert read_results(out)["accuracy"] >= 0.9
    after = adapter_tensors(out)
    assert all((before[k] == after[k]).all() for k in before)
    fine_tune_lora.load_saved_model(out)  # still loads

    # A crash between the two renames leaves the old folder under a hidden name: it is put back.
    os.rename(out, tmp_path / f".{out.name}.old-12345")
    fine_tune_lora.finish_an_interrupted_save(out)
    assert (out / "adapter_model.safetensors").exists()
    # A stop after the new folder took its place, while the old one was being deleted: what is left of it goes.
    shutil.copytree(out, tmp_path / f".{out.name}.old-12345")
    fine_tune_lora.finish_an_interrupted_save(out)
    assert set(os.listdir(tmp_path)) == {"adapter"} and (out / "adapter_model.safetensors").exists()


def test_a_folder_windows_will_not_rename_keeps_the_new_adapter_and_says_where(trained, tiny_model, reviews, tmp_path,
                                                                               capsys, monkeypatch):
    """Windows renames no folder while a terminal is in it, or a program has a file in it open: the save waits
    a moment for it, then says where the new adapter is, and the old one stays as it was."""
    import fine_tune_lora

    adapter, _ = trained
    out = tmp_path / "adapter"
    shutil.copytree(adapter, out)  # saved by an earlier run
    before, rename, refused = adapter_tensors(out), os.rename, []

    def rename_on_windows(source, target, refusals=100):
        if Path(source) == out and len(refused) < refusals:
            refused.append(source)
            raise PermissionError(13, "The process cannot access the file because it is being used by another "
                                      "process")
        return rename(source, target)

    monkeypatch.setattr(os, "rename", rename_on_windows)
    done = run_main(capsys, *base_args(tiny_model, reviews), "--seed", "7", "--output_dir", out)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    message = done.stderr.strip().splitlines()[-1]
    new = Path(re.search(r"The new one is saved in (.+): close it", message)[1])
    assert message == (f"error: could not replace {out} (The process cannot access the file because it is being used "
                       f"by another process); is a program or a terminal using it? The new one is saved in {new}: "
                       f"close it, then replace {out} with that folder")
    assert all((before[k] == adapter_tensors(out)[k]).all() for k in before), "the old adapter is as it was"
    assert read_results(new)["config"]["seed"] == 7 and (new / "README.md").exists()
    monkeypatch.undo()
    shutil.rmtree(out)
    os.rename(new, out)  # what the message says to do
    predicted = run_main(capsys, "--output_dir", out, "--predict", "a superb film . overall wonderful")
    assert predicted.returncode == 0 and predicted.stdout.splitlines()[1].startswith("positive")

    # A scanner that holds a file for a moment only delays the save.
    refused.clear()
    monkeypatch.setattr(os, "rename", lambda source, target: rename_on_windows(source, target, refusals=3))
    fine_tune_lora.save_atomically(out, lambda folder: (folder / "new").write_text("saved"))
    assert len(refused) == 3 and os.listdir(out) == ["new"] and set(os.listdir(tmp_path)) == {"adapter"}


def test_torchrun_trains_on_two_processes(tiny_model, reviews, tmp_path, capsys, monkeypatch):
    """The README's torchrun command; and --compare, --merge and --predict started with torchrun out of habit:
    done once, said once. (--compare here trains one run: it starts it with a torchrun of its own.)"""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(SCRIPT), *base_args(tiny_model, reviews),
                           "--num_epochs", "4", "--output_dir", str(tmp_path / "ddp"),  # 2 x 8 a step: twice the epochs
                           "--compare", ""], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "ddp-compare" / "base-settings"
    results = read_results(out)
    assert results["processes"] == 2
    assert sum(map(sum, results["confusion_matrix"])) == 120  # metrics over the whole eval set
    assert results["accuracy"] >= 0.9
    said = [done.stdout.count(s) for s in ("base settings: torchrun --nproc_per_node 2", "Found 240 train", "\naccuracy",
                                           "| accuracy")]
    assert said == [1, 1, 1, 1], done.stdout  # one process speaks
    assert json.loads((tmp_path / "comparison.json").read_text())["base settings"]["accuracy"] == results["accuracy"]
    monkeypatch.setenv("RANK", "1")  # as in the second process: it leaves the work to the first
    for action in (["--merge"], ["--predict", "a superb film"]):
        left = run_main(capsys, "--output_dir", out, *action)
        assert (left.returncode, left.stdout, left.stderr) == (0, "", "")
    assert not Path(f"{out}-merged").exists()
    monkeypatch.setenv("RANK", "0")
    predicted = run_main(capsys, "--output_dir", out, "--predict", "a superb film . overall wonderful")
    assert predicted.returncode == 0 and predicted.stdout.splitlines()[1].startswith("positive")


# The real entry point with the Trainer seeing two GPUs, as on a machine with two (a Kaggle T4 x2) run without torchrun.
TWO_GPUS_IN_ONE_PROCESS = """
import sys
import fine_tune_lora as ft

post_init = ft.TrainingArguments.__post_init__
def two_gpus(self):
    post_init(self)
    self._setup_devices  # (computed once) then the count a machine with two GPUs gives
    self._n_gpu = 2
ft.TrainingArguments.__post_init__ = two_gpus
sys.exit(ft.main(sys.argv[1:]))
"""


def test_several_gpus_without_torchrun_train_on_one_and_say_how_to_use_all(tiny_model, reviews, tmp_path):
    """The Trainer would split each batch between them (DataParallel) without mixed precision, where the
    16-bit frozen weights fail at the first step."""
    out = tmp_path / "out"
    done = run_patched(TWO_GPUS_IN_ONE_PROCESS, [*base_args(tiny_model, reviews), "--precision", "bf16",
                                                 "--output_dir", out])
    assert done.returncode == 0, done.stderr[-2000:]
    assert ", 1 of 2 GPUs (torchrun --nproc_per_node 2 fine_tune_lora.py trains on all)" in done.stdout
    assert "2 epochs x 30 steps of 8 reviews = 60 steps" in done.stdout
    results = read_results(out)
    assert results["training_precision"] == "bf16" and results["accuracy"] >= 0.9
    assert json.loads((out / "log_history.json").read_text())[-1]["step"] == 60


def test_a_nan_loss_stops_training_with_a_clear_message(tiny_model, reviews, tmp_path, capsys):
    out = tmp_path / "nan"
    done = run_main(capsys, *base_args(tiny_model, reviews), "--full_finetune", "--full_learning_rate", "1e8",
                    "--full_output_dir", out, "--save_steps", "5")
    assert done.returncode == 1
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("error: The training loss became NaN or infinite by step ")
    assert "Lower the learning rate" in message and "bf16" in message
    assert not (out / "model.safetensors").exists()
    assert not list(out.glob("checkpoints/checkpoint-*")), "no checkpoint of the broken model is written"


def test_predict_survives_any_text_on_any_console(trained, capsys, monkeypatch):
    out, _ = trained
    texts = ["", "   ", "x" * 100_000, "😀 émotion 日本語 ünïcödé film . overall superb", "\x00\x07 control\tchars\n\r",
             "overall awful"]
    # Output that cannot encode every character: Windows' cp1252, in a file (python ... > out.txt)
    console = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", console)
    done = run_main(capsys, "--output_dir", out, "--predict", *[t.replace("\x00", "") for t in texts])
    assert done.returncode == 0, done.stderr[-2000:]
    console.flush()
    done.stdout = console.buffer.getvalue().decode("cp1252")
    assert "? émotion ??? ünïcödé film" in done.stdout  # what cp1252 has is kept
    rows = done.stdout.splitlines()[1:]
    assert rows[0].startswith("skipped") and rows[1].startswith("skipped")
    assert all(r.split()[0] in ("positive", "negative") for r in rows[2:6])
    assert "Skipped 2 empty or whitespace-only text(s)." in done.stdout


# Runs the real entry point in a real process, paused at one phase until the test presses Ctrl-C.
PAUSED_AT = """
import sys, time
import fine_tune_lora as ft

def pause(phase):
    print("PAUSED", phase)  # (not flushed: the script prints a line at a time even into a pipe)
    time.sleep(120)  # until the test sends Ctrl-C

phase = sys.argv[1]
if phase == "loading":
    load = ft.AutoModelForSequenceClassification.from_pretrained
    ft.AutoModelForSequenceClassification.from_pretrained = lambda *a, **k: pause(phase) or load(*a, **k)
elif phase == "estimate":
    estimate = ft.estimate_cpu_time
    ft.estimate_cpu_time = lambda *a: pause(phase) or estimate(*a)
elif phase == "training":
    step = ft.FastTrainer.training_step
    ft.FastTrainer.training_step = lambda self, *a, **k: (self.state.global_step == 3 and pause(phase)) or step(
        self, *a, **k)
elif phase == "evaluation":
    predict = ft.FastTrainer.prediction_step
    ft.FastTrainer.prediction_step = lambda self, *a, **k: pause(phase) or predict(self, *a, **k)
elif phase == "saved":
    summary = ft.print_summary
    ft.print_summary = lambda *a: pause(phase) or summary(*a)
elif phase == "hashing":  # datasets hashes a transform (the filter in load_reviews) inside a bare `except:`
    import datasets.fingerprint
    update, paused = datasets.fingerprint.Hasher.update, []
    datasets.fingerprint.Hasher.update = lambda self, value: (
        callable(value) and not paused and (paused.append(value) or pause(phase))) or update(self, value)
sys.exit(ft.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("phase, says, extra", [
    ("loading", "Stopped before this run saved a checkpoint: the same command starts over.", []),
    ("estimate", "Stopped before this run saved a checkpoint: the same command starts over.", []),
    ("training", "Stopped; the last checkpoint is ", []),
    ("evaluation", "Stopped; the last checkpoint is ", []),  # after training, which saves a last checkpoint
    ("training", "Stopped; with --resume false the same command starts over.", ["--resume", "false"]),
    ("saved", "holds the model trained with these settings; the same command would train it again.", []),
    # the KeyboardInterrupt is swallowed there, and the run stops at the end of that phase all the same
    ("hashing", "Stopped before this run saved a checkpoint: the same command starts over.", []),
])
def test_ctrl_c_at_any_moment_ends_with_one_line_and_a_true_promise(phase, says, extra, tiny_model, reviews,
                                                                   tmp_path, capsys):
    from conftest import ROOT

    out = tmp_path / "out"
    args = [*base_args(tiny_model, reviews), "--num_epochs", "1", "--save_steps", "2", "--output_dir", out, *extra]
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", PAUSED_AT, phase, *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    for line in process.stdout:
        if line.startswith("PAUSED"):
            break
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "Traceback" not in stdout + stderr
    lines = stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], stderr[-2000:]
    assert lines[-1].startswith("error: " + says) or phase == "saved" and lines[-1].endswith(says), lines[-1]
    assert (out / "results.json").exists() == (phase == "saved")
    if phase == "saved":  # (that the same command then trains again: test_a_run_that_will_replace_a_model...)
        return
    rerun = run_main(capsys, *args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    # the promise holds: a rerun resumes exactly when the message said it would
    assert ("Resuming from" in rerun.stdout) == ("checkpoint is" in says)


# A Ctrl-C that lands while Python runs a finalizer (__del__): Python prints the KeyboardInterrupt and
# ignores it. It happened in the wild inside the regex library's __del__, and the run went on for hours.
CTRL_C_IN_A_FINALIZER = """
import signal, sys
import fine_tune_lora as ft

class Garbage:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)  # the handler runs at once, in here

step = ft.FastTrainer.training_step
def step_and_collect(self, *args, **kwargs):
    if self.state.global_step == 3:
        Garbage()  # collected at once
    return step(self, *args, **kwargs)
ft.FastTrainer.training_step = step_and_collect
sys.exit(ft.main(sys.argv[1:]))
"""
# A busy machine, where every new thread starts its work two seconds late: a Ctrl-C that the script would send
# again from a thread would land after the run, while Python exits.
THREADS_LATE = """
import threading, time
start = threading.Thread.start
def start_late(self):
    run = self.run
    self.run = lambda: (time.sleep(2), run())
    start(self)
threading.Thread.start = start_late
"""


@pytest.mark.parametrize("threads", ["on time", "late"])
def test_ctrl_c_that_lands_in_a_finalizer_still_stops_the_run(tiny_model, reviews, tmp_path, threads):
    out = tmp_path / "out"
    args = [*base_args(tiny_model, reviews), "--num_epochs", "1", "--save_steps", "2", "--output_dir", out]
    done = run_patched((THREADS_LATE if threads == "late" else "") + CTRL_C_IN_A_FINALIZER, args)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "ignored" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: Stopped; the last checkpoint is ")
    assert not (out / "results.json").exists()


# `python fine_tune_lora.py` as a user runs it, and a Ctrl-C that lands after the run, while Python exits.
CTRL_C_WHILE_EXITING = """
import atexit, runpy, signal, sys
atexit.register(signal.raise_signal, signal.SIGINT)  # registered first, so it runs last
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_after_the_run_while_python_exits_says_nothing_false(tiny_model, reviews, tmp_path):
    out = tmp_path / "out"
    done = run_patched(CTRL_C_WHILE_EXITING, [SCRIPT, *base_args(tiny_model, reviews), "--num_epochs", "1",
                                              "--output_dir", out])
    assert "saved to" in done.stdout and read_results(out)["train_samples"] == 240, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "error:" not in done.stderr, done.stderr[-2000:]


def test_run_from_ipython_ctrl_c_still_works_after_the_script(monkeypatch, capsys):
    """IPython's %run runs the script in its own process, which goes on after it: Ctrl-C must still interrupt
    what runs next, not end the session."""
    monkeypatch.setattr(builtins, "__IPYTHON__", True, raising=False)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--lora_r", "eight"])
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(SCRIPT), run_name="__main__")
        assert exit_.value.code == 1 and "--lora_r" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, handler)


def test_a_stop_that_cut_the_run_settings_short_does_not_break_the_rerun(tiny_model, reviews, tmp_path, capsys):
    """Ctrl-C just after the CPU estimate can land while run_settings.json is written, leaving it empty."""
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "run_settings.json").write_text("")
    done = run_main(capsys, *base_args(tiny_model, reviews), "--num_epochs", "1", "--output_dir", out)
    assert done.returncode == 0 and read_results(out)["train_samples"] == 240, done.stderr[-2000:]


# The real entry point in a real process, on a disk that fills up when the checkpoint of step 4 is written.
# (The tokenizers library reports it as a plain Exception with the system's words; torch as an OSError.)
DISK_FULL_AT_STEP_4 = """
import sys
import fine_tune_lora as ft

save = ft.FastTrainer._save_checkpoint
def save_until_full(self, *args, **kwargs):
    if self.state.global_step >= 4:
        raise Exception("No space left on device (os error 28)")
    return save(self, *args, **kwargs)
ft.FastTrainer._save_checkpoint = save_until_full
sys.exit(ft.main(sys.argv[1:]))
"""


def test_a_full_disk_ends_with_one_line_naming_it_and_the_checkpoint_to_resume_from(tiny_model, reviews, tmp_path,
                                                                                    capsys):
    out = tmp_path / "out"
    args = [*base_args(tiny_model, reviews), "--num_epochs", "1", "--save_steps", "2", "--output_dir", out]
    done = run_patched(DISK_FULL_AT_STEP_4, args)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: the disk is full; free some space, or give --output_dir a folder on another disk. Stopped; the "
        f"last checkpoint is {out / 'checkpoints' / 'checkpoint-2'}: run the same command again to resume from it")
    rerun = run_main(capsys, *args)
    assert rerun.returncode == 0 and "Resuming from" in rerun.stdout and "(step 2)" in rerun.stdout

@pytest.mark.parametrize("where, error", [
    ("training_step", lambda torch: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),  # GPU
    ("prediction_step", lambda torch: RuntimeError(  # a CPU, where the system refuses the memory instead of a kill
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 2147483648 bytes. Error code 12 (Cannot allocate memory)")),
    ("training_step", lambda torch: RuntimeError(  # a Mac's GPU: torch raises a plain RuntimeError there
        "MPS backend out of memory (MPS allocated: 8.00 GB, other allocations: 1.20 GB, max allowed: 9.07 GB). "
        "Tried to allocate 512.00 MB on private pool.")),
])
def test_running_out_of_memory_ends_with_one_line_saying_what_to_change(where, error, tiny_model, reviews, tmp_path,
                                                                        capsys, monkeypatch):
    import torch

    import fine_tune_lora

    def out_of_memory(*args, **kwargs):
        raise error(torch)
    monkeypatch.setattr(fine_tune_lora.FastTrainer, where, out_of_memory)
    done = run_main(capsys, *base_args(tiny_model, reviews), "--num_epochs", "1", "--output_dir", tmp_path / "out")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert done.stderr.startswith("error: out of memory; halve --batch_size and double --gradient_accumulation_steps")
    assert "--eval_batch_size" in done.stderr and "Stopped" in done.stderr


def test_default_settings_checkpoint_a_short_run_and_a_resume_keeps_the_whole_runs_figures(tiny_model, reviews,
                                                                                          tmp_path, capsys):
    """About 250 LoRA steps with the default checkpoint settings: a checkpoint exists before the run
    ends, and a run interrupted there and resumed reports the uninterrupted run's train_loss."""
    args = ["--model_name", tiny_model, "--dataset_name", reviews, "--max_length", "64", "--learning_rate", "1e-2",
            "--num_epochs", "8"]  # 8 epochs x 30 steps
    reference = run_main(capsys, *args, "--output_dir", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "out"
    with open(tmp_path / "log", "w") as log:
        process = start([*args, "--output_dir", out], log)
        wait_until(lambda: checkpoint_reached(out / "checkpoints", 1), process, "a checkpoint")
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    assert "the last checkpoint is" in (tmp_path / "log").read_text()
    resumed = run_main(capsys, *args, "--output_dir", out)
    assert resumed.returncode == 0 and "Resuming from" in resumed.stdout, resumed.stderr[-2000:]
    whole, again = read_results(tmp_path / "reference"), read_results(out)
    assert again["resumed_from_step"] >= 100
    assert abs(whole["train_loss"] - again["train_loss"]) < 1e-4
    assert again["train_seconds"] is None and whole["train_seconds"] > 0  # only the uninterrupted run can say


def test_without_the_hub_the_error_comes_in_seconds_and_names_the_fix(tmp_path):
    # online as far as the libraries know, whatever the user has set (TRANSFORMERS_OFFLINE=1 counts as HF_HUB_OFFLINE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE")) or k == "HF_HOME"}
    env = {k: v for k, v in env.items() if not k.lower().endswith("_proxy")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", PYTHONUNBUFFERED="1")  # a closed port: no network
    # and behind a proxy that cannot be reached: the check goes through it, as the libraries would
    behind_a_proxy = {**env, "HF_ENDPOINT": "https://hub.example", "HTTPS_PROXY": "http://127.0.0.1:9"}
    for environment in (env, behind_a_proxy):
        started = time.time()
        done = subprocess.run([sys.executable, str(SCRIPT), "--output_dir", tmp_path / "out"], cwd=tmp_path,
                              capture_output=True, text=True, env=environment, timeout=120)
        # not the libraries' own retries (53 s), even on a busy machine (starting Python and torch: 7 s to 20 s)
        assert time.time() - started < 45
        assert done.returncode == 1 and "Traceback" not in done.stderr
        message = error_lines(done.stderr)
        assert len(message) == 1 and "HF_HUB_OFFLINE=1" in message[0] and "Running offline" in message[0], message
    # a name that looks like a file is never sent to the Hub: the sentence is about folders
    (tmp_path / "reviews.csv").write_text("text,label\n")
    done = subprocess.run([sys.executable, str(SCRIPT), "--dataset_name", "reviews.csv"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and len(error_lines(done.stderr)) == 1 and "Traceback" not in done.stderr
    assert "--dataset_name reviews.csv: that is a file" in done.stderr and "a folder holding train.*" in done.stderr


def test_a_kill_while_training_ends_as_ctrl_c_does(tiny_model, reviews, tmp_path, capsys):
    """`kill` (SIGTERM), as a job scheduler or a closed session sends it: the same one line, and the rerun resumes."""
    from conftest import ROOT

    out = tmp_path / "out"
    args = [*base_args(tiny_model, reviews), "--num_epochs", "1", "--save_steps", "2", "--output_dir", out]
    process = subprocess.Popen([sys.executable, "-c", PAUSED_AT, "training", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wait_until(lambda: process.stdout.readline().startswith("PAUSED"), process, "step 3")
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 1 and "Traceback" not in stderr
    assert error_lines(stderr) == [f"error: Stopped; the last checkpoint is {out / 'checkpoints' / 'checkpoint-2'}: "
                                   f"run the same command again to resume from it"], stderr[-2000:]
    rerun = run_main(capsys, *args)
    assert rerun.returncode == 0 and "Resuming from" in rerun.stdout, rerun.stderr[-2000:]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="sees what a process loads in /proc (Linux)")
def test_ctrl_c_while_the_libraries_load_is_one_line(tiny_model, reviews, tmp_path):
    """The first seconds of every run go to loading torch and the rest: Ctrl-C there is one line too."""
    from conftest import loading_libraries

    process = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, base_args(tiny_model, reviews)),
                                "--output_dir", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    wait_until(lambda: loading_libraries(process.pid), process, "the libraries loading", seconds=60)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert error_lines(stderr) == ["error: Stopped while loading the libraries; nothing was done."]
    assert not (tmp_path / "out").exists()


def test_a_training_run_piped_into_head_ends_with_one_line(tiny_model, reviews, tmp_path):
    """`python fine_tune_lora.py | head`: once head has its lines, the run stops as Ctrl-C stops it."""
    process = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, base_args(tiny_model, reviews)), "--num_epochs",
                                "20", "--logging_steps", "1", "--save_steps", "5", "--output_dir", str(tmp_path / "out")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: process.stdout.readline().startswith("{'loss'"), process, "a logged loss")
    process.stdout.close()  # as head does once it has its lines
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 1 and "Traceback" not in stderr, stderr[-2000:]
    (line,) = error_lines(stderr)
    assert line.startswith("error: Stopped") and "the same command" in line, stderr[-2000:]


def test_checkpoints_come_on_time_too_and_only_the_last_few_are_kept(tiny_model, reviews, tmp_path, capsys,
                                                                     monkeypatch):
    """SAVE_MINUTES: a checkpoint whenever that long passes without one, whatever SAVE_STEPS says (here the minutes
    are shortened to milliseconds, the test's only change); SAVE_TOTAL_LIMIT: the older checkpoints are deleted."""
    saves = []
    watch = fine_tune_lora.TrainingWatch

    class Observed(watch):
        def __init__(self, trainer, save_seconds):
            super().__init__(trainer, save_seconds=save_seconds / 60_000)  # minutes to milliseconds

        def on_save(self, args, state, control, **kwargs):
            super().on_save(args, state, control, **kwargs)
            saves.append((state.global_step, len(list(Path(args.output_dir).glob("checkpoint-*")))))
    monkeypatch.setattr(fine_tune_lora, "TrainingWatch", Observed)
    args = [*base_args(tiny_model, reviews), "--num_epochs", "1", "--save_steps", "0", "--save_total_limit", "3"]
    done = run_main(capsys, *args, "--save_minutes", "1", "--output_dir", tmp_path / "on time")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(saves) > 10 and saves[-1][0] == 30, saves  # 30 steps: far more checkpoints than the epoch's one
    assert max(kept for _, kept in saves) == 3 and [kept for _, kept in saves[:3]] == [1, 2, 3], saves
    saves.clear()
    done = run_main(capsys, *args, "--save_minutes", "0", "--output_dir", tmp_path / "by epoch")
    assert done.returncode == 0 and [step for step, _ in saves] == [30], saves  # 0: none on time


def test_evaluation_takes_eval_batch_size_reviews_at_a_time(tiny_model, reviews, tmp_path, capsys, monkeypatch):
    batches = []
    step = fine_tune_lora.FastTrainer.prediction_step
    monkeypatch.setattr(fine_tune_lora.FastTrainer, "prediction_step", lambda self, model, inputs, *a, **k: (
        batches.append(len(inputs["labels"])) or step(self, model, inputs, *a, **k)))
    for size, expected in (("5", [5, 5, 5, 1]), ("none", [8, 8])):  # none: BATCH_SIZE on a CPU
        batches.clear()
        done = run_main(capsys, *base_args(tiny_model, reviews), "--num_epochs", "1", "--max_train_samples", "16",
                        "--max_eval_samples", "16", "--eval_batch_size", size, "--output_dir", tmp_path / size)
        assert done.returncode == 0, done.stderr[-2000:]
        assert sorted(batches, reverse=True) == expected, batches


def test_an_interrupted_full_fine_tuning_resumes_to_the_same_result(tiny_model, reviews, tmp_path, capsys):
    """--full_finetune checkpoints the whole model and AdamW's state for all its weights, ten times less often."""
    args = [*base_args(tiny_model, reviews), "--full_finetune", "--full_learning_rate", "1e-3", "--num_epochs", "2",
            "--save_steps", "2"]  # a checkpoint every 20 steps
    reference = run_main(capsys, *args, "--full_output_dir", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "interrupted"
    code, log = interrupt_after([*args, "--full_output_dir", out], out / "checkpoints", 20, signal.SIGINT,
                                tmp_path / "log")
    assert code == 1 and "run the same command again to resume" in log, log[-2000:]
    resumed = run_main(capsys, *args, "--full_output_dir", out)
    assert resumed.returncode == 0 and "Resuming from" in resumed.stdout, resumed.stderr[-2000:]
    a, b = read_results(tmp_path / "reference"), read_results(out)
    assert a["accuracy"] == b["accuracy"] and abs(a["train_loss"] - b["train_loss"]) < 1e-4
    assert b["method"] == "full" and (out / "model.safetensors").exists()
