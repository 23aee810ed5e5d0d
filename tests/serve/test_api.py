"""`mmedge serve` through real clients (the openai package, raw HTTP): served answers equal in-process ``mmedge.load``
answers on the demo models (captions token-identical, zero-shot probabilities within 1e-6), embeddings, interleaved
IDEFICS prompts, /v1/models, /health, /metrics."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mmedge import demo
from tests.support.serve import data_uri

QUESTION_SCENES = 3


def image_message(*parts) -> list[dict]:
    """One user message: paths become image_url parts (data URIs), strings text parts."""
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image_url",
                                                                       "image_url": {"url": data_uri(p)}}
               for p in parts]
    return [{"role": "user", "content": content}]


def test_health_needs_no_key(server):
    answer = httpx.get(f"{server.url}/health")
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok", "models": ["clip-fp32", "blip2-fp32", "clip-tiny", "idefics-tiny"]}


def test_models_list_family_tasks_precision_and_plan(openai_client, local):
    models = {m.id: m.model_dump() for m in openai_client.models.list()}
    assert list(models) == ["clip-fp32", "blip2-fp32", "clip-tiny", "idefics-tiny"]
    blip2, clip = models["blip2-fp32"], models["clip-fp32"]
    assert blip2["family"] == "blip2" and blip2["tasks"] == ["caption", "vqa"] and blip2["workers"] == 2
    assert blip2["precision"] == {"prefix": "fp32", "decoder": "fp32"}
    # the plan ``mmedge.load`` makes on this CPU (OpenVINO takes an FP32 decoder where the CPU has VNNI)
    expected = {name: c.backend for name, c in local("blip2-fp32").plan.components.items()}
    assert {name: c["backend"] for name, c in blip2["plan"].items()} == expected
    assert set(expected.values()) <= {"onnxruntime", "openvino"}
    assert blip2["endpoints"] == ["/v1/chat/completions"] and clip["endpoints"] == ["/v1/classify"]
    assert clip["labels"] == demo.labels()  # baked into the graph
    assert models["clip-tiny"]["endpoints"] == ["/v1/classify",
                                                "/v1/embeddings"] and "labels" not in models["clip-tiny"]
    assert models["idefics-tiny"]["family"] == "idefics"
    # a local checkpoint by its folder's name: the export host's absolute path is not the clients' business
    assert blip2["source"] == "blip2" and not any(Path(m["source"]).is_absolute() for m in models.values())


def test_retrieve_a_model_through_the_openai_client(openai_client, http):
    """GET /v1/models/{id}: the entry /v1/models lists; OpenAI's 404 model_not_found for an id not served."""
    import openai

    listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    for model_id in ("blip2-fp32", "clip-tiny"):
        assert openai_client.models.retrieve(model_id).model_dump(exclude_none=True) == listed[model_id]
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.models.retrieve("gpt-4o")
    error = info.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model", error
    assert "model 'gpt-4o' is not served here" in error["message"] and "clip-tiny" in error["message"]
    assert http.get("/v1/models/clip-fp32").json() == listed["clip-fp32"]


def test_data_uris_as_browsers_and_base64_tools_write_them(http, scenes):
    """Line-wrapped base64 (GNU base64 without -w0, base64.encodebytes), FileReader's application/octet-stream for a
    file of unknown type, and the media type and 'base64' in any case (RFC 2397) give the same embedding."""
    data = scenes[0].read_bytes()

    def embedding(uri: str) -> list[float]:
        answer = http.post("/v1/embeddings", json={"model": "clip-tiny", "images": [uri]})
        assert answer.status_code == 200, answer.text
        return answer.json()["data"][0]["embedding"]

    plain = embedding("data:image/png;base64," + base64.b64encode(data).decode())
    for uri in ("data:image/png;base64," + base64.encodebytes(data).decode(),  # 76 characters a line
                "data:image/png;base64,\r\n" + "\r\n".join(base64.b64encode(data).decode()[i:i + 64]
                                                           for i in range(0, len(data) * 4 // 3, 64)),
                "data:application/octet-stream;base64," + base64.b64encode(data).decode(),
                "DATA:IMAGE/PNG;BASE64," + base64.b64encode(data).decode()):
        assert embedding(uri) == plain


def test_captions_equal_in_process(openai_client, local, scenes):
    captioner = local("blip2-fp32")
    for scene in scenes:
        answer = openai_client.chat.completions.create(model="blip2-fp32", messages=image_message(scene))
        assert answer.choices[0].message.content == captioner.caption(str(scene))
        assert answer.choices[0].finish_reason == "stop" and answer.object == "chat.completion"
        usage = answer.usage
        assert usage.prompt_tokens == 8 + 1  # 8 query tokens + BOS
        assert 0 < usage.completion_tokens < 24 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_captions_arrive_piece_by_piece_as_in_process(openai_client, local, scenes):
    captioner = local("blip2-fp32")
    for scene in scenes:
        chunks = list(openai_client.chat.completions.create(model="blip2-fp32", messages=image_message(scene),
                                                            stream=True,
                                                            stream_options={"include_usage": True}))
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert pieces == list(captioner.stream(str(scene)))  # the same pieces, token by token
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
        assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_usage_counts_the_tokens_generated_and_the_finish_reason_is_how_generation_ended(openai_client, local, scenes):
    """At temperature 2 the demo BLIP-2 writes byte-level tokens that its tokenizer reads back as other, more tokens:
    usage must count what the model generated (never more than max_tokens), as the in-process stream does."""
    captioner, scene = local("blip2-fp32"), str(scenes[3])
    seen = set()
    for seed, max_tokens in ((2, 5), (3, 5), (2, 24), (3, 24)):
        answer = openai_client.chat.completions.create(model="blip2-fp32", messages=image_message(scenes[3]),
                                                       temperature=2, max_tokens=max_tokens, seed=seed)
        local_answer = captioner.stream(scene, max_new_tokens=max_tokens, do_sample=True, temperature=2.0, top_p=1.0,
                                        top_k=0, seed=seed)
        assert answer.choices[0].message.content == "".join(local_answer)
        assert answer.usage.completion_tokens == local_answer.tokens <= max_tokens
        assert answer.choices[0].finish_reason == local_answer.finish_reason
        seen.add(local_answer.finish_reason)
    assert seen == {"stop", "length"}


def test_questions_equal_in_process(openai_client, local, scenes):
    captioner = local("blip2-fp32")
    for scene in scenes[:QUESTION_SCENES]:
        for question in demo.truth()["images"][scene.name]["questions"]:
            text = question["question"]
            answer = openai_client.chat.completions.create(model="blip2-fp32", messages=image_message(scene, text))
            assert answer.choices[0].message.content == captioner.ask(str(scene), text)


def test_generation_settings_reach_the_captioner(openai_client, local, scenes):
    captioner, scene = local("blip2-fp32"), str(scenes[1])

    def served(messages=image_message(scenes[1]), **settings):
        answer = openai_client.chat.completions.create(model="blip2-fp32", messages=messages, **settings)
        return answer.choices[0].message.content, answer.choices[0].finish_reason

    assert served(max_tokens=2) == (captioner.caption(scene, max_new_tokens=2), "length")
    assert served(max_tokens=2, max_completion_tokens=2) == served(max_tokens=2)  # the same value twice
    sampled = captioner.caption(scene, do_sample=True, temperature=1.5, top_p=0.9, top_k=0, seed=7)
    assert served(temperature=1.5, top_p=0.9, seed=7) == (sampled, "stop")
    assert served(temperature=0, stop=[" and"])[0] == captioner.caption(scene, stop_strings=[" and"]) == "a blue cross"
    # OpenAI takes a seed at any temperature; a greedy answer draws nothing, so the seed is not passed on (the
    # captioner itself refuses a seed without sampling)
    assert served(temperature=0, seed=3) == served(seed=3) == (captioner.caption(scene), "stop")
    # OpenAI answers greedily at top_p 0 and (near) temperature 0, and takes any int64 seed: all were 400s here
    assert served(top_p=0) == served(temperature=1e-39) == (captioner.caption(scene), "stop")
    negative = captioner.caption(scene, do_sample=True, temperature=1.5, top_p=0.9, top_k=0, seed=(-7) % (1 << 64))
    assert served(temperature=1.5, top_p=0.9, seed=-7) == (negative, "stop")
    beams = captioner.caption(scene, num_beams=3, min_new_tokens=3)
    assert served(extra_body={"num_beams": 3, "min_tokens": 3})[0] == beams
    continued = captioner.caption(scene, "a blue")
    assert served(messages=image_message(scenes[1], "a blue"), extra_body={"prompt_mode": "continue"})[0] == continued


def test_a_message_name_is_taken_and_changes_nothing(openai_client, local, scenes):
    """OpenAI's participant ``name``, which chat frameworks send with multi-agent turns, is taken (refusing it would
    refuse their requests) and, like the roles, is no part of the prompt: the answer is the one without it."""
    messages = [{**image_message(scenes[1])[0], "name": "alice"}]
    answer = openai_client.chat.completions.create(model="blip2-fp32", messages=messages)
    assert answer.choices[0].message.content == local("blip2-fp32").caption(str(scenes[1]))


def test_image_earlier_in_the_conversation(openai_client, local, scenes):
    """Multi-turn: the image of the first user message, the question of the last."""
    messages = [{"role": "system", "content": "You describe shapes."},
                *image_message(scenes[3], "what shape is the red one?"),
                {"role": "assistant", "content": "triangle"}, {"role": "user", "content": "what color is the circle?"}]
    answer = openai_client.chat.completions.create(model="blip2-fp32", messages=messages)
    assert answer.choices[0].message.content == local("blip2-fp32").ask(str(scenes[3]), "what color is the circle?")


def test_zero_shot_probabilities_equal_in_process(http, local, scenes):
    classifier = local("clip-fp32")
    for batch in (scenes[:4], scenes[4:]):
        answer = http.post("/v1/classify", json={"model": "clip-fp32", "images": [data_uri(p) for p in batch]})
        assert answer.status_code == 200, answer.text
        expected = classifier.probabilities([str(p) for p in batch])  # [images, labels]
        for row, entry in zip(expected, answer.json()["data"]):
            scores = {p["label"]: p["score"] for p in entry["predictions"]}
            assert [p["score"] for p in entry["predictions"]] == sorted(scores.values(), reverse=True)
            assert np.allclose([scores[label] for label in classifier.baked_labels], row, atol=1e-6, rtol=0)


def test_labels_and_templates_at_run_time(http, local, photos):
    request = {"model": "clip-tiny", "images": [data_uri(photos[0])], "labels": ["cat", "dog", "rocket"],
               "templates": ["a photo of a {}.", "a drawing of a {}."], "top_k": 2}
    answer = http.post("/v1/classify", json=request).json()
    expected = local("clip-tiny")(photos[0], labels=request["labels"], templates=request["templates"], top_k=2)
    got = answer["data"][0]["predictions"]
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    assert np.allclose([p["score"] for p in got], [p["score"] for p in expected], atol=1e-6, rtol=0)


def test_embeddings_through_the_openai_client(openai_client, http, local, photos):
    embedder = local("clip-tiny", "embed")
    texts = ["a photo of a cat", "a rocket"]
    answer = openai_client.embeddings.create(model="clip-tiny", input=texts,
                                             extra_body={"images": [data_uri(photos[0])]})
    vectors = np.array([d.embedding for d in answer.data])  # [texts + images, dim]; the client asked for base64
    expected = np.concatenate([embedder.embed_texts(texts), embedder.embed_images(photos[0])])
    assert np.allclose(vectors, expected, atol=1e-6, rtol=0)
    assert answer.usage.prompt_tokens == int(embedder.tokenizer.encode(texts)[1].sum())
    floats = http.post("/v1/embeddings",
                       json={"model": "clip-tiny", "input": "a rocket", "encoding_format": "float"}).json()
    assert np.allclose(floats["data"][0]["embedding"], expected[1], atol=1e-6, rtol=0)
    raw = http.post("/v1/embeddings",
                    json={"model": "clip-tiny", "input": ["a rocket"], "encoding_format": "base64"}).json()
    assert np.array_equal(np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4"),
                          np.float32(floats["data"][0]["embedding"]))


def test_interleaved_prompt_on_idefics(openai_client, local, scenes):
    """Images and texts of every message, in order, form one prompt for a Flamingo-style model."""
    flamingo = local("idefics-tiny")
    messages = image_message(scenes[0], "An image of a circle.", scenes[2], "An image of")
    answer = openai_client.chat.completions.create(model="idefics-tiny", messages=messages, max_tokens=6)
    prompt = [scenes[0].read_bytes(), "An image of a circle.", scenes[2].read_bytes(), "An image of"]
    assert answer.choices[0].message.content == flamingo.generate(prompt, max_new_tokens=6)
    streamed = openai_client.chat.completions.create(model="idefics-tiny", messages=messages, max_tokens=6, stream=True)
    pieces = [c.choices[0].delta.content for c in streamed if c.choices and c.choices[0].delta.content]
    assert pieces == list(flamingo.stream(prompt, max_new_tokens=6))


def test_image_file_inside_the_allowed_folder(http, local, scenes):
    """--allow-images-from DIR lets a request name an image file in DIR (a file:// URL or a path); a file URL's
    percent-escapes are decoded (``Path.as_uri`` writes them for spaces), its scheme read in any case, and
    ``localhost`` is this host. OpenAI's ``detail`` "low" is what the model reads anyway."""
    captioner = local("blip2-fp32")
    escaped = scenes[2].as_uri().replace("-", "%2D")
    assert "%2D" in escaped
    for url, detail in ((f"file://{scenes[2]}", None), (str(scenes[2]), "auto"), (escaped, "low"),
                        (f"FILE://localhost{scenes[2]}", None)):
        image = {"url": url, **({"detail": detail} if detail else {})}
        request = {"model": "blip2-fp32",
                   "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": image}]}]}
        answer = http.post("/v1/chat/completions", json=request)
        assert answer.json()["choices"][0]["message"]["content"] == captioner.caption(str(scenes[2]))


def test_raw_sse_stream_is_openai_chunks(http, scenes):
    """What curl -N shows: `data: {json}` events, then `data: [DONE]`."""
    request = {"model": "blip2-fp32", "stream": True, "messages": image_message(scenes[0])}
    with http.stream("POST", "/v1/chat/completions", json=request) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in answer.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == demo.truth()["images"][scenes[0].name]["caption"]


def test_metrics_count_requests_tokens_latency_and_queue(http, openai_client, scenes):
    openai_client.chat.completions.create(model="blip2-fp32", messages=image_message(scenes[0]), stream=True).close()
    http.post("/v1/classify", json={"model": "clip-fp32", "images": ["data:image/png;base64,AAAA"]})
    text = http.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}

    def value(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0)

    assert value("mmedge_requests_total", endpoint="/v1/chat/completions", model="blip2-fp32", status="200") >= 1
    assert value("mmedge_errors_total", endpoint="/v1/classify", status="400", code="invalid_image") >= 1
    assert value("mmedge_generated_tokens_total", model="blip2-fp32") > 0
    assert value("mmedge_generations_total", model="blip2-fp32", outcome="finished") >= 1
    assert value("mmedge_time_to_first_token_seconds_count", model="blip2-fp32") >= 1
    assert value("mmedge_request_seconds_count", endpoint="/v1/classify", model="clip-fp32") >= 1
    assert value("mmedge_queue_depth", model="blip2-fp32") == 0


def test_page_and_its_static_files(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text and httpx.get(f"{server.url}{asset}").status_code == 200


@pytest.mark.parametrize("recorded,shown", [
    ("Salesforce/blip2-opt-2.7b", "Salesforce/blip2-opt-2.7b"), ("/home/alice/ck/blip2", "blip2"),
    ("~/models/ck", "ck"), ("../../home/alice/private/ck", "ck"), ("C:\\Users\\alice\\ck", "ck")])
def test_a_local_source_is_named_by_its_folder_only(recorded, shown):
    from mmedge.serve.models import _public_source

    assert _public_source(recorded) == shown
