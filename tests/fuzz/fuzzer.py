"""A seeded mutation fuzzer of every reader, driven through the CLIs, holding each run to the bad-input contract:

- exit 0 (the input was still a valid checkpoint: then `verify SRC DST` passes too), or exit 1 with exactly one
  line `error: …` that names the source, no output left behind;
- never a traceback, a crash, another exit status, or a hang (each case has a time limit; the process running
  the cases has a memory limit, so an unbounded allocation ends as a violation too);
- the source folder byte-for-byte unchanged.

Targets: safetensors, .bin (zip, its records deflated, and legacy), .ckpt (with and without MindSpore's CRC
trailer), GGUF (with our digests), config.json, a shard index, manifest.json, and protobuf / JSON strategy files.
Binary files get byte-level mutations (bit flips, interesting integers at random places, cuts, inserts, copies),
deflated records lies in their framing (stated and compressed sizes, data descriptors); JSON files get structural
ones (wrong types, huge or deep values, lone surrogates, missing or extra keys) as well.

`python tests/fuzz/fuzzer.py --seconds 600` runs a longer session and prints the counts; the suite runs a short
one (tests/fuzz/test_fuzz.py) and replays every input in tests/fuzz/corpus/ (each a replacement for one target's
file) — inputs that once failed stay there as regression tests.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import re
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import gguf  # noqa: E402
import numpy as np  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from converters.checkpoint import open_checkpoint  # noqa: E402
from converters.cli import main as convert_cli  # noqa: E402
from converters.convert import convert  # noqa: E402
from converters.formats.ckpt import CRC_MARK, CRC_TRAILER  # noqa: E402
from converters.gguf_out import SHA_KEY  # noqa: E402
from converters.shards import split  # noqa: E402
from converters.shards_cli import main as merge_command  # noqa: E402
from converters.source import Source  # noqa: E402
from converters.strategy import ParamLayout, strategy_bytes  # noqa: E402
from converters.synth import synthesize  # noqa: E402
from glm2_core.config import GLM2Config  # noqa: E402
from glm2_core.names import Layout  # noqa: E402

CORPUS = Path(__file__).parent / "corpus"
CASE_SECONDS = 10
MEMORY_LIMIT = 6 << 30  # address space of the process running the cases
CFG = GLM2Config.preset("tiny", num_layers=2, hidden_size=16, ffn_hidden_size=24, num_attention_heads=2,
                        multi_query_group_num=1, kv_channels=8, padded_vocab_size=64)


@dataclass(frozen=True)
class Target:
    folder: str  # the seed folder the mutated file lives in
    file: str  # the file replaced, relative to the folder
    command: str  # hf2ms, ms2hf or merge


TARGETS = {
    "safetensors": Target("hf-safetensors", "model.safetensors", "hf2ms"),
    "bin": Target("hf-bin", "pytorch_model.bin", "hf2ms"),
    "bin-legacy": Target("hf-legacy", "pytorch_model.bin", "hf2ms"),
    "bin-pickle": Target("hf-bin", "pytorch_model.bin", "hf2ms"),  # records mutated, then CRCs made to fit
    "bin-deflated": Target("hf-deflated", "pytorch_model.bin", "hf2ms"),  # deflated records: sizes, descriptors
    "ckpt": Target("ms", "mindspore_model.ckpt", "ms2hf"),
    "ckpt-crc": Target("ms-crc", "mindspore_model.ckpt", "ms2hf"),
    "gguf": Target("gguf", "model.gguf", "hf2ms"),
    "config": Target("hf-safetensors", "config.json", "hf2ms"),
    "index": Target("hf-sharded", "model.safetensors.index.json", "hf2ms"),
    "manifest": Target("ms", "manifest.json", "ms2hf"),
    "strategy-pb": Target("ranks-pb", "strategy/strategy.ckpt", "merge"),
    "strategy-json": Target("ranks-json", "strategy/strategy.json", "merge"),
}
JSON_TARGETS = {"config", "index", "manifest", "strategy-json"}
RECORD_TARGETS = {"bin-pickle"}
ZIP_FIELD_TARGETS = {"bin-deflated"}


# ---- seeds

def build_seeds(root: Path) -> set[str]:
    """The valid inputs the mutations start from; returns the targets available (legacy .bin needs torch)."""
    root.mkdir()
    synthesize(root / "hf-safetensors", CFG, "float16", "safetensors", max_shard_bytes=10**9)
    synthesize(root / "hf-bin", CFG, "bfloat16", "bin", max_shard_bytes=10**9)
    synthesize(root / "hf-sharded", CFG, "float16", "safetensors", max_shard_bytes=2000)
    convert(root / "hf-safetensors", root / "ms-crc", target=Layout("mindformers"), fmt="ckpt", progress=False)
    shutil.copytree(root / "ms-crc", root / "ms")  # ours carry the trailer; mindspore.save_checkpoint's by default
    ckpt = root / "ms" / "mindspore_model.ckpt"  # do not
    data = ckpt.read_bytes()
    assert data[-CRC_TRAILER:].startswith(CRC_MARK)
    ckpt.write_bytes(data[:-CRC_TRAILER])
    layouts = {n: ParamLayout((2,), (0,) + (-1,) * (len(s) - 1) if s[0] % 2 == 0 else (-1,) * len(s))
               for n, s in _tensor_shapes(root / "ms" / "mindspore_model.ckpt").items()}
    (root / "strategy.ckpt").write_bytes(strategy_bytes(layouts))
    split(root / "ms" / "mindspore_model.ckpt", root / "strategy.ckpt", root / "ranks-pb", progress=False)
    shutil.copyfile(root / "ms" / "config.json", root / "ranks-pb" / "config.json")
    shutil.copytree(root / "ranks-pb", root / "ranks-json")
    (root / "ranks-json" / "strategy" / "strategy.ckpt").unlink()
    doc = {"current_stage": 1, "parallel_strategy_item": {"seed": {"stage": 0, "parallel_strategy": []}},
           "parallel_layout_item": {n: {"dev_matrix": list(lay.dev_matrix), "tensor_map": list(lay.tensor_map),
                                        "param_split_shape": [], "field": 0, "opt_weight_shard_step": 0,
                                        "opt_weight_shard_size": 0} for n, lay in layouts.items()}}
    (root / "ranks-json" / "strategy" / "strategy.json").write_text(json.dumps(doc))
    _gguf_seed(root / "hf-safetensors", root / "gguf")
    shutil.copytree(root / "hf-bin", root / "hf-deflated")
    _deflate(root / "hf-deflated" / "pytorch_model.bin")
    available = set(TARGETS)
    try:
        import torch
    except ImportError:
        available.discard("bin-legacy")
    else:
        shutil.copytree(root / "hf-bin", root / "hf-legacy")
        legacy = root / "hf-legacy" / "pytorch_model.bin"
        torch.save(torch.load(legacy, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    return available


def _gguf_seed(src: Path, out: Path) -> None:
    """A GGUF file of CFG as to-gguf writes one, less its vocabulary (CFG's 64 rows hold no tokenizer; the reader
    needs none): llama.cpp's chatglm keys and names, float16 tensors and our sha256 of each."""
    out.mkdir()
    w = gguf.GGUFWriter(out / "model.gguf", "chatglm")
    w.add_name("chatglm2-6b")
    for add, value in ((w.add_context_length, CFG.seq_length), (w.add_embedding_length, CFG.hidden_size),
                       (w.add_feed_forward_length, CFG.ffn_hidden_size), (w.add_block_count, CFG.num_layers),
                       (w.add_head_count, CFG.num_attention_heads), (w.add_head_count_kv, CFG.multi_query_group_num),
                       (w.add_key_length, CFG.kv_channels), (w.add_layer_norm_rms_eps, CFG.layernorm_epsilon),
                       (w.add_rope_dimension_count, CFG.kv_channels // 2), (w.add_rope_freq_base, 10000.0)):
        add(value)
    digests = []
    with Source.open(src) as s:
        groups, _ = s.groups(Layout("gguf"))
        for g in groups:
            arr = np.ascontiguousarray(s.canonical(g)[0])
            w.add_tensor(g.dst()[0][0], arr)
            digests.append(hashlib.sha256(arr.tobytes()).hexdigest())
    w.add_array(SHA_KEY, digests)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _deflate(path: Path) -> None:
    """The archive written again by Python's zipfile with every record deflated (as some tools re-save them)."""
    with zipfile.ZipFile(path) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, body in members:
            z.writestr(name, body)


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with open_checkpoint(path) as c:
        return {n: t.shape for n, t in c.tensors.items()}


# ---- mutations

INTERESTING = [0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32,
               (1 << 63) - 1, (1 << 64) - 1]


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    out, hows = bytearray(data), []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        n = len(out)
        kind = rng.choice(["flip", "byte", "int", "int", "cut", "insert", "delete", "copy", "zero"])
        at = rng.randrange(max(n, 1))
        if kind == "flip" and n:
            out[at] ^= 1 << rng.randrange(8)
        elif kind == "byte" and n:
            out[at] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif kind == "int" and n:
            width = rng.choice([2, 4, 8])
            value = rng.choice(INTERESTING + [n, n - 1, n + 1, rng.randrange(1 << 16)]) % (1 << 8 * width)
            out[at:at + width] = value.to_bytes(width, rng.choice(["little", "big"]))
        elif kind == "cut":
            del out[at:]
        elif kind == "insert":
            out[at:at] = rng.randbytes(rng.choice([1, 4, 8, 64, 1000]))
        elif kind == "delete":
            del out[at:at + rng.choice([1, 4, 8, 64, 1000])]
        elif kind == "copy" and n:
            src = rng.randrange(n)
            out[at:at] = out[src:src + rng.choice([8, 64, 512])]
        elif kind == "zero":
            out[at:at + rng.choice([4, 64, 4096])] = bytes(len(out[at:at + rng.choice([4, 64, 4096])]))
        hows.append(f"{kind}@{at}")
    return bytes(out), ",".join(hows)


_RAW = {"<HUGE_INT>": "1" + "0" * 4400, "<INF>": "1e400", "<DEEP>": "[" * 100000 + "]" * 100000,
        "<SURROGATE>": '"\\ud800x"', "<NAN>": "NaN"}
JSON_VALUES = [0, -1, 1, 2**31, 2**64, 10**9, 1.5, "", "x", None, True, False, [], {}, [1, "a"], {"a": 1},
               *_RAW]


def mutate_json(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Replace, delete or add one node of the document; some values are spliced in as raw text."""
    try:
        doc = json.loads(data)
    except ValueError:
        return mutate_bytes(data, rng)
    nodes = []  # (container, key) of every value

    def walk(node, depth=0):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for k, v in items:
            nodes.append((node, k))
            if depth < 6:
                walk(v, depth + 1)
    walk(doc)
    if not nodes:
        return mutate_bytes(data, rng)
    container, key = rng.choice(nodes)
    kind = rng.choice(["replace", "replace", "replace", "delete", "add"])
    value = rng.choice(JSON_VALUES)
    if kind == "delete":
        del container[key]
    elif kind == "add" and isinstance(container, dict):
        container[rng.choice(["mystery", "num_layers", "dev_matrix", "__metadata__", "files"])] = value
    else:
        kind = "replace"
        container[key] = value
    text = json.dumps(doc)
    for placeholder, raw in _RAW.items():
        text = text.replace(json.dumps(placeholder), raw)
    return text.encode(), f"json-{kind} {str(key)[:40]!r}={str(value)[:20]!r}"


def mutate_safetensors(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """The JSON header mutated as JSON, framed again with its new length."""
    n = int.from_bytes(data[:8], "little")
    header, how = mutate_json(data[8:8 + n], rng)
    return len(header).to_bytes(8, "little") + header + data[8 + n:], f"header {how}"


def mutate_records(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One record of a zip mutated (the pickle most often), the archive written again by zipfile, so that every
    CRC matches: what is left to catch the damage is the reader's own parsing."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    pick = rng.choice([k for k, (n, _) in enumerate(members) if n.endswith("data.pkl")] * 3 + list(range(len(members))))
    name, body = members[pick]
    members[pick] = (name, mutate_bytes(body, rng)[0])
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n, b in members:
            z.writestr(n, b)
    return out.getvalue(), f"record {name}"


def _zip_entries(data: bytes) -> list[tuple[int, int]]:
    """(central directory entry offset, local header offset) of every record, walked from the end record."""
    end = data.rfind(b"PK\x05\x06")
    count, cd_offset = struct.unpack_from("<H", data, end + 10)[0], struct.unpack_from("<I", data, end + 16)[0]
    entries, at = [], cd_offset
    for _ in range(count):
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, at + 28)
        entries.append((at, struct.unpack_from("<I", data, at + 42)[0]))
        at += 46 + name_len + extra_len + comment_len
    return entries


def mutate_zip_fields(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One deflated record's framing lied about: its stated (uncompressed) or compressed size in the central
    directory, the local header or both; a data-descriptor flag with the local sizes zeroed (as streaming writers
    do); bytes of its deflate stream; or a stream that inflates past its stated size."""
    if rng.random() < 0.2:
        return _inflating_past(data, rng)
    out = bytearray(data)
    entries = _zip_entries(data)
    central, local = rng.choice([e for e in entries if b"/data/" in data[e[0] + 46:e[0] + 46 + 200]] * 3 + entries)
    usize, csize = struct.unpack_from("<I", data, central + 24)[0], struct.unpack_from("<I", data, central + 20)[0]
    kind = rng.choice(["usize-central", "usize-local", "usize-both", "csize-central", "csize-local", "csize-both",
                       "descriptor", "stream"])
    if kind.startswith(("usize", "csize")):
        size = usize if kind.startswith("usize") else csize
        value = rng.choice([0, 1, size - 1, size + 1, size // 2, size * 2, 0xFFFFFFFF, rng.randrange(1 << 20)])
        value %= 1 << 32
        for where, offset in (("central", central + (24 if kind.startswith("usize") else 20)),
                              ("local", local + (22 if kind.startswith("usize") else 18))):
            if kind.endswith((where, "both")):
                struct.pack_into("<I", out, offset, value)
        return bytes(out), f"{kind}={value}"
    if kind == "descriptor":
        struct.pack_into("<H", out, local + 6, struct.unpack_from("<H", data, local + 6)[0] | 8)
        if rng.random() < 0.5:
            struct.pack_into("<III", out, local + 14, 0, 0, 0)
        return bytes(out), "descriptor flag"
    name_len, extra_len = struct.unpack_from("<HH", data, local + 26)
    start = local + 30 + name_len + extra_len
    at = start + rng.randrange(max(csize, 1))
    out[at] ^= 1 << rng.randrange(8)
    return bytes(out), f"stream@{at - start}"


def _inflating_past(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A data record deflated from its bytes plus more, its stated size left as the tensor's."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    pick = rng.choice([k for k, (n, _) in enumerate(members) if "/data/" in n])
    extra = rng.choice([1, 64, 4096])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for k, (n, b) in enumerate(members):
            z.writestr(n, b + b"\0" * extra if k == pick else b)
    out = bytearray(buf.getvalue())
    for central, local in _zip_entries(out):
        name_len = struct.unpack_from("<H", out, central + 28)[0]
        if bytes(out[central + 46:central + 46 + name_len]).decode() == members[pick][0]:
            for offset in (central + 24, local + 22):
                struct.pack_into("<I", out, offset, len(members[pick][1]))
    return bytes(out), f"inflates {extra} past {members[pick][0]}"


def mutate_gguf_header(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Byte mutations within the metadata and tensor table only (before the first tensor's data), where the parser
    works; elsewhere most mutations meet a digest."""
    end = data.find(b"blk.1.ffn_down.weight")  # the last entries of the tensor table
    end = len(data) if end < 0 else end + 64
    head, how = mutate_bytes(data[:end], rng)
    return head + data[end:], f"header {how}"


def mutation_for(target: str, rng: random.Random):
    if target == "gguf" and rng.random() < 0.7:
        return mutate_gguf_header
    if target in RECORD_TARGETS:
        return mutate_records
    if target in ZIP_FIELD_TARGETS and rng.random() < 0.7:
        return mutate_zip_fields
    if target == "safetensors" and rng.random() < 0.5:
        return mutate_safetensors
    return mutate_json if target in JSON_TARGETS and rng.random() < 0.7 else mutate_bytes


# ---- running one case

class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _invoke(command: str, src: Path, dst: Path):
    if command == "merge":
        strategy = next((src / "strategy").iterdir())
        return CliRunner().invoke(merge_command, [str(src), "--strategy", str(strategy), str(dst), "--quiet"])
    return CliRunner().invoke(convert_cli, [command, str(src), str(dst)] + (["--quiet"] if command != "verify" else []))


def run_case(seeds: Path, work: Path, target: str, data: bytes) -> tuple[str, str]:
    """('ok' | 'refused' | 'violation', detail) for one mutated input."""
    t = TARGETS[target]
    src, dst = work / "src", work / "dst"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(seeds / t.folder, src)
    (src / t.file).write_bytes(data)
    before = _digest(src)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        result = _invoke(t.command, src, dst)
        verified = _invoke("verify", src, dst) if result.exit_code == 0 and t.command != "merge" else None
    except CaseTimeout:
        return "violation", f"no answer within {CASE_SECONDS} s"
    finally:
        signal.alarm(0)
    lines = result.stderr.strip().splitlines()
    leftovers = [p.name for p in work.iterdir() if p.name not in ("src", "dst")]
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(result.exception)).strip().splitlines()
        return "violation", f"{type(result.exception).__name__}: {result.exception!s:.300} at {tb[-3:]}"
    if _digest(src) != before:
        return "violation", "the source changed"
    if result.exit_code == 0:
        if verified is not None and verified.exit_code != 0:
            return "violation", f"converted, but verify SRC DST disagrees: {verified.output[-300:]}"
        return "ok", ""
    if result.exit_code != 1:
        return "violation", f"exit status {result.exit_code}: {result.output[-300:]}"
    if len(lines) != 1 or not lines[0].startswith("error: ") or str(src) not in lines[0]:
        return "violation", f"not one line naming the source: {result.stderr[-400:]!r}"
    if dst.exists() or leftovers:
        return "violation", f"output left behind: {dst.exists()=} {leftovers}"
    return "refused", lines[0]


def error_kind(line: str, src: Path) -> str:
    """An error line without its paths and numbers: what kind of refusal it is."""
    return re.sub(r"\d+", "N", line.replace(str(src), "SRC"))[:90]


def fuzz(seconds: float, seed: int, cases: int | None = None, save: Path | None = None,
         log=print) -> tuple[Counter, list[tuple[str, str, str]]]:
    """Round-robin over the targets until the time or case budget is spent; returns counts and violations."""
    rng = random.Random(seed)
    counts: Counter = Counter()
    kinds: dict[str, set] = {}
    violations = []
    with tempfile.TemporaryDirectory(prefix="glm2-fuzz-") as tmp:
        seeds = Path(tmp) / "seeds"
        available = sorted(build_seeds(seeds))
        originals = {t: (seeds / TARGETS[t].folder / TARGETS[t].file).read_bytes() for t in available}
        started, n = time.monotonic(), 0
        while time.monotonic() - started < seconds and (cases is None or n < cases):
            target = available[n % len(available)]
            n += 1
            data, how = mutation_for(target, rng)(originals[target], rng)
            outcome, detail = run_case(seeds, Path(tmp) / "work", target, data)
            counts[(target, outcome)] += 1
            if outcome == "refused":
                kinds.setdefault(target, set()).add(error_kind(detail, Path(tmp) / "work" / "src"))
            if outcome == "violation":
                violations.append((target, how, detail))
                log(f"VIOLATION {target} ({how}): {detail}")
                if save is not None:
                    keep = save / target / f"{hashlib.sha256(data).hexdigest()[:12]}{Path(TARGETS[target].file).suffix}"
                    keep.parent.mkdir(parents=True, exist_ok=True)
                    keep.write_bytes(data)
                    log(f"  saved as {keep}")
    for target in available:
        log(f"{target:>14}: {counts[(target, 'ok')]:>5} converted, {counts[(target, 'refused')]:>5} refused "
            f"({len(kinds.get(target, ()))} kinds of error), {counts[(target, 'violation')]:>3} violations")
    total = sum(counts.values())
    log(f"{total} cases in {time.monotonic() - started:.0f} s (seed {seed}): "
        f"{sum(v for (_, o), v in counts.items() if o == 'violation')} violations")
    return counts, violations


def replay_corpus(log=print) -> list[tuple[str, str, str]]:
    """Every saved input through the contract again."""
    violations = []
    with tempfile.TemporaryDirectory(prefix="glm2-corpus-") as tmp:
        seeds = Path(tmp) / "seeds"
        available = build_seeds(seeds)
        for path in sorted(CORPUS.glob("*/*")):
            if path.parent.name not in available:
                continue
            outcome, detail = run_case(seeds, Path(tmp) / "work", path.parent.name, path.read_bytes())
            if outcome == "violation":
                violations.append((path.parent.name, path.name, detail))
                log(f"VIOLATION {path}: {detail}")
    return violations


def limit_memory(nbytes: int = MEMORY_LIMIT) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget (default 60)")
    parser.add_argument("--cases", type=int, default=None, help="stop after this many cases")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--save", type=Path, default=None, help="save violating inputs under this folder "
                                                                "(tests/fuzz/corpus to keep them as regressions)")
    parser.add_argument("--corpus", action="store_true", help="replay tests/fuzz/corpus instead of fuzzing")
    args = parser.parse_args()
    limit_memory()
    if args.corpus:
        bad = replay_corpus()
        print(f"{len(list(CORPUS.glob('*/*')))} corpus inputs, {len(bad)} violations")
    else:
        _, bad = fuzz(args.seconds, args.seed, args.cases, args.save)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
