"""The session server over real HTTP on loopback: session routes (httpx), /v1/completions
(the openai client), the OpenAPI document (schemathesis), restart and kill -9."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from foldformer.generate import Engine, SamplingConfig
from foldformer.serve.app import Limits, create_app
from foldformer.serve.batcher import Batching
from foldformer.serve.store import SessionStore

LIMITS = Limits(max_body_bytes=20000, max_text_chars=5000, max_new_tokens=64, max_sessions=100)


pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def serving(app):
    """uvicorn in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return Engine.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def url(engine, tmp_path_factory):
    store = SessionStore(tmp_path_factory.mktemp("db") / "sessions.sqlite")
    with serving(create_app(engine, store, "tiny", LIMITS)) as base:
        yield base


@pytest.fixture
def client(url):
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


def test_sessions_append_generate_commit(client, engine):
    created = client.post("/v1/sessions", json={"text": "The door code is 4711. "})
    assert created.status_code == 201
    sid, tokens = created.json()["id"], created.json()["tokens"]
    assert tokens == 23
    assert client.post(f"/v1/sessions/{sid}/append", json={"text": "Remember it."}).json() == {
        "id": sid, "tokens": 35}  # fmt: skip
    info = client.get(f"/v1/sessions/{sid}").json()
    assert info["tokens"] == 35 and info["updated"] >= info["created"]
    assert sid in [s["id"] for s in client.get("/v1/sessions").json()["sessions"]]
    # the answer is what the library gives for the same stream and seed
    ask = {"prompt": " The code is", "max_new_tokens": 12, "seed": 9, "stop_at_eod": False}
    answer = client.post(f"/v1/sessions/{sid}/generate", json=ask).json()
    context = engine.read("The door code is 4711. Remember it.")
    config = SamplingConfig(max_new_tokens=12, seed=9, stop_at_eod=False)
    (expected,) = engine.complete([" The code is"], [context], config)
    assert answer["text"] == expected.text and answer["completion_tokens"] == 12
    assert answer["tokens"] == 35 and not answer["committed"]  # no commit: unchanged
    assert client.post(f"/v1/sessions/{sid}/generate", json=ask).json() == answer
    # streamed: server-sent events whose pieces make the same text
    with client.stream("POST", f"/v1/sessions/{sid}/generate", json={**ask, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert "".join(json.loads(e)["text"] for e in events[:-2]) == answer["text"]
    assert final == {k: v for k, v in answer.items() if k != "text"}
    # commit reads the prompt and the answer into the session
    committed = client.post(f"/v1/sessions/{sid}/generate", json={**ask, "commit": True}).json()
    assert committed["text"] == answer["text"] and committed["tokens"] == 35 + 12 + 12
    assert client.get(f"/v1/sessions/{sid}").json()["tokens"] == 59
    nxt = client.post(f"/v1/sessions/{sid}/generate", json=ask).json()
    (after,) = engine.complete([" The code is"], [expected.context], config)
    assert nxt["text"] == after.text
    assert client.delete(f"/v1/sessions/{sid}").json() == {"id": sid, "deleted": True}
    assert client.get(f"/v1/sessions/{sid}").status_code == 404


def test_errors_are_json_4xx(client):
    sid = client.post("/v1/sessions", json={}).json()["id"]
    cases = [
        ("GET", "/v1/sessions/nope", None, 404, "nope"),
        ("POST", "/v1/sessions/nope/append", {"text": "x"}, 404, "nope"),
        ("POST", "/v1/sessions/nope/generate", {}, 404, "nope"),
        ("DELETE", "/v1/sessions/nope", None, 404, "nope"),
        ("POST", f"/v1/sessions/{sid}/append", {"text": "x" * 5001}, 413, "5000"),
        ("POST", f"/v1/sessions/{sid}/append", {"text": "x" * 30000}, 413, "20000 bytes"),
        ("POST", f"/v1/sessions/{sid}/generate", {"max_new_tokens": 65}, 422, "64"),
        ("POST", f"/v1/sessions/{sid}/generate", {"top_p": 0}, 422, "top_p"),
        ("POST", f"/v1/sessions/{sid}/append", {"txt": "x"}, 422, "txt"),
        ("POST", "/v1/completions", {"model": "other", "prompt": "x"}, 404, "tiny"),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "n": 2}, 422, "n"),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "echo": True}, 422, "echo"),
    ]
    for method, path, body, status, named in cases:
        response = client.request(method, path, json=body)
        assert response.status_code == status, (path, body, response.text)
        assert named in json.dumps(response.json()), response.text
    bad = client.post(f"/v1/sessions/{sid}/append", content=b"{not json",
                      headers={"content-type": "application/json"})  # fmt: skip
    assert bad.status_code == 422 and "json" in bad.text.lower()


def test_session_limit_api_key_and_serialised_appends(engine, tmp_path):
    store = SessionStore(tmp_path / "s.sqlite")
    app = create_app(engine, store, "tiny", Limits(max_sessions=2), api_key="s3cret")
    with serving(app) as base:
        anonymous = httpx.Client(base_url=base)
        assert anonymous.get("/healthz").json()["status"] == "ok"  # open to health checks
        assert anonymous.get("/v1/sessions").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert anonymous.post("/v1/sessions", json={}, headers=wrong).status_code == 401
        client = httpx.Client(base_url=base, headers={"Authorization": "Bearer s3cret"})
        sid = client.post("/v1/sessions", json={"text": "ab"}).json()["id"]
        client.post("/v1/sessions", json={})
        full = client.post("/v1/sessions", json={})
        assert full.status_code == 409 and "maximum of 2 sessions" in full.json()["detail"]

        # eight appends at once on one session: serialised, none lost
        def append(_):
            return client.post(f"/v1/sessions/{sid}/append", json={"text": "cd"}).status_code

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(append, range(8))) == [200] * 8
        assert client.get(f"/v1/sessions/{sid}").json()["tokens"] == 2 + 16
        ask = {"max_new_tokens": 8, "seed": 0, "stop_at_eod": False}
        expected = engine.complete([""], [engine.read("ab" + "cd" * 8)], SamplingConfig(**ask))
        answer = client.post(f"/v1/sessions/{sid}/generate", json=ask).json()["text"]
        assert answer == expected[0].text


def test_concurrent_generations_are_batched_and_answer_as_alone(engine, tmp_path):
    """Generations of five sessions sent at once (one streamed, one committed) run as one
    batch: four sit at one phase of the fold (w = 8) and share decode steps, the fifth not;
    every answer is the one the library gives for that session alone."""
    store = SessionStore(tmp_path / "s.sqlite")
    app = create_app(engine, store, "tiny", LIMITS, batching=Batching(window_ms=2000, max_batch=5))
    texts = ["The door code is 4711.", "x" * 14, "Another session, a longer text.", "",
             "one off the phase"]  # fmt: skip
    texts[3] = texts[0]  # asked the same, streamed
    asks = [
        {"prompt": " Q:", "max_new_tokens": 12, "seed": 9, "stop_at_eod": False},
        {"prompt": " Q:", "max_new_tokens": 5, "seed": 2, "temperature": 0.7, "top_k": 20},
        {"prompt": " A", "max_new_tokens": 9, "temperature": 0, "stop_at_eod": False,
         "commit": True},
        {"prompt": " Q:", "max_new_tokens": 12, "seed": 9, "stop_at_eod": False, "stream": True},
        {"prompt": " Q:", "max_new_tokens": 7, "seed": 5, "repetition_penalty": 1.3},
    ]  # fmt: skip
    lengths = [len(t) + len(a["prompt"]) for t, a in zip(texts, asks, strict=True)]
    assert {n % 8 for n in lengths[:4]} == {lengths[0] % 8} != {lengths[4] % 8}
    with serving(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        sids = [client.post("/v1/sessions", json={"text": t}).json()["id"] for t in texts]

        def generate(i):
            path = f"/v1/sessions/{sids[i]}/generate"
            if not asks[i].get("stream"):
                return client.post(path, json=asks[i]).json()["text"]
            with client.stream("POST", path, json=asks[i]) as r:
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            return "".join(json.loads(e)["text"] for e in events[:-2])

        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(generate, range(5)))
        stats = client.get("/healthz").json()["batching"]
        infos = [client.get(f"/v1/sessions/{sid}").json()["tokens"] for sid in sids]
    for text, ask, answer in zip(texts, asks, answers, strict=True):
        fields = {k: v for k, v in ask.items() if k not in ("prompt", "stream", "commit")}
        (alone,) = engine.complete([ask["prompt"]], [engine.read(text)], SamplingConfig(**fields))
        assert answer == alone.text
    assert answers[0] == answers[3]  # the same session text and seed, streamed or not
    assert stats["batch_rows"] == {"5": 1}, stats  # one batch of all five
    assert any(int(rows) >= 2 for rows in stats["decode_step_rows"]), stats  # shared steps
    assert infos == [len(t) for t in texts[:2]] + [lengths[2] + 9] + [len(t) for t in texts[3:]]


def test_openai_client_completions(url):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    args = dict(model="tiny", prompt="Once upon a time", max_tokens=10, seed=4, temperature=0.9)
    first = client.completions.create(**args)
    assert first.object == "text_completion" and first.choices[0].finish_reason == "length"
    assert first.usage.prompt_tokens == 16 and first.usage.completion_tokens == 10
    assert client.completions.create(**args).choices[0].text == first.choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(**args, stream=True)]
    assert "".join(pieces) == first.choices[0].text
    # a batch of prompts of different lengths: each answer as if asked alone
    batch = client.completions.create(**{**args, "prompt": ["a", "Once upon a time", "xyz"]})
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert batch.choices[1].text == first.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(**{**args, "model": "gpt-4"})


def test_openapi_document_no_server_errors(url):
    """Every operation, with schemathesis-generated (valid and invalid) bodies: no 5xx."""
    import hypothesis
    import schemathesis
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/sessions", "/v1/completions", "/healthz"}
    session = httpx.post(f"{url}/v1/sessions", json={"text": "seed"}).json()["id"]
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=6, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
        def check(case):
            if case.path_parameters and "session_id" in case.path_parameters:
                case.path_parameters["session_id"] = session  # an existing session too
            case.call_and_validate(checks=[not_a_server_error])

        check()


# -- a server process: restart and kill -9 ------------------------------------------------------


def start_server(checkpoint: Path, db: Path) -> tuple[subprocess.Popen, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).parents[1] / "src")}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "foldformer.cli", "serve", str(checkpoint), "--port", str(port),
         "--db", str(db), "--max-text-chars", str(10**7), "--max-body-bytes", str(10**8)],
        env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                return process, base
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the server did not start")


def test_restart_and_kill_9_keep_the_last_committed_append(tiny_checkpoint, tmp_path):
    db = tmp_path / "sessions.sqlite"
    ask = {"prompt": " Q:", "max_new_tokens": 8, "seed": 1, "stop_at_eod": False}
    process, base = start_server(tiny_checkpoint, db)
    try:
        sid = httpx.post(f"{base}/v1/sessions", json={"text": "first part. "}).json()["id"]
        httpx.post(f"{base}/v1/sessions/{sid}/append", json={"text": "second part."})
        before = httpx.post(f"{base}/v1/sessions/{sid}/generate", json=ask).json()
        # a long append in flight when the server is killed
        long_text = "x" * 400_000

        def long_append():  # ~30 s of reading on one thread; the kill comes first
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{base}/v1/sessions/{sid}/append", json={"text": long_text},
                           timeout=60)  # fmt: skip

        thread = threading.Thread(target=long_append, daemon=True)
        thread.start()
        time.sleep(1.0)
        assert httpx.get(f"{base}/v1/sessions/{sid}").json()["tokens"] == 24  # not landed yet
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        thread.join(10)
        process, base = start_server(tiny_checkpoint, db)
        assert httpx.get(f"{base}/v1/sessions/{sid}").json()["tokens"] == 24
        assert httpx.post(f"{base}/v1/sessions/{sid}/generate", json=ask).json() == before
        # a committed append survives kill -9 and a plain restart
        httpx.post(f"{base}/v1/sessions/{sid}/append", json={"text": " third"})
        committed = httpx.post(f"{base}/v1/sessions/{sid}/generate", json=ask).json()
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        process, base = start_server(tiny_checkpoint, db)
        assert httpx.get(f"{base}/v1/sessions/{sid}").json()["tokens"] == 30
        assert httpx.post(f"{base}/v1/sessions/{sid}/generate", json=ask).json() == committed
    finally:
        process.kill()
        process.wait(10)


def test_serve_command_bad_input_is_one_line(tiny_checkpoint, tmp_path, capsys):
    from foldformer.cli import build_parser, console

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"generate", "serve"} <= set(commands)
    for argv, named in (
        (["--port", "70000"], "--port"),
        (["--max-sessions", "0"], "--max-sessions"),
        (["--batch-window-ms", "-1"], "--batch-window-ms"),
        (["--batch-window-ms", "nan"], "--batch-window-ms"),
        (["--max-batch", "0"], "--max-batch"),
    ):
        assert console(["serve", str(tiny_checkpoint), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and named in err
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    assert console(["serve", str(tiny_checkpoint), "--db", str(tmp_path / "junk.sqlite")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "junk.sqlite" in err
    assert console(["serve", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err


def test_benchmark_scripts_run_bounded_and_write_json(tmp_path):
    """benchmarks/ingest.py and serve_load.py, tiny sizes (their numbers are not asserted)."""
    root = Path(__file__).parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    ingest, load = tmp_path / "ingest.json", tmp_path / "load.json"
    commands = [
        [root / "benchmarks/ingest.py", "--out", ingest, "--lengths", "1K,2K,10M", "--book", "1K",
         "--d-model", "16", "--n-layers", "1", "--window", "8", "--memory", "8", "--budget", "20",
         "--answer-tokens", "4"],
        [root / "benchmarks/serve_load.py", "--out", load, "--sessions", "3", "--requests", "2",
         "--max-new-tokens", "4", "--threads", "1", "--batch-window-ms", "20"],
    ]  # fmt: skip
    processes = [subprocess.Popen([sys.executable, *map(str, c)], env=env,
                                  stdout=subprocess.DEVNULL) for c in commands]  # fmt: skip
    assert [p.wait(120) for p in processes] == [0, 0]
    record = json.loads(ingest.read_text())
    assert [r["tokens"] for r in record["lengths"]] == [1024, 2048, 10 * 2**20]
    assert "skipped" in record["lengths"][-1] and record["book"]["same_answer"]
    result = json.loads(load.read_text())
    assert result["requests"] == 3 * 3 and result["errors"] == 0 and result["all"]["p99_ms"] > 0
    rows = result["batching"]["batch_rows"]  # the three generations, in batches of some size
    assert result["batching"]["window_ms"] == 20 and sum(int(n) * k for n, k in rows.items()) == 3


def test_gpu_serving_script_runs_at_toy_size_on_a_cpu(tmp_path):
    """benchmarks/serve_gpu.sh with SMOKE=1: the lead's H200 script, end to end, on a CPU."""
    root = Path(__file__).parents[1]
    env = {**os.environ, "SMOKE": "1", "PYTHON": sys.executable, "PYTHONPATH": str(root / "src")}
    done = subprocess.run(["bash", str(root / "benchmarks/serve_gpu.sh"), str(tmp_path)], env=env,
                          cwd=root, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    ingest = json.loads((tmp_path / "ingest.json").read_text())
    assert ingest["model"]["d_model"] == 384 and ingest["book"]["same_answer"]
    for batching, window in (("off", 0), ("on", 5)):
        load = json.loads((tmp_path / f"serve_load_batching_{batching}.json").read_text())
        assert load["errors"] == 0 and not load["timed_out"]
        assert load["batching"]["window_ms"] == window


def test_a_client_gone_mid_stream_stops_its_decoding(engine, tmp_path):
    """A streamed answer of up to 3,000 tokens whose client hangs up after the first pieces,
    batched with another session's short answer: the server stops decoding the abandoned row
    (decode steps far below 3,000) and commits nothing; the other answer is its answer alone."""
    limits = Limits(max_body_bytes=20000, max_text_chars=5000, max_new_tokens=3000)
    app = create_app(engine, SessionStore(tmp_path / "s.sqlite"), "tiny", limits,
                     batching=Batching(window_ms=500, max_batch=2))  # fmt: skip
    ask = {"prompt": " Q:", "max_new_tokens": 3000, "temperature": 0, "stop_at_eod": False,
           "stream": True, "commit": True}  # fmt: skip
    other = {"prompt": " Q:", "max_new_tokens": 16, "temperature": 0, "stop_at_eod": False}
    with serving(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        sids = [client.post("/v1/sessions", json={"text": t}).json()["id"]
                for t in ("Some context.", "Other text.")]  # fmt: skip

        def hang_up() -> None:
            with client.stream("POST", f"/v1/sessions/{sids[0]}/generate", json=ask) as r:
                assert next(line for line in r.iter_lines() if line.startswith("data: "))

        with ThreadPoolExecutor(2) as pool:
            gone = pool.submit(hang_up)
            answer = pool.submit(client.post, f"/v1/sessions/{sids[1]}/generate", json=other)
            gone.result()
            answer = answer.result().json()["text"]
        steps, deadline = -1, time.time() + 30
        while time.time() < deadline:  # until the count stops moving
            time.sleep(0.5)
            stats = client.get("/healthz").json()["batching"]
            rows = stats["decode_step_rows"]
            if (now := sum(int(n) * k for n, k in rows.items())) == steps:
                break
            steps = now
        tokens = client.get(f"/v1/sessions/{sids[0]}").json()["tokens"]
    assert stats["batch_rows"] == {"2": 1}, stats  # the two answers ran as one batch
    assert 16 <= steps < 1000, steps
    assert tokens == len("Some context.")  # the abandoned answer was not committed
    fields = {k: v for k, v in other.items() if k != "prompt"}
    (alone,) = engine.complete([" Q:"], [engine.read("Other text.")], SamplingConfig(**fields))
    assert answer == alone.text


def test_cli_parser_builds_without_the_web_stack():
    """Every command builds the whole parser, `serve` included: a machine without FastAPI or
    uvicorn (a bare GPU image) can still train and evaluate, and `serve` says what is missing."""
    code = (
        "import sys\n"
        "for name in ('fastapi', 'uvicorn', 'starlette'): sys.modules[name] = None\n"
        "from foldformer.cli import build_parser\n"
        "args = build_parser().parse_args(['serve', 'ckpt', '--max-new-tokens', '7'])\n"
        "print(args.max_new_tokens)\n"
        "assert 'foldformer.serve.app' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "7"
