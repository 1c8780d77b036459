"""`python -m export` for a classifier: the manifest, the graph gate, verification (and the fp16 gate),
progress, reuse, failures that leave nothing half-made, and the CLI's errors. Exports are micro Focals
(the golden fixtures' shapes), through `run_export` or the CLI's `main` in-process; one test runs the
real CLI in a subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.__main__ import main as export_main
from export.graph_gate import check_graph
from export.options import ExportError, ExportOptions
from export.pipeline import run_export
from export.verify import VerificationError
from focal import FocalTransformer
from manifest import MANIFEST_NAME, read_manifest, sha256_file
from tests.conftest import ClassifyExport
from tests.support import CLASSIFIER_KEYS, ROOT, load_official_case, micro_kwargs, run_cli


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`python -m export ARGS`, in-process: (exit code, stdout, stderr)."""
    try:
        code = export_main(list(args))
    except SystemExit as exc:  # argparse refused an argument
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def logits(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"pixels": images})[0])


def fixture_options(out: Path, **changes: Any) -> ExportOptions:
    """The options `classify_export` was made with (so a copy of it is reused), with changes."""
    kwargs = micro_kwargs(keep=CLASSIFIER_KEYS)
    return ExportOptions(variant="focal_tiny", random_init=True, fp16=True, model_kwargs=kwargs, out=out, **changes)


def fixture_args(out: Path) -> list[str]:
    kwargs = json.dumps(micro_kwargs(keep=CLASSIFIER_KEYS))
    return ["--variant", "focal_tiny", "--random-init", "--fp16", "--model-kwargs", kwargs, "--out", str(out)]


@pytest.fixture
def copied(classify_export: ClassifyExport, tmp_path: Path) -> Path:
    folder = tmp_path / "export"
    shutil.copytree(classify_export.folder, folder)
    return folder


def test_the_manifest_describes_the_export(classify_export: ClassifyExport) -> None:
    folder, manifest = classify_export.folder, classify_export.manifest
    assert read_manifest(folder).model_dump(mode="json") == manifest.model_dump(mode="json")  # as returned
    assert (manifest.variant, manifest.task, manifest.input_size) == ("focal_tiny", "classify", (224, 224))
    assert (manifest.precision, manifest.onnx, manifest.onnx_fp32) == ("fp16", "model.fp16.onnx", "model.fp32.onnx")
    assert manifest.random_init is True
    assert (manifest.weights.source, manifest.weights_role) == ("random-init", "classifier")
    assert manifest.batch.model_dump() == {"min": 1, "opt": 8, "max": 32}
    assert manifest.engine is None
    assert "TensorRT" in (manifest.engine_skipped_reason or "")
    assert (manifest.preprocess.resize_to_cover, manifest.preprocess.crop) == ((256, 256), (224, 224))
    # The default: uint8 pixels in, normalised by the graph's first nodes.
    assert manifest.input.model_dump() == {"name": "pixels", "dtype": "uint8", "shape": ["batch", 3, 224, 224]}
    assert manifest.preprocess.normalise == "graph"
    assert manifest.output.model_dump() == {"name": "logits", "dtype": "float32", "shape": ["batch", 10]}
    assert (manifest.versions["torch"] or "").startswith("2.13")
    assert manifest.versions["onnxruntime"]
    assert (folder / manifest.labels).read_text().splitlines() == [f"class_{i}" for i in range(10)]
    for name in (manifest.onnx, manifest.onnx_fp32, manifest.labels):
        assert manifest.sha256[name] == sha256_file(folder / name)
    assert FocalTransformer(**manifest.focal_config).config.embed_dim == 8  # the model can be rebuilt from it


def test_every_graph_passes_the_gate_and_both_were_verified(classify_export: ClassifyExport) -> None:
    folder, manifest = classify_export.folder, classify_export.manifest
    for name in (manifest.onnx_fp32, manifest.onnx):
        check_graph(onnx.load(str(folder / name)))
    assert manifest.graph.node_count == check_graph(onnx.load(str(folder / manifest.onnx_fp32))).node_count
    assert manifest.verification["fp32_vs_torch"]["relative_diff"] < 1e-4
    fp16 = manifest.verification["fp16_vs_fp32"]
    assert fp16["relative_diff"] < 1e-2
    assert (fp16["top1_flips"], fp16["checked_with"]) == (0, "onnxruntime CPU")
    uint8 = manifest.verification["uint8_input_vs_float"]
    assert set(uint8["graphs"]) == {manifest.onnx_fp32, manifest.onnx}
    assert uint8["graphs"][manifest.onnx_fp32]["relative_diff"] < 1e-5  # float32 rounding only
    assert uint8["graphs"][manifest.onnx]["relative_diff"] < 1e-2
    graph = onnx.load(str(folder / manifest.onnx))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [n.op_type for n in graph.graph.node[:3]] == ["Cast", "Mul", "Add"]  # normalised at once, in fp32
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.graph.initializer)


def test_progress_is_printed_step_by_step(classify_export: ClassifyExport) -> None:
    for step in ("[1/8] weights", "[3/8] ONNX export", "[5/8] fp16 ONNX + verification",
                 "[6/8] uint8 input + verification", "[7/8] TensorRT engine", "[8/8] manifest", "RANDOM-INIT",
                 "done in"):  # fmt: skip
        assert step in classify_export.log


def test_the_cli_export_of_an_official_checkpoint_reproduces_the_official_logits(tmp_path: Path) -> None:
    """The real command in a subprocess: official checkpoint in, the official implementation's logits out."""
    case = load_official_case("micro_256x320")
    result = run_cli(
        "--variant", "focal_tiny", "--weights", str(case.checkpoint), "--image-size", "256x320",
        "--model-kwargs", json.dumps(micro_kwargs("micro_256x320", CLASSIFIER_KEYS)), "--out", str(tmp_path),
        "--engine", "skip", "--no-uint8-input",  # the fixtures' inputs are normalised floats
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"exported focal_tiny to {tmp_path}" in result.stdout
    manifest = read_manifest(tmp_path)
    assert manifest.random_init is False
    assert (manifest.weights.source, manifest.weights.sha256) == ("file", sha256_file(case.checkpoint))
    assert manifest.engine_skipped_reason == "--engine skip"
    assert np.abs(logits(tmp_path / manifest.onnx, case.images.numpy()) - case.logits.numpy()).max() <= 1e-4
    assert np.abs(logits(tmp_path / manifest.onnx, case.images[:1].numpy()) - case.logits_b1.numpy()).max() <= 1e-4


def test_a_useconv_checkpoint_exports_to_the_official_logits(tmp_path: Path) -> None:
    case = load_official_case("micro_useconv_224")
    opts = ExportOptions(
        variant="focal_tiny",
        weights=case.checkpoint,
        model_kwargs=micro_kwargs("micro_useconv_224", CLASSIFIER_KEYS),
        out=tmp_path,
        engine="skip",
        uint8_input=False,  # the fixtures' inputs are normalised floats
    )
    manifest = run_export(opts, log=lambda _: None)
    assert np.abs(logits(tmp_path / manifest.onnx, case.images.numpy()) - case.logits.numpy()).max() <= 1e-4


def test_reexport_reuses_valid_artifacts_and_redoes_damaged_ones_or_another_profile(copied: Path) -> None:
    lines: list[str] = []
    run_export(fixture_options(copied), log=lines.append)
    assert "unchanged inputs and artifacts (sha256 verified): reusing" in "\n".join(lines)
    graph = copied / "model.fp16.onnx"
    graph.write_bytes(graph.read_bytes()[:-10] + b"0123456789")  # damaged
    lines.clear()
    manifest = run_export(fixture_options(copied), log=lines.append)
    assert "reusing" not in "\n".join(lines)
    assert manifest.sha256["model.fp16.onnx"] == sha256_file(graph)
    lines.clear()
    manifest = run_export(fixture_options(copied, opt_batch=16, max_batch=64), log=lines.append)
    assert "reusing" not in "\n".join(lines)  # another profile: not the same export
    assert read_manifest(copied).batch.model_dump() == {"min": 1, "opt": 16, "max": 64}


def test_a_failed_export_leaves_no_manifest_behind(copied: Path, tmp_path: Path) -> None:
    labels = tmp_path / "wrong_labels.txt"
    labels.write_text("just one\n")
    with pytest.raises(ExportError, match="1 names for 10 classes"):
        run_export(fixture_options(copied, labels=labels), log=lambda _: None)
    assert not (copied / MANIFEST_NAME).exists()


def test_fp16_that_disagrees_with_fp32_fails_the_export(tmp_path: Path) -> None:
    """A head bias beyond fp16's range (65504): the converter clamps it, fp32 is fine, fp16 is not.
    Before the gate, such an fp16 graph was written and served."""
    torch.manual_seed(0)
    model = FocalTransformer(**load_official_case("micro_224").kwargs)
    with torch.no_grad():
        model.head.bias[3] = 1e5
    checkpoint = tmp_path / "overflowing.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    opts = ExportOptions(
        variant="focal_tiny",
        weights=checkpoint,
        fp16=True,
        model_kwargs=micro_kwargs(keep=CLASSIFIER_KEYS),
        out=tmp_path / "out",
        engine="skip",
    )
    with pytest.raises(VerificationError, match=r"the fp16 graph disagrees with fp32: max \|diff\| .* \(limit 0.01\)"):
        run_export(opts, log=lambda _: None)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    assert not (tmp_path / "out" / "model.fp16.onnx").exists()


def test_engine_required_without_tensorrt_fails_with_the_reason(
    copied: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if _tensorrt_present():
        pytest.skip("TensorRT is installed here")
    code, _, err = cli(capsys, *fixture_args(copied), "--engine", "required")
    assert code == 1
    assert "export failed: --engine required, but no engine can be built here: TensorRT is not installed" in err


def _tensorrt_present() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def test_pretrained_offline_fails_clearly_naming_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No network: an unreachable proxy makes the download fail at once, as offline."""
    monkeypatch.setenv("FOCAL_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "")
    code, _, err = cli(capsys, "--variant", "focal_small", "--fp16", "--out", str(tmp_path / "out"))
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("export failed: could not download the official checkpoint")
    assert "--weights PATH (e.g. focal-small-is224-ws7.pth)" in last
    code, _, err = cli(capsys, "--variant", "focal_fast_small", "--out", str(tmp_path / "out"))
    assert code == 1
    assert "--weights PATH (e.g. focalv2-small-useconv-is224-ws7.pth)" in err.strip().splitlines()[-1]
    assert not list((tmp_path / "cache").glob("*.part"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "detect"], "--task detect needs weights"),
        (["--task", "detect", "--random-init", "--canvases", "300x320"], "sides that are multiples of 32"),
        (["--task", "detect", "--random-init", "--image-size", "320"], "a detector's input sizes are its canvases"),
        (["--task", "detect", "--random-init", "--canvases", "320x320", "--canvas-set", "640"], "not both"),
        (["--task", "detect", "--random-init", "--test-scale", "640x480"], "goes with --canvases"),
        (["--task", "detect", "--random-init", "--canvases", "320"], "'320' is not HxW"),
        (["--task", "detect", "--random-init", "--test-scale", "480x640"], "LONGxSHORT"),
        (["--task", "detect", "--random-init", "--model-kwargs", '{"num_classes": 3}'], "from its checkpoint"),
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
        (["--random-init", "--task", "segment"], "invalid choice: 'segment'"),
        (["--variant", "focal_fast_tiny", "--random-init", "--image-size", "256"], "does not work with Focal-fast"),
        (["--variant", "focal_fast_tiny", "--task", "detect", "--random-init"], "as a detection backbone"),
        (["--variant", "focal_fast_tiny", "--random-init", "--model-kwargs", '{"focal_topK": 0}'], "at least 1"),
    ],
)
def test_bad_options_fail_with_one_clear_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "--variant", "focal_tiny", "--out", str(tmp_path), *args)
    assert code in (1, 2)  # 2: argparse refused the value
    assert message in err
    assert "Traceback" not in err


def test_unknown_variant_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "--variant", "focal_huge", "--random-init", "--out", str(tmp_path))
    assert code == 1
    assert "unknown variant 'focal_huge'" in err


def test_untrained_weights_are_labelled_for_every_task() -> None:
    """random-init, and a detector whose FPN and head are untrained (backbone weights only)."""
    assert ExportOptions(variant="focal_tiny", random_init=True).untrained
    assert not ExportOptions(variant="focal_tiny", weights=Path("w.pth")).untrained
    detect = {"variant": "focal_tiny", "task": "detect"}
    assert ExportOptions(**detect, backbone_weights=Path("b.pth")).untrained
    assert ExportOptions(**detect, pretrained=True).untrained
    assert not ExportOptions(**detect, weights=Path("retinanet.pth")).untrained


ENGINE_SCRIPT = """
import sys
from export.engine import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules, "python -m export.engine imported torch"
sys.exit(code)
"""


def test_the_engine_command_copies_an_export_needs_no_torch_and_says_why_there_is_no_engine(
    classify_export: ClassifyExport, tmp_path: Path
) -> None:
    """`python -m export.engine` as the GPU image's init container runs it (no torch there)."""
    target = tmp_path / "cache" / "model"
    cmd = [sys.executable, "-c", ENGINE_SCRIPT, "--source", str(classify_export.folder), "--model", str(target)]
    auto = subprocess.run([*cmd, "--engine", "auto"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert auto.returncode == 0, auto.stderr
    manifest = read_manifest(target)
    assert manifest.engine is None
    assert manifest.engine_skipped_reason
    assert sha256_file(target / manifest.onnx) == classify_export.manifest.sha256[manifest.onnx]
    if not _tensorrt_present():
        required = subprocess.run([*cmd, "--engine", "required"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert required.returncode == 1
        assert "no engine can be built here" in required.stderr
        assert "already holds this export" in required.stdout
    missing = subprocess.run([*cmd[:3], "--model", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 1
    assert "engine build failed:" in missing.stderr
    assert "no manifest.json" in missing.stderr
