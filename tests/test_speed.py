"""The speed levers keep the results: bf16 against fp32, compiled against eager; and `ddpm bench`."""

import json
import os
import subprocess
import sys

import torch

from ddpm_cli.engine.generate import SamplerSettings, sample_batch
from ddpm_cli.engine.pipeline import load_pipeline
from tests.test_cli import ddpm

SEEDS = list(range(8))


def test_bf16_samples_match_fp32_within_tolerance():
    """The built-in model, DPM-Solver++ 20 steps: bf16 images stay within mean |diff| 0.05 of fp32 (on
    the [-1, 1] scale, about 6 of 255 grey levels) and each correlates with its fp32 twin at >= 0.95."""
    settings = SamplerSettings("dpmpp-2m", 20)
    fp32 = sample_batch(load_pipeline("fashion-mnist", device="cpu", dtype="fp32"), SEEDS, settings)
    bf16 = sample_batch(load_pipeline("fashion-mnist", device="cpu", dtype="bf16"), SEEDS, settings)
    assert (fp32 - bf16).abs().mean() < 0.05
    for a, b in zip(fp32.flatten(1), bf16.flatten(1)):
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] >= 0.95
    other = sample_batch(load_pipeline("fashion-mnist", device="cpu", dtype="fp32"), [s + 100 for s in SEEDS], settings)
    assert (fp32 - other).abs().mean() > 0.2  # the tolerance tells different images apart


def test_compiled_sampling_agrees_with_eager(tiny_pipeline_dir):
    settings = SamplerSettings("ddpm", 5)
    eager = sample_batch(load_pipeline(str(tiny_pipeline_dir), device="cpu", dtype="fp32"), SEEDS[:4], settings)
    pipeline = load_pipeline(str(tiny_pipeline_dir), device="cpu", dtype="fp32", compile=True)
    assert type(pipeline.forward).__name__ == "function"  # no CUDA graphs on the CPU
    compiled = sample_batch(pipeline, SEEDS[:4], settings)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)


def test_compiled_bf16_sampling_keeps_stderr_quiet(tiny_pipeline_dir, tmp_path):
    """torch.compile of diffusers' U-Net in bf16 makes Dynamo warn, in 14 lines, about a cached version
    check it traces through; `-q` must still mean nothing on stderr but errors."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}  # as a user runs it
    argv = ["sample", tiny_pipeline_dir, "-n", 2, "--steps", 2, "--compile", "--dtype", "bf16", "--device", "cpu",
            "-o", tmp_path / "out", "-q"]
    result = subprocess.run([sys.executable, "-m", "ddpm_cli", *map(str, argv)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert len(result.stdout.split()) == 2


def test_bench_measures_both_implementations_and_prints_json():
    result = ddpm("bench", "--train-batch", 8, "--train-steps", 2, "--sample-batch", 4, "--sample-steps", 2,
                  "--rounds", 3, "--device", "cpu", "--format", "json", "-q")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = {(r["task"], r["implementation"], r["precision"]): r for r in report["rows"]}
    assert set(rows) == {(task, impl, p) for task in ("train", "sample") for impl, p in
                         (("diffusers", "fp32"), ("ddpm", "fp32"), ("ddpm", "bf16"))}
    assert all(r["value"] > 0 and r["error"] is None for r in rows.values())
    # Every variant ran 3 interleaved rounds and reports its median one.
    assert report["rounds"] == 3 and all(len(r["per_round"]) == 3 for r in rows.values())
    assert all(abs(r["value"] - sorted(r["per_round"])[1]) <= 0.1 + 1e-3 * r["value"] for r in rows.values())
    baseline = rows[("sample", "diffusers", "fp32")]
    assert baseline["vs_diffusers_fp32"] == 1.0
    ours = rows[("sample", "ddpm", "fp32")]
    assert abs(ours["vs_diffusers_fp32"] - ours["value"] / baseline["value"]) < 0.01
    assert report["model"] == "tiny" and report["parameters"] > 0
    text = ddpm("bench", "--only", "sample", "--sample-batch", 2, "--sample-steps", 1, "--device", "cpu", "-q")
    assert text.returncode == 0 and "x diffusers fp32" in text.stdout and "train" not in text.stdout.split("\n", 2)[2]
    bad = ddpm("bench", "--only", "everything")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--only" in bad.stderr


def test_every_generating_command_offers_compile():
    for command in ("sample", "txt2img", "inpaint", "upscale"):
        result = ddpm(command, "--help")
        assert result.returncode == 0 and "--compile" in result.stdout, command


def test_bench_times_memory_layouts_side_by_side():
    result = ddpm("bench", "--only", "sample", "--layouts", "contiguous,channels_last", "--sample-batch", 2,
                  "--sample-steps", 1, "--rounds", 2, "--device", "cpu", "--format", "json", "-q")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    ours = [(r["precision"], "channels-last" in r["levers"]) for r in rows if r["implementation"] == "ddpm"]
    assert sorted(ours) == [("bf16", False), ("bf16", True), ("fp32", False), ("fp32", True)]
    assert all(r["value"] > 0 and len(r["per_round"]) == 2 for r in rows)
    for args in (["--layouts", "nchw"], ["--compile-modes", "default"], ["--compile", "--compile-modes", "fast"]):
        bad = ddpm("bench", *args)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, (args, bad.stderr)


def test_chosen_levers_set_the_layout_and_compile_mode_inside_the_block_only(monkeypatch):
    from ddpm_cli.engine import acceleration

    monkeypatch.delenv("DDPM_MEMORY_FORMAT", raising=False)
    monkeypatch.setenv("DDPM_COMPILE_MODE", "max-autotune")
    with acceleration.chosen_levers("channels_last", "default"):
        conv = acceleration.prepare_module(torch.nn.Conv2d(4, 8, 3))
        assert acceleration.compile_mode() is None
        with acceleration.chosen_levers(mode="max-autotune-no-cudagraphs"):
            assert acceleration.compile_mode() == "max-autotune-no-cudagraphs"
            assert acceleration.memory_format() == torch.channels_last
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert acceleration.memory_format() == torch.contiguous_format
    assert acceleration.compile_mode() == "max-autotune"


def _kernel_profile():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_profile.py"
    spec = importlib.util.spec_from_file_location("kernel_profile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_profile_sorts_kernels_by_kind_and_counts_the_work(tmp_path):
    """benchmarks/kernel_profile.py explains the GPU figures; its grouping of CUDA kernel names (as
    cuDNN, FlashAttention, cuBLAS, Triton and ATen name them) is checked here, and a CPU run of it."""
    profile = _kernel_profile()
    names = {
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw_tilesize128x128x64": "convolution",
        "sm90_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw": "convolution",
        "void nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, true, false>": "layout conversion",
        "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<256, 128, 64, 8>>": "attention",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)": "attention",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x128x64": "matrix product",
        "triton_red_fused_native_group_norm_silu_12": "fused (torch.compile)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel_cuda>": "pointwise",
        "void at::native::vectorized_elementwise_kernel<4, at::native::direct_copy_kernel_cuda>": "copies and layout",
        "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::BFloat16>": "normalisation",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>": "optimiser and EMA",
        "aten::mkldnn_convolution": "convolution",
    }
    assert {name: profile.kind(name) for name in names} == names
    out = tmp_path / "profile.json"
    result = subprocess.run([sys.executable, str(profile.__file__), "--device", "cpu", "--sample-batch", "2",
                             "--train-batch", "2", "--steps", "1", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    sample, train = json.loads(out.read_text())
    # The tiny U-Net: about 0.19 GFLOP per evaluation, nearly all of it convolution; a training
    # step (forward and backward) about 3 times that.
    per_image = sum(sample["flops"].values()) / sample["units"]
    assert 0.1e9 < per_image < 0.3e9 and sample["flops"]["convolution"] > 0.8 * per_image * sample["units"]
    assert 2.5 < sum(train["flops"].values()) / train["units"] / per_image < 3.5
    for task in (sample, train):
        assert task["wall_ms"] > 0 and task["busy_ms"] > 0 and task["kinds"]["convolution"]["ms"] > 0
        assert abs(sum(kind["ms"] for kind in task["kinds"].values()) - task["busy_ms"]) < 1e-6 * task["busy_ms"] + 1e-9
    assert "| convolution |" in result.stdout and "TFLOP/s" in result.stdout
