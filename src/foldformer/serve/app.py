"""The session server's HTTP API (FastAPI), on one `Engine` and one `SessionStore`.

A session is a stream that lives on the server: text appended to it is read once, condensed
into the model's state and kept in SQLite, so later questions cost only their own tokens.

    POST   /v1/sessions                 {"text"?}            -> {"id", "tokens"}
    POST   /v1/sessions/{id}/append     {"text"}             -> {"tokens"}
    POST   /v1/sessions/{id}/generate   {"prompt"?, sampling, "stream"?, "commit"?} -> {"text"…}
    GET    /v1/sessions/{id}, GET /v1/sessions, DELETE /v1/sessions/{id}
    POST   /v1/completions              OpenAI completions (a fresh stream per prompt)
    GET    /v1/models, /healthz, /openapi.json

Requests on one session are serialised by a lock; model work runs in worker threads, so other
sessions go on meanwhile, and generations of different sessions that arrive within a short
window are decoded as one batch (`foldformer.serve.batcher`; on by default on a GPU). A
generation changes the session only with "commit": true, and then the prompt and every
generated token (the answer's stop text too) are read into it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from foldformer.config import ConfigError
from foldformer.generate import ContextState, ContextStateError, Engine, SamplingConfig
from foldformer.serve.batcher import Batcher, Batching, default_window_ms
from foldformer.serve.limits import Limits
from foldformer.serve.store import Session, SessionLimitError, SessionStore

# -- request and response bodies ---------------------------------------------------------------


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateSession(Body):
    text: str = ""


class Append(Body):
    text: str


class Sampling(Body):
    max_new_tokens: int = Field(64, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: list[str] | str | None = None
    stop_at_eod: bool = True
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


class Generate(Sampling):
    prompt: str = ""
    stream: bool = False
    commit: bool = False


class SessionInfo(BaseModel):
    id: str
    tokens: int
    created: float
    updated: float


class SessionList(BaseModel):
    sessions: list[SessionInfo]


class Tokens(BaseModel):
    id: str
    tokens: int


class Generated(BaseModel):
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    tokens: int  # the session's token count after this request (unchanged without commit)
    committed: bool


class CompletionRequest(BaseModel):
    """The OpenAI completions request; fields this server cannot honour are refused."""

    model_config = ConfigDict(extra="ignore")  # user, logit_bias, … change nothing here

    model: str
    prompt: str | list[str] = ""
    max_tokens: int | None = Field(16, ge=0)
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    stream: bool | None = False
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] | str | None = None
    n: int | None = Field(1, ge=1, le=1)
    echo: bool | None = Field(False, description="only false")
    logprobs: int | None = Field(None, description="only null")
    suffix: str | None = Field(None, description="only null")


class Choice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


# -- the app ------------------------------------------------------------------------------------


def sampling_config(body: Sampling, limits: Limits) -> SamplingConfig:
    if body.max_new_tokens > limits.max_new_tokens:
        raise HTTPException(
            422, f"max_new_tokens {body.max_new_tokens} is over this server's limit "
            f"{limits.max_new_tokens}"
        )  # fmt: skip
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    try:
        return SamplingConfig(
            max_new_tokens=body.max_new_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            repetition_penalty=body.repetition_penalty,
            stop=tuple(stop),
            stop_at_eod=body.stop_at_eod,
            seed=body.seed,
        )
    except ConfigError as error:
        raise HTTPException(422, str(error)) from None


def check_text(text: str, what: str, limits: Limits) -> None:
    if len(text) > limits.max_text_chars:
        raise HTTPException(
            413, f"{what} has {len(text)} characters, over the limit of {limits.max_text_chars}"
        )


class BodyLimit:
    """ASGI middleware: a request body over max_bytes is refused with 413, unread."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body over the limit of {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse({"detail": message}, 413)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            event = await receive()
            received += len(event.get("body", b""))
            if received > self.max_bytes:  # a chunked body without a length
                raise HTTPException(413, message)
            return event

        await self.app(scope, counted, send)


# The Bearer token, if any (module level: FastAPI resolves the annotation by name).
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(
    engine: Engine,
    store: SessionStore,
    model_name: str,
    limits: Limits | None = None,
    api_key: str | None = None,
    batching: Batching | None = None,
) -> FastAPI:
    limits = limits or Limits()
    batching = batching or Batching(default_window_ms(engine.device))

    def authorise(
        credentials: Credentials,
    ) -> None:
        if api_key is None:
            return
        if credentials is None or not secrets.compare_digest(
            credentials.credentials.encode(), api_key.encode()
        ):
            raise HTTPException(
                401, "a valid API key is required: Authorization: Bearer KEY",
                headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip

    app = FastAPI(title="foldformer session server", version="1", description=__doc__)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorise)] if api_key else [])
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    workers = anyio.CapacityLimiter(limits.workers)
    locks: dict[str, asyncio.Lock] = {}

    async def work(fn, *args):
        """Model work (and state (de)serialisation) in one of `workers` threads."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=workers)

    async def db(fn, *args):
        """Database work in a thread of its own pool: never queued behind the model."""
        return await anyio.to_thread.run_sync(fn, *args)

    batcher = Batcher(engine, batching, work)

    def lock(session_id: str) -> asyncio.Lock:
        return locks.setdefault(session_id, asyncio.Lock())

    async def load(session_id: str) -> tuple[Session, ContextState]:
        session = await db(store.get, session_id)
        if session is None:
            locks.pop(session_id, None)
            raise HTTPException(404, f"no session {session_id!r}")
        try:
            return session, await work(engine.state_from_bytes, session.state)
        except ContextStateError as error:  # a database written with another checkpoint
            raise HTTPException(409, f"session {session_id}: {error}") from None

    async def save(session: Session, context: ContextState) -> None:
        state = await work(engine.state_bytes, context)
        if not await db(store.update, session, state, context.tokens):
            raise HTTPException(409, f"session {session.id} changed or was deleted meanwhile")

    @app.get("/healthz")
    async def healthz() -> dict:
        stats = {name: dict(sorted(counts.items())) for name, counts in batcher.stats.items()}
        return {"status": "ok", "model": model_name, "sessions": await db(store.count),
                "batching": {**vars(batching), **stats}}  # fmt: skip

    @v1.post("/sessions", response_model=Tokens, status_code=201)
    async def create_session(body: CreateSession | None = None) -> Tokens:
        text = body.text if body else ""
        check_text(text, "text", limits)
        context = await work(engine.read, text)
        state = await work(engine.state_bytes, context)
        session_id = uuid.uuid4().hex
        try:
            await db(store.create, session_id, state, context.tokens, limits.max_sessions)
        except SessionLimitError as error:
            raise HTTPException(409, str(error)) from None
        return Tokens(id=session_id, tokens=context.tokens)

    @v1.get("/sessions", response_model=SessionList)
    async def list_sessions() -> SessionList:
        return SessionList(sessions=[SessionInfo(**s.info()) for s in await db(store.list)])

    @v1.get("/sessions/{session_id}", response_model=SessionInfo)
    async def get_session(session_id: str) -> SessionInfo:
        session = await db(store.get, session_id)
        if session is None:
            raise HTTPException(404, f"no session {session_id!r}")
        return SessionInfo(**session.info())

    @v1.delete("/sessions/{session_id}")
    async def delete_session(session_id: str) -> dict:
        async with lock(session_id):
            if not await db(store.delete, session_id):
                raise HTTPException(404, f"no session {session_id!r}")
        locks.pop(session_id, None)
        return {"id": session_id, "deleted": True}

    @v1.post("/sessions/{session_id}/append", response_model=Tokens)
    async def append(session_id: str, body: Append) -> Tokens:
        check_text(body.text, "text", limits)
        async with lock(session_id):
            session, context = await load(session_id)
            context = await work(engine.read, body.text, context)
            await save(session, context)
        return Tokens(id=session_id, tokens=context.tokens)

    @v1.post(
        "/sessions/{session_id}/generate",
        response_model=Generated,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def generate(session_id: str, body: Generate):
        check_text(body.prompt, "prompt", limits)
        config = sampling_config(body, limits)
        if await db(store.get, session_id) is None:
            raise HTTPException(404, f"no session {session_id!r}")

        def result(session: Session, done, committed: bool) -> Generated:
            return Generated(
                text=done.text,
                finish_reason=done.finish_reason,
                prompt_tokens=done.prompt_tokens,
                completion_tokens=len(done.token_ids),
                tokens=done.context.tokens if committed else session.tokens,
                committed=committed,
            )

        if not body.stream:
            async with lock(session_id):
                session, context = await load(session_id)
                (done,) = await batcher.complete([body.prompt], [context], config)
                if body.commit:
                    await save(session, done.context)
            return result(session, done, body.commit)

        async def events() -> AsyncIterator[str]:
            job = None
            async with lock(session_id):
                try:
                    session, context = await load(session_id)
                    job = batcher.submit([body.prompt], [context], config, stream=True)
                    async for _, piece in job.stream():
                        yield sse({"text": piece})
                    (done,) = await job.done
                    if body.commit:
                        await save(session, done.context)
                    final = result(session, done, body.commit)
                    yield sse(final.model_dump(exclude={"text"}))  # the pieces were the text
                except HTTPException as error:  # the response has started: report in-band
                    yield sse({"error": error.detail, "status": error.status_code})
                finally:  # a client gone mid-answer stops its decoding (nothing is committed)
                    if job is not None and not job.done.done():
                        job.abandon()
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "owned_by": "foldformer"}]}  # fmt: skip

    @v1.post(
        "/completions",
        response_model=CompletionResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def completions(body: CompletionRequest):
        if body.model != model_name:
            raise HTTPException(404, f"model {body.model!r} is not served here; use {model_name!r}")
        for name, value in (("echo", body.echo), ("logprobs", body.logprobs),
                            ("suffix", body.suffix)):  # fmt: skip
            if value:
                raise HTTPException(422, f"{name}={value!r} is not supported by this server")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not 1 <= len(prompts) <= limits.max_prompts:
            raise HTTPException(422, f"give 1 to {limits.max_prompts} prompts, got {len(prompts)}")
        for prompt in prompts:
            check_text(prompt, "prompt", limits)
        sampling = Sampling(
            max_new_tokens=16 if body.max_tokens is None else body.max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k,
            repetition_penalty=body.repetition_penalty,
            stop=body.stop,
            seed=body.seed,
        )
        config = sampling_config(sampling, limits)
        reply = dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model_name)
        if not body.stream:
            done = await batcher.complete(prompts, [None] * len(prompts), config)
            choices = [Choice(text=d.text, index=i, finish_reason=d.finish_reason)
                       for i, d in enumerate(done)]  # fmt: skip
            prompt_tokens = sum(d.prompt_tokens for d in done)
            completion_tokens = sum(len(d.token_ids) for d in done)
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          total_tokens=prompt_tokens + completion_tokens)  # fmt: skip
            return CompletionResponse(**reply, choices=choices, usage=usage)

        def chunk(index: int, text: str, reason: str | None) -> str:
            choice = Choice(text=text, index=index, finish_reason=reason)
            return sse(CompletionResponse(**reply, choices=[choice]).model_dump())

        async def events() -> AsyncIterator[str]:
            job = batcher.submit(prompts, [None] * len(prompts), config, stream=True)
            try:
                async for index, piece in job.stream():  # the prompts' pieces may interleave
                    yield chunk(index, piece, None)
                for index, done in enumerate(await job.done):
                    yield chunk(index, "", done.finish_reason)
            finally:  # a client gone mid-answer stops its decoding
                if not job.done.done():
                    job.abandon()
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    app.include_router(v1)
    return app
