"""The dashboard in a real browser: headless Chromium through selenium opens the page of a short
digits run of every rule (``neurosim.rules.RULES``) with monitors on, logs no SEVERE console
entry, and shows a newly picked synapse's curve. Skipped where Chromium, its driver or selenium
is missing."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from neurosim.observe.monitors import load_monitor
from neurosim.rules import RULES
from neurosim.tools.dashboard import FILE, write_dashboard
from neurosim.training.config import preset
from neurosim.training.run_dir import open_run

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
pytestmark = [
    pytest.mark.slow,  # eleven short runs and a browser: about a minute or two on 2 CPU cores
    pytest.mark.skipif(not CHROMIUM.exists() and shutil.which("chromium") is None,
                       reason="no Chromium (apt-get install chromium)"),
    pytest.mark.skipif(not DRIVER.exists() and shutil.which("chromedriver") is None,
                       reason="no chromedriver (apt-get install chromium-driver)"),
]


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium"))
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options,
                              service=Service(str(DRIVER if DRIVER.exists() else shutil.which("chromedriver"))))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def rule_runs(tmp_path_factory):
    """One short digits run of every rule, monitors on (as ``--epochs 1 --train-limit 128
    --monitor-every 2``)."""
    root = tmp_path_factory.mktemp("rules")
    dirs = []
    for rule in RULES:
        cfg = preset(f"{rule}_mlp_digits", epochs=1, device="cpu", train_limit=128, monitor_every=2, monitor_probe=32)
        open_run(root / rule, cfg, quiet=True).train()
        dirs.append(root / rule)
    return dirs


def open_page(driver, path: Path) -> None:
    driver.get(path.as_uri())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if driver.execute_script("return !!(window.Bokeh && Bokeh.documents.length && "
                                 "Bokeh.documents[0].get_model_by_name('synapse_picker'))"):
            return
        time.sleep(0.1)
    raise AssertionError(f"the dashboard {path} did not render within 60 s")


def severe(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def picked(driver, source: str, column: str) -> list:
    return driver.execute_script(
        f"const s = Bokeh.documents[0].get_model_by_name({json.dumps(source)});"
        f"return s ? Array.from(s.data[{json.dumps(column)}], v => Number.isFinite(v) ? v : null) : null;")


def pick_last_synapse_and_check(driver, run_dirs, n: int) -> None:
    """Choose the last synapse in the picker; run ``n``'s picked curve then holds its angles."""
    rec = load_monitor(run_dirs[n])
    name = rec.synapses[-1]
    options = driver.execute_script("return Bokeh.documents[0].get_model_by_name('synapse_picker').options")
    assert name in options and options[0] != name
    ys = f"return Array.from(Bokeh.documents[0].get_model_by_name('picked_traces_{n}').data.ys[0])"
    before = driver.execute_script(ys)
    driver.execute_script(f"Bokeh.documents[0].get_model_by_name('synapse_picker').value = {json.dumps(name)}")
    time.sleep(0.3)
    for column in ("angle", "delta_angle", "norm_ratio"):
        want = [None if not np.isfinite(v) else v for v in rec.arrays[column][:, rec.column(name)].tolist()]
        got = picked(driver, f"picked_curve_{n}", column)
        assert got is not None and len(got) == len(want)
        assert all((g is None and w is None) or (g is not None and w is not None and abs(g - w) <= 1e-4 * max(1, abs(w)))
                   for g, w in zip(got, want)), (column, got, want)
    assert driver.execute_script(ys) != before  # the traced pairs are the new synapse's
    traces = driver.execute_script(f"return Bokeh.documents[0].get_model_by_name('picked_traces_{n}').data.ys.length")
    assert traces == 2 * rec.traces_w.shape[2]


def test_every_rules_dashboard_renders_and_follows_the_picker(browser, rule_runs, tmp_path):
    # Each rule's own page, as its run writes it.
    for d in rule_runs:
        page = write_dashboard([d])
        open_page(browser, page)
        assert not severe(browser), (d.name, severe(browser))
        pick_last_synapse_and_check(browser, [d], 0)
        assert not severe(browser), (d.name, severe(browser))
    browser.save_screenshot(str(tmp_path / f"{rule_runs[-1].name}.png"))
    # All rules overlaid, as a study's page: a run toggled off, another synapse picked.
    page = write_dashboard(rule_runs, tmp_path)
    assert page == tmp_path / FILE
    open_page(browser, page)
    browser.execute_script("const t = Bokeh.documents[0].get_model_by_name('run_toggle'); t.active = [0, 2];")
    n = list(RULES).index("kp")
    pick_last_synapse_and_check(browser, rule_runs, n)
    slider = "Bokeh.documents[0].get_model_by_name('snapshot_slider')"
    browser.execute_script(f"{slider}.value = 0;")
    assert browser.execute_script(f"return {slider}.title").startswith("scatter snapshot 0 (step 0)")
    assert not severe(browser), severe(browser)
    shot = tmp_path / "dashboard.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
