"""The serving path needs no model code: in a fresh interpreter, the service serves a real export on
onnxruntime, and an engine on (fake) TensorRT, without importing torch, `focal` or `export`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ClassifyExport
from tests.support import ROOT

SCRIPT = """
import asyncio, sys
from pathlib import Path

import service.__main__  # the CLI entry point and all it imports
from service.app import create_app
from service.settings import Settings
from tests.support import JPEG, FakeGpu, engine_folder, fake_tensorrt_installed, running_app


async def serve(settings):
    async with running_app(create_app(settings)) as client:
        response = await client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 200, response.text
        return response.json()["model"]["backend"]


backends = [asyncio.run(serve(Settings(models=[Path(sys.argv[1])])))]
with fake_tensorrt_installed(FakeGpu()):
    folder, _ = engine_folder(Path(sys.argv[2]))
    backends.append(asyncio.run(serve(Settings(models=[folder], backend="tensorrt"))))
assert backends == ["onnxruntime", "tensorrt"], backends
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "focal", "export", "onnx"))
print("LOADED", loaded)
"""


def test_the_onnxruntime_and_tensorrt_paths_import_no_torch_focal_or_export(
    classify_export: ClassifyExport, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(classify_export.folder), str(tmp_path / "engine")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout, result.stdout
