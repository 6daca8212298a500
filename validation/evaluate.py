"""ADGEN evaluation: batched, left-padded generation with the KV cache on either runtime, predictions written as
they come (so a run can resume), the published metrics at the end; and metric parity between the runtimes."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glm2_core.errors import UserError

from .metrics import METRICS, adgen_scores

PREDICTIONS, SETTINGS = "predictions.jsonl", "settings.json"  # beside each other in --out


@dataclass
class EvalSettings:
    max_samples: int | None = None
    batch_size: int = 8
    max_source_length: int = 256
    max_target_length: int = 256
    max_new_tokens: int = 256
    variant: str = "thudm"
    compute_dtype: str = "float32"  # over the weights as stored (float16: the weights in float16 too)


def samples(data: Path, tok, s: EvalSettings) -> list[tuple[str, list[int], str]]:
    """(content, prompt ids, reference) per usable line, as MindFormers' evaluation prepares them."""
    from glm2_ms.data import eval_example, read_jsonl

    lines = read_jsonl(data)
    pairs = lines.pairs[:s.max_samples] if s.max_samples else lines.pairs
    return [(c, *eval_example(tok, c, r, s.max_source_length, s.max_target_length)) for c, r in pairs]


class Runtime:
    """Greedy or sampled continuation of left-padded batches on MindSpore or on the PyTorch reference."""

    def __init__(self, kind: str, model_dir: Path, sampling=None, compute_dtype: str = "float32"):
        from glm2_core.dtypes import weights_for

        self.kind, self.sampling = kind, sampling
        if kind == "ms":
            from glm2_ms.generation import Decoder
            from glm2_ms.loading import from_pretrained, use_cpu

            use_cpu()
            self.decoder = Decoder(from_pretrained(model_dir, weights_for(compute_dtype), compute_dtype))
        elif kind == "torch":
            from .torch_reference import load_reference

            self.decoder = load_reference(model_dir, weights_for(compute_dtype), compute_dtype=compute_dtype)
        else:
            raise UserError(f"runtime must be ms or torch, not {kind!r}")

    def generate(self, batch, max_new_tokens: int, eos: int) -> np.ndarray:
        return self.decoder.generate(batch.input_ids, batch.attention_mask, max_new_tokens=max_new_tokens,
                                     sampling=self.sampling, eos_token_id=eos)


def run_settings(model_dir: Path, data: Path, runtime: str, s: EvalSettings, sampling) -> dict:
    """What the predictions depend on: the model, the data, the runtime and the generation settings. Recorded
    beside the predictions; a resume with other settings would mix two runs' predictions under one name."""
    from dataclasses import asdict

    return {"model": str(Path(model_dir).resolve()), "runtime": runtime, "data": str(Path(data).resolve()),
            "data_sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest(),
            **{k: v for k, v in asdict(s).items() if k not in ("max_samples", "variant")},
            "sampling": None if sampling is None else asdict(sampling)}


def check_resume(out: Path, settings: dict, resume: bool) -> None:
    """Refuse an --out whose predictions are not this run's to continue (before anything is loaded or written)."""
    if not (out / PREDICTIONS).is_file():
        return
    if not resume:
        raise UserError(f"{out / PREDICTIONS}: exists; pass --resume to continue it, or choose another --out")
    try:
        recorded = json.loads((out / SETTINGS).read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{out / SETTINGS}: missing or unreadable, so the predictions beside it cannot be "
                              f"told to be this run's; use another --out") from None
    changed = [k for k in settings if recorded.get(k) != settings[k]]
    if changed:
        key = changed[0]
        raise UserError(f"{out / SETTINGS}: the predictions there are of {key} {recorded.get(key)!r}, this "
                              f"run's is {settings[key]!r}; resume only the same run, or use another --out")


def predict(runtime: Runtime, tok, items, s: EvalSettings, out_file: Path, progress: bool = True) -> list[dict]:
    """Predictions for `items`, appended to `out_file` batch by batch; lines already there (a resumed run) are kept
    and only the rest is predicted."""
    done = [json.loads(line) for line in out_file.read_text().splitlines()] if out_file.is_file() else []
    if [d["content"] for d in done] != [c for c, _, _ in items[:len(done)]]:
        raise UserError(f"{out_file}: holds predictions for other samples; use another --out")
    todo = items[len(done):]
    from tqdm import tqdm

    bar = tqdm(total=len(items), initial=len(done), unit="sample", disable=None if progress else True,
               desc=f"eval ({runtime.kind})")
    with out_file.open("a", encoding="utf-8") as f:
        for start in range(0, len(todo), s.batch_size):
            chunk = todo[start:start + s.batch_size]
            batch = tok.batch([ids for _, ids, _ in chunk])
            out = runtime.generate(batch, s.max_new_tokens, tok.eos_id)
            width = batch.input_ids.shape[1]
            for (content, _, ref), row in zip(chunk, out, strict=True):
                tokens = [int(t) for t in row[width:]]
                record = {"content": content, "reference": ref, "prediction": tok.decode(tokens).strip(),
                          "tokens": tokens}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                done.append(record)
            f.flush()
            bar.update(len(chunk))
    bar.close()
    return done


def evaluate(model_dir: Path, data: Path, out: Path, runtime: str = "ms", s: EvalSettings | None = None,
             sampling=None, progress: bool = True, resume: bool = False) -> dict:
    from glm2_ms.tokenizer import GLM2Tokenizer

    s = s or EvalSettings()
    settings = run_settings(model_dir, data, runtime, s, sampling)
    check_resume(out, settings, resume)
    tok = GLM2Tokenizer.from_pretrained(model_dir)
    items = samples(data, tok, s)
    t = time.perf_counter()
    engine = Runtime(runtime, model_dir, sampling, s.compute_dtype)  # a model that does not load leaves no --out
    load_s = time.perf_counter() - t
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS).write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    preds = predict(engine, tok, items, s, out / PREDICTIONS, progress)
    metrics = adgen_scores([p["prediction"] for p in preds], [p["reference"] for p in preds], s.variant)
    seconds = time.perf_counter() - t
    result = {"model": str(model_dir), "runtime": runtime, "samples": len(preds), "variant": s.variant,
              "metrics": metrics}
    (out / "metrics.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    from glm2_ms.cli import peak_rss_gb

    return {**result, "seconds": seconds, "load_seconds": load_s, "samples_per_s": len(items) / seconds,
            "peak_rss_gb": peak_rss_gb()}


def metric_parity(hf_dir: Path, ms_dir: Path, data: Path, out: Path, s: EvalSettings, min_agreement: float = 1.0,
                  max_metric_diff: float = 0.0, progress: bool = True, resume: bool = False) -> dict:
    """Greedy predictions of the torch reference on `hf_dir` and MindSpore on `ms_dir` over the same samples."""
    import gc

    ref = evaluate(hf_dir, data, out / "torch", "torch", s, progress=progress, resume=resume)
    gc.collect()  # one model in memory at a time: the reference's goes before MindSpore's comes
    got = evaluate(ms_dir, data, out / "ms", "ms", s, progress=progress, resume=resume)
    read = lambda p: [json.loads(x) for x in (p / PREDICTIONS).read_text().splitlines()]
    a, b = read(out / "torch"), read(out / "ms")
    rows, agree = [], 0
    for x, y in zip(a, b, strict=True):
        same = x["tokens"] == y["tokens"]
        agree += same
        if not same:
            first = next((i for i, (u, v) in enumerate(zip(x["tokens"], y["tokens"], strict=False)) if u != v),
                         min(len(x["tokens"]), len(y["tokens"])))
            rows.append({"content": x["content"], "first_diff": first, "torch": x["prediction"],
                         "ms": y["prediction"]})
    diff = {m: got["metrics"][m] - ref["metrics"][m] for m in METRICS}
    report = {"hf_dir": str(hf_dir), "ms_dir": str(ms_dir), "samples": len(a), "agreement": agree / len(a),
              "disagreements": rows, "torch": ref["metrics"], "ms": got["metrics"], "difference": diff,
              "tolerance": {"min_agreement": min_agreement, "max_metric_diff": max_metric_diff}}
    report["passed"] = report["agreement"] >= min_agreement and all(abs(v) <= max_metric_diff for v in diff.values())
    (out / "parity.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (out / "parity.md").write_text(parity_markdown(report))
    return report


def parity_markdown(r: dict) -> str:
    lines = [f"# ADGEN metric parity: {'PASS' if r['passed'] else 'FAIL'}", "",
             f"- PyTorch reference on `{r['hf_dir']}`, MindSpore on `{r['ms_dir']}`, {r['samples']} samples, greedy",
             f"- identical predictions: {r['agreement']:.1%} (tolerance ≥ {r['tolerance']['min_agreement']:.0%}); "
             f"metric difference tolerance ≤ {r['tolerance']['max_metric_diff']}", "",
             "| metric | torch | MindSpore | difference |", "|---|---|---|---|"]
    lines += [f"| {m} | {r['torch'][m]:.4f} | {r['ms'][m]:.4f} | {r['difference'][m]:+.4f} |" for m in METRICS]
    if r["disagreements"]:
        lines += ["", "| sample | first differing token | torch | MindSpore |", "|---|---|---|---|"]
        lines += [f"| {d['content'][:20]} | {d['first_diff']} | {d['torch'][:30]} | {d['ms'][:30]} |"
                  for d in r["disagreements"][:20]]
    return "\n".join(lines) + "\n"
