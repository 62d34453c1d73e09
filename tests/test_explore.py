"""The kernel explorer (issue 12): the page's data, its offline guarantee, and a real browser.

Unit tests read a written page back (:func:`read_explorer` parses the page's own JSON and
Bokeh's docs_json, not the writer's arrays) and compare it with ``top_correlated`` and the
embedding. The browser tests drive Debian's headless Chromium through Selenium with the
network switched off; they skip when Chromium / chromedriver are missing, and fail instead
when ``LOSSKERNEL_REQUIRE_BROWSER=1`` (CI sets it where /usr/bin/chromium exists).
Screenshots are kept under pytest's tmp dir and copied to benchmarks/out/ (git-ignored).
"""

import base64
import io
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from devinterp_losskernel import LossKernel
from devinterp_losskernel.analysis import top_correlated
from devinterp_losskernel.explore import ExplorerPage, explore, read_explorer
from devinterp_losskernel.hierarchy import Hierarchy

ARTEFACTS = Path(__file__).parent.parent / "benchmarks" / "out"
CLASSES = ["dog", "cat", "car", "bus"]
N = 120


def synthetic_kernel(n=N, seed=0, num_draws=300):
    """A kernel from random low-rank losses: 4 labels, each with its own shared factor."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    factors = rng.normal(size=(num_draws, 6))
    loadings = rng.normal(size=(6, n))
    losses = factors @ loadings + rng.normal(size=(num_draws, n)) * 0.7
    losses += rng.normal(size=(num_draws, 4))[:, labels] * 1.5
    losses = np.abs(losses) * 0.1
    cov = np.cov(losses, rowvar=False)
    return LossKernel(covariance=torch.tensor(cov), mean=torch.tensor(losses.mean(0)),
                      variance=torch.tensor(np.diag(cov).copy()), num_draws=num_draws,
                      init_loss=torch.tensor(losses[0]), labels=torch.tensor(labels))


def tiny_hierarchy():
    return Hierarchy.from_parents({"animal": "entity", "dog": "animal", "cat": "animal",
                                   "vehicle": "entity", "car": "vehicle", "bus": "vehicle"},
                                  classes=CLASSES)


@pytest.fixture(scope="module")
def kernel():
    return synthetic_kernel()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    base = np.linspace(0, 1, 16)[None, :, None, None] * np.ones((N, 16, 16, 3))
    return (np.clip(base + rng.random((N, 1, 1, 3)) * 0.5, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def coords():
    return np.random.default_rng(2).normal(size=(N, 2))


@pytest.fixture(scope="module")
def page(kernel, images, coords, tmp_path_factory):
    scores = {"memorization": kernel.variance.numpy() * 3, "flag": (np.arange(N) % 7 == 0).astype(int)}
    path = tmp_path_factory.mktemp("explore") / "kernel.html"
    return explore(kernel, embedding=coords, images=images, hierarchy=tiny_hierarchy(),
                   scores=scores, k=6, path=path, title="test page")


# --------------------------------------------------------------------------------------------
# the page's data
# --------------------------------------------------------------------------------------------

def test_returns_the_path_and_displays_inline(page):
    assert isinstance(page, ExplorerPage) and isinstance(page, str) and Path(page).is_file()
    assert os.fspath(page) == str(page) and page.path == Path(page)
    shown = page._repr_html_()
    assert shown.startswith("<iframe srcdoc=") and "&lt;!DOCTYPE html&gt;" in shown


@pytest.mark.parametrize("variant, lowest, other", [
    ("most", False, False), ("least", True, False), ("most_other", False, True), ("least_other", True, True)])
def test_neighbour_lists_are_the_kernels_top_k(page, kernel, variant, lowest, other):
    data = read_explorer(page)
    indices, values = data["neighbours"][variant]
    want_i, want_v = top_correlated(kernel, None, 6, exclude_same_label=other, lowest=lowest)
    np.testing.assert_array_equal(indices, want_i)
    np.testing.assert_allclose(values, want_v, atol=0.6 / 32767)  # R stored as int16 (R · 32767)
    # and a plain numpy argsort of R agrees (no ties in this kernel)
    r = kernel.correlation.numpy().copy()
    np.fill_diagonal(r, np.nan)
    if other:
        labels = kernel.labels.numpy()
        r[labels[:, None] == labels[None, :]] = np.nan
    key = np.where(np.isnan(r), np.inf, r if lowest else -r)
    np.testing.assert_array_equal(indices, np.argsort(key, axis=1, kind="stable")[:, :6])


def test_points_colours_and_thumbnails(page, kernel, coords, images):
    from PIL import Image

    data = read_explorer(page)
    points = data["points"]
    np.testing.assert_allclose(points["x"], coords[:, 0])
    np.testing.assert_allclose(points["y"], coords[:, 1])
    np.testing.assert_array_equal(points["index"], np.arange(N))
    np.testing.assert_allclose(points["variance"], kernel.variance.numpy())
    np.testing.assert_allclose(points["mean_loss"], kernel.mean.numpy())
    labels = kernel.labels.numpy()
    assert points["label_name"] == [CLASSES[i] for i in labels]
    assert points["path"][0] == "entity › animal › dog" and points["path"][2] == "entity › vehicle › car"

    keys = [c["key"] for c in data["colourings"]]
    assert keys == ["label", "hierarchy", "variance", "mean_loss", "init_loss", "score0", "score1"]
    assert points["color"] == points["c_score0"]  # the page opens on the first score given
    assert data["initial"] == "score0"
    # one colour per label, different labels different colours; the legend lists them all
    by_label = {lab: {c for c, l2 in zip(points["c_label"], labels) if l2 == lab} for lab in range(4)}
    assert all(len(v) == 1 for v in by_label.values()) and len(set.union(*by_label.values())) == 4
    legend = dict(data["colourings"][0]["legend"]["items"])
    assert {name: legend[name] for name in CLASSES} == {CLASSES[lab]: next(iter(by_label[lab])) for lab in range(4)}
    # hierarchy position: Hierarchy.position_colors
    want = tiny_hierarchy().position_colors(labels, cmap="hsv")[:, :3]
    got = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in points["c_hierarchy"]]) / 255
    np.testing.assert_allclose(got, want, atol=0.5 / 255 + 1e-9)
    # a continuous score: the order of the colours' colormap positions follows the score
    score = next(c for c in data["colourings"] if c["title"] == "memorization")
    assert score["legend"]["kind"] == "continuous"
    assert score["legend"]["min"] == pytest.approx(kernel.variance.numpy().min() * 3)
    flag = next(c for c in data["colourings"] if c["title"] == "flag")
    assert flag["legend"]["kind"] == "categorical" and len(flag["legend"]["items"]) == 2

    assert len(points["thumb"]) == N
    head, b64 = points["thumb"][5].split(",", 1)
    assert head == "data:image/webp;base64"
    thumb = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert thumb.size == (32, 32)
    assert {"dog", "animal", "vehicle", "entity"} <= set(data["search_terms"])


def test_texts_pairs_and_a_plain_matrix(tmp_path):
    kernel = synthetic_kernel(n=40, seed=3)
    pairs = [(a, b) for a, b in zip(range(40), range(40, 80))]
    (tmp_path / "sub").mkdir()
    path = explore(kernel.covariance.numpy(), embedding=np.zeros((40, 2)) + np.arange(40)[:, None],
                   texts=pairs, k=50, path=tmp_path / "sub" / "m.html", lowest=False)
    data = read_explorer(path)
    assert data["k"] == 39 and set(data["neighbours"]) == {"most"}  # no labels, k capped at n − 1
    assert data["points"]["text"][3] == "(3, 43)" and data["points"]["thumb"][3] == ""
    np.testing.assert_array_equal(data["neighbours"]["most"][0], top_correlated(kernel.covariance.numpy(), None, 39)[0])


def test_default_embedding_is_our_umap(tmp_path):
    from devinterp_losskernel.analysis import umap_embedding

    kernel = synthetic_kernel(n=60, seed=4)
    path = explore(kernel, k=3, path=tmp_path / "u.html", random_state=0)
    want = umap_embedding(kernel, labels=kernel.labels, random_state=0, n_neighbors=15).embedding
    np.testing.assert_allclose(read_explorer(path)["points"]["x"], want[:, 0], rtol=1e-5, atol=1e-5)


def test_refusals(kernel, tmp_path):
    with pytest.raises(ValueError, match="embedding must be"):
        explore(kernel, embedding=np.zeros((3, 2)), path=tmp_path / "a.html")
    with pytest.raises(ValueError, match="images must"):
        explore(kernel, embedding=np.zeros((N, 2)), images=np.zeros((5, 8, 8)), path=tmp_path / "a.html")
    with pytest.raises(ValueError, match="k must be"):
        explore(kernel, embedding=np.zeros((N, 2)), k=0, path=tmp_path / "a.html")
    with pytest.raises(ValueError, match="color_by"):
        explore(kernel, embedding=np.zeros((N, 2)), color_by="nope", path=tmp_path / "a.html")
    rect = LossKernel(covariance=kernel.covariance[:5], mean=kernel.mean, variance=kernel.variance,
                      num_draws=10, rows=torch.arange(5))
    with pytest.raises(ValueError, match="square"):
        explore(rect, embedding=np.zeros((N, 2)), path=tmp_path / "a.html")


def test_package_import_does_not_load_bokeh():
    import subprocess
    import sys

    # explore is a plain module holding a plain function: importing it loads no Bokeh either
    code = ("import sys, types, devinterp_losskernel as d; assert 'bokeh' not in sys.modules; "
            "from devinterp_losskernel.explore import explore; assert type(d.explore) is types.ModuleType; "
            "assert d.explore.explore is explore and explore.__module__ == 'devinterp_losskernel.explore'; "
            "assert 'bokeh' not in sys.modules; print('ok')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"


def test_cli_explore(kernel, images, coords, tmp_path, capsys):
    from devinterp_losskernel.cli import main

    kernel.save(tmp_path / "kernel.pt")
    np.save(tmp_path / "images.npy", images)
    torch.save(torch.tensor(coords), tmp_path / "emb.pt")
    np.save(tmp_path / "score.npy", np.arange(N, dtype=float))
    (tmp_path / "names.txt").write_text("\n".join(CLASSES) + "\n")
    out = tmp_path / "k.html"
    assert main(["explore", str(tmp_path / "kernel.pt"), "--images", str(tmp_path / "images.npy"),
                 "--embedding", str(tmp_path / "emb.pt"), "--label-names", str(tmp_path / "names.txt"),
                 "--score", f"rank={tmp_path / 'score.npy'}", "-k", "4", "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    data = read_explorer(out)
    np.testing.assert_allclose(data["points"]["x"], coords[:, 0])
    assert data["points"]["label_name"][:4] == CLASSES and data["neighbours"]["most"][0].shape == (N, 4)
    assert [c["title"] for c in data["colourings"]][-1] == "rank"
    with pytest.raises(SystemExit):
        main(["explore", str(tmp_path / "kernel.pt"), "--images", str(tmp_path / "missing.npy")])


# --------------------------------------------------------------------------------------------
# offline: no URL a browser would fetch
# --------------------------------------------------------------------------------------------

# http(s) strings inside Bokeh's own inlined bundle (bokeh + bokeh-gl) that sit where code
# could load them; each belongs to a model this page does not contain, so the code never
# runs (the browser test checks that no request is made). Anything new fails the test.
BOKEH_LOADERS = {
    "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-svg.js": "MathJax loader, only for TeX / MathText models",
    "https://maps.googleapis.com/maps/api/js": "GMapPlot's Google Maps loader",
    "https://cdn.jsdelivr.net/npm/@tabler/icons-webfont@latest": "TablerIcon's font URL",
    "https://bokeh.org/": "the toolbar logo's link (an <a href>, followed only when clicked; logo=None here)",
}
FETCHING = re.compile(r"""(?:\bsrc\s*[=:]\s*|\bhref\s*[=:]\s*|url\(\s*|fetch\(\s*|import\(\s*"""
                      r"""|\.open\(\s*["'`][A-Z]+["'`]\s*,\s*|@import\s+)["'`]?(https?://[^"'`\s)]+)""", re.I)


def _bokeh_bundle() -> str:
    from bokeh.resources import Resources

    return Resources(mode="inline", components=["bokeh", "bokeh-gl"]).render()


def test_no_url_a_browser_would_fetch(page):
    text = Path(page).read_text(encoding="utf-8")
    bundle = _bokeh_bundle()
    assert bundle in text, "the page inlines Bokeh's bundle verbatim"
    ours = text.replace(bundle, "")
    # our part of the page (markup, CSS, our JS, the data, Bokeh's docs_json) has no http(s) at all
    assert not re.findall(r"https?://", ours, re.I), re.findall(r".{40}https?://.{40}", ours)[:5]
    assert not re.search(r"<(?:script|link|img|iframe)[^>]+(?:src|href)\s*=\s*[\"']?(?!data:)[a-z]+:", ours, re.I)
    # the bundle: every http(s) URL in a fetching position is a known loader of an absent model
    fetchable = {m.group(1) for m in FETCHING.finditer(bundle)}
    unknown = {u for u in fetchable if not any(u.startswith(k) for k in BOKEH_LOADERS)}
    assert not unknown, f"new fetchable URLs in Bokeh's bundle: {sorted(unknown)}"
    assert not re.search(r"XMLHttpRequest\(\)[^;]{0,200}https?://", bundle)
    assert '"logo":null' in ours
    models = set(re.findall(r'\\?"name\\?":\\?"([A-Za-z0-9_]+)\\?"', ours))
    assert not models & {"GMapPlot", "GMap", "TeX", "MathML", "MathText", "TablerIcon"}
    # the remaining http(s) strings are licence comments, XML namespaces and error messages:
    # inert strings (the browser test checks that the page makes no request at all)
    inert = set(re.findall(r"https?://[^\s\"'`)<>\\]+", bundle)) - fetchable
    assert "http://www.w3.org/2000/svg" in inert


# --------------------------------------------------------------------------------------------
# a real browser
# --------------------------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def browser_available() -> bool:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)


def chromium_driver(user_data_dir: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={user_data_dir}", "--window-size=1400,900",
                 # WebGL without a GPU: SwiftShader (Bokeh falls back to a 2D canvas without it)
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_network_conditions(offline=True, latency=0, throughput=0)
    return driver


@pytest.fixture(scope="module")
def browser():
    if not browser_available():
        message = (f"headless Chromium needs {CHROMIUM}, {CHROMEDRIVER} (Debian: apt-get install chromium "
                   "chromium-driver) and selenium (pip install selenium)")
        if os.environ.get("LOSSKERNEL_REQUIRE_BROWSER") == "1":
            pytest.fail("LOSSKERNEL_REQUIRE_BROWSER=1 but " + message)
        pytest.skip(message)
    profile = tempfile.mkdtemp(prefix="lk-chromium-")
    driver = chromium_driver(profile)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(driver, path, timeout=30.0):
    driver.get_log("browser"), driver.get_log("performance")  # drop earlier entries
    started = time.perf_counter()
    driver.get(Path(path).resolve().as_uri())
    while not driver.execute_script("return !!(window.LK && LK.ready)"):
        if time.perf_counter() - started > timeout:
            raise AssertionError(f"the page did not become ready in {timeout} s: {driver.get_log('browser')}")
        time.sleep(0.02)
    return time.perf_counter() - started


def mouse(driver, kind, x, y):
    if kind == "click":
        for event in ("mousePressed", "mouseReleased"):
            driver.execute_cdp_cmd("Input.dispatchMouseEvent",
                                   {"type": event, "x": x, "y": y, "button": "left", "clickCount": 1})
    else:
        driver.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})


DEEP_QUERY = """
const sel = arguments[0], out = [];
function walk(root){ for (const el of root.querySelectorAll('*')){
  if (el.matches(sel)) out.push(el); if (el.shadowRoot) walk(el.shadowRoot); } }
walk(document); return out;
"""


def wait_for(driver, script, *args, timeout=5.0):
    started = time.perf_counter()
    while True:
        value = driver.execute_script(script, *args)
        if value or time.perf_counter() - started > timeout:
            return value
        time.sleep(0.02)


def network_requests(driver):
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def keep(driver, tmp_path, name):
    shot = tmp_path / name
    driver.save_screenshot(str(shot))
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTEFACTS / name)
    return shot


def test_in_chromium_render_hover_click_colour(browser, page, kernel, tmp_path):
    open_page(browser, page)
    # rendered: Bokeh's canvas (inside its shadow DOM) has a size, and no console errors
    canvases = browser.execute_script(DEEP_QUERY, "canvas")
    assert canvases and max(c.size["width"] for c in canvases) > 500
    painted = browser.execute_script("""
        const v = Bokeh.index.find_one(LK.plot), c = v.canvas_view.primary.canvas;
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let ink = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i+3] > 0 && (d[i] < 240 || d[i+1] < 240 || d[i+2] < 240)) ink++;
        return ink;""")
    assert painted > 200, "the map's canvas holds hardly any drawn pixels"

    # hover sample 7: Bokeh's tooltip shows its thumbnail, label and WordNet path
    x, y = browser.execute_script("return LK.screenPoint(7)")
    mouse(browser, "move", x, y)
    thumbs = wait_for(browser, DEEP_QUERY, "img.lk-tip-thumb")
    assert thumbs, "no hover thumbnail in the DOM"
    assert browser.execute_script("return LK.hover") == 7
    points = read_explorer(page)["points"]
    assert thumbs[0].get_attribute("src") == points["thumb"][7]
    tip = browser.execute_script("return arguments[0].closest('.lk-tip').textContent", thumbs[0])
    assert "#7" in tip and CLASSES[7 % 4] in tip and "entity › vehicle › bus" in tip

    # click it: the strip holds its k neighbours with their R, and lines are drawn to them
    mouse(browser, "click", x, y)
    assert wait_for(browser, "return LK.selected === 7")
    cards = browser.find_elements("css selector", "#lk-strip .lk-card")
    want_i, want_v = top_correlated(kernel, 7, 6)
    assert [int(c.get_attribute("data-index")) for c in cards] == want_i.tolist()
    assert [c.find_element("css selector", ".lk-r").text for c in cards] == [f"R = {v:.3f}" for v in want_v]
    np.testing.assert_allclose([float(c.get_attribute("data-r")) for c in cards], want_v, atol=1e-4)
    assert all(c.find_element("css selector", "img").get_attribute("src").startswith("data:image/") for c in cards)
    assert browser.execute_script("return LK.doc.get_model_by_name('lk-lines').data.x1.length") == 6
    keep(browser, tmp_path, "explorer_click.png")

    # least correlated, then other labels only
    browser.find_element("id", "lk-least").click()
    cards = browser.find_elements("css selector", "#lk-strip .lk-card")
    assert [int(c.get_attribute("data-index")) for c in cards] == top_correlated(kernel, 7, 6, lowest=True)[0].tolist()
    browser.find_element("id", "lk-most").click()
    browser.find_element("id", "lk-hide-same").click()
    cards = browser.find_elements("css selector", "#lk-strip .lk-card")
    want_i, want_v = top_correlated(kernel, 7, 6, exclude_same_label=True)
    assert [int(c.get_attribute("data-index")) for c in cards] == want_i.tolist()
    assert all(i % 4 != 7 % 4 for i in want_i)

    # colour by hierarchy position, then by a score: the source's colours and the legend change
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "lk-color")).select_by_value("hierarchy")
    assert browser.execute_script("return LK.source.data.color.slice(0, 8)") == points["c_hierarchy"][:8]
    Select(browser.find_element("id", "lk-color")).select_by_visible_text("memorization")
    assert browser.execute_script("return LK.source.data.color") == points["c_score0"]
    assert browser.find_elements("css selector", "#lk-legend .lk-bar")
    keep(browser, tmp_path, "explorer_score.png")

    # search a WordNet node: every vehicle (car, bus) is ringed
    search = browser.find_element("id", "lk-search")
    search.send_keys("vehicle")
    found = browser.execute_script("return LK.found")
    assert found == [i for i in range(N) if i % 4 in (2, 3)]
    assert browser.execute_script("return LK.doc.get_model_by_name('lk-found').data.x.length") == len(found)
    assert "match" in browser.find_element("id", "lk-search-status").text
    keep(browser, tmp_path, "explorer_search.png")

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    requests = [u for u in network_requests(browser) if not u.startswith(("file:", "data:"))]
    assert not requests, f"the page asked for {requests}"
    assert browser.execute_script(
        "return performance.getEntriesByType('resource').filter(e => /^https?:/.test(e.name)).length") == 0


def test_in_chromium_texts_and_webgl(browser, tmp_path):
    kernel = synthetic_kernel(n=50, seed=5)
    path = explore(kernel, embedding=np.random.default_rng(0).normal(size=(50, 2)),
                   texts=[f"({a}, {a * 3 % 50})" for a in range(50)], k=4, path=tmp_path / "t.html")
    open_page(browser, path)
    assert browser.execute_script("return LK.webgl()"), "Bokeh drew without WebGL"
    x, y = browser.execute_script("return LK.screenPoint(3)")
    mouse(browser, "move", x, y)
    texts = wait_for(browser, DEEP_QUERY, ".lk-tip-text")
    assert texts and texts[0].text == "(3, 9)"
    mouse(browser, "click", x, y)
    assert wait_for(browser, "return LK.selected === 3")
    cards = browser.find_elements("css selector", "#lk-strip .lk-card .lk-text")
    assert [c.text for c in cards] == [f"({a}, {a * 3 % 50})" for a in top_correlated(kernel, 3, 4)[0]]
    keep(browser, tmp_path, "explorer_texts.png")
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_demo_writes_an_explorer(tmp_path):
    from conftest import devinterp_major

    if devinterp_major() is None:
        pytest.skip("the demo samples with devinterp, which is not installed")
    from devinterp_losskernel.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path), "--num-probe", "120",
                 "--num-train", "400", "--train-epochs", "200"]) == 0
    assert {"explorer.html", "correlation.png", "kernel.pt"} <= {p.name for p in tmp_path.iterdir()}
    kernel = LossKernel.load(tmp_path / "kernel.pt")
    data = read_explorer(tmp_path / "explorer.html")
    np.testing.assert_array_equal(data["neighbours"]["most"][0], top_correlated(kernel, None, 15)[0])
    assert [c["title"] for c in data["colourings"]][-2:] == ["memorization score K(x,x)", "label flipped"]
    assert data["points"]["thumb"][0].startswith("data:image/png;base64,")


# --------------------------------------------------------------------------------------------
# careless input and faults (issue 18): each class is refused at the entry, with a message
# that names the argument, before the neighbour lists and the UMAP are computed
# --------------------------------------------------------------------------------------------

HOSTILE = '<!--<script>x</script><b id="lk-injected">&amp;</b>\u2028\u2029"\''


def small_page(tmp_path, name="p.html", n=40, **kwargs):
    kernel = kwargs.pop("kernel", None)
    kernel = synthetic_kernel(n=n, seed=7) if kernel is None else kernel
    kwargs.setdefault("embedding", np.random.default_rng(0).normal(size=(n, 2)))
    kwargs.setdefault("k", 3)
    return explore(kernel, path=tmp_path / name, **kwargs)


def hostile_tree():
    parents = {HOSTILE + "animal": "entity", "dog": HOSTILE + "animal", "cat": HOSTILE + "animal",
               "vehicle": "entity", "car": "vehicle", "bus": "vehicle"}
    return Hierarchy.from_parents(parents, classes=CLASSES)


def hostile_page(tmp_path, name="hostile.html"):
    n = 40
    return small_page(tmp_path, name, n=n, title=HOSTILE, hierarchy=hostile_tree(),
                      label_names=[HOSTILE + "dog", "cat", "car", "bus"],
                      texts=[HOSTILE + str(i) for i in range(n)],
                      scores={HOSTILE + "score": np.arange(n) % 3}, color_by="label")


def test_script_json_escapes_what_could_end_a_script():
    from devinterp_losskernel.explore import script_json

    value = {"s": "</script><!--<script>&amp;\u2028\u2029é", "n": [1, 2.5, None]}
    text = script_json(value)
    assert not set("<>&\u2028\u2029") & set(text) and text.isascii()
    assert "\\u003c!--\\u003cscript\\u003e" in text
    assert json.loads(text) == value
    with pytest.raises(ValueError):  # JSON.parse would refuse NaN: never write it
        script_json({"x": float("nan")})


def test_hostile_strings_reach_the_page_as_data(tmp_path):
    page = hostile_page(tmp_path)
    text = Path(page).read_text(encoding="utf-8")
    assert "<!--<script>" not in text and "\u2028" not in text and 'id="lk-injected"' not in text
    data = read_explorer(page)
    assert data["title"] == HOSTILE and data["points"]["label_name"][0] == HOSTILE + "dog"
    assert data["points"]["text"][5] == HOSTILE + "5" and HOSTILE + "score" in data["scores"]
    assert data["points"]["path"][0] == f"entity › {HOSTILE}animal › dog"
    assert HOSTILE + "animal" in data["search_terms"]
    # outside Bokeh's bundle, exactly our three <script> elements: our data, Bokeh's document, our JS
    ours = text.replace(_bokeh_bundle(), "")
    assert len(re.findall(r"<script\b", ours, re.I)) == 3 and len(re.findall(r"</script", ours, re.I)) == 3


@pytest.mark.parametrize("labels, label_names, match", [
    (np.where(np.arange(N) % 5 == 0, -1, np.arange(N) % 2), ["cat", "dog"], r"labels hold \[-1\]"),
    (np.arange(N) % 3, ["cat", "dog"], r"labels hold \[2\].*label_names"),
    (np.arange(N) % 3, {0: "cat", 1: "dog"}, r"labels hold \[2\].*label_names"),
    (np.arange(N) % 2, "cd", "label_names must be a list"),
    (np.arange(N) % 2, {"cat", "dog"}, "label_names must be a list"),
])
def test_label_names_only_for_the_labels_they_name(tmp_path, labels, label_names, match):
    with pytest.raises((ValueError, TypeError), match=match):
        small_page(tmp_path, n=N, labels=labels, label_names=label_names)


def test_label_names_and_hierarchy_need_labels(tmp_path):
    plain = synthetic_kernel(n=30, seed=1).covariance.numpy()
    with pytest.raises(ValueError, match="label_names was given but there are no labels"):
        small_page(tmp_path, n=30, kernel=plain, label_names=["a", "b"])
    with pytest.raises(ValueError, match="hierarchy was given but there are no labels"):
        small_page(tmp_path, n=30, kernel=plain, hierarchy=tiny_hierarchy())
    three = Hierarchy.from_parents({"a": "r", "b": "r", "c": "r"}, classes=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"hierarchy has no node for 1 label\(s\): \[3\]"):
        small_page(tmp_path, hierarchy=three)
    data = read_explorer(small_page(tmp_path, label_names={0: "zero", 1: "one", 2: "two", 3: "three"}))
    assert data["points"]["label_name"][:5] == ["zero", "one", "two", "three", "zero"]


def _lists(kernel, k=3):
    return top_correlated(kernel, None, k)


@pytest.mark.parametrize("change, match", [
    (lambda i, v: ((i.__setitem__((0, 0), -1), i)[1], v), r"in \[0, 40\).*got -1 at position \(0, 0\)"),
    (lambda i, v: ((i.__setitem__((3, 2), 40), i)[1], v), r"in \[0, 40\).*got 40 at position \(3, 2\)"),
    (lambda i, v: (i.astype(np.float64), v), "integer dtype"),
    (lambda i, v: (i, v * 5), r"R must be correlations in \[-1, 1\]"),
    (lambda i, v: (i, np.full_like(v, np.nan)), "R must be finite"),
    (lambda i, v: ((i.__setitem__((6, 0), 6), i)[1], v), "sample 6 as its own neighbour"),
    (lambda i, v: (i[:, :2], v), r"two \[n, k\] arrays"),
])
def test_neighbour_indices_are_checked_before_packing(tmp_path, change, match):
    kernel = synthetic_kernel(n=40, seed=7)
    idx, val = _lists(kernel)
    with pytest.raises(ValueError, match=match):
        small_page(tmp_path, kernel=kernel, neighbours={"most": change(idx.copy(), val.copy())})


def test_given_neighbour_lists_must_keep_their_promises(tmp_path):
    kernel = synthetic_kernel(n=40, seed=7)
    lists = _lists(kernel)
    with pytest.raises(ValueError, match="must hold different-label neighbours only"):
        small_page(tmp_path, kernel=kernel, neighbours={"most": lists, "most_other": lists})
    with pytest.raises(ValueError, match="must include 'most'"):
        small_page(tmp_path, kernel=kernel, neighbours={"least": lists})
    with pytest.raises(TypeError, match=r"neighbours\['most'\] must be a pair"):
        small_page(tmp_path, kernel=kernel, neighbours={"most": lists[0]})
    other = top_correlated(kernel, None, 3, exclude_same_label=True)
    data = read_explorer(small_page(tmp_path, kernel=kernel, neighbours={"most": lists, "most_other": other}))
    np.testing.assert_array_equal(data["neighbours"]["most_other"][0], other[0])


def _thumb(uri):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def test_image_layout_is_stated_when_the_shape_leaves_it_open(tmp_path):
    red = np.zeros((40, 3, 4, 4), dtype=np.uint8)
    red[:, 0] = 255
    for shape in [(40, 3, 4, 4), (40, 4, 4, 3), (40, 1, 8, 3)]:
        with pytest.raises(ValueError, match="ambiguous.*'NCHW'.*'NHWC'"):
            small_page(tmp_path, images=np.zeros(shape, dtype=np.uint8))
    page = small_page(tmp_path, images=red, image_layout="NCHW", thumbnail_size=4, thumbnail_format="png")
    thumb = _thumb(read_explorer(page)["points"]["thumb"][0])
    assert thumb.shape == (4, 4, 3) and np.all(thumb == [255, 0, 0])  # 4×4 red, not 3×4 RGBA
    page = small_page(tmp_path, images=red, image_layout="NHWC", thumbnail_size=4, thumbnail_format="png")
    assert _thumb(read_explorer(page)["points"]["thumb"][0]).shape == (3, 4, 4)  # 3 rows × 4 columns, RGBA
    with pytest.raises(ValueError, match="image_layout must be"):
        small_page(tmp_path, images=red, image_layout="CHW")
    with pytest.raises(ValueError, match="image_layout='NCHW' was given without images"):
        small_page(tmp_path, image_layout="NCHW")


def test_non_finite_pixels_are_refused(tmp_path):
    images = np.random.default_rng(0).random((40, 8, 8))
    images[7, 1, 2] = np.inf
    with pytest.raises(ValueError, match="images must have finite pixels, got NaN/Inf in image 7"):
        small_page(tmp_path, images=images)
    images[7, 1, 2] = np.nan
    with pytest.raises(ValueError, match="finite pixels"):
        small_page(tmp_path, images=torch.tensor(images))


def test_as_images_one_layout_rule():
    from devinterp_losskernel.validation import as_images

    assert as_images(np.zeros((2, 3, 16, 16)), 2).shape == (2, 16, 16, 3)
    assert as_images(np.zeros((2, 16, 16, 4)), 2).shape == (2, 16, 16, 4)
    assert as_images(np.zeros((2, 16, 16)), 2).shape == (2, 16, 16, 1)
    assert as_images(torch.zeros(2, 1, 8, 8, dtype=torch.bfloat16), 2).dtype == np.float32
    assert as_images(np.zeros((2, 3, 4, 4)), 2, layout="NCHW").shape == (2, 4, 4, 3)
    with pytest.raises(ValueError, match=r"pixels of shape \(2, 3, 4, 4\) is ambiguous"):
        as_images(np.zeros((2, 3, 4, 4)), 2, "pixels")
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        as_images(np.zeros((2, 16, 16, 16)), 2)
    with pytest.raises(ValueError, match=r"one image per probe sample \(n=3\)"):
        as_images(np.zeros((2, 16, 16)), 3)
    with pytest.raises(ValueError, match="must hold numbers"):
        as_images(np.full((2, 4, 4), "a"), 2)
    with pytest.raises(TypeError, match="load the file first"):
        as_images("images.npy", 2)


def test_as_index_array_dtype_sign_and_range():
    from devinterp_losskernel.validation import as_index_array

    np.testing.assert_array_equal(as_index_array(torch.tensor([[0, 4], [2, 1]]), 5, "idx"), [[0, 4], [2, 1]])
    assert as_index_array([], 5, "idx").dtype == np.int64
    for values, match in [([0, -1], r"idx must hold sample indices in \[0, 5\).*got -1 at position 1"),
                          ([5], "got 5 at position 0"), (np.array([1.0]), "integer dtype"),
                          (np.array([True]), "integer dtype"), (np.uint16([65535]), "got 65535")]:
        with pytest.raises(ValueError, match=match):
            as_index_array(values, 5, "idx")


def test_one_label_names_the_labels(tmp_path):
    base = synthetic_kernel(n=40, seed=7)
    one = LossKernel(covariance=base.covariance, mean=base.mean, variance=base.variance, num_draws=300,
                     labels=torch.zeros(40, dtype=torch.long))
    with pytest.raises(ValueError, match="labels: all 40 samples have the same label") as error:
        small_page(tmp_path, kernel=one, embedding=None)
    assert "n_neighbors" not in str(error.value)
    with pytest.warns(UserWarning, match="every sample has the same label"):
        page = small_page(tmp_path, kernel=one)
    data = read_explorer(page)
    assert set(data["neighbours"]) == {"most", "least"}
    assert set(data["unavailable"]) == {"most_other", "least_other"}


def test_few_different_label_candidates_shrink_umaps_neighbourhood(tmp_path):
    base = synthetic_kernel(n=40, seed=7)
    mostly_one = LossKernel(covariance=base.covariance, mean=base.mean, variance=base.variance, num_draws=300,
                            labels=torch.tensor([0] * 35 + [1] * 5))
    page = small_page(tmp_path, kernel=mostly_one, embedding=None)  # 5 candidates: n_neighbors 6, not 15
    assert read_explorer(page)["points"]["x"].shape == (40,)


def test_checks_come_before_the_expensive_work(tmp_path, monkeypatch):
    import devinterp_losskernel.analysis.embedding as embedding
    import devinterp_losskernel.analysis.neighbours as neighbours

    def expensive(*args, **kwargs):
        raise AssertionError("the expensive work ran before the arguments were checked")

    monkeypatch.setattr(embedding, "umap_embedding", expensive)
    monkeypatch.setattr(neighbours, "top_correlated", expensive)
    kernel = synthetic_kernel(n=40, seed=7)
    bad = [dict(label_names=["a"]), dict(scores={"s": ["x"] * 40}), dict(color_by="nope"),
           dict(texts="one string"), dict(images=np.zeros((40, 3, 4, 4))), dict(thumbnail_format="gif"),
           dict(hierarchy=Hierarchy.from_parents({"a": "r"}, classes=["a"])), dict(random_state=-1),
           dict(title=3), dict(path=tmp_path / "missing" / "k.html")]
    for kwargs in bad:
        with pytest.raises((ValueError, TypeError)):
            explore(kernel, **{"path": tmp_path / "k.html", **kwargs})


def test_kernel_and_scores_arguments_are_named(tmp_path):
    kernel = synthetic_kernel(n=40, seed=7)
    kernel.save(tmp_path / "kernel.pt")
    with pytest.raises(TypeError, match=r"got the path .*LossKernel.load\(path\)"):
        explore(str(tmp_path / "kernel.pt"), path=tmp_path / "k.html")
    with pytest.raises(ValueError, match=r"unknown \['varience'\]"):
        explore({"varience": kernel.variance}, path=tmp_path / "k.html")
    with pytest.raises(ValueError, match="needs neighbours="):
        explore({"variance": kernel.variance}, path=tmp_path / "k.html")
    with pytest.raises(TypeError, match="scores must be a dict"):
        small_page(tmp_path, scores=[1, 2])
    with pytest.raises(ValueError, match=r"scores\['s'\] must hold numbers"):
        small_page(tmp_path, scores={"s": ["x"] * 40})
    with pytest.raises(ValueError, match="scores has two entries named '1'"):
        small_page(tmp_path, scores={1: np.zeros(40), "1": np.ones(40)})
    with pytest.raises(TypeError, match="texts must be one string .* per probe sample"):
        small_page(tmp_path, texts="abc")
    with pytest.raises(ValueError, match="embedding must be finite"):
        small_page(tmp_path, embedding=np.full((40, 2), np.nan))
    with pytest.warns(UserWarning, match="embedding has 3 columns"):
        small_page(tmp_path, embedding=np.zeros((40, 3)))


def test_missing_score_values_are_warned_and_counted(tmp_path):
    score = np.arange(40, dtype=float)
    score[[3, 9]] = np.nan
    flag = (np.arange(40) % 2).astype(float)
    flag[5] = np.inf
    with pytest.warns(UserWarning) as record:
        page = small_page(tmp_path, scores={"s": score, "flag": flag})
    said = [str(w.message) for w in record]
    assert any("scores['s']: 2 of 40 values are NaN/Inf" in m for m in said)
    assert any("scores['flag']: 1 of 40 values are NaN/Inf" in m for m in said)
    legends = {c["title"]: c["legend"] for c in read_explorer(page)["colourings"]}
    assert legends["s"]["missing"] == 2
    assert legends["flag"]["items"][-1] == ["no value (NaN/Inf): 1", "#bbbbbb"]


# -- the output file -------------------------------------------------------------------------

def test_output_path_refusals(tmp_path):
    kernel = synthetic_kernel(n=40, seed=7)
    kernel.save(tmp_path / "kernel.pt")
    before = (tmp_path / "kernel.pt").read_bytes()
    with pytest.raises(ValueError, match="exists and is not an HTML page"):
        small_page(tmp_path, "kernel.pt")
    assert (tmp_path / "kernel.pt").read_bytes() == before
    (tmp_path / "folder.html").mkdir()
    with pytest.raises(ValueError, match="must be a file path.*existing folder"):
        small_page(tmp_path, "folder.html")
    with pytest.raises(ValueError, match="must be inside an existing folder.*does not exist"):
        small_page(tmp_path, "missing/k.html")
    assert not (tmp_path / "missing").exists()
    with pytest.raises(ValueError, match="is a regular file"):
        small_page(tmp_path, "kernel.pt/k.html")
    with pytest.raises(TypeError, match="path must be a path"):
        explore(kernel, embedding=np.zeros((40, 2)), path=42)
    first = small_page(tmp_path, "k.html", title="first")
    second = small_page(tmp_path, "k.html", title="second")  # an explorer page may be replaced
    assert first == second and read_explorer(second)["title"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.html", "k.html", "kernel.pt"]


def test_a_failed_write_keeps_the_old_page_and_no_temp_file(tmp_path, monkeypatch):
    page = small_page(tmp_path, "k.html", title="old")
    before = Path(page).read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        small_page(tmp_path, "k.html", title="new")
    assert Path(page).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["k.html"]


def test_random_state_none_uses_no_global_rng(tmp_path):
    import subprocess
    import sys

    code = f"""
import random, numpy as np, torch, warnings
warnings.simplefilter("ignore")
from devinterp_losskernel.explore import explore, read_explorer
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_explore import synthetic_kernel
kernel = synthetic_kernel(n=30, seed=1)
states = lambda: (np.random.get_state()[1].tolist(), random.getstate(), torch.get_rng_state().tolist())
before = states()
page = explore(kernel, k=3, path={str(tmp_path / "r.html")!r}, random_state=None)
assert states() == before, "a global RNG was drawn from"
assert isinstance(read_explorer(page)["random_state"], int)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


# -- the browser: hostile strings are text, and the page still starts ------------------------

def test_in_chromium_hostile_strings_show_as_text(browser, tmp_path):
    page = hostile_page(tmp_path)
    open_page(browser, page)  # the page starts (a '<!--<script>' in the data used to stop it)
    assert browser.execute_script("return document.getElementById('lk-title').textContent") == HOSTILE
    assert browser.execute_script("return LK.data.title") == HOSTILE
    assert browser.execute_script("return document.title").startswith('<!--<script>x</script><b id="lk-injected">')
    legend = browser.execute_script("return document.getElementById('lk-legend').textContent")
    assert HOSTILE + "dog" in legend
    x, y = browser.execute_script("return LK.screenPoint(4)")
    mouse(browser, "move", x, y)
    tips = wait_for(browser, DEEP_QUERY, ".lk-tip")
    assert tips, "no tooltip"
    tip_text = browser.execute_script("return arguments[0].textContent", tips[0])
    assert HOSTILE + "dog" in tip_text and HOSTILE + "4" in tip_text and HOSTILE + "animal" in tip_text
    mouse(browser, "click", x, y)
    assert wait_for(browser, "return LK.selected === 4")
    selected = browser.execute_script("return document.getElementById('lk-selected').textContent")
    assert HOSTILE + "dog" in selected and HOSTILE + "animal" in selected
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "lk-color")).select_by_value("score0")
    assert browser.execute_script("return LK.colour") == "score0"
    options = browser.execute_script(
        "return [...document.querySelectorAll('#lk-color option')].map(o => o.textContent)")
    assert HOSTILE + "score" in options
    assert browser.execute_script("return LK.search(arguments[0]).length", HOSTILE + "animal") == 20
    assert not browser.execute_script(DEEP_QUERY, "#lk-injected"), "a user string became markup"
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]

    # one label: no different-label lists, so the checkbox is off (no silent fallback)
    base = synthetic_kernel(n=40, seed=7)
    one = LossKernel(covariance=base.covariance, mean=base.mean, variance=base.variance, num_draws=300,
                     labels=torch.zeros(40, dtype=torch.long))
    with pytest.warns(UserWarning):
        page = small_page(tmp_path, "one.html", kernel=one)
    open_page(browser, page)
    assert browser.execute_script("return document.getElementById('lk-hide-same').disabled")


# -- the page's face: how the map was made, what the run found, the health report ---------------

def _with_report(kernel, report):
    import copy

    kernel = copy.copy(kernel)
    kernel.metadata = {**kernel.metadata, "diagnostics": report}
    return kernel


BAD_REPORT = {"ok": False, "judgeable": True, "numbers": {"ess_per_chain_min": 4.0},
              "problems": ["poor mixing: 4 effective draws in the worst chain. Take more draws (num_draws) <b>"],
              "notes": ["R̂: split-half reliability 0.95"]}


@pytest.mark.parametrize("kwargs, initial", [
    (dict(), "variance"),  # default map, labels: colours by label would mix by design, so K(x,x)
    (dict(scores={"memorization": np.arange(40.0)}), "score0"),  # what the caller measured
    (dict(embedding=np.zeros((40, 2)) + np.arange(40)[:, None]), "label"),  # their own map: labels
    (dict(color_by="init_loss"), "init_loss"),  # asked for
])
def test_the_page_opens_on_what_the_run_found(tmp_path, kwargs, initial):
    pytest.importorskip("umap")
    kernel = synthetic_kernel(n=40, seed=3)
    kwargs = {"embedding": None, **kwargs}
    data = read_explorer(explore(kernel, k=3, path=tmp_path / "p.html", **kwargs))
    assert data["initial"] == initial
    assert data["points"]["color"] == data["points"][f"c_{initial}"]


def test_the_page_says_how_the_map_was_made(tmp_path):
    pytest.importorskip("umap")
    kernel = synthetic_kernel(n=40, seed=3)
    umap_page = read_explorer(explore(kernel, k=3, path=tmp_path / "u.html"))
    assert "same-label inputs removed" in umap_page["about"] and "mix by design" in umap_page["about"]
    given = read_explorer(small_page(tmp_path, "g.html"))
    assert given["about"].startswith("Map: the coordinates given")
    text = Path(explore(kernel, k=3, path=tmp_path / "u2.html")).read_text(encoding="utf-8")
    assert 'id="lk-about"' in text and "mix by design" in text


def test_the_health_report_is_on_the_page_when_the_kernel_has_one(tmp_path):
    from devinterp_losskernel.diagnostics import HealthReport

    plain = read_explorer(small_page(tmp_path, "plain.html"))
    assert plain["health"] is None
    page = small_page(tmp_path, "bad.html", kernel=_with_report(synthetic_kernel(n=40, seed=7), BAD_REPORT))
    data = read_explorer(page)
    assert data["health"]["ok"] is False and data["health"]["problems"] == BAD_REPORT["problems"]
    text = Path(page).read_text(encoding="utf-8")
    assert 'id="lk-health" class="lk-bad"' in text and "1 problem" in text
    assert "&lt;b&gt;" in text and "(num_draws) <b>" not in text  # report text is escaped
    good = HealthReport(ok=True, notes=["R̂ reproducible"], numbers={"x": 1.0})  # a HealthReport object too
    text = Path(small_page(tmp_path, "good.html", kernel=_with_report(synthetic_kernel(n=40, seed=7), good))
                ).read_text(encoding="utf-8")
    assert 'class="lk-ok"><b>Health report: OK</b>' in text


def test_in_chromium_the_health_report_and_the_map_note_show(browser, tmp_path):
    page = small_page(tmp_path, "health.html", kernel=_with_report(synthetic_kernel(n=40, seed=7), BAD_REPORT),
                      scores={"memorization": np.arange(40.0)})
    open_page(browser, page)
    health = browser.find_element("id", "lk-health")
    assert health.is_displayed() and "Health report: 1 problem" in health.text and "num_draws) <b>" in health.text
    assert browser.find_element("id", "lk-about").text.startswith("Map: the coordinates given")
    assert browser.execute_script("return document.getElementById('lk-color').value") == "score0"
    keep(browser, tmp_path, "explorer_health.png")


# -- a token-level kernel (issue 20, item 5): the token in its context --------------------------

# token strings with markup, quotes, a newline and an empty string: they must reach the page as text
VOCAB = ["The", " cat", " sat", " on", " the", " mat", ".", " dog", " ran", " home", " and", " slept",
         "<b id=\"lk-injected\">x</b>", "</script>", "&amp;", "\n", "", "'\"", "<!--"]
SEQUENCES, WIDTH = 6, 8  # input_ids [6, 9]: target positions 1 … 8


def token_kernel(seed=0, sequences=SEQUENCES, width=WIDTH, rows=None):
    """A token-level LossKernel as bif(..., correlation_method='token', return_kernel=True) makes
    one: rows (batch index, target position 1 … T), input_ids [sequences, T + 1]."""
    ids = np.random.default_rng(seed).integers(0, len(VOCAB), size=(sequences, width + 1))
    positions = np.stack([np.repeat(np.arange(sequences), width), np.tile(np.arange(1, width + 1), sequences)], 1)
    if rows is not None:
        positions = positions[rows]
    n = len(positions)
    base = synthetic_kernel(n=n, seed=seed)
    return LossKernel(covariance=base.covariance, mean=base.mean, variance=base.variance, num_draws=300,
                      labels=torch.tensor(positions[:, 1] % 3), token_positions=torch.tensor(positions),
                      input_ids=torch.tensor(ids))


def shown(s):
    """How the page shows a token string (an empty one as ∅, newline ↵, tab ⇥)."""
    return "\u2205" if s == "" else s.replace("\n", "\u21b5").replace("\t", "\u21e5")


def token_page(tmp_path, name="tokens.html", kernel=None, **kwargs):
    kernel = token_kernel() if kernel is None else kernel
    n = kernel.num_samples if isinstance(kernel, LossKernel) else len(kernel["variance"])
    kwargs.setdefault("embedding", np.random.default_rng(1).normal(size=(n, 2)))
    kwargs.setdefault("k", 4)
    return explore(kernel, path=tmp_path / name, **kwargs)


def test_token_rows_are_stored_once_and_decoded(tmp_path):
    kernel = token_kernel()
    ids = kernel.input_ids.numpy()
    page = token_page(tmp_path, vocabulary=VOCAB)
    data = read_explorer(page)
    tokens = data["tokens"]
    assert data["has_tokens"] and tokens["sequences"].shape == (SEQUENCES, WIDTH + 1)  # each sequence once
    # a row's token: its sequence's string at its position; the strings are the distinct ids' only
    strings, distinct = tokens["strings"], tokens["ids"]
    assert distinct == sorted(set(ids.ravel().tolist())) and strings == [VOCAB[i] for i in distinct]
    rows = kernel.token_positions.numpy()
    seq, pos = tokens["positions"][:, 0], tokens["positions"][:, 1]
    np.testing.assert_array_equal(tokens["batch"][seq], rows[:, 0])
    np.testing.assert_array_equal(pos, rows[:, 1])
    decoded = [strings[c] for c in tokens["sequences"][seq, pos]]
    assert decoded == [VOCAB[ids[b, p]] for b, p in rows]
    # a subset's rows come from two sequences: only those two are stored
    sub = token_kernel(rows=np.r_[8:16, 32:40])
    sub_data = read_explorer(token_page(tmp_path, "sub.html", kernel=sub))
    assert sub_data["tokens"]["sequences"].shape == (2, WIDTH + 1)
    assert sub_data["tokens"]["batch"].tolist() == [1, 4]
    # no decoding given: the ids themselves; a mapping and a callable work the same way
    assert read_explorer(token_page(tmp_path, "ids.html"))["tokens"]["strings"] == [str(i) for i in distinct]
    mapped = read_explorer(token_page(tmp_path, "map.html", vocabulary=dict(enumerate(VOCAB))))
    assert mapped["tokens"]["strings"] == strings
    called = read_explorer(token_page(tmp_path, "call.html", decode=lambda i: VOCAB[i]))
    assert called["tokens"]["strings"] == strings
    # a kernel too large for n × n: a dict of per-sample arrays with its token rows
    as_dict = {"variance": kernel.variance, "token_positions": kernel.token_positions, "input_ids": kernel.input_ids}
    lists = {"most": top_correlated(kernel, None, 4)}
    from_dict = read_explorer(token_page(tmp_path, "dict.html", kernel=as_dict, neighbours=lists, vocabulary=VOCAB))
    np.testing.assert_array_equal(from_dict["tokens"]["sequences"], tokens["sequences"])
    with pytest.raises(ValueError, match="input_ids'\\] was given without"):
        token_page(tmp_path, "x.html", kernel={"variance": kernel.variance, "input_ids": kernel.input_ids},
                   neighbours=lists)


def test_token_strings_are_data_never_markup(tmp_path):
    text = Path(token_page(tmp_path, vocabulary=VOCAB)).read_text(encoding="utf-8")
    ours = text.replace(_bokeh_bundle(), "")
    assert 'id="lk-injected"' not in ours and "<!--" not in ours
    assert ours.count("</script>") == 3  # our data, Bokeh's document, our script: no token closes one
    # the page is small: the token strings are there once each, not once per row
    data = json.loads(re.search(r'id="lk-data">(.*?)</script>', text, re.S).group(1))
    assert json.dumps(data["tokens"]).count("slept") == 1


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(decode=str, vocabulary=VOCAB), ValueError, "not both"),
    (dict(vocabulary=VOCAB[:3]), ValueError, "vocabulary has no entry for token ids"),
    (dict(vocabulary={0: "a"}), ValueError, "vocabulary has no entry for token ids"),
    (dict(vocabulary="abc"), TypeError, "single string"),
    (dict(vocabulary=[1] * len(VOCAB)), TypeError, "vocabulary entries must be str"),
    (dict(decode=VOCAB), TypeError, "decode must be a callable"),
    (dict(decode=lambda i: i), TypeError, r"decode\(\d+\) must return a str"),
])
def test_decode_and_vocabulary_are_checked_at_the_entry(tmp_path, monkeypatch, kwargs, error, match):
    import devinterp_losskernel.explore as module

    monkeypatch.setattr(module, "_neighbour_lists", lambda *a, **k: pytest.fail("checks came after the work"))
    with pytest.raises(error, match=match):
        token_page(tmp_path, **kwargs)
    assert not (tmp_path / "tokens.html").exists()


def test_decode_needs_a_token_level_kernel(tmp_path):
    with pytest.raises(ValueError, match="vocabulary= maps token ids .* has no token_positions"):
        small_page(tmp_path, vocabulary=VOCAB)
    bare = token_kernel()
    bare.input_ids = None
    with pytest.raises(ValueError, match="decode= was given but the kernel carries no input_ids"):
        token_page(tmp_path, kernel=bare, decode=str)
    data = read_explorer(token_page(tmp_path, "bare.html", kernel=bare))  # (sequence, position) only
    assert data["tokens"]["sequences"] is None and data["tokens"]["positions"].shape == (SEQUENCES * WIDTH, 2)
    wrong = token_kernel()
    wrong.token_positions = wrong.token_positions + torch.tensor([SEQUENCES, 0])
    with pytest.raises(ValueError, match="token_positions must index kernel.input_ids"):
        token_page(tmp_path, kernel=wrong)


def test_in_chromium_hover_shows_the_token_in_its_context(browser, tmp_path):
    kernel = token_kernel()
    ids, rows = kernel.input_ids.numpy(), kernel.token_positions.numpy()
    page = token_page(tmp_path, vocabulary=VOCAB, k=5, embedding=None, random_state=0)
    open_page(browser, page)
    i = 13  # sequence 1, target position 6
    b, p = rows[i]
    x, y = browser.execute_script("return LK.screenPoint(arguments[0])", i)
    mouse(browser, "move", x, y)
    targets = wait_for(browser, DEEP_QUERY, ".lk-tip-ctx .lk-tok-target")
    assert targets, "no token context in the tooltip"
    ctx = browser.execute_script("return arguments[0].closest('.lk-ctx')", targets[0])
    assert int(ctx.get_attribute("data-index")) == browser.execute_script("return LK.hover") == i
    tokens = browser.execute_script(
        "return [...arguments[0].querySelectorAll('.lk-tok')].map(t => [t.textContent, t.className])", ctx)
    assert [t for t, _ in tokens] == [shown(VOCAB[v]) for v in ids[b]]  # the whole (short) sequence, in order
    marked = [j for j, (_, cls) in enumerate(tokens) if "lk-tok-target" in cls]
    faded = [j for j, (_, cls) in enumerate(tokens) if "lk-tok-after" in cls]
    assert marked == [p] and faded == list(range(p + 1, WIDTH + 1))
    assert f"sequence {b}, position {p}" in ctx.text

    # click: the neighbours are listed the same way, each with its own token marked
    mouse(browser, "click", x, y)
    assert wait_for(browser, "return LK.selected === arguments[0]", i)
    want = top_correlated(kernel, i, 5)[0].tolist()
    cards = browser.find_elements("css selector", "#lk-strip .lk-card")
    assert [int(c.get_attribute("data-index")) for c in cards] == want
    for card, j in zip(cards, want):
        target = card.find_element("css selector", ".lk-ctx .lk-tok-target")
        assert target.get_attribute("textContent") == shown(VOCAB[ids[rows[j][0], rows[j][1]]])
    selected = browser.find_element("css selector", "#lk-selected .lk-tok-target")
    assert selected.get_attribute("textContent") == shown(VOCAB[ids[b, p]])
    assert not browser.execute_script(DEEP_QUERY, "#lk-injected"), "a token string became markup"
    # search a token: every row whose target it is (any case, spaces around it ignored) is ringed
    targets = [VOCAB[ids[bb, pp]].strip().lower() for bb, pp in rows]
    assert browser.execute_script("return LK.search('sat')") == [j for j, t in enumerate(targets) if t == "sat"]
    hostile = VOCAB[12]
    assert browser.execute_script("return LK.search(arguments[0])", hostile) == [
        j for j, t in enumerate(targets) if t == hostile.lower()]
    browser.execute_script("LK.search('')")
    mouse(browser, "move", x, y)  # the tooltip again, over the listed neighbours, for the screenshot
    assert wait_for(browser, DEEP_QUERY, ".lk-tip-ctx .lk-tok-target")
    keep(browser, tmp_path, "explorer_tokens.png")
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


# -- a minibatch-mode kernel: NaN variances where a sample was seen fewer than twice ------------

def minibatch_kernel(n=40, seed=7):
    """A diagonal minibatch-mode kernel (estimate_loss_kernel(mode='minibatch')): visits per
    sample; variance NaN where fewer than 2, mean NaN where 0."""
    base = synthetic_kernel(n=n, seed=seed)
    visits = torch.tensor(np.random.default_rng(seed).integers(2, 9, size=n))
    visits[[1, 5, 6]] = 1
    visits[[9, 20]] = 0
    variance, mean = base.variance.clone(), base.mean.clone()
    variance[visits < 2] = float("nan")
    mean[visits == 0] = float("nan")
    return LossKernel(covariance=None, mean=mean, variance=variance, num_draws=300, visits=visits,
                      labels=base.labels, metadata={"mode": "minibatch"}), base


def minibatch_page(tmp_path, name="minibatch.html", **kwargs):
    kernel, base = minibatch_kernel()
    lists = {"most": top_correlated(base, None, 3), "least": top_correlated(base, None, 3, lowest=True)}
    return kernel, explore(kernel, neighbours=lists, embedding=np.random.default_rng(0).normal(size=(40, 2)),
                           k=3, path=tmp_path / name, **kwargs)


UNSEEN = [1, 5, 6, 9, 20]


def test_nan_variances_are_missing_not_ranked(tmp_path):
    import warnings

    memorization = np.arange(40.0)
    memorization[UNSEEN] = np.nan  # as memorization_scores gives them: NaN where no variance
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernel explains its NaNs: no NaN/Inf warning
        kernel, page = minibatch_page(tmp_path, scores={"memorization": memorization}, color_by="variance")
    data = read_explorer(page)
    points, legends = data["points"], {c["key"]: c["legend"] for c in data["colourings"]}
    unseen = np.zeros(40, bool)
    unseen[UNSEEN] = True
    assert data["unseen"] == 5 and data["has_visits"]
    np.testing.assert_array_equal(points["visits"], kernel.visits.numpy())
    assert np.isnan(points["variance"][unseen]).all() and np.isfinite(points["variance"][~unseen]).all()
    assert [points["variance_text"][i] for i in UNSEEN] == ["— (seen fewer than twice: no variance)"] * 5
    # grey outside the scale; limits over the finite values only; counted in the legend
    for key in ("variance", "score0"):
        colours = np.array(points[f"c_{key}"])
        assert (colours[unseen] == "#bbbbbb").all() and (colours[~unseen] != "#bbbbbb").all()
    finite = kernel.variance.numpy()[~unseen]
    assert legends["variance"]["min"] == pytest.approx(finite.min())
    assert legends["variance"]["max"] == pytest.approx(finite.max())
    assert legends["variance"]["missing"] == 5
    assert legends["variance"]["missing_label"] == "seen fewer than twice: no variance"
    assert legends["score0"]["missing"] == 5 and legends["score0"]["missing_label"].startswith("seen fewer than")
    assert legends["mean_loss"]["missing"] == 2 and legends["mean_loss"]["missing_label"] == "never seen: no mean"
    # the colour scale is the finite values' own: the lowest finite variance gets the scale's first colour
    lowest = int(np.flatnonzero(~unseen)[np.argmin(finite)])
    assert points["c_variance"][lowest] == legends["variance"]["stops"][0]
    # the same kernel as a dict of per-sample arrays
    lists = {"most": top_correlated(synthetic_kernel(n=40, seed=7), None, 3)}
    as_dict = {"variance": kernel.variance, "mean": kernel.mean, "visits": kernel.visits}
    data = read_explorer(explore(as_dict, neighbours=lists, embedding=np.zeros((40, 2)), path=tmp_path / "d.html"))
    assert data["unseen"] == 5 and np.array_equal(np.array(data["points"]["c_variance"]) == "#bbbbbb", unseen)


def test_nan_variances_only_where_the_visits_say_so(tmp_path):
    kernel, _ = minibatch_kernel()
    lists = {"most": top_correlated(synthetic_kernel(n=40, seed=7), None, 3)}
    variance = kernel.variance.clone()
    variance[3] = float("nan")  # seen 2+ times, yet no variance: refused
    with pytest.raises(ValueError, match="must be finite"):
        explore({"variance": variance, "visits": kernel.visits}, neighbours=lists, embedding=np.zeros((40, 2)),
                path=tmp_path / "x.html")
    with pytest.raises(ValueError, match="must be finite"):  # no visits: no NaN at all
        explore({"variance": kernel.variance}, neighbours=lists, embedding=np.zeros((40, 2)), path=tmp_path / "x.html")
    with pytest.raises(ValueError, match="diagonal"):  # no covariance: the lists and the map must be given
        explore(kernel, path=tmp_path / "x.html")


def test_in_chromium_nan_variances_show_as_unseen(browser, tmp_path):
    kernel, page = minibatch_page(tmp_path, color_by="variance")
    open_page(browser, page)
    colours = browser.execute_script("return LK.source.data.color")
    assert [i for i, c in enumerate(colours) if c == "#bbbbbb"] == UNSEEN
    legend = browser.find_element("id", "lk-legend").text
    assert "seen fewer than twice: no variance: 5 of 40" in legend
    x, y = browser.execute_script("return LK.screenPoint(5)")
    mouse(browser, "move", x, y)
    tips = wait_for(browser, DEEP_QUERY, ".lk-tip-variance")
    assert tips
    tip = browser.execute_script("return arguments[0].closest('.lk-tip').textContent", tips[0])
    assert "seen fewer than twice: no variance" in tip and "visits = 1" in tip
    mouse(browser, "click", x, y)
    assert wait_for(browser, "return LK.selected === 5")
    selected = browser.find_element("id", "lk-selected").text
    assert "seen fewer than twice: no variance" in selected and "visits = 1" in selected
    x, y = browser.execute_script("return LK.screenPoint(2)")
    mouse(browser, "move", x, y)
    assert wait_for(browser, "return LK.hover === 2")
    tip = wait_for(browser, """const t = [];
        (function walk(r){ for (const e of r.querySelectorAll('*')){ if (e.matches('.lk-tip')) t.push(e.textContent);
          if (e.shadowRoot) walk(e.shadowRoot); } })(document); return t.join(' ');""")
    assert f"visits = {int(kernel.visits[2])}" in tip and "no variance" not in tip
    keep(browser, tmp_path, "explorer_unseen.png")
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
