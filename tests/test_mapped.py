"""Weights used where their GGUF file lies: the runtime's parameters are the file's pages, mapped copy-on-write, read
as the first prompt uses them while a second thread checks them against the file's sha256s. The same tokens and
logits as weights read into memory; the file never written; a corrupt tensor found before anything computed from
it is handed out, and named."""
import errno
import hashlib
import mmap
import subprocess

import mindspore as ms  # noqa: TID253
import numpy as np
import pytest
from test_gguf import BIN, read_gguf
from test_quantized import PROMPT

from converters.formats.gguf_io import GGUFFile
from glm2_core.errors import CheckpointError
from glm2_ms.api import from_pretrained
from glm2_ms.model import linears

ms.set_device("CPU")
KINDS = ["float16", "q8_0", "q4_0"]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mapping_of(path) -> list[tuple[int, int]]:
    """The address ranges this process maps `path` at."""
    out = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(str(path)):
                start, end = (int(a, 16) for a in line.split()[0].split("-"))
                out.append((start, end))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_the_weights_are_the_files_pages_and_compute_what_read_weights_do(gguf_files, kind):
    path = gguf_files[kind]
    before = digest(path)
    mapped = from_pretrained(path, compute_dtype="float32")
    spans = mapping_of(path)
    weights = [cell.weight for cell in linears(mapped)]
    assert spans and all(any(a <= w.data_ptr() < b for a, b in spans) for w in weights)
    read = from_pretrained(path, compute_dtype="float32", mapped=False)
    assert not any(any(a <= cell.weight.data_ptr() < b for a, b in spans) for cell in linears(read))
    tokens = mapped.generate(PROMPT, max_new_tokens=10)
    np.testing.assert_array_equal(tokens, read.generate(PROMPT, max_new_tokens=10))
    np.testing.assert_array_equal(mapped(ms.Tensor(PROMPT)).asnumpy(), read(ms.Tensor(PROMPT)).asnumpy())
    del mapped, weights
    assert digest(path) == before


def corrupt(path, tensor: str, tmp_path):
    """A copy of `path` with one bit of `tensor` flipped."""
    out = tmp_path / "corrupt.gguf"
    out.write_bytes(path.read_bytes())
    t = read_gguf(out)[1][tensor]
    with open(out, "r+b") as f:
        f.seek(int(t.data_offset) + 10)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    return out


@pytest.mark.parametrize("kind", ["float16", "q4_0"])
def test_a_corrupt_tensor_stops_the_first_prompt_and_every_one_after(gguf_files, kind, tmp_path):
    path = corrupt(gguf_files[kind], "blk.1.ffn_up.weight", tmp_path)
    before = digest(path)
    model = from_pretrained(path, compute_dtype="float32")  # nothing checked yet: the check runs beside the prompt
    for _ in range(2):
        with pytest.raises(CheckpointError, match=r"tensor 'blk.1.ffn_up.weight' does not match the sha256"):
            model.generate(PROMPT, max_new_tokens=4)
    with pytest.raises(CheckpointError, match="blk.1.ffn_up.weight"):
        model.trace(ms.Tensor(PROMPT))
    direct = from_pretrained(path, compute_dtype="float32")
    with pytest.raises(CheckpointError, match="blk.1.ffn_up.weight"):
        direct(ms.Tensor(PROMPT))  # the forward itself: no logits before the checks
    with pytest.raises(CheckpointError, match="blk.1.ffn_up.weight"):
        from_pretrained(path, compute_dtype="float32", mapped=False)
    for flag in ("--mmap", "--no-mmap"):  # found beside the first prompt, or as the weights are read
        r = subprocess.run([BIN / "glm2-generate", path, "--prompt", "你好", "--max-new-tokens", "4", flag],
                           capture_output=True, text=True)
        assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1, r.stdout + r.stderr
        assert r.stderr.startswith(f"error: {path}: tensor 'blk.1.ffn_up.weight' does not match the sha256")
    assert digest(path) == before


def test_a_file_without_checksums_is_read_through(gguf_files):
    """Where the file records no sha256 (another tool's, or --no-crc-check), the bytes are read into the page cache
    and nothing is owed; a file replaced since it was mapped is refused."""
    with GGUFFile(gguf_files["q8_0"], verify=False) as f:
        for ref in f.tensors.values():
            view = ref.mapped()
            ref.prefetch()
            assert ref.prove is None
            want = ref.blocks[1]() if ref.blocks else ref.read()
            assert np.array_equal(view, want), ref.name


def test_a_file_replaced_while_mapped_is_refused(gguf_files, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(gguf_files["q8_0"].read_bytes())
    with GGUFFile(path) as f:
        ref = f.tensors["blk.0.ffn_up.weight"]
        ref.mapped()
        replacement = tmp_path / "other.gguf"
        replacement.write_bytes(path.read_bytes())
        replacement.replace(path)
        with pytest.raises(CheckpointError, match="replaced by another file while the model was loaded"):
            ref.prefetch()


def test_a_file_system_that_cannot_map_is_read_instead(gguf_files, monkeypatch):
    def refuse(self, offset, size):
        raise OSError(errno.ENODEV, "No such device")  # what mmap raises where the file system cannot map

    monkeypatch.setattr(GGUFFile, "_view", refuse)
    model = from_pretrained(gguf_files["q8_0"], compute_dtype="float32")
    assert "_proofs" not in model.__dict__
    np.testing.assert_array_equal(model.generate(PROMPT, max_new_tokens=4),
                                  from_pretrained(gguf_files["q8_0"], mapped=False).generate(PROMPT, max_new_tokens=4))


def present_pages(start: int, end: int) -> int:
    """How many pages of [start, end) this process has mapped in memory (/proc/self/pagemap's present bit)."""
    page = mmap.PAGESIZE
    first, last = -(-start // page), end // page
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(8 * first)
        entries = np.frombuffer(pagemap.read(8 * max(0, last - first)), np.uint64)
    return int((entries >> np.uint64(63)).sum())


@pytest.mark.parametrize("kind", KINDS)
def test_a_mapped_embedding_keeps_none_of_the_pages_its_lookups_map(gguf_files, kind):
    """The kernel maps a page cache's large folio whole around each embedding row a lookup reads: a prompt's rows
    would keep far more of the table in memory than they are. A table that is its file's mapping drops its pages
    after each lookup (the page cache keeps them), and looks up the same rows again."""
    model = from_pretrained(gguf_files[kind], compute_dtype="float32")
    emb = model.transformer.embedding
    table = emb.embedding_weight
    start = table.data_ptr()
    end = start + table.nbytes
    assert any(a <= start and end <= b for a, b in mapping_of(gguf_files[kind]))
    ids = ms.Tensor(np.random.default_rng(0).integers(0, table.shape[0], (1, 300)).astype(np.int32))
    looked_up = emb(ids).asnumpy()
    assert present_pages(start, end) == 0
    dropper, emb.drop_pages = emb.drop_pages, None
    np.testing.assert_array_equal(emb(ids).asnumpy(), looked_up)
    assert present_pages(start, end) > 0  # (what it keeps without)
    dropper()
    assert present_pages(start, end) == 0
