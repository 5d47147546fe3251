"""Benchmark streaming through the HTTP server against in-process ``model.generate``.

Run as ``python -m benchmarks.serving [--quick]``. Both sides use the same fused model (the
bundle at preference 0.5), the same prompts, greedy decoding and a fixed number of new tokens
(``ignore_eos`` on the server, ``min_new_tokens`` in-process). The server is a real process on
127.0.0.1 and every measured request is a cache hit (one warm-up request fuses first).

- tokens/s: new tokens over the time from the first token to the last;
- time to first token: from sending the request (or calling ``generate``) to the first token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import httpx
import torch
from transformers import TextIteratorStreamer

from benchmarks.common import free_port, start_server, write_result
from peo_merge.base_model import load_base_model, resolve_base_model
from peo_merge.bundle import load_bundle
from peo_merge.fused_model import base_state, build_fused_model
from peo_merge.fusion import Fuser
from server.settings import DEFAULT_BUNDLE

PROMPTS = [
    "How do I get rid of a wasp nest?",
    "What is a good way to learn to play the guitar?",
    "Explain how a refrigerator keeps food cold.",
    "Give me tips for a job interview.",
]


def stream_once(url: str, prompt: str, new_tokens: int) -> tuple[float, float, int]:
    """Stream one request; return ``(time_to_first_token, decode_seconds, tokens)``."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "preference": 0.5,
        "temperature": 0,
        "max_new_tokens": new_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    started = time.perf_counter()
    first = last = None
    done = None
    with httpx.stream("POST", url + "/generate", json=body, timeout=300) as response:
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "token":
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
            elif line.startswith("data: ") and event == "done":
                done = json.loads(line.removeprefix("data: "))
    if done is None or done["cache"] != "hit":
        raise RuntimeError(f"expected a cache hit, got {done}")
    return first - started, last - first, done["usage"]["completion_tokens"]


def generate_once(model, tokenizer, prompt: str, new_tokens: int) -> tuple[float, float, int]:
    """Run ``model.generate`` with a streamer; return ``(time_to_first_token, decode_seconds, tokens)``."""
    import threading

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    kwargs = dict(
        **ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        streamer=streamer,
        pad_token_id=tokenizer.eos_token_id,
    )
    started = time.perf_counter()
    worker = threading.Thread(target=model.generate, kwargs=kwargs)
    worker.start()
    first = last = None
    for _ in streamer:
        now = time.perf_counter()
        first = first if first is not None else now
        last = now
    worker.join()
    return first - started, last - first, new_tokens


def summarize(samples: list[tuple[float, float, int]]) -> dict:
    ttft = [s[0] for s in samples]
    rates = [(s[2] - 1) / s[1] for s in samples if s[1] > 0]
    return {
        "ttft_s": statistics.median(ttft),
        "tokens_per_s": statistics.median(rates),
        "runs": len(samples),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs")
    parser.add_argument("--bundle", default=os.environ.get("PEO_BUNDLE", str(DEFAULT_BUNDLE)))
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads on both sides"
    )
    args = parser.parse_args(argv)
    new_tokens = 16 if args.quick else 64
    rounds = 1 if args.quick else 3
    torch.set_num_threads(args.threads)

    # in-process: the same fused model the server builds for preference 0.5
    model, tokenizer = load_base_model(resolve_base_model(None))
    bundle = load_bundle(args.bundle)
    fuser = Fuser(base_state(model), bundle.vectors)
    buffers = fuser.allocate()
    fuser.fuse_into(buffers, bundle.vector_coefficients(0.5, 0.5))
    fused = build_fused_model(model, buffers)
    generate_once(fused, tokenizer, PROMPTS[0], 4)
    local = [generate_once(fused, tokenizer, p, new_tokens) for _ in range(rounds) for p in PROMPTS]
    del fused, buffers

    # server: one warm-up request fuses, the measured ones hit the cache
    port = free_port()
    server = start_server(port, args.threads, args.bundle)
    url = f"http://127.0.0.1:{port}"
    try:
        httpx.post(
            url + "/generate",
            json={"prompt": "warm up", "preference": 0.5, "max_new_tokens": 2},
            timeout=300,
        )
        remote = [stream_once(url, p, new_tokens) for _ in range(rounds) for p in PROMPTS]
    finally:
        server.terminate()
        server.wait(30)

    in_process, over_http = summarize(local), summarize(remote)
    figures = {
        "new_tokens": new_tokens,
        "prompts": len(PROMPTS),
        "in_process": in_process,
        "server": over_http,
        "tokens_per_s_ratio": over_http["tokens_per_s"] / in_process["tokens_per_s"],
        "ttft_ratio": over_http["ttft_s"] / in_process["ttft_s"],
    }
    command = "python -m benchmarks.serving " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_result("serving", figures, command.strip())
    print(
        json.dumps({k: figures[k] for k in ("tokens_per_s_ratio", "ttft_ratio")}), file=sys.stderr
    )
    print(f"wrote {path}", file=sys.stderr)
    return figures


if __name__ == "__main__":
    main()
