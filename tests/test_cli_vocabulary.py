"""One CLI vocabulary (docs/cli.md): old spellings still work, choices fail at parse time without
torch, options that do not apply are refused, output names never collide, and the help says what
the commands do."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from ddpm_cli import __version__
from ddpm_cli.engine.io.images import read_png_metadata
from tests.cli_runner import run_ddpm as ddpm


def in_fresh_process(*args: str, stdin: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    """`ddpm ARGS` in a new interpreter that reports, on its last stdout line, whether torch was imported."""
    code = ("import sys\nfrom ddpm_cli.cli.app import main\n"
            f"sys.argv = ['ddpm', *{list(args)!r}]\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\nelse:\n    code = 0\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\nsys.exit(code)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, input=stdin,
                          cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def one_error_line(result, code: int, pattern: str) -> None:
    import re

    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm: error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("args,pattern", [
    (["sample", "fashion-mnist", "--sampler", "eulr"], "'eulr' is not one of"),
    (["txt2img", "a cat", "--format", "jsn"], "'jsn' is not one of 'text', 'json'"),
    (["inpaint", "fashion-mnist", "--spacing", "even"], "'even' is not one of"),
    (["upscale", "m", "x.png", "--dtype", "fp64"], "'fp64' is not one of"),
    (["eval", "nll", "fashion-mnist", "--variance", "big"], "'big' is not one of"),
    (["bench", "--model-size", "huge"], "'huge' is not one of"),
    (["eval", "sweep", "m", "--metric", "lpips"], "'lpips' is not one of"),
])
def test_a_mistyped_choice_fails_while_parsing_before_torch_is_imported(args, pattern):
    result = in_fresh_process(*args)
    one_error_line(result, 2, pattern)
    assert result.stdout.split() == ["NO-TORCH"]


def test_version_and_models_list_without_torch():
    for flag in ("-V", "--version"):
        result = in_fresh_process(flag)
        assert result.returncode == 0 and result.stdout.split() == ["ddpm-cli", __version__, "NO-TORCH"]
    table = in_fresh_process("models")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["name", "source", "kind", "conditioning", "resolution", "size"]
    assert lines[-1] == "NO-TORCH"
    listed = json.loads(in_fresh_process("models", "--format", "json").stdout.rsplit("NO-TORCH", 1)[0])
    by_name = {row["name"]: row for row in listed}
    assert by_name["fashion-mnist"]["conditioning"] == "none" and by_name["fashion-mnist"]["resolution"] == "32x32"
    assert by_name["emoji"]["conditioning"] == "class (420)" and by_name["emoji"]["source"] == "built-in"
    assert 1_000_000 < by_name["fashion-mnist"]["bytes"] < 2_000_000


def test_models_lists_the_hub_cache(tiny_pipeline_dir, tmp_path):
    import shutil

    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_pipeline_dir, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    code = ("import json, sys\nfrom ddpm_cli.cli.models import list_models\n"
            "print(json.dumps(list_models()))\nprint('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")})
    rows, torch_imported = result.stdout.splitlines()
    row = {r["name"]: r for r in json.loads(rows)}["someone/tiny"]
    assert row["source"] == "hub cache" and row["kind"] == "pixel diffusion" and torch_imported == "False"


def test_sample_help_names_the_built_ins_and_states_the_rule():
    result = ddpm("sample", "--help")
    assert "fashion-mnist" in result.stdout and "emoji" in result.stdout
    assert "per prompt" not in result.stdout
    assert "never silently" in " ".join(result.stdout.split())
    assert "--outdir" not in result.stdout  # the old spelling works but is hidden


def test_help_slips():
    txt2img = " ".join(ddpm("txt2img", "--help").stdout.split())
    steps = txt2img[txt2img.index("--steps"):txt2img.index("--sampler")]
    assert steps.count("default") == 1, steps
    assert "Images per prompt" in txt2img
    for command in (["bench"], ["eval", "nll"], ["eval", "fid"], ["eval", "sweep"], ["models"]):
        text = " ".join(ddpm(*command, "--help").stdout.split())
        assert "one path per line" not in text, command
    nll = " ".join(ddpm("eval", "nll", "--help").stdout.split())
    dtype = nll[nll.index("--dtype"):]
    assert "auto: fp32" in dtype and "[default: auto]" in dtype


def test_outdir_and_other_old_spellings_still_work(tiny_pipeline_dir, tmp_path):
    result = ddpm("sample", tiny_pipeline_dir, "-n", 1, "--steps", 2, "--outdir", tmp_path / "old", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(tmp_path / "old" / "000000.png")]
    both = ddpm("sample", tiny_pipeline_dir, "-o", tmp_path / "a", "--outdir", tmp_path / "b")
    one_error_line(both, 2, "same option")
    images = ddpm("eval", "nll", tiny_pipeline_dir, "-n", 4, "--images", 4)
    one_error_line(images, 2, "-n/--num-images and --images are the same option")
    data = ddpm("eval", "sweep", tiny_pipeline_dir, "somewhere", "--data", "elsewhere")
    one_error_line(data, 2, "DATA and --data are the same option")


def test_txt2img_and_encode_take_model_first_or_by_the_old_m(tmp_path):
    from ddpm_cli.cli.encode import split_positionals as encode_args
    from ddpm_cli.cli.txt2img import split_positionals as txt2img_args

    assert txt2img_args(["a cat"], None, None) == ("emoji", "a cat")
    assert txt2img_args(["runs/emoji", "a cat"], None, None) == ("runs/emoji", "a cat")
    assert txt2img_args(["a cat"], "runs/emoji", None) == ("runs/emoji", "a cat")
    assert txt2img_args(["runs/emoji"], None, "prompts.txt") == ("runs/emoji", None)
    assert txt2img_args([], None, "prompts.txt") == ("emoji", None)
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    (tmp_path / "photos").mkdir()
    assert encode_args([str(vae), "a.png", "b.png"], None, False) == (str(vae), ["a.png", "b.png"])
    assert encode_args(["owner/sd-vae", "a.png"], None, False) == ("owner/sd-vae", ["a.png"])
    # without a MODEL that names a VAE: the built-in one, and every word is an input
    assert encode_args(["a.png", "b.png"], None, False) == ("emoji-vae", ["a.png", "b.png"])
    assert encode_args([str(tmp_path / "photos")], None, False) == ("emoji-vae", [str(tmp_path / "photos")])
    assert encode_args(["fashion-mnist", "a.png"], None, False) == ("emoji-vae", ["fashion-mnist", "a.png"])
    assert encode_args(["a.png", "b.png"], "vae", False) == ("vae", ["a.png", "b.png"])
    assert encode_args(["latents.safetensors"], None, True) == (None, ["latents.safetensors"])
    assert encode_args(["vae", "latents.safetensors"], None, True) == ("vae", ["latents.safetensors"])


def test_prompts_whose_slugs_collide_get_distinct_files(tmp_path):
    """'A Cat!' used to replace 'a cat', and '猫' '🐱' (all named prompt-000000.png)."""
    prompts = "a cat\nA Cat!\n🐱\n猫\n"
    result = in_fresh_process("txt2img", "--from-file", "-", "--steps", "2", "-o", str(tmp_path / "slug"), "-q",
                              stdin=prompts)
    assert result.returncode == 0, result.stderr
    paths = result.stdout.splitlines()[:-1]
    assert len(paths) == 4 == len(set(paths)) == len(list((tmp_path / "slug").iterdir()))
    assert [read_png_metadata(path)["prompt"] for path in paths] == prompts.splitlines()
    assert all(Image.open(path).size == (32, 32) for path in paths)


def test_file_stems_are_unique_and_plain_where_they_can_be():
    from ddpm_cli.cli.txt2img import file_stems

    stems = file_stems(["a cat", "A Cat!", "🐱", "猫", "red apple"])
    assert len(set(stems.values())) == 5
    assert stems["red apple"] == "red-apple"
    assert stems["a cat"].startswith("a-cat-") and stems["🐱"].startswith("prompt-")


def test_a_repeated_prompt_is_refused_in_one_line_before_any_work(tmp_path):
    result = in_fresh_process("txt2img", "--from-file", "-", "-o", str(tmp_path / "out"), stdin="a cat\n# note\na cat\n")
    one_error_line(result, 2, "lines 1 and 3 hold the same prompt 'a cat'")
    assert result.stdout.split() == ["NO-TORCH"] and not (tmp_path / "out").exists()


def test_two_jobs_with_one_file_are_refused_before_any_work(tmp_path):
    from typer import Exit

    from ddpm_cli.cli.render import Job, plan

    jobs = [Job(0, tmp_path / "x.png", params={"prompt": "a"}), Job(0, tmp_path / "x.png", params={"prompt": "b"})]
    with pytest.raises(Exit) as refused:
        plan(jobs, tmp_path / "out", False, False, False)
    assert refused.value.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_output_may_name_the_file_of_a_single_image(tiny_pipeline_dir, tmp_path):
    single = tmp_path / "single.png"
    result = ddpm("sample", tiny_pipeline_dir, "-n", 1, "--steps", 2, "-o", single, "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(single)] and single.is_file() and read_png_metadata(single)["seed"] == 0
    many = ddpm("sample", tiny_pipeline_dir, "-n", 2, "--steps", 2, "-o", tmp_path / "many.png")
    one_error_line(many, 2, "names one file but this run makes 2 images")
    grid = ddpm("sample", tiny_pipeline_dir, "-n", 1, "--grid", "-o", tmp_path / "grid.png")
    one_error_line(grid, 2, "names one file but this run makes --grid")
    assert not (tmp_path / "many.png").exists() and not (tmp_path / "grid.png").exists()
    again = ddpm("sample", tiny_pipeline_dir, "-n", 1, "--steps", 2, "-o", single)
    one_error_line(again, 2, "exists")


@pytest.mark.parametrize("args,pattern", [
    (["sample", "fashion-mnist", "--cfg", "3"], "--cfg guides towards --class"),
    (["sample", "fashion-mnist", "--class", "1", "--class", "2"], "--class takes one value, got 2"),
    (["inpaint", "fashion-mnist", "--image", "x.png", "--mask", "m.png", "--cfg", "3"],
     "--cfg guides towards --prompt or --class"),
    (["inpaint", "fashion-mnist", "--image", "x.png", "--mask", "m.png", "--negative-prompt", "dog"],
     "--negative-prompt goes with --prompt"),
    (["eval", "sweep", "fashion-mnist", "--metric", "fid", "--timesteps", "3"], "--timesteps does not apply to --metric fid"),
    (["eval", "sweep", "fashion-mnist", "--ref", "fashion-mnist"], "--ref does not apply to --metric nll"),
    (["eval", "fid", "{tmp}", "--ref", "fashion-mnist", "--steps", "3"], "--sampler and --steps apply to a MODEL"),
    (["encode", "--decode", "x.safetensors", "--channels", "1", "-o", "out"], "--channels applies to encoding"),
])
def test_options_that_do_not_apply_are_refused_before_the_model_loads(args, pattern, tmp_path):
    result = in_fresh_process(*[arg.format(tmp=tmp_path) for arg in args])
    one_error_line(result, 2, pattern)
    assert result.stdout.split() == ["NO-TORCH"]


def test_class_on_an_unconditional_model_is_refused(tiny_pipeline_dir, tmp_path):
    result = ddpm("sample", tiny_pipeline_dir, "--class", "1", "-o", tmp_path / "out")
    one_error_line(result, 2, "not class-conditional")
    assert not list((tmp_path / "out").glob("*.png"))


def test_a_local_looking_model_that_does_not_exist_is_no_such_folder(tmp_path):
    for model in ("./runs/nothere", "../nothere", str(tmp_path / "nothere"), "~/surely-not-here-ddpm"):
        result = ddpm("sample", model, "-o", tmp_path / "out")
        assert result.returncode == 3, result.stderr
        assert result.stderr.startswith(f"ddpm: error: no such folder: {model}") and "cache" not in result.stderr


def test_eval_nll_of_a_built_in_model_defaults_to_its_held_out_data():
    """The help promises the held-out split of the model's training data; the built-ins record theirs."""
    result = ddpm("eval", "nll", "fashion-mnist", "-n", 4, "--timesteps", 2, "--format", "json", "-q")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["data"] == "fashion-mnist (test split)" and document["images"] == 4
