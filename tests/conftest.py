"""Tiny stand-ins the tests build for themselves: a byte-level BPE tokenizer, a 2-layer GPT-2 with
random weights, and synthetic reviews whose sentiment can be learned in a few dozen steps."""
import atexit
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "fine_tune_lora.py"
sys.path.insert(0, str(ROOT))

# Nothing in the tests may reach the Hub: everything they load is a local folder (whatever the user has set).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# The tests are for a CPU: on a machine with a CUDA GPU they hide it, from this process and the scripts it starts.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# datasets keeps a copy of every data folder it reads, and of its tokenized reviews, in its cache (by default
# in your home folder): the tests' copies go to a temporary folder, deleted when they end.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="fine-tune-lora-tests-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: one core each, not two threads fighting over each core
    os.environ.setdefault("OMP_NUM_THREADS", "1")

@pytest.fixture(autouse=True)
def no_apple_gpu(monkeypatch):
    """On a Mac, the runs in this process train on the CPU too (the scripts it starts would still see the GPU)."""
    import torch

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def error_lines(stderr):
    """The script's own lines on stderr: a library may add warnings of its own (matplotlib's cache folder, say)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def wait_until(condition, process=None, what="it", seconds=300):
    """Poll until condition() holds; fail if the process ends first, or after `seconds`."""
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert process is None or process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.02)


def loading_libraries(pid):
    """Whether a Python process has begun loading torch or pyarrow (Linux: the files it has mapped): by then the
    script and the benchmark have put in their Ctrl-C handler for that phase, and the loading takes seconds more."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
    return "/torch/" in maps or "/pyarrow/" in maps


def checkpoint_reached(folder, step):
    """A complete checkpoint of this step or a later one: SAVE_TOTAL_LIMIT deletes the older ones as the run goes."""
    import fine_tune_lora

    return any((fine_tune_lora.checkpoint_step(c) or 0) >= step and (c / "trainer_state.json").exists()
               for c in Path(folder).glob("checkpoint-*"))


def pytest_configure(config):
    """The library warnings the script itself silences (deprecations inside the libraries) stay silent here too."""
    import fine_tune_lora

    config.addinivalue_line("filterwarnings", f"ignore:{fine_tune_lora.KNOWN_LIBRARY_WARNINGS}")


POSITIVE = ["great", "wonderful", "superb", "moving", "brilliant", "delightful", "excellent", "loved"]
NEGATIVE = ["awful", "boring", "terrible", "dull", "wooden", "tedious", "dreadful", "hated"]
NEUTRAL = ("the film plot actor scene story director camera music ending script cast character "
           "movie screen minute night city house car friend family woman man dog").split()

# A tiny GPT-2: 2 layers, 64 wide. With LORA_R = 8 on c_attn (64 -> 192) its closed-form count is
# 2 layers x 8 x (64 + 192) LoRA weights + 64 x 2 weights of the classification head `score`.
TINY = dict(n_layer=2, n_embd=64, n_head=2, n_positions=256)
TINY_TRAINABLE = TINY["n_layer"] * 8 * (TINY["n_embd"] + 3 * TINY["n_embd"]) + TINY["n_embd"] * 2


def make_review(rng, label, words=None):
    words = words or rng.randint(8, 60)
    cue = POSITIVE if label == 1 else NEGATIVE
    tokens = [rng.choice(NEUTRAL) for _ in range(words)]
    for _ in range(rng.randint(1, 3)):
        tokens.insert(rng.randrange(len(tokens) + 1), rng.choice(cue))
    # The verdict also closes the review: GPT-2 classifies from its last token.
    return " ".join(tokens) + " . overall " + rng.choice(cue)


def make_reviews(n, seed):
    rng = random.Random(seed)
    labels = [i % 2 for i in range(n)]
    rng.shuffle(labels)
    return [make_review(rng, label) for label in labels], labels


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A folder with a random 2-layer GPT-2 and its tokenizer, loadable with from_pretrained."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    texts, _ = make_reviews(400, seed=0)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.model_max_length = TINY["n_positions"]
    tokenizer.save_pretrained(folder)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, **TINY)
    import torch

    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tiny_model, tmp_path_factory):
    """A Llama-style model (nn.Linear layers: q_proj, v_proj...), 2 layers, 64 wide, with the same tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.save_pretrained(folder)
    eos = tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=eos,
                         eos_token_id=eos)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def check_model_card(folder, library, accuracy):
    """The card the Hub reads: its metadata links the model to its base and shows the run's accuracy."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == library and card.data.pipeline_tag == "text-classification"
    assert card.data.base_model and card.data.eval_results[0].metric_type == "accuracy"
    assert card.data.eval_results[0].metric_value == pytest.approx(accuracy, abs=1e-4)
    assert "negative or positive" in card.text and "pipeline(\"text-classification\"" in card.text


def write_split_files(folder, fmt, n_train=240, n_test=120, seed=1):
    """train.* and test.* files with `text` and `label` columns, in parquet, csv or jsonl."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 100)):
        texts, labels = make_reviews(n, s)
        frame = pd.DataFrame({"text": texts, "label": labels})
        if fmt == "parquet":
            frame.to_parquet(folder / "train.parquet" if split == "train" else folder / "test.parquet")
        elif fmt == "csv":
            frame.to_csv(folder / f"{split}.csv", index=False)
        else:
            frame.to_json(folder / f"{split}.jsonl", orient="records", lines=True)
    return folder


def write_acl_imdb(folder, n_train=240, n_test=120, seed=1):
    """Stanford's aclImdb layout: train/pos, train/neg, test/pos, test/neg, one .txt per review."""
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 100)):
        texts, labels = make_reviews(n, s)
        for i, (text, label) in enumerate(zip(texts, labels)):
            path = folder / split / ("pos" if label else "neg") / f"{i}_{7 if label else 3}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def reviews(tmp_path_factory):
    return write_split_files(tmp_path_factory.mktemp("reviews"), "parquet")


# Small, fast and learnable: what most tests train with. Tests add --output_dir and anything else.
FAST = ["--max_length", "64", "--num_epochs", "2", "--learning_rate", "1e-2", "--batch_size", "8",
        "--logging_steps", "10", "--save_steps", "0"]


def base_args(model, data):
    return ["--model_name", str(model), "--dataset_name", str(data), *FAST]


def run_script(*args, cwd=None, timeout=600, env=None):
    """Run the real script in a fresh Python process, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=full_env)


def run_main(capsys, *args):
    """The real entry point, in this process: a fresh one would spend seconds importing the libraries
    again. Returns what run_script does: returncode, stdout, stderr."""
    import fine_tune_lora

    capsys.readouterr()
    try:
        status = fine_tune_lora.main([str(a) for a in args])
    except SystemExit as exit_:  # argparse exits by itself (--help, a bad flag)
        status = exit_.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, captured.out, captured.err)


def read_results(folder):
    return json.loads((Path(folder) / "results.json").read_text())


@pytest.fixture(scope="session")
def trained(tiny_model, reviews, tmp_path_factory):
    """One adapter trained through the real entry point, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("trained") / "adapter"
    done = run_script(*base_args(tiny_model, reviews), "--output_dir", out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done
