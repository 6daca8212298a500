import hashlib
import importlib.abc
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import MISSING

import validation  # noqa: F401  (first: it sends library caches out of the temp dir, whichever test imports torch)
from converters.convert import convert
from converters.gguf_out import to_gguf
from converters.synth import synthesize
from glm2_core.config import GLM2Config
from glm2_core.names import Layout
from glm2_core.quants import KINDS as QUANT_KINDS
from glm2_ms import kernels

DATA = Path(__file__).parent / "data"
# The suite runs on two xdist workers, a module at a time each (its module fixtures, such as test_distributed's
# msrun runs, built once), in this order: the slowest modules first (`pytest --durations=40` shows which), so that
# the two workers end together; the rest as collected.
SLOWEST = ("test_distributed.py", "test_training.py", "test_training_faults.py", "test_faults.py", "test_finetune.py",
           "test_soak.py", "test_parity.py", "test_generation.py", "test_runtime_cli.py", "test_glm4_0414.py",
           "test_fuzz.py", "test_finetune_safety.py", "test_readme.py", "test_releases.py", "test_demo.py",
           "test_disk_full.py", "test_shards.py", "test_runtime_bounds.py")


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path`: to prove a source was left untouched."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session", autouse=True)
def system_temp_dir(tmp_path_factory):
    """The system temp dir as the code under test sees it (TMPDIR, in this process and every subprocess): a fresh
    folder, which must be empty when the suite ends, whatever the tests ran."""
    tmp = tmp_path_factory.mktemp("system-temp")
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = None  # gettempdir() looks at TMPDIR again
    yield tmp
    if saved is None:
        del os.environ["TMPDIR"]
    else:
        os.environ["TMPDIR"] = saved
    tempfile.tempdir = None
    assert not list(tmp.iterdir()), f"the tests left {sorted(p.name for p in tmp.iterdir())} in the temp dir"


@pytest.fixture
def small_disk(tmp_path):
    """A factory of small disks: `small_disk(nbytes)` mounts a tmpfs of that size (root only; the test is skipped
    otherwise, saying why) and returns its folder; every one is unmounted when the test ends, however it ends."""
    mounted = []

    def mount(nbytes: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a small disk is a tmpfs mount, which needs root")
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={nbytes}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.fixture(scope="session")
def tiny_cfg() -> GLM2Config:
    return GLM2Config.preset("tiny")


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """Synthetic HF ChatGLM2 folders, one per (format, dtype), sharded like the release."""
    made = {}

    def get(fmt: str = "bin", dtype: str = "float16") -> Path:
        key = (fmt, dtype)
        if key not in made:
            out = tmp_path_factory.mktemp("hf") / f"tiny-{fmt}-{dtype}"
            synthesize(out, GLM2Config.preset("tiny"), dtype, fmt, seed=1, max_shard_bytes=6 * 10**6)
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="session")
def ms_tiny(hf_tiny, tmp_path_factory):
    """MindSpore folders converted from `hf_tiny`'s .bin folders (MindFormers names, .ckpt), one per dtype: the
    tiny model the runtime tests load (read only: a test that writes beside a model copies it)."""
    made = {}

    def get(dtype: str = "float16") -> Path:
        if dtype not in made:
            out = tmp_path_factory.mktemp("ms") / f"tiny-{dtype}"
            convert(hf_tiny("bin", dtype), out, target=Layout("mindformers"), fmt="ckpt", progress=False)
            made[dtype] = out
        return made[dtype]

    return get


@pytest.fixture(scope="session")
def gguf_files(hf_tiny, tmp_path_factory):
    """The tiny model as GGUF files of every block kind, and of float16."""
    folder = tmp_path_factory.mktemp("gguf")
    out = {}
    for kind in ("float16", *QUANT_KINDS):
        out[kind] = folder / f"tiny-{kind}.gguf"
        to_gguf(hf_tiny("safetensors", "float16"), out[kind], dtype=kind, progress=False)
    return out


@pytest.fixture(params=["avx512", "avx2"])
def kernel_isa(request, monkeypatch):
    """The native kernel built for each instruction set: AVX-512 where this CPU has it (else that case is the AVX2
    build again), and AVX2 (GLM2_NATIVE_KERNELS=avx2)."""
    if request.param == "avx2":
        monkeypatch.setenv(kernels.SWITCH, "avx2")
    kernels._build_with.cache_clear()
    yield kernels.isa()
    kernels._build_with.cache_clear()


@pytest.fixture
def no_native_kernels(monkeypatch):
    """The runtime as on a machine where glm2_ms/kernels cannot be built: 16-bit weights cast where used."""
    monkeypatch.setenv(kernels.SWITCH, "0")
    kernels._build_with.cache_clear()
    yield
    kernels._build_with.cache_clear()


# The unit tier (`pytest -m unit`): the tests of these modules that run no MindSpore, torch, transformers or peft and
# no subprocess (a test that does is marked `runtime`). Under -m unit those imports and subprocesses are refused, so
# the tier cannot silently grow slow.
UNIT_MODULES = {"test_architecture.py", "test_config.py", "test_numpy_oracle.py", "test_convert_roundtrip.py",
                "test_data.py", "test_tokenizer.py", "test_bad_input.py",
                "test_adapters.py", "test_readme.py"}
RUNTIME_LIBRARIES = ("mindspore", "torch", "transformers", "peft")


class _RefuseRuntime(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in RUNTIME_LIBRARIES:
            raise ImportError(f"the unit tier imports no {name}: mark the test `runtime`")


def _refuse_subprocess(*args, **kwargs):
    raise RuntimeError("the unit tier runs no subprocess: mark the test `runtime`")


def _unit_only(config) -> bool:
    return (config.option.markexpr or "").strip() == "unit"


def pytest_configure(config):
    if _unit_only(config):
        sys.meta_path.insert(0, _RefuseRuntime())


@pytest.fixture(scope="session", autouse=True)
def unit_runs_no_subprocess(request):
    """Under -m unit, in the process that runs the tests (xdist's controller starts its workers by subprocess)."""
    if not _unit_only(request.config):
        yield
        return
    saved, subprocess.Popen.__init__ = subprocess.Popen.__init__, _refuse_subprocess
    yield
    subprocess.Popen.__init__ = saved


def pytest_ignore_collect(collection_path, config):
    """Under -m unit, the other modules are not even imported (their imports would be refused)."""
    if _unit_only(config) and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return collection_path.name not in UNIT_MODULES
    return None


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in UNIT_MODULES and not item.get_closest_marker("heavy") \
                and not item.get_closest_marker("runtime"):
            item.add_marker(pytest.mark.unit)
    items.sort(key=lambda item: SLOWEST.index(item.path.name) if item.path.name in SLOWEST else len(SLOWEST))


def pytest_sessionfinish(session):
    """An xdist worker hands the optional extras it missed to the controller, whose summary names them."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["missing"] = sorted(MISSING)


def pytest_testnodedown(node, error):
    MISSING.update(getattr(node, "workeroutput", {}).get("missing", ()))


def pytest_terminal_summary(terminalreporter):
    """Say which optional extras were missing, so that their skipped tests are not mistaken for passes."""
    if MISSING:
        terminalreporter.write_sep("-", "optional extras not installed")
        extras = ",".join(sorted({entry.split("[")[1].rstrip("]") for entry in MISSING}))
        terminalreporter.write_line(f"tests skipped for want of: {', '.join(sorted(MISSING))} "
                                    f"(pip install -e '.[{extras}]' installs them)")
