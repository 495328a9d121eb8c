"""A person can look at everything: the MLflow UI, served over a demo-like store and read by
headless Chromium, shows the search's parent run, its trial runs, their metrics and figures.

The UI is a JavaScript application: `--dump-dom` after a virtual-time budget gives the page as
rendered, with the data the browser fetched from the server's REST API.
"""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from helpers import STUDY, study_in_mlflow
from mlflow import MlflowClient
from mlflow_server import MlflowServer
from PIL import Image

from search import tracking
from search.evaluate import evaluate_study
from search.export import export

pytestmark = pytest.mark.slow  # a server and a browser page load per check: 1-3 minutes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--virtual-time-budget=20000"]
METRICS = ["train/loss"] + [f"val/auc/{n}{b}" for n in ("mean", "Normal", "CHF", "pneumonia")
                            for b in ("", "/lo", "/hi")]


@pytest.fixture(scope="module")
def ui(small_cache, tmp_path_factory):
    """`mlflow server` over a store laid out like the demo's (mlflow.db + mlartifacts/)."""
    if CHROMIUM is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    workdir = tmp_path_factory.mktemp("ui")
    uri = tracking.resolve_tracking_uri(None, workdir)
    study_in_mlflow(small_cache, uri, workdir / "scratch")
    client = MlflowClient(uri)
    trials = tracking.find_trial_runs(uri, STUDY)
    parent = trials[0].data.tags[tracking.PARENT_TAG]
    client.set_terminated(parent)  # as at the end of a search
    export(STUDY, workdir=workdir)
    evaluate_study(STUDY, workdir=workdir)
    with MlflowServer(workdir) as server:
        yield server.uri, client, client.get_run(parent), trials


def page_text(url: str) -> tuple[str, str]:
    """(visible text, DOM) of a UI page once its scripts have run."""
    done = subprocess.run([*BROWSER, "--dump-dom", url], capture_output=True, text=True,
                          timeout=300, check=True)
    parser = _Text()
    parser.feed(done.stdout)
    return " ".join(" ".join(parser.parts).split()), done.stdout


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts, self._skip = [], 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style") and self._skip > 0

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def test_the_runs_list_shows_the_search_and_the_evaluation_under_it(ui):
    base, client, parent, _ = ui
    text, _ = page_text(f"{base}/#/experiments/{parent.info.experiment_id}/runs")
    assert STUDY in text  # the search's parent run, its trials and evaluation folded under it
    assert "5 matching runs" in text  # parent, three trials, one evaluation
    [evaluation] = client.search_runs([parent.info.experiment_id],
                                      "tags.`gazetune.kind` = 'evaluation'")
    assert evaluation.data.tags["mlflow.parentRunId"] == parent.info.run_id
    text, _ = page_text(f"{base}/#/experiments/{parent.info.experiment_id}/runs/"
                        f"{evaluation.info.run_id}")
    assert "evaluation of trial" in text
    assert f"Parent run {parent.data.tags['mlflow.runName']}" in text


def test_each_trial_page_shows_its_parent_and_metrics(ui):
    base, _, parent, trials = ui
    for run in trials:
        text, _ = page_text(f"{base}/#/experiments/{run.info.experiment_id}/runs/"
                            f"{run.info.run_id}")
        assert run.data.tags["mlflow.runName"] in text
        assert f"Parent run {parent.data.tags['mlflow.runName']}" in text
        for key in METRICS:
            assert f" {key} " in f" {text} ", key
        # The latest value, printed by JavaScript as Python prints it (shortest round trip).
        assert f"val/auc/mean {run.data.metrics['val/auc/mean']!r}" in text


def test_artifacts_and_a_figure_are_served(ui, tmp_path):
    base, client, _, trials = ui
    run = trials[0]
    page = f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts"
    text, _ = page_text(page)
    for name in ("checkpoint", "figures", "config.json"):
        assert name in text
    (figure,) = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
    _, dom = page_text(f"{page}/{figure}")
    assert f'alt="{figure}" src="blob:' in dom  # the image came from the server and rendered
    shot = tmp_path / "mlflow-ui.png"
    subprocess.run([*BROWSER, "--window-size=1600,1000", f"--screenshot={shot}", (f"{page}/"
                    f"{figure}")], capture_output=True, timeout=300, check=True)
    with Image.open(shot) as image:
        assert image.size == (1600, 1000)
        # The heatmap panels' colours, not an empty page.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 1000
