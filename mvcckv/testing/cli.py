"""``mvcckv check``: a conformance run against any etcd v3 gRPC endpoint.

Two phases, each with a progress bar on stderr: the sequential state
machine (``--examples`` examples of up to ``--steps`` steps, shrinking any
divergence to a minimal sequence), then ``--clients`` concurrent clients
for ``--duration`` seconds (linearizability, watch guarantees, leases).
The report goes to stdout, as text or (``--json``) one JSON object.

Exit status: 0 when nothing diverged, 1 when something did or when the
linearizability search ran out of budget (an unknown verdict is no pass),
2 when the run could not be made (endpoint unreachable, bad flags, auth
refused).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

EXIT_CLEAN, EXIT_DIVERGED, EXIT_ERROR = 0, 1, 2


def add_parser(sub) -> None:
    p = sub.add_parser(
        "check",
        help="check that a server behaves like etcd (model-based and concurrent tests)",
        description="Run the mvcckv.testing conformance checks against a server speaking etcd's v3 gRPC API.",
    )
    p.add_argument("--endpoints", default="127.0.0.1:2379",
                   help="comma-separated gRPC endpoints (host:port, http:// or https://); default %(default)s")
    p.add_argument("--examples", type=int, default=50, help="sequential examples (default %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="steps per sequential example (default %(default)s)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default %(default)s)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of concurrent load (default %(default)s)")
    p.add_argument("--seed", type=int, help="seed of the run (default: random, printed in the report)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--etcd-version", default="auto",
                   help="the profile to check against: 3.4, 3.5, 3.6, or auto (from Status); default auto")
    p.add_argument("--prefix", help="key prefix of the run (default: mvcckv-check/<random>/)")
    p.add_argument("--max-txn-ops", type=int, default=128, help="the server's --max-txn-ops (default %(default)s)")
    p.add_argument("--no-compact", action="store_true",
                   help="never compact (compaction is global: use on a shared server)")
    p.add_argument("--no-leases", action="store_true", help="skip the lease timing checks")
    p.add_argument("--cacert", help="verify the server's certificate with this CA bundle")
    p.add_argument("--cert", help="client certificate (TLS)")
    p.add_argument("--key", help="client key (TLS)")
    p.add_argument("--user", help="username[:password] (as etcdctl's --user)")
    p.add_argument("--password", help="password (as etcdctl's --password)")
    p.add_argument("--command-timeout", type=float, default=5.0, help="seconds per request (default %(default)s)")
    p.add_argument("--shrink-seconds", type=float, default=20.0,
                   help="time spent shrinking a divergence to a minimal one (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from mvcckv.testing import concurrent, repro
    from mvcckv.testing.machine import Session, run_sequential
    from mvcckv.testing.profiles import profile_for
    from mvcckv.testing.targets import Connection, GrpcTarget

    endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    if not endpoints or args.examples < 0 or args.clients < 0 or args.duration < 0 or args.steps < 1:
        print("mvcckv check: --endpoints needs at least one endpoint; counts and durations cannot be negative",
              file=sys.stderr)
        return EXIT_ERROR
    if args.etcd_version != "auto":
        try:
            profile_for(args.etcd_version)
        except ValueError as e:
            print(f"mvcckv check: --etcd-version: {e}", file=sys.stderr)
            return EXIT_ERROR
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    prefix = (args.prefix if args.prefix is not None else "mvcckv-check/%08x/" % rng.getrandbits(32)).encode()

    def connection(endpoint: str) -> Connection:
        return Connection(endpoint, cacert=args.cacert, cert=args.cert, key=args.key, user=args.user,
                          password=args.password, timeout=args.command_timeout)

    report: dict = {"endpoints": endpoints, "seed": seed, "prefix": prefix.decode("latin-1")}
    began = time.monotonic()
    try:
        probe = GrpcTarget(connection(endpoints[0]))
        try:
            version = probe.status().version
        finally:
            probe.close()
        profile = profile_for(version if args.etcd_version == "auto" else args.etcd_version)
        try:
            served = profile_for(version)
        except ValueError:
            served = None  # a server that does not say which etcd it is
        if served is not None and served.name == profile.name:
            profile = served  # the same line: the patch level says more
    except Exception as e:  # noqa: BLE001 - any failure to connect ends the run
        print(f"mvcckv check: cannot use {endpoints[0]}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR
    report.update(server_version=version, profile=profile.name)
    if not profile.ordered_progress:
        report["profile_notes"] = [f"etcd {version} may send a progress notification ahead of an event "
                                   "(fixed in 3.4.31/3.5.13): not checked"]

    bars = _Bars(disabled=args.no_progress or args.json)
    ok = True
    if args.examples:
        bar = bars.bar("sequential", total=args.examples, unit="ex")
        shared = _Shared(GrpcTarget(connection(endpoints[0])))
        session = Session(lambda: shared, profile=profile, prefix=prefix + b"seq/",
                          max_txn_ops=args.max_txn_ops, compact=not args.no_compact,
                          on_example=lambda: bar.update(1))
        t0 = time.monotonic()
        try:
            seq = run_sequential(session, examples=args.examples, steps=args.steps, seed=seed,
                                 shrink_seconds=args.shrink_seconds)
            try:
                session.cleanup(shared.target)
            except Exception as e:  # noqa: BLE001 - the verdict stands; say what was left behind
                seq.notes.append(f"cleaning up {prefix.decode('latin-1')}seq/ failed: {type(e).__name__}: {e}")
        finally:
            shared.target.close()
        bar.close()
        section = {"examples": seq.examples, "steps": seq.steps, "histories_checked": seq.history_checks,
                   "seconds": round(time.monotonic() - t0, 1), "ok": seq.ok, "notes": seq.notes}
        if seq.error:
            section["error"] = seq.error
        if seq.failure is not None:
            section["found_after"] = {"examples": seq.found_after[0], "steps": seq.found_after[1]}
            section["divergence"] = {
                "message": seq.failure.message,
                "steps": len(seq.failure.steps),
                "start_revision": seq.failure.start_revision,
                "etcdctl": repro.etcdctl_script(seq.failure, endpoints[0]),
                "python": repro.python_program(seq.failure, endpoints[0]),
            }
        report["sequential"] = section
        ok = ok and seq.ok
    if args.clients and args.duration:
        bar = bars.bar("concurrent", total=args.duration, unit="s")
        state = {"last": 0.0}

        def tick(elapsed: float) -> None:
            bar.update(max(0.0, elapsed - state["last"]))
            state["last"] = elapsed

        picks = iter(range(1 << 30))
        t0 = time.monotonic()
        try:
            con = concurrent.run_concurrent(
                lambda: GrpcTarget(connection(endpoints[next(picks) % len(endpoints)])),
                prefix=prefix + b"conc/", clients=args.clients, duration=args.duration, seed=seed,
                leases=not args.no_leases, tick=tick, profile=profile)
        except Exception as e:  # noqa: BLE001 - the run could not be made
            bar.close()
            report["concurrent"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            ok = False
        else:
            bar.close()
            lin = con.linearizability
            section = {
                "operations": con.operations, "timed_out": con.timed_out, "clients": args.clients,
                "seconds": round(time.monotonic() - t0, 1),
                "linearizability": lin.verdict, "keys": len(lin.keys),
                "search_steps": sum(k.steps for k in lin.keys),
                "revision_problems": con.revision_problems,
                "watch_events": con.watch_events, "watch_problems": con.watch_problems,
                "lease_checks": con.lease_checks, "lease_problems": con.lease_problems,
                "ok": con.ok,
            }
            if lin.illegal_history:
                from mvcckv.testing.linearizability import describe

                section["illegal_history"] = describe(lin.illegal_history)
            if lin.unknown_keys:
                section["unknown_keys"] = [k.decode("latin-1") for k in lin.unknown_keys]
            report["concurrent"] = section
            ok = ok and con.ok
    report["ok"] = ok
    report["seconds"] = round(time.monotonic() - began, 1)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_text(report))
    if ok:
        return EXIT_CLEAN
    errored = any("error" in report.get(k, {}) for k in ("sequential", "concurrent"))
    diverged = ("divergence" in report.get("sequential", {})) or not report.get("concurrent", {}).get("ok", True)
    return EXIT_DIVERGED if diverged or not errored else EXIT_ERROR


class _Shared:
    """One connection for every example: each example would otherwise
    pay for a new channel, and shrinking runs hundreds of them."""

    def __init__(self, target):
        self.target = target

    def __getattr__(self, name):
        return getattr(self.target, name)

    def close(self) -> None:
        """Kept open for the next example; closed at the end of the run."""


class _Bars:
    """tqdm bars on stderr, or do-nothing ones."""

    def __init__(self, disabled: bool):
        self.disabled = disabled

    def bar(self, name: str, total: float, unit: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=name, unit=unit, disable=self.disabled, file=sys.stderr, leave=False)


def _text(r: dict) -> str:
    out = [f"mvcckv check: {', '.join(r['endpoints'])} (server {r['server_version'] or '?'}, "
           f"profile {r['profile']}, seed {r['seed']}, prefix {r['prefix']})"]
    out += [f"  note: {n}" for n in r.get("profile_notes", [])]
    seq = r.get("sequential")
    if seq:
        out.append(f"sequential: {seq['examples']} examples, {seq['steps']} steps, {seq['histories_checked']} "
                   f"histories checked in {seq['seconds']} s: {'clean' if seq['ok'] else 'FAILED'}")
        out += [f"  note: {n}" for n in seq["notes"]]
        if "error" in seq:
            out.append(f"  error: {seq['error']}")
        d = seq.get("divergence")
        if d:
            out.append(f"  divergence found after {seq['found_after']['examples']} examples "
                       f"({seq['found_after']['steps']} steps); minimal reproduction: {d['steps']} steps "
                       f"from revision {d['start_revision']}")
            out.append("  " + d["message"].replace("\n", "\n  "))
            out.append("  as etcdctl commands:")
            out.append("    " + d["etcdctl"].replace("\n", "\n    "))
            out.append("  as Python:")
            out.append("    " + d["python"].replace("\n", "\n    "))
    con = r.get("concurrent")
    if con:
        if "error" in con:
            out.append(f"concurrent: could not run: {con['error']}")
        else:
            out.append(f"concurrent: {con['operations']} operations by {con['clients']} clients in "
                       f"{con['seconds']} s ({con['timed_out']} timed out): linearizability {con['linearizability']} "
                       f"over {con['keys']} keys ({con['search_steps']} search steps); {con['watch_events']} "
                       f"watch events; {con['lease_checks']} lease checks: {'clean' if con['ok'] else 'FAILED'}")
            for name in ("revision_problems", "watch_problems", "lease_problems"):
                out += [f"  {name.split('_')[0]}: {p}" for p in con[name]]
            if "illegal_history" in con:
                out.append("  a key's history that no order explains:")
                out.append(con["illegal_history"])
            if "unknown_keys" in con:
                out.append(f"  search budget ran out (verdict unknown) on keys: {con['unknown_keys']}")
    out.append(f"verdict: {'clean' if r['ok'] else 'DIVERGED'} ({r['seconds']} s)")
    return "\n".join(out)
