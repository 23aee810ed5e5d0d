"""The README's two commands stay real: CI runs the README's test command, and the main job's names exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


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
