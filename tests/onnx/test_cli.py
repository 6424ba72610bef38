"""camserve.onnx.cli: the batch job's command line — option values, usage errors (exit 2 before
any output), the help text, and the entry points that run it."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import pytest
import torch

from camserve.onnx.cli import check_address, main, parse_actors, parse_bytes, ray_options
from camserve.onnx.export import export_plain_onnx
from camserve.onnx.inputs import UsageError
from camserve.onnx.job import EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, JobConfig
from camserve.onnx.batch import run_job
from camserve.onnx.ray import RayOptions

from .conftest import ROOT, SIZE, photo

JsonLines = Callable[[Path], list[dict]]


def test_entry_points_run_main() -> None:
    """``camserve-batch`` and ``python -m export.batch_cam`` both run :func:`main`."""
    import tomllib

    from export import batch_cam

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["camserve-batch"] == "camserve.onnx.cli:main"
    assert batch_cam.main is main


def test_parse_bytes() -> None:
    assert parse_bytes("1") == 1 and parse_bytes("64K") == 64 * 1024 and parse_bytes("2gb") == 2**31
    for bad in ("0", "-1", "1T", "", "x" * 500, "1" * 16):
        with pytest.raises(argparse.ArgumentTypeError, match="allowed: a positive number") as err:
            parse_bytes(bad)
        assert len(str(err.value)) < 200


def test_usage_errors(graph: Path, images: dict[str, Path], tmp_path: Path, model: torch.nn.Module,
                      capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    assert main(["--model", str(graph), str(tmp_path / "nope"), "--out", out]) == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err
    assert main(["--model", str(graph), str(images["a"]), "--out", out, "--save", "gif"]) == EXIT_USAGE
    assert "allowed: heatmap, overlay, npy" in capsys.readouterr().err
    assert main(["--model", str(graph), str(images["a"]), "--out", out,
                 "--method", "hirescam"]) == EXIT_USAGE
    assert "available: gradcam, layercam" in capsys.readouterr().err
    assert main(["--model", str(graph), str(images["a"]), "--out", out, "--target", "yak"]) == EXIT_USAGE
    assert main(["--model", str(graph), str(images["a"]), "--out", out, "--batch-size", "0"]) == EXIT_USAGE
    plain = export_plain_onnx(model, tmp_path / "plain.onnx", SIZE)
    assert main(["--model", str(plain), str(images["a"]), "--out", out]) == EXIT_USAGE
    assert "not a camserve CAM graph" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(graph), "--out", out])  # no INPUT: argparse
    assert exc.value.code == 2


def test_report_after_the_run_not_after_a_usage_error(graph: Path, images: dict[str, Path],
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``--report`` writes DIR/report.html after a run with failed items (the job's exit status
    stays), nothing after a usage error, and exit status 1 when the page cannot be written."""
    out = tmp_path / "out"
    base = ["--model", str(graph), str(images["root"]), "--out", str(out), "--report",
            "--save", "heatmap,overlay"]
    assert main(base + ["--method", "scorecam"]) == EXIT_USAGE
    assert not (out / "report.html").exists()
    capsys.readouterr()
    assert main(base + ["--batch-size", "2"]) == EXIT_PARTIAL               # 5 images, 3 broken
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.html'} (0 failed previews)" in printed
    assert "report_files/report.js" in (out / "report.html").read_text()
    assert len(list((out / "thumbs").glob("*/*.jpg"))) == 2 * 5             # image and overlay
    # a page that cannot be written: the job's files are there, the status says the page is not
    other = tmp_path / "other"
    other.mkdir()
    (other / "report_files").write_text("a file where the page's folder goes\n")
    assert main(["--model", str(graph), str(images["a"]), "--out", str(other),
                 "--report"]) == EXIT_FAILURE
    assert "error: the report could not be written" in capsys.readouterr().err
    assert (other / "results.jsonl").read_text().count("\n") == 1


def test_metrics_usage_errors_and_default_off(graph: Path, images: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              json_lines: JsonLines) -> None:
    base = ["--model", str(graph), str(images["a"]), "--out", str(tmp_path / "o"), "--save", "none"]
    assert main(base + ["--metrics", "pointing_game"]) == EXIT_USAGE
    assert "invalid value for --metrics: 'pointing_game' (allowed: deletion" in capsys.readouterr().err
    assert main(base + ["--metrics", "deletion", "--metrics-steps", "0"]) == EXIT_USAGE
    assert "--metrics-steps" in capsys.readouterr().err
    # with --ray the same checks, before any cluster is reached (no refusal of --metrics itself)
    assert main(base + ["--metrics", "deletion", "--metrics-steps", "0",
                        "--ray", "local"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--metrics-steps" in err and "Ray" not in err
    with pytest.raises(UsageError, match="--metrics-baseline"):
        run_job(JobConfig(model=graph, inputs=[str(images["a"])], out=tmp_path / "o",
                          metrics=("deletion",), metrics_baseline="zero"))
    # without --metrics: no "metrics" in the lines, nothing on the summary line
    assert main(base) == EXIT_OK
    assert "; metrics (" not in capsys.readouterr().out
    assert all("metrics" not in r for r in json_lines(tmp_path / "o" / "results.jsonl"))


def test_metrics_help_states_the_cost(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--metrics KEYS" in text and "deletion 50, insertion 50, road_morf 9, road_lerf 9" in text
    assert "deletion,insertion,road_morf,avg_drop = 111 runs per image" in text



# -- --ray and its options ---------------------------------------------------------------------------

def test_parse_actors() -> None:
    assert parse_actors("3") == (3, 3)
    assert parse_actors(" 1, 4") == (1, 4)
    for bad in ("0", "4,2", "x", "1,2,3", ""):
        with pytest.raises(UsageError, match="--actors"):
            parse_actors(bad)


def test_check_address() -> None:
    for ok in ("local", "auto", "127.0.0.1:6379", "ray://head:10001", "head.svc:6379"):
        assert check_address(ok) == ok
    for bad in ("", "head", "head:0", "ray://", "http://x:1/y", "x" * 500):
        with pytest.raises(UsageError, match="--ray") as err:
            check_address(bad)
        assert len(str(err.value)) < 200  # the echoed value is cut


def _args(**kw: object) -> argparse.Namespace:
    base = dict(ray=None, actors=None, cpus_per_actor=None, gpus_per_actor=None, threads=None,
                workers=None, overlap=None, device="cpu")
    base.update(kw)
    return argparse.Namespace(**base)


def test_ray_options() -> None:
    assert ray_options(_args()) is None
    opts = ray_options(_args(ray="auto", actors="1,3", cpus_per_actor=2))
    assert opts == RayOptions("auto", (1, 3), 2.0, 0.0)
    assert ray_options(_args(ray="local", device="cuda")).gpus_per_actor == 1.0
    with pytest.raises(UsageError, match="--actors: it needs --ray"):
        ray_options(_args(actors="2"))
    with pytest.raises(UsageError, match="--threads with --ray"):
        ray_options(_args(ray="local", threads=2))
    with pytest.raises(UsageError, match="--cpus-per-actor"):
        ray_options(_args(ray="local", cpus_per_actor=0))


def test_ray_usage_errors(shapes_graph: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    img = photo(tmp_path / "x.png", (40, 40), 0)
    assert main(["--model", str(shapes_graph), str(img), "--out", str(tmp_path / "o"),
                           "--actors", "2"]) == EXIT_USAGE
    assert "--actors: it needs --ray" in capsys.readouterr().err
    assert main(["--model", str(shapes_graph), str(img), "--out", str(tmp_path / "o"),
                           "--ray", "nowhere"]) == EXIT_USAGE
    assert "invalid value for --ray" in capsys.readouterr().err

