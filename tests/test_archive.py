"""scripts/archive.py: exactly the files a folder's arch needs go into NAME.mar."""
from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from scripts.archive import ArchiveError, build_archive, main, plan_archive

ROOT = Path(__file__).resolve().parents[1]


def _folder(tmp_path: Path, handler: dict, files: dict[str, str]) -> Path:
    folder = tmp_path / "m"
    folder.mkdir(parents=True)
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    (folder / "model-config.yaml").write_text(yaml.safe_dump({"handler": handler}))
    return folder


def test_plan_for_shapes_folder() -> None:
    plan = plan_archive(ROOT / "models" / "shapes")
    assert plan.members() == ["model-config.yaml", "weights.pt", "model.py", "index_to_name.json"]


def test_plan_hf_keeps_subfolder_and_skips_junk(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"arch": "hf:vit", "labels": "names.json"}, {
        "vit/config.json": "{}", "vit/model.safetensors": "x", "vit/preprocessor_config.json": "{}",
        "vit/training_args.bin": "junk", "vit/README.md": "junk", "names.json": "{}",
        "index_to_name.json": "{}", "notes.txt": "junk", "other.py": "junk"})
    assert plan_archive(folder).members() == [
        "model-config.yaml", "names.json", "vit/config.json", "vit/preprocessor_config.json",
        "vit/model.safetensors"]


def test_plan_timm_and_package_class(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"arch": "timm:resnet18", "weights": "w.safetensors"},
                     {"w.safetensors": "x", "index_to_name.json": "{}", "model.py": "junk"})
    assert plan_archive(folder).members() == ["model-config.yaml", "w.safetensors", "index_to_name.json"]
    folder2 = _folder(tmp_path / "2", {"arch": "pkg.net:Net"}, {"pkg/net.py": "x", "w.pt": "x"})
    assert plan_archive(folder2).members() == ["model-config.yaml", "pkg/net.py"]
    folder3 = _folder(tmp_path / "3", {"arch": "torchvision.models.resnet18"}, {"w.pt": "x"})
    assert plan_archive(folder3).members() == ["model-config.yaml"]


def test_plan_yolo_packs_its_model_file(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"arch": "yolo:yolov8n.yaml", "task": "detection"},
                     {"yolov8n.yaml": "nc: 3", "index_to_name.json": "{}", "best.pt": "junk"})
    assert plan_archive(folder).members() == ["model-config.yaml", "index_to_name.json", "yolov8n.yaml"]
    with pytest.raises(ArchiveError, match="'missing.pt' not found"):
        plan_archive(_folder(tmp_path / "2", {"arch": "yolo:missing.pt"}, {}))
    with pytest.raises(ArchiveError, match="outside"):
        plan_archive(_folder(tmp_path / "3", {"arch": "yolo:../../x.pt"}, {}))


def test_plan_errors(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="model-config.yaml"):
        plan_archive(tmp_path)
    with pytest.raises(ArchiveError, match="handler.weights: 'w.pt' not found"):
        plan_archive(_folder(tmp_path / "a", {"arch": "x:Y", "weights": "w.pt"}, {}))
    with pytest.raises(ArchiveError, match="outside"):
        plan_archive(_folder(tmp_path / "b", {"arch": "x:Y", "labels": "../../etc/passwd"}, {}))
    with pytest.raises(ArchiveError, match="no \\*.safetensors"):
        plan_archive(_folder(tmp_path / "c", {"arch": "hf:h"}, {"h/config.json": "{}",
                                                                "h/pytorch_model.bin": "x"}))
    assert main([str(tmp_path / "nothing")]) == 2
    assert main([str(ROOT / "models" / "shapes"), "--name", "bad name!"]) == 2


@pytest.mark.skipif(not (Path(sys.executable).parent / "torch-model-archiver").is_file()
                    and shutil.which("torch-model-archiver") is None,
                    reason="torch-model-archiver not installed")
def test_build_hf_archive(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"arch": "hf:vit"}, {
        "vit/config.json": "{}", "vit/model.safetensors": "x", "vit/junk.bin": "junk",
        "index_to_name.json": json.dumps({"0": "a"}), "extra.txt": "junk"})
    mar = build_archive(folder, "demo", tmp_path / "store")
    assert mar == tmp_path / "store" / "demo.mar"
    names = set(zipfile.ZipFile(mar).namelist())
    assert {"model-config.yaml", "index_to_name.json", "vit/config.json", "vit/model.safetensors",
            "gradcam_handler.py", "MAR-INF/MANIFEST.json"} <= names
    assert not {n for n in names if "junk" in n or n == "extra.txt"}
    manifest = json.loads(zipfile.ZipFile(mar).read("MAR-INF/MANIFEST.json"))
    assert manifest["model"]["modelName"] == "demo" and "serializedFile" not in manifest["model"]


# -- the onnxruntime backend: the graph, no model code ---------------------------------------------

def test_plan_for_onnxruntime_packs_the_graph_and_labels_only() -> None:
    plan = plan_archive(ROOT / "models" / "shapes", "onnxruntime")
    assert plan.members() == ["model-config.yaml", "model.cam.onnx", "index_to_name.json"]
    assert plan.backend == "onnxruntime" and plan.model_file is None
    assert [p.name for p in plan.sources] == ["weights.pt", "model.py", "index_to_name.json"]
    with pytest.raises(ArchiveError, match="--backend: 'tf'"):
        plan_archive(ROOT / "models" / "shapes", "tf")


@pytest.fixture()
def onnx_ready(model_folder):
    """A TinyBNNet folder (``backend: onnxruntime``) with a current graph."""
    from scripts.archive import export_graph

    folder = model_folder()
    cfg = yaml.safe_load((folder / "model-config.yaml").read_text())
    cfg["handler"]["backend"] = "onnxruntime"
    (folder / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    export_graph(folder, ["hirescam", "gradcam"], verify=False)
    return folder


def test_a_graph_is_exported_again_only_when_it_is_stale(onnx_ready) -> None:
    import os

    from scripts.archive import stale_graph

    folder = onnx_ready
    plan = plan_archive(folder)
    assert plan.backend == "onnxruntime" and stale_graph(plan) is None
    later = (folder / "model.cam.onnx").stat().st_mtime + 10
    os.utime(folder / "weights.pt", (later, later))
    assert stale_graph(plan) == "model.cam.onnx is older than weights.pt"
    os.utime(folder / "weights.pt", (later - 20, later - 20))
    cfg = yaml.safe_load((folder / "model-config.yaml").read_text())
    cfg["handler"]["input_size"] = [48, 48]
    (folder / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    assert "handler.input_size: [48, 48], but the graph" in stale_graph(plan)
    (folder / "model.cam.onnx").unlink()
    assert stale_graph(plan) == "the folder has no model.cam.onnx"


@pytest.mark.skipif(not (Path(sys.executable).parent / "torch-model-archiver").is_file()
                    and shutil.which("torch-model-archiver") is None,
                    reason="torch-model-archiver not installed")
def test_build_onnxruntime_archive_exports_the_missing_graph(model_folder, tmp_path: Path) -> None:
    folder = model_folder()
    mar = build_archive(folder, "tiny", tmp_path / "store", backend="onnxruntime",
                        methods=["hirescam", "gradcam"])
    assert (folder / "model.cam.onnx").is_file()  # exported (and verified) into the folder
    z = zipfile.ZipFile(mar)
    assert set(z.namelist()) == {"model-config.yaml", "model.cam.onnx", "index_to_name.json",
                                 "gradcam_handler.py", "MAR-INF/MANIFEST.json"}
    manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
    assert manifest["serializedFile"] == "model.cam.onnx" and "modelFile" not in manifest
    cfg = yaml.safe_load(z.read("model-config.yaml"))
    assert cfg["handler"]["backend"] == "onnxruntime" and cfg["handler"]["method"] == "hirescam"
    folder_cfg = yaml.safe_load((folder / "model-config.yaml").read_text())
    assert "backend" not in folder_cfg["handler"]  # the folder's own config is left alone
