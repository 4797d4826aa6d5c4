"""A GPT judge through any OpenAI-compatible ``/chat/completions`` endpoint (LLaVA-Bench, MM-Vet).

The endpoint, model and key are the user's (``--judge-base-url``, ``--judge-model``, ``OPENAI_API_KEY``);
requests are retried with backoff on rate limits, server errors and dropped connections. Reviews are
written one JSON line at a time, so an interrupted judging run continues where it stopped.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field


class JudgeError(RuntimeError):
    pass


@dataclass
class JudgeClient:
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4-0314"
    api_key: str | None = field(default=None, repr=False)
    temperature: float = 0.2
    max_tokens: int = 1024
    retries: int = 5
    timeout: float = 120.0
    backoff: float = 2.0

    def __post_init__(self):
        if self.api_key is None:
            self.api_key = os.environ.get("OPENAI_API_KEY")

    def complete(self, system: str, user: str) -> str:
        body = json.dumps({"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                           "messages": [{"role": "system", "content": system},
                                        {"role": "user", "content": user}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        last = None
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    data = json.loads(r.read())
                return data["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                if e.code not in (408, 409, 429) and e.code < 500:
                    detail = e.read().decode(errors="replace")[:500]
                    raise JudgeError(f"judge {url}: HTTP {e.code}: {detail}") from None
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError, KeyError) as e:
                last = str(e)
            if attempt < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        raise JudgeError(f"judge {url}: no answer after {self.retries + 1} tries (last: {last})")
