"""The dashboard's panel "within a presentation", for runs in time: the picked synapse's traced
pairs — presynaptic signal, local error, running ΔW_ji (ΔB_ij dashed where the rule learns it) —
against time within one presentation of the probe batch, at the snapshot a slider
(``time_snapshot_slider``) picks; a dotted line in each run's colour marks its stimulus's offset.
The page's synapse picker drives it, like the other views of one synapse."""

from __future__ import annotations

import numpy as np

# (array, what the panel calls it, unit); the update figure also draws time_update_b, dashed.
PANELS = (("time_pre", "presynaptic signal x̄_i (batch mean)", "activity"),
          ("time_error", "local error δ_j at the drive (batch mean)", "error"),
          ("time_update", "running ΔW_ji (solid), ΔB_ij (dashed)", "weight"))
LINES = ("time_pre", "time_error", "time_update", "time_update_b")

_JS = """
const s = picker.value;
for (let r = 0; r < stores.length; r++) {
  const d = stores[r].data, T = times[r].length, p = Math.min(slider ? slider.value : 0, nsnap[r] - 1);
  for (const q of lines) {
    const col = d[q + p + '|' + s], xs = [], ys = [], colour = [], pair = [];
    for (let j = 0; col && j < ks[r]; j++) {
      const y = col.slice(j * T, (j + 1) * T);
      if (!y.some((v) => !isNaN(v))) continue;
      xs.push(times[r]); ys.push(y); colour.push(colours[r][j]); pair.push(pairs[r][s][j]);
    }
    views[r][q].data = {xs: xs, ys: ys, colour: colour, pair: pair};
  }
}
if (slider) slider.title = 'presentation at snapshot ' + slider.value + ' (step ' + snapsteps[slider.value] + ')';
"""


def _store(rec, names: list[str]) -> dict:
    """Every series of one run, flattened per (array, snapshot, synapse): column
    ``ARRAYp|SYNAPSE`` holds the traced pairs one after the other, ``time`` steps each (NaN
    where the run lacks the synapse or the pair)."""
    k, t = rec.time_pre.shape[2], len(rec.time_steps)
    data = {}
    for s in names:
        i = rec.synapses.index(s) if s in rec.synapses else None
        for q in LINES:
            for p in range(len(rec.scatter_steps)):
                data[f"{q}{p}|{s}"] = (rec.arrays[q][p, i].reshape(-1).astype(np.float32) if i is not None
                                       else np.full(k * t, np.nan, np.float32))
    return data


def _pair_labels(rec, names: list[str]) -> dict:
    out = {}
    for s in names:
        labels = []
        for j in range(rec.time_pre.shape[2]):
            real = s in rec.synapses and rec.trace_index[rec.column(s), j] >= 0
            labels.append(f"W[{','.join(map(str, rec.traced_position(s, j)))}]" if real else "")
        out[s] = labels
    return out


def lines(data: dict, q: str, p: int, s: str, k: int, times, colours, pairs) -> dict:
    """What ``_JS`` shows for array ``q`` at snapshot ``p`` of synapse ``s``: one line per traced
    pair that has a value (done once in Python, so the page opens with the first synapse shown)."""
    col, t = data.get(f"{q}{p}|{s}"), len(times)
    out = {"xs": [], "ys": [], "colour": [], "pair": []}
    for j in range(k if col is not None else 0):
        y = col[j * t:(j + 1) * t]
        if np.isfinite(y).any():
            out["xs"].append(list(times)), out["ys"].append(y), out["colour"].append(colours[j])
            out["pair"].append(pairs[s][j])
    return out


def time_views(runs, labels, colours, groups, picker, names: list[str], palette) -> list:
    """The panel for the runs whose monitor holds traces within a presentation (none: no panel)."""
    from bokeh.models import ColumnDataSource, CustomJS, Div, Slider, Span

    from neurosim.tools.dashboard.page import _figure

    timed = [(i, r) for i, r in enumerate(runs)
             if r.monitor is not None and r.monitor.time_steps is not None and len(r.monitor.scatter_steps)]
    if not timed:
        return []
    nsnap = [len(r.monitor.scatter_steps) for _, r in timed]
    snapsteps = [int(v) for v in max((r.monitor.scatter_steps for _, r in timed), key=len)]
    last = max(nsnap) - 1
    slider = (Slider(start=0, end=last, value=last, step=1, width=400, name="time_snapshot_slider",
                     title=f"presentation at snapshot {last} (step {snapsteps[last]})") if last > 0 else None)
    figs = {q: _figure(f"chosen synapse: {what}", "time within the presentation (unit of dt)", unit, width=320,
                       height=300, name=f"time_figure_{q}") for q, what, unit in PANELS}
    for f in figs.values():
        f.hover.tooltips = [("pair", "@pair"), ("time", "$x{0.[00]}"), ("value", "$y{0.[0000]}")]
    stores, views, times, ks, pair_lists, tcolours, offsets = [], [], [], [], [], [], []
    first = picker.value
    for n, (i, run) in enumerate(timed):
        rec = run.monitor
        k, t = rec.time_pre.shape[2], [float(v) for v in rec.time_steps]
        store = ColumnDataSource(_store(rec, names), name=f"time_store_{n}")
        pairs = _pair_labels(rec, names)
        tcol = [palette[j % len(palette)] for j in range(k)] if len(runs) == 1 else [colours[i]] * k
        p = nsnap[n] - 1
        view = {}
        for q in LINES:
            view[q] = ColumnDataSource(lines(store.data, q, min(p, last), first, k, t, tcol, pairs),
                                       name=f"time_view_{q}_{n}")
            fig = figs["time_update" if q == "time_update_b" else q]
            groups[i].append(fig.multi_line("xs", "ys", source=view[q], line_color="colour", line_width=1.5,
                                            line_dash="dashed" if q == "time_update_b" else "solid"))
        duration = (rec.time_settings or {}).get("duration")
        if duration is not None:
            offsets.append(f"{labels[i]}: stimulus on up to {duration:g}")
            for f in figs.values():
                span = Span(location=float(duration), dimension="height", line_color=colours[i], line_dash="dotted",
                            line_width=2, name=f"stimulus_offset_{n}")
                f.add_layout(span)
                groups[i].append(span)
        stores.append(store), views.append(view), times.append(t), ks.append(k)
        pair_lists.append(pairs), tcolours.append(tcol)
    cb = CustomJS(args=dict(picker=picker, stores=stores, views=views, times=times, ks=ks, pairs=pair_lists,
                            colours=tcolours, nsnap=nsnap, slider=slider, snapsteps=snapsteps, lines=list(LINES)),
                  code=_JS)
    picker.js_on_change("value", cb)
    if slider is not None:
        slider.js_on_change("value", cb)
    from bokeh.layouts import row

    note = ("<h2>Within a presentation</h2><p>At each scatter snapshot the probe batch is presented once in time "
            "to a copy of the circuit; each line is one traced pair of the chosen synapse (its label gives the "
            "pair's place in W), batch means at every time step. Dotted: the stimulus's offset ("
            + "; ".join(offsets) + ").</p>")
    return [Div(text=note, width=960, name="within_presentation"), *([slider] if slider else []),
            row(*figs.values())]
