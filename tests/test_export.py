"""`python -m export` end to end: real exports, real onnxruntime sessions, the graph gate on every export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.graph_gate import check_graph
from export.manifest import MANIFEST_NAME
from export.weights import sha256_file
from focal import create_model
from tests.conftest import load_official_case, run_cli


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits(sess: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: images})[0])


def test_manifest_describes_the_export(tiny_export: tuple[Path, dict[str, Any], str]) -> None:
    out, manifest, _ = tiny_export
    assert manifest["variant"] == "focal_tiny"
    assert manifest["task"] == "classify"
    assert manifest["input_size"] == [224, 224]
    assert manifest["precision"] == "fp16"
    assert manifest["random_init"] is True
    assert manifest["weights"]["source"] == "random-init"
    assert manifest["batch"] == {"min": 1, "opt": 8, "max": 32}
    assert manifest["engine"] is None
    assert manifest["engine_info"] is None
    assert "TensorRT" in manifest["engine_skipped_reason"]
    assert manifest["preprocess"]["resize_to_cover"] == [256, 256]
    assert manifest["preprocess"]["crop"] == [224, 224]
    assert manifest["versions"]["torch"].startswith("2.13")
    assert manifest["versions"]["onnxruntime"]
    labels = (out / manifest["labels"]).read_text().splitlines()
    assert len(labels) == 1000
    assert labels[0] == "tench"
    for name in (manifest["onnx"], manifest["onnx_fp32"], manifest["labels"]):
        assert manifest["sha256"][name] == sha256_file(out / name)


def test_every_exported_graph_passes_the_gate(tiny_export: tuple[Path, dict[str, Any], str]) -> None:
    out, manifest, _ = tiny_export
    for name in (manifest["onnx_fp32"], manifest["onnx"]):
        report = check_graph(onnx.load(str(out / name)))
        assert report.node_count < 1500
    assert manifest["graph"]["node_count"] == check_graph(onnx.load(str(out / manifest["onnx_fp32"]))).node_count


def test_onnx_matches_pytorch_at_batch_1_and_3(tiny_export: tuple[Path, dict[str, Any], str]) -> None:
    out, manifest, _ = tiny_export
    assert manifest["verification"]["fp32_vs_torch"]["relative_diff"] < 1e-4
    torch.manual_seed(0)  # the export's random-init seed
    model = create_model("focal_tiny")
    sess = session(out / manifest["onnx_fp32"])
    for batch in (1, 3):
        images = torch.randn(batch, 3, 224, 224)
        with torch.inference_mode():
            expected = model(images).numpy()
        assert np.abs(logits(sess, images.numpy()) - expected).max() < 1e-4


def test_batch_elements_are_independent_under_onnxruntime(tiny_export: tuple[Path, dict[str, Any], str]) -> None:
    out, manifest, _ = tiny_export
    sess = session(out / manifest["onnx_fp32"])
    images = np.random.default_rng(5).standard_normal((5, 3, 224, 224)).astype(np.float32)
    batched = logits(sess, images)
    for i in range(5):
        assert np.abs(logits(sess, images[i : i + 1])[0] - batched[i]).max() < 1e-5


def test_fp16_graph_keeps_io_fp32_and_agrees(tiny_export: tuple[Path, dict[str, Any], str]) -> None:
    out, manifest, _ = tiny_export
    fp16 = onnx.load(str(out / manifest["onnx"]))
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert fp16.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in fp16.graph.initializer)
    check = manifest["verification"]["fp16_vs_fp32"]
    assert check["relative_diff"] < 1e-2
    assert check["checked_with"] == "onnxruntime CPU"


def test_progress_is_printed_step_by_step(tiny_export: tuple[Path, dict[str, Any], str]) -> None:
    _, _, stdout = tiny_export
    for step in ("[1/7] weights", "[3/7] ONNX export", "[6/7] TensorRT engine", "[7/7] manifest"):
        assert step in stdout
    assert "RANDOM-INIT" in stdout
    assert "done in" in stdout


def _micro_kwargs(name: str) -> str:
    kwargs = load_official_case(name).kwargs
    keep = ("embed_dim", "depths", "num_heads", "num_classes", "use_conv_embed")
    return json.dumps({k: kwargs[k] for k in keep})


@pytest.mark.parametrize("name", ["micro_256x320", "micro_useconv_224"])
def test_export_of_an_official_checkpoint_reproduces_the_official_logits(name: str, tmp_path: Path) -> None:
    case = load_official_case(name)
    h, w = case.images.shape[-2:]
    result = run_cli(
        "--variant", "focal_tiny", "--weights", str(case.checkpoint), "--image-size", f"{h}x{w}",
        "--model-kwargs", _micro_kwargs(name), "--out", str(tmp_path), "--engine", "skip",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["random_init"] is False
    assert manifest["weights"]["sha256"] == sha256_file(case.checkpoint)
    assert manifest["num_classes"] == 10
    assert (tmp_path / "labels.txt").read_text().splitlines() == [f"class_{i}" for i in range(10)]
    sess = session(tmp_path / manifest["onnx"])
    assert np.abs(logits(sess, case.images.numpy()) - case.logits.numpy()).max() <= 1e-4
    assert np.abs(logits(sess, case.images[:1].numpy()) - case.logits_b1.numpy()).max() <= 1e-4


def test_reexport_reuses_valid_artifacts_and_redoes_damaged_ones(tmp_path: Path) -> None:
    case = load_official_case("micro_224")
    args = ["--variant", "focal_tiny", "--weights", str(case.checkpoint), "--model-kwargs", _micro_kwargs("micro_224")]
    args += ["--out", str(tmp_path), "--engine", "skip"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "reusing" not in first.stdout
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert "unchanged inputs and artifacts (sha256 verified): reusing" in second.stdout
    onnx_path = tmp_path / "model.fp32.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[:-10] + b"0123456789")  # damaged
    third = run_cli(*args)
    assert third.returncode == 0, third.stderr
    assert "reusing" not in third.stdout
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["sha256"]["model.fp32.onnx"] == sha256_file(onnx_path)
    fourth = run_cli(*args, "--max-batch", "64", "--opt-batch", "16")  # another profile: not the same export
    assert fourth.returncode == 0, fourth.stderr
    assert "reusing" not in fourth.stdout
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["batch"] == {"min": 1, "opt": 16, "max": 64}


def test_a_failed_export_leaves_no_manifest_behind(tmp_path: Path) -> None:
    case = load_official_case("micro_224")
    args = ["--variant", "focal_tiny", "--weights", str(case.checkpoint), "--model-kwargs", _micro_kwargs("micro_224")]
    args += ["--out", str(tmp_path), "--engine", "skip"]
    assert run_cli(*args).returncode == 0
    labels = tmp_path / "wrong_labels.txt"
    labels.write_text("just one\n")
    failed = run_cli(*args, "--labels", str(labels))
    assert failed.returncode == 1
    assert "1 names for 10 classes" in failed.stderr
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_engine_required_without_tensorrt_fails_with_the_reason(tmp_path: Path) -> None:
    if _tensorrt_present():
        pytest.skip("TensorRT is installed here")
    case = load_official_case("micro_224")
    result = run_cli(
        "--variant", "focal_tiny", "--weights", str(case.checkpoint), "--model-kwargs", _micro_kwargs("micro_224"),
        "--out", str(tmp_path), "--engine", "required",
    )  # fmt: skip
    assert result.returncode == 1
    assert (
        "export failed: --engine required, but no engine can be built here: TensorRT is not installed" in result.stderr
    )


def _tensorrt_present() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def test_pretrained_offline_fails_clearly_naming_weights(tmp_path: Path) -> None:
    """No network: an unreachable proxy makes the download fail at once, as offline."""
    unreachable = "http://127.0.0.1:9"
    env = {"FOCAL_CACHE_DIR": str(tmp_path / "cache"), "https_proxy": unreachable, "http_proxy": unreachable}
    env |= {"HTTPS_PROXY": unreachable, "HTTP_PROXY": unreachable, "no_proxy": "", "NO_PROXY": ""}
    result = run_cli("--variant", "focal_small", "--fp16", "--out", str(tmp_path / "out"), env=env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("export failed: could not download the official checkpoint")
    assert "--weights PATH (e.g. focal-small-is224-ws7.pth)" in last
    assert not list((tmp_path / "cache").glob("*.part"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "detect"], "--task detect needs weights"),
        (["--task", "detect", "--random-init", "--image-size", "300"], "sides that are multiples of 32"),
        (["--backbone-weights", "x.pth"], "--backbone-weights is for --task detect"),
        (["--random-init", "--min-batch", "2"], "--min-batch must be 1"),
        (["--random-init", "--opt-batch", "64"], "1 <= min <= opt <= max"),
        (["--weights", "/nonexistent.pth"], "--weights /nonexistent.pth: no such file"),
        (["--random-init", "--labels", "/nonexistent.txt"], "--labels /nonexistent.txt: no such file"),
        (["--random-init", "--model-kwargs", '{"foo": 1}'], "unknown Focal Transformer argument(s): foo"),
        (["--random-init", "--model-kwargs", '{"use_shift": true}'], "use_shift=True is not supported"),
        (["--random-init", "--model-kwargs", '{"img_size": 384}'], "cannot set img_size: use --image-size"),
        (["--random-init", "--model-kwargs", '{"num_classes": 0}'], "num_classes must be a positive integer"),
        (["--random-init", "--model-kwargs", "[1]"], "must be a JSON object"),
        (["--random-init", "--workspace-gib", "nan"], "--workspace-gib must be a positive number"),
        (["--random-init", "--image-size", "16"], "too small"),
    ],
)
def test_bad_options_fail_with_one_clear_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_cli("--variant", "focal_tiny", "--out", str(tmp_path), *args)
    assert result.returncode in (1, 2)  # 2: argparse refused the value
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_variant_is_refused(tmp_path: Path) -> None:
    result = run_cli("--variant", "focal_huge", "--random-init", "--out", str(tmp_path))
    assert result.returncode == 1
    assert "unknown variant 'focal_huge'" in result.stderr


def test_engine_command_copies_an_export_and_records_why_there_is_no_engine(
    tiny_export: tuple[Path, dict[str, Any], str], tmp_path: Path
) -> None:
    """`python -m export.engine` as the init container runs it; without TensorRT it must say so."""
    import subprocess
    import sys

    target = tmp_path / "cache" / "model"
    cmd = [sys.executable, "-m", "export.engine", "--source", str(tiny_export[0]), "--model", str(target)]
    auto = subprocess.run([*cmd, "--engine", "auto"], capture_output=True, text=True, timeout=120)
    assert auto.returncode == 0, auto.stderr
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    assert manifest["engine"] is None
    assert manifest["engine_skipped_reason"]
    assert sha256_file(target / manifest["onnx"]) == tiny_export[1]["sha256"][manifest["onnx"]]
    if not _tensorrt_present():
        required = subprocess.run([*cmd, "--engine", "required"], capture_output=True, text=True, timeout=120)
        assert required.returncode == 1
        assert "no engine can be built here" in required.stderr
        assert "already holds this export" in required.stdout
