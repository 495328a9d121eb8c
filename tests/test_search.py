"""`gazetune search`: bad options refused before any work, settings, callbacks. The search
end to end is checked by the demo's test (tests/test_demo.py), which runs one."""

import json
import pickle
from types import SimpleNamespace

import pytest
from helpers import gazetune

from search.progress import ProgressPrinter, describe
from search.service import resume_search, run_search
from search.settings import SearchSettings, parse_fixed
from search.trial import TrialRunCloser
from trainable.config import ConfigError
from trainable.errors import GazetuneError


def test_parse_fixed_types_values_and_refuses_what_the_search_sets():
    assert parse_fixed(["batch_size=16", "augment=false", "n_boot=200"]) == {
        "batch_size": 16, "augment": False, "n_boot": 200}
    with pytest.raises(ConfigError, match="--max-epochs"):
        parse_fixed(["epochs=3"])
    with pytest.raises(ConfigError, match="batchsize"):
        parse_fixed(["batchsize=16"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_fixed(["batch_size"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cache": "missing"}, "cache .*missing does not exist"),
        ({"space": "papr"}, "unknown space 'papr'"),
        ({"fixed": {"loss_set": "rrr"}}, "not in space 'paper'"),
        ({"fixed": {"seg_loss": "cc"}}, "space 'paper' sets seg_loss=bce"),
        ({"name": "a/b"}, "--name"),
        ({"grace_period": 5, "max_epochs": 3}, "--grace-period"),
    ],
)
def test_search_refuses_bad_options_before_starting(tmp_path, change, message):
    (tmp_path / "cache").mkdir()
    with pytest.raises(GazetuneError, match=message):
        run_search(SearchSettings(**{"name": "s", **change}), workdir=tmp_path)
    assert not (tmp_path / "mlflow.db").exists()  # nothing started


def test_search_refuses_an_existing_name(tmp_path):
    (tmp_path / "cache").mkdir()
    SearchSettings(name="s").resolved(tmp_path).save()
    with pytest.raises(GazetuneError, match="gazetune resume s"):
        run_search(SearchSettings(name="s"), workdir=tmp_path)


def test_settings_saved_atomically_with_absolute_locations(tmp_path):
    settings = SearchSettings(name="s", fixed={"batch_size": 16}).resolved(tmp_path)
    settings.save()
    folder = tmp_path / "ray_results" / "s"
    assert [p.name for p in folder.iterdir()] == ["gazetune.json"]  # no temporary file left
    saved = json.loads((folder / "gazetune.json").read_text())
    assert saved["storage"] == str(tmp_path / "ray_results")
    assert saved["cache"] == str(tmp_path / "cache")
    assert saved["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert SearchSettings.load(str(folder)) == settings


def test_an_encoder_weights_file_is_made_absolute_and_a_weight_name_kept(tmp_path):
    # Trials run in folders of their own: a relative file would be looked for there.
    fixed = SearchSettings(name="s", fixed={"encoder_weights": "w/encoder.pt"}).resolved(
        tmp_path).fixed
    assert fixed["encoder_weights"] == str(tmp_path / "w" / "encoder.pt")
    named = SearchSettings(name="s", fixed={"encoder_weights": "imagenet"}).resolved(tmp_path)
    assert named.fixed["encoder_weights"] == "imagenet"


def test_resume_of_an_unknown_search_names_where_it_looked(tmp_path):
    with pytest.raises(GazetuneError, match=f"no search settings at {tmp_path}/ray_results/nope"):
        resume_search("nope", workdir=tmp_path)


def test_callbacks_survive_tunes_pickling(tmp_path):
    # Tune pickles callbacks with the experiment and reuses them on resume; the closer reads
    # the search's settings from the folder Tune names for the trials, wherever it is now.
    import pyarrow.fs

    settings = SearchSettings(name="s", max_epochs=3).resolved(tmp_path)
    settings.save()
    closer = pickle.loads(pickle.dumps(TrialRunCloser()))
    closer.setup()
    trial = SimpleNamespace(storage=SimpleNamespace(
        storage_filesystem=pyarrow.fs.LocalFileSystem(), experiment_fs_path=settings.path))
    assert closer._settings_of(trial) == settings
    printer = pickle.loads(pickle.dumps(ProgressPrinter(8, 3)))
    assert (printer.total, printer.max_t) == (8, 3)


def test_describe_says_the_method_first():
    assert describe({"loss_set": "set3", "generator": "deconvnet", "r": 0.25, "lr": 0.000123}) \
        == "set3/deconvnet r=0.25 lr=0.000123"
    assert describe({"loss_set": "classifier", "dropout": 0.5}) == "classifier dropout=0.5"
    # a space's constant shows only where it does something
    assert describe({"loss_set": "classifier", "dropout": 0.5, "seg_loss": "bce"}) == \
        "classifier dropout=0.5"
    assert describe({"loss_set": "set1", "generator": "deconvnet", "seg_loss": "bce",
                     "gaze_target": "reference"}) == "set1/deconvnet gaze_target=reference"


def test_cli_names_the_bad_setting(tmp_path):
    done = gazetune("search", "--set", "epochs=3", cwd=tmp_path, check=False)
    assert done.returncode == 2
    assert "--max-epochs" in done.stderr
