"""The configuration reference (tools/config_reference.py): comments parsed, undocumented keys caught, generated files current."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def _load_tool(name: str):
    """A script of tools/ imported as a module (the tools are not part of the installed package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


ref = _load_tool("config_reference")

SAMPLE = """\
# @package _global_
# A preset for a test.
defaults:
  - _self_
  # The network.
  - backbone: voxelmorph
# Documented above.
alpha: 0.02
beta: 1.5  # documented inline
undocumented: 3
nested:
  # Inner key.
  inner: "a # b"  # quoted hash stays in the value
channels: [16, 32]
"""


def _flat_paths(node, prefix=()) -> set[str]:
    """Every key path of a plain YAML mapping (lists are values)."""
    paths = set()
    for key, value in node.items():
        path = (*prefix, str(key))
        paths.add(".".join(path))
        if isinstance(value, dict):
            paths |= _flat_paths(value, path)
    return paths


def test_parser_reads_paths_values_and_comments():
    config = ref.parse_config_file(SAMPLE, group="experiment", option="sample")
    keys = {key.path: key for key in config.keys}
    assert config.is_global and config.description == "A preset for a test."
    assert config.defaults == {"backbone": ("The network.", "voxelmorph")}
    assert list(keys) == ["alpha", "beta", "undocumented", "nested", "nested.inner", "channels"]
    assert keys["alpha"].comment == "Documented above." and keys["alpha"].value == "0.02"
    assert keys["beta"].comment == "documented inline" and keys["beta"].value == "1.5"
    assert keys["undocumented"].comment is None
    assert keys["nested.inner"].value == '"a # b"' and keys["nested.inner"].comment == "quoted hash stays in the value"
    assert keys["channels"].value == "[16, 32]"


def test_group_files_are_prefixed_by_their_group():
    config = ref.parse_config_file("# A net.\n_target_: a.B\n# Width.\nwidth: 4\n", group="backbone", option="b")
    assert [key.path for key in config.keys] == ["backbone._target_", "backbone.width"]


def _write_tree(root: Path, method_text: str) -> None:
    (root / "method").mkdir(parents=True)
    (root / "config.yaml").write_text(
        "# Top.\ndefaults:\n  - _self_\n  # Weighting.\n  - method: adacs\n# Seed.\nseed: 0\n"
    )
    (root / "method" / "adacs.yaml").write_text("# AdaCS.\n\n# α.\nalpha: 0.02\n")
    (root / "method" / "baseline.yaml").write_text(method_text)


def test_a_key_added_without_a_comment_is_reported(tmp_path):
    _write_tree(tmp_path, "# Baseline.\nalpha: 0.0\nnew_key: 1\n")
    missing = ref.undocumented(ref.load_tree(tmp_path))
    assert missing == ["conf/method/baseline.yaml:3: method.new_key"]


def test_a_key_documented_in_another_option_of_its_group_counts(tmp_path):
    _write_tree(tmp_path, "# Baseline.\nalpha: 0.0\n# Now documented.\nnew_key: 1\n")
    files = ref.load_tree(tmp_path)
    assert ref.undocumented(files) == []
    reference = ref.render_reference(files)
    assert "| `method.alpha` | `0.0` | α. |" in reference  # the description comes from adacs.yaml
    assert "### `method=adacs` (default)" in reference


def test_an_experiments_note_on_a_value_does_not_replace_the_keys_meaning(tmp_path):
    """``experiment`` sorts before ``method``: its note stays in its own table."""
    _write_tree(tmp_path, "# Baseline.\nalpha: 0.0\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        config.read_text().replace("  - method: adacs\n", "  - method: adacs\n  # Presets.\n  - experiment: null\n")
    )
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "paper.yaml").write_text(
        "# @package _global_\n# The paper.\nmethod:\n  alpha: 0.04  # the paper's appendix value\n"
    )
    reference = ref.render_reference(ref.load_tree(tmp_path))
    assert "| `method.alpha` | `0.02` | α. |" in reference
    assert "| `method.alpha` | `0.04` | the paper's appendix value |" in reference


def test_every_key_of_the_shipped_tree_is_parsed():
    """The line parser sees exactly the keys YAML sees, in every file of conf/."""
    for config in ref.load_tree(REPO / "conf"):
        data = OmegaConf.to_container(OmegaConf.create((REPO / "conf" / config.relpath).read_text()))
        data.pop("defaults", None)
        prefix = [] if config.group is None or config.is_global else (config.package or config.group).split(".")
        expected = {".".join([*prefix, path]) for path in _flat_paths(data)}
        assert {key.path for key in config.keys} == expected, config.relpath


def test_every_key_of_the_shipped_tree_is_documented():
    assert ref.undocumented(ref.load_tree(REPO / "conf")) == []


def test_reference_and_readme_table_are_current(capsys):
    status = ref.main(["--check", "--repo", str(REPO)])
    assert status == 0, capsys.readouterr().out


def test_readme_block_is_required():
    with pytest.raises(ValueError, match="config-groups"):
        ref.replace_readme_table("no markers here", "| table |")


def test_defaults_entries_name_their_group_and_option():
    text = (
        "# @package _global_\ndefaults:\n  # The data.\n  - override /data: acdc  # a note\n  - common/files@_here_\n"
    )
    config = ref.parse_config_file(text, group="experiment", option="sample")
    assert config.defaults == {"data": ("The data.", "acdc")}
