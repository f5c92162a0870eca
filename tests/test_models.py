"""Models as the Hub serves them, without a sentiment head (it is made when the script loads them), trained by
the script and reloaded elsewhere as users reload them: the README's code in a fresh process, and a pipeline."""
import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT, base_args, read_results, run_main

README = (ROOT / "README.md").read_text(encoding="utf-8")
TEXTS = ["the film was wonderful . overall superb", "dull wooden acting . overall awful",
         "the camera and the music . overall", "a scene with a dog . overall loved"]


def using_the_adapter(kind):
    """The README's code in "Using the adapter": the AutoPeft lines ("model") or the pipeline's ("pipeline")."""
    section = README[README.index("## Using the adapter"):]
    return next(block for block in re.findall(r"```python\n(.*?)```", section[:section.index("\n## ")], re.S)
                if ("pipeline(" in block) == (kind == "pipeline"))


# The README's AutoPeft code as it stands, in a fresh process with a torch seed of its own (a new head drawn
# at load would differ from the one --predict draws): its folder and its texts replaced by the test's.
README_RELOAD = """
import json, sys, torch
torch.manual_seed(12345)
TEXTS = json.loads(open(sys.argv[2]).read())
{code}
print(json.dumps(probabilities.tolist()))
"""


def reload_as_the_readme_does(folder, texts, tmp_path):
    code = using_the_adapter("model")
    assert '"./gpt2-imdb-lora"' in code and '["A wonderful film."]' in code, code
    code = code.replace('"./gpt2-imdb-lora"', "sys.argv[1]").replace('["A wonderful film."]', "TEXTS")
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    done = subprocess.run([sys.executable, "-c", README_RELOAD.format(code=code), str(folder),
                           str(tmp_path / "texts.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def hub_deberta(tiny_model, tmp_path_factory):
    """DeBERTa-v2 (an encoder; DeBERTa-v3 is the same code) saved as on the Hub: with its masked-language head, without
    the pooler and classifier that AutoModelForSequenceClassification adds."""
    import torch
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2ForMaskedLM

    folder = tmp_path_factory.mktemp("hub-deberta")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    DebertaV2ForMaskedLM(DebertaV2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=256, pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hub_t5(tiny_model, tmp_path_factory):
    """T5 (an encoder-decoder) saved as on the Hub, for text-to-text: no classification_head. Its config gives no
    maximum length (relative positions); it classifies from the end-of-text token its tokenizer appends."""
    import torch
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    folder = tmp_path_factory.mktemp("hub-t5")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})  # padding with end-of-text would add more of them
    eos = tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=f"$A {tokenizer.eos_token}",
                                                                    special_tokens=[(tokenizer.eos_token, eos)])
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2, eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
    return folder


# family: (the base model's fixture, LoRA targets, the modules the checkpoint lacks, trained and saved whole, and
# the accuracy it reaches: a 2-layer random DeBERTa classifies from the first token, and in a few dozen steps does
# not learn to gather there the verdict these reviews end with)
FAMILIES = {
    "gpt2 (decoder)": ("tiny_model", ["c_attn"], ["score"], 0.9),
    "deberta-v2 (encoder, new pooler)": ("hub_deberta", ["query_proj", "value_proj"], ["pooler", "classifier"], 0),
    "t5 (encoder-decoder)": ("hub_t5", ["q", "v"], ["classification_head"], 0.7),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_hub_checkpoint_is_trained_saved_and_reloaded_elsewhere_to_the_same_predictions(
        family, reviews, tmp_path, capsys, request):
    """The new head is trained and saved with the adapter: the README's code, in a fresh process with another
    seed, gives --predict's probabilities and results.json's accuracy; --merge keeps them too."""
    import pandas as pd
    import torch
    from safetensors import safe_open

    import fine_tune_lora

    fixture, targets, new, learns_to = FAMILIES[family]
    base, out = request.getfixturevalue(fixture), tmp_path / "adapter"
    # every review whole (the README's code reads up to 512 tokens, as --predict does)
    done = run_main(capsys, *base_args(base, reviews), "--max_length", "256", "--target_modules", *targets,
                    "--output_dir", out)
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(out)
    assert results["accuracy"] >= learns_to, results
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(new) <= set(config["modules_to_save"]), config["modules_to_save"]
    with safe_open(out / "adapter_model.safetensors", "pt") as saved:  # the new modules whole, beside LoRA's
        assert {key.removeprefix("base_model.model.").split(".")[0] for key in saved.keys() if "lora_" not in key
                } == set(new), list(saved.keys())
        # and what was trained is what was saved
        assert sum(saved.get_tensor(key).numel() for key in saved.keys()) == results["trainable_params"]

    test = pd.read_parquet(reviews / "test.parquet")
    texts = TEXTS + test.text.tolist()
    readme = torch.tensor(reload_as_the_readme_does(out, texts, tmp_path))
    torch.manual_seed(0)  # --predict's own reload: another seed
    model, tokenizer = fine_tune_lora.load_saved_model(out)
    predicted = fine_tune_lora.classify(model, tokenizer, texts, max_length=512)
    torch.testing.assert_close(readme, predicted, atol=1e-5, rtol=0)
    accuracy = (readme[len(TEXTS):].argmax(-1).numpy() == test.label.values).mean()
    assert accuracy == results["accuracy"], (accuracy, results["accuracy"])
    # and what --predict prints: each text labelled as the README's reload labels it, with its probability
    printed = run_main(capsys, "--output_dir", out, "--predict", *TEXTS)
    assert printed.returncode == 0, printed.stderr
    rows = [row.split()[:2] for row in printed.stdout.splitlines()[1:]]
    assert [label for label, _ in rows] == [["negative", "positive"][i] for i in readme[:len(TEXTS)].argmax(-1)]
    assert [float(p) for _, p in rows] == pytest.approx(readme[:len(TEXTS)].max(-1).values.tolist(), abs=6e-4)

    merged = run_main(capsys, "--output_dir", out, "--merge")
    assert merged.returncode == 0, merged.stderr[-3000:]
    difference = float(re.search(r"on 3 texts: ([\d.e+-]+)", merged.stdout).group(1))
    assert difference < 1e-5, merged.stdout


def test_adapters_of_a_model_with_a_new_pooler_share_its_base_each_with_its_own_head(hub_deberta, reviews, tmp_path,
                                                                                   capsys):
    """--adapters: two DeBERTa adapters on one base, each with its own pooler and classifier, each classifying as
    it does alone."""
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder, seed in zip(folders, ("1", "2")):
        done = run_main(capsys, *base_args(hub_deberta, reviews), "--target_modules", "query_proj", "value_proj",
                        "--num_epochs", "1", "--seed", seed, "--output_dir", folder)
        assert done.returncode == 0, done.stderr[-3000:]
    alone = [run_main(capsys, "--output_dir", folder, "--predict", *TEXTS) for folder in folders]
    together = run_main(capsys, "--predict", *TEXTS, "--adapters", *folders)
    assert together.returncode == 0 and all(done.returncode == 0 for done in alone), together.stderr

    def cells(done, column):
        return [row.split()[2 * column:2 * column + 2] for row in done.stdout.splitlines()[1:]]
    assert cells(together, 0) == cells(alone[0], 0) and cells(together, 1) == cells(alone[1], 0)
    assert cells(together, 0) != cells(together, 1)  # two heads, not one shared


EXAMPLES = '["A wonderful film.", "Two hours I will never get back."]'  # the texts the README and the card show


def run_snippet(code, *args, cwd=None):
    """Run a snippet as a user pastes it, in a fresh process; what its last line printed (a list of dicts)."""
    import ast

    done = subprocess.run([sys.executable, "-c", "import json, sys\n" + code, *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def test_the_readmes_pipeline_labels_a_batch_from_the_saved_folder(trained):
    """`pipeline("text-classification", ...)` on the adapter folder, as the README shows it: several texts at a time
    (padded, so the pad token must be known), each labelled "negative" or "positive"."""
    out, _ = trained
    code = using_the_adapter("pipeline")
    assert "batch_size=" in code and '"./gpt2-imdb-lora"' in code and EXAMPLES in code, code
    code = code.replace('"./gpt2-imdb-lora"', "sys.argv[1]").replace(EXAMPLES, "json.loads(sys.argv[2])")
    answers = run_snippet(code, out, json.dumps(TEXTS))
    assert [answer["label"] for answer in answers[:2]] == ["positive", "negative"], answers
    assert len(answers) == len(TEXTS) and {answer["label"] for answer in answers} <= {"negative", "positive"}


@pytest.mark.parametrize("folder", ["adapter", "merged"])
def test_the_model_cards_snippet_runs_beside_the_saved_folder_and_cuts_long_reviews(folder, trained, tmp_path,
                                                                                    capsys):
    """The snippet in the saved folder's README.md, as a user copies it, next to the folder: a batch labelled, and
    a review longer than the model reads (the tiny GPT-2 reads 256 tokens) cut to fit. A merged model's folder
    carries its labels and pad token: its snippet is the bare pipeline."""
    import shutil

    out = tmp_path / "adapter"
    shutil.copytree(trained[0], out)
    if folder == "merged":
        assert run_main(capsys, "--output_dir", out, "--merge").returncode == 0
        out = tmp_path / "adapter-merged"
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    assert "truncation=True" in code and "batch_size=" in code and EXAMPLES in code, code
    long_review = " ".join(["the plot and the music"] * 200) + " . overall superb"  # over 1,000 tokens
    answers = run_snippet(code.replace(EXAMPLES, json.dumps([*TEXTS[:2], long_review])), cwd=tmp_path)
    assert [answer["label"] for answer in answers[:2]] == ["positive", "negative"], answers
    assert len(answers) == 3 and answers[2]["label"] in ("negative", "positive"), answers
