"""The README's embedded example runs exactly as written."""

import functools
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    # The example writes its data where it says it does.
    assert (tmp_path / "data.mvcckv").is_dir()
    assert "KeyValueHash" in capsys.readouterr().out


def test_readme_conformance_example_runs_as_a_test(tmp_path, monkeypatch):
    """The pytest lines of "In your own tests" pass, and fail on a broken store."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
              if "def test_my_store_behaves_like_etcd" in b]
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme_check"}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    namespace["test_my_store_behaves_like_etcd"]()
    assert list(tmp_path.glob("check-*.mvcckv"))

    class Forgetful(namespace["EmbeddedTarget"]):
        """A store whose deletes report nothing deleted."""

        def delete_range(self, d):
            resp = super().delete_range(d)
            resp.deleted = 0
            return resp

    namespace["EmbeddedTarget"] = Forgetful
    # The failure is found at once; only its shrinking would take long.
    namespace["run_sequential"] = functools.partial(namespace["run_sequential"], shrink_seconds=2)
    with pytest.raises(AssertionError, match="delete_range: the answers differ"):
        namespace["test_my_store_behaves_like_etcd"]()
