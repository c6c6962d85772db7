"""The GPU check's verdicts and its markdown summary, from its JSON summary alone.

``evaluate_targets(parts, mode)`` judges the targets from the parts' results (headline first, a
step-time fallback where the headline did not get as far); ``render_markdown(summary)`` writes
``gpu_check.md``: the parts with their limits and expected durations, the targets, the
environment, then one section per part that reported something. Both are pure functions of
``gpu_check.json``'s contents, so a summary can be rendered again from a file that came back.
"""

from __future__ import annotations

import math

PARTS = ("env", "epoch_compiled", "bench_compiled", "bench_eager", "tests", "epoch_eager", "cifar")
TITLES = {
    "env": "environment",
    "epoch_compiled": "one epoch as users run it, compiled: kp_resnet18 and plain PyTorch",
    "bench_compiled": "step time, torch.compile",
    "bench_eager": "step time, eager",
    "tests": "CUDA tests",
    "epoch_eager": "one epoch as users run it, eager: kp_resnet18 and plain PyTorch",
    "cifar": "kp_resnet18 on packed CIFAR-100",
}
TARGETS = {"kp_compiled_speed": 0.97, "kp_epoch_s": 3.0, "kp_epoch_s_stretch": 1.5, "kp_memory": 1.10}
BAD = ("failed", "timeout", "partial", "interrupted")


def _result(parts: dict, part: str) -> dict:
    return (parts.get(part) or {}).get("result") or {}


def _variant(parts: dict, part: str, name: str) -> dict:
    return (_result(parts, part).get("variants") or {}).get(name) or {}


def last_epoch(parts: dict, part: str, name: str) -> dict:
    """The last epoch an epoch part timed for a variant (the headline row: nothing first in it)."""
    epochs = _variant(parts, part, name).get("epochs") or []
    return epochs[-1] if epochs else {}


def own_memory(row: dict) -> float | None:
    """Peak of the training steps less the data set held on the device (the same for every
    variant): model, optimizer state, activations, workspaces."""
    if row.get("step_peak_mb") is None:
        return None
    return row["step_peak_mb"] - (row.get("data_mb") or 0.0)


def evaluate_targets(parts: dict, mode: str) -> list[dict]:
    judged = mode == "gpu"
    out = []
    kp, native = last_epoch(parts, "epoch_compiled", "kp"), last_epoch(parts, "epoch_compiled", "native")

    t = {"name": "kp_compiled_speed",
         "target": f"KP compiled ≥ {TARGETS['kp_compiled_speed']}× native throughput (both compiled)"}
    if "images_per_s" in kp and "images_per_s" in native:
        r = kp["images_per_s"] / native["images_per_s"]
        t.update(value=r, basis="epoch_compiled",
                 measured=f"{r:.3f}× (kp {kp['images_per_s']:.0f}, native {native['images_per_s']:.0f} images/s over "
                          f"a whole epoch: training, evaluation, checkpoint, monitor records)")
    else:
        kb, nb = _variant(parts, "bench_compiled", "kp"), _variant(parts, "bench_compiled", "native")
        if "images_per_s" in kb and "images_per_s" in nb:
            r = kb["images_per_s"] / nb["images_per_s"]
            t.update(value=r, basis="bench_compiled",
                     measured=f"{r:.3f}× (kp {kb['images_per_s']:.0f}, native {nb['images_per_s']:.0f} images/s; "
                              f"training steps only, from step time: the epoch part did not finish)")
    if "value" in t:
        t["passed"] = t["value"] >= TARGETS["kp_compiled_speed"]
    out.append(t)

    for name, key in (("kp_epoch_s", "kp_epoch_s"), ("kp_epoch_s_stretch", "kp_epoch_s_stretch")):
        limit = TARGETS[key]
        t = {"name": name, "target": f"one CIFAR-100-sized epoch of kp_resnet18, full width, compiled ≤ {limit:g} s"
                                     + (" (stretch)" if "stretch" in name else "")}
        if "wall_s" in kp:
            t.update(value=kp["wall_s"], basis="epoch_compiled", passed=kp["wall_s"] <= limit,
                     measured=f"{kp['wall_s']:.2f} s wall clock with evaluation, checkpoint and monitor records "
                              f"({kp['time_s']:.2f} s of training steps)")
        out.append(t)

    t = {"name": "kp_memory", "target": f"KP compiled peak memory ≤ {TARGETS['kp_memory']:.2f}× native"}
    mk, mn = own_memory(kp), own_memory(native)
    if mk is not None and mn:
        r = mk / mn
        t.update(value=r, basis="epoch_compiled", passed=r <= TARGETS["kp_memory"],
                 measured=f"{r:.3f}× (kp {mk:.0f} MB, native {mn:.0f} MB: peak of the compiled training steps "
                          f"less the {kp.get('data_mb', 0):.0f} MB of data both hold)")
    else:
        kb = _variant(parts, "bench_compiled", "kp").get("memory") or {}
        nb = _variant(parts, "bench_compiled", "native").get("memory") or {}
        if kb.get("peak_mb") and nb.get("peak_mb"):
            r = kb["peak_mb"] / nb["peak_mb"]
            t.update(value=r, basis="bench_compiled", passed=r <= TARGETS["kp_memory"],
                     measured=f"{r:.3f}× (kp {kb['peak_mb']:.0f} MB, native {nb['peak_mb']:.0f} MB; step time's "
                              f"timed steps: the epoch part did not finish)")
    out.append(t)

    for t in out:
        if "value" not in t:
            t.update(measured="not measured", passed=None, result="NOT MEASURED")
        elif not judged:
            t.update(passed=None, result="not judged (smoke run: CPU, tiny sizes)")
        else:
            t["result"] = "PASS" if t["passed"] else "FAIL"
    return out


# ---------------------------------------------------------------------------------------------
# markdown

def _fmt(v, spec=".1f", dash="–") -> str:
    return dash if v is None else format(v, spec)


def _hms(seconds) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _compile_line(stats: dict | None) -> str:
    if not stats:
        return "–"
    if not stats.get("available"):
        return "not recorded"
    n = stats.get("forward_graphs", 0) + stats.get("backward_graphs", 0)
    return f"{n} ({stats.get('recompiles', 0)} recompiles), {stats.get('seconds', 0):.1f} s"


def render_markdown(s: dict) -> str:
    parts = s["parts"]
    plan = s.get("plan") or {}
    env = _result(parts, "env")
    dev = (env.get("devices") or [{}])[0]
    smi = env.get("nvidia_smi") or {}
    lines = [f"# GPU check ({s['mode']})", ""]
    if s["mode"] == "smoke":
        lines += ["Smoke run: the GPU check's code path at tiny sizes on the CPU. No number here is a GPU "
                  "measurement.", ""]
    lines += [f"`{s['command']}`, started {s['started']}, {s.get('elapsed_s') or 0:.0f} s of a "
              f"{s['budget_s']:.0f} s budget; commit {s['repo'].get('commit', 'unknown')[:12]}"
              + (f" with {s['repo']['modified_files']} modified files" if s['repo'].get('modified_files') else "")
              + ".", ""]

    lines += ["## Parts", "", "Run in this order, each in a process of its own; a part takes what the budget has "
              "left, up to its limit.", "",
              "| part | status | seconds | limit | expected (plan) | note |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name in PARTS:
        if name not in parts:
            continue
        r = parts[name]
        expected = (plan.get(name) or {}).get("expected_s")
        lines.append(f"| {name} ({TITLES[name]}) | {r['status']} | {r.get('seconds', 0):.0f} | "
                     f"{_fmt(r.get('timeout_s'), '.0f')} | {_fmt(expected, '.0f')} | {_md(r.get('reason', ''))} |")
    lines.append("")

    lines += ["## Targets", "", "| target | measured | result |", "| --- | --- | --- |"]
    for t in s.get("targets", []):
        lines.append(f"| {t['target']} | {t['measured']} | {t['result']} |")
    lines.append("")

    if env:
        lines += ["## Environment", "", "| | |", "| --- | --- |"]
        rows = [("device", dev.get("name") or env.get("device")),
                ("GPU memory", f"{dev['total_memory_gib']:.1f} GiB, {dev.get('multiprocessors')} SMs, "
                               f"compute capability {dev.get('capability')}" if dev else None),
                ("driver", smi.get("driver_version")), ("CUDA (torch)", env.get("cuda")),
                ("cuDNN", env.get("cudnn")), ("torch", env.get("torch")), ("torchvision", env.get("torchvision")),
                ("triton", env.get("triton")), ("Python", env.get("python")),
                ("CPU", f"{env.get('cpu_count')} logical CPUs"),
                ("neurosim", env.get("neurosim_file")),
                ("inductor cache at start", env.get("inductor_cache"))]
        lines += [f"| {k} | {_md(str(v))} |" for k, v in rows if v]
        lines.append("")

    for name in PARTS:
        res = _result(parts, name)
        if not res or name == "env":
            continue
        if name.startswith("epoch_"):
            lines += _epoch_section(name, res, parts[name])
        elif name.startswith("bench_"):
            lines += _bench_section(name, res, parts[name])
        elif name == "tests":
            lines += _tests_section(res, parts[name])
        elif name == "cifar":
            lines += _cifar_section(res)

    failing = [(n, r) for n, r in parts.items() if r["status"] in BAD]
    if failing:
        lines += ["## Output of parts that did not finish cleanly", ""]
        for n, r in failing:
            lines += [f"### {n}: {r['status']}", "", "```", r.get("log_tail", "")[-4000:], "```", ""]
    return "\n".join(lines) + "\n"


def _epoch_section(name: str, res: dict, rec: dict) -> list[str]:
    st = res.get("settings") or {}
    variants = res.get("variants") or {}
    compiled = bool(st.get("compile"))
    cuda = any("peak_mb" in e for r in variants.values() for e in r.get("epochs") or [])
    lines = [f"## {TITLES[name][0].upper() + TITLES[name][1:]}", "",
             "```", f"python3 benchmarks/{rec.get('command', '').split('benchmarks/', 1)[-1]}", "```", "",
             f"{res.get('device_name', '')}, torch {res.get('torch')}, {res.get('date')}. Data: "
             f"{_md(res.get('data_note', ''))}. Width {st.get('width')}, {st.get('epochs')} epochs per variant after "
             f"a warm-up" + (f", torch.compile backend {st.get('backend')}" if compiled else ", not compiled") + ".", ""]
    head = ("| variant | recipe | epoch | wall clock | images/s | vs native | training steps | outside training |"
            + (" peak (epoch) | peak (steps) |" if cuda else "") + (" compiled in the epoch |" if compiled else "")
            + " train loss |")
    lines += [head, "|" + " --- |" * (head.count("|") - 1)]
    native = ((variants.get("native") or {}).get("epochs") or [{}])[-1].get("images_per_s")
    for v, r in variants.items():
        if r.get("failure") and not r.get("epochs"):
            lines.append(f"| {v} | failed: {_md(r['failure'])} |")
            continue
        for e in r.get("epochs") or []:
            ratio = e["images_per_s"] / native if native else None
            row = (f"| {v} | {_md(r.get('recipe', ''))} | {e['epoch']} | {e['wall_s']:.2f} s | {e['images_per_s']:.0f} | "
                   f"{_fmt(ratio, '.3f')} | {e['time_s']:.2f} s ({e['train_images_per_s']:.0f}/s) | "
                   f"{e['outside_training_s']:.2f} s |")
            if cuda:
                row += f" {_fmt(e.get('peak_mb'), '.0f')} MB | {_fmt(e.get('step_peak_mb'), '.0f')} MB |"
            if compiled:
                row += f" {_compile_line(e.get('compile'))} |"
            lines.append(row + f" {_fmt(e.get('train_loss'), '.3f')} |")
    monitors = ", ".join(f"{v} every {r['monitor_every']} steps" for v, r in variants.items() if r.get("monitor_every"))
    lines += ["", "Wall clock: the whole epoch as `Run.train` (or the plain loop) goes through it: every batch "
              "drawn and augmented on the device, forward, feedback, local updates, SGD, "
              + (f"monitor records ({monitors}), " if monitors else "")
              + "evaluation of the test split, checkpoint. The first epoch also holds the evaluation before "
              "training. Training steps: the run's own `time_s`. vs native: images/s over the wall clock, against "
              "native's last epoch."
              + (" Peak (steps): CUDA memory allocated over the training steps alone; both peaks include the data "
                 f"set held on the device ({_fmt((variants.get('kp') or {}).get('epochs', [{}])[-1].get('data_mb'), '.0f')}"
                 " MB)." if cuda else ""), ""]
    warm = [(v, r) for v, r in variants.items() if r.get("compile")] if compiled else []
    if warm:
        lines += ["Warm-up (compilation, then the state restored through `load_state_dict`):", "",
                  "| variant | warm-up | graph | pass | frame | compile seconds | recompile reason |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for v, r in warm:
            c = r["compile"]
            graphs = c.get("graphs") if c.get("available") else None
            if not graphs:
                lines.append(f"| {v} | {_fmt(r.get('warmup_s'))} s | {_md(_compile_line(c))} | | | | |")
            for g in graphs or []:
                lines.append(f"| {v} | {_fmt(r.get('warmup_s'))} s | {g['id']} | {g['pass']} | {_md(g['frame'])} | "
                             f"{_fmt(g.get('seconds'))} | {_md(g.get('reason') or '')} |")
        lines.append("")
    watch = [(v, r["watch"]) for v, r in variants.items() if r.get("watch")]
    for v, w in watch:
        lines.append(f"Divergence watch after the restore ({v}): first loss {w.get('first_loss')}, the run's first "
                     f"step {w.get('first_step_loss')}: " + ("fresh." if w.get("fresh") else
                                                             "**taken from the warm-up**."))
    if watch:
        lines.append("")
    return lines


def _bench_section(name: str, res: dict, rec: dict) -> list[str]:
    st = res.get("settings") or {}
    lines = [f"## {TITLES[name].capitalize()}: {st.get('model')} width {st.get('width')}, batch "
             f"{st.get('batch')}, {st.get('dtype')}{', channels_last' if st.get('channels_last') else ''}"
             f"{', torch.compile (' + str(st.get('compile_backend')) + ')' if st.get('compile') else ''}"
             f"{', batch dimension dynamic' if st.get('dynamic_batch') else ''}, {res.get('device_name')}", "",
             "```", f"python3 benchmarks/{rec.get('command', '').split('benchmarks/', 1)[-1]}", "```", "",
             f"{st.get('reps')} repetitions of {st.get('steps_per_rep')} steps after {st.get('warmup')} warm-up steps"
             f"{', variants one after the other' if st.get('sequential') else ', interleaved'}; medians. torch "
             f"{res.get('torch')}, {res.get('date')}." + (" WM: the sleep its preset schedules is in its steps."
                                                           if "wm" in (st.get("rules") or []) else ""), ""]
    has_mem = any(isinstance(r.get("memory"), dict) and r["memory"] for r in res["variants"].values())
    head = "| variant | ms/step (median) | min..max | vs native | images/s | 50k-image epoch | warm-up |"
    sep = "| --- | --- | --- | --- | --- | --- | --- |"
    if st.get("compile"):
        head += " compiled in the warm-up |"
        sep += " --- |"
    if has_mem:
        mem = "CUDA peak" if "cuda" in str(st.get("device")) else "peak RSS growth"
        head += f" {mem} | memory vs native |"
        sep += " --- | --- |"
    lines += [head, sep]
    for v, r in res["variants"].items():
        if "median_ms" not in r:
            lines.append(f"| {v} | " + (f"failed: {_md(r['failure'])}" if r.get("failure") else "not timed") + " |")
            continue
        lo, hi = r["spread_ms"]
        row = (f"| {v} | {r['median_ms']:.1f} | {lo:.1f}..{hi:.1f} | {_fmt(r.get('ratio_vs_native'), '.3f')} | "
               f"{r['images_per_s']:.0f} | {_hms(r.get('epoch_s'))} | {_fmt(r.get('warmup_s'))} s |")
        if st.get("compile"):
            row += f" {_compile_line(r.get('compile'))} |"
        if has_mem:
            m = r.get("memory") or {}
            row += (f" failed: {_md(m['error'])} | |" if "error" in m else
                    f" {_fmt(m.get('peak_mb'), '.0f')} MB | {_fmt(m.get('ratio_vs_native'), '.3f')} |")
        lines.append(row)
    lines.append("")
    return lines


def _tests_section(res: dict, rec: dict) -> list[str]:
    lines = ["## Tests", "", f"`{rec.get('command', '')}`: {res['passed']} passed, {res['failed']} failed, "
             f"{res['errors']} errors, {res['skipped']} skipped"
             + (f" ({res['seconds']:.0f} s)" if res.get("seconds") else "")
             + (f"; {res['source']}" if res.get("source") else "") + ".", ""]
    for f in res["failures"]:
        lines.append(f"- FAILED `{f['test']}`: {_md(f['message'])}")
    for why, n in res["skip_reasons"].items():
        lines.append(f"- skipped ({n}): {_md(why)}")
    lines.append("")
    return lines


def _cifar_section(res: dict) -> list[str]:
    if not res.get("curve"):
        return []
    lines = [f"## kp_resnet18 on packed CIFAR-100 ({_md(res.get('data_note', ''))})", "",
             "| epoch | train loss | train top-1 | test top-1 | test top-5 | mean W–Bᵀ angle | epoch time | "
             "images/s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in res["curve"]:
        lines.append(f"| {m['epoch']} | {_fmt(m.get('train_loss'), '.3f')} | {_fmt(m.get('train_acc'), '.2f')} % | "
                     f"{_fmt(m.get('test_acc'), '.2f')} % | {_fmt(m.get('test_top5'), '.2f')} % | "
                     f"{_fmt(m.get('mean_angle'), '.1f')}° | {_fmt(m.get('time_s'), '.2f')} s | "
                     f"{_fmt(m.get('images_per_s'), '.0f')} |")
    lines.append("")
    return lines
