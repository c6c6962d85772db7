"""A new model family is one file: a throw-away model in a temporary module is found everywhere."""

import importlib.util
import subprocess
import sys
import textwrap

import pytest

from neurosim.common.errors import UserError
from neurosim.models.registry import FAMILIES, MODELS, Recipe, model_family, recipe_names, register_model
from neurosim.tools.cli import run_usage
from neurosim.training.config import MODEL_FAMILIES, PRESETS, RunConfig, preset
from neurosim.training.presets_doc import presets_markdown

MODEL_FILE = textwrap.dedent('''
    """A two-layer MLP of one small hidden population (a model written for a test)."""

    from neurosim.models.registry import Recipe, register_model

    BUILT = []


    @register_model("mini", family="mlp", about="two-layer MLP: one hidden population of --hidden neurons",
                    recipes={"mini_digits": Recipe("a two-layer MLP on the 8×8 digits",
                                                   dict(data="digits", hidden=(16,), epochs=1, batch_size=64,
                                                        lr=0.05, monitor_every=0))})
    def mini(cfg, rule, image_shape, num_classes):
        from neurosim.models.mlp import build_mlp

        BUILT.append(cfg.hidden)
        return build_mlp(rule, image_shape, cfg.hidden[:1], num_classes, cfg.activation, cfg.init, cfg.seed)
''')


@pytest.fixture
def mini_model(tmp_path):
    path = tmp_path / "mini_model.py"
    path.write_text(MODEL_FILE)
    spec = importlib.util.spec_from_file_location("mini_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mini_model"] = module
    spec.loader.exec_module(module)
    try:
        yield module
    finally:
        MODELS.pop("mini", None)
        sys.modules.pop("mini_model", None)


def test_a_model_in_its_own_file_is_found_everywhere(mini_model, tmp_path):
    assert MODELS["mini"].build is mini_model.mini and model_family("mini") == "mlp"
    assert "mini_digits" in MODEL_FAMILIES and RunConfig(model="mini").model == "mini"
    # a preset for every rule, with the recipe's settings and the rule's own
    cfg = preset("kp_mini_digits")
    assert (cfg.model, cfg.rule, cfg.hidden, cfg.batch_size, cfg.epochs) == ("mini", "kp", (16,), 64, 1)
    assert "wm_mini_digits" in PRESETS and "dfa_mini_digits" in PRESETS
    # its family says which settings it reads: an MLP's, not a ResNet's
    assert preset("kp_mini_digits", hidden=(8,)).hidden == (8,)
    with pytest.raises(UserError, match="--width applies to ResNets only"):
        preset("kp_mini_digits", width=0.5)
    with pytest.raises(UserError, match="use the preset kp_mini_digits instead"):
        preset("kp_mlp_digits", model="mini")
    # help and the generated presets page
    usage = run_usage()
    assert "mini: two-layer MLP" in usage and "kp_mini_digits" in usage
    page = presets_markdown()
    assert "## `*_mini_digits`: a two-layer MLP on the 8×8 digits" in page and "`kp_mini_digits`" in page
    # and it trains, through the same command-line path as every model, built by its own function
    from neurosim.tools.cli import run_circuit

    code = run_circuit(["kp_mini_digits", "--train-limit", "256", "--device", "cpu", "--quiet",
                        "--out", str(tmp_path / "run")])
    assert code == 0 and mini_model.BUILT and set(mini_model.BUILT) == {(16,)}
    saved = (tmp_path / "run" / "config.json").read_text()
    assert '"model": "mini"' in saved


def test_the_built_in_models_and_their_recipes():
    assert tuple(MODELS) == ("mlp", "resnet18", "resnet34", "resnet50", "resnet18_imagenet",
                             "resnet34_imagenet", "resnet50_imagenet")
    assert recipe_names() == ("mlp_digits", "mlp_original", "resnet18", "resnet34", "resnet50",
                              "resnet18_imagenet", "resnet34_imagenet", "resnet50_imagenet")
    assert {model_family(m) for m in MODELS} == set(FAMILIES)
    # a rule's "resnet" settings reach every ResNet, its "imagenet" ones the ImageNet ResNets only
    wm = preset("wm_resnet50_imagenet")
    assert (wm.data, wm.wm_sleep_every) == ("imagenet", preset("wm_resnet18").wm_sleep_every)


def test_registration_refuses_unusable_declarations():
    def build(cfg, rule, image_shape, num_classes):
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="family is one of"):
        register_model("tiny", family="transformer", about="x")
    with pytest.raises(ValueError, match="about is one line"):
        register_model("tiny", family="mlp", about="")
    with pytest.raises(ValueError, match="short lower-case word"):
        register_model("Tiny", family="mlp", about="x")
    with pytest.raises(ValueError, match="taken by the model 'mlp'"):
        register_model("tiny", family="mlp", about="x", recipes={"mlp_digits": Recipe("t", {})})
    with pytest.raises(ValueError, match="cannot set the model or rule"):
        register_model("tiny", family="mlp", about="x", recipes={"tiny": Recipe("t", {"model": "mlp"})})
    with pytest.raises(ValueError, match="taken by"):
        register_model("mlp", family="mlp", about="x")(build)
    assert "tiny" not in MODELS


def test_the_model_names_need_no_pytorch():
    code = "import sys, neurosim.training.config, neurosim.models.registry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
