"""Benchmarks: memory accounting in a fresh worker process, the inference fast path's equivalence,
report writers and the ``medsaga bench`` command line. Small models only; no timing assertions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from MedSAGaLib.bench import memory
from MedSAGaLib.bench.common import run_worker
from MedSAGaLib.fastpath import inference_copy

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1]}


def _worker(method: str, extra=()) -> dict:
    args = ["--model", "vit_b", "--image-size", "224", "--vit-spec", json.dumps(TINY_VIT), "--method", method,
            "--steps", "2", "--batch-size", "1", "--rank", "8", "--threads", "1", *extra]
    result = run_worker("MedSAGaLib.bench.memory", args, timeout=300)
    assert "error" not in result, result
    return result


@pytest.fixture(scope="module")
def measured() -> dict:
    from concurrent.futures import ThreadPoolExecutor

    jobs = {"full": ("full", ()), "galore": ("galore", ()), "galore-layerwise": ("galore-layerwise", ()),
            "full+ckpt": ("full", ("--checkpointing",))}
    with ThreadPoolExecutor(max_workers=2) as pool:  # separate processes: their figures do not mix
        futures = {k: pool.submit(_worker, m, extra) for k, (m, extra) in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


def test_memory_accounting_adds_up(measured):
    full = measured["full"]
    assert full["steps"] == 2 and full["method"] == "full"
    assert 0 < full["trainable"] <= full["weights"]
    # Plain AdamW keeps every gradient until the step (parameters off the loss path, such as SAM's
    # IoU head, get none), then two moments and a step counter per parameter that had a gradient.
    assert 0.9 * full["trainable"] <= full["grads_peak"] <= full["trainable"]
    assert 2 * full["grads_peak"] <= full["optimizer_state"] <= 2 * full["trainable"] + 8 * 1024
    assert full["activations_saved"] > 0
    # the trainer's step hook saw every step, and the peak is the largest step's saved activations
    assert len(full["per_step_saved"]) == 2 and min(full["per_step_saved"]) > 0
    assert full["activations_saved"] == max(full["per_step_saved"])
    # The allocator tracker saw at least the model, its gradients and the optimizer state at once.
    assert full["tracker_peak"] >= full["weights"] + full["optimizer_state"]
    assert full["rss_peak"] is None or full["rss_peak"] > 0


def test_galore_state_and_layerwise_gradients_are_smaller(measured):
    full, galore, layerwise = measured["full"], measured["galore"], measured["galore-layerwise"]
    assert galore["galore_parameters"] > 0
    assert galore["trainable"] == full["trainable"]
    assert galore["optimizer_state"] < full["optimizer_state"]
    assert layerwise["optimizer_state"] == pytest.approx(galore["optimizer_state"], rel=0.01)
    # Layer-wise updates free each gradient as soon as it is used: never the whole set at once.
    assert layerwise["grads_peak"] < full["grads_peak"] / 4


def test_memory_reports(measured, tmp_path):
    rows = [measured["full"], measured["galore"], measured["galore-layerwise"],
            {"model": "vit_b", "image_size": 224, "method": "lora", "checkpointing": True, "error": "boom"}]
    table = memory.markdown_table(rows)
    assert "| full |" in table and "| galore-layerwise r8 |" in table and "| lora+ckpt | error: boom" in table
    assert "1.00" in table  # full against itself
    png = memory.bar_chart(rows, tmp_path / "memory.png")
    assert png.stat().st_size > 1000


def test_equal_terms_rows_are_labelled_and_measured_apart():
    """The qkv rows (GaLore on LoRA's layers) carry their own label and resume key; LoRA has one row."""
    assert memory.label("galore-layerwise", True, 32, "qkv") == "galore-layerwise r32 [qkv]+ckpt"
    assert memory.label("lora", True, None, "qkv") == "lora+ckpt"
    assert memory.layer_choices("lora", ["all", "qkv"]) == ["all"]
    assert memory.layer_choices("full", ["all", "qkv"]) == ["all", "qkv"]
    qkv = _worker("galore-layerwise", ("--encoder-layers", "qkv"))
    assert qkv["encoder_layers"] == "qkv"
    per_block = TINY_VIT["embed_dim"] * 3 * TINY_VIT["embed_dim"]
    assert qkv["galore_parameters"] == TINY_VIT["depth"] * per_block


def test_checkpointing_reduces_saved_activations(measured):
    plain = measured["full"]
    ckpt = measured["full+ckpt"]
    assert ckpt["activations_saved"] < plain["activations_saved"]


def test_fast_path_matches_plain_litemedsam():
    from MedSAGaLib.head import ClassSegmenter
    from MedSAGaLib.inference import segment_volume
    from MedSAGaLib.models import build_base_model

    torch.manual_seed(0)
    seg = ClassSegmenter.from_base(build_base_model("litemedsam"), ["a", "b"]).eval()
    fast = inference_copy(seg)
    assert fast._fastpath["fused_conv_bn"] > 0
    assert any(type(m).__name__ == "Conv2d_BN" for m in seg.modules()), "the original model must stay untouched"
    yy, xx = np.mgrid[0:256, 0:256]
    img = ((np.sin(xx / 9.0) + np.cos(yy / 13.0)) * 0.25 + 0.5).astype(np.float32)
    x = torch.stack([torch.from_numpy(img).expand(3, -1, -1), torch.rand(3, 256, 256)])
    with torch.inference_mode():
        ref, out = seg(x), fast(x)
    assert float((ref - out).abs().max()) < 1e-3
    assert float((ref.argmax(1) == out.argmax(1)).float().mean()) > 0.999
    volume = np.stack([img[:200, :180], img[20:220, 10:190]])
    plain = segment_volume(seg, volume, axis=0, batch_size=2, progress=False, fast=False)
    quick = segment_volume(seg, volume, axis=0, batch_size=2, progress=False)
    assert (plain == quick).mean() > 0.999


def test_fast_path_leaves_vit_unchanged():
    from MedSAGaLib.head import ClassSegmenter
    from MedSAGaLib.models import build_sam_vit

    seg = ClassSegmenter.from_base(build_sam_vit("vit_b", None, 224, TINY_VIT), ["a"]).eval()
    fast = inference_copy(seg)
    assert fast is seg  # nothing to fold: no copy of the weights
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(seg(x), fast(x))


def test_bench_command_line():
    from MedSAGaLib.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["bench", "memory", "--models", "litemedsam:256", "--methods", "full", "lora"])
    assert args.models == ["litemedsam:256"] and args.methods == ["full", "lora"] and callable(args.func)
    args = parser.parse_args(["bench", "quality", "--shots", "1", "3", "--seeds", "2"])
    assert args.shots == [1, 3] and args.seeds == 2
    args = parser.parse_args(["bench", "speed", "--methods"])
    assert args.methods == []
    assert memory.parse_model("vit_b:1024") == ("vit_b", 1024)
    assert memory.parse_model("litemedsam") == ("litemedsam", None)


def test_quality_keeps_rate_choice_apart_from_scoring():
    """Validation slices (rate search) are never test slices, and no training slice is next to either."""
    from MedSAGaLib.bench import quality

    _, labels, axis, _, test, val, candidates = quality.load_task(test_slices=8, val_slices=6)
    assert len(test) == 8 and len(val) == 6 and not set(test) & set(val)
    assert min(abs(c - h) for c in candidates for h in test + val) > 2
    for seed in range(3):
        draw = quality.draw_training(candidates, 20, seed)
        assert len(draw) == 20 and set(draw) <= set(candidates)
    assert quality.parse_method_lrs(["full=3e-4", "lora=0.01"]) == {"full": 3e-4, "lora": 0.01}
    for bad in (["full"], ["unet=1e-3"], ["full=fast"], ["full=0"]):
        with pytest.raises(SystemExit, match="--method-lr"):
            quality.parse_method_lrs(bad)


def test_quality_table_names_each_methods_rate():
    from MedSAGaLib.bench import quality

    runs = [dict(method=m, shots=n, seed=k, lr=lr, dice=d + 0.01 * k, hd95_mm=5.0, seconds_per_step=1.0)
            for m, lr, d in (("full", 3e-4, 0.80), ("galore-layerwise", 3e-3, 0.79)) for n in (1, 10) for k in (0, 1)]
    payload = dict(settings=dict(steps=60, batch_size=2, lr=2e-3, warmup=10, train_stages=1, rank=32, seeds=2,
                                 unet_steps=0), test_slices=[1, 2], validation_slices=[5, 9], runs=runs, baselines={},
                   lr_search=[dict(method="full", lr=lr, shots=10, val_dice=v) for lr, v in ((3e-4, 0.7), (3e-3, float("nan")))],
                   lr_by_method={"full": 3e-4, "galore-layerwise": 3e-3})
    payload["summary"] = quality.summarize(payload)
    text = quality.markdown(payload)
    assert "each method at its own lr" in text and "| full | 0.700 | diverged | 0.0003 |" in text
    assert "| full | 0.0003 | 0.805 ± 0.005 (5.0) | 0.805 ± 0.005 (5.0) |" in text


def test_quality_setting_search_is_parsed_reported_and_invalidates_stale_runs():
    from MedSAGaLib.bench import quality

    assert quality.parse_setting_grids(["scale=0.25,1", "rank=16,32,16"]) == [("scale", [0.25, 1.0]), ("rank", [16, 32])]
    for bad in (["scale"], ["lr=1e-3,1e-2"], ["rank=a,b"], ["scale="]):
        with pytest.raises(SystemExit, match="--tune-setting"):
            quality.parse_setting_grids(bad)
    runs = [dict(method="full", lr=3e-4, shots=10, seed=0), dict(method="galore-layerwise", lr=1e-3, shots=10, seed=0),
            dict(method="galore-layerwise", lr=1e-3, config={"scale": 1.0}, shots=10, seed=1),
            dict(method="unet", lr=1e-3, shots=10, seed=0)]
    stale = quality.stale_runs(runs, {"full": 3e-4, "galore-layerwise": 1e-3}, {"galore-layerwise": {"scale": 1.0}})
    assert stale == [runs[1]]  # made before the scale was chosen; the U-Net is not a swept method
    assert quality.stale_runs(runs, {"full": 1e-3, "galore-layerwise": 1e-3}, {"galore-layerwise": {"scale": 1.0}}) == runs[:2]
    trials = [dict(method="galore-layerwise", lr=1e-3, config={"scale": v}, shots=10, seed=k, val_dice=d + 0.01 * k)
              for v, d in ((0.25, 0.80), (1.0, 0.90)) for k in range(3)]
    payload = dict(settings=dict(steps=60, batch_size=2, lr=1e-3, warmup=10, train_stages=1, rank=32, seeds=1, unet_steps=0,
                                 tune_setting_seeds=3), test_slices=[1], validation_slices=[5], baselines={},
                   runs=[dict(method="galore-layerwise", shots=10, seed=0, lr=1e-3, config={"scale": 1.0}, dice=0.9,
                              hd95_mm=2.0, seconds_per_step=1.0)],
                   setting_search=trials, config_by_method={"galore-layerwise": {"scale": 1.0}})
    payload["summary"] = quality.summarize(payload)
    text = quality.markdown(payload)
    assert "| galore-layerwise | scale 0.25 | 0.810 (0.800-0.820) |  |" in text
    assert "| galore-layerwise | scale 1 | 0.910 (0.900-0.920) | yes |" in text
    assert "| galore-layerwise | 0.001 (scale 1) | 0.900 ± 0.000 (2.0) |" in text


def test_report_rewrites_only_the_results_section(measured, tmp_path):
    from argparse import Namespace

    from MedSAGaLib.bench import report
    from MedSAGaLib.bench.common import write_json

    results = tmp_path / "docs" / "results"
    write_json(results / "memory.json", {"results": [measured["full"], measured["galore-layerwise"]]})
    summary = [dict(method=m, shots=n, seeds=1, dice_mean=d, dice_std=0.0, hd95_mean=5.0, hd95_std=0.0, seconds_per_step=1.0)
               for m, n, d in (("full", 10, 0.80), ("galore", 10, 0.79))]
    write_json(results / "quality.json", {"settings": dict(steps=3, batch_size=2, lr=5e-4, warmup=1, train_stages=1, rank=8,
                                                           seeds=1, unet_steps=0), "test_slices": [1, 2],
                                          "summary": summary, "baselines": {}, "runs": []})
    readme = tmp_path / "README.md"
    readme.write_text("# Title\nintro\n<!-- results:start -->\nSTALE-SECTION-TEXT\n<!-- results:end -->\nafter\n", encoding="utf-8")
    report.run(Namespace(results=str(results), readme=str(readme), notes=None))
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# Title\nintro\n<!-- results:start -->\n## Results") and text.endswith("<!-- results:end -->\nafter\n")
    assert "STALE-SECTION-TEXT" not in text and "| galore-layerwise r8 |" in text
    assert "galore − full = -1.0 Dice points" in text
    assert "No speed benchmark" in text


def test_equal_terms_target_compares_galore_on_loras_layers_with_lora(tmp_path):
    from MedSAGaLib.bench import report
    from MedSAGaLib.bench.common import write_json

    def row(method, ckpt, peak_mb, layers="all", rank=None):
        return dict(model="litemedsam", image_size=256, method=method, checkpointing=ckpt, tracker_peak=peak_mb * 2**20,
                    device="cpu", rank=rank, encoder_layers=layers, train_stages=4)

    rows = [row("full", False, 2000), row("lora", True, 300), row("galore-layerwise", True, 290, "qkv", 128),
            row("galore-layerwise", True, 700, "all", 128)]
    write_json(tmp_path / "memory_x.json", {"settings": {"rank": 128}, "results": rows})
    text = "\n".join(report.targets_section(tmp_path))
    assert "| galore-layerwise r128 [qkv]+ckpt (GaLore on the layers LoRA adapts)" in text
    assert "0.97x LoRA (290 / 300 MB), 0.14x full | met |" in text
    assert "0.35x (700 / 2,000 MB) | missed |" in text  # the all-layers row keeps its own target
    rows[2]["tracker_peak"] = 310 * 2**20
    write_json(tmp_path / "memory_x.json", {"settings": {"rank": 128}, "results": rows})
    assert "1.03x LoRA (310 / 300 MB), 0.15x full | missed |" in "\n".join(report.targets_section(tmp_path))
    for r in rows:  # a file of the CPU default (the last stage): full trains that stage only, so LoRA decides
        r["train_stages"] = 1
    rows[2]["tracker_peak"] = 300 * 2**20
    write_json(tmp_path / "memory_x.json", {"settings": {"rank": 128}, "results": rows})
    text = "\n".join(report.targets_section(tmp_path))
    assert "peak <= 1.0x lora+ckpt (litemedsam 256 px" in text
    assert "1.00x LoRA (300 / 300 MB), 0.15x full (full trains the same stages here) | met |" in text


def test_gpu_memory_target_is_met_only_by_a_cuda_vit_b_1024_file(tmp_path):
    from MedSAGaLib.bench import report
    from MedSAGaLib.bench.common import write_json

    def rows(device, size=1024):
        return [dict(model="vit_b", image_size=size, method="lora", checkpointing=True, tracker_peak=2**30, device=device,
                     machine={"gpu": "Test GPU"} if device.startswith("cuda") else {"cpu": "x"})]

    gpu_line = lambda: next(l for l in report.targets_section(tmp_path) if "vit_b 1024 px on a GPU" in l)
    write_json(tmp_path / "memory_cpu.json", {"settings": {}, "results": rows("cpu")})
    write_json(tmp_path / "memory_small.json", {"settings": {}, "results": rows("cuda", 512)})
    assert gpu_line().endswith("| missing |")
    write_json(tmp_path / "memory_gpu.json", {"settings": {}, "results": rows("cuda:0")})
    assert gpu_line() == "| `bench memory` vit_b 1024 px on a GPU | `memory_gpu.json` (Test GPU) | measured |"


def test_quality_run_chooses_a_setting_on_validation_and_resume_reruns_only_stale_runs(tmp_path):
    """The real benchmark, tiny: LiteMedSAM, 1 shot, 2 steps, a 2-value scale search on validation slices."""
    from MedSAGaLib.bench import quality as quality_module
    from MedSAGaLib.cli import build_parser

    def quality(*extra):
        argv = ["bench", "quality", "--shots", "1", "--seeds", "1", "--methods", "galore-layerwise", "decoder",
                "--steps", "2", "--warmup", "1", "--test-slices", "2", "--val-slices", "2", "--tune-shots", "1",
                "--tune-setting-seeds", "1", "--unet-steps", "0", "--no-oracle", "--warmup-curve-method", "",
                "--output", str(tmp_path), "--name", "q", *extra]
        args = build_parser().parse_args(argv)
        return quality_module.run(args)

    first = quality("--tune-setting", "scale=0.5,1")
    trials = first["setting_search"]
    assert [t["config"] for t in trials] == [{"scale": 0.5}, {"scale": 1.0}]
    assert set(first["validation_slices"]).isdisjoint(first["test_slices"])
    best = max(trials, key=lambda t: t["val_dice"])["config"]
    assert first["config_by_method"] == {"galore-layerwise": best}
    rows = {r["method"]: r for r in first["runs"]}
    assert rows["galore-layerwise"]["config"] == best and rows["decoder"]["config"] == {}
    # A scale grid without the chosen value forces another choice: only the GaLore run is redone.
    other = 0.5 if best == {"scale": 1.0} else 1.0
    second = quality("--tune-setting", f"scale={other}", "--resume")
    rows2 = {r["method"]: r for r in second["runs"]}
    assert second["config_by_method"] == {"galore-layerwise": {"scale": other}}
    assert rows2["galore-layerwise"]["config"] == {"scale": other}
    assert rows2["decoder"]["total_seconds"] == rows["decoder"]["total_seconds"]  # kept, not retrained
    assert len(second["setting_search"]) == 2  # the trial for `other` was reused, not rerun
    assert (tmp_path / "q.md").read_text(encoding="utf-8").count("| galore-layerwise | scale") == 2


def test_backend_speed_report_states_the_f32_floor_of_the_machine():
    """``bench speed --backends`` compares with what the CPU can do at all: the model's FLOPs over its matmul peak."""
    from MedSAGaLib.bench.speed import backends_markdown

    def row(backend, total):
        return dict(model="litemedsam", image_size=256, backend=backend, threads=2, total_min=total, total_median=total,
                    cpu_total_min=2 * total, encoder_min=total, decoder_min=0.1, boxes_1_min=total,
                    max_abs_logit_diff=0.0, argmax_agreement=1.0, load_average_before=(1.0,), load_average_after=(1.0,),
                    flops_per_slice=80e9, matmul_flops=100e9)

    payload = dict(machine=dict(cpu="AMD EPYC", cpu_count=2, torch="2.x"), cpu_flags=["avx2"], openvino="2026",
                   command="medsaga bench speed --backends", settings=dict(repeats=1, box_counts=[1]),
                   backends=[row("torch-fast", 2.0), row("openvino", 1.0)])
    text = backends_markdown(payload)
    assert "OpenVINO f32 is 2.00x the fast path's speed" in text and "target <= 0.45 s missed" in text
    assert "(100 GFLOP/s at 2 threads) that alone takes 0.80 s" in text and "80.0 GFLOP per slice" in text
    assert "0.45 s would need 178 GFLOP/s (OpenVINO ran at 80% of the matmul rate)" in text
    # The opt-in int8 encoder gets its own line; its box path is f32, so not timed again ("-").
    int8 = dict(row("openvino-int8", 0.4), boxes_1_min=float("nan"), argmax_agreement=0.99)
    text = backends_markdown(dict(payload, backends=payload["backends"] + [int8],
                                  settings=dict(repeats=1, box_counts=[1], backends=["torch-fast", "openvino", "openvino-int8"])))
    assert "| openvino-int8 | 2 | 0.400 | 0.400 | 0.800 | 0.400 | 0.100 | - |" in text
    assert "int8 encoder (opt-in, `--inference-precision int8`) 0.400 s/slice" in text
    assert "99.000% with torch-fast on this slice: <= 0.45 s met" in text


def test_training_speed_rows_say_which_precision_ran():
    """``bench speed --train-precisions``: each training row names the precision the trainer's autocast used, so
    fp32 and bf16 steps of one method can sit side by side; ``auto`` resolves as the trainer resolves it."""
    from MedSAGaLib.bench.speed import markdown, precision_that_runs
    from MedSAGaLib.training.precision import choose_autocast

    assert precision_that_runs("fp32", "galore") == "fp32" and precision_that_runs("bf16", "galore") == "bf16"
    assert precision_that_runs("auto", "decoder") == "fp32"  # decoder-only stays fp32 on any CPU
    dtype, _ = choose_autocast("auto", torch.device("cpu"), trains_encoder=True)
    assert precision_that_runs("auto", "galore") == ("bf16" if dtype == torch.bfloat16 else "fp32")

    def row(precision, seconds):
        return dict(model="litemedsam", method="galore", batch_size=2, train_stages=1, precision=precision,
                    seconds_per_step=seconds, flops_per_step=200e9, fraction_of_matmul=0.5)

    text = markdown(dict(machine=dict(cpu="AMD EPYC", torch_threads=2), matmul_flops=200e9, inference=[],
                         training=[row("fp32", 1.4), row("bf16", 0.9)]))
    assert "| litemedsam | galore | fp32 | 2 | 1 | 1.40 | 200 | 50% |" in text
    assert "| litemedsam | galore | bf16 | 2 | 1 | 0.90 | 200 | 50% |" in text


def test_unet_baseline_plans_its_steps_from_a_time_budget():
    """The U-Net baseline gets the product's wall-clock: with a budget it times its first steps and trains
    no more than fit (and at least the probe), without one exactly the steps asked for."""
    from MedSAGaLib.bench.quality import predict_unet, train_unet
    from MedSAGaLib.training.budget import PROBE_STEPS

    rng = np.random.default_rng(0)
    images = [rng.random((40, 40), dtype=np.float32) for _ in range(2)]
    labels = [(im > 0.5).astype(np.uint8) for im in images]
    _, fixed = train_unet(images, labels, 1, steps=4, image_size=32, seed=0)
    assert len(fixed) == 4
    net, budgeted = train_unet(images, labels, 1, steps=10_000, image_size=32, seed=0, time_budget=1e-6)
    assert len(budgeted) == PROBE_STEPS + 1
    assert predict_unet(net, images, 32).shape == (2, 40, 40)
