"""Every example in README.md's "Commands" section runs as written, in order, in a fresh folder that
holds only the repository's examples/ (as a user's checkout does): no ./photos to bring, no model to
train first, no Hub download."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_runner import run_ddpm

ROOT = Path(__file__).resolve().parent.parent


def readme_examples(readme: Path = ROOT / "README.md") -> list[tuple[str, str]]:
    """(section heading, command) for each command line of the ```bash blocks under "## Commands"."""
    text = readme.read_text(encoding="utf-8")
    section = text.split("\n## Commands", 1)[1].split("\n## ", 1)[0]
    examples, heading = [], ""
    for part in re.split(r"(^### [^\n]*$|^```bash\n.*?^```$)", section, flags=re.M | re.S):
        if part.startswith("### "):
            heading = part[4:].strip()
        elif part.startswith("```bash"):
            body = part.split("\n", 1)[1].rsplit("```", 1)[0].replace("\\\n", " ")
            examples += [(heading, line.strip()) for line in body.splitlines() if line.strip() and not line.startswith("#")]
    return examples


def test_the_readme_has_an_example_for_every_command():
    covered = {command.split()[1] for _, command in readme_examples() if command.startswith("ddpm ")}
    from ddpm_cli.cli.app import app

    commands = {command.name for command in app.registered_commands} | {"eval"}
    assert commands <= covered, f"no README example for: {sorted(commands - covered)}"


@pytest.mark.slow
def test_every_readme_example_runs_as_written(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for heading, command in readme_examples():
        words = shlex.split(command, comments=True)
        if words[0] == "ddpm" and not set("|&;<>$`") & set(command.split("#")[0]):
            # a plain `ddpm ...`: run as that command, forked from the helper that has imported torch (cli_runner)
            result = run_ddpm(*words[1:], cwd=tmp_path, timeout=600)
        else:
            result = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{heading}: `{command}` exited {result.returncode}:\n{result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr, f"{heading}: `{command}`:\n{result.stderr[-2000:]}"
        words = command.split()
        for i, word in enumerate(words[:-1]):  # what -o names now exists
            if word in ("-o", "--output"):
                assert (tmp_path / words[i + 1]).exists(), f"{heading}: `{command}` wrote no {words[i + 1]}"
