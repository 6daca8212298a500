"""What every benchmark measures a step with: its own process under /usr/bin/time -v, page cache dropped first."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def warm(*paths: Path) -> None:
    """Read files into the page cache: a source just written or downloaded."""
    files = [str(p) for path in paths for p in sorted(Path(path).rglob("*")) if p.is_file()]
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)


def timed(cmd: str, hot: tuple[Path, ...] = ()) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a shell command, write-back included; the page cache is dropped first,
    then the `hot` paths are read back into it (none: a cold start)."""
    drop_caches()
    if hot:
        warm(*hot)
    proc = subprocess.run(["/usr/bin/time", "-v", "bash", "-c", f"{cmd} && sync"], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed: {cmd}\n{proc.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    h, m, s = wall.groups()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return int(h or 0) * 3600 + int(m) * 60 + float(s), int(rss.group(1)) / 1024


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
