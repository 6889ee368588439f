"""The model benchmarks: FLOP counting and peak table of the GPU bench, and CPU smoke runs of both."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.bench import model as bench_model
from jobs.bench import model_gpu

pytestmark = pytest.mark.unit


def test_count_flops_of_a_linear_layer():
    layer = torch.nn.Linear(10, 20)
    x = torch.randn(4, 10)
    forward = 2 * 4 * 10 * 20
    assert model_gpu.count_flops(lambda: layer(x)) == forward
    # Backward computes the input gradient and the weight gradient: two more matmuls of the same size.
    assert model_gpu.count_flops(lambda: layer(x.requires_grad_()).sum().backward()) == 3 * forward


def test_training_step_counts_about_three_forwards():
    model = model_gpu.create_model("mltr_tiny", drop_path_rate=0.0)
    images = torch.randn(2, 3, 64, 64)
    targets = torch.zeros(2, 80)
    infer = model_gpu.count_flops(model_gpu.make_infer_step(model, images))
    train = model_gpu.count_flops(model_gpu.make_train_step(model, images, targets))
    assert infer > 0 and 2.5 < train / infer < 3.5


def test_peak_flops_table():
    assert model_gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert model_gpu.peak_flops("NVIDIA H200") == 989e12
    assert model_gpu.peak_flops("NVIDIA H100 80GB HBM3", override_tflops=500) == 500e12
    assert model_gpu.peak_flops("Some Future GPU") is None


def test_gpu_bench_without_cuda_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model_gpu.main([]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_gpu_bench_smoke_on_cpu(capsys):
    argv = [
        "--device",
        "cpu",
        "--variants",
        "mltr_tiny",
        "--batch-size",
        "1",
        "--warmup",
        "0",
        "--steps",
        "1",
    ]
    assert model_gpu.main([*argv, "--no-ablation", "--peak-tflops", "1"]) == 0
    result = last_json(capsys.readouterr().out)
    (run,) = result["runs"]
    assert run["variant"] == "mltr_tiny" and run["train_images_per_s"] > 0 and run["train_tflop_per_step"] > 0
    assert run["train_mfu"] > 0 and run["train_mfu"] == pytest.approx(
        run["train_achieved_tflops"] / 1.0, rel=1e-2
    )


def test_cpu_bench_smoke(capsys):
    argv = ["--variant", "mltr_tiny", "--batch-size", "1", "--warmup", "0", "--steps", "1"]
    assert bench_model.main(argv) == 0
    result = last_json(capsys.readouterr().out)
    assert (
        result["ratio"] > 0
        and result["mltr_train_images_per_s"] > 0
        and "timm_train_images_per_s" not in result
    )
    assert bench_model.main(["--variant", "mltr_s", "--window-size", "8"]) == 2


def test_tiny_recipe_bench_runs_both_stems_and_reports_against_the_baseline(tmp_path, capsys):
    from jobs.bench import tiny_recipe

    argv = [
        "--images",
        "40",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--batch-size",
        "8",
        "--workdir",
        str(tmp_path),
    ]
    assert tiny_recipe.main(argv) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["stem"], r["seed"]) for r in figures["runs"]] == [("patch", 0), ("conv", 0)]
    assert [p["step"] for p in figures["runs"][1]["curve"]] == [2, 4]
    assert figures["ratio"] == pytest.approx(
        figures["conv_final_val_mAP"] / figures["patch_final_val_mAP"], abs=1e-3
    )
    assert 0 < figures["label_frequency_baseline_mAP"] < 1 and figures["train_rows"] > figures["val_rows"] > 0
