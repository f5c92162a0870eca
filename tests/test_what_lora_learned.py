"""What LoRA learned, shown beside the adapter: the size of each adapted weight's change and its singular values,
computed as the lesson's maths says (dW = alpha / r * B A), checked against the change PEFT itself computes."""
import pytest
from conftest import read_results

import fine_tune_lora


def lora_model(tiny_model, **settings):
    """The tiny GPT-2 with a fresh LoRA adapter on c_attn (B = 0: no change yet)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["c_attn"],
                                            fan_in_fan_out=True, **settings))


def by_hand(model):
    """{(block, weight): (dW, W)} from PEFT's own get_delta_weight, c_attn cut into its query, key and value."""
    parts = {}
    for name, layer in model.named_modules():
        if isinstance(layer, fine_tune_lora.LoraLayer) and layer.lora_A:
            change, weight = layer.get_delta_weight("default").T, layer.get_base_layer().weight.T  # out x in
            block = int(name.split(".")[-3])
            for i, part in enumerate(("query", "key", "value")):
                rows = slice(i * len(weight) // 3, (i + 1) * len(weight) // 3)
                parts[block, part] = change[rows].detach(), weight[rows].detach()
    return parts


def test_the_change_and_its_singular_values_are_the_adapters_own(trained):
    """The trained adapter's results.json holds, for each block's query, key and value: |dW| / |W| as PEFT's
    get_delta_weight gives dW, and the singular values of dW as a full SVD gives them, at most r = 8 of them."""
    import torch

    out, done = trained
    learned = read_results(out)["what_lora_learned"]
    model, _ = fine_tune_lora.load_saved_model(out)
    parts = by_hand(model)
    assert {(layer["block"], layer["weight"]) for layer in learned["layers"]} == set(parts) and len(parts) == 6
    for layer in learned["layers"]:
        change, weight = parts[layer["block"], layer["weight"]]
        # (a run in bf16 keeps the frozen W in bf16, its norm then a rounding away from the checkpoint's)
        assert layer["relative_change"] == pytest.approx(float(change.norm() / weight.norm()), rel=1e-3)
        values = torch.linalg.svdvals(change)
        assert layer["singular_values"] == pytest.approx(values[:8].tolist(), rel=1e-4, abs=1e-6)
        assert len(layer["singular_values"]) == 8 and (values[8:] < 1e-5 * values[0]).all()  # rank r at most
        share = (values ** 2).cumsum(0) / (values ** 2).sum()
        assert layer["directions_for_90_percent"] == int((share < 0.9).sum()) + 1
    assert learned["rank"] == 8
    assert learned["mean_relative_change"] == pytest.approx(
        sum(layer["relative_change"] for layer in learned["layers"]) / 6)
    largest = max(learned["layers"], key=lambda layer: layer["relative_change"])
    assert learned["largest"] == {key: largest[key] for key in ("block", "weight", "relative_change")}
    # said after training and in the model card, in the same words
    sentence = fine_tune_lora.lora_learned_sentence(learned)
    assert f"What LoRA learned: {sentence}" in done.stdout
    assert f"most in block {largest['block']}'s {largest['weight']}" in sentence
    assert sentence in " ".join((out / "README.md").read_text().split())


def test_an_untrained_adapter_changed_nothing(tiny_model):
    """B starts at zero: before training, LoRA has changed no weight, in any direction."""
    learned = fine_tune_lora.what_lora_learned(lora_model(tiny_model))
    assert len(learned["layers"]) == 6 and learned["mean_relative_change"] == 0
    for layer in learned["layers"]:
        assert layer["relative_change"] == 0 and layer["directions_for_90_percent"] == 0
        assert layer["singular_values"] == [0.0] * 8


def test_a_dora_adapter_on_the_top_block_shows_its_merged_change_and_leaves_the_weights_as_they_were(tiny_model):
    """DoRA also rescales each column of W: its change is the merged weight's, of any rank. Only the adapted
    block is shown (LORA_TOP_BLOCKS), and the base weights are left to the bit."""
    import copy

    import torch

    model = lora_model(tiny_model, use_dora=True, layers_to_transform=[1])
    torch.manual_seed(0)
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.02)  # as after some training
    before = {name: weight.detach().clone() for name, weight in model.named_parameters()}
    learned = fine_tune_lora.what_lora_learned(model)
    assert all(torch.equal(before[name], weight) for name, weight in model.named_parameters())
    assert {layer["block"] for layer in learned["layers"]} == {1}
    merged = copy.deepcopy(model).merge_and_unload().transformer.h[1].attn.c_attn.weight.T  # out x in
    weight = model.base_model.model.transformer.h[1].attn.c_attn.get_base_layer().weight.T
    for i, layer in enumerate(learned["layers"]):
        rows = slice(i * 192 // 3, (i + 1) * 192 // 3)
        change = (merged - weight)[rows].detach()
        assert layer["relative_change"] == pytest.approx(float(change.norm() / weight[rows].norm()), rel=1e-4)
        assert layer["singular_values"] == pytest.approx(torch.linalg.svdvals(change).tolist(), rel=1e-3, abs=1e-6)


def test_the_picture_has_both_panels(trained):
    """what_lora_learned.png beside the adapter: the change per block on the left, the singular values on the
    right, each drawn (coloured lines on a white page)."""
    from matplotlib.image import imread

    out, _ = trained
    image = imread(out / "what_lora_learned.png")
    assert image.shape[:2] == (350, 1200)
    for half in (image[:, :600, :3], image[:, 600:, :3]):
        coloured = (half.max(axis=-1) - half.min(axis=-1)) > 0.3  # lines in colour, not grey text or grid
        assert coloured.sum() > 500
