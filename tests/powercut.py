"""A simulated power cut for a process writing under one directory.

:class:`Disk` builds ``powercut_shim.c`` (an ``LD_PRELOAD`` library, with
the machine's gcc) and gives the environment that makes a child process
report every write, sync, rename and unlink under ``root`` (see the shim's
comment for the journal format).  The shim keeps, in a shadow tree, what
was last fsynced of each file.

After the child is frozen with SIGSTOP (so nothing more is written or
answered), :meth:`Disk.cut` builds the directory a machine would find after
losing power at that instant:

* ``drop``: exactly what was fsynced; every byte written since a file's
  last sync is lost.
* ``torn``: what was fsynced, plus a random subset of the 4 KiB pages
  written since the last sync, each with its newest content (the page
  cache writes dirty pages back in any order, and any of them may have
  reached the disk before the cut); a file written past its synced
  length keeps either that length or its new one, the pages that did not
  make it reading as zeros.

Namespace changes (create, rename, unlink) count as durable at once (see
the shim); directories are taken from the live tree.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

PAGE = 4096
SHIM_SOURCE = Path(__file__).with_name("powercut_shim.c")
MODES = ("drop", "torn")


def build_shim(out_dir: Path) -> Path:
    """Compile the shim into ``out_dir``; returns the library's path."""
    lib = out_dir / "powercut_shim.so"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(lib), str(SHIM_SOURCE), "-ldl", "-lpthread"],
        check=True,
        capture_output=True,
    )
    return lib


class Disk:
    """The simulated disk under ``root``; ``work`` holds the shadow and journal."""

    def __init__(self, lib: Path, root: Path, work: Path):
        self.lib = lib
        self.root = root
        self.shadow = work / "shadow"
        self.journal = work / "journal"
        self.reset()

    def reset(self) -> None:
        """Declare everything under ``root`` durable (a clean start)."""
        shutil.rmtree(self.shadow, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.root, self.shadow)
        self.journal.write_bytes(b"")

    def env(self) -> dict[str, str]:
        """Environment variables for the child process."""
        return {
            "LD_PRELOAD": str(self.lib),
            "PCUT_ROOT": str(self.root),
            "PCUT_SHADOW": str(self.shadow),
            "PCUT_JOURNAL": str(self.journal),
        }

    def dirty_pages(self) -> dict[str, set[int]]:
        """Pages of each file written since its last sync, from the journal."""
        dirty: dict[str, set[int]] = {}
        for raw in self.journal.read_bytes().split(b"\n"):
            parts = raw.decode(errors="replace").split(" ")
            op = parts[0]
            # The last line may be cut short by the SIGSTOP; it is ignored.
            if op == "W" and len(parts) == 4:
                off, n = int(parts[2]), int(parts[3])
                dirty.setdefault(parts[1], set()).update(range(off // PAGE, (off + n - 1) // PAGE + 1))
            elif op == "S" and len(parts) == 2:
                dirty.pop(parts[1], None)
            elif op == "R" and len(parts) == 3:
                pages = dirty.pop(parts[1], set()) if parts[1] != "-" else set()
                dirty[parts[2]] = pages
            elif op == "U" and len(parts) == 2:
                dirty.pop(parts[1], None)
        return dirty

    def cut(self, mode: str, rng: random.Random, image: Path) -> dict[str, int]:
        """Write to ``image`` what the disk holds after a cut now; returns
        counts (files, dirty pages, pages kept) for the report."""
        if mode not in MODES:
            raise ValueError(f"unknown power-cut mode {mode!r}")
        dirty = self.dirty_pages()
        shutil.rmtree(image, ignore_errors=True)
        stats = {"files": 0, "dirty": 0, "kept": 0}
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = os.path.relpath(dirpath, self.root)
            (image / rel_dir).mkdir(parents=True, exist_ok=True)
            for name in filenames:
                rel = os.path.normpath(os.path.join(rel_dir, name))
                live = Path(dirpath) / name
                synced = self.shadow / rel
                data = bytearray(synced.read_bytes()) if synced.exists() else bytearray()
                stats["files"] += 1
                if mode == "torn":
                    self._tear(data, live, dirty.get(rel, set()), rng, stats)
                (image / rel).write_bytes(data)
        return stats

    @staticmethod
    def _tear(data: bytearray, live: Path, pages: set[int], rng: random.Random, stats: dict) -> None:
        if not pages:
            # Nothing written since the sync.  The live file can still differ
            # from the synced copy when the child was frozen inside a rename,
            # between the real one and the shadow's: the name then holds
            # another file, and this one's synced copy is what the disk has
            # (growing it with zeros would invent a write that never was).
            return
        current = live.read_bytes()
        if len(current) > len(data) and rng.random() < 0.5:
            data.extend(bytes(len(current) - len(data)))
        stats["dirty"] += len(pages)
        share = rng.random()
        for p in sorted(pages):
            start = p * PAGE
            if start >= len(data) or rng.random() >= share:
                continue
            page = current[start : start + PAGE]
            data[start : start + len(page)] = page
            stats["kept"] += 1
