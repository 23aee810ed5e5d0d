"""The README stays real: CI runs its test command, the main job's names exist, and its Python snippets on the
demo's artifacts run as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = next(line for block in bash_blocks() for line in block.splitlines() if "pytest" in line)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command.strip() in ci


def test_main_job_is_install_then_demo():
    """The first command installs with the exporter and runs `mmedge demo`, which needs nothing but the package."""
    main_job = bash_blocks()[0].strip()
    assert 'pip install -c constraints-cpu.txt -e ".[export]"' in main_job
    assert main_job.endswith("&& mmedge demo")


def test_full_size_example_uses_a_bundled_config_and_a_shipped_photo():
    from mmedge.export.loading import known_random_configs

    block = next(b for b in bash_blocks() if "--random-weights" in b and "mmedge run" in b)
    assert "openai/clip-vit-base-patch32" in known_random_configs() and "openai/clip-vit-base-patch32" in block
    photo = re.search(r"(export/data/images/\S+\.jpg)", block).group(1)
    assert (ROOT / photo).is_file()


def test_readme_states_the_demo_models_measured_scores():
    """The README's demo-model table quotes the scores and training time the model cards recorded."""
    import json

    readme = (ROOT / "README.md").read_text()
    models = ROOT / "mmedge" / "demo" / "models"
    clip = json.loads((models / "clip" / "training.json").read_text())
    blip2 = json.loads((models / "blip2" / "training.json").read_text())
    assert f"zero-shot top-1 {clip['test_split']['zero_shot_top1']:.1%}" in readme
    assert f"exact captions {blip2['test_split']['caption_exact']:.1%}" in readme
    assert f"colour/shape answers {blip2['test_split']['vqa_color_shape']:.1%}" in readme
    assert f"{clip['training']['both_models_train_seconds'] / 60:.1f} min" in readme
    assert f"{clip['parameters'] / 1e6:.2f} M" in readme and f"{blip2['parameters'] / 1e6:.2f} M" in readme
    assert not re.search(r"\b[A-Z0-9]+_(PARAMS|SCORES|TOTAL|TIME|OUTPUT)\b", readme), "an unfilled placeholder"


def test_python_snippets_on_the_demo_artifacts_run_as_written(demo_run, tmp_path):
    """The README's first Python snippet uses what `mmedge demo` made (its two-graph CLIP too: labels= and
    task="embed"); every snippet that does runs, unchanged, against a demo cache."""
    runnable = [block for block in python_blocks() if "mmedge.demo" in block or "from mmedge import demo" in block]
    assert runnable and runnable[0] == python_blocks()[0]
    assert 'task="embed"' in runnable[0] and "labels=" in runnable[0]
    env = {**os.environ, "MMEDGE_CACHE": str(demo_run[0].parent)}
    for block in runnable:
        result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert result.returncode == 0, block + result.stderr[-2000:]


def test_examples_write_their_artifacts_where_git_ignores_them():
    """The examples' default output folder (artifacts/ in the checkout) is ignored, so running them leaves no
    untracked files."""
    import pytest

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for name in ("zero_shot.py", "caption.py", "few_shot.py"):
        assert 'default="artifacts/' in (ROOT / "examples" / name).read_text(), name
    for path in ("artifacts/zero-shot/manifest.json", "examples/artifacts/caption/decoder.onnx.data"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path
