"""A method is its preset: its title and whether the demo offers it come from the YAML, so a new
preset reaches the tables, the benchmarks and the app without touching their code."""

from __future__ import annotations

import shutil

import pytest

from pmpo import config
from pmpo.config import app_methods, list_methods, load_preset, method_title, read_method_preset
from pmpo.errors import InputError


def test_every_preset_names_itself_and_says_whether_the_app_offers_it():
    for method in list_methods():
        preset = read_method_preset(method)
        assert isinstance(preset.get("title"), str) and preset["title"], method
        assert isinstance(preset.get("app"), bool), method
        assert "title" not in load_preset(method) and "app" not in load_preset(method)  # metadata, not options
    assert method_title("maple") == "MaPLe" and method_title("no-such-method") == "no-such-method"
    assert app_methods()[0] == "pmpo" and "zeroshot" not in app_methods()


def test_the_app_and_the_benchmarks_follow_the_presets(tmp_path, monkeypatch):
    from pmpo.app import recipe

    assert list(recipe.TRAIN_METHODS) == app_methods()
    presets = tmp_path / "methods"
    shutil.copytree(config.METHOD_DIR, presets)
    text = (presets / "coop.yaml").read_text().replace("method: coop", "method: mycoop").replace("title: CoOp", "title: MyCoOp")
    (presets / "mycoop.yaml").write_text(text)
    (presets / "vpt.yaml").write_text((presets / "vpt.yaml").read_text().replace("app: true", "app: false"))
    monkeypatch.setattr(config, "METHOD_DIR", presets)
    assert "mycoop" in app_methods() and "vpt" not in app_methods()
    assert method_title("mycoop") == "MyCoOp"
    with pytest.raises(InputError, match="gone"):
        read_method_preset("gone")
