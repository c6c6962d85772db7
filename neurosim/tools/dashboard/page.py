"""The pieces of the dashboard page, drawn with Bokeh: epoch curves, per-synapse heat-maps, the
synapse picker and its views, and the whole layout (``build``)."""

from __future__ import annotations

import html

import numpy as np

from neurosim.tools.dashboard.runs import RunData, facts, run_labels
from neurosim.tools.dashboard.time_panel import time_views

# Per-synapse scalar arrays of the monitor: (name, what the page calls it, unit).
SCALARS = (("angle", "W–Bᵀ angle", "degrees"), ("norm_ratio", "‖Bᵀ‖/‖W‖", "ratio"),
           ("delta_angle", "delta angle (error vs backprop's)", "degrees"),
           ("grad_angle", "update angle (ΔW vs gradient)", "degrees"),
           ("sleep_angle_before", "W–Bᵀ angle before sleep", "degrees"),
           ("sleep_angle_after", "W–Bᵀ angle after sleep", "degrees"))
# The ones with a heat-map and a curve of their own.
HEATMAPS = ("angle", "norm_ratio", "delta_angle", "grad_angle")


def _palette(n: int) -> list[str]:
    from bokeh.palettes import Category10_10, Category20_20

    return list(Category10_10 if n <= 10 else Category20_20) * (n // 20 + 1)


def _figure(title: str, x_label: str, y_label: str, *, epochs: bool = False, **kw):
    from bokeh.models import BasicTicker
    from bokeh.plotting import figure

    p = figure(title=title, width=kw.pop("width", 470), height=kw.pop("height", 300),
               tools="pan,box_zoom,wheel_zoom,reset,save,hover", toolbar_location="above", **kw)
    p.xaxis.axis_label, p.yaxis.axis_label = x_label, y_label
    p.toolbar.autohide = True  # shown while the pointer is over the plot: titles stay readable
    if epochs:
        p.xaxis.ticker = BasicTicker(min_interval=1, desired_num_ticks=8)  # integer epochs only
    return p


def _legend(p, items):
    """A legend inside the plot, hiding on click; only for one run (several runs have the colour key
    and the run toggle at the top of the page instead)."""
    from bokeh.models import Legend, LegendItem

    items = [(lab, rs) for lab, rs in items if rs]
    if items:
        legend = Legend(items=[LegendItem(label=lab, renderers=rs) for lab, rs in items], location="top_right",
                        click_policy="hide", label_text_font_size="8pt", spacing=0, padding=3,
                        background_fill_alpha=0.6)
        p.add_layout(legend)


def _series(records, key):
    pts = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    return [e for e, _ in pts], [v for _, v in pts]


_EPOCH_PLOTS = (
    ("loss", "loss (cross-entropy)", (("test_loss", "solid", "test"), ("train_loss", "dashed", "train"))),
    ("accuracy", "accuracy (%)", (("test_acc", "solid", "test top-1"), ("test_top5", "dotted", "test top-5"),
                                  ("train_acc", "dashed", "train top-1"), ("train_top5", "dotdash", "train top-5"))),
    ("learning rate", "learning rate", (("lr", "solid", "lr"),)),
    ("mean W–Bᵀ angle", "degrees", (("mean_angle", "solid", "mean over synapses"),)),
)
_EPOCH_NOTE = ("Train values are running means over each epoch's batches (the weights changing meanwhile); test "
               "values are measured at the epoch's end. Epoch 0: before training."
)


def epoch_plots(runs, labels, colours, groups):
    """Loss, accuracy, learning rate and mean angle by epoch: one colour per run, one dash per
    series (named in the legend for one run, in the title for several)."""
    from bokeh.models import ColumnDataSource

    figs = []
    for title, unit, series in _EPOCH_PLOTS:
        present = [(k, d, n) for k, d, n in series if any(_series(r.records, k)[0] for r in runs)]
        if not present:
            continue
        styles = ", ".join(f"{d} {n}" for _, d, n in present)
        p = _figure(title if len(runs) == 1 or len(present) == 1 else f"{title} ({styles})", "epoch", unit,
                    epochs=True, width=340, height=280)
        p.hover.tooltips = [("", "@run"), ("epoch", "@x"), ("step", "@step"), ("value", "@y{0.[0000]}")]
        items = []
        for i, (run, lab) in enumerate(zip(runs, labels)):
            rs = []
            steps = {r["epoch"]: r.get("step", "") for r in run.records}
            for key, dash, name in present:
                x, y = _series(run.records, key)
                if not x:
                    continue
                one = " (one epoch so far)" if len(x) == 1 else ""
                src = ColumnDataSource({"x": x, "y": y, "step": [steps.get(e, "") for e in x],
                                        "run": [f"{lab}: {name}{one}"] * len(x)})
                pair = [p.line("x", "y", source=src, color=colours[i], line_dash=dash, line_width=2),
                        p.scatter("x", "y", source=src, color=colours[i], size=6 if len(x) > 1 else 10)]
                rs += pair
                if len(runs) == 1:
                    items.append((name + one, pair))
            groups[i] += rs
        if title == "learning rate":
            p.y_range.start = 0
        _legend(p, items)
        figs.append(p)
    return figs


_STEP_NOTE = ("Loss and top-1 on the monitor's fixed probe batch of training images, measured at every record "
              "step under the circuit's own forward pass; the learning rate each step trained with.")


def step_plots(runs, labels, colours, groups):
    """Probe loss, probe top-1 and learning rate by engaged step (runs with a monitor probe);
    a run with one record is said in the title. Returns [] when no run has them."""
    from bokeh.models import ColumnDataSource

    def lr_steps(records):
        # The rate an epoch trained with is the one its record before it holds (epoch 0: the first).
        xs, ys = [], []
        for before, after in zip(records, records[1:]):
            if "step" in before and "step" in after and "lr" in before:
                xs += [before["step"], after["step"]]
                ys += [before["lr"], before["lr"]]
        return xs, ys

    series = [("probe loss", "loss", lambda r: _probe(r, "probe_loss")), ("probe top-1", "%",
              lambda r: _probe(r, "probe_top1")), ("learning rate", "learning rate", lambda r: lr_steps(r.records))]
    if not any(_probe(r, "probe_loss")[0] for r in runs):
        return []
    figs = []
    for title, unit, values in series:
        shown = [(i, *values(run)) for i, run in enumerate(runs)]
        if not any(x for _, x, _ in shown):
            continue  # nothing to draw yet (a run stopped before its first epoch has no rates by step)
        one = [labels[i] for i, x, _ in shown if len(x) == 1]
        p = _figure(title + (f" (one record: {', '.join(one)})" if one else ""), "training step (engaged optimizer "
                    "steps)", unit, width=440, height=280)
        for i, x, y in shown:
            if not x:
                continue
            src = ColumnDataSource({"x": x, "y": y, "run": [labels[i]] * len(x)})
            groups[i] += [p.line("x", "y", source=src, color=colours[i], line_width=2),
                          p.scatter("x", "y", source=src, color=colours[i], size=5 if len(x) > 1 else 10)]
        if title == "learning rate":
            p.y_range.start = 0
        figs.append(p)
    return figs


def _probe(run, name: str):
    """Steps and finite values of a probe quantity of ``run``'s monitor (empty without one)."""
    rec = run.monitor
    a = None if rec is None else rec.arrays.get(name)
    if a is None:
        return [], []
    keep = np.isfinite(a)
    return [int(s) for s in np.asarray(rec.steps)[keep]], [float(v) for v in a[keep]]


def _single(values: np.ndarray) -> bool:
    return int(np.isfinite(values).any(axis=1).sum()) == 1


def _values_table(rec, name: str, unit: str) -> str:
    a = rec.arrays[name]
    row = int(np.flatnonzero(np.isfinite(a).any(axis=1))[0])
    cells = "".join(f"<tr><td>{html.escape(s)}</td><td>{a[row, i]:.4g} {unit}</td></tr>"
                    for i, s in enumerate(rec.synapses) if np.isfinite(a[row, i]))
    return f"step {int(rec.steps[row])}<table class='facts'>{cells}</table>"


def heatmaps(run, label: str):
    """Synapse × step heat-maps (one tab per recorded quantity) of one run, with notes for a
    quantity that is not recorded or has a single record (values, not a lone dot)."""
    from bokeh.models import ColorBar, Div, FixedTicker, LinearColorMapper, TabPanel, Tabs
    from bokeh.palettes import Viridis256

    rec = run.monitor
    names = list(rec.synapses)
    panels, notes = [], []
    for key, what, unit in SCALARS:
        if key not in HEATMAPS:
            continue
        a = rec.arrays.get(key)
        if a is None or not np.isfinite(a).any():
            notes.append(f"<b>{what}</b>: not recorded in this run (NaN: "
                         f"{'no probe batch' if 'delta' in key or 'grad' in key else 'no feedback matrix'}).")
            continue
        if _single(a):
            notes.append(f"<b>{what}</b>: <b>one record so far</b>, so no curve or map yet — its values at "
                         + _values_table(rec, key, unit))
            continue
        steps = rec.steps.astype(np.float64)
        every = float(np.median(np.diff(steps))) if len(steps) > 1 else 1.0
        img = np.ascontiguousarray(a.T.astype(np.float32))
        finite = img[np.isfinite(img)]
        mapper = LinearColorMapper(palette=Viridis256, low=float(finite.min()), high=float(finite.max()),
                                   nan_color="#eeeeee")
        p = _figure(f"{label}: {what} ({unit}) per synapse and step", "training step (engaged optimizer steps)",
                    "synapse", width=960, height=max(200, 50 + 15 * len(names)),
                    x_range=(steps[0] - every / 2, steps[-1] + every / 2), y_range=(len(names) - 0.5, -0.5))  # shallow synapses on top
        p.image(image=[img], x=steps[0] - every / 2, y=-0.5, dw=steps[-1] - steps[0] + every, dh=len(names),
                color_mapper=mapper)
        p.hover.tooltips = [("step", "$x{0}"), ("synapse", "$y{0}"), (unit, "@image{0.[000]}")]
        p.yaxis.ticker = FixedTicker(ticks=list(range(len(names))))
        p.yaxis.major_label_overrides = {i: n for i, n in enumerate(names)}
        p.add_layout(ColorBar(color_mapper=mapper, title=unit), "right")
        panels.append(TabPanel(child=p, title=what))
    out = []
    if notes:
        out.append(Div(text="<br>".join(notes), width=960))
    if panels:
        out.append(Tabs(tabs=panels))
    return out


def _store(rec, names: list[str], fill: int | None = None) -> dict:
    """The per-record columns of one run for every synapse of ``names`` (NaN where it lacks one):
    ``steps``, ``QUANTITY|SYNAPSE``, ``wJ|SYNAPSE`` and ``bJ|SYNAPSE`` (traced pairs)."""
    n = len(rec.steps)
    nan = np.full(n, np.nan, np.float32)
    data = {"steps": rec.steps.astype(np.float32)}
    k = rec.traces_w.shape[2]
    for s in names:
        i = rec.synapses.index(s) if s in rec.synapses else None
        for key, _, _ in SCALARS:
            a = rec.arrays.get(key)
            data[f"{key}|{s}"] = nan if a is None or i is None else a[:, i].astype(np.float32)
        for j in range(fill if fill is not None else k):
            have = i is not None and j < k and rec.trace_index[i, j] >= 0
            data[f"w{j}|{s}"] = rec.traces_w[:, i, j].astype(np.float32) if have else nan
            data[f"b{j}|{s}"] = rec.traces_b[:, i, j].astype(np.float32) if have else nan
    return data


def _scatter_store(rec, names: list[str]) -> dict:
    m = rec.scatter_w.shape[2]
    data = {}
    for s in names:
        i = rec.synapses.index(s) if s in rec.synapses else None
        for p in range(len(rec.scatter_steps)):
            for key, a in (("w", rec.scatter_w), ("b", rec.scatter_b)):
                data[f"{key}{p}|{s}"] = a[p, i].astype(np.float32) if i is not None else np.full(m, np.nan, np.float32)
    return data


_PICK_JS = """
const s = picker.value;
for (let r = 0; r < stores.length; r++) {
  const d = stores[r].data, c = {steps: d.steps};
  for (const q of scalars) c[q] = d[q + '|' + s];
  curves[r].data = c;
  const xs = [], ys = [], dash = [], pair = [];
  for (let j = 0; j < ntraces[r]; j++) {
    for (const k of ['w', 'b']) {
      xs.push(d.steps); ys.push(d[k + j + '|' + s]);
      dash.push(k == 'w' ? 'solid' : 'dashed'); pair.push(k == 'w' ? 'W pair ' + j : 'B pair ' + j);
    }
  }
  traces[r].data = {xs: xs, ys: ys, dash: dash, pair: pair, colour: tcolours[r]};
  const sd = scatters_all[r].data, p = Math.min(slider ? slider.value : 0, nsnap[r] - 1);
  if (nsnap[r] > 0) scatters[r].data = {w: sd['w' + p + '|' + s], b: sd['b' + p + '|' + s]};
}
if (slider) slider.title = 'scatter snapshot ' + slider.value + ' (step ' + snapsteps[slider.value] + ')';
"""


def synapse_views(runs, labels, colours, groups):
    """The synapse picker and what it shows: the chosen synapse's curves over steps, its traced
    pairs, its W-vs-Bᵀ scatter snapshots (a slider through them) and, for runs in time, its traced
    pairs within a presentation (``time_panel``)."""
    from bokeh.models import ColumnDataSource, CustomJS, Div, Select, Slider

    monitored = [(i, r) for i, r in enumerate(runs) if r.monitor is not None]
    if not monitored:
        return [Div(text="<p>No monitor files (monitor.npz, monitor.json): the run was made without a monitor "
                         "(--monitor-every 0) or has not finished an epoch.</p>")]
    names = list(dict.fromkeys(s for _, r in monitored for s in r.monitor.synapses))
    first = names[0]
    picker = Select(title="synapse", value=first, options=names, name="synapse_picker", width=300)
    nsnap = [len(r.monitor.scatter_steps) if r.monitor.scatter_w.shape[2] else 0 for _, r in monitored]
    snapsteps = [int(v) for v in max((r.monitor.scatter_steps for _, r in monitored), key=len)]
    slider = (Slider(start=0, end=max(nsnap) - 1, value=max(nsnap) - 1, step=1, width=400,
                     title=f"scatter snapshot {max(nsnap) - 1} (step {snapsteps[-1]})", name="snapshot_slider")
              if max(nsnap) > 1 else None)
    curve_figs = {key: _figure(f"chosen synapse: {what}", "training step", unit, width=470, height=260)
                  for key, what, unit in SCALARS if key in HEATMAPS}
    sleep_fig = _figure("chosen synapse: W–Bᵀ angle before (○) and after (●) each sleep", "training step",
                        "degrees", width=470, height=260)
    trace_fig = _figure("chosen synapse: traced pairs, W_ji solid, B_ij dashed", "training step", "weight",
                        width=960, height=320)
    scat_fig = _figure("chosen synapse: Bᵀ_ji against W_ji (dashed: B = W)", "W_ji (weight)", "Bᵀ_ji (weight)",
                       width=470, height=450, x_range=(-1, 1), y_range=(-1, 1))
    stores, curves, traces, scat_all, scats, ntraces, tcolours, notes = [], [], [], [], [], [], [], []
    items: dict = {}
    any_sleep = False
    lim = 1e-12
    for n, (i, run) in enumerate(monitored):
        rec, lab, col = run.monitor, labels[i], colours[i]
        k = rec.traces_w.shape[2]
        store = ColumnDataSource(_store(rec, names), name=f"store_{n}")
        data = {"steps": store.data["steps"], **{q: store.data[f"{q}|{first}"] for q, _, _ in SCALARS}}
        curve = ColumnDataSource(data, name=f"picked_curve_{n}")
        rs = []
        for key, fig in curve_figs.items():
            if rec.arrays.get(key) is None or not np.isfinite(rec.arrays[key]).any():
                continue
            one = len(rec.steps) == 1 or _single(rec.arrays[key])
            rs.append(fig.line("steps", key, source=curve, color=col, line_width=2, name=f"picked_{key}_{n}"))
            rs.append(fig.scatter("steps", key, source=curve, color=col, size=4 if not one else 9))
            items.setdefault(key, []).append((lab + (" (one record)" if one else ""), rs[-2:]))
        if rec.has_sleep:
            any_sleep = True
            srs = [sleep_fig.scatter("steps", "sleep_angle_before", source=curve, color=col, size=7,
                                     fill_color=None),
                   sleep_fig.scatter("steps", "sleep_angle_after", source=curve, color=col, size=7)]
            rs += srs
            items.setdefault("sleep", []).append((lab, srs))
        tcol = [c for j in range(k) for c in (_palette(20)[j % 20],) * 2] if len(monitored) == 1 else [col] * (2 * k)
        trace = ColumnDataSource({"xs": [], "ys": [], "dash": [], "pair": [], "colour": []}, name=f"picked_traces_{n}")
        tr = trace_fig.multi_line("xs", "ys", source=trace, line_color="colour", line_dash="dash", line_width=1.5)
        rs.append(tr)
        items.setdefault("traces", []).append((lab, [tr]))
        sa = ColumnDataSource(_scatter_store(rec, names), name=f"scatter_store_{n}") if nsnap[n] else \
            ColumnDataSource({})
        sc = ColumnDataSource({"w": [], "b": []}, name=f"picked_scatter_{n}")
        if nsnap[n]:
            sr = scat_fig.scatter("w", "b", source=sc, color=col, size=4, alpha=0.5)
            rs.append(sr)
            items.setdefault("scatter", []).append((lab, [sr]))
            both = np.concatenate([rec.scatter_w.ravel(), rec.scatter_b.ravel()])
            if np.isfinite(both).any():
                lim = max(lim, float(np.nanmax(np.abs(both))) * 1.05)
        if len(rec.steps) == 1:
            notes.append(f"{html.escape(lab)}: the monitor holds <b>one record so far</b> (step "
                         f"{int(rec.steps[0])}): each curve below is a single point, not a trend.")
        if nsnap[n] == 1:
            notes.append(f"{html.escape(lab)}: <b>one scatter snapshot</b> (step {int(rec.scatter_steps[0])}).")
        groups[i] += rs
        stores.append(store), curves.append(curve), traces.append(trace), scat_all.append(sa), scats.append(sc)
        ntraces.append(k), tcolours.append(tcol)
    scat_fig.line([-lim, lim], [-lim, lim], color="black", line_dash="dashed")
    if len(monitored) == 1:  # several runs: the colour key at the top names them
        for key, fig in curve_figs.items():
            _legend(fig, items.get(key, []))
        _legend(sleep_fig, [("before", items["sleep"][0][1][:1]), ("after", items["sleep"][0][1][1:])]
                if "sleep" in items else [])
    scat_fig.x_range.start, scat_fig.x_range.end = -lim, lim
    scat_fig.y_range.start, scat_fig.y_range.end = -lim, lim
    pick = CustomJS(args=dict(picker=picker, stores=stores, curves=curves, traces=traces, scatters=scats,
                              scatters_all=scat_all, slider=slider, nsnap=nsnap, ntraces=ntraces,
                              tcolours=tcolours, snapsteps=snapsteps, scalars=[q for q, _, _ in SCALARS]),
                    code=_PICK_JS)
    picker.js_on_change("value", pick)
    if slider is not None:
        slider.js_on_change("value", pick)
    _prime(first, stores, curves, traces, scat_all, scats, nsnap, ntraces, tcolours, slider)
    from bokeh.layouts import column, row

    shown = [f for key, f in curve_figs.items() if key in items]
    grid = [row(*shown[j:j + 2]) for j in range(0, len(shown), 2)]
    out = [Div(text="<h2>One synapse</h2>" + ("<p>" + "<br>".join(notes) + "</p>" if notes else "")),
           picker, *grid]
    if any_sleep:
        out.append(sleep_fig)
    out.append(trace_fig)
    if max(nsnap):
        out.append(column(*([slider] if slider else []), scat_fig))
    return out + time_views(runs, labels, colours, groups, picker, names, _palette(20))


def _prime(s, stores, curves, traces, scat_all, scats, nsnap, ntraces, tcolours, slider):
    """What ``_PICK_JS`` does, done once in Python: the page opens with the first synapse shown."""
    for r, store in enumerate(stores):
        d = store.data
        xs, ys, dash, pair = [], [], [], []
        for j in range(ntraces[r]):
            for k in ("w", "b"):
                xs.append(d["steps"]), ys.append(d[f"{k}{j}|{s}"])
                dash.append("solid" if k == "w" else "dashed"), pair.append(f"{k.upper()} pair {j}")
        traces[r].data = {"xs": xs, "ys": ys, "dash": dash, "pair": pair, "colour": tcolours[r]}
        if nsnap[r]:
            p = min(slider.value if slider else 0, nsnap[r] - 1)
            scats[r].data = {"w": scat_all[r].data[f"w{p}|{s}"], "b": scat_all[r].data[f"b{p}|{s}"]}


_STYLE = ("<style>table.facts{border-collapse:collapse;font-size:12px;margin-bottom:8px}"
          "table.facts th,table.facts td{border:1px solid #ccc;padding:2px 6px;text-align:left;"
          "vertical-align:top}</style>")


def build(runs: list[RunData], title: str | None = None):
    """The Bokeh layout of the page for ``runs``."""
    from bokeh.layouts import column, row
    from bokeh.models import CheckboxGroup, CustomJS, Div

    labels = run_labels(runs)
    colours = _palette(len(runs))
    groups: list[list] = [[] for _ in runs]
    title = title or (labels[0] if len(runs) == 1 else f"{len(runs)} runs")
    head = [Div(text=f"{_STYLE}<h1>{html.escape(title)}</h1>", width=960)]
    toggle = None
    if len(runs) > 1:
        toggle = CheckboxGroup(labels=labels, active=list(range(len(runs))), inline=True, name="run_toggle",
                               width=960)
        key = "".join(f"<span style='color:{c};font-weight:bold'>&#9632; {html.escape(lab)}</span><br>"
                      for lab, c in zip(labels, colours))
        head += [Div(text=f"<b>colour of each run</b> (labelled by the settings that differ):<br>{key}", width=960),
                 Div(text="<b>runs shown</b>:"), toggle]
    ep = epoch_plots(runs, labels, colours, groups)
    parts = [*head, Div(text=f"<h2>By epoch</h2><p>{_EPOCH_NOTE}</p>", width=960), row(*ep)]
    by_step = step_plots(runs, labels, colours, groups)
    if by_step:
        parts += [Div(text=f"<h2>By step</h2><p>{_STEP_NOTE}</p>", width=960), row(*by_step)]
    maps = []
    for run, lab in zip(runs, labels):
        if run.monitor is not None:
            maps += [Div(text=f"<h2>Per synapse and step: {html.escape(lab)}</h2>"), *heatmaps(run, lab)]
    parts += maps
    parts += synapse_views(runs, labels, colours, groups)
    parts.append(Div(text="<h2>Runs</h2>" + facts(runs, labels, colours), width=960))
    if toggle is not None:
        toggle.js_on_change("active", CustomJS(args=dict(groups=groups), code="""
for (let i = 0; i < groups.length; i++)
  for (const r of groups[i]) r.visible = cb_obj.active.includes(i);"""))
    return column(*parts)


