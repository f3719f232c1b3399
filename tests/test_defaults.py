"""One default per setting: the Python classes, the method configs and the paper's preset agree.

The classes' signatures (through methods/settings.py) are the source; the YAML writes the same values
out with a comment each. Each test here fails when one side moves without the other.
"""

from __future__ import annotations

import inspect

import lightning as L
import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from adacs_lightning import PAPER, AdaCS
from adacs_lightning.methods import LAM, LR

from .helpers.configs import compose_config
from .helpers.training import tiny_backbone, tiny_trainer

TINY_BACKBONE = ("backbone.channels=[4,8,8,8]", "backbone.unet_out_channels=8", "backbone.final_conv_channels=[8]")


def signature_defaults(cls: type) -> dict:
    """Every keyword's default along the class chain (a subclass's own default wins)."""
    defaults: dict = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for name, parameter in inspect.signature(init).parameters.items():
            if parameter.default is not inspect.Parameter.empty:
                # A sequence default is a tuple in Python and a list in YAML.
                default = parameter.default
                defaults[name] = list(default) if isinstance(default, tuple) else default
    return defaults


def plain_settings(node) -> dict:
    """The method config's own values: no ``_target_``, no node built from another group (scorer, similarity)."""
    container = OmegaConf.to_container(node, resolve=False)
    return {
        k: v
        for k, v in container.items()
        if k != "_target_" and not isinstance(v, dict) and not (isinstance(v, str) and v.startswith("${"))
    }


@pytest.mark.parametrize("method", ["adacs", "robust", "nll"])
def test_each_method_config_says_what_its_class_defaults_to(method, tmp_path):
    cfg = compose_config([f"method={method}"], tmp_path)
    defaults = signature_defaults(get_class(cfg.method._target_))
    settings = plain_settings(cfg.method)
    assert settings, "no setting read"
    differ = {k: (v, defaults.get(k, "<no default>")) for k, v in settings.items() if defaults.get(k) != v}
    assert differ == {}, f"config value vs class default: {differ}"


@pytest.mark.parametrize("method", ["adacs", "baseline", "robust", "nll", "beta_nll", "adacs_normalised"])
def test_every_method_defaults_to_the_same_lambda_and_learning_rate(method, tmp_path):
    cfg = compose_config([f"method={method}"], tmp_path)
    assert cfg.method.lam == LAM and cfg.method.lr == LR
    assert signature_defaults(get_class(cfg.method._target_))["lam"] == LAM


def test_lapirn_is_conditioned_on_the_methods_lambda(tmp_path):
    from adacs_lightning.backbones.lapirn import ConditionalLapIRN

    assert compose_config(["backbone=lapirn"], tmp_path).backbone.reg_weight == LAM
    assert signature_defaults(ConditionalLapIRN)["reg_weight"] == LAM
    assert compose_config(["backbone=lapirn", "method.lam=0.2"], tmp_path).backbone.reg_weight == 0.2


def test_experiment_paper_is_the_paper_preset(tmp_path):
    cfg = compose_config(["experiment=paper"], tmp_path)
    assert {k: cfg.method[k] for k in PAPER} == PAPER
    model = AdaCS.paper(tiny_backbone())
    assert {k: model.hparams[k] for k in PAPER} == PAPER


@pytest.mark.parametrize(
    "spellings", [("similarity=lncc", "method.similarity=lncc"), ("+similarity=mi", "method.similarity=mi")]
)
def test_both_spellings_of_the_similarity_compose_the_same_config(spellings, tmp_path):
    a, b = (OmegaConf.to_yaml(compose_config([s], tmp_path), resolve=True) for s in spellings)
    assert a == b
    assert ("LocalNCC" in a) != ("MutualInformation" in a)


def test_similarity_settings_spelled_under_the_method_reach_the_group(tmp_path):
    cfg = compose_config(["similarity=lncc", "method.similarity.window=5"], tmp_path)
    assert cfg.similarity.window == 5 and OmegaConf.to_container(cfg.method, resolve=True)["similarity"]["window"] == 5


def test_one_line_wrap_trains_what_adacs_train_trains(tmp_path, single_thread):
    """``AdaCS(net)`` and the command line's default method give the same weights for the same seed and data."""
    # debug=tiny's small data, with the default warm-up restored and one joint epoch after it
    cfg = compose_config(["debug=tiny", "method.warmup_epochs=3", "trainer.max_epochs=7", *TINY_BACKBONE], tmp_path)
    models = {}
    for source in ("command line", "python"):
        L.seed_everything(0, verbose=False)
        if source == "python":
            model = AdaCS(tiny_backbone())
        else:
            model = instantiate(cfg.method, _convert_="all", backbone=instantiate(cfg.backbone, _convert_="all"))
        datamodule = instantiate(cfg.data, _convert_="all")
        tiny_trainer(cfg.trainer.max_epochs, tmp_path / source).fit(model, datamodule=datamodule)
        models[source] = model
    python, cli = models["python"], models["command line"]
    assert dict(cli.hparams) == dict(python.hparams)
    a, b = python.state_dict(), cli.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
