"""The README's curl session runs as written and prints what it shows.

The ``console`` block of the README's HTTP section is a shell session:
``$ `` lines are commands, the lines after each are its output.  The first
command starts the server; the test starts it itself (with the same flags,
on free ports and a fresh data dir), then runs every other command with
bash, the README's ports replaced by the test server's, and requires the
output shown — byte for byte: the default member and cluster IDs are
derived from the default flags, so they are the README's too.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from http_harness import HttpMvcckv

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## HTTP: the JSON gateway"


def session() -> list[tuple[str, str]]:
    text = README.read_text()
    start = text.index(SECTION)
    block = re.search(r"```console\n(.*?)```", text[start:], re.S)
    assert block, "the HTTP section has no console block"
    steps: list[tuple[str, list[str]]] = []
    for line in block.group(1).splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            assert steps, f"output before any command: {line!r}"
            steps[-1][1].append(line)
    return [(command, "\n".join(out)) for command, out in steps]


def test_readme_curl_session(tmp_path):
    steps = session()
    start, _ = steps[0]
    assert start.startswith("mvcckv serve ") and start.endswith(" &")
    http_port = re.search(r"--listen-client-http-urls http://127\.0\.0\.1:(\d+)", start).group(1)
    metrics_port = re.search(r"--listen-metrics-urls http://127\.0\.0\.1:(\d+)", start).group(1)
    assert len(steps) > 5
    with HttpMvcckv(tmp_path / "data", log_path=tmp_path / "mvcckv.log") as server:
        for command, expected in steps[1:]:
            assert "curl" in command, command
            real = (command.replace(f"127.0.0.1:{http_port}", f"127.0.0.1:{server.http_port}")
                    .replace(f"127.0.0.1:{metrics_port}", f"127.0.0.1:{server.metrics_port}"))
            run = subprocess.run(["bash", "-c", real], capture_output=True, timeout=30, text=True)
            assert run.stdout.rstrip("\n") == expected, f"{command}\nstderr: {run.stderr}"
