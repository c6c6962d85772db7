"""What ``torch.compile`` did in this process: graphs compiled, seconds per graph, recompiles and why.

The benchmarks call ``mark()`` before a stretch of work and ``since(mark)`` after it. The source
is torch._dynamo's own record of every compilation (``torch._dynamo.utils.get_compilation_metrics()``:
one entry per compiled frame, and one per backward graph that AOTAutograd compiles on its first
use) and its ``counters`` (graph breaks). These are internal APIs whose fields change between
torch releases (the benchmarks run on 2.11 on the GPU machine and on 2.14 here): every field is
read only if present, and an API that is missing or fails gives ``{"available": False,
"error": ...}`` instead of an exception, so a benchmark never fails for want of it. Where the
per-compilation record is missing, ``compilation_time_metrics`` (seconds per compiler phase) is
used for totals alone.
"""

from __future__ import annotations

import dataclasses

# (name in the record, name here): read when the running torch has the field.
_KEEP = (("backend_compile_time_s", "backend_s"), ("inductor_compile_time_s", "inductor_s"),
         ("graph_op_count", "ops"), ("guard_count", "guards"), ("cache_size", "cache_size"),
         ("recompile_reason", "reason"), ("fail_type", "failed"), ("fail_reason", "fail_reason"),
         ("inductor_fx_local_cache_hit_count", "fx_cache_hits"),
         ("inductor_fx_local_cache_miss_count", "fx_cache_misses"),
         ("aotautograd_local_cache_hit_count", "aot_cache_hits"),
         ("aotautograd_local_cache_miss_count", "aot_cache_misses"))


def _records() -> list:
    from torch._dynamo.utils import get_compilation_metrics

    return list(get_compilation_metrics())


def _fields(record) -> dict:
    if dataclasses.is_dataclass(record):
        return {f.name: getattr(record, f.name, None) for f in dataclasses.fields(record)}
    return dict(getattr(record, "__dict__", {}))


def _key(f: dict) -> tuple:
    return (str(f.get("compile_id")), f.get("is_forward"), f.get("start_time_us") or f.get("start_time"))


def _graph_breaks() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["graph_break"].values()))
    except Exception:
        return None


def _phase_seconds() -> dict | None:
    try:
        from torch._dynamo.utils import compilation_time_metrics

        return {k: float(sum(v)) for k, v in compilation_time_metrics.items()}
    except Exception:
        return None


def mark() -> dict:
    """The point to count from: the compilations recorded so far."""
    out = {"graph_breaks": _graph_breaks(), "phases": _phase_seconds()}
    try:
        out["seen"] = [_key(_fields(r)) for r in _records()]
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def graph_record(f: dict) -> dict:
    """One compilation as JSON: which frame, forward or backward, seconds, and what the running
    torch says of it (recompile reason, cache hits, failure)."""
    forward = f.get("is_forward")
    seconds = f.get("entire_frame_compile_time_s")
    if seconds is None:
        for key in ("duration_us", "backward_cumulative_compile_time_us"):
            if f.get(key) is not None:
                seconds = f[key] / 1e6
                break
    name = f.get("co_name")
    where = f.get("co_filename")
    frame = (f"{name} ({str(where).rsplit('/', 1)[-1]}:{f.get('co_firstlineno')})" if name and where
             else name or "")
    rec = {"id": str(f.get("compile_id")), "pass": "backward" if forward is False else "forward", "frame": frame,
           "seconds": seconds}
    for src, dst in _KEEP:
        if f.get(src) is not None:
            rec[dst] = f[src] if isinstance(f[src], (int, float, str, bool)) else str(f[src])
    # A forward compilation that found earlier graphs of its frame in the cache is a recompile.
    rec["recompile"] = rec["pass"] == "forward" and bool(rec.get("reason") or rec.get("cache_size"))
    return rec


def since(start: dict) -> dict:
    """What was compiled after ``start`` (a ``mark()``): ``graphs`` (one record per compiled
    forward or backward graph), and totals: ``forward_graphs``, ``backward_graphs``,
    ``seconds``, ``recompiles``, ``graph_breaks``."""
    out: dict = {}
    breaks0, breaks1 = start.get("graph_breaks"), _graph_breaks()
    if breaks0 is not None and breaks1 is not None:
        out["graph_breaks"] = breaks1 - breaks0
    try:
        if "error" in start:
            raise RuntimeError(start["error"])
        seen = {tuple(k) for k in start["seen"]}
        graphs = [graph_record(f) for f in map(_fields, _records()) if _key(f) not in seen]
    except Exception as e:
        out.update(available=False, error=f"{type(e).__name__}: {e}"[:300])
        phases0, phases1 = start.get("phases"), _phase_seconds()
        if phases0 is not None and phases1 is not None:  # totals per compiler phase, all graphs together
            out["phase_seconds"] = {k: v - phases0.get(k, 0.0) for k, v in phases1.items()
                                    if v - phases0.get(k, 0.0) > 0}
        return out
    out.update(available=True, graphs=graphs,
               forward_graphs=sum(g["pass"] == "forward" for g in graphs),
               backward_graphs=sum(g["pass"] == "backward" for g in graphs),
               seconds=sum(g["seconds"] or 0.0 for g in graphs),
               recompiles=sum(g["recompile"] for g in graphs),
               failed=sum(bool(g.get("failed")) for g in graphs))
    return out


def describe(stats: dict) -> str:
    """One line: ``3 graphs (2 forward, 1 backward) in 41.2 s, 1 recompile, 0 graph breaks``."""
    if not stats.get("available"):
        return f"compilation records not available ({stats.get('error', 'unknown')})"
    n = stats["forward_graphs"] + stats["backward_graphs"]
    text = (f"{n} graph{'s' if n != 1 else ''} ({stats['forward_graphs']} forward, {stats['backward_graphs']} "
            f"backward) in {stats['seconds']:.1f} s, {stats['recompiles']} recompile"
            f"{'s' if stats['recompiles'] != 1 else ''}")
    if stats.get("graph_breaks") is not None:
        text += f", {stats['graph_breaks']} graph break{'s' if stats['graph_breaks'] != 1 else ''}"
    return text
