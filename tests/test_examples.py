"""The examples run as documented."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def test_engine_example_writes_a_grid(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "grid.png"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "sample_with_the_engine.py"), str(tiny_pipeline_dir),
                             str(out), "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert Image.open(out).size == (4 * 16 + 3 * 2, 4 * 16 + 3 * 2)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = readme.split("<!-- test-command -->")[1].split("```bash")[1].split("```")[0].strip()
    assert command in (ROOT / ".ci" / "run").read_text()
