"""``tokenreduce.load``: every family's model and preprocessing from a spec, through its adapter (hub-free: a small
Hugging Face model saved from a config, open_clip model configs with ``pretrained=None``), the registry that routes
specs, the family-neutral ``predictor`` / ``num_classes``, and the import graph: the commands know no family."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.data import resolve_data_config
from torch import nn

import tokenreduce as tr
from tokenreduce import adapters
from tokenreduce.adapters import common, family_for_spec, num_classes, predictor, preprocessing_of
from tokenreduce.core.errors import InputError, InputTypeError, MissingExtraError

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
needs_open_clip = pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip not installed")

PACKAGE = Path(tr.__file__).parent
FAMILY_MODULES = ("timm_vit", "swin", "pvt", "hf", "hf_video", "open_clip", "torchvision_video")
LIBRARIES = ("timm", "transformers", "open_clip", "torchvision")


# --- the registry -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, adapter, name", [
    ("deit_small_patch16_224", "timm_vit", "deit_small_patch16_224"),
    ("timm:deit_small_patch16_224", "timm_vit", "deit_small_patch16_224"),
    ("hf-hub:timm/vit_small_patch16_224", "timm_vit", "hf-hub:timm/vit_small_patch16_224"),  # timm's own prefix
    ("hf:/models/vit", "hf", "/models/vit"),
    ("open_clip:ViT-B-16", "open_clip", "ViT-B-16"),
    ("open_clip:/configs/tiny.json", "open_clip", "/configs/tiny.json"),
    ("video:swin3d_s", "torchvision_video", "swin3d_s"),
    ("swin3d_t", "torchvision_video", "swin3d_t"),
])
def test_specs_route_to_their_family(spec, adapter, name):
    family, rest = family_for_spec(spec)
    assert family.adapter == f"tokenreduce.adapters.{adapter}" and rest == name


def test_every_loading_family_has_a_load_and_every_family_an_adapter_file():
    for family in adapters.FAMILIES:
        module = family.adapter.rsplit(".", 1)[-1]
        assert (PACKAGE / "adapters" / f"{module}.py").is_file(), family
        if family.prefix is not None:
            assert "\ndef load(" in (PACKAGE / "adapters" / f"{module}.py").read_text(), family


def test_bad_specs_are_input_errors():
    for spec in ("", None, 3):
        with pytest.raises(InputError, match="spec"):
            tr.load(spec)
    with pytest.raises(InputError, match="unknown timm model 'no_such_model'"):
        tr.load("no_such_model")
    with pytest.raises(InputError, match="unknown torchvision video model 'r3d_18'"):
        tr.load("video:r3d_18")
    with pytest.raises(InputError, match="checkpoint cannot be combined with the demo"):
        tr.load("demo", checkpoint="weights.pth")


def test_a_missing_library_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` fails
    monkeypatch.delitem(sys.modules, "tokenreduce.adapters.open_clip", raising=False)
    with pytest.raises(MissingExtraError, match=r'tokenreduce\[open_clip\]'):
        tr.load("open_clip:ViT-B-16")


def test_a_new_family_is_one_adapter_module_and_its_registry_line(tmp_path, monkeypatch):
    """What adding a family takes: its adapter (here a toy module) and a ``Family`` line; the commands and
    ``tr.load`` need no change."""
    (tmp_path / "toy_adapter.py").write_text(
        "import torch\nfrom torch import nn\nfrom tokenreduce.adapters import common\n"
        "FAMILY = 'toy'\n"
        "def unsupported_reason(model):\n    return 'toy models cannot be patched'\n"
        "def predict(model, images):\n    return model(images)['out']\n"
        "def num_classes(model):\n    return 2\n"
        "def load(name, checkpoint=None, pretrained=False, **kwargs):\n"
        "    return common.Loaded(nn.Identity(), common.Preprocessing((3, 8, 8), source=name))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(adapters, "FAMILIES", [*adapters.FAMILIES, adapters.Family("toy", "toy_adapter",
                                                                                    ("torch",), prefix="toy")])
    model, prep = tr.load("toy:anything")
    assert isinstance(model, nn.Identity) and prep.source == "anything" and prep.img_size == (8, 8)


# --- timm -----------------------------------------------------------------------------------------------------
def test_timm_model_and_its_preprocessing_are_timms(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_patch16_224", depth=2, img_size=64, num_classes=5)
    weights = tmp_path / "w.pth"
    torch.save(reference.state_dict(), weights)
    model, prep = tr.load("timm:deit_tiny_patch16_224", checkpoint=str(weights), depth=2, img_size=64,
                          num_classes=5)
    assert not model.training and num_classes(model) == 5 and predictor(model) is adapters.call
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference.eval()(x))
    # what `tokenreduce eval` read from the model before tokenreduce.load: the same data config, overrides and all
    overrides = {"crop_pct": 0.8, "interpolation": "bilinear"}
    assert prep.data_config(**overrides) == resolve_data_config({**overrides, "input_size": (3, 64, 64)}, model=model)
    assert prep.data_config() == resolve_data_config({"input_size": (3, 64, 64)}, model=model)
    assert preprocessing_of(model).data_config() == prep.data_config()  # read back from the model itself
    bare, bare_prep = tr.load("deit_tiny_patch16_224", depth=2, img_size=64)
    assert type(bare) is type(model) and bare_prep == prep and bare.num_classes == 1000
    with pytest.raises(InputError, match="not accepted by timm model"):
        tr.load("deit_tiny_patch16_224", no_such_option=1)


def test_timm_swin_loads_and_patches():
    model, prep = tr.load("swin_tiny_patch4_window7_224", depths=(2, 2), num_heads=(1, 2), embed_dim=32,
                          img_size=56, window_size=7)
    assert prep.img_size == (56, 56)
    tr.patch(model, "tome", r=2)
    assert tr.describe(model)["method"] == "tome"


# --- Hugging Face: a small model saved from a config --------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    pytest.importorskip("transformers")
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel

    root = tmp_path_factory.mktemp("hf")
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=4)
    torch.manual_seed(0)
    ViTForImageClassification(config).eval().save_pretrained(root / "classifier")
    ViTImageProcessor(size={"height": 32, "width": 32}, resample=2, image_mean=[0.5, 0.4, 0.3],
                      image_std=[0.2, 0.25, 0.3]).save_pretrained(root / "classifier")
    ViTModel(config).eval().save_pretrained(root / "backbone")  # no preprocessor_config.json
    return root


@needs_hf
def test_hf_load_from_a_saved_directory(hf_dirs):
    from transformers import ViTForImageClassification, ViTModel

    model, prep = tr.load(f"hf:{hf_dirs / 'classifier'}")
    assert type(model) is ViTForImageClassification and not model.training and num_classes(model) == 4
    assert prep.input_size == (3, 32, 32) and prep.interpolation == "bilinear" and prep.crop_mode == "squash"
    assert prep.mean == pytest.approx((0.5, 0.4, 0.3)) and prep.source.endswith("preprocessor_config.json")
    assert preprocessing_of(model) == prep  # from the directory the model remembers (name_or_path)
    x = torch.randn(3, 3, 32, 32)
    reference = ViTForImageClassification.from_pretrained(hf_dirs / "classifier").eval()
    with torch.no_grad():
        assert torch.equal(predictor(model)(model, x), reference(pixel_values=x).logits)
    tr.patch(model, "tome", r=2)  # the family's own model, patched directly
    with torch.no_grad():
        assert predictor(model)(model, x).shape == (3, 4)
    assert tr.load(f"hf:{hf_dirs / 'classifier'}", num_classes=4).model.config.num_labels == 4
    with pytest.raises(InputError, match="has 4 labels"):
        tr.load(f"hf:{hf_dirs / 'classifier'}", num_classes=10)
    backbone, backbone_prep = tr.load(f"hf:{hf_dirs / 'backbone'}", attn_implementation="eager")
    assert type(backbone) is ViTModel and num_classes(backbone) == 0
    assert backbone_prep.input_size == (3, 32, 32) and backbone_prep.source.startswith("defaults")
    with torch.no_grad():  # an embedding: the pooler output
        assert predictor(backbone)(backbone, x).shape == (3, 32)


@needs_hf
def test_hf_refusals(hf_dirs, tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        tr.load(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(InputError, match="other image sizes are not supported"):
        tr.load(f"hf:{hf_dirs / 'classifier'}", img_size=64)
    with pytest.raises(InputError, match="cannot load the model"):
        tr.load(f"hf:{tmp_path}")  # a directory without a model


# --- open_clip: model configs, no weights ---------------------------------------------------------------------------
@needs_open_clip
def test_open_clip_load_by_config_name_and_by_json(tmp_path):
    import open_clip

    torch.manual_seed(0)
    model, prep = tr.load("open_clip:ViT-S-32-alt")
    assert type(model) is open_clip.transformer.VisionTransformer and not model.training
    assert prep.input_size == (3, 224, 224) and prep.crop_mode == "center" and prep.crop_pct == 1.0
    assert prep.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert num_classes(model) == 0 and len(tr.flops(model).blocks) == 12 and preprocessing_of(model) == prep
    with torch.no_grad():
        assert predictor(model)(model, torch.randn(1, 3, 224, 224)).shape == (1, 256)

    config = tmp_path / "tiny-load.json"
    config.write_text(json.dumps({
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                        "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 1, "layers": 1}}))
    tower, tower_prep = tr.load(f"open_clip:{config}")
    assert tower_prep.img_size == (32, 32) and len(tower.transformer.resblocks) == 2
    with pytest.raises(InputError, match="has no classifier to train"):
        tr.load("open_clip:ViT-S-32-alt", num_classes=10)
    with pytest.raises(InputError, match="pretrained=True names no weights"):
        tr.load("open_clip:ViT-S-32-alt", pretrained=True)
    with pytest.raises(InputError, match="other image sizes"):
        tr.load(f"open_clip:{config}", img_size=64)


# --- torchvision video --------------------------------------------------------------------------------------------
def test_torchvision_video_swin_loads_and_is_refused_by_patch():
    model, prep = tr.load("video:swin3d_t", num_classes=3)
    assert type(model).__name__ == "SwinTransformer3d" and num_classes(model) == 3 and prep.frames == 32
    assert prep.crop_pct == pytest.approx(224 / 256) and prep.interpolation == "bilinear"
    assert type(tr.load("swin3d_t", num_classes=3).model) is type(model)
    with pytest.raises(TypeError, match="takes STViT"):
        tr.patch(model, "tome", r=2)


# --- the commands know no family ------------------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (relative imports resolved), lazy imports inside functions included."""
    package = ["tokenreduce", *path.relative_to(PACKAGE).parent.parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


def test_the_commands_import_no_family_module_nor_model_library():
    forbidden = {f"tokenreduce.adapters.{m}" for m in FAMILY_MODULES}
    files = [PACKAGE / "cli.py", *sorted((PACKAGE / "commands").glob("*.py"))]
    hits = []
    for path in files:
        for module in _imports(path):
            if module in forbidden or module.split(".")[0] in LIBRARIES:
                hits.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not hits, "\n".join(hits)


def test_family_model_is_gone():
    from tokenreduce.commands import _common

    assert not any(hasattr(_common, name) for name in ("FamilyModel", "load_family_model", "hf_data_config",
                                                        "open_clip_data_config"))
    assert not [p for p in PACKAGE.rglob("*.py") if "FamilyModel" in p.read_text()]


def test_preprocessing_of_a_model_of_no_family_is_a_type_error():
    with pytest.raises(InputTypeError, match="Linear is not a model of a family"):
        preprocessing_of(nn.Linear(2, 2))


def test_preprocessing_transform_matches_its_data_config():
    prep = common.Preprocessing((3, 40, 40), "bilinear", (0.5,) * 3, (0.25,) * 3, crop_pct=1.0, crop_mode="squash")
    from PIL import Image

    image = Image.new("RGB", (60, 50), (255, 128, 0))
    out = prep.transform()(image)
    assert out.shape == (3, 40, 40)
    assert out[:, 0, 0].tolist() == pytest.approx([2.0, (128 / 255 - 0.5) / 0.25, -2.0], abs=1e-2)
