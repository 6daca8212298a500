"""ADGEN evaluation: batched, left-padded generation with the KV cache on either runtime, predictions written as
they come (so a run can resume), the published metrics at the end; and metric parity between the runtimes."""
from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from converters.output import no_space, staged_folder
from glm2_core.dtypes import BY_NAME, weights_for
from glm2_core.errors import UserError
from glm2_core.jsonio import json_text, write_json
from glm2_core.outputs import absolute, check_output, refuse_overlap, stamp, written_entries
from glm2_ms.api import open_model
from glm2_ms.cli import peak_rss_gb, sampling_config
from glm2_ms.data import eval_example, read_jsonl
from glm2_ms.generation import Decoder, check_budget
from glm2_ms.loading import use_cpu
from glm2_ms.sampling import SamplingConfig

from .metrics import METRICS, adgen_scores
from .torch_reference import reference_from

PREDICTIONS, SETTINGS = "predictions.jsonl", "settings.json"  # beside each other in --out
TOKEN_BYTES = 32  # the most a prediction's line takes per new token in practice: its id in "tokens", its text
KIND, PARITY_KIND = "eval", "eval-parity"  # what our manifest.json calls an --out folder


@dataclass
class EvalSettings:
    max_samples: int | None = None
    batch_size: int = 8
    max_source_length: int = 256
    max_target_length: int = 256
    max_new_tokens: int = 256
    variant: str = "thudm"
    compute_dtype: str = "float32"  # over the weights as stored (float16: the weights in float16 too)
    quantize: str | None = None  # the weight matrices quantized as they load (MindSpore runtime only)
    activations: str = "float32"  # what weights in blocks multiply with (MindSpore runtime only)


@dataclass(frozen=True)
class EvalRequest:
    """One evaluation (or metric parity): every glm2-eval flag is a field here, or of `settings` (what the
    predictions depend on, recorded for --resume), so that a new flag is a field and an option."""
    data: Path
    out: Path
    settings: EvalSettings = field(default_factory=EvalSettings)
    sampling: SamplingConfig | None = None  # None: greedy, recorded as no sampling settings
    runtime: str = "ms"  # or "torch": the PyTorch reference
    release: str | None = None  # the release the folder holds where it cannot tell (--release)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    min_agreement: float = 1.0  # metric parity: fraction of samples whose predictions must be identical
    max_metric_diff: float = 0.0  # metric parity: largest allowed |MindSpore − torch| per metric (points)

    @classmethod
    def from_flags(cls, data: Path, out_dir: Path, quiet: bool, sample: bool, temperature: float, top_k: int,
                   top_p: float, repetition_penalty: float, seed: int, **flags) -> EvalRequest:
        """From glm2-eval's flags: the settings' and the sampling's gathered, the rest passed as they are."""
        settings = EvalSettings(**{f.name: flags.pop(f.name) for f in fields(EvalSettings)})
        sampling = sampling_config(sample, temperature, top_k, top_p, repetition_penalty, seed)
        return cls(data, out_dir, settings, sampling, progress=not quiet, **flags)


def samples(data: Path, tok, s: EvalSettings) -> list[tuple[str, list[int], str]]:
    """(content, prompt ids, reference) per usable line, as MindFormers' evaluation prepares them."""
    lines = read_jsonl(data)
    pairs = lines.pairs[:s.max_samples] if s.max_samples else lines.pairs
    return [(c, *eval_example(tok, c, r, s.max_source_length, s.max_target_length)) for c, r in pairs]


class Runtime:
    """Greedy or sampled continuation of left-padded batches on MindSpore or on the PyTorch reference."""

    def __init__(self, kind: str, folder, sampling=None, settings: EvalSettings | None = None):
        """`folder`: the model folder opened (glm2_ms.loading.ModelFolder); `settings`: its compute dtype, and
        glm2_ms's quantization and activations."""
        self.kind, self.sampling = kind, sampling
        settings = settings or EvalSettings()
        compute_dtype = settings.compute_dtype
        if kind == "ms":
            use_cpu()
            self.decoder = Decoder(folder.load(weights_for(compute_dtype), compute_dtype, settings.quantize,
                                               activations=settings.activations))
            self.config = self.decoder.model.config
        elif settings.quantize is not None or settings.activations != "float32":
            raise UserError(f"--quantize and --activations are for the MindSpore runtime, not {kind}")
        elif kind == "torch":
            self.decoder = reference_from(folder.source, weights_for(compute_dtype), compute_dtype=compute_dtype)
            self.config = self.decoder.config
        else:
            raise UserError(f"runtime must be ms or torch, not {kind!r}")

    def generate(self, batch, max_new_tokens: int, eos: int) -> np.ndarray:
        return self.decoder.generate(batch.input_ids, batch.attention_mask, max_new_tokens=max_new_tokens,
                                     sampling=self.sampling, eos_token_id=eos)


def run_settings(model_dir: Path, data: Path, runtime: str, s: EvalSettings, sampling,
                 release: str | None = None) -> dict:
    """What the predictions depend on: the model, the data, the runtime and the generation settings. Recorded
    beside the predictions; a resume with other settings would mix two runs' predictions under one name."""
    try:
        digest = hashlib.sha256(Path(data).read_bytes()).hexdigest()
    except OSError as exc:
        raise UserError(f"{data}: cannot read data ({exc.strerror or exc})") from None
    return {"model": str(Path(model_dir).resolve()), "runtime": runtime, "data": str(Path(data).resolve()),
            "data_sha256": digest, **{k: v for k, v in asdict(s).items() if k not in ("max_samples", "variant")},
            "sampling": None if sampling is None else asdict(sampling), **({"release": release} if release else {})}


def check_out(out: Path, resume: bool, overwrite: bool, sources, marker: str = PREDICTIONS, kind: str = KIND) -> bool:
    """The output rules for --out (`glm2_core.outputs`: apart from the model and the data, an existing folder only
    with --resume, which continues it, or --overwrite, which replaces a folder this toolkit wrote); whether the run
    continues the one in `out` (`marker`: what a run there has written)."""
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    refuse_overlap(out, sources, "--out")
    out = absolute(out)
    if resume and (out / marker).exists():
        return True
    if not overwrite and (out.exists() or out.is_symlink()):
        if resume:
            raise UserError(f"{out}: holds no run to resume ({marker} is missing); choose another --out")
        hint = "pass --resume to continue it, or --overwrite to replace it" if (out / marker).exists() else \
            "pass --overwrite to replace it"
        raise UserError(f"{out}: already exists ({hint})")
    check_output(out, overwrite, sources, "--out", kind=kind)
    return False


def check_resume(out: Path, settings: dict) -> None:
    """Refuse an --out whose predictions are not this run's to continue (before anything is loaded or written)."""
    try:
        recorded = json.loads((out / SETTINGS).read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{out / SETTINGS}: missing or unreadable, so the predictions beside it cannot be "
                        f"told to be this run's; use another --out") from None
    unset = asdict(EvalSettings())  # a setting a run did not record (it predates it) was at its default
    keys = [*settings, *(k for k in recorded if k not in settings)]
    was, now = ({k: d.get(k, unset.get(k)) for k in keys} for d in (recorded, settings))
    changed = [k for k in keys if was[k] != now[k]]
    if changed:
        key = changed[0]
        raise UserError(f"{out / SETTINGS}: the predictions there are of {key} {was[key]!r}, this run's is "
                        f"{now[key]!r}; resume only the same run, or use another --out")


def check_lengths(cfg, items, s: EvalSettings, memory: bool) -> None:
    """--max-new-tokens after the longest prompt within the model's context and (`memory`) a batch's cache within
    the memory available: the bound of every generation (`glm2_ms.generation.check_budget`)."""
    check_budget(cfg, max(len(ids) for _, ids, _ in items), s.max_new_tokens, min(s.batch_size, len(items)),
                 BY_NAME[s.compute_dtype].itemsize, "--max-new-tokens", "--batch-size", memory=memory)


def predict(runtime: Runtime, tok, items, s: EvalSettings, out_file: Path, progress: bool = True) -> list[dict]:
    """Predictions for `items`, appended to `out_file` batch by batch; lines already there (a resumed run) are kept
    and only the rest is predicted."""
    done = [json.loads(line) for line in out_file.read_text().splitlines()] if out_file.is_file() else []
    if [d["content"] for d in done] != [c for c, _, _ in items[:len(done)]]:
        raise UserError(f"{out_file}: holds predictions for other samples; use another --out")
    todo = items[len(done):]

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


def start_folder(out: Path, kind: str, overwrite: bool, files: dict[str, str] | None = None, need: int = 0) -> None:
    """A new run folder holding `files` (name → text) and our manifest, appearing whole (replacing, with
    `overwrite`, one this toolkit wrote): an interrupted run leaves a folder that --resume continues and --overwrite
    may replace. Refused when the disk has not the `need` bytes the whole run will write."""
    with staged_folder(out, overwrite, need=need, kind=kind) as tmp:
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        stamp(tmp, kind)


def expected_bytes(items, s: EvalSettings, settings: str) -> int:
    """About what an --out folder holds once its run ends: the settings and a line per sample (its content and
    reference, and at most TOKEN_BYTES per new token)."""
    lines = sum(len(json.dumps({"content": c, "reference": r}, ensure_ascii=False).encode()) +
                TOKEN_BYTES * s.max_new_tokens for c, _, r in items)
    return len(settings.encode()) + lines


def whole_lines(path: Path) -> int:
    """Cut a predictions file after its last whole line (a write the disk stopped halfway); returns how many
    lines it keeps."""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    os.truncate(path, keep)
    return data.count(b"\n", 0, keep)


def restamp(folder: Path, kind: str, names: set[str]) -> None:
    """Our manifest brought up to date with the `names` written since; left as it was when the folder holds anything
    else (a resumed --out may have gained a file of the user's: claiming it would let --overwrite delete it)."""
    if {p.name for p in folder.iterdir()} <= (written_entries(folder) or set()) | names:
        stamp(folder, kind)


class EvalRun:
    """One evaluation, in two steps: every check and the model's load (nothing written), then `run`, which writes
    --out. The model is loaded before --out is made: a model that does not load leaves no folder."""

    def __init__(self, model_dir: Path, request: EvalRequest, within: str | None = None):
        """`within`: the request's `out` lies in a folder of that kind (metric parity's), whose output rules the
        caller has checked and whose manifest lists `out` as soon as it is made."""
        r = self.request = request
        s = r.settings
        self.model_dir, self.out, self.within = model_dir, Path(r.out), within
        self.settings = run_settings(model_dir, r.data, r.runtime, s, r.sampling, r.release)
        self.continued = r.resume and (self.out / PREDICTIONS).is_file() if within else \
            check_out(self.out, r.resume, r.overwrite, (model_dir, r.data))
        if self.continued:
            check_resume(self.out, self.settings)
        with open_model(model_dir, release=r.release) as folder:  # opened once: config, tokenizer, weights
            self.tok = folder.tokenizer
            self.items = samples(r.data, self.tok, s)
            check_lengths(folder.config, self.items, s, memory=False)  # before the load, which may take minutes
            clock = time.perf_counter()
            self.engine = Runtime(r.runtime, folder, r.sampling, s)
        self.load_s, self.clock = time.perf_counter() - clock, clock
        check_lengths(self.engine.config, self.items, s, memory=True)  # the model is in memory now

    def run(self) -> dict:
        r, out, s = self.request, self.out, self.request.settings
        settings = json_text(self.settings)
        need, free = expected_bytes(self.items, s, settings), shutil.disk_usage(out.parent).free
        try:
            if not self.continued:
                start_folder(out, KIND, r.overwrite, {SETTINGS: settings, PREDICTIONS: ""}, need)
                if self.within:
                    restamp(out.parent, self.within, {out.name})
            preds = predict(self.engine, self.tok, self.items, s, out / PREDICTIONS, r.progress)
            metrics = adgen_scores([p["prediction"] for p in preds], [p["reference"] for p in preds], s.variant)
            result = {"model": str(self.model_dir), "runtime": r.runtime, "samples": len(preds),
                      "variant": s.variant, "metrics": metrics}
            write_json(out / "metrics.json", result)
            restamp(out, KIND, {SETTINGS, PREDICTIONS, "metrics.json"})
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise UserError(f"{out}: cannot write ({exc.strerror or exc}); the predictions written so far are "
                                f"kept (--resume continues them)") from None
            kept = whole_lines(out / PREDICTIONS)
            raise UserError(f"{out}: {no_space(out, need, free, out.parent)}; the {kept} whole predictions written "
                            f"are kept (--resume continues them once there is room)") from None
        seconds = time.perf_counter() - self.clock

        return {**result, "seconds": seconds, "load_seconds": self.load_s,
                "samples_per_s": len(self.items) / seconds, "peak_rss_gb": peak_rss_gb()}


def evaluate(model_dir: Path, request: EvalRequest) -> dict:
    """The ADGEN metrics of the model in `model_dir` on the request's data; predictions, settings and metrics in its
    `out`."""
    return EvalRun(model_dir, request).run()


def metric_parity(hf_dir: Path, ms_dir: Path, request: EvalRequest) -> dict:
    """Greedy predictions of the torch reference on `hf_dir` and MindSpore on `ms_dir` over the same samples, in
    out/torch and out/ms; `out` itself is made once the reference has loaded."""
    r, out = request, request.out
    continued = check_out(out, r.resume, r.overwrite, (hf_dir, ms_dir, r.data), marker="torch", kind=PARITY_KIND)
    side = lambda runtime: replace(r, out=out / runtime, runtime=runtime, sampling=None, overwrite=False)
    ref_run = EvalRun(hf_dir, side("torch"), within=PARITY_KIND)
    if not continued:
        start_folder(out, PARITY_KIND, r.overwrite)
    ref = ref_run.run()
    del ref_run
    gc.collect()  # one model in memory at a time: the reference's goes before MindSpore's comes
    got = EvalRun(ms_dir, side("ms"), within=PARITY_KIND).run()
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
              "tolerance": {"min_agreement": r.min_agreement, "max_metric_diff": r.max_metric_diff}}
    report["passed"] = report["agreement"] >= r.min_agreement and \
        all(abs(v) <= r.max_metric_diff for v in diff.values())
    write_json(out / "parity.json", report)
    (out / "parity.md").write_text(parity_markdown(report))
    restamp(out, PARITY_KIND, {"parity.json", "parity.md"})
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
