"""Where etcd releases answer the same request differently.

The model (:mod:`mvcckv.testing.model`) and the checks follow one profile
per run.  Each field names one difference, observed against a real etcd or
read in its source (ETCD_SEMANTICS.md, "Errata" and §1.7):

``hashkv_at_compact_revision``
    3.6 answers HashKV at exactly the compact revision (with the hash that
    compaction recorded); 3.4 and 3.5 refuse it as compacted.
``hash_revision_field``
    ``HashKVResponse.hash_revision`` is new in 3.6; older releases leave it 0.
``ordered_progress``
    A requested progress notification never overtakes an event (fixed in
    3.4.31 and 3.5.13, etcd issues 15220 and 17507).  Before, a watcher
    can get a progress notification at revision R and then an event at R:
    the "bookmarkable" check then only holds progress revisions to never
    go back.  Only a full version (3.4.23) selects the older behaviour.

Not a profile difference although etcd has one: 3.6 checks a txn's puts
and ranges op by op, 3.4/3.5 every put first.  Only a txn breaking both
kinds of check shows it (which error is reported); the model follows
3.4/3.5 for every profile, as mvcckv does.  Requests only some releases
refuse (an unknown ``sort_order``) are not generated.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """The answers of one etcd release line where releases differ."""

    name: str
    hashkv_at_compact_revision: bool
    hash_revision_field: bool
    ordered_progress: bool = True


PROFILES: dict[str, Profile] = {
    "3.4": Profile("3.4", hashkv_at_compact_revision=False, hash_revision_field=False),
    "3.5": Profile("3.5", hashkv_at_compact_revision=False, hash_revision_field=False),
    "3.6": Profile("3.6", hashkv_at_compact_revision=True, hash_revision_field=True),
}

DEFAULT = PROFILES["3.6"]


def profile_for(version: str) -> Profile:
    """The profile of ``3.4``, ``3.4.23``, ``v3.5.9`` …; ValueError otherwise.

    Releases after 3.6 get the 3.6 profile (the newest this package knows).
    """
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:[-+].*)?", version.strip())
    if m is None:
        raise ValueError(f"not an etcd version: {version!r} (expected e.g. 3.4 or 3.5.17)")
    major, minor = int(m.group(1)), int(m.group(2))
    if (major, minor) < (3, 4):
        raise ValueError(f"etcd {version} is older than 3.4, the oldest profile")
    if (major, minor) > (3, 6):
        return DEFAULT
    profile = PROFILES[f"{major}.{minor}"]
    fixed_in = {(3, 4): 31, (3, 5): 13}.get((major, minor))
    if m.group(3) is not None and fixed_in is not None and int(m.group(3)) < fixed_in:
        profile = dataclasses.replace(profile, ordered_progress=False)
    return profile
