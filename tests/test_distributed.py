"""glm2-finetune under msrun with 2 CPU workers: data parallel = one process on the same global batch, sharded
optimizer = unsharded, rank checkpoints that our merge and MindSpore's transform_checkpoints both reassemble,
resume, and a killed worker."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pytest
from helpers import tensors

from converters.convert import convert
from converters.formats.ckpt import CkptFile
from glm2_core.names import Layout, classify
from glm2_ms.api import from_pretrained

pytestmark = pytest.mark.heavy  # msrun runs
BIN = Path(sys.executable).parent
DATA = Path(__file__).parent / "data" / "adgen_train_head200.json"
STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finetune_args(model: Path, out: Path, *extra) -> list[str]:
    return [str(BIN / "glm2-finetune"), str(model), "--train-data", str(DATA), "--method", "full",
            "--max-steps", str(STEPS), "--save-steps", "2", "--max-source-length", "16", "--max-target-length", "16",
            "--learning-rate", "1e-3", "--out", str(out), "--quiet", *extra]


def msrun_cmd(log_dir: Path, args: list[str], port: int | None = None, node_rank: int | None = None,
              master: str = "127.0.0.1") -> list[str]:
    """One launcher of both workers; or, with a `node_rank`, the launcher of one machine of two, each starting one
    worker and meeting at the master's address."""
    nodes = [] if node_rank is None else ["--local_worker_num=1", f"--node_rank={node_rank}", f"--master_addr={master}"]
    return [str(BIN / "msrun"), "--worker_num=2", *(nodes or ["--local_worker_num=2"]),
            f"--master_port={port or free_port()}", f"--log_dir={log_dir}", "--join=True", *args]


def env() -> dict:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}  # msrun's workers run `python` from PATH


def msrun(log_dir: Path, args: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(msrun_cmd(log_dir, args), capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@contextmanager
def relay(port: int):
    """127.0.0.2:port → 127.0.0.1:port, standing in for the network between two machines. msrun starts the
    scheduler on the launcher whose --master_addr is one of its own addresses; on one host every launcher would
    (the second fails to bind the port). Node 1 is given 127.0.0.2, which is not this host's address (`ip addr`
    lists 127.0.0.1; the route to it leaves from 127.0.0.1), so it starts no scheduler and reaches the master's
    through this relay, as a second machine would over the network."""
    server = socket.create_server(("127.0.0.2", port))

    def pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def accept() -> None:
        while True:
            try:
                client, _ = server.accept()
                upstream = socket.create_connection(("127.0.0.1", port))
            except OSError:  # the server closed (done), or the scheduler not up yet: the worker retries
                if server.fileno() < 0:
                    return
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield
    finally:
        server.close()


@contextmanager
def two_launchers(log_dir: Path, args: list[str]):
    """The several-machines recipe: a launcher per node (node_rank 0 and 1), one worker each; it runs while the
    `with` body does (the runs barely use two cores each), and must have succeeded when the body is done."""
    port = free_port()
    log_dir.mkdir(parents=True)
    outputs = [log_dir / f"launcher{n}.txt" for n in (0, 1)]
    with relay(port), open(outputs[0], "w") as out0, open(outputs[1], "w") as out1:
        procs = [subprocess.Popen(msrun_cmd(log_dir / f"node{n}", args, port, n, f"127.0.0.{n + 1}"), stdout=out,
                                  stderr=subprocess.STDOUT, env=env()) for n, out in enumerate((out0, out1))]
        try:
            yield
        finally:
            codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], "\n".join(f.read_text()[-3000:] for f in outputs)
    assert not (log_dir / "node1" / "scheduler.log").exists()  # the master's launcher alone ran the scheduler


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(hf_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = root / "model"
    convert(hf_tiny("safetensors", "float32"), model, target=Layout("mindformers"), fmt="ckpt", progress=False)
    with open(root / "single.log", "w") as log:  # the three runs side by side: none keeps two cores busy
        single = subprocess.Popen(finetune_args(model, root / "single", "--batch-size", "2",
                                                "--gradient-accumulation-steps", "2"), stdout=log, stderr=log)
        with two_launchers(root / "log-nodes", finetune_args(model, root / "nodes", "--batch-size", "2")):
            dp = msrun(root / "log-dp", finetune_args(model, root / "dp", "--batch-size", "2"))
            (root / "dp-msrun.txt").write_text(dp.stdout + dp.stderr)
        assert single.wait(timeout=300) == 0, (root / "single.log").read_text()[-3000:]
    lora = finetune_args(model, root / "lora", "--batch-size", "2", "--shard-optimizer", "--method", "lora")
    with open(root / "lora.log", "w") as log:  # beside the killed run, which mostly waits
        lora_run = subprocess.Popen(msrun_cmd(root / "log-lora", lora), stdout=log, stderr=log, env=env())
        killed_then_resumed(root / "zero", finetune_args(model, root / "zero", "--batch-size", "2",
                                                         "--shard-optimizer"))
        assert lora_run.wait(timeout=300) == 0, (root / "lora.log").read_text()[-3000:]
    return root


def killed_then_resumed(out: Path, args: list[str]) -> None:
    """The sharded-optimizer run: rank 1 is killed after its step-2 checkpoint, then the run is resumed under
    msrun. What the failure left is recorded in OUT/killed.json for the test that checks it."""
    # MS_NODE_TIMEOUT: how long the scheduler waits for a lost worker before it gives up (30 s by default)
    proc = subprocess.Popen(msrun_cmd(out.parent / "log-killed", args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**env(), "MS_NODE_TIMEOUT": "10"})
    side = out / "checkpoint" / "rank_1" / "glm2_rank_1-0_2.json"
    deadline = time.time() + 240
    while not side.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    pid = _worker_pid(out, 1)
    assert side.exists() and pid, "rank 1 never saved step 2"
    os.kill(pid, signal.SIGKILL)
    text, _ = proc.communicate(timeout=240)
    left = {}
    for f in sorted((out / "checkpoint").rglob("*.ckpt")):  # every rank file that exists must be whole
        with CkptFile(f) as c:
            left[str(f.relative_to(out))] = sum(t.read().nbytes for t in c.tensors.values())
    (out / "killed.json").write_text(json.dumps({"returncode": proc.returncode, "output": text[-5000:],
                                                 "files": left}))
    msrun(out.parent / "log-resume", [*args, "--resume"])


def test_data_parallel_equals_one_process_on_the_global_batch(runs):
    single, dp = losses(runs / "single"), losses(runs / "dp")
    assert len(single) == len(dp) == STEPS
    np.testing.assert_allclose(dp, single, rtol=1e-5)
    a, b = tensors(runs / "dp" / "model"), tensors(runs / "single" / "model")
    for n in a:
        np.testing.assert_allclose(a[n], b[n], rtol=1e-5, atol=1e-6, err_msg=n)
    ranks = [tensors(runs / "dp" / "checkpoint" / f"rank_{r}" / f"glm2_rank_{r}-0_{STEPS}.ckpt") for r in (0, 1)]
    assert all(np.array_equal(ranks[0][n], ranks[1][n]) for n in ranks[0])  # identical on both ranks
    assert len((runs / "dp" / "train_log.jsonl").read_text().splitlines()) == STEPS  # rank 0 logs alone


def test_sharded_optimizer_halves_state_and_changes_nothing(runs):
    done = json.loads((runs / "zero" / "checkpoint" / "rank_0" / f"glm2_rank_0-0_{STEPS}.json").read_text())
    np.testing.assert_array_equal(done["losses"], losses(runs / "dp"))
    a, b = tensors(runs / "zero" / "model"), tensors(runs / "dp" / "model")
    assert all(np.array_equal(a[n], b[n]) for n in a)
    name = f"glm2_rank_0-0_{STEPS}.ckpt"
    with CkptFile(runs / "zero" / "checkpoint" / "rank_0" / name) as z, \
            CkptFile(runs / "dp" / "checkpoint" / "rank_0" / name) as d:
        moments = [n for n in d.tensors if n.startswith(("adam_m.", "adam_v."))]
        assert moments and sum(z.tensors[n].nbytes for n in moments) * 2 == sum(d.tensors[n].nbytes for n in moments)


@pytest.mark.parametrize("run", ["dp", "zero"])
def test_rank_checkpoints_merge_ours_and_mindspores(runs, run, tmp_path):
    import mindspore as ms

    out = runs / run
    r = subprocess.run([BIN / "glm2-merge-shards", out / "checkpoint", "--strategy", out / "strategy",
                        tmp_path / "merged", "--keep-optimizer", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"config.json from {out}" in r.stdout  # the run folder's: no --config needed
    ours = tensors(tmp_path / "merged")
    ms.transform_checkpoints(str(out / "checkpoint"), str(tmp_path / "ms"), "m",
                             str(out / "strategy" / "ckpt_strategy_rank_0.ckpt"), None)
    theirs = tensors(next((tmp_path / "ms").rglob("*.ckpt")))
    assert set(ours) == set(theirs)
    assert all(np.array_equal(ours[n], theirs[n]) for n in ours)
    final = tensors(out / "model")
    assert all(np.array_equal(ours[n], a) for n, a in final.items())

    ids = ms.Tensor(np.array([[64790, 64792, 36474, 54591, 13, 30910]], np.int32))
    merged_logits = from_pretrained(tmp_path / "merged")(ids).asnumpy()
    single_logits = from_pretrained(runs / "single" / "model")(ids).asnumpy()
    np.testing.assert_allclose(merged_logits, single_logits, rtol=1e-4, atol=1e-4)


def test_two_machines_recipe_equals_one_launcher(runs, tmp_path):
    """Two msrun launchers (node_rank 0 and 1, one worker each, master 127.0.0.1) train exactly as one launcher
    of two workers: the same losses, and every rank checkpoint, record, the strategy and the exported model byte
    for byte; the rank checkpoints merge into the final model."""
    nodes, dp = runs / "nodes", runs / "dp"
    assert losses(nodes) == losses(dp) and len(losses(nodes)) == STEPS
    files = sorted(str(p.relative_to(dp)) for kind in ("checkpoint", "checkpoint_network", "strategy", "model")
                   for p in (dp / kind).rglob("*") if p.is_file())
    # 2 ranks × (3 steps × (ckpt + record) + 3 network), strategy, the model (weights, config, MindFormers yaml, two
    # tokenizer files, manifest)
    assert len(files) == 2 * (3 * 2 + 3) + 1 + 6
    assert files == sorted(str(p.relative_to(nodes)) for kind in ("checkpoint", "checkpoint_network", "strategy",
                                                                   "model") for p in (nodes / kind).rglob("*")
                           if p.is_file())
    for f in files:
        if f.endswith("manifest.json"):  # it names the run it came from: the rest is the same
            a, b = (json.loads((run / f).read_text()) for run in (nodes, dp))
            assert a.pop("source") == str(nodes.resolve()) and b.pop("source") == str(dp.resolve()) and a == b
            continue
        assert (nodes / f).read_bytes() == (dp / f).read_bytes(), f
    r = subprocess.run([BIN / "glm2-merge-shards", nodes, "--strategy", nodes / "strategy", tmp_path / "merged",
                        "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    final = tensors(nodes / "model")
    assert all(np.array_equal(a, final[n]) for n, a in tensors(tmp_path / "merged").items())


def test_lora_rank_saves_hold_the_adapter_and_merge_into_the_base(runs, tmp_path):
    """A LoRA run under msrun (sharded optimizer) saves only the adapter, its moments and the counters on each rank;
    glm2-merge-shards reassembles them and folds the adapter into the run's base: the model the exported adapter
    gives, bit for bit."""
    out = runs / "lora"
    for f in (out / "checkpoint").rglob("*.ckpt"):
        with CkptFile(f) as c:
            assert {classify(n) for n in c.tensors} == {"lora", "optimizer"}, f
    r = subprocess.run([BIN / "glm2-merge-shards", out, "--strategy", out / "strategy", tmp_path / "merged",
                        "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"base model {runs / 'model'}" in r.stdout
    r = subprocess.run([BIN / "glm2-convert", "merge-lora", runs / "model", out / "adapter", tmp_path / "want",
                        "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    want = tensors(tmp_path / "want")
    assert all(np.array_equal(a, want[n]) for n, a in tensors(tmp_path / "merged").items())


def test_resume_needs_the_same_world(runs, tmp_path):
    shutil.copytree(runs / "dp", tmp_path / "dp")
    r = subprocess.run(finetune_args(runs / "model", tmp_path / "dp", "--batch-size", "2", "--resume"),
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "saved by 2 processes, resumed with 1" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def _worker_pid(out: Path, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out) in cmd and "glm2-finetune" in cmd and f"RANK_ID={rank}".encode() in environ:
            return int(proc.name)
    return None


def test_killed_worker_then_resume(runs):
    """Rank 1 killed after the step-2 checkpoint: msrun exits non-zero and says so, the rank files on disk are
    whole, and --resume under msrun finished the run exactly as an uninterrupted one (the unsharded run, which
    the sharded one equals bit for bit)."""
    killed = json.loads((runs / "zero" / "killed.json").read_text())
    assert killed["returncode"] != 0
    assert "exit with exception" in killed["output"] and "Distributed job exited with exception" in killed["output"]
    assert {"checkpoint/rank_0/glm2_rank_0-0_2.ckpt", "checkpoint/rank_1/glm2_rank_1-0_2.ckpt"} <= set(killed["files"])
    done = json.loads((runs / "zero" / "checkpoint" / "rank_0" / f"glm2_rank_0-0_{STEPS}.json").read_text())
    np.testing.assert_array_equal(done["losses"], losses(runs / "dp"))
    np.testing.assert_array_equal(losses(runs / "zero"), losses(runs / "dp"))  # each step logged once


def test_msrun_shows_the_run_not_mindspores_log(runs):
    """Under msrun, glm2-finetune keeps MindSpore's connection retries and notes out of the launcher's output
    (GLOG_v=3 in its workers unless the user sets GLOG_v): the launcher's own lines and MindSpore's few
    unconditional shutdown lines remain."""
    lines = (runs / "dp-msrun.txt").read_text().splitlines()
    noise = [line for line in lines if re.match(r"\[(INFO|WARNING)\] (DISTRIBUTED|ME|DEVICE|RUNTIME)", line)]
    assert len(noise) <= 10, "\n".join(noise[:20])
