"""The session server's per-request limits, apart from the FastAPI app: the CLI's parser reads
their defaults without importing the web stack."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    """What one request may ask; beyond it the answer is a JSON 4xx naming the limit."""

    max_body_bytes: int = 4 * 2**20
    max_text_chars: int = 2**20  # per append, prompt or completion prompt
    max_new_tokens: int = 1024
    max_sessions: int = 10000
    max_prompts: int = 16  # prompts in one /v1/completions request
    workers: int = 4  # model calls running at once (threads)
