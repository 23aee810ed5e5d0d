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


def test_main_job_uses_a_bundled_config_and_a_shipped_photo():
    from mmedge.export.loading import known_random_configs

    main_job = bash_blocks()[0].strip()
    assert "openai/clip-vit-base-patch32" in known_random_configs() and "--random-weights" in main_job
    photo = re.search(r"(export/data/images/\S+\.jpg)", main_job).group(1)
    assert (ROOT / photo).is_file()
