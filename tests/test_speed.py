"""The speed levers keep the results: bf16 against fp32, compiled against eager; and `ddpm bench`."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ddpm_cli.engine.tasks.generate import SamplerSettings, sample_batch
from ddpm_cli.engine.models.pipeline import load_pipeline
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


@pytest.mark.slow
def test_compiled_sampling_agrees_with_eager(tiny_pipeline_dir):
    settings = SamplerSettings("ddpm", 5)
    eager = sample_batch(load_pipeline(str(tiny_pipeline_dir), device="cpu", dtype="fp32"), SEEDS[:4], settings)
    pipeline = load_pipeline(str(tiny_pipeline_dir), device="cpu", dtype="fp32", compile=True)
    assert type(pipeline.forward).__name__ == "function"  # no CUDA graphs on the CPU
    compiled = sample_batch(pipeline, SEEDS[:4], settings)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)


@pytest.mark.slow
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
    for args in (["--layouts", "nchw"], ["--compile-modes", "default"], ["--compile", "--compile-modes", "fast"],
                 ["--layouts", "compiler_channels_last"]):
        bad = ddpm("bench", *args)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, (args, bad.stderr)


def test_bench_compiles_cpu_sampling_in_bf16_only_where_the_cpu_has_it(monkeypatch):
    """A CPU without AVX512-bf16 or AMX emulates bf16 many times slower than fp32: there the compiled
    sampling variant is fp32. Compiled training on a CPU is fp32 either way; on a GPU, both bf16."""
    import ddpm_cli.bench as bench

    def compiled(device: str, native: bool) -> dict[str, str]:
        monkeypatch.setattr(bench, "native_bf16", lambda device: native)
        return {v.task: v.precision for v in bench.variants(bench.Plan(compile=True), torch.device(device)) if v.compile}

    assert compiled("cpu", False) == {"train": "fp32", "sample": "fp32"}
    assert compiled("cpu", True) == {"train": "fp32", "sample": "bf16"}
    assert compiled("cuda", True) == {"train": "bf16", "sample": "bf16"}


def test_chosen_levers_set_the_layout_and_compile_mode_inside_the_block_only(monkeypatch):
    from ddpm_cli.engine.runtime import acceleration

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


def test_pinned_attention_backend_runs_that_kernel_only(unet, monkeypatch):
    """DDPM_ATTENTION pins one SDPA backend on every attention layer, eagerly and under torch.compile:
    math gives torch's own choice's values; the efficient backend, which a CPU lacks, is refused."""
    from diffusers.models.attention_processor import Attention

    from ddpm_cli.engine.runtime import acceleration
    from ddpm_cli.engine.runtime.attention import PinnedBackendProcessor, use_attention_backend

    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        expected = unet(x, t).sample
        monkeypatch.setenv("DDPM_ATTENTION", "math")
        acceleration.prepare_module(unet)
        processors = [m.processor for m in unet.modules() if isinstance(m, Attention)]
        assert processors and all(isinstance(p, PinnedBackendProcessor) and p.backend == "math" for p in processors)
        torch.testing.assert_close(unet(x, t).sample, expected, atol=1e-5, rtol=0)
        assert use_attention_backend(unet, "efficient") == len(processors)
        for run in (unet, torch.compile(unet, fullgraph=True, dynamic=False)):
            with pytest.raises(Exception, match="No viable backend for scaled_dot_product_attention"):
                run(x, t)
        use_attention_backend(unet, "auto")
        assert not any(isinstance(m.processor, PinnedBackendProcessor) for m in unet.modules() if isinstance(m, Attention))
        torch.testing.assert_close(unet(x, t).sample, expected, atol=0, rtol=0)


def test_attention_backend_choice_through_the_cli(tiny_pipeline_dir, tmp_path, monkeypatch):
    """`ddpm bench --attention-backends` times each kernel side by side (one a CPU lacks becomes a
    failed row); a bad or unusable DDPM_ATTENTION is one line on stderr and exit 2."""
    result = ddpm("bench", "--only", "sample", "--attention-backends", "auto,math,efficient", "--sample-batch", 2,
                  "--sample-steps", 1, "--rounds", 1, "--device", "cpu", "--format", "json", "-q")
    assert result.returncode == 0, result.stderr
    ours = {r["levers"]: r for r in json.loads(result.stdout)["rows"] if r["implementation"] == "ddpm" and r["precision"] == "fp32"}
    assert set(ours) == {"", "SDPA math", "SDPA efficient"}
    assert ours[""]["value"] > 0 and ours["SDPA math"]["value"] > 0
    assert "No viable backend" in ours["SDPA efficient"]["error"]
    for value, words in (("bogus", "unknown DDPM_ATTENTION='bogus'"), ("efficient", "no attention kernel of backend efficient")):
        out = tmp_path / value
        monkeypatch.setenv("DDPM_ATTENTION", value)
        bad = ddpm("sample", tiny_pipeline_dir, "-n", 1, "--steps", 2, "--device", "cpu", "-o", out)
        errors = [line for line in bad.stderr.splitlines() if line.startswith("ddpm: error:")]
        assert bad.returncode == 2 and len(errors) == 1 and words in errors[0], bad.stderr
        assert not any(out.glob("*.png"))
    monkeypatch.delenv("DDPM_ATTENTION")
    assert ddpm("bench", "--attention-backends", "sdpa").returncode == 2


def test_cuda_attention_kernel_refusal_is_one_usage_error_line(monkeypatch):
    """On CUDA, a pinned backend with no kernel for the inputs (flash in fp32) raises torch's "No
    available kernel"; it is the same exit-2 error as the CPU's "No viable backend"."""
    from ddpm_cli.cli.errors import EXIT_USAGE, _classify

    monkeypatch.setenv("DDPM_ATTENTION", "flash")
    for words in ("No available kernel. Aborting execution.", "No viable backend for scaled_dot_product_attention"):
        message, code = _classify(RuntimeError(f"wrapped: {words}"))
        assert code == EXIT_USAGE and message.startswith("no attention kernel of backend flash"), words
    assert _classify(RuntimeError("some other failure")) is None


def test_compiler_channels_last_forces_inductors_layout_choice_in_training(monkeypatch):
    """Inductor's own heuristics (reached on a CPU with oneDNN off) keep this net's graphs NCHW;
    DDPM_MEMORY_FORMAT=compiler_channels_last, the default, makes both training graphs (forward and
    backward) channels-last, with the same gradients, while weights and inputs stay contiguous."""
    from torch._inductor.graph import GraphLowering

    from ddpm_cli.engine.runtime import acceleration

    decisions = []
    decide = GraphLowering.decide_layout_opt

    def spy(gm, *, is_inference):
        decisions.append(decide(gm, is_inference=is_inference))
        return decisions[-1]
    monkeypatch.setattr(GraphLowering, "decide_layout_opt", staticmethod(spy))
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # a cached graph skips the decision
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    x = torch.randn(2, 3, 8, 8)

    def gradients(layout: str | None) -> tuple[list[bool], list[torch.Tensor]]:
        torch._dynamo.reset()
        decisions.clear()
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 3, 3, padding=1))
        if layout is None:
            run = net
        else:  # "default": neither chosen nor in the environment
            with acceleration.chosen_levers(layout=None if layout == "default" else layout):
                run = acceleration.compile_module(acceleration.prepare_module(net))
        run(x).square().mean().backward()
        assert all(p.is_contiguous() for p in net.parameters())
        return list(decisions), [p.grad for p in net.parameters()]

    eager = gradients(None)[1]
    monkeypatch.delenv("DDPM_MEMORY_FORMAT", raising=False)
    for layout, expected in (("contiguous", [False, False]), ("compiler_channels_last", [True, True]), ("default", [True, True])):
        chosen, grads = gradients(layout)
        assert chosen == expected, layout
        for got, want in zip(grads, eager):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    monkeypatch.setenv("DDPM_MEMORY_FORMAT", "nhwc")
    with pytest.raises(Exception, match="unknown DDPM_MEMORY_FORMAT='nhwc'"):
        acceleration.memory_format()


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
