"""Bad input gets one clear line naming the problem and a non-zero exit, not a traceback."""
import ast
import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from conftest import base_args, run_script, write_split_files
from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

import fine_tune_lora


def run_main(capsys, *args):
    """The real entry point, in-process: (exit status, stderr lines)."""
    try:
        status = fine_tune_lora.main([str(a) for a in args])
    except SystemExit as exit_:  # argparse exits by itself
        status = exit_.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return status, err


def two_files(folder, train, test, suffix="parquet"):
    folder.mkdir(parents=True, exist_ok=True)
    for split, frame in (("train", train), ("test", test)):
        if suffix == "parquet":
            pd.DataFrame(frame).to_parquet(folder / f"{split}.parquet")
        else:
            pd.DataFrame(frame).to_csv(folder / f"{split}.csv", index=False)
    return folder


def adapter_folder(folder, base):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
    return folder


NOT_INSTALLED = next(name for name in INTEGRATION_TO_CALLBACK if name not in get_available_reporting_integrations())

CASES = {
    "missing folder": (lambda tmp: ["--dataset_name", tmp / "no-such-folder"], ["no such folder"]),
    "neither layout": (lambda tmp: ["--dataset_name", (tmp / "empty").mkdir() or tmp / "empty"],
                       ["neither the aclImdb layout", "train.* and test.*"]),
    "no text column": (lambda tmp: ["--dataset_name", two_files(tmp / "d", {"review": ["a"], "label": [0]},
                                                                {"review": ["b"], "label": [1]}, "csv")],
                       ["no 'text' column", "review"]),
    "no label column": (lambda tmp: ["--dataset_name", two_files(tmp / "d", {"text": ["a"], "stars": [0]},
                                                                 {"text": ["b"], "stars": [1]})],
                        ["no 'label' column"]),
    "labels outside 0/1": (lambda tmp: ["--dataset_name", two_files(tmp / "d", {"text": ["a", "b"], "label": [0, 3]},
                                                                    {"text": ["c"], "label": [1]})],
                           ["labels must be 0 (negative) or 1 (positive)", "3"]),
    "nothing left": (lambda tmp: ["--dataset_name", two_files(tmp / "d", {"text": ["", "  "], "label": [0, 1]},
                                                              {"text": ["c"], "label": [1]})],
                     ["no train reviews are left"]),
    "unknown target module": (lambda tmp: ["--target_modules", "c_attn", "q_proj"],
                              ["no layer called q_proj", "c_attn"]),
    "more top blocks than the model has": (lambda tmp: ["--lora_top_blocks", "3"],  # the tiny GPT-2 has 2
                                           ["--lora_top_blocks 3: this model has 2 blocks", "at most that many"]),
    "top blocks of all-linear": (lambda tmp: ["--lora_top_blocks", "1", "--target_modules", "all-linear"],
                                 ["takes named --target_modules, not all-linear", "--target_modules c_attn c_fc c_proj"]),
    "padding past the model's last position": (lambda tmp: ["--pad_to_multiple_of", "300"],  # reads 256 tokens
                                               ["--pad_to_multiple_of 300", "to 300", "use 64"]),
    "value that does not parse": (lambda tmp: ["--lora_r", "eight"], ["--lora_r", "'eight'", "whole number"]),
    "unknown flag": (lambda tmp: ["--lora_rank", "8"], ["unrecognized arguments: --lora_rank"]),
    "negative sample count": (lambda tmp: ["--max_train_samples", "-5"], ["--max_train_samples", "-5"]),
    "a seed numpy does not take": (lambda tmp: ["--seed", "-1"], ["--seed must be from 0 to 4294967295, got -1"]),
    "missing model folder": (lambda tmp: ["--model_name", tmp / "no-model"], ["--model_name", "no such folder"]),
    "an adapter for the model": (lambda tmp: ["--model_name", adapter_folder(tmp / "adapter", base="gpt2")],
                                 ["is a LoRA adapter, not a model", "--model_name gpt2", "--merge"]),
    "data files in two formats": (lambda tmp: ["--dataset_name", two_files(tmp / "d", {"text": ["a"], "label": [0]},
                                                                   {"text": ["b"], "label": [1]}, "csv") and
                                               (tmp / "d" / "test.csv").rename(tmp / "d" / "test.jsonl").parent],
                                  ["--dataset_name", "could not load it", "format", "check the files in it"]),
    "a file for the data": (lambda tmp: ["--dataset_name", (tmp / "reviews.csv").write_text("text,label\n") and
                                         tmp / "reviews.csv"], ["that is a file", "give a folder holding train.*"]),
    "a weights file for the model": (lambda tmp: ["--model_name", (tmp / "model.safetensors").write_text("x") and
                                                  tmp / "model.safetensors"], ["that is a file", "config.json"]),
    "a file name for the data": (lambda tmp: ["--dataset_name", "imdb.csv"], ["imdb.csv: no such folder", "folder"]),
    "a mistyped flag": (lambda tmp: ["--lora-r", "4"], ["--lora-r", "did you mean --lora_r?"]),
    "a --compare variant that does not parse": (lambda tmp: ["--compare", "--lora_r 4", "--lora_r four"],
                                                ["--compare variant '--lora_r four'", "whole number"]),
    "a --compare variant not quoted": (lambda tmp: ["--compare", "--lora_r", "4"],
                                       ["--compare variant '--lora_r'", 'each quoted whole: --compare "--lora_r 4"']),
    "an option after --compare": (lambda tmp: ["--compare", "--output_dir", tmp / "out"],
                                  ["--compare variant '--output_dir'", "other options go before --compare"]),
    "two --compare variants the same": (lambda tmp: ["--compare", "--lora_r 8", ""],
                                        ["'--lora_r 8' and 'base settings'", "same settings"]),
    "two --compare variants saved in one folder": (lambda tmp: ["--compare", "--target_modules c_attn c_proj",
                                                               "--target_modules c_attn/c_proj"],
                                                   ["would both save to", "target_modules-c_attn-c_proj"]),
    "LoRA and full fine-tuning saved in one folder": (lambda tmp: ["--full_output_dir", tmp / "out", "--compare"],
                                                      ["'lora' and 'full' would both save to"]),
    "an unknown tracker": (lambda tmp: ["--report_to", "tensorbored"], ["--report_to tensorbored", "tensorboard"]),
    "a tracker not installed": (lambda tmp: ["--report_to", NOT_INSTALLED], [NOT_INSTALLED, "not installed"]),
    "merging a full fine-tuning": (lambda tmp: ["--full_finetune", "--merge"], ["a --full_finetune model has none",
                                                                              "loads as a plain model"]),
    "fp16 without a GPU": (lambda tmp: ["--precision", "fp16"], ["--precision fp16 needs a CUDA GPU", "use auto"]),
    "an unknown precision": (lambda tmp: ["--precision", "fp8"], ["--precision must be one of auto, bf16, fp16, fp32",
                                                                  "'fp8'"]),
    "a dropout of 1": (lambda tmp: ["--lora_dropout", "1"], ["--lora_dropout must be at least 0 and below 1, got 1.0"]),
    "--adapters without --predict": (lambda tmp: ["--adapters", tmp / "a"], ["--adapters goes with --predict"]),
    "two actions at once": (lambda tmp: ["--predict", "Great film.", "--merge"],
                            ["choose one of --predict, --merge and --compare"]),
    "an output folder that is a file": (lambda tmp: ["--output_dir", (tmp / "notes.txt").write_text("x") and
                                                     tmp / "notes.txt"], ["notes.txt is a file; give a folder name"]),
    "adapters of two base models": (lambda tmp: ["--predict", "Great film.", "--adapters",
                                                 adapter_folder(tmp / "a", base="gpt2"),
                                                 adapter_folder(tmp / "b", base="gpt2-medium")],
                                    ["--adapters were trained on different base models (gpt2, gpt2-medium)"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_with_one_clear_line(case, tiny_model, reviews, tmp_path, capsys):
    make_args, expected = CASES[case]
    extra = [str(a) for a in make_args(tmp_path)]
    args = [*base_args(tiny_model, reviews), "--output_dir", tmp_path / "out", *extra]
    status, errors = run_main(capsys, *args)
    assert status not in (0, None) and not (tmp_path / "out" / "checkpoints").exists()  # before any training began
    assert len(errors) == 1, errors
    for fragment in expected:
        assert fragment in errors[0], errors[0]
    assert not (tmp_path / "out" / "results.json").exists() and not (tmp_path / "out-compare").exists()


@pytest.mark.parametrize("name, value, expected", [
    ("LEARNING_RATE", "3e-4", ["LEARNING_RATE = '3e-4' at the top of fine_tune_lora.py is in quotes", "a number",
                               "remove the quotes"]),
    ("FULL_FINETUNE", "False", ["FULL_FINETUNE = 'False'", "True or False"]),  # the text "False" counts as true
    ("LEARNING_RATE", "fast", ["LEARNING_RATE = 'fast'", "a number", "change that line"]),  # no quotes to remove
    ("MAX_TRAIN_SAMPLES", 64.0, ["MAX_TRAIN_SAMPLES = 64.0", "a whole number or None", "change that line"]),
    ("OUTPUT_DIR", 5, ["OUTPUT_DIR = 5", "text in quotes"]),
])
def test_a_constant_edited_to_the_wrong_type_names_the_line(name, value, expected, tiny_model, reviews, tmp_path,
                                                            capsys, monkeypatch):
    """Beginners edit the constants at the top: a quoted number fails at once, not deep in a library."""
    monkeypatch.setattr(fine_tune_lora, name, value)
    status, errors = run_main(capsys, *base_args(tiny_model, reviews), "--output_dir", tmp_path / "out")
    assert status == 1 and len(errors) == 1
    for fragment in expected:
        assert fragment in errors[0], errors[0]
    assert not (tmp_path / "out").exists()


def test_constants_edited_or_added_with_sensible_values_are_taken(capsys, monkeypatch):
    for name, value in (("LEARNING_RATE", 1), ("TARGET_MODULES", "c_attn c_proj"), ("MAX_EVAL_SAMPLES", 100)):
        monkeypatch.setattr(fine_tune_lora, name, value)
    # and a constant a reader adds, without a type, is a flag too
    monkeypatch.setattr(fine_tune_lora, "WEIGHT_DECAY", 0.0, raising=False)
    monkeypatch.setattr(fine_tune_lora, "CONSTANTS", [*fine_tune_lora.CONSTANTS, "WEIGHT_DECAY"])
    cfg, _ = fine_tune_lora.parse_args(["--weight_decay", "0.01"])
    assert (cfg.learning_rate, cfg.target_modules, cfg.max_eval_samples) == (1, ["c_attn", "c_proj"], 100)
    assert cfg.weight_decay == 0.01


def test_predict_without_an_adapter_says_so(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "unfinished" / "checkpoints" / "checkpoint-10").mkdir(parents=True)  # a run stopped early
    for folder in (tmp_path / "empty", tmp_path / "missing", tmp_path / "unfinished"):
        for action in (["--predict", "Great film."], ["--merge"]):
            status, errors = run_main(capsys, "--output_dir", folder, *action)
            assert status == 1 and len(errors) == 1
            assert str(folder) in errors[0] and "train" in errors[0]
            assert ("checkpoints of an unfinished run" in errors[0]) == (folder.name == "unfinished"), errors[0]


def test_a_whole_model_where_an_adapter_goes_is_called_what_it_is(tiny_model, capsys):
    """A fully fine-tuned or merged model given to --merge or --adapters: not "no adapter, train one first"."""
    for action, start in ((["--output_dir", tiny_model, "--merge"], "error: "),
                          (["--predict", "Great film.", "--adapters", tiny_model, tiny_model], "error: --adapters: ")):
        status, errors = run_main(capsys, *action)
        assert status == 1 and errors == [f"{start}{tiny_model} holds a whole model, not a LoRA adapter"
                                          f"{' to merge' * ('--merge' in action)}; --predict --output_dir "
                                          f"{tiny_model} classifies with it"], errors


def test_an_adapter_whose_base_model_folder_moved_says_so(tmp_path, capsys):
    """adapter_config.json records the base model's folder; if it has moved, say that, for --predict and --merge."""
    adapter = adapter_folder(tmp_path / "adapter", base=str(tmp_path / "my-gpt2"))
    for action in (["--predict", "Great film."], ["--merge"]):
        status, errors = run_main(capsys, "--output_dir", adapter, *action)
        assert status == 1 and len(errors) == 1
        assert f"model in {tmp_path / 'my-gpt2'}, which is not there any more" in errors[0], errors
        assert "base_model_name_or_path" in errors[0] and not (tmp_path / "adapter-merged").exists()


def test_a_dataset_without_a_test_split_is_named(tiny_model, reviews, tmp_path, capsys, monkeypatch):
    """A Hub dataset may split its reviews otherwise (SST-2: train, validation): say which splits it has."""
    split = fine_tune_lora.datasets.Dataset.from_dict({"text": ["Great.", "Dull."], "label": [1, 0]})
    monkeypatch.setattr(fine_tune_lora, "read_reviews",
                        lambda name: fine_tune_lora.datasets.DatasetDict(train=split, validation=split))
    status, errors = run_main(capsys, *base_args(tiny_model, reviews), "--output_dir", tmp_path / "out")
    assert status == 1 and len(errors) == 1
    assert "has no 'test' split (it has train, validation); provide both train and test" in errors[0], errors


def test_a_compare_run_that_fails_stops_the_comparison_and_is_named(tiny_model, reviews, tmp_path, capfd,
                                                                     monkeypatch):
    """The run's own error is shown, then which run stopped; nothing after it trains, no table is written."""
    monkeypatch.chdir(tmp_path)
    status = fine_tune_lora.main([*base_args(tiny_model, reviews), "--output_dir", str(tmp_path / "out"),
                                  "--compare", "--target_modules q_proj", ""])
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert status == 1 and len(errors) == 2, errors
    assert "no layer called q_proj" in errors[0]
    assert errors[1].startswith("error: the '--target_modules q_proj' run stopped; see its message above")
    assert not list(tmp_path.glob("comparison.*")) and not list((tmp_path / "out-compare").glob("*/results.json"))


def test_an_unexpected_error_keeps_its_traceback(tiny_model, reviews, tmp_path, monkeypatch):
    """Only problems the user can fix become one line: a bug keeps the traceback a report needs, frees the folder."""
    def broken(name):
        raise RuntimeError("a bug in the data loading")
    monkeypatch.setattr(fine_tune_lora, "read_reviews", broken)
    with pytest.raises(RuntimeError, match="a bug in the data loading"):
        fine_tune_lora.main([*base_args(tiny_model, reviews), "--output_dir", str(tmp_path / "out")])
    assert not list(tmp_path.glob(".out.lock"))  # the next run is not refused as "another run"


def test_a_real_process_exits_non_zero_without_a_traceback(tiny_model, tmp_path):
    done = run_script("--model_name", tiny_model, "--dataset_name", tmp_path / "nowhere", "--output_dir",
                      tmp_path / "out")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: --dataset_name")


def test_an_output_dir_that_cannot_be_written_fails_before_training(tiny_model, reviews, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    status, errors = run_main(capsys, *base_args(tiny_model, reviews), "--output_dir", blocker / "adapter")
    assert status == 1 and "not writable" in errors[0]
    assert "Training on" not in capsys.readouterr().out


def test_the_model_or_data_folder_is_refused_as_the_output_dir(tiny_model, reviews, tmp_path, capsys):
    """It looks like a saved model, so it would have been replaced by the adapter: the user's GPT-2, lost."""
    model = tmp_path / "my-gpt2"
    shutil.copytree(tiny_model, model)
    before = sorted(p.name for p in model.iterdir())
    for flag, out in (("--model_name", model), ("--model_name", tmp_path), ("--dataset_name", reviews)):
        status, errors = run_main(capsys, *base_args(model, reviews), "--output_dir", out)
        assert status == 1 and len(errors) == 1 and f"holds {flag}" in errors[0] and "would delete" in errors[0]
    assert sorted(p.name for p in model.iterdir()) == before


@pytest.mark.parametrize("beside", [None, "config.json", "checkpoints/epoch=3.ckpt"])
def test_an_output_dir_holding_other_files_is_not_replaced(tiny_model, reviews, tmp_path, capsys, beside):
    """Other files, even beside a config.json or in a checkpoints folder of another tool, are never replaced."""
    precious = tmp_path / "my-documents"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    if beside:
        (precious / beside).parent.mkdir(exist_ok=True)
        (precious / beside).write_text("{}")
    status, errors = run_main(capsys, *base_args(tiny_model, reviews), "--output_dir", precious)
    assert status == 1 and "not a saved model" in errors[0]
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_sample_files_are_accepted_in_every_format(tmp_path):
    for fmt in ("parquet", "csv", "jsonl"):
        data = fine_tune_lora.read_reviews(str(write_split_files(tmp_path / fmt, fmt, n_train=10, n_test=6)))
        assert (len(data["train"]), len(data["test"])) == (10, 6)


def test_the_folder_you_are_in_is_refused_as_the_output_dir(tiny_model, reviews, tmp_path, monkeypatch, capsys):
    """A save replaces the output folder as a whole, which the current folder (or one holding it) cannot be:
    it used to train, then fail on saving with a traceback and lose the adapter."""
    here = tmp_path / "work" / "here"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    for out in (".", "", "..", here):
        status, errors = run_main(capsys, *base_args(tiny_model, reviews), "--output_dir", out)
        assert status == 1 and len(errors) == 1 and "is the current folder or holds it" in errors[0], errors
    assert list(here.iterdir()) == [] and list((tmp_path / "work").iterdir()) == [here]


def test_libraries_too_old_are_named_before_anything_loads(tmp_path):
    """transformers 4 (still common) got as far as tokenizing every review, then failed with a traceback."""
    for name, version in (("transformers", "4.57.6"), ("peft", "0.17.1")):  # shadow the installed versions
        info = tmp_path / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    done = run_script("--help", env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 1 and "Traceback" not in done.stderr and not done.stdout
    assert done.stderr.strip() == ('error: this script needs transformers >= 5.18 (found 4.57.6), peft >= 0.21 (found '
                                   '0.17.1); run: pip install -U "transformers>=5.18" "peft>=0.21"')


def test_python_too_old_is_named_before_anything_loads():
    """macOS's own python3 is 3.9: the file must still compile there, so that its first line can say what to do."""
    source = fine_tune_lora.Path(fine_tune_lora.__file__).read_text("utf-8")
    ast.parse(source, feature_version=(3, 9))  # no syntax newer than 3.9 (match, nested f-string quotes...)
    pretend = ("import runpy, sys; sys.version_info = (3, 9, 18, 'final', 0); sys.version = '3.9.18 (main)'; "
               f"sys.argv = ['fine_tune_lora.py', '--help']; runpy.run_path({fine_tune_lora.__file__!r}, "
               "run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", pretend], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and not done.stdout
    assert done.stderr.strip() == ("error: this script needs Python 3.10 or newer, as transformers 5 does; "
                                   "this is 3.9.18")


def test_the_version_check_and_requirements_txt_agree():
    requirements = (fine_tune_lora.Path(fine_tune_lora.__file__).parent / "requirements.txt").read_text()
    for name, minimum in fine_tune_lora.check_versions.__defaults__[0].items():
        assert f"\n{name}>={minimum}" in requirements, name


def test_a_checkpoint_without_the_models_weights_is_named_before_training(tiny_model, reviews, tmp_path, capsys):
    """A folder whose weights are not this model's (renamed, or another model's): every weight would be new and
    random, and LoRA would train on noise. One line instead."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "renamed"
    shutil.copytree(tiny_model, folder)
    weights = load_file(folder / "model.safetensors")
    save_file({f"encoder.{name}": tensor for name, tensor in weights.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    status, errors = run_main(capsys, *base_args(folder, reviews), "--output_dir", tmp_path / "out")
    assert status == 1 and len(errors) == 1, errors
    assert "100% of the model's weights are missing from its checkpoint (such as transformer.wte.weight)" in errors[0]
    assert "train from random weights; give the folder or Hub id of a pretrained model" in errors[0]
    assert not (tmp_path / "out" / "checkpoints").exists()
