"""Ctrl-C after MindSpore has run a graph: the tools stop cleanly with exit status 130 (MindSpore's own handler
used to turn SIGINT into SIGTERM: "Terminated", 143). glm2-chat edits its line with readline."""
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATA

from glm2_ms.checkpointing import latest

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ms_dir(ms_tiny):
    return ms_tiny("float32")


class Tool:
    """A glm2-* process; `read_until` waits for its output (a graph has run once text is streamed)."""

    def __init__(self, cwd: Path, *args, stdin: bytes | None = None, tty: bool = False):
        cmd = [str(BIN / args[0]), *map(str, args[1:])]
        if tty:
            self.out, slave = pty.openpty()
            self.proc = subprocess.Popen(cmd, cwd=cwd, stdin=slave, stdout=slave, stderr=slave)
            os.close(slave)
        else:
            self.proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE)
            self.out = self.proc.stdout.fileno()
            if stdin:
                self.proc.stdin.write(stdin)
                self.proc.stdin.flush()
        self.seen = b""

    def read_until(self, needle: bytes, after: int = 0, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while self.seen.count(needle) <= after:
            assert time.monotonic() < end and self.proc.poll() is None, self.seen.decode(errors="replace")
            if select.select([self.out], [], [], 1)[0]:
                self.seen += os.read(self.out, 4096)

    def interrupt(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=120)
        return self.proc.returncode, err.decode()


def assert_clean_stop(code: int, err: str, cwd: Path, message: str = "interrupted") -> None:
    assert code == 130, err
    assert err.strip().splitlines()[-1].startswith(message), err
    assert "Traceback" not in err and "[ERROR]" not in err, err
    assert not list(cwd.iterdir()), list(cwd.iterdir())  # no rank_0/om/analyze_fail.ir from a broken compile


def test_generate_stops_cleanly_while_generating(ms_dir, tmp_path):
    tool = Tool(tmp_path, "glm2-generate", ms_dir, "--prompt", "你好", "--max-new-tokens", "2000")
    tool.read_until(b" ")  # text streams: graphs have run, and the next step is running
    assert_clean_stop(*tool.interrupt(), tmp_path)


def test_chat_stops_cleanly_at_its_prompt(ms_dir, tmp_path):
    tool = Tool(tmp_path, "glm2-chat", ms_dir, "--max-new-tokens", "4", stdin="你好\n".encode())
    tool.read_until("用户: ".encode(), after=1)  # a reply came, and it waits for the next line
    assert_clean_stop(*tool.interrupt(), tmp_path)


def test_chat_edits_its_line_with_readline(ms_dir, tmp_path):
    """On a terminal, "ext", ← and "i" is the line "exit" (without readline: "ext\\x1b[Di", a query)."""
    tool = Tool(tmp_path, "glm2-chat", ms_dir, tty=True)
    tool.read_until("用户: ".encode())
    os.write(tool.out, b"ext\x1b[Di\r")
    assert tool.proc.wait(timeout=60) == 0
    os.close(tool.out)


def test_finetune_stops_after_its_step_and_saves_it(ms_dir, tmp_path):
    """Ctrl-C with the default --save-steps 0: the running step is finished and saved, and the message names it."""
    work, out = tmp_path / "cwd", tmp_path / "run"
    work.mkdir()
    tool = Tool(work, "glm2-finetune", ms_dir, "--train-data", DATA / "adgen_train_head200.json", "--out", out,
                "--method", "full", "--max-steps", "50", "--batch-size", "2", "--max-source-length", "8",
                "--max-target-length", "8", "--quiet")
    log = out / "train_log.jsonl"
    end = time.monotonic() + 120
    while not (log.is_file() and log.read_text().count("\n") >= 2):  # steps have run, and the next one is running
        assert time.monotonic() < end and tool.proc.poll() is None
        time.sleep(0.2)
    code, err = tool.interrupt()
    kept = latest(out, 0)
    step = len(log.read_text().splitlines())
    assert kept is not None and kept.name == f"glm2_rank_0-0_{step}.ckpt", (kept, step)
    assert_clean_stop(code, err, work, f"interrupted: after {step} steps; saved step {step} to {kept} (continue "
                                       f"with --resume)")
    assert "stopping after this step to save it" in err
    assert not list(out.rglob("*.partial"))
