"""Logits parity between the MindSpore runtime on a converted folder and a reference on the HF folder.

For each prompt (through the chat format) both sides run the same token ids. Compared: the residual stream
after every layer's attention and MLP (max/mean abs diff; the first place it exceeds the threshold is where a
broken conversion shows), the final logits (max abs and relative diff, top-1 agreement, KL divergence), and a
greedy generation (token agreement, first divergence). Thresholds are per compute dtype.
"""
from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from converters.output import staged_folder
from converters.source import Source
from glm2_core.dtypes import BY_NAME, weights_for
from glm2_core.errors import UserError
from glm2_core.files import TOKENIZER_MODEL
from glm2_core.jsonio import write_json
from glm2_core.names import canonical_shapes
from glm2_core.outputs import stamp
from glm2_ms.api import from_pretrained
from glm2_ms.generation import Decoder, check_budget
from glm2_ms.loading import RUNTIME_LAYOUT, block_plan, check_quantize, fits_in_memory, use_cpu
from glm2_ms.model import check_activations
from glm2_ms.tokenizer import GLM2Tokenizer

from .references import REFERENCES, STREAMED, timed
from .streamed import MindSporeLayers, layer_major

DEFAULT_PROMPTS = ["你好", "请介绍一下华为", "晚上睡不着应该怎么办",
                   "类型#上衣*材质#牛仔布*颜色#白色*风格#简约*图案#刺绣*衣样式#外套*衣款式#破洞",
                   "Write a short poem about the sea."]

REPORT = "parity report"  # what our manifest.json calls a --report folder


@dataclass(frozen=True)
class Pair:
    """What a parity run compares: the reference on `hf_dir` against MindSpore on `ms_dir`, both computing in
    `dtype`; `release`: the release both hold where their configs cannot tell (--release)."""
    hf_dir: Path
    ms_dir: Path
    dtype: str = "float32"
    reference: str = "torch"
    release: str | None = None
    quantize: str | None = None  # MindSpore's weight matrices quantized as they load (glm2_ms: q8_0 or q4_0)
    activations: str = "float32"  # what MindSpore's weights in blocks multiply with (glm2_ms: float32 or q8_0)


@dataclass
class Thresholds:
    logits_max_abs: float    # on the final logits
    layer_rel: float         # max abs diff / max |reference| of the residual stream after any attention or MLP
    top1: float              # fraction of positions whose argmax agrees
    greedy: float            # fraction of generated tokens that agree

    @classmethod
    def for_dtype(cls, dtype: str, **overrides) -> Thresholds:
        base = {
            # float32: both sides compute in fp32 (docs/parity.md: measured relative layer differences ~1e-6)
            "float32": cls(logits_max_abs=1e-4, layer_rel=1e-5, top1=1.0, greedy=1.0),
            # float16: each side rounds its fp16 matmuls its own way (MindSpore's kernels vs torch's); bounds from
            # the spread measured on the tiny and the 6B-shaped models (docs/parity.md), with headroom
            "float16": cls(logits_max_abs=5e-2, layer_rel=1e-2, top1=0.98, greedy=0.9),
        }[dtype]
        return cls(**{**asdict(base), **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def for_quantized(cls, kind: str, activations: str = "float32", **overrides) -> Thresholds:
        """A quantized model is not the float model to rounding: no bound on its layers or logits, and top-1
        agreement against the float reference at least QUANTIZED_TOP1's for its weights and activations."""
        base = cls(logits_max_abs=math.inf, layer_rel=math.inf, top1=QUANTIZED_TOP1[kind, activations], greedy=0.0)
        return cls(**{**asdict(base), **{k: v for k, v in overrides.items() if v is not None}})


# the default --min-top1 of glm2-parity --quantize by (weights, activations), below what docs/parity.md measured for
# q8_0 on every prompt; q4_0 has none: on synthetic weights (nearly flat logits) its top-1 says more about the weights
# than about q4_0, so a trained model's bound is the user's --min-top1
QUANTIZED_TOP1 = {("q8_0", "float32"): 0.9, ("q8_0", "q8_0"): 0.85, ("q4_0", "float32"): 0.0, ("q4_0", "q8_0"): 0.0}


def _kl(ref_logits: np.ndarray, got_logits: np.ndarray) -> float:
    """Mean over positions of KL(reference || MindSpore), in nats."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = log_softmax(ref_logits), log_softmax(got_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def compare(prompt: str, ids: list[int], ms_trace, ref_trace, ms_tokens, ref_tokens, seconds: dict,
            th: Thresholds) -> dict:
    """One prompt's verdict from both sides' traces and greedy tokens."""
    ms_by_name = dict(ms_trace)
    stages, first_bad = [], None
    for name, want in ref_trace:
        got = ms_by_name[name]
        diff = np.abs(got.astype(np.float64) - want)
        row = {"stage": name, "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
               "rel": float(diff.max() / max(float(np.abs(want).max()), 1e-30))}
        stages.append(row)
        bad = row["max_abs"] > th.logits_max_abs if name == "logits" else row["rel"] > th.layer_rel
        if first_bad is None and bad:
            first_bad = name
    ref_logits, ms_logits = dict(ref_trace)["logits"], ms_by_name["logits"]
    top1 = float((ref_logits.argmax(-1) == ms_logits.argmax(-1)).mean())
    agree = [a == b for a, b in zip(ms_tokens, ref_tokens, strict=False)]
    first_diff = agree.index(False) if not all(agree) else None
    logits_row = stages[-1]
    result = {
        "prompt": prompt, "tokens": len(ids), "stages": stages, "first_divergence": first_bad,
        "logits_max_abs": logits_row["max_abs"],
        "logits_rel": logits_row["max_abs"] / max(float(np.abs(ref_logits).max()), 1e-30),
        "top1_agreement": top1, "kl": _kl(ref_logits, ms_logits),
        "greedy_agreement": float(np.mean(agree)) if agree else 1.0, "greedy_first_diff": first_diff,
        "ms_tokens": ms_tokens, "ref_tokens": ref_tokens, "seconds": seconds,
    }
    result["passed"] = (first_bad is None and top1 >= th.top1 and result["greedy_agreement"] >= th.greedy)
    return result


class MindSporeSide:
    """The whole MindSpore model as the runtime runs it: to compute in float32, its weights as stored (16-bit ones
    through the native kernel, or cast where used)."""

    def __init__(self, pair: Pair):
        import mindspore as ms

        use_cpu()
        self.ms = ms
        self.model = from_pretrained(pair.ms_dir, dtype=weights_for(pair.dtype), compute_dtype=pair.dtype,
                                     release=pair.release, quantize=pair.quantize, activations=pair.activations)
        self.decoder = Decoder(self.model)

    def trace(self, ids):
        x = self.ms.Tensor([ids], self.ms.int32)
        return [(name, t.asnumpy().astype(np.float32).reshape(len(ids), -1)) for name, t in self.model.trace(x)]

    def generate(self, ids, n):
        """`n` greedy tokens after `ids` (none for 0: the runtime refuses a generation of no tokens)."""
        if n == 0:
            return []
        return self.decoder.generate(np.array([ids], np.int32), max_new_tokens=n, eos_token_id=-1)[0, len(ids):] \
            .tolist()


def whole_model_bytes(ms_dir: Path, dtype: str, release: str | None = None) -> int:
    """What the two whole models of `--whole` hold: MindSpore's weights as it keeps them to compute in `dtype`, the
    reference's in `dtype`."""
    with Source.open(ms_dir, release=release) as src:
        params = sum(int(np.prod(shape)) for shape in canonical_shapes(src.cfg).values())
        kept = weights_for(dtype) or src.dtype
    return params * (BY_NAME[kept].itemsize + BY_NAME[dtype].itemsize)


def fits_whole(ms_dir: Path, dtype: str, release: str | None = None) -> bool:
    """Whether both whole models fit in the memory available now, with a quarter of it to spare for activations,
    the runtimes and the generation step."""
    return fits_in_memory(whole_model_bytes(ms_dir, dtype, release), 0.75)


def _whole(pair: Pair, tok_ids, new_tokens):
    """Both whole models side by side; per prompt: (MindSpore trace, reference trace, tokens both, seconds)."""
    ms_side, ms_load = timed(MindSporeSide, pair)
    ref, ref_load = timed(lambda: REFERENCES[pair.reference](pair.hf_dir, pair.dtype, release=pair.release))
    check_new_tokens(ms_side.model.config, tok_ids, new_tokens, pair.dtype, memory=True)  # the models are in memory now
    rows = []
    for ids in tok_ids:  # --max-new-tokens 0: the traces alone (transformers' generate refuses 0 new tokens)
        (ms_trace, ms_s), (ref_trace, ref_s) = timed(ms_side.trace, ids), timed(ref.trace, ids)
        (ms_tokens, ms_gen_s), (ref_tokens, ref_gen_s) = (timed(ms_side.generate, ids, new_tokens),
                                                          timed(ref.generate, ids, new_tokens)) if new_tokens else \
            (([], 0.0), ([], 0.0))
        rows.append((ms_trace, ref_trace, ms_tokens, ref_tokens,
                     {"ms_forward": ms_s, "ref_forward": ref_s, "ms_generate": ms_gen_s, "ref_generate": ref_gen_s}))
    return rows, {"ms": ms_load, "ref": ref_load}, ref.name


def _streamed(pair: Pair, tok_ids, new_tokens):
    """Each whole model's greedy tokens first, with its weights as stored, computing in `dtype`; each in a process of
    its own where the two whole models would not fit side by side: the process gives all its memory back when it ends
    (MindSpore's memory pool keeps what it held, the whole model's included, after the model is collected:
    benchmarks/results/2026-12-04-figures-from-the-code.md), and nothing of the layer passes sits beside it. Where they
    would fit, in this process (a spawned interpreter costs seconds of imports). Then the traces of each side layer by
    layer (one block in memory)."""
    if pair.reference not in STREAMED:
        raise UserError(f"--reference {pair.reference} runs whole models only (its modules are the folder's "
                        f"own code); use --whole, or --reference {' or '.join(STREAMED)}")
    made = {}  # the reference's layers, which name the modules they run
    sides = {"ref": lambda: made.setdefault("ref", STREAMED[pair.reference](pair.hf_dir, pair.dtype, pair.release)),
             "ms": lambda: MindSporeLayers(pair.ms_dir, pair.dtype, pair.release, pair.quantize,
                                                       pair.activations)}
    traces, trace_s, load_s = {}, {}, {}
    tokens = {side: [[] for _ in tok_ids] for side in sides}
    gen_s = {side: [0.0 for _ in tok_ids] for side in sides}
    run = greedy if fits_whole(pair.ms_dir, pair.dtype, pair.release) else greedy_apart
    for side in sides if new_tokens else ():  # --max-new-tokens 0: the layer passes alone
        tokens[side], gen_s[side], load_s[side] = run(side, pair, tok_ids, new_tokens)
    for side, layers in sides.items():
        traces[side], trace_s[side] = layer_major(layers(), tok_ids)
    rows = [(traces["ms"][k], traces["ref"][k], tokens["ms"][k], tokens["ref"][k],
             {"ms_forward": trace_s["ms"][k], "ref_forward": trace_s["ref"][k], "ms_generate": gen_s["ms"][k],
              "ref_generate": gen_s["ref"][k]}) for k in range(len(tok_ids))]
    return rows, load_s, made["ref"].name


def greedy(side, pair: Pair, tok_ids, new_tokens) -> tuple[list, list, float]:
    """Each prompt's greedy tokens from `side`'s whole model ("ms" or "ref"), weights as stored, and their seconds,
    and its load seconds."""
    make = (lambda: MindSporeSide(pair)) if side == "ms" else \
        (lambda: REFERENCES[pair.reference](pair.hf_dir, pair.dtype, stored=True, release=pair.release))
    model, load_s = timed(make)
    with Source.open(pair.ms_dir, release=pair.release) as src:
        check_new_tokens(src.cfg, tok_ids, new_tokens, pair.dtype, memory=True)  # the model is in memory now
    runs = [timed(model.generate, ids, new_tokens) for ids in tok_ids]
    return [r[0] for r in runs], [r[1] for r in runs], load_s


def greedy_apart(*args) -> tuple[list, list, float]:
    """`greedy` in a spawned process of its own (a fresh interpreter: no fork of this one's threads and memory)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(greedy, *args).result()


def check_new_tokens(cfg, tok_ids: list[list[int]], new_tokens: int, dtype: str, memory: bool) -> None:
    """--max-new-tokens within the model's context after the longest prompt, and (`memory`) its cache within the
    memory available, one prompt at a time (`glm2_ms.generation.check_budget`, the bound of every generation;
    the reference's cache is as large as the runtime's). 0: no generation."""
    if new_tokens < 0:
        raise UserError(f"--max-new-tokens must be 0 (no generation) or more, got {new_tokens}")
    if new_tokens:
        check_budget(cfg, max(map(len, tok_ids)), new_tokens, 1, BY_NAME[dtype].itemsize, "--max-new-tokens",
                     memory=memory)


def run_parity(hf_dir: Path, ms_dir: Path, prompts: list[str], dtype: str = "float32", new_tokens: int = 32,
               reference: str = "torch", thresholds: Thresholds | None = None, streamed: bool | None = None,
               release: str | None = None, quantize: str | None = None, activations: str = "float32") -> dict:
    """`streamed`: run layer by layer (None: when the two whole models would not fit in the memory available);
    `release`: the release both folders hold where their configs cannot tell; `quantize`: MindSpore's weight
    matrices quantized (q8_0 or q4_0) against the float reference, judged by `Thresholds.for_quantized`;
    `activations`: what MindSpore's weights in blocks multiply with (q8_0: llama.cpp's arithmetic)."""
    if reference not in REFERENCES:
        raise UserError(f"unknown reference {reference!r}; expected one of {', '.join(REFERENCES)}")
    if quantize is not None:
        check_quantize(quantize)
        if dtype != "float32":
            raise UserError(f"quantized weights compute in float32, not {dtype}")
    pair = Pair(Path(hf_dir), Path(ms_dir), dtype, reference, release, quantize, activations)
    th = thresholds or (Thresholds.for_quantized(quantize, activations) if quantize else Thresholds.for_dtype(dtype))
    with Source.open(pair.ms_dir, release=release) as src:
        cfg = src.cfg
        check_activations(activations, bool(block_plan(src, src.groups(RUNTIME_LAYOUT)[0], quantize)))
    tok = _tokenizer(pair, cfg)
    tok_ids = [tok.build_chat_input(p) for p in prompts]
    check_new_tokens(cfg, tok_ids, new_tokens, dtype, memory=False)  # before minutes of loading
    if streamed is None:
        streamed = not fits_whole(pair.ms_dir, dtype, release)
    rows, load_s, ref_name = (_streamed if streamed else _whole)(pair, tok_ids, new_tokens)
    results = [compare(p, ids, *row, th) for p, ids, row in zip(prompts, tok_ids, rows, strict=True)]
    return {
        "hf_dir": str(hf_dir), "ms_dir": str(ms_dir), "reference": ref_name, "dtype": dtype, "quantize": quantize,
        "activations": activations,
        "mode": "streamed" if streamed else "whole",
        "model": {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "vocab": cfg.padded_vocab_size},
        "thresholds": {k: None if v == math.inf else v for k, v in asdict(th).items()}, "new_tokens": new_tokens,
        "load_seconds": load_s,
        "prompts": results, "passed": all(r["passed"] for r in results),
    }


def _tokenizer(pair: Pair, cfg):
    """The model's tokenizer and chat format: MS_DIR's tokenizer.model, else HF_DIR's; without one (GLM-4's is not
    bundled), ChatGLM2's, whose ids every GLM takes."""
    for folder in (pair.ms_dir, pair.hf_dir):
        if (folder / TOKENIZER_MODEL).is_file():
            return GLM2Tokenizer.of_model(folder, cfg)
    return GLM2Tokenizer()


MODES = {"whole": "both whole models in memory",
         "streamed": "layer by layer (one block per side in memory), then each whole model's greedy tokens in turn"}


def write_report(report: dict, out: Path, overwrite: bool = False, sources=()) -> None:
    """report.json, report.md, parity.png and our manifest.json in the new folder `out`, which appears only
    complete; an existing one is replaced only with `overwrite`, and only a report folder this toolkit wrote
    (`glm2_core.outputs`)."""
    with staged_folder(out, overwrite, sources, kind=REPORT) as tmp:
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(markdown(report))
        plot(report, tmp / "parity.png")
        stamp(tmp, REPORT)


def _bounds(th: dict) -> str:
    if th["logits_max_abs"] is None:
        return "none on the layers and logits (a quantized model), "
    return (f"logits max abs ≤ {th['logits_max_abs']:g}, every layer's max abs diff ≤ {th['layer_rel']:g} × its "
            f"max |value|, ")


def markdown(r: dict) -> str:
    th = r["thresholds"]
    quantized = f", its weight matrices quantized to {r['quantize']}" if r.get("quantize") else ""
    if r.get("activations", "float32") != "float32":
        quantized += f", their activations in {r['activations']} blocks"
    lines = [f"# Logits parity: {'PASS' if r['passed'] else 'FAIL'}", "",
             f"- MindSpore: `{r['ms_dir']}`{quantized}; reference: {r['reference']} on `{r['hf_dir']}`; compute "
             f"{r['dtype']}; {MODES[r['mode']]}",
             f"- model: {r['model']['layers']} layers, hidden {r['model']['hidden']}, vocab {r['model']['vocab']}",
             f"- thresholds: {_bounds(th)}top-1 ≥ {th['top1']:.0%}, greedy agreement ≥ "
             f"{th['greedy']:.0%} over {r['new_tokens']} tokens", "",
             "| # | prompt | tokens | worst layer max abs (rel) | logits max abs | rel | top-1 | KL | greedy "
             "| first divergence | MS / ref forward s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, p in enumerate(r["prompts"], 1):
        worst_row = max(p["stages"][:-1], key=lambda s: s["rel"])
        worst = f"{worst_row['max_abs']:.2e} ({worst_row['rel']:.1e})"
        where = p["first_divergence"] or ("token " + str(p["greedy_first_diff"]) if p["greedy_first_diff"]
                                          is not None else "none")
        sec = p["seconds"]
        lines.append(f"| {i} | {p['prompt'][:24]} | {p['tokens']} | {worst} | {p['logits_max_abs']:.2e} | "
                     f"{p['logits_rel']:.1e} | {p['top1_agreement']:.0%} | {p['kl']:.1e} | "
                     f"{p['greedy_agreement']:.0%} | {where} | {sec['ms_forward']:.2f} / {sec['ref_forward']:.2f} |")
    bad = [p for p in r["prompts"] if not p["passed"]]
    if bad:
        lines += ["", f"First divergence: **{bad[0]['first_divergence'] or 'greedy tokens'}** "
                      f"(prompt {bad[0]['prompt']!r})"]
    return "\n".join(lines) + "\n"


THRESHOLD_LABEL = "layer threshold"


def legend_labels(prompts: list[str], fonts: list[str] | None = None) -> tuple[list[str], str | None]:
    """The legend's prompt labels and the font file to draw the legend with: the prompts themselves in the first
    font (of `fonts`; by default matplotlib's own, then every installed one) that has all their glyphs — for
    Chinese e.g. Noto Sans CJK or WenQuanYi Zen Hei when installed — else "prompt 1", "prompt 2", … in the default
    font, numbered as in report.md. Either way no glyph is missing, so nothing is drawn as a box or warned about."""
    labels = [p[:16] for p in prompts]
    needed = {ord(c) for text in [*labels, THRESHOLD_LABEL] for c in text}
    for font in _font_files() if fonts is None else fonts:
        if needed <= _glyphs(font):
            return labels, font
    return [f"prompt {i + 1}" for i in range(len(prompts))], None


def _font_files() -> list[str]:
    """matplotlib's default font first, then its other fonts and every font installed on the system (looked up
    now: matplotlib's font cache does not see fonts installed after it was built)."""
    from matplotlib import font_manager

    default = font_manager.findfont(font_manager.FontProperties())
    found = {f.fname for f in font_manager.fontManager.ttflist} | set(font_manager.findSystemFonts())
    # LastResort (bundled with matplotlib) maps every code point to a placeholder box: it has no real glyphs
    return [default, *sorted(f for f in found if f != default and "LastResort" not in Path(f).name)]


def _glyphs(font: str) -> set[int]:
    from matplotlib import ft2font

    try:
        return set(ft2font.FT2Font(font).get_charmap())
    except (OSError, RuntimeError):
        return set()


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.font_manager import FontProperties

    labels, font = legend_labels([p["prompt"] for p in r["prompts"]])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for p, label in zip(r["prompts"], labels, strict=True):
        stages = p["stages"]
        ax.semilogy(range(len(stages)), [max(s["rel"], 1e-12) for s in stages], marker="o", ms=3, label=label)
    names = [s["stage"] for s in r["prompts"][0]["stages"]]
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    if r["thresholds"]["layer_rel"] is not None:  # none for a quantized model
        ax.axhline(r["thresholds"]["layer_rel"], color="red", ls="--", lw=1, label=THRESHOLD_LABEL)
    ax.set_ylabel("max |MindSpore − reference| / max |reference|")
    ax.set_title(f"{r['reference']} vs MindSpore, {r['dtype']}: {'PASS' if r['passed'] else 'FAIL'}")
    ax.legend(prop=FontProperties(fname=font, size=7) if font else FontProperties(size=7))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
