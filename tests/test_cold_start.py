"""Cold start: a `ddpm sample` process imports what the command needs, not all of diffusers
(engine/models/classes.py; docs/performance.md has the timings). Each check runs in a fresh interpreter,
since the test process has imported everything already."""

import json
import os
import subprocess
import sys

# Imported by `from diffusers import UNet2DModel`, needed by no unconditional model: peft, scipy.stats
# (diffusers' schedulers and single-file loaders), every transformer model and U-Net of diffusers, and
# the hooks package's caches, torch._dynamo's code (engine/runtime/lazy_dynamo.py) and transformers (which
# diffusers' quantizers package imports; diffusers must still see that it is installed: checked below).
NOT_FOR_UNCONDITIONAL = ("peft", "scipy.stats", "diffusers.loaders.peft", "torch._dynamo.eval_frame", "sympy",
                         "transformers", "diffusers.quantizers.pipe_quant_config",
                         "diffusers.models.transformers.transformer_flux", "diffusers.models.unets.unet_2d_condition",
                         "diffusers.models.unets.unet_1d", "diffusers.hooks.first_block_cache")


def fresh_python(code: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDPM_SERVER": "off"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_sampling_an_unconditional_model_imports_only_what_it_needs(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    code = f"""
import json, sys
from ddpm_cli.cli.app import main
sys.argv = ["ddpm", "sample", {str(tiny_pipeline_dir)!r}, "-n", "2", "--steps", "2", "-o", {str(out)!r}, "--quiet"]
try:
    main()
except SystemExit as exc:
    code = exc.code
loaded = [m for m in {NOT_FOR_UNCONDITIONAL!r} if m in sys.modules]

# A diffusers laid out otherwise (here: without a package the lean import defers) falls back to the ordinary import.
from ddpm_cli.engine.models import classes
classes._ALL_OF_A_KIND = ("diffusers.models.no_such_package",)
conditional = classes.model_class("UNet2DConditionModel")
import diffusers
# The rest of diffusers stays whole in the same process: a LoRA file's loader is the real class, not a placeholder.
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import is_transformers_available
print(json.dumps({{"code": code, "loaded": loaded, "fallback": conditional is diffusers.UNet2DConditionModel,
                  "transformers": is_transformers_available(), "lora_loader": hasattr(StableDiffusionLoraLoaderMixin, "lora_state_dict")}}))
"""
    result = fresh_python(code)
    assert result == {"code": 0, "loaded": [], "fallback": True, "transformers": True, "lora_loader": True}
    assert sorted(path.name for path in out.iterdir()) == ["000000.png", "000001.png"]


def test_lean_classes_are_diffusers_own_and_the_rest_of_diffusers_still_imports():
    code = """
import json, sys
from ddpm_cli.engine.models.classes import model_class
unet = model_class("UNet2DModel")
vq = model_class("VQModel")
lean = [m for m in ("diffusers.models.unets.unet_2d_condition",) if m in sys.modules]
import diffusers
from diffusers.models.unets import UNet2DConditionModel  # the deferred package's own __init__ runs now
from diffusers.models.transformers import Transformer2DModel
from diffusers.hooks import apply_group_offloading
import diffusers.models.unets.unet_2d as unet_2d_module
conditional = model_class("UNet2DConditionModel")
print(json.dumps({
    "lean": lean,
    "same": [unet is diffusers.UNet2DModel, vq is diffusers.VQModel, unet is unet_2d_module.UNet2DModel,
             conditional is UNet2DConditionModel is diffusers.UNet2DConditionModel,
             Transformer2DModel is diffusers.Transformer2DModel, callable(apply_group_offloading)],
    "transformers": "transformers" in sys.modules,
}))
"""
    assert fresh_python(code) == {"lean": [], "same": [True] * 6, "transformers": True}


def test_txt2img_on_the_builtin_model_loads_its_prompt_encoder_without_transformers(tmp_path):
    """The built-in model's prompt prior encodes with MiniLM (a plain BERT: engine/models/text_bert.py), so
    `ddpm txt2img` needs neither transformers nor what its model code imports (torch._dynamo, scipy)."""
    out = tmp_path / "cat.png"
    code = f"""
import json, sys
from ddpm_cli.cli.app import main
sys.argv = ["ddpm", "txt2img", "a kitten", "-n", "1", "--steps", "2", "-o", {str(out)!r}, "--quiet"]
try:
    main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({{"code": code, "loaded": [m for m in {NOT_FOR_UNCONDITIONAL!r} if m in sys.modules],
                  "encoder": "tokenizers" in sys.modules}}))
"""
    result = fresh_python(code)
    assert result == {"code": 0, "loaded": [], "encoder": True}
    from PIL import Image

    assert json.loads(Image.open(out).info["ddpm"])["class_name"] == "cat"  # "a kitten" is no class name: the prior encoded it
