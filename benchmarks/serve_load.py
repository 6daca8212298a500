"""A bounded load test of glm2-serve, and its speed against glm2-generate and with 1…8 concurrent streams.

    python benchmarks/serve_load.py MODEL [--clients 8] [--requests 4] [--slots 8] [--json]
    python benchmarks/serve_load.py MODEL --scaling 1,2,4,8 --vs-generate --max-tokens 32   # the 6B figures
    python benchmarks/serve_load.py MODEL --engine-vs-decoder --repeat 6                    # in one process
    python benchmarks/serve_load.py 6b-q4_0.gguf --scaling 1,2,4,8 --activations q8_0       # blocks as llama.cpp

The load: N clients × M requests each, ADGEN prompts of mixed lengths, greedy, streaming or not; some clients
disconnect mid-stream and some send malformed requests. Every good request's reply must equal the same request run
alone (first, one at a time, on the same server); no response may be a 5xx. The load runs twice: the server's RSS
after the second round is compared with its RSS after the first (warm: the shapes met compiled). Prints p50/p99
latency, time to first token and the aggregate tokens/s of the second round. `--scaling`: aggregate tokens/s of k
concurrent streams of the same request, end to end and in the decoding steps alone. `--vs-generate`:
single-stream decode through the server against `glm2-generate --stats` on the same model, alternated, with the
engine's own step rate beside the client's. `--engine-vs-decoder`: in one process on one loaded model, the
engine's single stream against `Decoder.stream` (glm2-generate's loop), alternated: two processes each loading the
model vary too much between runs to show a few percent.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from measure import print_machine

from glm2_core.dtypes import ACTIVATIONS

PROMPTS = Path(__file__).resolve().parents[1] / "validation" / "assets" / "adgen_dev_head20.json"
BAD = [b"{not json", b'{"messages": 3}', b'{"model": "x", "messages": []}']


class Server:
    """glm2-serve on a free port, its stderr kept in a file; `rss_mb` reads its resident memory."""

    def __init__(self, model: Path, args: list[str]):
        self.log = open(Path(f"/tmp/serve_load-{time.time_ns()}.log"), "w+")  # noqa: SIM115  (closed in stop)
        tool = Path(sys.executable).parent / "glm2-serve"
        self.proc = subprocess.Popen([tool, model, "--port", "0", *args], stderr=self.log)
        self.url = self._ready()
        self.name = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def _ready(self) -> str:
        while self.proc.poll() is None:
            found = re.search(r"ready at (http://\S+)", Path(self.log.name).read_text())
            if found:
                return found.group(1)
            time.sleep(0.2)
        raise SystemExit(f"glm2-serve ended: {Path(self.log.name).read_text()[-2000:]}")

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(120)
        self.log.close()
        Path(self.log.name).unlink()
        return code


def requests_of(clients: int, per_client: int, max_tokens: int, seed: int) -> list[list[dict]]:
    """Each client's requests: kind good / disconnect / bad, an ADGEN prompt of a mixed length, mixed max_tokens."""
    rng = np.random.default_rng(seed)
    prompts = [json.loads(line)["content"] for line in PROMPTS.read_text().splitlines()]
    plan = []
    for _ in range(clients):
        mine = []
        for _ in range(per_client):
            kind = rng.choice(["good", "good", "good", "good", "disconnect", "bad"])
            prompt = prompts[rng.integers(len(prompts))][:int(rng.integers(4, 120))]
            mine.append({"kind": kind, "prompt": prompt, "max_tokens": int(rng.integers(2, max_tokens + 1)),
                         "stream": bool(rng.integers(2)), "bad": BAD[rng.integers(len(BAD))]})
        plan.append(mine)
    return plan


def body(server: Server, r: dict, stream: bool) -> dict:
    return {"model": server.name, "messages": [{"role": "user", "content": r["prompt"]}],
            "max_tokens": r["max_tokens"], "temperature": 0, "stream": stream}


def ask(client: httpx.Client, server: Server, r: dict, stream: bool) -> dict:
    """One request: its reply, status, latency, time to first token and tokens."""
    start, first, text, usage = time.perf_counter(), None, "", None
    if not stream:
        resp = client.post(server.url + "/v1/chat/completions", json=body(server, r, False))
        done = time.perf_counter()
        out = resp.json()
        if resp.status_code != 200:
            return {"status": resp.status_code, "latency": done - start}
        return {"status": 200, "text": out["choices"][0]["message"]["content"], "latency": done - start,
                "ttft": None, "tokens": out["usage"]["completion_tokens"]}
    with client.stream("POST", server.url + "/v1/chat/completions",
                       json={**body(server, r, True), "stream_options": {"include_usage": True}}) as resp:
        if resp.status_code != 200:
            return {"status": resp.status_code, "latency": time.perf_counter() - start}
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content") or ""
                first = first or (time.perf_counter() if piece else None)
                text += piece
    return {"status": 200, "text": text, "latency": time.perf_counter() - start,
            "ttft": (first - start) if first else None, "tokens": usage["completion_tokens"]}


def disconnect(client: httpx.Client, server: Server, r: dict) -> int:
    """A streaming request dropped after its first event."""
    with client.stream("POST", server.url + "/v1/chat/completions", json=body(server, r, True)) as resp:
        for _ in resp.iter_lines():
            break
        return resp.status_code


def load(server: Server, plan: list[list[dict]], alone: dict) -> dict:
    results, lock = [], threading.Lock()

    def client_run(mine):
        with httpx.Client(timeout=600) as client:
            for r in mine:
                if r["kind"] == "bad":
                    resp = client.post(server.url + "/v1/chat/completions", content=r["bad"])
                    out = {"kind": "bad", "status": resp.status_code}
                elif r["kind"] == "disconnect":
                    out = {"kind": "disconnect", "status": disconnect(client, server, r)}
                else:
                    out = {"kind": "good", **ask(client, server, r, r["stream"])}
                    out["same"] = out.get("text") == alone[(r["prompt"], r["max_tokens"])]
                with lock:
                    results.append(out)

    clock = time.perf_counter()
    threads = [threading.Thread(target=client_run, args=(mine,)) for mine in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - clock
    good = [x for x in results if x["kind"] == "good" and x["status"] == 200]
    lat = np.array([x["latency"] for x in good]) if good else np.zeros(1)
    ttft = np.array([x["ttft"] for x in good if x["ttft"] is not None] or [0.0])
    return {"good": len(good), "mismatches": sum(not x["same"] for x in good),
            "server_errors": sum(x["status"] >= 500 for x in results),
            "refused": sum(x["kind"] == "bad" and 400 <= x["status"] < 500 for x in results),
            "disconnected": sum(x["kind"] == "disconnect" for x in results),
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p99_s": float(np.percentile(lat, 99)),
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "tokens_per_s": sum(x["tokens"] for x in good) / wall, "wall_s": wall}


def engine_counters(server: Server) -> dict:
    lines = httpx.get(server.url + "/metrics").text.splitlines()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines) if k.startswith("glm2_engine")}


def scaling(server: Server, counts: list[int], max_tokens: int) -> dict:
    """k streams of one ADGEN request at once, for each k: the aggregate tokens/s end to end (k prefills
    included) and of the decoding steps alone (the rows they carried over their time, from /metrics)."""
    prompt = json.loads(PROMPTS.read_text().splitlines()[0])["content"]
    r = {"prompt": prompt, "max_tokens": max_tokens}
    out = {}
    for k in counts:
        got = [None] * k

        def one(i, got=got):
            with httpx.Client(timeout=3600) as client:
                got[i] = ask(client, server, r, True)

        for _ in range(2):  # the first round compiles the step of k rows; the second is measured
            before, clock = engine_counters(server), time.perf_counter()
            threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        wall, after = time.perf_counter() - clock, engine_counters(server)
        rows = after["glm2_engine_step_rows_total"] - before["glm2_engine_step_rows_total"]
        out[k] = {"end_to_end": sum(g["tokens"] for g in got) / wall,
                  "decoding": rows / (after["glm2_engine_step_seconds_total"] -
                                      before["glm2_engine_step_seconds_total"])}
    return out


def decode_rate(server: Server, max_tokens: int) -> tuple[float, float]:
    """Single-stream decode tokens/s through the server: as its client sees it (tokens after the first over the
    time after it), and as its engine stepped (the decoding steps' rows over their time, from /metrics)."""
    prompt = json.loads(PROMPTS.read_text().splitlines()[0])["content"]
    before = engine_counters(server)
    with httpx.Client(timeout=3600) as client:
        out = ask(client, server, {"prompt": prompt, "max_tokens": max_tokens}, True)
    after = engine_counters(server)
    steps = after["glm2_engine_step_rows_total"] - before["glm2_engine_step_rows_total"]
    return (out["tokens"] - 1) / (out["latency"] - out["ttft"]), steps / (
        after["glm2_engine_step_seconds_total"] - before["glm2_engine_step_seconds_total"])


def generate_rate(model: Path, max_tokens: int, activations: str) -> float:
    prompt = json.loads(PROMPTS.read_text().splitlines()[0])["content"]
    tool = Path(sys.executable).parent / "glm2-generate"
    r = subprocess.run([tool, model, "--prompt", prompt, "--chat", "--max-new-tokens", str(max_tokens), "--stats",
                        "--activations", activations],
                       capture_output=True, text=True, check=True)
    return float(re.search(r"decode ([\d.]+) tokens/s", r.stderr).group(1))


def engine_vs_decoder(model_path: Path, max_tokens: int, repeat: int, context: int, activations: str) -> dict:
    """In one process, on one loaded model, alternating: the engine's single job against `Decoder.stream` (what
    glm2-generate runs), the same chat prompt, greedy, max_tokens each; decode tokens/s after the first step."""
    from glm2_ms.api import open_model
    from glm2_ms.engine import Engine, Job
    from glm2_ms.loading import use_cpu
    from glm2_ms.sampling import SamplingConfig

    use_cpu()
    with open_model(model_path) as folder:
        tok, model = folder.tokenizer, folder.load(compute_dtype="float32", activations=activations)  # as the tools
    ids = tok.build_chat_input(json.loads(PROMPTS.read_text().splitlines()[0])["content"])
    engine = Engine(model, 1, context, 1)
    engine.start()

    def by_engine() -> float:
        times, done = [], threading.Event()
        engine.submit(Job(ids, max_tokens, SamplingConfig(greedy=True), frozenset(),
                          lambda token, why: done.set() if why else times.append(time.perf_counter())))
        done.wait()
        return (len(times) - 2) / (times[-1] - times[1])

    def by_decoder() -> float:
        times = [time.perf_counter() for _ in model.decoder.stream([ids], max_new_tokens=max_tokens,
                                                                   eos_token_id=-1)]
        return (len(times) - 2) / (times[-1] - times[1])

    by_engine(), by_decoder()  # each side's steps compiled
    pairs = [(by_engine(), by_decoder()) if i % 2 == 0 else tuple(reversed((by_decoder(), by_engine())))
             for i in range(repeat)]
    engine.stop(60)
    return {"engine_tokens_per_s": [e for e, _ in pairs], "decoder_tokens_per_s": [d for _, d in pairs],
            "engine_over_decoder": float(np.median([e / d for e, d in pairs]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=4, help="per client")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scaling", default="", help="stream counts, e.g. 1,2,4,8 (skips the mixed load)")
    p.add_argument("--vs-generate", action="store_true", help="single-stream decode against glm2-generate")
    p.add_argument("--repeat", type=int, default=2, help="alternations of --vs-generate")
    p.add_argument("--json", action="store_true", help="print the result as JSON only")
    p.add_argument("--activations", choices=ACTIVATIONS, default="float32",
                   help="the --activations of glm2-serve, glm2-generate and the in-process model")
    p.add_argument("--engine-vs-decoder", action="store_true",
                   help="in one process: the engine's single stream against Decoder.stream, alternated")
    a = p.parse_args()
    if not a.json:
        print_machine()
    if a.engine_vs_decoder:
        print(json.dumps(engine_vs_decoder(a.model, a.max_tokens, a.repeat, a.context, a.activations), indent=2))
        return
    server = Server(a.model, ["--slots", str(a.slots), "--context", str(a.context), "--queue", "256",
                              "--activations", a.activations])
    try:
        result = {}
        if a.scaling:
            result["scaling_tokens_per_s"] = scaling(server, [int(k) for k in a.scaling.split(",")], a.max_tokens)
        else:
            plan = requests_of(a.clients, a.requests, a.max_tokens, a.seed)
            with httpx.Client(timeout=600) as client:
                alone = {(r["prompt"], r["max_tokens"]): ask(client, server, r, False)["text"]
                         for mine in plan for r in mine if r["kind"] == "good"}
            first = load(server, plan, alone)  # the warm-up: every batch and cache-length shape the load meets
            warm = server.rss_mb()
            result = load(server, plan, alone)
            result.update(mismatches=result["mismatches"] + first["mismatches"],
                          server_errors=result["server_errors"] + first["server_errors"],
                          rss_warm_mb=warm, rss_after_mb=server.rss_mb())
        if a.vs_generate:
            pairs = [(*decode_rate(server, a.max_tokens), generate_rate(a.model, a.max_tokens, a.activations))
                     for _ in range(a.repeat)]
            result["serve_decode_tokens_per_s"] = [s for s, _, _ in pairs]
            result["serve_engine_step_tokens_per_s"] = [e for _, e, _ in pairs]
            result["generate_decode_tokens_per_s"] = [g for _, _, g in pairs]
            result["serve_over_generate"] = float(np.median([s / g for s, _, g in pairs]))
            result["engine_over_generate"] = float(np.median([e / g for _, e, g in pairs]))
        result["server_rss_mb"] = server.rss_mb()
    finally:
        result["exit_status"] = server.stop()
    print(json.dumps(result, indent=None if a.json else 2))
    if result.get("mismatches") or result.get("server_errors") or result["exit_status"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
