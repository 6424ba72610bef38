"""camserve.onnx.job over the tasks: results lines of multilabel, segmentation and embedding
graphs (the shapes of docs/tasks.md), the segmentation mask files, --reference, and --metrics
defined for each task (the probability of its explained target)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from camserve.models import ModelSpec, from_module
from camserve.onnx.cli import main
from camserve.onnx.export import export_cam_onnx
from camserve.onnx.job import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE
from camserve.testing.nets import TinyEmbedNet, TinyNet, TinySegNet, calibrate_bn, frozen

JsonLines = Callable[[Path], list[dict]]
SIZE = (40, 24)
SEG_LABELS = ["background", "a", "b", "c"]


@pytest.fixture(scope="module")
def task_graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("taskjobs")
    made = {}
    for task, net, labels, extra in (
            ("multilabel", TinyNet(5, seed=1), list("vwxyz"), {"threshold": 0.4}),
            ("segmentation", TinySegNet(4, seed=1), SEG_LABELS, {"background": 0}),
            ("embedding", TinyEmbedNet(6, seed=1), [str(i) for i in range(6)], {})):
        spec = ModelSpec.from_config({"arch": "x:Net", "task": task, "input_size": list(SIZE),
                                      "target_layer": "features", "topk": 2, **extra})
        lm = from_module(frozen(calibrate_bn(net, SIZE)), spec, labels=labels)
        made[task] = export_cam_onnx(lm, out / f"{task}.onnx", methods=("gradcam",), threads=1).path
    return made


def _run(graph: Path, images: dict[str, Path], out: Path, *args: str) -> int:
    return main(["--model", str(graph), str(images["root"]), "--out", str(out),
                 "--batch-size", "3", "--threads", "1", "--workers", "2", *args])


def test_multilabel_lines(task_graphs, images, tmp_path: Path, json_lines: JsonLines) -> None:
    out = tmp_path / "out"
    assert _run(task_graphs["multilabel"], images, out, "--metrics", "deletion,avg_drop",
                "--metrics-steps", "4") == EXIT_PARTIAL  # the three broken files
    lines = json_lines(out / "results.jsonl")
    assert len(lines) == 5 and len(json_lines(out / "errors.jsonl")) == 3
    for line in lines:
        assert line["task"] == "multilabel" and line["threshold"] == 0.4
        assert all(p["score"] >= 0.4 for p in line["labels"]) and len(line["topk"]) == 2
        assert line["target"] == line["topk"][0]["index"]  # -1: the top label
        assert line["score"] == line["topk"][0]["score"]  # its sigmoid
        assert set(line["metrics"]) == {"deletion", "avg_drop"}
        assert 0 <= line["metrics"]["deletion"] <= 1 and (out / line["files"]["heatmap"]).is_file()


def test_segmentation_lines_and_masks(task_graphs, images, tmp_path: Path,
                                      json_lines: JsonLines) -> None:
    out = tmp_path / "out"
    assert _run(task_graphs["segmentation"], images, out, "--save", "heatmap,overlay",
                "--metrics", "insertion", "--metrics-steps", "4") == EXIT_PARTIAL
    lines = {Path(line["path"]).name: line for line in json_lines(out / "results.jsonl")}
    assert len(lines) == 5
    for line in lines.values():
        seg = line["segmentation"]
        assert line["task"] == "segmentation" and line["target"] != 0  # not the background
        mask = np.asarray(Image.open(out / seg["mask"]))
        assert mask.shape == (line["height"], line["width"]) and int(mask.max()) < 4
        shares = {c["index"]: c["share"] for c in seg["classes"]}
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-5)
        if line["target"] in shares:
            assert 0 < line["score"] <= 1  # mean probability over its predicted mask
        assert 0 <= line["metrics"]["insertion"] <= 1
    assert (out / lines["b.png"]["files"]["overlay"]).is_file()
    # --target: that class for every image, over its predicted mask
    again = tmp_path / "again"
    assert _run(task_graphs["segmentation"], images, again, "--target", "c") == EXIT_PARTIAL
    assert {line["target"] for line in json_lines(again / "results.jsonl")} == {3}


def test_embedding_lines_with_a_reference(task_graphs, images, tmp_path: Path,
                                          json_lines: JsonLines) -> None:
    graph = task_graphs["embedding"]
    out = tmp_path / "image"
    assert _run(graph, images, out, "--reference", str(images["b"]), "--metrics", "avg_drop",
                "--metrics-steps", "2") == EXIT_PARTIAL
    lines = {Path(line["path"]).name: line for line in json_lines(out / "results.jsonl")}
    assert lines["b.png"]["score"] == pytest.approx(1.0, abs=1e-5)  # the reference itself
    assert all(line["task"] == "embedding" and line["reference"] == "image" and
               len(line["embedding"]) == 6 and -1 <= line["score"] <= 1 for line in lines.values())
    a = torch.tensor(lines["a.jpg"]["embedding"])
    b = torch.tensor(lines["b.png"]["embedding"])
    assert lines["a.jpg"]["score"] == pytest.approx(float(torch.cosine_similarity(a, b, dim=0)),
                                                    abs=1e-4)
    vec = tmp_path / "ref.json"
    vec.write_text(json.dumps(lines["b.png"]["embedding"]))
    again = tmp_path / "vector"
    assert _run(graph, images, again, "--reference", str(vec)) == EXIT_PARTIAL
    same = {Path(line["path"]).name: line["score"] for line in json_lines(again / "results.jsonl")}
    assert same == pytest.approx({k: v["score"] for k, v in lines.items()}, abs=1e-4)
    np.save(tmp_path / "ref.npy", np.ones(6, np.float32))
    assert _run(graph, images, tmp_path / "npy", "--reference", str(tmp_path / "ref.npy")) \
        == EXIT_PARTIAL


@pytest.mark.parametrize("args,match", [
    ((), "needs --reference"),
    (("--reference", "missing.json"), "is not a file"),
    (("--reference", "{bad}"), "6 finite numbers"),
    (("--reference", "{short}"), "3 values"),
    (("--target", "2", "--reference", "{ones}"), "no target input"),
])
def test_embedding_reference_is_checked_before_any_image(task_graphs, images, tmp_path: Path,
                                                          capsys, args: Any, match: str) -> None:
    (tmp_path / "bad.json").write_text("[1, 2, 3, 4, 5, null]")
    (tmp_path / "short.json").write_text("[1, 2, 3]")
    (tmp_path / "ones.json").write_text("[1, 1, 1, 1, 1, 1]")
    args = [a.format(bad=tmp_path / "bad.json", short=tmp_path / "short.json",
                     ones=tmp_path / "ones.json") for a in args]
    out = tmp_path / "out"
    assert _run(task_graphs["embedding"], images, out, *args) == EXIT_USAGE
    assert match in capsys.readouterr().err and not (out / "results.jsonl").exists()


def test_other_graphs_take_no_reference(task_graphs, images, tmp_path: Path, capsys) -> None:
    assert _run(task_graphs["segmentation"], images, tmp_path / "o", "--reference",
                str(images["a"])) == EXIT_USAGE
    assert "the segmentation graph takes none" in capsys.readouterr().err
    assert _run(task_graphs["multilabel"], images, tmp_path / "p", "--target", "x") in (EXIT_OK,
                                                                                       EXIT_PARTIAL)
