"""torch._dynamo deferred by the CLI (engine/runtime/lazy_dynamo.py): diffusers' decorators do not load it,
and anything that uses it gets the real package, with diffusers' registrations made, as if it had loaded
at once. Each check runs in a fresh interpreter (the test process has torch._dynamo loaded)."""

import json
import os
import subprocess
import sys

PREAMBLE = """
import json, sys
from ddpm_cli.engine.runtime import lazy_dynamo
lazy_dynamo.install()
import torch
from ddpm_cli.engine.models.classes import import_module, model_class
UNet2DModel = model_class("UNet2DModel")                         # as `ddpm sample` loads a model
group_offloading = import_module("diffusers.hooks.group_offloading")  # decorated with torch.compiler.disable
from diffusers.models.attention import BasicTransformerBlock     # decorated with torch._dynamo.allow_in_graph
before = {"deferred": lazy_dynamo.deferred(), "code_loaded": "torch._dynamo.eval_frame" in sys.modules}
"""


def fresh_python(code: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDPM_SERVER": "off"}
    done = subprocess.run([sys.executable, "-c", PREAMBLE + code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_compiling_loads_the_real_package_with_diffusers_registrations():
    result = fresh_python("""
def f(x):
    return torch.sin(x) + 1
compiled = torch.compile(f, backend="eager")
x = torch.linspace(0, 1, 5)
same = torch.equal(compiled(x), f(x))
import torch._dynamo as dynamo
from torch._dynamo import trace_rules
print(json.dumps({**before, "deferred_after": lazy_dynamo.deferred(), "same": bool(same),
                  "registered": id(BasicTransformerBlock) in trace_rules._allowed_callable_ids,
                  "one_package": dynamo is sys.modules["torch._dynamo"] and dynamo.eval_frame is sys.modules["torch._dynamo.eval_frame"]}))
""")
    assert result == {"deferred": True, "code_loaded": False, "deferred_after": False, "same": True,
                      "registered": True, "one_package": True}


def test_a_submodule_import_loads_the_package_first_and_each_module_once():
    result = fresh_python("""
import torch._dynamo.utils as utils_module      # as transformers' masking utilities import a submodule
from torch._dynamo.eval_frame import OptimizedModule
from torch._dynamo import trace_rules
print(json.dumps({**before, "deferred_after": lazy_dynamo.deferred(),
                  "same_module": utils_module is sys.modules["torch._dynamo.utils"] is torch._dynamo.utils,
                  "same_class": OptimizedModule is torch._dynamo.OptimizedModule,
                  "registered": id(BasicTransformerBlock) in trace_rules._allowed_callable_ids}))
""")
    assert result == {"deferred": True, "code_loaded": False, "deferred_after": False, "same_module": True,
                      "same_class": True, "registered": True}


def test_a_function_disabled_while_deferred_runs_eagerly_under_compile():
    result = fresh_python("""
calls = []
@torch.compiler.disable()
def side_effect(x):
    calls.append(torch.compiler.is_compiling())   # True only if dynamo traced into it
    return x * 2
early = side_effect(torch.ones(2)).tolist()      # before torch._dynamo has run
still_deferred = lazy_dynamo.deferred()
compiled = torch.compile(lambda x: side_effect(x) + 1, backend="eager")
late = compiled(torch.ones(2)).tolist()
print(json.dumps({**before, "still_deferred": still_deferred, "early": early, "late": late, "calls": calls}))
""")
    assert result["deferred"] and not result["code_loaded"] and result["still_deferred"]
    assert result["early"] == [2.0, 2.0] and result["late"] == [3.0, 3.0]
    assert result["calls"] == [False, False]  # run eagerly both times: the real disable wrapped it under compile
