"""Shell completions: the shipped scripts match the app, and completing never imports torch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_completion(env_extra: dict) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom ddpm_cli.cli.app import main\nsys.argv = ['ddpm']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('TORCH-IMPORTED' if 'torch' in sys.modules else 'NO-TORCH')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env_extra})


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shipped_completion_scripts_are_in_sync(shell):
    result = run_completion({"_DDPM_COMPLETE": f"source_{shell}"})
    generated = result.stdout.rsplit("NO-TORCH", 1)[0]
    assert generated.strip() == (ROOT / "completions" / f"ddpm.{shell}").read_text().strip(), (
        f"regenerate: _DDPM_COMPLETE=source_{shell} ddpm > completions/ddpm.{shell}")


def test_completing_offers_choices_without_importing_torch():
    result = run_completion({"_DDPM_COMPLETE": "complete_bash", "COMP_WORDS": "ddpm sample x --sampler dd",
                             "COMP_CWORD": "4"})
    assert result.stdout.split() == ["ddpm", "ddim", "NO-TORCH"]
    commands = run_completion({"_DDPM_COMPLETE": "complete_bash", "COMP_WORDS": "ddpm s", "COMP_CWORD": "1"})
    assert commands.stdout.split() == ["sample", "serve", "NO-TORCH"]


def test_every_sampler_and_noise_schedule_is_offered():
    from ddpm_cli.engine.choices import SAMPLERS

    samplers = run_completion({"_DDPM_COMPLETE": "complete_bash", "COMP_WORDS": "ddpm sample x --sampler ",
                               "COMP_CWORD": "4"})
    assert samplers.stdout.split() == [*SAMPLERS, "NO-TORCH"] and "dpmpp-3m-sde" in SAMPLERS
    sigmas = run_completion({"_DDPM_COMPLETE": "complete_bash", "COMP_WORDS": "ddpm txt2img x --sigmas k",
                             "COMP_CWORD": "4"})
    assert sigmas.stdout.split() == ["karras", "NO-TORCH"]
