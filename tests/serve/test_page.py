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
    assert page.inner_text("#answer-info").startswith("caption: ")


def test_question_is_answered_as_in_process(page, local, scenes):
    """The answer says which question it answers: typing the next one leaves it shown, and still named."""
    scene = scenes[5]
    question = demo.truth()["images"][scene.name]["questions"][0]["question"]
    page.fill("#question", question)
    page.click("#ask-button")
    page.wait_for_selector("#answer[data-state=done]")
    assert page.inner_text("#answer") == local("blip2-fp32").ask(str(scene), question)
    page.fill("#question", "how many shapes are there?")
    assert page.inner_text("#answer-info").startswith(f'answer to "{question}": ')


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
    assert "the connection to the server was lost" in tab.inner_text("#caption-error")
    assert not tab.is_disabled("#caption-button")
    tab.unroute(chat)
    piece = 'data: {"choices": [{"index": 0, "delta": {"content": "a yellow"}, "finish_reason": null}]}\n\n'
    tab.route(chat, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=piece))
    tab.click("#caption-button")
    tab.wait_for_selector("#answer[data-state=error]")
    assert tab.inner_text("#answer") == "a yellow"
    assert "the answer stopped before the server ended it" in tab.inner_text("#caption-error")
    tab.unroute(chat)
    tab.route(chat, lambda route: route.fulfill(status=503, content_type="application/json",
                                                body='{"error": "overloaded"}'))
    tab.click("#caption-button")
    tab.wait_for_selector("#answer[data-state=error]")
    assert tab.inner_text("#caption-error") == "overloaded"
    tab.unroute(chat)
    tab.click("#caption-button")  # the page goes on: the next answer is the served one
    tab.wait_for_selector("#answer[data-state=done]")
    assert tab.inner_text("#answer") == local("blip2-fp32").caption(str(scene))
    assert tab.is_hidden("#caption-error")
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


# --- audit of the page's errors and inputs (2026-12-08) -----------------------------------------------------------
PIECE = 'data: {"choices": [{"index": 0, "delta": {"content": "a yellow"}, "finish_reason": null}]}\n\n'
CHAT, CLASSIFY = "**/v1/chat/completions", "**/v1/classify"


def in_view(tab, selector: str) -> bool:
    return tab.evaluate(f"""() => {{
        const box = document.querySelector({selector!r}).getBoundingClientRect();
        return box.height > 0 && box.top >= 0 && box.bottom <= window.innerHeight + 1;  // + sub-pixel layout
    }}""")


def test_each_panel_keeps_its_error_and_a_cut_answer_is_marked_partial(fresh):
    """One #error, after all panels, served both: Classify erased a cut stream's error, leaving a truncated caption
    that looked complete; on a phone the error was below the fold; a long word in it widened the page at 320 px; a 200
    HTML page from a proxy was called a cut connection."""
    tab = with_scene(fresh(width=320), demo.images()[5])
    tab.route(CHAT, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=PIECE))
    tab.click("#caption-button")
    tab.wait_for_selector("#answer[data-state=error]")
    assert tab.inner_text("#answer") == "a yellow" and tab.get_attribute("#answer", "data-partial") == "true"
    assert "only the beginning of the answer" in tab.inner_text("#answer-info")
    cut = tab.inner_text("#caption-error")
    assert "the answer stopped before the server ended it" in cut and in_view(tab, "#caption-error")
    tab.click("#classify-button")  # the other panel's request leaves this panel's error alone
    tab.wait_for_selector("#bars[data-state=done]")
    assert tab.inner_text("#caption-error") == cut and tab.get_attribute("#answer", "data-partial") == "true"
    word = "x" * 300
    tab.route(CLASSIFY, lambda route: route.fulfill(status=400, json={"error": {"message": f"bad {word}"}}))
    tab.click("#classify-button")
    tab.wait_for_selector("#bars[data-state=error]", state="attached")
    assert tab.inner_text("#classify-error") == f"bad {word}" and in_view(tab, "#classify-error")
    assert tab.inner_text("#caption-error") == cut
    assert tab.evaluate("document.documentElement.scrollWidth") <= 320  # the word wraps
    tab.unroute(CHAT)
    tab.route(CHAT, lambda route: route.fulfill(status=200, content_type="text/html", body="<html>502</html>"))
    tab.click("#caption-button")
    tab.wait_for_selector("#answer[data-state=error]")
    assert "the server answered with text/html instead of an event stream" in tab.inner_text("#caption-error")
    assert tab.inner_text("#classify-error") == f"bad {word}"  # each panel clears only its own


def test_the_key_form_takes_only_an_ascii_key_and_comes_back_on_any_failure(fresh, scenes):
    """A key such as 'ключ' made fetch() throw building its headers: 'connection lost', the form hidden for good and
    the key kept for the next load. Re-entering the key after a 401 reset both model choices."""
    tab = fresh(key="ключ")  # kept from an earlier page: dropped, the form asks for a key
    tab.wait_for_selector("#key-form", state="visible")
    assert tab.evaluate("document.activeElement.id") == "key"
    assert tab.evaluate("sessionStorage.getItem('mmedge-key')") is None
    assert tab.get_attribute("#status", "role") == "status" and tab.get_attribute("#bars", "aria-live") == "polite"
    tab.fill("#key", "ключ")
    tab.press("#key", "Enter")
    assert tab.is_visible("#key-form") and "ASCII" in tab.inner_text("#status")
    assert tab.evaluate("sessionStorage.getItem('mmedge-key')") is None
    tab.route("**/v1/models", lambda route: route.abort("connectionreset"))
    tab.fill("#key", API_KEY)
    tab.press("#key", "Enter")
    tab.wait_for_selector("#key-form", state="visible")  # the list failed: the form is back
    assert "the connection to the server was lost" in tab.inner_text("#error")
    tab.unroute("**/v1/models")
    tab.press("#key", "Enter")
    with_scene(tab, scenes[0], captioner="idefics-tiny")
    tab.select_option("#classifier", "clip-tiny")
    tab.evaluate("page.key = 'not-the-key'")
    tab.fill("#labels", "circle, square")
    tab.click("#classify-button")
    tab.wait_for_selector("#bars[data-state=error]", state="attached")
    assert "enter the right one in the API key box" in tab.inner_text("#classify-error")
    assert tab.is_visible("#key-form") and tab.evaluate("document.activeElement.id") == "key"
    tab.fill("#key", API_KEY)
    tab.press("#key", "Enter")
    tab.wait_for_selector("#key-form", state="hidden")  # at once, before the models are listed again with the key
    tab.wait_for_selector("#classify-error", state="hidden")  # the key is taken: cleared once they are
    assert tab.input_value("#captioner") == "idefics-tiny" and tab.input_value("#classifier") == "clip-tiny"
    assert tab.input_value("#labels") == "circle, square"


def test_results_and_errors_follow_the_inputs(fresh, scenes, tmp_path):
    """A new image, a cleared file or another model kept the last results; Ask with no question captioned; Enter
    that ends an IME composition asked; only the top 5 bars were shown, unsaid; a model no longer served was never
    listed again; errors named API fields (labels[i] counted after dropped empty entries)."""
    from PIL import Image

    tab = with_scene(fresh(), scenes[5])
    sent = []
    tab.on("request", lambda r: sent.append(r.url) if r.url.endswith("/v1/chat/completions") else None)
    assert tab.is_disabled("#ask-button")
    tab.fill("#question", "   ")
    assert tab.is_disabled("#ask-button")
    tab.fill("#question", "what color is the circle?")
    assert not tab.is_disabled("#ask-button")
    tab.evaluate("""document.getElementById("question")
        .dispatchEvent(new KeyboardEvent("keydown", {key: "Enter", isComposing: true}))""")
    tab.wait_for_timeout(200)
    assert sent == []
    tab.click("#caption-button")
    tab.wait_for_selector("#answer[data-state=done]")
    tab.select_option("#classifier", "clip-fp32")
    tab.click("#classify-button")
    tab.wait_for_selector("#bars[data-state=done]")
    assert tab.inner_text("#bars-info") == f"the top 5 of {len(demo.labels())} labels"
    tab.set_input_files("#file", str(scenes[0]))  # another image: the last one's results go
    tab.wait_for_selector(f"#preview[alt$='{scenes[0].name}']")
    assert tab.inner_text("#answer") == "" and tab.inner_text("#answer-info") == ""
    assert tab.locator("#bars .bar-row").count() == 0 and tab.inner_text("#bars-info") == ""
    tab.click("#classify-button")
    tab.wait_for_selector("#bars[data-state=done]")
    tab.select_option("#classifier", "clip-tiny")  # another model: the other model's bars go
    assert tab.locator("#bars .bar-row").count() == 0
    tab.fill("#labels", "circle, , square, circle")  # sent as labels[0..2]: the repeat is labels[2], typed 4th
    tab.click("#classify-button")
    tab.wait_for_selector("#bars[data-state=error]", state="attached")
    assert tab.inner_text("#classify-error").startswith("Label 4 'circle': field 'labels' holds duplicates")
    tab.fill("#labels", "circle, square, triangle")
    tab.click("#classify-button")
    tab.wait_for_selector("#bars[data-state=done]")
    assert tab.inner_text("#bars-info") == "all 3 labels"
    large = tmp_path / "large.png"  # over the server's --max-image-pixels 1,000,000
    Image.new("RGB", (1100, 1000), "white").save(large)
    tab.set_input_files("#file", str(large))
    tab.wait_for_selector("#preview[alt$='large.png']")
    tab.click("#caption-button")
    tab.wait_for_selector("#answer[data-state=error]")
    assert tab.inner_text("#caption-error").startswith("The image: field 'messages[0].content[0].image_url.url'")
    tab.set_input_files("#file", [])  # the file cleared: so is the image
    tab.wait_for_selector("#preview", state="hidden")
    assert tab.is_hidden("#caption-error")
    tab.click("#caption-button")
    assert tab.inner_text("#caption-error") == "pick an image first"
    tab.set_input_files("#file", str(scenes[0]))
    tab.wait_for_selector("#preview:not([hidden])")
    tab.evaluate("""() => {  // a model that was listed, then is no longer served
        const select = document.getElementById("captioner");
        select.append(new Option("gone", "gone"));
        select.value = "gone";
    }""")
    tab.click("#caption-button")
    tab.wait_for_selector("#answer[data-state=error]")
    assert "model 'gone' is not served here" in tab.inner_text("#caption-error")
    assert "the list of models was loaded again" in tab.inner_text("#caption-error")
    tab.wait_for_function("![...document.querySelectorAll('#captioner option')].some(o => o.value === 'gone')")


def test_only_a_file_that_reads_as_an_image_is_taken(fresh, scenes, tmp_path):
    """A text file named .png, an empty file and a dropped text file were taken as the image with a broken preview; a
    TIFF (which the server reads) showed a broken preview; of two files read at once the slower, earlier one won."""
    from PIL import Image

    tab = with_scene(fresh(), scenes[5])
    empty, text, tiff = tmp_path / "empty.png", tmp_path / "notes.png", tmp_path / "scene.tiff"
    empty.write_bytes(b"")
    text.write_text("not an image\n")
    Image.open(scenes[5]).save(tiff)
    tab.set_input_files("#file", str(empty))
    tab.wait_for_selector("#image-panel[data-image=refused]")
    assert "empty.png is empty" in tab.inner_text("#image-error") and tab.is_hidden("#preview")
    tab.set_input_files("#file", str(text))
    tab.wait_for_selector("#image-error:has-text('notes.png could not be read as an image')")
    assert tab.get_attribute("#image-panel", "data-image") == "refused"
    tab.click("#caption-button")
    assert tab.inner_text("#caption-error") == "pick an image first"
    tab.evaluate("""() => {
        const data = new DataTransfer();
        data.items.add(new File(["hello"], "notes.txt", {type: "text/plain"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
    }""")
    tab.wait_for_selector("#image-error:has-text('notes.txt is not an image (its type is text/plain)')")
    tab.set_input_files("#file", str(tiff))
    tab.wait_for_selector("#image-panel[data-image=ready]")
    assert tab.is_hidden("#preview") and tab.is_hidden("#image-error")
    assert "scene.tiff: no preview" in tab.inner_text("#image-note")
    tab.select_option("#classifier", "clip-fp32")
    tab.click("#classify-button")  # the server reads the TIFF
    tab.wait_for_selector("#bars[data-state=done]")
    tab.evaluate("""() => {  // the first read ends 400 ms late
        const read = FileReader.prototype.readAsDataURL;
        let calls = 0;
        FileReader.prototype.readAsDataURL = function (file) {
            setTimeout(() => read.call(this, file), calls++ === 0 ? 400 : 0);
        };
    }""")
    tab.set_input_files("#file", str(scenes[1]))
    tab.set_input_files("#file", str(scenes[2]))
    tab.wait_for_selector(f"#preview[alt$='{scenes[2].name}']")
    tab.wait_for_timeout(800)
    assert tab.get_attribute("#preview", "alt").endswith(scenes[2].name)
