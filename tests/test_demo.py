"""glm2-demo, the README's first command: every step passes, and it leaves nothing behind (its outputs once lived
in the system temp dir and stayed there after every run)."""
import tempfile

from click.testing import CliRunner

from validation.demo import main as demo


def test_demo_passes_and_leaves_nothing_in_the_temp_dir(tmp_path, monkeypatch):
    (tmp_path / "temp").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    monkeypatch.chdir(tmp_path / "cwd")
    result = CliRunner().invoke(demo, [])
    assert result.exit_code == 0, result.output
    assert "round trip: PASS   logits parity: PASS   metric parity: PASS   (outputs removed" in result.output
    assert list((tmp_path / "temp").iterdir()) == [] and list((tmp_path / "cwd").iterdir()) == []
