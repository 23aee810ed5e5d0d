"""The web page in a real browser: Debian's chromium, driven by Playwright (never `playwright install`: nothing is
downloaded at test time). It enters the API key, uploads a bundled scene, reads the caption as it streams in, asks a
question, reads the zero-shot bars, and leaves a screenshot in tests/out/ for people to look at."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmedge import demo
from tests.support.serve import API_KEY, ROOT

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
SCREENSHOT = ROOT / "tests" / "out" / "serve-page.png"
COUNT_PIECES = """() => {
    window.pieces = 0;
    new MutationObserver((records) => { window.pieces += records.length; })
        .observe(document.getElementById("answer"), {childList: true, characterData: true, subtree: true});
}"""

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(),
                                reason="Debian's chromium is not installed at /usr/bin/chromium "
                                                               "(.ci/run installs it: apt-get install chromium)")


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        tab = browser.new_page(viewport={"width": 1280, "height": 720})
        tab.set_default_timeout(60_000)
        tab.goto(server.url)
        yield tab
        browser.close()


def test_page_asks_for_the_key_then_lists_the_models(page):
    page.wait_for_selector("#key-form", state="visible")  # /v1/models answered 401: the page asks for the key
    page.fill("#key", API_KEY)
    page.click("#key-form button")
    page.wait_for_function("document.querySelectorAll('#captioner option').length === 2")
    assert page.eval_on_selector_all("#captioner option", "o => o.map(x => x.value)") == ["blip2-fp32", "idefics-tiny"]
    assert page.eval_on_selector_all("#classifier option", "o => o.map(x => x.value)") == ["clip-fp32", "clip-tiny"]
    assert page.input_value("#labels") == ", ".join(demo.labels())  # the demo CLIP's baked labels


def test_caption_streams_in_and_equals_in_process(page, local, scenes):
    scene = scenes[5]  # three shapes: the longest caption
    page.set_input_files("#file", str(scene))
    page.wait_for_selector("#preview:not([hidden])")
    page.select_option("#captioner", "blip2-fp32")
    page.evaluate(COUNT_PIECES)
    page.click("#caption-button")
    page.wait_for_selector("#answer[data-state=done]")
    pieces = list(local("blip2-fp32").stream(str(scene)))
    assert page.inner_text("#answer") == "".join(pieces)
    assert page.evaluate("window.pieces") == len(pieces) > 1  # the text arrived piece by piece
    assert "tokens" in page.inner_text("#answer-info")


def test_question_is_answered_as_in_process(page, local, scenes):
    scene = scenes[5]
    question = demo.truth()["images"][scene.name]["questions"][0]["question"]
    page.fill("#question", question)
    page.click("#ask-button")
    page.wait_for_selector("#answer[data-state=done]")
    assert page.inner_text("#answer") == local("blip2-fp32").ask(str(scene), question)


def bars(page, model: str, labels: str | None = None) -> list:
    """Classify the uploaded image with ``model`` (and typed ``labels``); the bars as [label, exact score]."""
    page.select_option("#classifier", model)
    if labels is not None:
        page.fill("#labels", labels)
    page.click("#classify-button")
    page.wait_for_selector("#bars[data-state=done]")
    return page.eval_on_selector_all("#bars .bar-row",
                                     "rows => rows.map(r => [r.dataset.label, Number(r.dataset.score)])")


def test_zero_shot_bars_equal_in_process(page, local, scenes):
    shown = bars(page, "clip-fp32")  # the demo CLIP's baked labels, as the page filled them in
    expected = local("clip-fp32")(str(scenes[5]), top_k=5)
    assert [label for label, _ in shown] == [p["label"] for p in expected]
    assert all(abs(score - p["score"]) <= 1e-6 for (_, score), p in zip(shown, expected))
    widths = page.eval_on_selector_all("#bars .bar span", "s => s.map(x => x.style.width)")
    assert widths[0] == f"{expected[0]['score'] * 100:.1f}%"


def test_typed_labels_and_the_screenshot(page, local, scenes):
    typed = ["circle", "square", "triangle"]
    shown = bars(page, "clip-tiny", ", ".join(typed))
    assert [label for label, _ in shown] == [p["label"] for p in local("clip-tiny")(str(scenes[5]), labels=typed)]
    bars(page, "clip-fp32")  # the demo's bars in the picture
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000


def test_an_empty_answer_says_why(page, local, scenes):
    """The demo BLIP-2 ends its answer to "who are you" with its first token (end-of-text ahead by 1.6 logits, as in
    transformers): the page says so instead of showing a blank answer alone; an answer with text gets no such note."""
    scene, question = scenes[0], "who are you"
    assert local("blip2-fp32").ask(str(scene), question) == ""
    page.set_input_files("#file", str(scene))
    page.wait_for_selector("#preview:not([hidden])")
    page.select_option("#captioner", "blip2-fp32")
    page.fill("#question", question)
    page.click("#ask-button")
    page.wait_for_selector("#answer[data-state=done]")
    assert page.inner_text("#answer") == ""
    assert "The answer is empty: the model ended it before any text" in page.inner_text("#answer-info")
    page.fill("#question", "what color is the circle?")
    page.click("#ask-button")
    page.wait_for_function("document.getElementById('answer').dataset.state === 'done'"
                           " && document.getElementById('answer').textContent !== ''")
    assert "empty" not in page.inner_text("#answer-info")
