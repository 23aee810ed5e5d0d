"""The README's serving section stays true: its start command serves what `mmedge demo` exports, and its curl command
and openai snippet, pointed at the test server (with its API key), print what mmedge.load answers in-process."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from mmedge import demo
from tests.support.serve import API_KEY, ROOT

README = (ROOT / "README.md").read_text()
SECTION = README[README.index("## Serving: `mmedge serve`"):README.index("## Per-device guide")]
BASH = re.findall(r"```bash\n(.*?)```", SECTION, flags=re.S)
PYTHON = re.findall(r"```python\n(.*?)```", SECTION, flags=re.S)


def test_start_command_serves_the_demo_exports():
    start = BASH[0].strip()
    assert '-e ".[export,serve]"' in start and "mmedge demo" in start
    served = re.findall(r"~/\.cache/mmedge/demo/(\S+)", start)
    assert served and set(served) <= {v.name for v in demo.variants()}


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_command(server, local):
    command = BASH[1].strip().replace("localhost:8000", server.url.removeprefix("http://"))
    command = command.replace("curl -s ", f"curl -s -H 'Authorization: Bearer {API_KEY}' ")
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    classified, end = json.JSONDecoder().raw_decode(out.stdout)
    answered = json.loads(out.stdout[end:])
    scene = str(demo.IMAGES_DIR / "scene-03.png")
    expected = [p["label"] for p in local("clip-fp32")(scene, top_k=2)]
    assert [p["label"] for p in classified["data"][0]["predictions"]] == expected
    assert answered["choices"][0]["message"]["content"] == local("blip2-fp32").ask(scene, "what shape is the red one?")


def test_openai_snippet(server, local):
    code = PYTHON[0].replace("http://127.0.0.1:8000/v1",
                             f"{server.url}/v1").replace('api_key="unused"', f'api_key="{API_KEY}"')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    caption = local("blip2-fp32").caption(str(demo.IMAGES_DIR / "scene-03.png"))
    assert out.stdout == f"{caption}\n{caption}"
