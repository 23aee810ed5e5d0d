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
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def page(browser, server):
    tab = browser.new_page(viewport={"width": 1280, "height": 720})
    tab.set_default_timeout(60_000)
    tab.goto(server.url)
    yield tab
    tab.close()


@pytest.fixture
def fresh(browser, server):
    """A new tab of its own (its own session storage) that already holds ``key``: ``fresh(key=..., width=...)``;
    its console errors and page errors are in ``tab.problems``."""
    contexts = []

    def open_tab(key: str | None = API_KEY, width: int = 1280):
        context = browser.new_context(viewport={"width": width, "height": 720})
        contexts.append(context)
        if key is not None:
            context.add_init_script(f"sessionStorage.setItem('mmedge-key', {key!r})")
        tab = context.new_page()
        tab.set_default_timeout(60_000)
        tab.problems = []
        tab.on("console", lambda m: tab.problems.append(m.text) if m.type == "error" else None)
        tab.on("pageerror", lambda e: tab.problems.append(str(e)))
        tab.goto(server.url)
        return tab

    yield open_tab
    for context in contexts:
        context.close()


def with_scene(tab, scene: Path, captioner: str = "blip2-fp32"):
    """``tab`` with its models listed, ``scene`` uploaded and ``captioner`` chosen."""
    tab.wait_for_function("document.querySelectorAll('#captioner option').length > 0")
    tab.set_input_files("#file", str(scene))
    tab.wait_for_selector("#preview:not([hidden])")
    tab.select_option("#captioner", captioner)
    return tab


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


# --- what the page does when a request races, fails or cannot be sent (audit of 2026-12-07) -----------------------
def test_a_second_request_while_one_runs_is_not_sent(fresh, local, scenes):
    """Nothing stopped a second click (or Enter) while an answer streamed: both streams wrote into one answer
    ('a a yellow blue triangle square, ...', 'greengreen'). The panel's buttons are off until its answer ends."""
    scene = scenes[5]
    tab = with_scene(fresh(), scene)
    sent = []
    tab.on("request", lambda r: sent.append(r.url) if r.url.endswith("/v1/chat/completions") else None)
    disabled_while_running = tab.evaluate("""() => {
        const button = document.getElementById("caption-button");
        button.click();
        const disabled = button.disabled && document.getElementById("ask-button").disabled
            && document.getElementById("captioner").disabled;
        button.click();
        return disabled;
    }""")
    assert disabled_while_running
    tab.wait_for_selector("#answer[data-state=done]")
    assert tab.inner_text("#answer") == local("blip2-fp32").caption(str(scene))
    assert not tab.is_disabled("#caption-button")
    question = "what color is the circle?"
    tab.fill("#question", question)
    tab.evaluate("""() => {
        const box = document.getElementById("question");
        for (let i = 0; i < 2; i++) box.dispatchEvent(new KeyboardEvent("keydown", {key: "Enter"}));
    }""")
    tab.wait_for_selector("#answer[data-state=done]")
    assert tab.inner_text("#answer") == local("blip2-fp32").ask(str(scene), question)
    assert len(sent) == 2


def test_a_failed_request_ends_with_words_and_the_page_goes_on(fresh, local, scenes):
    """A lost connection left the cursor running with 'TypeError: Failed to fetch'; a stream cut short was shown as
    a finished answer; an error given as a string showed nothing; a failed Classify left the last answer's bars."""
    scene = scenes[5]
    tab = with_scene(fresh(), scene)
    chat = "**/v1/chat/completions"
    tab.route(chat, lambda route: route.abort("connectionreset"))
    tab.click("#caption-button")
    tab.wait_for_selector("#answer[data-state=error]")
    assert "the connection to the server was lost" in tab.inner_text("#error")
    assert not tab.is_disabled("#caption-button")
    tab.unroute(chat)
    piece = 'data: {"choices": [{"index": 0, "delta": {"content": "a yellow"}, "finish_reason": null}]}\n\n'
    tab.route(chat, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=piece))
    tab.click("#caption-button")
    tab.wait_for_selector("#answer[data-state=error]")
    assert tab.inner_text("#answer") == "a yellow"
    assert "the answer stopped before the server ended it" in tab.inner_text("#error")
    tab.unroute(chat)
    tab.route(chat, lambda route: route.fulfill(status=503, content_type="application/json",
                                                body='{"error": "overloaded"}'))
    tab.click("#caption-button")
    tab.wait_for_selector("#answer[data-state=error]")
    assert tab.inner_text("#error") == "overloaded"
    tab.unroute(chat)
    tab.click("#caption-button")  # the page goes on: the next answer is the served one
    tab.wait_for_selector("#answer[data-state=done]")
    assert tab.inner_text("#answer") == local("blip2-fp32").caption(str(scene))
    assert tab.is_hidden("#error")
    tab.select_option("#classifier", "clip-fp32")
    tab.click("#classify-button")
    tab.wait_for_selector("#bars[data-state=done]")
    assert tab.locator("#bars .bar-row").count() == 5
    tab.route("**/v1/classify", lambda route: route.abort("connectionreset"))
    tab.click("#classify-button")
    tab.wait_for_selector("#bars[data-state=error]", state="attached")
    assert tab.locator("#bars .bar-row").count() == 0 and not tab.is_disabled("#classify-button")


def test_a_refused_key_says_so_and_the_right_one_clears_it(fresh):
    """A wrong key hid the form and showed it again with 'this server needs an API key', as if none was given."""
    tab = fresh(key="not-the-key")
    tab.wait_for_selector("#key-form", state="visible")
    assert tab.inner_text("#status") == "the API key was refused: enter the right one"
    tab.fill("#key", API_KEY)
    tab.press("#key", "Enter")
    tab.wait_for_function("document.querySelectorAll('#captioner option').length === 2")
    assert tab.is_hidden("#key-form") and tab.is_hidden("#error")
    assert all("401" in problem for problem in tab.problems), tab.problems  # only the refused /v1/models is logged


def test_a_panel_without_a_served_model_is_off_and_says_why(fresh):
    """With only CLIP models served, Caption and Ask stayed live and answered "model '' is not served here"."""
    from playwright.sync_api import Route

    def clip_only(route: Route):
        listed = route.fetch().json()
        listed["data"] = [m for m in listed["data"] if m["id"].startswith("clip")]
        route.fulfill(json=listed)

    browser_tab = fresh()
    browser_tab.route("**/v1/models", clip_only)
    browser_tab.reload()
    browser_tab.wait_for_function("document.querySelectorAll('#classifier option').length === 2")
    assert browser_tab.is_disabled("#caption-button") and browser_tab.is_disabled("#ask-button")
    assert "no served model answers captions or questions" in browser_tab.inner_text("#caption-note")
    assert browser_tab.inner_text("#classify-note") == "" and not browser_tab.is_disabled("#classify-button")


def test_baked_labels_are_read_only_and_typed_labels_come_back(fresh, scenes):
    """Baked labels were editable (any edit got a 400); switching models overwrote what the user had typed."""
    tab = with_scene(fresh(), scenes[0])
    tab.select_option("#classifier", "clip-fp32")
    assert tab.evaluate("document.getElementById('labels').readOnly")
    assert tab.input_value("#labels") == ", ".join(demo.labels())
    assert "baked into this model's graph" in tab.inner_text("#labels-note")
    tab.select_option("#classifier", "clip-tiny")
    assert not tab.evaluate("document.getElementById('labels').readOnly") and tab.input_value("#labels") == ""
    tab.fill("#labels", "circle, square")
    tab.select_option("#classifier", "clip-fp32")
    tab.select_option("#classifier", "clip-tiny")
    assert tab.input_value("#labels") == "circle, square"


def test_a_phone_wide_page_needs_no_sideways_scrolling_and_logs_no_errors(fresh):
    tab = fresh(width=390)
    tab.wait_for_function("document.querySelectorAll('#captioner option').length === 2")
    assert tab.evaluate("document.documentElement.scrollWidth") <= 390
    assert tab.get_attribute("#question", "aria-label") and tab.get_attribute("#labels", "aria-label")
    assert tab.problems == []  # the favicon's 404 was logged on every load
